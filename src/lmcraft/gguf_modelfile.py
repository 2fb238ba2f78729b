"""An Ollama `Modelfile` for an exported GGUF: FROM, TEMPLATE (the chat template in Go's template language),
SYSTEM (a default system prompt the Jinja template injects) and PARAMETER stop lines.

Jinja is not converted by parsing it: the template is *rendered* on probe conversations and the text compared
with the known turn shapes (`SHAPES`). Only an exact match yields a TEMPLATE; any other template is left out
with a comment saying so (a wrong template is worse than none: Ollama would prompt the model in a format it
was not trained on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lmcraft.tokenizer.load import Tokenizer

__all__ = ["SHAPES", "TemplateConversion", "convert_chat_template", "modelfile_text"]


@dataclass(frozen=True)
class Shape:
    turn: str  # one message; {role}, {content}; {eos} = the tokenizer's EOS text
    generation: str  # the header of the assistant's turn
    stops: tuple[str, ...]  # end-of-turn texts
    prefix: str = ""  # text before the first turn ({bos}); the tokenizer adds it in llama.cpp/Ollama


SHAPES: dict[str, Shape] = {
    "chatml": Shape("<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", ("<|im_end|>",)),
    "llama3": Shape("<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
                    "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",), "{bos}"),
    "zephyr": Shape("<|{role}|>\n{content}{eos}\n", "<|assistant|>\n", ("{eos}",)),
}
_PROBE = [("system", "SYS-PROBE"), ("user", "USER-PROBE-1"), ("assistant", "ASSISTANT-PROBE"),
          ("user", "USER-PROBE-2")]


@dataclass(frozen=True)
class TemplateConversion:
    shape: str | None  # the matched shape, None when the template could not be converted
    template: str | None  # Go template for Ollama
    system: str | None  # default system prompt the Jinja template adds when none is given
    stops: tuple[str, ...]
    reason: str  # why it could not be converted ("" when it was)


def _render(tokenizer: Tokenizer, messages: list[tuple[str, str]]) -> str:
    return str(tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                             add_generation_prompt=True))


def _fill(text: str, tokenizer: Tokenizer) -> str:
    return text.replace("{bos}", tokenizer.bos_token or "").replace("{eos}", tokenizer.eos_token or "")


def _turn(shape: Shape, tokenizer: Tokenizer, role: str, content: str) -> str:
    return _fill(shape.turn, tokenizer).replace("{role}", role).replace("{content}", content)


def _default_system(shape: Shape, tokenizer: Tokenizer, rendered: str, tail: str) -> str | None:
    """The system prompt the template inserted before `tail` on its own, or None when it inserted nothing."""
    head = rendered[len(_fill(shape.prefix, tokenizer)):len(rendered) - len(tail)]
    if not head:
        return None
    before, _, after = _turn(shape, tokenizer, "system", "\x00").partition("\x00")
    if head.startswith(before) and head.endswith(after) and len(head) >= len(before) + len(after):
        return head[len(before):len(head) - len(after)]
    raise ValueError("unexpected text before the first turn")


def convert_chat_template(tokenizer: Tokenizer) -> TemplateConversion:
    """Match the tokenizer's chat template against `SHAPES` by rendering probe conversations."""
    if not tokenizer.chat_template:
        return TemplateConversion(None, None, None, (), "the model has no chat template")
    try:
        full = _render(tokenizer, _PROBE)
        alone = _render(tokenizer, _PROBE[1:2])
    except Exception as err:  # noqa: BLE001 - any template failure means: not convertible
        return TemplateConversion(None, None, None, (), f"the chat template fails on a probe conversation ({err})")
    for name, shape in SHAPES.items():
        generation = _fill(shape.generation, tokenizer)
        expected = _fill(shape.prefix, tokenizer) + "".join(_turn(shape, tokenizer, r, c) for r, c in _PROBE)
        tail = _turn(shape, tokenizer, *_PROBE[1]) + generation
        if full != expected + generation or not alone.endswith(tail):
            continue
        try:
            system = _default_system(shape, tokenizer, alone, tail)
        except ValueError:
            continue
        turn = _fill(shape.turn, tokenizer).replace("{role}", "{{ .Role }}").replace("{content}", "{{ .Content }}")
        template = "{{- range .Messages }}" + turn + "{{ end }}" + generation
        stops = tuple(dict.fromkeys(_fill(s, tokenizer) for s in shape.stops))
        return TemplateConversion(name, template, system, stops, "")
    return TemplateConversion(None, None, None, (), "its output matches none of the known shapes "
                              f"({', '.join(SHAPES)})")


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError('text contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(gguf_file: str, tokenizer: Tokenizer) -> tuple[str, TemplateConversion]:
    """The Modelfile for `gguf_file` (a path relative to the Modelfile) and how its chat template converted."""
    conv = convert_chat_template(tokenizer)
    lines = ["# Ollama Modelfile written by `lmcraft export`: ollama create NAME -f THIS_FILE", f"FROM ./{gguf_file}"]
    if conv.template is not None:
        lines.append(f"# chat template: {conv.shape} shape, converted from the model's Jinja template")
        lines.append(f"TEMPLATE {_quoted(conv.template)}")
        if conv.system is not None:
            lines.append(f"SYSTEM {_quoted(conv.system)}")
    else:
        lines.append(f"# No TEMPLATE: the chat template was not converted ({conv.reason}). Write one by hand "
                     "(see the model's tokenizer.chat_template metadata) before chatting with this model.")
    stops = list(dict.fromkeys([*conv.stops, *([tokenizer.eos_token] if tokenizer.eos_token else [])]))
    lines += [f"PARAMETER stop {_json_string(s)}" for s in stops]
    return "\n".join(lines) + "\n", conv


def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
