"""Task data: records -> labelled examples -> token ids -> padded batches, for the four fine-tuning tasks.

- `cls`:        a text (optionally a text pair) and a class name       -> input_ids, label id
- `regression`: a text (optionally a pair) and a number                -> input_ids, float label
- `token_cls`:  a list of words and one tag per word (BIO/IOB2 for NER) -> input_ids, one label per sub-token:
                the tag id on the first sub-token of each word, -100 (ignored) on the others and on specials
- `clm`:        documents -> token ids, each followed by EOS, concatenated and cut into `max_length` blocks
                (the remainder shorter than a block is dropped); labels = inputs (shifted in the loss)
- `qa`:         question, context, answers -> windows of [CLS] question [SEP] context [SEP] with start/end token
                labels (`lmcraft.finetune.qa`)

Examples are lists of ints; `Collator` pads a batch on the right to its longest row (labels with -100).
Without an explicit validation source, a seeded `validation_fraction` of the training records is held out
before tokenisation; `max_*_examples` then take a seeded random subset of each split (for `clm`, of the
packed blocks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmcraft.data.collate import IGNORE_INDEX, pad, pad_with_mask
from lmcraft.data.records import Record, RecordLayout, read_records
from lmcraft.errors import ConfigError
from lmcraft.finetune.config import DataConfig, DataSource
from lmcraft.finetune.emails import email_text
from lmcraft.finetune.qa import qa_examples, qa_records

__all__ = ["Collator", "TaskData", "build_task_data", "read_source", "split_records"]

Example = dict[str, Any]


@dataclass
class TaskData:
    """Tokenised splits plus what the head needs: label names (cls/token_cls) and the padding id."""

    task: str
    train: list[Example]
    validation: list[Example]
    labels: list[str] = field(default_factory=list)
    pad_token_id: int = 0
    truncated: int = 0  # training + validation examples cut at max_length (qa: split into several windows)
    task_options: dict[str, Any] = field(default_factory=dict)  # extra arguments of the task (`make_task`)

    @property
    def num_labels(self) -> int:
        return 1 if self.task == "regression" else len(self.labels)


def read_source(source: DataSource) -> list[Record]:
    """All records of `source` (through the one record reader); `ConfigError` if there are none."""
    layout = RecordLayout(text_field=source.text_field, label_field=source.label_field,
                          tokens_field=source.tokens_field, tags_field=source.tags_field,
                          conll_tag_column=source.conll_tag_column, text_mode=source.text_mode,
                          encoding=source.encoding)
    records = list(read_records(source.path, source.format, layout))
    if not records:
        raise ConfigError(f"data path {source.path!r} holds no records")
    return records


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held out): a seeded permutation, the first ceil(fraction * n) records held out."""
    if len(records) < 2:
        raise ConfigError(f"cannot hold out validation data from {len(records)} training record(s); add data or "
                          f"set data.validation")
    order = np.random.default_rng(seed).permutation(len(records))
    k = min(len(records) - 1, max(1, math.ceil(fraction * len(records))))
    held = set(order[:k].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def _subset(items: list[Any], limit: int | None, seed: int) -> list[Any]:
    if limit is None or limit >= len(items):
        return items
    keep = sorted(np.random.default_rng(seed).permutation(len(items))[:limit].tolist())
    return [items[i] for i in keep]


def _string(record: Record, name: str) -> str:
    if name not in record.fields:
        raise record.error(f"a field {name!r}; the record has {sorted(record.fields)[:10]}")
    value = record.fields[name]
    if not isinstance(value, str):
        raise record.error(f"{name!r} to be a string, got {type(value).__name__}")
    return value


def _label_name(record: Record, source: DataSource, label_map: dict[str, str]) -> str:
    if source.label_field not in record.fields or record.fields[source.label_field] in (None, ""):
        raise record.error(f"a label in field {source.label_field!r}")
    raw = record.fields[source.label_field]
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise record.error(f"{source.label_field!r} to be a class name or an integer, got {raw!r}")
    return label_map.get(str(raw), str(raw))


def _number(record: Record, source: DataSource) -> float:
    raw = record.fields.get(source.label_field)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise record.error(f"a number in field {source.label_field!r}, got {raw!r}") from None
    if not math.isfinite(value):
        raise record.error(f"a finite number in field {source.label_field!r}, got {raw!r}")
    return value


def _words_and_tags(record: Record, source: DataSource) -> tuple[list[str], list[str]]:
    words, tags = record.fields.get(source.tokens_field), record.fields.get(source.tags_field)
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words) or not words:
        raise record.error(f"a non-empty list of strings in field {source.tokens_field!r}")
    if not isinstance(tags, list) or not all(isinstance(t, str | int) for t in tags):
        raise record.error(f"a list of tags in field {source.tags_field!r}")
    if len(tags) != len(words):
        raise record.error(f"one tag per word ({len(words)} words, {len(tags)} tags)")
    return words, [str(t) for t in tags]


class _Encoder:
    """Tokenises with the `tokenizers` backend, truncating to `max_length` (specials kept) and counting cuts."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.backend = tokenizer.backend
        self.max_length = max_length
        self.truncated = 0

    def encode(self, inputs: list[Any], pretokenized: bool = False, specials: bool = True, truncate: bool = True
               ) -> list[Any]:
        self.backend.no_truncation()
        full = self.backend.encode_batch(inputs, is_pretokenized=pretokenized, add_special_tokens=specials)
        if not truncate:
            return full
        long = [i for i, e in enumerate(full) if len(e.ids) > self.max_length]
        self.truncated += len(long)
        if long:
            self.backend.enable_truncation(self.max_length)
            try:
                cut = self.backend.encode_batch([inputs[i] for i in long], is_pretokenized=pretokenized,
                                                add_special_tokens=specials)
            finally:
                self.backend.no_truncation()
            for i, e in zip(long, cut, strict=True):
                full[i] = e
        return full


def _sequence_examples(records: list[Record], source: DataSource, cfg: DataConfig, task: str, enc: _Encoder,
                       label_ids: dict[str, int]) -> list[Example]:
    clean = email_text if cfg.clean == "email" else (lambda s: s)
    texts: list[Any] = []
    targets: list[float | int] = []
    for r in records:
        text = clean(_string(r, source.text_field))
        texts.append((text, clean(_string(r, source.text_pair_field))) if source.text_pair_field else text)
        if task == "regression":
            targets.append(_number(r, source))
        else:
            name = _label_name(r, source, cfg.label_map)
            if name not in label_ids:
                raise r.error(f"a label among {sorted(label_ids)} (data.labels), got {name!r}")
            targets.append(label_ids[name])
    examples = []
    for e, y in zip(enc.encode(texts), targets, strict=True):
        ex: Example = {"input_ids": list(e.ids), "label": y}
        if source.text_pair_field:
            ex["token_type_ids"] = list(e.type_ids)
        examples.append(ex)
    return examples


def _token_examples(records: list[Record], source: DataSource, enc: _Encoder, tag_ids: dict[str, int]
                    ) -> list[Example]:
    pairs = [_words_and_tags(r, source) for r in records]
    for r, (_, tags) in zip(records, pairs, strict=True):
        unknown = sorted(set(tags) - set(tag_ids))
        if unknown:
            raise r.error(f"tags among {sorted(tag_ids)} (data.labels), got {unknown}")
    examples = []
    for e, (_, tags) in zip(enc.encode([w for w, _ in pairs], pretokenized=True), pairs, strict=True):
        labels, previous = [], None
        for word in e.word_ids:
            labels.append(tag_ids[tags[word]] if word is not None and word != previous else IGNORE_INDEX)
            previous = word
        examples.append({"input_ids": list(e.ids), "labels": labels})
    return examples


def _clm_blocks(records: list[Record], source: DataSource, enc: _Encoder, eos: int | None) -> list[Example]:
    stream: list[int] = []
    for e in enc.encode([_string(r, source.text_field) for r in records], specials=False, truncate=False):
        stream.extend(list(e.ids) + ([eos] if eos is not None else []))
    n = enc.max_length
    return [{"input_ids": stream[i:i + n]} for i in range(0, len(stream) - n + 1, n)]


def _label_names(cfg: DataConfig, task: str, train: list[Record], source: DataSource) -> list[str]:
    if cfg.labels is not None:
        if len(set(cfg.labels)) != len(cfg.labels) or len(cfg.labels) < 2:
            raise ConfigError(f"data.labels must hold at least two distinct names, got {cfg.labels}")
        return list(cfg.labels)
    if task == "token_cls":
        seen = sorted({t for r in train for t in _words_and_tags(r, source)[1]})
    else:
        seen = sorted({_label_name(r, source, cfg.label_map) for r in train})
    if len(seen) < 2:
        raise ConfigError(f"the training data has {len(seen)} distinct label(s) ({seen}); a classifier needs two "
                          f"or more (check data.train.label_field / data.label_map)")
    return seen


def build_task_data(cfg: DataConfig, task: str, tokenizer: Any) -> TaskData:
    """Read, split, subset, label and tokenise the data of `cfg` for `task`."""
    train_records = read_source(cfg.train)
    if cfg.validation is not None:
        val_source, val_records = cfg.validation, read_source(cfg.validation)
    else:
        train_records, val_records = split_records(train_records, cfg.validation_fraction, cfg.seed)
        val_source = cfg.train
    enc = _Encoder(tokenizer, cfg.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if task == "clm":  # the subsets are taken from the packed blocks
        train = _subset(_clm_blocks(train_records, cfg.train, enc, tokenizer.eos_token_id), cfg.max_train_examples,
                        cfg.seed)
        validation = _subset(_clm_blocks(val_records, val_source, enc, tokenizer.eos_token_id),
                             cfg.max_validation_examples, cfg.seed + 1)
        if not train or not validation:
            raise ConfigError(f"the causal-LM data gives {len(train)} training and {len(validation)} validation "
                              f"blocks of {cfg.max_length} tokens; add text or lower data.max_length")
        return TaskData(task, train, validation, pad_token_id=pad)
    train_records = _subset(train_records, cfg.max_train_examples, cfg.seed)
    val_records = _subset(val_records, cfg.max_validation_examples, cfg.seed + 1)
    if task == "qa":
        return _qa_data(cfg, tokenizer, (train_records, cfg.train), (val_records, val_source), pad)
    labels = [] if task == "regression" else _label_names(cfg, task, train_records, cfg.train)
    ids = {name: i for i, name in enumerate(labels)}
    if task == "token_cls":
        train = _token_examples(train_records, cfg.train, enc, ids)
        validation = _token_examples(val_records, val_source, enc, ids)
    else:
        train = _sequence_examples(train_records, cfg.train, cfg, task, enc, ids)
        validation = _sequence_examples(val_records, val_source, cfg, task, enc, ids)
    return TaskData(task, train, validation, labels, pad, enc.truncated)


def _qa_data(cfg: DataConfig, tokenizer: Any, train: tuple[list[Record], DataSource],
             validation: tuple[list[Record], DataSource], pad: int) -> TaskData:
    splits, windows_added = [], 0
    for records, source in (train, validation):
        examples = qa_records(records, source.question_field, source.context_field, source.answers_field)
        windows, split = qa_examples(examples, tokenizer.backend, cfg.max_length, cfg.doc_stride)
        splits.append(windows)
        windows_added += split
    return TaskData("qa", splits[0], splits[1], pad_token_id=pad, truncated=windows_added,
                    task_options={"max_answer_length": cfg.max_answer_length})


class Collator:
    """Pads a list of examples into tensors: input_ids (pad id), attention_mask, labels, token_type_ids."""

    def __init__(self, task: str, pad_token_id: int) -> None:
        self.task, self.pad = task, pad_token_id

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        def padded(key: str, fill: int) -> torch.Tensor:
            return pad([e[key] for e in examples], fill)

        input_ids, mask = pad_with_mask([e["input_ids"] for e in examples], self.pad)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = padded("token_type_ids", 0)
        if self.task == "qa":
            batch["start_positions"] = torch.tensor([e["start"] for e in examples])
            batch["end_positions"] = torch.tensor([e["end"] for e in examples])
            batch["qa"] = [e["qa"] for e in examples]
        elif self.task == "token_cls":
            batch["labels"] = padded("labels", IGNORE_INDEX)
        elif self.task == "clm":
            batch["labels"] = padded("input_ids", IGNORE_INDEX)
        else:
            dtype = torch.float32 if self.task == "regression" else torch.long
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=dtype)
        return batch
