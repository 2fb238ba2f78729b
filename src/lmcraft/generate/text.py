"""Text in, text out: tokenize prompts (through the chat template when asked), generate, decode."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lmcraft.generate.core import GenerationConfig, GenerationResult, generate
from lmcraft.generate.streaming import Streamer, encode_text

Message = Mapping[str, Any]


def chat_messages(prompt: str | Sequence[Message], system: str | None = None) -> list[dict[str, Any]]:
    """A conversation for the chat template: a user message (or the given messages), after an optional system one."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_chat(tokenizer: Any, messages: Sequence[Message], template: str | None = None) -> str:
    """The prompt text of a conversation, ending with the header of the assistant's turn.

    `template` (Jinja source or a built-in name such as "chatml") overrides the tokenizer's own.
    """
    if hasattr(tokenizer, "apply_chat_template"):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, template=template)
    from lmcraft.tokenizer.chat import apply_chat_template

    return apply_chat_template(messages, template, add_generation_prompt=True)


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str | Sequence[Message]],
    chat: bool = False,
    system: str | None = None,
    template: str | None = None,
) -> list[list[int]]:
    """Token ids of each prompt. Chat prompts are rendered by the template, which already holds the special
    tokens, so they are encoded without adding them again."""
    if not chat:
        return [encode_text(tokenizer, p) for p in prompts]
    return [
        encode_text(tokenizer, render_chat(tokenizer, chat_messages(p, system), template), add_special_tokens=False)
        for p in prompts
    ]


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the model config's `eos_token_id`(s) and the tokenizer's EOS ids."""
    ids: list[int] = []
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is not None:
        ids.extend([eos] if isinstance(eos, int) else eos)
    ids.extend(getattr(tokenizer, "eos_token_ids", None) or [])
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str | Sequence[Message]],
    config: GenerationConfig | None = None,
    *,
    chat: bool = False,
    system: str | None = None,
    template: str | None = None,
    streamer: Streamer | None = None,
) -> GenerationResult:
    """Generate a reply to each prompt; `result.texts` holds the decoded replies and
    `result.tokens_per_second` the speed (prefill included).

    With `chat=True` each prompt is a user message (or a list of messages) rendered by the chat template,
    after an optional `system` message. EOS ids default to the model's and the tokenizer's.
    """
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    config = config or GenerationConfig()
    updates: dict[str, Any] = {}
    if config.eos_token_ids is None:
        updates["eos_token_ids"] = stop_token_ids(model, tokenizer)
    if config.pad_token_id is None and getattr(tokenizer, "pad_token_id", None) is not None:
        updates["pad_token_id"] = tokenizer.pad_token_id
    if updates:
        config = dataclasses.replace(config, **updates)
    ids = encode_prompts(tokenizer, batch, chat=chat, system=system, template=template)
    return generate(model, ids, config, tokenizer=tokenizer, streamer=streamer)
