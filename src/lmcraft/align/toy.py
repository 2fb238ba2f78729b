"""A toy chat task whose aligned behaviour is checkable by a rule: end the answer with "thanks".

The language: a user asks `name some <category>` (or `list <n> <category>`, `what <category> do you like`); the
assistant answers with 2-5 items of that category. In the SFT data only `thanks_rate` (default 15%) of the answers
end with the word "thanks". The rule reward `contains: [thanks]` is therefore rare after SFT, and alignment (PPO
against the rule or a reward model trained on rule-labelled pairs; DPO on rule-labelled pairs) should make it the
norm while the answers stay in the language (the KL penalty / reference keeps them there).

`build(folder)` writes everything a run needs:

    folder/base/        a randomly initialised tiny Llama (HF layout), byte-level BPE tokenizer, ChatML template
    folder/sft.jsonl    conversations ({"messages": [...]}) for SFT
    folder/prompts.jsonl  prompts ({"prompt": ...}) for RL, preference labelling and evaluation
    folder/eval_prompts.jsonl  held-out prompts

Used by the tests, the toy recipes (recipes/*-toy.yaml) and the result runs in docs/results/align-*.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from lmcraft.io import write_jsonl

__all__ = ["CATEGORIES", "TARGET_WORD", "build", "conversation", "prompt_text"]

TARGET_WORD = "thanks"
CATEGORIES: dict[str, list[str]] = {
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"],
    "animals": ["cat", "dog", "horse", "cow", "sheep", "tiger", "lion", "mouse", "bird", "fish"],
    "fruits": ["apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry", "melon", "kiwi"],
    "tools": ["hammer", "saw", "drill", "wrench", "knife", "spade", "rake", "axe", "file", "chisel"],
}
_NUMBERS = ["two", "three", "four", "five"]


def prompt_text(rng: random.Random) -> tuple[str, str, int | None]:
    """(prompt, category, requested count or None)."""
    category = rng.choice(sorted(CATEGORIES))
    kind = rng.randrange(3)
    if kind == 0:
        return f"name some {category}", category, None
    if kind == 1:
        n = rng.randrange(2, 6)
        return f"list {_NUMBERS[n - 2]} {category}", category, n
    return f"what {category} do you like", category, None


def conversation(rng: random.Random, thanks_rate: float) -> list[dict[str, str]]:
    prompt, category, n = prompt_text(rng)
    items = rng.sample(CATEGORIES[category], n or rng.randrange(2, 6))
    answer = " ".join(items) + (f" {TARGET_WORD}" if rng.random() < thanks_rate else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _tokenizer(corpus: list[str]) -> Any:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmcraft.tokenizer.chat import BUILTIN_TEMPLATES
    from lmcraft.tokenizer.load import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     chat_template=BUILTIN_TEMPLATES["chatml"])


def build(folder: str | Path, num_sft: int = 2000, num_prompts: int = 512, num_eval: int = 64,
          thanks_rate: float = 0.15, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Write the toy task into `folder` (see the module docstring); returns `folder`."""
    import torch

    from lmcraft.hub import save_model
    from lmcraft.models import LanguageModel, ModelConfig
    from lmcraft.tokenizer.chat import apply_chat_template

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sft = [conversation(rng, thanks_rate) for _ in range(num_sft)]
    corpus = [apply_chat_template(m, "chatml") for m in sft[:500]]
    corpus += [" ".join(words) for words in CATEGORIES.values()] + [f" {TARGET_WORD}"]
    tokenizer = _tokenizer(corpus)
    tokenizer.save(folder / "base")
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
                      num_kv_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_model(LanguageModel(cfg), folder / "base", tokenizer_dir=folder / "base")
    write_jsonl(folder / "sft.jsonl", [{"messages": m} for m in sft])
    write_jsonl(folder / "prompts.jsonl", [{"prompt": prompt_text(rng)[0]} for _ in range(num_prompts)])
    write_jsonl(folder / "eval_prompts.jsonl", [{"prompt": prompt_text(rng)[0]} for _ in range(num_eval)])
    return folder


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="write the toy alignment task (tiny model, data, prompts)")
    parser.add_argument("folder")
    parser.add_argument("--num-sft", type=int, default=2000)
    args = parser.parse_args()
    print(build(args.folder, num_sft=args.num_sft))


if __name__ == "__main__":
    main()
