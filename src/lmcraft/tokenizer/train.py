"""Train tokenizers with Hugging Face `tokenizers`: byte-level BPE, WordPiece and Unigram.

- "bpe": byte-level BPE (GPT-2 style): the 256 bytes are the initial alphabet, so any text
  encodes without unknown tokens; merges are learned greedily by pair frequency (Sennrich et al.
  2016). Pre-tokenisation with the GPT-2 regex; decoding is lossless.
- "wordpiece": BERT's normaliser (optional lower-casing and accent stripping) and pre-tokenizer,
  subwords continuing a word start with "##" (Schuster & Nakajima 2012, Devlin et al. 2019).
- "unigram": SentencePiece-style Unigram LM (Kudo 2018) over NFKC text with "▁" marking spaces;
  the vocabulary is pruned from a large seed set by expected likelihood loss (EM).

`TokenizerTraining` is the one declaration of these settings (kind, vocabulary size, ...): the `tokenizer` stage's
config extends it (lmcraft.data.tokenizer_training, which reads the documents) and `lmcraft pretrain` has it as
`tokenizer.train`.

`save_tokenizer` writes `tokenizer.json` and `tokenizer_config.json` (and
`special_tokens_map.json`) in the layout `transformers.AutoTokenizer.from_pretrained` loads as a
`PreTrainedTokenizerFast`, including the chat template. `bytes_per_token` measures compression
on held-out text: UTF-8 bytes divided by tokens, higher is better.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmcraft.config import Section
from lmcraft.io import write_json, write_text

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_SPECIAL_TOKENS",
    "TokenizerTraining",
    "bytes_per_token",
    "save_tokenizer",
    "train_tokenizer",
]

Kind = Literal["bpe", "wordpiece", "unigram"]

# ChatML (as used by Qwen and SmolLM2): <|im_start|>role\ncontent<|im_end|>\n per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# role -> token, per kind. bos/eos/pad/unk/mask/cls/sep roles become tokenizer_config.json entries.
DEFAULT_SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "bpe": {
        "eos": "<|endoftext|>",
        "bos": "<|endoftext|>",
        "pad": "<|pad|>",
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
    },
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "unigram": {
        "pad": "<pad>",
        "unk": "<unk>",
        "bos": "<s>",
        "eos": "</s>",
        "mask": "<mask>",
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
    },
}


class TokenizerTraining(Section):
    """How to train a tokenizer (the one declaration of these keys: the `tokenizer` stage's config extends it,
    and `lmcraft pretrain` uses it as `tokenizer.train`)."""

    kind: Kind = Field("bpe", description="byte-level BPE, WordPiece or Unigram")
    vocab_size: int = Field(8192, ge=32)
    min_frequency: int = Field(2, ge=1, description="minimum pair/word count to merge (BPE, WordPiece)")
    lowercase: bool = False
    special_tokens: dict[str, str] | None = Field(None, description="role -> token; default per kind")
    max_docs: int | None = Field(None, ge=1, description="read at most this many documents")


def _unique(tokens: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(tokens))


def train_tokenizer(
    texts: Iterable[str],
    kind: Kind = "bpe",
    vocab_size: int = 8000,
    special_tokens: dict[str, str] | None = None,
    min_frequency: int = 2,
    lowercase: bool = False,
    show_progress: bool = True,
) -> Any:
    """Train a `tokenizers.Tokenizer` of `kind` on `texts` (streamed). Special tokens get the lowest ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind not in DEFAULT_SPECIAL_TOKENS:
        raise ValueError(f"kind must be bpe, wordpiece or unigram; got {kind!r}")
    specials = dict(special_tokens or DEFAULT_SPECIAL_TOKENS[kind])
    names = _unique(specials.values())
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=names,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
    elif kind == "wordpiece":
        unk = specials.get("unk", "[UNK]")
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=names, show_progress=show_progress
        )
    elif kind == "unigram":
        unk = specials.get("unk", "<unk>")
        tok = Tokenizer(models.Unigram())
        norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(norms)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=names, unk_token=unk, show_progress=show_progress
        )
    else:
        raise AssertionError(kind)
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    if kind == "wordpiece" and "cls" in specials and "sep" in specials:
        cls, sep = specials["cls"], specials["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
    return tok


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def save_tokenizer(
    tok: Any,
    out_dir: str | Path,
    special_tokens: dict[str, str],
    chat_template: str | None = CHATML_TEMPLATE,
    model_max_length: int = 2048,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    roles = {f"{role}_token": token for role, token in special_tokens.items() if role in _HF_ROLES}
    extra_specials = [t for role, t in special_tokens.items() if role not in _HF_ROLES]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        **roles,
        "additional_special_tokens": _unique(extra_specials),
    }
    if chat_template:
        config["chat_template"] = chat_template
    config.update(extra or {})
    write_json(out / "tokenizer_config.json", config)
    special_map = {**roles, "additional_special_tokens": _unique(extra_specials)}
    write_json(out / "special_tokens_map.json", special_map)
    return out


_HF_ROLES = ("bos", "eos", "unk", "pad", "mask", "cls", "sep")


def bytes_per_token(tok: Any, texts: Iterable[str]) -> tuple[float, int, int]:
    """(UTF-8 bytes / tokens, bytes, tokens) over `texts`, encoded without special tokens."""
    n_bytes = n_tokens = 0
    for batch in _batches(texts, 256):
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        n_tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    return (n_bytes / n_tokens if n_tokens else 0.0), n_bytes, n_tokens
