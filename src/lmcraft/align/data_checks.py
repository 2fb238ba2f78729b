"""Chat training data checked before the first step: the silent label-mask bugs, caught with the example shown.

A chat-data stage (SFT, reward, DPO, ...) trains on -sum_{t in A} log p(x_t | x_<t), where A is the set of
tokens its chat template marks as the assistant's. Wrong masks train fine and fail later (a model that never
stops, or one that learned the prompts), so before step 0 every tokenized example is checked:

1. the mask is not empty (some assistant token is trained);
2. on multi-role data, the mask is not all-ones (the prompt is not trained);
3. every trained run of tokens contains an end-of-turn token (one of the tokenizer's EOS ids), so the model
   learns to stop;
4. the collate function keeps every trained token's label, also where `pad == eos` (a collate that masks
   labels by the pad id masks the real EOS too); checked on a sample of examples;
5. reasoning blocks (`<think>...</think>`) of trained assistant messages survive the template.

Prompt-only data (GRPO's task prompts, whose answers the policy samples) is checked by `check_prompts`: the chat
template opens an assistant turn after each prompt (add_generation_prompt changes the rendering, so sampled
answers are assistant turns), the tokenizer has an end-of-turn token to stop sampling at, and every prompt plus
`max_new_tokens` fits the model's context.

After the final save, `check_saved_template` confirms that the model folder carries the template used in
training. A failure raises `DataCheckError` with the offending example rendered as `--preview` shows it
(trained text in «»).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcraft.align.instruct import Tokenized, highlight
from lmcraft.errors import LmcraftError

__all__ = ["DataCheckError", "DataCheckSummary", "check_chat_examples", "check_prompts", "check_saved_template"]

SAMPLE = 8  # examples run through the collate function
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


class DataCheckError(LmcraftError):
    """Training data that would train the wrong tokens; the message shows the example."""


@dataclass
class DataCheckSummary:
    examples: int
    trained_tokens: int
    tokens: int
    end_tokens: list[int]
    reasoning_blocks: int

    def line(self) -> str:
        ends = ", ".join(map(str, self.end_tokens)) or "none (tokenizer has no EOS: not checked)"
        return (f"data checks passed on {self.examples:,} examples: {self.trained_tokens:,} of {self.tokens:,} tokens "
                f"trained, every assistant turn ends with an end-of-turn token in the loss (ids {ends}), "
                f"{self.reasoning_blocks} reasoning block(s) kept")


def _fail(problem: str, index: int, example: Tokenized) -> DataCheckError:
    where = f"example {index}" + (f" ({example.source})" if example.source else "")
    return DataCheckError(f"training data check failed on {where}: {problem}\n--- the example, trained text in «» "
                          f"---\n{highlight(example, color=False)}\n---")


def _trained_runs(trained: Sequence[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, t in enumerate([*trained, False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _check_one(index: int, messages: Sequence[Mapping[str, Any]], example: Tokenized, end_ids: set[int]) -> int:
    """Checks 1, 2, 3 and 5 on one example; returns how many reasoning blocks it carries."""
    if example.num_trained == 0:
        raise _fail("the loss mask is empty: no assistant token is trained. Does the chat template render the "
                    "assistant turns (and mark them, if it uses {% generation %} blocks)?", index, example)
    prompted = any(m.get("role") != "assistant" and str(m.get("content") or "").strip() for m in messages)
    if prompted and all(example.trained):
        raise _fail("every token is trained, the prompt too: the template's assistant mask covers the whole "
                    "conversation.", index, example)
    if end_ids:
        for start, stop in _trained_runs(example.trained):
            if not end_ids & set(example.input_ids[start:stop]):
                raise _fail(f"an assistant turn is trained without its end-of-turn token (ids {sorted(end_ids)}): a "
                            "model trained on it never learns to stop. Make the template close each assistant turn "
                            "with the EOS token inside the trained text (e.g. inside the {% generation %} block), or "
                            "add the end-of-turn token to the tokenizer's EOS ids.", index, example)
    blocks = 0
    for m in messages:
        if m.get("role") != "assistant":
            continue
        for block in _THINK.findall(str(m.get("content") or "")):
            blocks += 1
            if block not in example.text:
                raise _fail("the chat template drops the reasoning block (<think>...</think>) of an assistant "
                            "message, so the model would be trained to answer without it.", index, example)
    return blocks


def _check_collate(index: int, example: Tokenized, collate: Callable[[list[Tokenized]], Mapping[str, Any]]) -> None:
    """Check 4: after collating, every trained token (but the first, which nothing before it predicts) keeps
    its own id as label."""
    labels = collate([example])["labels"][0].tolist()
    lost = [i for i, t in enumerate(example.trained) if t and i > 0 and labels[i] != example.input_ids[i]]
    if lost:
        ids = sorted({example.input_ids[i] for i in lost})
        raise _fail(f"the collate function drops the labels of {len(lost)} trained token(s) (ids {ids}); when the "
                    "pad id equals the EOS id, masking labels by the pad id masks the real EOS too.", index, example)


def check_chat_examples(
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    examples: Sequence[Tokenized],
    eos_token_ids: Sequence[int],
    collate: Callable[[list[Tokenized]], Mapping[str, Any]],
) -> DataCheckSummary:
    """Run the checks of the module doc on `examples` (tokenized, before truncation) and the `conversations` they
    come from; the first `SAMPLE` also go through `collate`. Raises `DataCheckError` on the first failure."""
    if not examples:
        raise DataCheckError("no training example is left to check: every record was skipped (see the counts above)")
    end_ids = set(eos_token_ids)
    for index, example in enumerate(examples[:SAMPLE]):
        _check_collate(index, example, collate)
    blocks = sum(_check_one(i, m, e, end_ids) for i, (m, e) in enumerate(zip(conversations, examples, strict=True)))
    return DataCheckSummary(len(examples), sum(e.num_trained for e in examples),
                            sum(len(e.input_ids) for e in examples), sorted(end_ids), blocks)


def check_prompts(prompts: Sequence[Sequence[Mapping[str, Any]]], render: Callable[..., str], prompt_ids: Sequence[
        Sequence[int]], eos_token_ids: Sequence[int], max_new_tokens: int, context: int) -> str:
    """The prompt checks of the module doc; returns a one-line summary for the run log."""
    if not prompts:
        raise DataCheckError("no prompt to train on")
    if render(prompts[0], add_generation_prompt=True) == render(prompts[0], add_generation_prompt=False):
        raise DataCheckError("the chat template ignores add_generation_prompt: after a prompt it opens no assistant "
                             "turn, so sampled answers would continue the user's message. Use a template with a "
                             f"generation prompt.\n--- prompt 0 as rendered ---\n{render(prompts[0])}\n---")
    if not eos_token_ids:
        raise DataCheckError("the tokenizer has no end-of-turn (EOS) token: sampled answers would never stop before "
                             "max_new_tokens. Set eos_token in the tokenizer config.")
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    if len(prompt_ids[longest]) + max_new_tokens > context:
        raise DataCheckError(f"prompt {longest} has {len(prompt_ids[longest]):,} tokens; with max_new_tokens="
                             f"{max_new_tokens} it exceeds the model's context of {context:,} tokens. Shorten the "
                             "prompts or lower max_new_tokens.")
    return (f"prompt checks passed on {len(prompts):,} prompts: assistant turn opened after each, answers stop at "
            f"ids {sorted(set(eos_token_ids))}, longest prompt {len(prompt_ids[longest])} + {max_new_tokens} new "
            f"tokens within the context of {context:,}")


def check_saved_template(folder: Path, template: str) -> None:
    """The chat template saved with the output model must be the one used in training."""
    from lmcraft.tokenizer.load import load_tokenizer

    saved = load_tokenizer(folder).chat_template
    if saved != template:
        raise DataCheckError(f"{folder}: the saved chat template differs from the one used in training; the model "
                             "would be prompted differently from how it was trained. Save the training template "
                             "with the model.")
