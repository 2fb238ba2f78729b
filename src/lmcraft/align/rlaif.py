"""RLAIF: preference data from AI feedback instead of human labels.

Ranking (Bai et al. 2022, "RLAIF"; Lee et al. 2023). For each prompt x the policy samples k answers y_1..y_k; a judge
(`lmcraft.align.scoring`: a rule, a reward model, or any chat model asked for a rating) scores them, and the pair
(chosen = argmax_i s_i, rejected = argmin_i s_i) is kept when s_max - s_min >= min_gap (ties teach nothing).

Critique and revise (Constitutional AI, Bai et al. 2022). For each prompt: sample an answer y, pick a principle
(seeded), ask the critic model for a critique of y under the principle's critique request, then for a revision
under its revision request (one chat conversation); the pair is (chosen = revision, rejected = y). `rounds` > 1
revises the revision again.

Both write JSONL records in the `prompt` preference format ({"prompt": messages, "chosen": [...], "rejected": [...],
"margin"?, "scores" or "critique"}) that `lmcraft reward` and `lmcraft dpo` read.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcraft.align.data import PreferencePair

if TYPE_CHECKING:
    from torch import nn

    from lmcraft.generate import GenerationConfig
    from lmcraft.tokenizer.load import Tokenizer

__all__ = ["Principle", "DEFAULT_PRINCIPLES", "critique_and_revise", "rank_samples", "sample_answers"]

Messages = list[dict[str, Any]]


@dataclass
class Principle:
    """A constitution entry: how to ask for a critique, and how to ask for a revision."""

    critique: str
    revision: str


DEFAULT_PRINCIPLES = [
    Principle("Identify specific ways in which your last answer is unhelpful, incorrect, or harmful.",
              "Rewrite your last answer to fix the problems you identified. Reply with the new answer only."),
    Principle("Point out anything in your last answer that is vague, off-topic or could mislead the user.",
              "Rewrite your last answer to be clear, on-topic and accurate. Reply with the new answer only."),
]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for lo in range(0, len(items), size):
        yield items[lo: lo + size]


def sample_answers(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Messages],
                   config: GenerationConfig, batch_size: int = 8) -> list[str]:
    """One reply per conversation (chat template), generated in batches; `config.seed` is offset per batch."""
    import dataclasses

    from lmcraft.generate import generate_text

    out: list[str] = []
    for i, chunk in enumerate(_chunks(list(conversations), batch_size)):
        seed = None if config.seed is None else config.seed + i
        result = generate_text(model, tokenizer, list(chunk), dataclasses.replace(config, seed=seed), chat=True)
        out.extend(t.strip() for t in (result.texts or []))
    return out


def rank_samples(prompts: Sequence[tuple[Messages, str]], answers: Sequence[Sequence[str]],
                 scorer: Callable[[list[Messages], list[str]], Any], min_gap: float = 0.0
                 ) -> tuple[list[PreferencePair], list[list[float]]]:
    """Pairs (best, worst) per prompt from k answers each, and every answer's score; prompts whose best and worst
    differ by less than `min_gap` (or by nothing) give no pair."""
    flat_prompts = [p for (p, _), group in zip(prompts, answers, strict=True) for _ in group]
    flat_answers = [a for group in answers for a in group]
    flat = [float(s) for s in scorer(flat_prompts, flat_answers)]
    pairs, all_scores, at = [], [], 0
    for (prompt, source), group in zip(prompts, answers, strict=True):
        scores = flat[at: at + len(group)]
        at += len(group)
        all_scores.append(scores)
        best = max(range(len(group)), key=lambda i: (scores[i], -i))
        worst = min(range(len(group)), key=lambda i: (scores[i], i))
        gap = scores[best] - scores[worst]
        if gap > 0 and gap >= min_gap and group[best] != group[worst]:
            pairs.append(PreferencePair(prompt, [{"role": "assistant", "content": group[best]}],
                                        [{"role": "assistant", "content": group[worst]}], source))
    return pairs, all_scores


def critique_and_revise(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[tuple[Messages, str]],
                        answers: Sequence[str], principles: Sequence[Principle], config: GenerationConfig,
                        rounds: int = 1, seed: int = 0, batch_size: int = 8) -> list[tuple[PreferencePair, list[str]]]:
    """(pair chosen = final revision / rejected = original answer, critiques) per prompt (see the module docstring)."""
    rng = random.Random(seed)
    chats = [[*p, {"role": "assistant", "content": a}] for (p, _), a in zip(prompts, answers, strict=True)]
    current = list(answers)
    critiques: list[list[str]] = [[] for _ in prompts]
    for _ in range(rounds):
        chosen = [rng.choice(list(principles)) for _ in prompts]
        requests = [[*c, {"role": "user", "content": pr.critique}] for c, pr in zip(chats, chosen, strict=True)]
        texts = sample_answers(model, tokenizer, requests, config, batch_size)
        for i, t in enumerate(texts):
            critiques[i].append(t)
        revise = [[*r, {"role": "assistant", "content": t}, {"role": "user", "content": pr.revision}]
                  for r, t, pr in zip(requests, texts, chosen, strict=True)]
        current = sample_answers(model, tokenizer, revise, config, batch_size)
        chats = [[*p, {"role": "assistant", "content": a}] for (p, _), a in zip(prompts, current, strict=True)]
    out = []
    for (prompt, source), original, revised, crit in zip(prompts, answers, current, critiques, strict=True):
        pair = PreferencePair(prompt, [{"role": "assistant", "content": revised}],
                              [{"role": "assistant", "content": original}], source)
        out.append((pair, crit))
    return out
