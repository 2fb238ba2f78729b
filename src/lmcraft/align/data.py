"""Instruction and preference records: read JSON/JSONL files and turn each record into chat messages.

Conversation formats (one record = one conversation):

- `alpaca`:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
              -> [system?, (user, assistant) per history pair, user: instruction + "\\n" + input, assistant: output]
- `sharegpt`: {"conversations": [{"from": human|user|gpt|assistant|system|..., "value": ...}], "system"?}
- `messages`: {"messages": [{"role": system|user|assistant|tool, "content": ...}]} (OpenAI / TRL style)

Preference formats (one record = a prompt and two answers, `chosen` preferred over `rejected`):

- `prompt`:   {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}; without
              "prompt", chosen and rejected are whole conversations and their common leading messages are the prompt
- `alpaca`:   {"instruction", "input"?, "system"?, "chosen": str, "rejected": str}
- `sharegpt`: {"conversations": [...], "chosen": {"from": "gpt", "value": ...} | str, "rejected": ...}
              (LLaMA-Factory's dpo_en_demo layout)

A preference record may carry a numeric "margin" (how clearly chosen wins), used by the reward model's loss.

Labelled-answer formats (KTO: one record = a prompt, one answer, and whether the answer is desirable):

- `messages`: {"messages": [..., {"role": "assistant", ...}], "label": true | false} (LLaMA-Factory's kto_en_demo):
              the prompt is every message before the last, which must be the assistant's answer
- `prompt`:   {"prompt": str | messages, "completion": str | messages, "label": true | false} (TRL's unpaired
              preference layout)
- a preference record (any format above) gives two: chosen (desirable) and rejected (undesirable)

`auto` picks the format from the keys of each record. Every problem names the file, the record (JSON array
index) or line (JSONL) and what was expected. Files are read by the one record reader (`lmcraft.data.records`), so
any of its formats works (JSON, JSONL, CSV/TSV, Parquet; compressed, globbed, or `asset:` paths).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmcraft.data.records import read_records
from lmcraft.errors import ConfigError, InputFileError

__all__ = [
    "Conversation",
    "LabelledAnswer",
    "Message",
    "PreferencePair",
    "load_conversations",
    "load_labelled_answers",
    "load_preferences",
    "load_prompts",
    "record_to_labelled",
    "record_to_messages",
    "record_to_preference",
    "record_to_prompt",
]

Message = dict[str, Any]
ConversationFormat = Literal["auto", "alpaca", "sharegpt", "messages"]
PreferenceFormat = Literal["auto", "prompt", "alpaca", "sharegpt"]

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                   "bot": "assistant", "system": "system", "observation": "tool", "tool": "tool",
                   "function_call": "assistant"}
_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    """Chat messages of one training example and where it came from (`file, record N`)."""

    messages: list[Message]
    source: str


@dataclass
class PreferencePair:
    """A prompt (messages ending with a user turn) and two answers (assistant messages), chosen > rejected."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str
    margin: float = 0.0

    def to_record(self) -> dict[str, Any]:
        """The `prompt` preference format (messages lists), as `lmcraft label-preferences` writes it."""
        record: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.margin:
            record["margin"] = self.margin
        return record


@dataclass
class LabelledAnswer:
    """A prompt (messages ending with a user turn), one answer (assistant messages), and its label."""

    prompt: list[Message]
    answer: list[Message]
    desirable: bool
    source: str


class _Bad(Exception):
    """A record does not fit its format; the message says what was expected."""


# ---- field helpers ------------------------------------------------------------------------------------------
def _text(record: dict[str, Any], key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in record else type(value).__name__
        raise _Bad(f"a string field {key!r} (got {got}; keys: {', '.join(sorted(record)) or 'none'})")
    return value


def _message(role: str, content: Any, what: str) -> Message:
    if role not in _ROLES:
        raise _Bad(f"{what}: a role among {', '.join(_ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise _Bad(f"{what}: string content, got {type(content).__name__}")
    return {"role": role, "content": content}


def _openai_messages(value: Any, what: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _Bad(f"{what}: a non-empty list of {{'role', 'content'}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m:
            raise _Bad(f"{what}[{i}]: an object with 'role' and 'content'")
        out.append(_message(m["role"], m.get("content"), f"{what}[{i}]"))
    return out


def _sharegpt_turn(turn: Any, what: str) -> Message:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise _Bad(f"{what}: an object with 'from' and 'value'")
    role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
        raise _Bad(f"{what}: 'from' among {', '.join(_SHAREGPT_ROLES)}, got {turn['from']!r}")
    return _message(role, turn["value"], what)


def _alpaca_prompt(record: dict[str, Any]) -> list[Message]:
    messages: list[Message] = []
    system = _text(record, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise _Bad("'history' to be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise _Bad(f"history[{i}] to be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = "\n".join(x for x in (_text(record, "instruction"), _text(record, "input", required=False)) if x)
    messages.append({"role": "user", "content": query})
    return messages


def _sharegpt_conversation(record: dict[str, Any]) -> list[Message]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _Bad("'conversations' to be a non-empty list of {'from', 'value'} turns")
    messages = [_sharegpt_turn(t, f"conversations[{i}]") for i, t in enumerate(turns)]
    system = _text(record, "system", required=False)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _detect_conversation(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    raise _Bad("one of the keys 'messages' (messages format), 'conversations' (sharegpt) or 'instruction' (alpaca); "
               f"keys are {', '.join(sorted(record)) or 'none'}")


def _conversation(record: dict[str, Any], fmt: str) -> list[Message]:
    fmt = _detect_conversation(record) if fmt == "auto" else fmt
    if fmt == "alpaca":
        return [*_alpaca_prompt(record), {"role": "assistant", "content": _text(record, "output")}]
    if fmt == "sharegpt":
        return _sharegpt_conversation(record)
    if fmt == "messages":
        return _openai_messages(record.get("messages"), "'messages'")
    raise ConfigError(f"unknown conversation format {fmt!r}; choose auto, alpaca, sharegpt or messages")


def record_to_messages(record: dict[str, Any], fmt: ConversationFormat = "auto", where: str = "record"
                       ) -> list[Message]:
    """The chat messages of one conversation record; it must hold at least one assistant message."""
    try:
        messages = _conversation(record, fmt)
        if not any(m["role"] == "assistant" for m in messages):
            raise _Bad("at least one assistant message to train on")
    except _Bad as err:
        raise InputFileError(*_split(where), f"expected {err}") from None
    return messages


# ---- preferences ----------------------------------------------------------------------------------------
def _answer(value: Any, what: str) -> list[Message]:
    """An answer: a string, one sharegpt/OpenAI message, or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        if "from" in value:
            return [_sharegpt_turn(value, what)]
        return _openai_messages([value], what)
    if isinstance(value, list):
        return _openai_messages(value, what)
    raise _Bad(f"{what}: a string or assistant message(s), got {type(value).__name__}")


def _detect_preference(record: dict[str, Any]) -> str:
    if "chosen" not in record or "rejected" not in record:
        raise _Bad(f"'chosen' and 'rejected' fields; keys are {', '.join(sorted(record)) or 'none'}")
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    return "prompt"


def _preference(record: dict[str, Any], fmt: str) -> tuple[list[Message], list[Message], list[Message]]:
    fmt = _detect_preference(record) if fmt == "auto" else fmt
    if fmt == "alpaca":
        prompt = _alpaca_prompt(record)
    elif fmt == "sharegpt":
        prompt = _sharegpt_conversation(record)
    elif fmt == "prompt":
        if "prompt" not in record:  # implicit prompt: the messages chosen and rejected share
            chosen = _openai_messages(record.get("chosen"), "'chosen'")
            rejected = _openai_messages(record.get("rejected"), "'rejected'")
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            if n == 0:
                raise _Bad("a 'prompt' field, or chosen/rejected conversations that share their first messages")
            return chosen[:n], chosen[n:], rejected[n:]
        raw = record["prompt"]
        prompt = [{"role": "user", "content": raw}] if isinstance(raw, str) else _openai_messages(raw, "'prompt'")
    else:
        raise ConfigError(f"unknown preference format {fmt!r}; choose auto, prompt, alpaca or sharegpt")
    return prompt, _answer(record.get("chosen"), "'chosen'"), _answer(record.get("rejected"), "'rejected'")


def record_to_preference(record: dict[str, Any], fmt: PreferenceFormat = "auto", where: str = "record"
                         ) -> PreferencePair:
    """A `PreferencePair` from one preference record (see the module docstring for the formats)."""
    try:
        prompt, chosen, rejected = _preference(record, fmt)
        if prompt[-1]["role"] == "assistant":
            raise _Bad("a prompt that ends with a user (or system/tool) message, not an assistant one")
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if answer[-1]["role"] != "assistant":
                raise _Bad(f"{name!r} to end with an assistant message")
        margin = record.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, int | float):
            raise _Bad(f"'margin' to be a number, got {margin!r}")
    except _Bad as err:
        raise InputFileError(*_split(where), f"expected {err}") from None
    return PreferencePair(prompt, chosen, rejected, where, float(margin))


def _labelled(record: dict[str, Any], where: str) -> list[LabelledAnswer]:
    if "chosen" in record and "rejected" in record:
        pair = record_to_preference(record, "auto", where)
        return [LabelledAnswer(pair.prompt, pair.chosen, True, where),
                LabelledAnswer(pair.prompt, pair.rejected, False, where)]
    label = record.get("label")
    if not isinstance(label, bool):
        got = "missing" if "label" not in record else repr(label)
        raise _Bad(f"a boolean 'label' (true = desirable answer, false = undesirable), got {got}")
    if "messages" in record:
        messages = _openai_messages(record["messages"], "'messages'")
        prompt, answer = messages[:-1], messages[-1:]
        if not prompt:
            raise _Bad("'messages' with a prompt before the answer (the last message)")
    elif "completion" in record:
        raw = record.get("prompt")
        if raw is None:
            raise _Bad("a 'prompt' field beside 'completion'")
        prompt = [{"role": "user", "content": raw}] if isinstance(raw, str) else _openai_messages(raw, "'prompt'")
        answer = _answer(record["completion"], "'completion'")
    else:
        raise _Bad("'messages' + 'label' (LLaMA-Factory KTO), 'prompt' + 'completion' + 'label' (TRL), or a "
                   f"preference record with 'chosen' and 'rejected'; keys are {', '.join(sorted(record)) or 'none'}")
    if answer[-1]["role"] != "assistant":
        raise _Bad("the answer (the last message) to be an assistant message")
    if prompt[-1]["role"] == "assistant":
        raise _Bad("a prompt that ends with a user (or system/tool) message, not an assistant one")
    return [LabelledAnswer(prompt, answer, label, where)]


def record_to_labelled(record: dict[str, Any], where: str = "record") -> list[LabelledAnswer]:
    """The labelled answers of one record (see the module docstring: one, or two from a preference record)."""
    try:
        return _labelled(record, where)
    except _Bad as err:
        raise InputFileError(*_split(where), f"expected {err}") from None


def record_to_prompt(record: dict[str, Any], where: str = "record") -> list[Message]:
    """The prompt of any record: {"prompt"}, a preference record's prompt, or a conversation up to its last
    assistant message (an alpaca record without "output" is a prompt too)."""
    try:
        if "chosen" in record and "rejected" in record:
            return _preference(record, "auto")[0]
        if isinstance(record.get("prompt"), str):
            return [{"role": "user", "content": record["prompt"]}]
        if "prompt" in record:
            return _openai_messages(record["prompt"], "'prompt'")
        fmt = _detect_conversation(record)
        messages = _alpaca_prompt(record) if fmt == "alpaca" else _conversation(record, fmt)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise _Bad("at least one message before the assistant's answer")
        return messages
    except _Bad as err:
        raise InputFileError(*_split(where), f"expected {err}") from None


def _split(where: str) -> tuple[str, str]:
    file, _, rest = where.rpartition(", ")
    return (file, rest) if file else ("(input)", where)


# ---- whole files ----------------------------------------------------------------------------------------
def _records(paths: Sequence[str | Path], limit: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    if not paths:
        raise ConfigError("no data files given")
    count = 0
    for path in paths:
        for record in read_records(str(path)):
            if limit is not None and count >= limit:
                return
            count += 1
            yield record.source, record.fields


def load_conversations(paths: Sequence[str | Path], fmt: ConversationFormat = "auto",
                       limit: int | None = None) -> list[Conversation]:
    """Every conversation of the files (the first `limit` records when given), in file then record order."""
    return [Conversation(record_to_messages(r, fmt, where), where) for where, r in _records(paths, limit)]


def load_preferences(paths: Sequence[str | Path], fmt: PreferenceFormat = "auto",
                     limit: int | None = None) -> list[PreferencePair]:
    """Every preference pair of the files (the first `limit` records when given)."""
    return [record_to_preference(r, fmt, where) for where, r in _records(paths, limit)]


def load_labelled_answers(paths: Sequence[str | Path], limit: int | None = None) -> list[LabelledAnswer]:
    """Every labelled answer of the files (KTO data; the first `limit` records when given)."""
    return [a for where, r in _records(paths, limit) for a in record_to_labelled(r, where)]


def load_prompts(paths: Sequence[str | Path], limit: int | None = None) -> list[tuple[list[Message], str]]:
    """(prompt messages, source) of every record: RL and preference labelling start from prompts."""
    return [(record_to_prompt(r, where), where) for where, r in _records(paths, limit)]
