"""Chat templates: render a conversation into the exact prompt text a chat model was trained on.

Templates are Jinja2 programs shipped inside model folders (`tokenizer_config.json` →
`chat_template`), i.e. untrusted code, so they run in an `ImmutableSandboxedEnvironment`, and
every value they see is rebuilt from plain JSON types first. The environment matches
`transformers` (trim_blocks, lstrip_blocks, the `loopcontrols` extension, a no-op
`{% generation %}` block, `tojson` without HTML escaping, `raise_exception`, `strftime_now`),
so a template renders here byte for byte as it does there.

A template also renders under a budget: at most `MAX_RENDER_SECONDS` of wall time (checked at every
loop step over `range` and every piece of output) and `MAX_RENDER_CHARS` of output or of any string or
list it builds with `*`, so a hostile template fails with a clear error instead of hanging or exhausting
memory.

For tokenizers that carry no template, `BUILTIN_TEMPLATES` offers a few standard ones by name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmcraft.errors import LmcraftError

__all__ = ["BUILTIN_TEMPLATES", "ChatTemplateError", "apply_chat_template", "resolve_template"]


class ChatTemplateError(LmcraftError):
    """A chat template does not compile, raises while rendering, or the messages are malformed."""


MAX_RENDER_SECONDS = 5.0
MAX_RENDER_CHARS = 10_000_000
_DEADLINE: ContextVar[float] = ContextVar("chat_template_deadline", default=float("inf"))


def _within_budget() -> None:
    if time.monotonic() > _DEADLINE.get():
        raise ChatTemplateError(f"chat template ran longer than its {MAX_RENDER_SECONDS:g} s budget (a loop that "
                                "does not end?); check the template.")


def _check_size(n: int, what: str) -> None:
    if n > MAX_RENDER_CHARS:
        raise ChatTemplateError(f"chat template builds {what} of {n:,} items, over its budget of "
                                f"{MAX_RENDER_CHARS:,}; check the template.")


class _BudgetRange:
    """`range()` for templates: the sandbox's length limit, plus the time budget checked at every step."""

    def __init__(self, *args: int) -> None:
        self._range = range(*args)
        _check_size(len(self._range), "a range")

    def __iter__(self) -> Iterator[int]:
        for i in self._range:
            _within_budget()
            yield i

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        return self._range[index]


BUILTIN_TEMPLATES: dict[str, str] = {
    # OpenAI ChatML, as used by SmolLM2, Qwen and many others.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Meta Llama 3 (header tokens, <|eot_id|> after every turn).
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # HuggingFace Zephyr: <|role|> lines, every turn closed by the EOS token.
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    # Alpaca-style plain text, for base models without chat tokens.
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% else %}{{ raise_exception('alpaca template: unknown role ' + message['role']) }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


def resolve_template(template: str | None, default: str | None = None) -> str:
    """A template's Jinja source: `template` itself, or the built-in it names; `default` if it is None."""
    chosen = template if template is not None else default
    if chosen is None:
        raise ChatTemplateError(
            "this tokenizer has no chat template; pass one (Jinja source) or a built-in name: "
            f"{', '.join(BUILTIN_TEMPLATES)}."
        )
    return BUILTIN_TEMPLATES.get(chosen, chosen)


@lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text in training templates; renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    class SafeNamespace(jinja2.utils.Namespace):
        """`namespace()` that refuses underscore attributes (no route to Python internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: object) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")

    class TemplateDict:
        """`dict(...)` for templates, without handing them the `dict` type itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class BudgetEnvironment(ImmutableSandboxedEnvironment):
        """Checks `*` on strings/lists and `**` before computing them (`'x' * 10**12` must not run)."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, str | list | tuple) and isinstance(times, int):
                        _check_size(len(seq) * times, "a string or list")
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                _check_size(max(right, 0) * abs(left).bit_length(), "a number of bits")
            return super().call_binop(context, operator, left, right)

    env = BudgetEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=SafeNamespace, range=_BudgetRange)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ChatTemplateError(f"chat template does not compile: line {err.lineno}: {err.message}") from err


def _plain(value: Any) -> Any:
    """Rebuild `value` from JSON types only; anything else becomes an inert '<TypeName>' string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ChatTemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r}.")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {i} must be a dict with a string 'role', got {message!r}.")
    return _plain(list(messages))


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def apply_chat_template(
    messages: Sequence[Mapping[str, Any]],
    template: str | None,
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with `template` (Jinja source or a `BUILTIN_TEMPLATES` name).

    `add_generation_prompt` appends the header of an assistant turn, so the model answers next.
    `continue_final_message` cuts the text right after the last message's content instead, so
    the model continues it (a prefilled answer). Other keyword arguments (`bos_token`,
    `eos_token`, ... and template options like `enable_thinking`) become template variables.
    """
    import jinja2

    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set.")
    chat = _check_messages(messages)
    final = None
    if continue_final_message:
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise ChatTemplateError("continue_final_message needs a last message with string content.")
        final = chat[-1]["content"]
        chat[-1]["content"] = final + _CONTINUE_TAG
    compiled = _compile(resolve_template(template))
    token = _DEADLINE.set(time.monotonic() + MAX_RENDER_SECONDS)
    try:
        pieces, size = [], 0
        for piece in compiled.generate(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                       add_generation_prompt=add_generation_prompt, **_plain(kwargs)):
            size += len(piece)
            _check_size(size, "an output")
            _within_budget()
            pieces.append(piece)
        text = "".join(pieces)
    except jinja2.exceptions.TemplateError as err:
        raise ChatTemplateError(f"chat template failed: {err}") from err
    except (TypeError, ValueError, OverflowError, MemoryError) as err:  # a filter given the wrong kind of value
        raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {err}") from None
    finally:
        _DEADLINE.reset(token)
    if final is not None:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ChatTemplateError("continue_final_message: the template dropped or altered the final message.")
        cut = text.rindex(tag)
        text = text[:cut] if text[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:cut].rstrip()
    return text
