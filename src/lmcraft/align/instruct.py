"""Chat examples as tokens: render through a chat template, mark the assistant tokens, truncate, pack, collate.

Label mask. Training on a conversation x_1..x_T minimises -sum_{t in A} log p(x_t | x_<t), where A holds the
tokens the assistant wrote. A is found in the rendered text, then mapped to tokens (token t is in A when its
character span overlaps an assistant span):

- templates with `{% generation %}...{% endgeneration %}` blocks (the convention of transformers'
  `return_assistant_tokens_mask`): the spans are exactly what those blocks render;
- any other template, by prefixes: assistant message i spans from the end of
  render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i + 1]), so it covers the
  answer and the end-of-turn text the template writes after it (`<|im_end|>\\n`), which the model must learn to
  emit in order to stop. Each rendering must be a prefix of the next; a template that rewrites earlier turns
  (e.g. drops past reasoning) is reported, with the advice to add generation blocks.

`train_on="all"` trains every assistant turn, `"last"` only the final one (earlier turns are context).

Truncation (`max_length` tokens): `right` keeps the first tokens, `left` the last ones (the latest turns),
`drop` skips examples that do not fit. Examples left without a trained token are skipped and counted.

Packing concatenates short examples into rows of at most `max_length` tokens (first-fit over examples sorted by
length). Each row carries a marker on the last token of every example; `lmcraft.objectives.clm.document_attention`
turns the markers into a block-diagonal causal mask and positions that restart at every example, so a packed
example computes exactly what it computes alone (no attention across examples, no position drift).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lmcraft.align.data import Message
from lmcraft.data.collate import IGNORE_INDEX, pad, pad_with_mask
from lmcraft.errors import LmcraftError
from lmcraft.tokenizer.chat import ChatTemplateError, apply_chat_template, resolve_template

if TYPE_CHECKING:
    import torch

__all__ = [
    "ChatFormatter",
    "Tokenized",
    "TrainOn",
    "Truncation",
    "collate_packed",
    "collate_padded",
    "highlight",
    "pack",
    "truncate",
]

TrainOn = Literal["all", "last"]
Truncation = Literal["right", "left", "drop"]
_GEN_START, _GEN_END = "\ue000", "\ue001"  # private-use sentinels marking generation blocks while rendering
_GEN_OPEN = re.compile(r"\{%(-?)\s*generation\s*(-?)%\}")
_GEN_CLOSE = re.compile(r"\{%(-?)\s*endgeneration\s*(-?)%\}")


@dataclass
class Tokenized:
    """Token ids, which of them are trained (assistant tokens), and the character offsets of each token in `text`."""

    input_ids: list[int]
    trained: list[bool]
    text: str
    offsets: list[tuple[int, int]]
    source: str = ""

    @property
    def num_trained(self) -> int:
        return sum(self.trained)

    @property
    def labels(self) -> list[int]:
        """Input ids where trained, -100 elsewhere (the model shifts them: logits at t predict labels at t + 1)."""
        return [i if t else IGNORE_INDEX for i, t in zip(self.input_ids, self.trained, strict=True)]

    def prompt_length(self) -> int:
        """Tokens before the first trained one (the prompt of a single-answer example)."""
        return next((i for i, t in enumerate(self.trained) if t), len(self.trained))


def _with_sentinels(source: str) -> str:
    """The template with each generation block wrapped in sentinel characters, whitespace control kept."""
    opened = _GEN_OPEN.sub(lambda m: f"{{%{m[1]} if true %}}{{{{ '{_GEN_START}' }}}}{{% if true {m[2]}%}}", source)
    return _GEN_CLOSE.sub(lambda m: f"{{%{m[1]} endif %}}{{{{ '{_GEN_END}' }}}}{{% endif {m[2]}%}}", opened)


class ChatFormatter:
    """Render conversations with a chat template and tokenize them with their assistant-token mask.

    template: Jinja source or a built-in name (chatml, llama3, zephyr, alpaca); default: the tokenizer's own.
    """

    def __init__(self, tokenizer: Any, template: str | None = None, train_on: TrainOn = "all") -> None:
        if train_on not in ("all", "last"):
            raise LmcraftError(f"train_on must be 'all' or 'last', got {train_on!r}")
        self.tokenizer = tokenizer
        self.source = resolve_template(template if template is not None else tokenizer.chat_template)
        self.train_on = train_on
        self.has_generation_blocks = bool(_GEN_OPEN.search(self.source))
        self._marked = _with_sentinels(self.source) if self.has_generation_blocks else None
        self._variables = dict(getattr(tokenizer, "special_tokens_map", {}))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return apply_chat_template(messages, self.source, add_generation_prompt=add_generation_prompt,
                                   **self._variables)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a prompt ending with the header of the assistant's turn (what generation starts from)."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt=True), add_special_tokens=False)

    # ---- spans -------------------------------------------------------------------------------------------
    def _trained_messages(self, messages: Sequence[Message], first: int) -> list[int]:
        idx = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and i >= first]
        return idx[-1:] if self.train_on == "last" else idx

    def _spans_by_prefix(self, messages: Sequence[Message], trained: list[int]) -> tuple[str, list[tuple[int, int]]]:
        text = self.render(messages)
        spans = []
        for i in trained:
            if i == 0:
                raise ChatTemplateError("a conversation starts with an assistant message; nothing prompts it")
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ChatTemplateError(
                    f"the chat template renders the conversation differently once message {i} (assistant) and later "
                    "messages follow, so the assistant tokens cannot be found by prefix. Use a template whose "
                    "rendering of earlier turns does not change, or mark the assistant text with "
                    "{% generation %}...{% endgeneration %} blocks.")
            spans.append((len(before), len(upto)))
        return text, spans

    def _spans_by_blocks(self, messages: Sequence[Message], trained: list[int]) -> tuple[str, list[tuple[int, int]]]:
        for m in messages:
            if _GEN_START in str(m.get("content")) or _GEN_END in str(m.get("content")):
                raise ChatTemplateError("a message contains the private-use characters U+E000/U+E001")
        marked = apply_chat_template(messages, self._marked, **self._variables)
        pieces = re.split(f"([{_GEN_START}{_GEN_END}])", marked)
        text, blocks, pos, start = [], [], 0, 0
        for piece in pieces:
            if piece == _GEN_START:
                start = pos
            elif piece == _GEN_END:
                blocks.append((start, pos))
            else:
                text.append(piece)
                pos += len(piece)
        assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if len(blocks) != len(assistant):
            raise ChatTemplateError(f"the template's generation blocks rendered {len(blocks)} times for "
                                    f"{len(assistant)} assistant messages; each assistant turn needs one block")
        keep = set(trained)
        return "".join(text), [b for i, b in zip(assistant, blocks, strict=True) if i in keep]

    def tokenize(self, messages: Sequence[Message], train_from: int = 0, source: str = "") -> Tokenized:
        """Render and tokenize `messages`; assistant messages at index >= `train_from` are trained (per train_on)."""
        trained_msgs = self._trained_messages(messages, train_from)
        if self.has_generation_blocks:
            text, spans = self._spans_by_blocks(messages, trained_msgs)
        else:
            text, spans = self._spans_by_prefix(messages, trained_msgs)
        enc = self.tokenizer.backend.encode(text, add_special_tokens=False)
        offsets = [tuple(o) for o in enc.offsets]
        trained = [any(s < e_tok and s_tok < e or s <= s_tok < e for s, e in spans) for s_tok, e_tok in offsets]
        return Tokenized(list(enc.ids), trained, text, offsets, source)

    def tokenize_pair(self, prompt: Sequence[Message], answer: Sequence[Message], source: str = "") -> Tokenized:
        """prompt + answer, with only the answer's assistant tokens trained (reward model, DPO)."""
        return self.tokenize([*prompt, *answer], train_from=len(prompt), source=source)


def truncate(example: Tokenized, max_length: int, policy: Truncation = "right", keep_answer: bool = False
             ) -> Tokenized | None:
    """Cut `example` to at most `max_length` tokens; None when it is dropped (policy `drop`, or nothing trained left).

    keep_answer: for single-answer examples (preference pairs), cut the prompt from the left first and only then the
    answer from the right, whatever the policy (except `drop`), so the answer survives as long as it can.
    """
    n = len(example.input_ids)
    if n > max_length:
        if policy == "drop":
            return None
        if keep_answer:
            p = example.prompt_length()
            cut_prompt = min(p - 1, n - max_length) if p > 0 else 0  # keep at least one prompt token
            lo, hi = cut_prompt, cut_prompt + max_length
        elif policy == "left":
            lo, hi = n - max_length, n
        else:
            lo, hi = 0, max_length
        example = Tokenized(example.input_ids[lo:hi], example.trained[lo:hi], example.text, example.offsets[lo:hi],
                            example.source)
    return example if example.num_trained else None


def pack(examples: Sequence[Tokenized], max_length: int) -> list[list[Tokenized]]:
    """Group examples into rows of at most `max_length` tokens: first fit over examples sorted by length (longest
    first, ties in input order), rows in order of creation. Every example must already fit."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise LmcraftError(f"example {examples[i].source or i} has {n} tokens, more than max_length={max_length}; "
                               "truncate before packing")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return [[examples[i] for i in row] for row in rows]


def collate_padded(examples: Sequence[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 at padding and untrained tokens)."""
    ids, mask = pad_with_mask([e.input_ids for e in examples], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": pad([e.labels for e in examples], IGNORE_INDEX)}


def collate_packed(rows: Sequence[Sequence[Tokenized]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows -> `input_ids`, `labels`, a block-diagonal causal `attention_mask` (B, 1, T, T) and restarted
    `position_ids`; padding at the end of a row forms its own block with no labels."""
    from lmcraft.objectives.clm import document_attention

    ids = [[i for e in row for i in e.input_ids] for row in rows]
    # an example's first token is never predicted from the previous example
    labels = [[i for e in row for i in (IGNORE_INDEX, *e.labels[1:])] for row in rows]
    ends = [[t == len(e.input_ids) - 1 for e in row for t in range(len(e.input_ids))] for row in rows]
    mask, positions, _ = document_attention(pad(ends, 0), 1)
    return {"input_ids": pad(ids, pad_id), "attention_mask": mask, "position_ids": positions,
            "labels": pad(labels, IGNORE_INDEX)}


def highlight(example: Tokenized, color: bool = True) -> str:
    """The example's text with the trained characters highlighted (ANSI green background, or «…» without colour).

    Only the text of the kept tokens is shown, so truncation is visible too.
    """
    if not example.offsets:
        return ""
    open_, close = ("\x1b[42;30m", "\x1b[0m") if color else ("«", "»")
    out, pos, state = [], example.offsets[0][0], False
    for (start, end), trained in zip(example.offsets, example.trained, strict=True):
        if start > pos:  # characters no token covers (rare): shown plain
            out.append(example.text[pos:start])
        if trained != state:
            out.append(open_ if trained else close)
            state = trained
        out.append(example.text[max(start, pos):end])
        pos = max(pos, end)
    if state:
        out.append(close)
    return "".join(out)
