"""Score the toy task's SFT, PPO and DPO policies on held-out prompts (writes a markdown table).

    python docs/results/align-toy-eval.py runs/toy > docs/results/align-toy-table.md

For each policy: answers sampled at temperature 1 (3 seeds x the held-out prompts) and greedy answers, and
  thanks      the rule the alignment targets: the answer contains "thanks"
  well-formed items of the asked category, then exactly one final "thanks" (no repetition or drift)
  on-topic    every word other than "thanks" is an item of the asked category
  words       mean answer length in words
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmcraft.align.modeling import load_stage_tokenizer, load_start_model
from lmcraft.align.toy import CATEGORIES, TARGET_WORD
from lmcraft.generate import GenerationConfig, generate_text


def measures(prompt: str, answer: str) -> dict[str, float]:
    category = next(c for c in CATEGORIES if c in prompt.split())
    words = answer.split()
    items = [w for w in words if w != TARGET_WORD]
    on_topic = all(w in CATEGORIES[category] for w in items) and bool(items)
    single_end = words.count(TARGET_WORD) == 1 and words[-1] == TARGET_WORD
    return {"thanks": float(TARGET_WORD in words), "well-formed": float(on_topic and single_end),
            "on-topic": float(on_topic), "words": float(len(words))}


def evaluate(folder: Path, prompts: list[str]) -> dict[str, dict[str, float]]:
    model, tok_dir = load_start_model(folder)
    tokenizer = load_stage_tokenizer(tok_dir)
    out = {}
    for mode, seeds in (("sampled", (0, 1, 2)), ("greedy", (None,))):
        rows = []
        for seed in seeds:
            config = GenerationConfig(max_new_tokens=16, do_sample=seed is not None, seed=seed)
            texts = generate_text(model, tokenizer, prompts, config, chat=True).texts
            rows += [measures(p, t) for p, t in zip(prompts, texts, strict=True)]
        out[mode] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return out


def main() -> None:
    root = Path(sys.argv[1])
    prompts = [json.loads(line)["prompt"] for line in (root / "eval_prompts.jsonl").read_text().splitlines()]
    print("| policy | answers | thanks | well-formed | on-topic | words |\n|---|---|---|---|---|---|")
    for name in ("sft", "ppo", "dpo"):
        for mode, m in evaluate(root / name / "final", prompts).items():
            print(f"| {name.upper()} | {mode} | {m['thanks']:.2f} | {m['well-formed']:.2f} | {m['on-topic']:.2f} "
                  f"| {m['words']:.1f} |")


if __name__ == "__main__":
    main()
