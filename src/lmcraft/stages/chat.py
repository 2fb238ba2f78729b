"""`lmcraft chat MODEL`: a multi-turn conversation in the terminal, replies streamed as they are generated.

Each turn renders the whole conversation with the chat template (the model folder's, or `--template`)
and generates the assistant's reply. `/reset` forgets the conversation (the system message stays),
`/exit` or end of input quits. Piped (non-tty) stdin works too: one user message per line, no prompts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from lmcraft.io import check_text, decode_text
from lmcraft.stages._decoding import (
    add_decoding_arguments,
    add_model_arguments,
    check_length,
    generation_config,
    load_for_generation,
)

PROMPT = ">>> "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_decoding_arguments(parser, default_max_new=512)


def user_lines(interactive: bool, encoding: str = "utf-8") -> Iterator[str]:
    """User messages: from `input()` with line editing on a terminal, else one per stdin line (decoded as
    `encoding`; bytes that are not are an error naming the line)."""
    if interactive:
        try:
            import readline  # noqa: F401 - importing it gives input() history and line editing
        except ImportError:
            pass
        while True:
            try:
                yield check_text(input(PROMPT), "input")
            except EOFError:
                print(file=sys.stderr)
                return
    else:
        for number, raw in enumerate(sys.stdin.buffer, 1):
            yield decode_text(raw, f"standard input, line {number}", encoding).rstrip("\r\n")


def run(args: argparse.Namespace) -> int:
    from lmcraft.generate import TextStreamer, generate_text

    config = generation_config(args)
    model, tokenizer, template = load_model_and_template(args)
    check_length(config.max_new_tokens, model)
    interactive = sys.stdin.isatty()
    if interactive:
        print("[chat: /reset clears the conversation, /exit quits]", file=sys.stderr)
    messages: list[dict[str, str]] = []
    for line in user_lines(interactive, args.encoding):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            messages = []
            print("[conversation cleared]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        streamer = TextStreamer(tokenizer, stop_strings=config.stop_strings)
        result = generate_text(model, tokenizer, [messages], config, chat=True, system=args.system,
                               template=template, streamer=streamer)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": result.texts[0]})
        if interactive:
            print(f"[{result.num_new_tokens} tokens, {result.tokens_per_second:.1f} tok/s]", file=sys.stderr)
    return 0


def load_model_and_template(args: argparse.Namespace) -> tuple[Any, Any, str | None]:
    """The model and tokenizer, failing early (before any input is read) if there is no chat template."""
    from lmcraft.tokenizer.chat import resolve_template

    model, tokenizer, template = load_for_generation(args)
    resolve_template(template, getattr(tokenizer, "chat_template", None))
    return model, tokenizer, template
