"""The `back_translate` prepare step: a paraphrase of each document, translated into a pivot language and back by
lmcraft models (back-translation, Sennrich et al. 2016).

For a document d in language `source`, with f = `model` (+ `adapter`) and g = `back_model` (+ `back_adapter`;
default `model` without the adapter):

    pivot text  p  = f(prompt(source -> pivot, d))
    paraphrase  d' = g(prompt(pivot -> source, p))

each a greedy reply of at most `max_new_tokens` tokens, the prompt being `template` (default: the instruction of
lmcraft's translation records, `Translate from English to French.` + newline + text, which the translation
fine-tuning trains on) sent as a user message through the model's chat template when it has one. The step is an
augment step: it emits the original (unless `keep_original` is off) and d' under the id `<id>#bt-<pivot>`, when d'
is not empty and differs from d; a document without such a paraphrase is emitted as it is, whatever `keep_original`.
It translates a document as one text, so long documents are split upstream (`text_mode: line` or `paragraph`).

Generation lives on a higher floor than the data library, so the step takes its decoder from whoever runs it:
`use_generator(load)` attaches a `GeneratorLoader` (`lmcraft prepare` attaches lmcraft's decoder,
`lmcraft.prompting.model_lm.open_generator`), called once per worker process with a `DecoderSpec`. The loader is
pickled by reference into spawned workers; the models it opened are not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from lmcraft.data.augment import back_translate
from lmcraft.data.gettext import TRANSLATION_INSTRUCTION
from lmcraft.errors import ConfigError

__all__ = ["BackTranslate", "DecoderSpec", "GeneratorLoader", "TextGenerator"]

TextGenerator = Callable[[list[str]], list[str]]  # prompts -> one reply per prompt, in order


@dataclass(frozen=True)
class DecoderSpec:
    """What a `GeneratorLoader` opens: a model (folder, .gguf file or asset name) with an optional PEFT adapter, and
    how it replies (greedy, at most `max_new_tokens` tokens, `batch_size` prompts at a time, `chat`: through the
    model's chat template when it has one)."""

    model: str
    adapter: str | None
    device: str
    dtype: str | None
    batch_size: int
    max_new_tokens: int
    chat: bool


GeneratorLoader = Callable[[DecoderSpec], TextGenerator]


@dataclass
class BackTranslate:
    """Add a paraphrase of each document: translated into `pivot` by `model` (+ `adapter`) and back into `source` by
    `back_model` (+ `back_adapter`; default: `model` without an adapter)."""

    name: ClassVar[str] = "back_translate"
    kind: ClassVar[str] = "augment"
    uses_torch: ClassVar[bool] = True  # worker processes are spawned, not forked (see data.executors)
    model: str
    adapter: str | None = None
    back_model: str | None = None
    back_adapter: str | None = None
    source: str = "English"
    pivot: str = "French"
    template: str = TRANSLATION_INSTRUCTION + "\n{text}"
    chat: bool = True
    max_new_tokens: int = 128
    batch_size: int = 8
    device: str = "cpu"
    dtype: str | None = None
    keep_original: bool = True
    __pydantic_config__ = {"extra": "forbid"}  # pydantic reads this: unknown keys in a config are errors

    def __post_init__(self) -> None:
        for key in ("source", "target", "text"):
            if "{" + key + "}" not in self.template:
                raise ValueError(f"template must contain {{{key}}} (it has {{source}}, {{target}} and {{text}})")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        self._load: GeneratorLoader | None = None
        self._opened: tuple[TextGenerator, TextGenerator] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}  # the loader travels to the workers, the models do not

    def use_generator(self, load: GeneratorLoader) -> None:
        """Attach the loader that opens the models (a module-level function, so that workers can unpickle it)."""
        self._load = load

    def _spec(self, model: str, adapter: str | None) -> DecoderSpec:
        return DecoderSpec(model, adapter, self.device, self.dtype, self.batch_size, self.max_new_tokens, self.chat)

    def _generators(self) -> tuple[TextGenerator, TextGenerator]:
        if self._opened is None:
            if self._load is None:
                raise ConfigError("the back_translate step has no decoder: run it through `lmcraft prepare`, or call "
                                  "step.use_generator(lmcraft.prompting.model_lm.open_generator) first")
            forward_spec = self._spec(self.model, self.adapter)
            back_spec = self._spec(self.back_model or self.model, self.back_adapter)
            forward = self._load(forward_spec)
            self._opened = (forward, forward if back_spec == forward_spec else self._load(back_spec))
        return self._opened

    def batch(self, texts: list[str], ids: list[str]) -> list[list[tuple[str, str]]]:
        """Per document, the [(id suffix, text)] versions to emit (see the module docstring)."""
        forward, back = self._generators()
        paraphrases = back_translate(texts, forward, self.pivot, self.source, self.template, back)
        suffix = f"#bt-{self.pivot.lower()}"
        out = []
        for text, new in zip(texts, paraphrases, strict=True):
            found = bool(new) and new != text.strip()
            out.append([("", text)] * (self.keep_original or not found) + [(suffix, new)] * found)
        return out
