"""Where a pre-training run's tokenizer and documents come from (rank 0 prepares them, every rank reads them).

1. tokenizer: `tokenizer.path` (a folder, tokenizer.json or asset name), else one trained fresh on the training
   documents of `data.inputs` (`tokenizer.train`, into OUT/tokenizer/), else the packed data's tokenizer, else the
   `model.from` folder's;
2. documents: `data.packed` (the output of `lmcraft prepare`), or `data.inputs` (files, globs, `asset:NAME/...`
   paths or corpus asset names) tokenised and packed into OUT/data/ by the prepare pipeline, without cleaning
   steps. The evaluation documents are the files of `data.eval_inputs` (left out of training, packed into
   OUT/data-eval/), or else a `data.val_fraction` of the documents drawn by a hash of their ids.

`resolve_inputs` does both on rank 0 and records the result in OUT/resolved.json, which `load_resolved` reads on
every rank once rank 0 is done.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from lmcraft.errors import ConfigError, InputFileError
from lmcraft.io import read_json, write_json
from lmcraft.pretrain.config import DataSection, PretrainConfig
from lmcraft.tokenizer.train import TokenizerTraining

__all__ = ["RESOLVED", "DataSources", "Resolved", "check_input_files", "data_inputs", "load_resolved", "packed_folder",
           "resolve_inputs", "resolve_tokenizer"]

RESOLVED = "resolved.json"


@dataclasses.dataclass(frozen=True)
class DataSources:
    """Where the training and evaluation documents are: a packed folder and a split name each."""

    train: tuple[Path, str]
    eval: tuple[Path, str]


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The tokenizer (a folder or tokenizer.json) and the documents of a run."""

    tokenizer: Path
    sources: DataSources

    @property
    def tokenizer_dir(self) -> Path:
        return self.tokenizer.parent if self.tokenizer.is_file() else self.tokenizer

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise `ConfigError` unless the training documents were packed with a `vocab_size`-token vocabulary."""
        packed = self.sources.train[0]
        corpus_vocab = read_json(packed / "index.json")["vocab_size"]
        if corpus_vocab != vocab_size:
            raise ConfigError(f"the packed data in {packed} was tokenised with a {corpus_vocab}-token vocabulary but "
                              f"the tokenizer {self.tokenizer} has {vocab_size}; use the tokenizer it was packed with")


def resolve_inputs(cfg: PretrainConfig, out: Path, progress: bool) -> Resolved:
    """Train the tokenizer and pack the documents where the config asks for it; record both in OUT/resolved.json."""
    packed = packed_folder(cfg.data.packed) if cfg.data.packed is not None else None
    tokenizer = resolve_tokenizer(cfg, out, packed, progress)
    resolved = Resolved(tokenizer, _data_sources(cfg.data, tokenizer, out, progress))
    write_json(out / RESOLVED, {"tokenizer": str(resolved.tokenizer),
                                "train": [str(x) for x in resolved.sources.train],
                                "eval": [str(x) for x in resolved.sources.eval]})
    return resolved


def load_resolved(out: Path) -> Resolved:
    """What `resolve_inputs` recorded in OUT/resolved.json."""
    recorded = read_json(out / RESOLVED)
    sources = DataSources(*((Path(recorded[k][0]), recorded[k][1]) for k in ("train", "eval")))
    return Resolved(Path(recorded["tokenizer"]), sources)


# ------------------------------------------------------------------------------------------------ inputs


def _input_specs(items: list[Any], text_mode: str) -> list[dict[str, Any]]:
    """Input entries as prepare/tokenizer input dicts; a bare corpus asset name becomes the asset's text files."""
    from lmcraft.assets import MANIFEST, REGISTRY, fetch
    from lmcraft.data.readers import detect_format

    specs: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, dict):
            specs.append({"text_mode": text_mode, **item})
        elif isinstance(item, str) and item in REGISTRY and not Path(item).exists():
            if REGISTRY[item].kind != "corpus":
                raise ConfigError(f"data.inputs: asset {item!r} is a {REGISTRY[item].kind}, not a text corpus")
            for path in sorted(fetch(item).rglob("*")):
                if path.is_file() and path.name != MANIFEST:
                    try:
                        detect_format(path)
                    except ConfigError:
                        continue
                    specs.append({"path": str(path), "text_mode": text_mode})
        elif isinstance(item, str):
            specs.append({"path": item, "text_mode": text_mode})
        else:
            raise ConfigError(f"data.inputs: {item!r} is neither a path, a glob, an asset name nor {{path: ...}}")
    return specs


def _file_specs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One input dict per file the specs' globs match."""
    from lmcraft.data.prepare_config import PrepareConfig
    from lmcraft.data.readers import expand_inputs

    return [{**dataclasses.asdict(spec), "path": str(path)}
            for spec, path in expand_inputs(PrepareConfig._inputs(specs))]


def check_input_files(data: DataSection) -> None:
    """Raise unless every file (or glob) of `data.inputs` and `data.eval_inputs` exists (nothing to check for
    packed data)."""
    if data.inputs is not None:
        _file_specs(data_inputs(data)[0])


def data_inputs(data: DataSection) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(training inputs, evaluation inputs or None): with `eval_inputs`, one dict per file, the evaluation
    files left out of the training ones."""
    train = _input_specs(data.inputs or [], data.text_mode)
    if data.eval_inputs is None:
        return train, None
    held_out = _file_specs(_input_specs(data.eval_inputs, data.text_mode))
    skip = {Path(spec["path"]).resolve() for spec in held_out}
    train = [spec for spec in _file_specs(train) if Path(spec["path"]).resolve() not in skip]
    if not train:
        raise ConfigError("data.inputs has no file left for training once the data.eval_inputs files are removed")
    return train, held_out


# --------------------------------------------------------------------------------------------- tokenizer


def resolve_tokenizer(cfg: PretrainConfig, out: Path, packed: Path | None, progress: bool) -> Path:
    """The folder (or tokenizer.json) of the tokenizer this run uses, training it first if configured."""
    from lmcraft.assets import resolve

    tok = cfg.tokenizer
    if tok.path is not None:
        path = Path(tok.path).expanduser()
        return path if path.is_file() else resolve(tok.path, kinds=("tokenizer", "model"), progress=progress)
    if tok.train is not None:
        from lmcraft.data.tokenizer_training import REPORT

        folder = out / "tokenizer"
        if not (folder / REPORT).is_file():  # written last: the training finished
            _train_tokenizer(cfg, tok.train, folder, progress)
        return folder
    if packed is not None:
        recorded = read_json(packed / "index.json").get("tokenizer")
        if recorded and Path(recorded).exists():
            return Path(recorded)
        raise ConfigError(f"{packed}/index.json names no existing tokenizer ({recorded!r}); set tokenizer.path")
    if cfg.model.from_ is not None:
        from lmcraft.assets import resolve_model

        folder = resolve_model(cfg.model.from_, progress=progress)
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            return folder
    raise ConfigError("no tokenizer: set tokenizer.path (a folder or asset such as gpt2-bpe) or tokenizer.train "
                      "(train one on data.inputs)")


def _train_tokenizer(cfg: PretrainConfig, training: TokenizerTraining, folder: Path, progress: bool) -> None:
    """`training` on the training documents, without a chat template, never on evaluation text."""
    from lmcraft.data.tokenizer_training import TokenizerConfig, train_on_inputs

    model_max = int((cfg.model.overrides or {}).get("max_position_embeddings", 0)) or cfg.data.seq_len
    train_inputs, eval_inputs = data_inputs(cfg.data)
    held_out = 0.0 if eval_inputs is not None else cfg.data.val_fraction
    tcfg = TokenizerConfig(**training.model_dump(), inputs=train_inputs, output=folder,
                           chat_template=None, model_max_length=model_max, held_out_fraction=held_out,
                           seed=cfg.data.seed)
    report = train_on_inputs(tcfg, progress=progress)
    held = f", {report['bytes_per_token']:.2f} bytes/token on held-out documents" if report["held_out_bytes"] else ""
    print(f"tokenizer: {report['kind']}, vocabulary {report['vocab_size']:,}{held} -> {folder}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- data


def packed_folder(path: Path) -> Path:
    """The packed-shard folder (with index.json) of a `lmcraft prepare` output, its packed/ folder or index.json."""
    path = Path(path).expanduser()
    for candidate in (path.parent if path.is_file() else path, path / "packed"):
        if (candidate / "index.json").is_file():
            return candidate
    raise InputFileError(path, "folder", "a packed-shard folder with index.json (the packed/ output of "
                                         "`lmcraft prepare` with a pack: section)")


def _pack(inputs: list[dict[str, Any]], tokenizer_path: Path, folder: Path, val_fraction: float, seed: int,
          progress: bool) -> Path:
    """Tokenise and pack `inputs` into folder/packed with the prepare pipeline (once: a finished folder is reused)."""
    from lmcraft.data.prepare import prepare
    from lmcraft.data.prepare_config import PackConfig, PrepareConfig

    if not ((folder / "stats.json").is_file() and (folder / "packed" / "index.json").is_file()):
        pcfg = PrepareConfig(inputs=inputs, output=folder, steps=[], seed=seed, title="Pre-training data",
                             pack=PackConfig(tokenizer=tokenizer_path, val_fraction=val_fraction))
        stats = prepare(pcfg, progress=progress)
        splits = ", ".join(f"{k} {v['tokens']:,} tokens / {v['documents']:,} documents"
                           for k, v in stats["packed"]["splits"].items())
        print(f"data: packed {splits} -> {folder / 'packed'}", file=sys.stderr)
    return folder / "packed"


def _data_sources(data: DataSection, tokenizer_path: Path, out: Path, progress: bool) -> DataSources:
    if data.packed is not None:
        packed = packed_folder(data.packed)
        return DataSources((packed, data.train_split), (packed, data.eval_split))
    train_inputs, eval_inputs = data_inputs(data)
    if eval_inputs is None:
        packed = _pack(train_inputs, tokenizer_path, out / "data", data.val_fraction, data.seed, progress)
        return DataSources((packed, "train"), (packed, "validation"))
    packed = _pack(train_inputs, tokenizer_path, out / "data", 0.0, data.seed, progress)
    held_out = _pack(eval_inputs, tokenizer_path, out / "data-eval", 0.0, data.seed, progress)
    return DataSources((packed, "train"), (held_out, "train"))
