"""Load a Hugging Face tokenizer folder and use it: encode, pad, decode, stream, chat.

A folder holds `tokenizer.json` (the whole `tokenizers` pipeline: normalizer, pre-tokenizer,
model, post-processor, decoder) and usually `tokenizer_config.json` (special tokens, chat
template, maximum length). `Tokenizer` wraps `tokenizers.Tokenizer` with what the rest of
lmcraft needs: padded batches, the ids that end generation, chat templates, and a streaming
decoder that never prints half a UTF-8 character. A folder with only GPT-2-style `vocab.json` +
`merges.txt` loads too (byte-level BPE, GPT-2's rules).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcraft.errors import LmcraftError
from lmcraft.io import read_json, write_json, write_text
from lmcraft.tokenizer.chat import apply_chat_template, resolve_template

__all__ = [
    "BatchEncoding",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerLoadError",
    "bpe_from_vocab_merges",
    "load_tokenizer",
]

_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


class TokenizerLoadError(LmcraftError):
    """A tokenizer folder is missing files or holds malformed ones."""


@dataclass
class BatchEncoding:
    """Padded token ids of a batch; `attention_mask[i][j]` is 1 for a real token, 0 for padding."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]

    def tensors(self) -> dict[str, Any]:
        """The batch as int64 torch tensors (all rows must have the same length, i.e. be padded)."""
        import torch

        return {"input_ids": torch.tensor(self.input_ids), "attention_mask": torch.tensor(self.attention_mask)}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special tokens, a chat template and padding rules."""

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        cls_token: str | None = None,
        sep_token: str | None = None,
        mask_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        model_max_length: int | None = None,
        padding_side: str = "right",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise TokenizerLoadError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.cls_token, self.sep_token, self.mask_token = cls_token, sep_token, mask_token  # encoders (BERT)
        for name in _SPECIAL_NAMES:
            token = getattr(self, name)
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerLoadError(f"{name} {token!r} is not in the vocabulary.")
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.config = dict(config or {})
        eos = [self.eos_token_id] if self.eos_token_id is not None else []
        self.eos_token_ids: list[int] = list(dict.fromkeys([*eos, *extra_eos_token_ids]))

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def cls_token_id(self) -> int | None:
        return self._id(self.cls_token)

    @property
    def sep_token_id(self) -> int | None:
        return self._id(self.sep_token)

    @property
    def mask_token_id(self) -> int | None:
        return self._id(self.mask_token)

    @property
    def pad_token_id(self) -> int | None:
        """The padding id: the pad token's, else the EOS token's (masked out either way)."""
        return self._id(self.pad_token) if self.pad_token is not None else self.eos_token_id

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in _SPECIAL_NAMES if getattr(self, name) is not None}

    @property
    def all_special_ids(self) -> list[int]:
        added = self.backend.get_added_tokens_decoder()
        return sorted(i for i, token in added.items() if token.special)

    # -- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self,
        texts: Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = True,
        max_length: int | None = None,
        truncation: bool = False,
        padding_side: str | None = None,
    ) -> BatchEncoding:
        """Encode many texts at once (in parallel, in Rust) and pad them to a rectangle.

        `padding`: True/"longest" pads to the longest row, "max_length" to `max_length`, False
        not at all. `truncation` cuts rows to `max_length` tokens from the right. Pad ids go on
        `padding_side` (default: the tokenizer's; "left" suits generation).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode for one")
        if truncation and max_length is None:
            raise TokenizerLoadError("truncation=True needs max_length.")
        side = padding_side or self.padding_side
        rows = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        if truncation:
            rows = [r[:max_length] for r in rows]
        width = max((len(r) for r in rows), default=0)
        if padding == "max_length":
            if max_length is None:
                raise TokenizerLoadError("padding='max_length' needs max_length.")
            width = max(width, max_length)
        elif padding not in (True, "longest", False):
            raise TokenizerLoadError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}.")
        if not padding:
            return BatchEncoding(rows, [[1] * len(r) for r in rows])
        pad = self.pad_token_id
        if pad is None:
            raise TokenizerLoadError("cannot pad: the tokenizer has neither a pad token nor an EOS token.")
        ids, mask = [], []
        for r in rows:
            fill = width - len(r)
            ids.append(r + [pad] * fill if side == "right" else [pad] * fill + r)
            mask.append([1] * len(r) + [0] * fill if side == "right" else [0] * fill + [1] * len(r))
        return BatchEncoding(ids, mask)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([list(r) for r in batch], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with this tokenizer's chat template (or `template`: Jinja source or a built-in name).

        The special tokens (`bos_token`, `eos_token`, ...) are template variables, as in
        transformers. With `tokenize=True` the text is encoded without adding special tokens
        again (the template already wrote them).
        """
        source = resolve_template(template if template is not None else self.chat_template)
        text = apply_chat_template(
            messages,
            source,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **{**self.special_tokens_map, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # -- save ------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory` (each file atomically)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = {
            **self.config,
            **self.special_tokens_map,
            "chat_template": self.chat_template,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
        }
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config = {k: v for k, v in config.items() if v is not None}
        write_text(out / "tokenizer.json", self.backend.to_str(pretty=True))
        write_json(out / "tokenizer_config.json", config)
        return out


class StreamDecoder:
    """Turn token ids, one at a time, into text pieces whose concatenation is `decode(all ids)`.

    Byte-level tokens can end in the middle of a UTF-8 character, which decodes as U+FFFD. We
    keep two offsets into the ids, `prefix` <= `read`: the new text is
    `decode(ids[prefix:]) - decode(ids[prefix:read])`, emitted only when it does not end with an
    incomplete character. Decoding from `prefix` (not from 0) keeps each step short and keeps
    decoders that strip a leading space (SentencePiece) consistent.
    """

    def __init__(self, tokenizer: Tokenizer | Any, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer  # anything with decode(ids, skip_special_tokens), e.g. a raw tokenizers.Tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add token id(s); return the text that is now complete ('' while a character is unfinished)."""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        now = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before) :]

    def flush(self) -> str:
        """Whatever is left at the end of the stream (an unfinished character comes out as U+FFFD)."""
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        now = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return now[len(before) :]


def bpe_from_vocab_merges(vocab_path: str | os.PathLike[str], merges_path: str | os.PathLike[str]) -> Any:
    """A GPT-2 byte-level BPE `tokenizers.Tokenizer` from `vocab.json` + `merges.txt` (GPT-2's own rules)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, json.JSONDecodeError) as err:
        raise TokenizerLoadError(f"cannot read {vocab_path} / {merges_path}: {err}") from err
    merges = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise TokenizerLoadError(
                f"{merges_path}, line {lineno}: expected two space-separated tokens, got {line!r}."
            )
        merges.append((pair[0], pair[1]))
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    if "<|endoftext|>" in vocab:
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return tok


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object.")
    return data


def _chat_template(config: Mapping[str, Any], folder: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _eos_ids(*configs: Mapping[str, Any]) -> list[int]:
    ids: list[int] = []
    for config in configs:
        value = config.get("eos_token_id")
        ids.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return ids


def load_tokenizer(path: str | os.PathLike[str], padding_side: str | None = None) -> Tokenizer:
    """Load the tokenizer of a model folder (or a `tokenizer.json` file).

    Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template, maximum
    length, padding side) and, to know every id that ends generation, the `eos_token_id` of
    `generation_config.json` and `config.json`. Padding or truncation stored in `tokenizer.json`
    is switched off: `encode` returns every token, `encode_batch` pads and truncates on request.
    """
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    folder = path.parent if path.is_file() else path
    file = path if path.is_file() else folder / "tokenizer.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer folder")
    if file.is_file():
        try:
            backend = Backend.from_file(str(file))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise TokenizerLoadError(f"{file}: not a valid tokenizers file ({err}).") from err
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = bpe_from_vocab_merges(folder / "vocab.json", folder / "merges.txt")
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise TokenizerLoadError(f"{folder}: no tokenizer.json (or vocab.json + merges.txt) here; found {found}.")
    backend.no_padding()  # some tokenizer.json files pad/truncate every encoding (e.g. to 128);
    backend.no_truncation()  # padding and truncation are per-call options of encode_batch here
    config = _read_json(folder / "tokenizer_config.json")
    specials = {name: _token_text(config.get(name)) for name in _SPECIAL_NAMES}
    if not file.is_file() and not config and backend.token_to_id("<|endoftext|>") is not None:
        specials.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>")  # bare GPT-2 vocab.json + merges.txt
    max_length = config.get("model_max_length")
    return Tokenizer(
        backend,
        **specials,
        chat_template=_chat_template(config, folder),
        extra_eos_token_ids=_eos_ids(_read_json(folder / "generation_config.json"), _read_json(folder / "config.json")),
        model_max_length=int(max_length) if isinstance(max_length, int | float) and max_length < 1e12 else None,
        padding_side=padding_side or config.get("padding_side", "right"),
        config={k: v for k, v in config.items() if k in ("add_bos_token", "add_eos_token", "tokenizer_class")},
    )
