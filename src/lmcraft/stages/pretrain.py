"""`lmcraft pretrain CONFIG.yaml [key=value ...]`: pre-train a model (or continue pre-training one) with one objective.

The stage wires parts together, in this order:

1. tokenizer: `tokenizer.path` (a folder, tokenizer.json or asset name), else one trained fresh on the training
   documents of `data.inputs` (`tokenizer.train`, into OUT/tokenizer/), else the packed data's tokenizer, else the
   `model.from` folder's;
2. data: `data.packed` (the output of `lmcraft prepare`), or `data.inputs` (files, globs, `asset:NAME/...` paths or
   corpus asset names) tokenised and packed into OUT/data/ by the prepare pipeline, without cleaning steps. The
   evaluation documents are the files of `data.eval_inputs` (left out of training, packed into OUT/data-eval/), or
   else a `data.val_fraction` of the documents drawn by a hash of their ids;
3. model: a preset with overrides (vocabulary size and special-token ids taken from the tokenizer), or the HF
   folder/asset `model.from` (continued pre-training); the objective builds the model it trains around it;
4. examples: windows of `data.seq_len` tokens over the packed stream (clm, mlm, rtd, plm), or sentence pairs of at
   most `data.seq_len` tokens built from the documents' sentences (nsp, sop);
5. `Trainer`: optimisation, evaluation (loss, perplexity, objective metrics; masked-token accuracy for MLM-style
   objectives), checkpoints, exact resume (rerunning the same config continues from the newest OUT/step-N),
   DDP/FSDP under torchrun (`trainer.strategy`), metrics.jsonl, TensorBoard events and curves.png;
6. OUT/final/: the model to keep (the MLM model of nsp/sop, ELECTRA's discriminator, XLNet's LM) in Hugging Face
   layout with the tokenizer files, so it opens in transformers; samples (decoders) or the masked-token accuracy
   (encoders) are printed and written with the run summary to OUT/summary.json.

Randomness of the batch transforms (masks, permutations): training batches draw from the global torch generator,
whose state every checkpoint saves (so a resumed run is bit-exact, and each rank draws its own masks); evaluation
batches use a generator seeded by (trainer.seed, index of the batch's first example), so every evaluation scores
the same masks.

Masked-token accuracy = (1/|M|) sum_{i in M} [argmax_v logits_{i,v} = x_i] over the masked positions M.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from lmcraft.config import Section, StageConfig
from lmcraft.errors import ConfigError, InputFileError, ModelLoadError
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import claim, load_training_config

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmcraft.models import LanguageModel, ModelConfig
    from lmcraft.objectives import Objective
    from lmcraft.tokenizer.load import Tokenizer
    from lmcraft.train import Callback, Trainer

__all__ = [
    "DataSection",
    "ModelSection",
    "ObjectiveSection",
    "SamplesSection",
    "TokenIds",
    "TokenizerSection",
    "TokenizerTraining",
    "add_arguments",
    "build_objective_with_ids",
    "config_class",
    "kept_model",
    "pretrain",
    "run",
]

PAIR_OBJECTIVES = ("nsp", "sop")
MASKED_OBJECTIVES = ("mlm", "nsp", "sop")  # the kept model has an MLM head: masked-token accuracy is reported
RUN_CONFIG = "pretrain_config.json"


# ---------------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The ids an objective needs from the tokenizer (None where the tokenizer has no such token)."""

    vocab_size: int
    eos: int | None = None
    pad: int | None = None
    bos: int | None = None
    mask: int | None = None
    cls: int | None = None
    sep: int | None = None
    specials: tuple[int, ...] = ()


_PLACEHOLDER_IDS = TokenIds(vocab_size=8, eos=1, pad=0, bos=1, mask=2, cls=3, sep=1, specials=(0, 1, 2, 3))


def _need(value: int | None, what: str, name: str) -> int:
    if value is None:
        raise ConfigError(f"objective {name!r} needs a {what} token, but the tokenizer defines none; train one with "
                          f"tokenizer.train.special_tokens including it (e.g. kind: wordpiece has [MASK], [CLS], "
                          f"[SEP]) or use another tokenizer")
    return value


def build_objective_with_ids(section: ObjectiveSection, ids: TokenIds, seq_len: int | None = None) -> Objective:
    """The registry's objective with the tokenizer's ids (and, for nsp/sop, `max_length=seq_len`) filled in
    wherever the config leaves them out."""
    from lmcraft.objectives import build_objective

    name, options = section.name, section.options
    if name == "clm" and ids.eos is not None:
        options.setdefault("eos_token_id", ids.eos)
    if name in ("mlm", "rtd", *PAIR_OBJECTIVES):
        masking = dict(options.get("masking") or {})
        masking.setdefault("vocab_size", ids.vocab_size)
        if "mask_token_id" not in masking:
            masking["mask_token_id"] = _need(ids.mask, "mask", name)
        masking.setdefault("special_token_ids", list(ids.specials))
        options["masking"] = masking
    if name in PAIR_OBJECTIVES:
        for key, value, what in (("cls_token_id", ids.cls, "[CLS]"), ("sep_token_id", ids.sep, "[SEP]"),
                                 ("pad_token_id", ids.pad, "padding")):
            if key not in options:
                options[key] = _need(value, what, name)
        if seq_len is not None:
            options.setdefault("max_length", seq_len)
    return build_objective(name, **options)


class ModelSection(Section):
    """`preset: NAME` (+ `overrides`) for a fresh model, or `from: FOLDER_OR_ASSET` to continue pre-training."""

    preset: str | None = None
    from_: str | None = Field(None, alias="from")
    overrides: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        from lmcraft.models.config import PRESETS, ModelConfig

        if (self.preset is None) == (self.from_ is None):
            raise ValueError("give exactly one of model.preset (a fresh model) and model.from (an HF folder or asset)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - fields)
        if unknown:
            raise ValueError(f"unknown model.overrides keys {unknown}; allowed: {', '.join(sorted(fields))}")
        return self


class ObjectiveSection(Section):
    """`name` (clm, mlm, nsp, sop, rtd, plm) and that objective's options. The vocabulary size and token ids (EOS,
    [MASK], [CLS], [SEP], padding, specials) come from the tokenizer unless given."""

    model_config = ConfigDict(extra="allow")

    name: str

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.model_extra or {}))  # a deep copy: building fills in ids

    @model_validator(mode="after")
    def _buildable(self) -> ObjectiveSection:
        build_objective_with_ids(self, _PLACEHOLDER_IDS)  # unknown names, option typos and bad values fail early
        return self


class TokenizerTraining(Section):
    """Train a tokenizer on the training documents of `data.inputs` (see `lmcraft tokenizer`)."""

    kind: Literal["bpe", "wordpiece", "unigram"] = "bpe"
    vocab_size: int = Field(8192, ge=32)
    min_frequency: int = Field(2, ge=1)
    lowercase: bool = False
    special_tokens: dict[str, str] | None = None  # role -> token; default per kind
    max_docs: int | None = Field(None, ge=1)


class TokenizerSection(Section):
    path: str | None = None  # a tokenizer folder, tokenizer.json, or a tokenizer/model asset name
    train: TokenizerTraining | None = None

    @model_validator(mode="after")
    def _not_both(self) -> TokenizerSection:
        if self.path is not None and self.train is not None:
            raise ValueError("give tokenizer.path or tokenizer.train, not both")
        return self


class DataSection(Section):
    """`packed:` a `lmcraft prepare` output (its folder, packed/ folder or index.json), or `inputs:` raw text."""

    packed: Path | None = None
    inputs: list[Any] | None = None  # paths, globs, asset:NAME/... paths, {path:, format:, ...}, corpus asset names
    eval_inputs: list[Any] | None = None  # held-out files (same forms), removed from `inputs`
    text_mode: Literal["file", "paragraph", "line"] = "paragraph"  # what one document is in plain-text inputs
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)  # documents held out for evaluation (without eval_inputs)
    seq_len: int = Field(256, ge=8)
    train_split: str = "train"
    eval_split: str = "validation"
    seed: int = 0  # the train/validation split of `inputs`, and the sentence pairs

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.packed is None) == (self.inputs is None):
            raise ValueError("give exactly one of data.packed (a `lmcraft prepare` output) and data.inputs (text)")
        if self.inputs is not None and not self.inputs:
            raise ValueError("data.inputs is empty")
        if self.eval_inputs is not None and self.inputs is None:
            raise ValueError("data.eval_inputs goes with data.inputs (packed data has its own validation split)")
        return self


class SamplesSection(Section):
    """Text sampled from a decoder at the end of the run (temperature 0 = greedy)."""

    prompts: list[str] = ["The"]
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int = Field(50, ge=0)
    seed: int = 0


@functools.cache
def config_class() -> type[StageConfig]:
    """The stage's config class, built on first use: `TrainerConfig` imports torch, which `--help` must not."""
    from lmcraft.train import TrainerConfig

    class PretrainConfig(StageConfig):
        model: ModelSection
        objective: ObjectiveSection
        data: DataSection
        tokenizer: TokenizerSection = TokenizerSection()
        trainer: TrainerConfig = TrainerConfig()
        samples: SamplesSection = SamplesSection()
        output_dir: Path

        @model_validator(mode="after")
        def _consistent(self) -> PretrainConfig:
            if self.tokenizer.train is not None and self.data.inputs is None:
                raise ValueError("tokenizer.train needs data.inputs (packed data is already tokenised)")
            return self

    return PretrainConfig


def run(args: argparse.Namespace) -> int:
    cfg = load_training_config(config_class(), args)
    with claim(args, "pretrain", cfg.output_dir, cfg):
        summary = pretrain(cfg, progress=not args.no_progress)
    if summary["is_main"]:
        print(format_summary(summary))
    return 0


# ------------------------------------------------------------------------------------------- run folder


def _check_run_folder(cfg: Any, out: Path) -> None:
    """Record the config's data/tokenizer/model/objective sections; a rerun (resume) must use the same ones."""
    from lmcraft.train.checkpoint import atomic_write_json

    sections = {k: cfg.model_dump(mode="json", by_alias=True)[k] for k in ("model", "objective", "data", "tokenizer")}
    path = out / RUN_CONFIG
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in sections if before.get(k) != sections[k])
        if changed:
            raise ConfigError(f"{out} holds a pre-training run with different {', '.join(changed)} settings (see "
                              f"{path}); a rerun resumes that run, so only trainer settings may change. Choose "
                              "another output_dir to start a new run.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, sections)


# ------------------------------------------------------------------------------------------- tokenizer


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
    from lmcraft.data.readers import expand_inputs
    from lmcraft.stages.prepare import PrepareConfig

    return [{**dataclasses.asdict(spec), "path": str(path)}
            for spec, path in expand_inputs(PrepareConfig._inputs(specs))]


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


def _resolve_tokenizer(cfg: Any, out: Path, packed: Path | None, progress: bool) -> Path:
    """The folder (or tokenizer.json) of the tokenizer this run uses, training it first if configured."""
    from lmcraft.assets import resolve

    tok = cfg.tokenizer
    if tok.path is not None:
        path = Path(tok.path).expanduser()
        return path if path.is_file() else resolve(tok.path, kinds=("tokenizer", "model"), progress=progress)
    if tok.train is not None:
        folder = out / "tokenizer"
        if not (folder / "tokenizer_report.json").is_file():  # written last: the training finished
            _train_tokenizer(cfg, folder, progress)
        return folder
    if packed is not None:
        recorded = json.loads((packed / "index.json").read_text(encoding="utf-8")).get("tokenizer")
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


def _train_tokenizer(cfg: Any, folder: Path, progress: bool) -> None:
    from lmcraft.stages.tokenizer import TokenizerConfig, train

    t = cfg.tokenizer.train
    model_max = int((cfg.model.overrides or {}).get("max_position_embeddings", 0)) or cfg.data.seq_len
    train_inputs, eval_inputs = data_inputs(cfg.data)
    held_out = 0.0 if eval_inputs is not None else cfg.data.val_fraction  # never train it on evaluation text
    tcfg = TokenizerConfig(
        inputs=train_inputs, output=folder, kind=t.kind, vocab_size=t.vocab_size, min_frequency=t.min_frequency,
        lowercase=t.lowercase, special_tokens=t.special_tokens, chat_template=None, model_max_length=model_max,
        held_out_fraction=held_out, max_docs=t.max_docs, seed=cfg.data.seed,
    )
    report = train(tcfg, progress=progress)
    held = f", {report['bytes_per_token']:.2f} bytes/token on held-out documents" if report["held_out_bytes"] else ""
    print(f"tokenizer: {report['kind']}, vocabulary {report['vocab_size']:,}{held} -> {folder}", file=sys.stderr)


def token_ids(tok: Tokenizer, folder: Path) -> TokenIds:
    """The special ids of a tokenizer: EOS (else [SEP], BERT's document separator), padding, BOS, and [MASK], [CLS],
    [SEP] from the folder's tokenizer_config.json."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def role(name: str) -> int | None:
        value = config.get(f"{name}_token")
        value = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(value) if isinstance(value, str) else None

    sep = role("sep")
    return TokenIds(vocab_size=tok.vocab_size, eos=tok.eos_token_id if tok.eos_token_id is not None else sep,
                    pad=role("pad"), bos=tok.bos_token_id, mask=role("mask"), cls=role("cls"), sep=sep,
                    specials=tuple(tok.all_special_ids))


# ------------------------------------------------------------------------------------------------ data


def _packed_folder(path: Path) -> Path:
    path = Path(path).expanduser()
    for candidate in (path.parent if path.is_file() else path, path / "packed"):
        if (candidate / "index.json").is_file():
            return candidate
    raise InputFileError(path, "folder", "a packed-shard folder with index.json (the packed/ output of "
                                         "`lmcraft prepare` with a pack: section)")


@dataclasses.dataclass(frozen=True)
class DataSources:
    """Where the training and evaluation documents are: a packed folder and a split name each."""

    train: tuple[Path, str]
    eval: tuple[Path, str]


def _pack(inputs: list[dict[str, Any]], tokenizer_path: Path, folder: Path, val_fraction: float, seed: int,
          progress: bool) -> Path:
    """Tokenise and pack `inputs` into folder/packed with the prepare pipeline (once: a finished folder is reused)."""
    from lmcraft.data.prepare import prepare
    from lmcraft.stages.prepare import PackConfig, PrepareConfig

    if not ((folder / "stats.json").is_file() and (folder / "packed" / "index.json").is_file()):
        pcfg = PrepareConfig(inputs=inputs, output=folder, steps=[], seed=seed, title="Pre-training data",
                             pack=PackConfig(tokenizer=tokenizer_path, val_fraction=val_fraction))
        stats = prepare(pcfg, progress=progress)
        splits = ", ".join(f"{k} {v['tokens']:,} tokens / {v['documents']:,} documents"
                           for k, v in stats["packed"]["splits"].items())
        print(f"data: packed {splits} -> {folder / 'packed'}", file=sys.stderr)
    return folder / "packed"


def _data_sources(cfg: Any, tokenizer_path: Path, out: Path, progress: bool) -> DataSources:
    data = cfg.data
    if data.packed is not None:
        packed = _packed_folder(data.packed)
        return DataSources((packed, data.train_split), (packed, data.eval_split))
    train_inputs, eval_inputs = data_inputs(data)
    if eval_inputs is None:
        packed = _pack(train_inputs, tokenizer_path, out / "data", data.val_fraction, data.seed, progress)
        return DataSources((packed, "train"), (packed, "validation"))
    packed = _pack(train_inputs, tokenizer_path, out / "data", 0.0, data.seed, progress)
    held_out = _pack(eval_inputs, tokenizer_path, out / "data-eval", 0.0, data.seed, progress)
    return DataSources((packed, "train"), (held_out, "train"))


class BatchMaker:
    """Items -> one batch for the objective: stacked windows or a list of sentence pairs, then `objective.transform`.

    With `seed` None the transform draws from the global torch generator (training). With a seed, items come as
    (index, item) and the generator is seeded by (seed, first index), so a batch gets the same masks every time.
    """

    def __init__(self, objective: Objective, pairs: bool, seed: int | None = None) -> None:
        self.objective, self.pairs, self.seed = objective, pairs, seed

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        import torch

        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(items[0][0]))
            items = [item for _, item in items]
        batch = {"pairs": items} if self.pairs else {"input_ids": torch.stack([it["input_ids"] for it in items])}
        return self.objective.transform(batch, generator)


class Indexed:
    """A map-style dataset whose items are `(index, item)` (for `BatchMaker` with a seed)."""

    def __init__(self, dataset: Sequence[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]


def _examples(cfg: Any, source: tuple[Path, str], seed_offset: int) -> Sequence[Any] | None:
    """Windows (or sentence pairs for nsp/sop) of one split; None when the split is missing or too small."""
    import torch

    from lmcraft.data.datasets import CausalWindows, PackedCorpus

    packed, split = source
    if split not in json.loads((packed / "index.json").read_text(encoding="utf-8"))["splits"]:
        return None
    if cfg.objective.name not in PAIR_OBJECTIVES:
        windows = CausalWindows(packed, split, cfg.data.seq_len)
        return windows if len(windows) else None
    from lmcraft.objectives.sentence_pairs import build_pairs

    corpus = PackedCorpus(packed, split)
    documents = [[s.tolist() for s in corpus.sentences(d)] for d in range(len(corpus))]
    if sum(1 for d in documents if d) < 2:
        return None
    generator = torch.Generator().manual_seed(cfg.data.seed + seed_offset)
    pairs = build_pairs(documents, cfg.objective.name, cfg.data.seq_len, generator)
    return pairs or None


# ----------------------------------------------------------------------------------------------- model


def kept_model(model: nn.Module) -> LanguageModel:
    """The `LanguageModel` kept after pre-training: the model itself, or the `lm` (nsp, sop, plm) or the
    `discriminator` (rtd) of the objective's wrapper."""
    for attr in ("lm", "discriminator"):
        if hasattr(model, attr):
            return getattr(model, attr)
    return model


def _model_config(cfg: Any, ids: TokenIds, progress: bool) -> tuple[ModelConfig, Path | None]:
    """The model config (and the folder to load weights from, for `model.from`)."""
    from lmcraft.models import preset

    section, overrides = cfg.model, dict(cfg.model.overrides)
    if section.from_ is not None:
        from lmcraft.assets import resolve_model
        from lmcraft.hub import load_config

        folder = resolve_model(section.from_, progress=progress)
        mcfg = dataclasses.replace(load_config(folder), **overrides)
    else:
        folder = None
        defaults = {"vocab_size": ids.vocab_size, "bos_token_id": ids.bos, "eos_token_id": ids.eos,
                    "pad_token_id": ids.pad}
        mcfg = preset(section.preset, **{**defaults, **overrides})
    if mcfg.vocab_size < ids.vocab_size:
        raise ConfigError(f"the model's vocab_size {mcfg.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({ids.vocab_size} tokens); raise model.overrides.vocab_size or use another tokenizer")
    if mcfg.position == "learned" and mcfg.max_position_embeddings < cfg.data.seq_len:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                          f"{mcfg.max_position_embeddings} (learned positions); lower data.seq_len")
    return mcfg, folder


def _load_pretrained(model: nn.Module, folder: Path) -> None:
    """Copy an HF checkpoint into the kept part of `model`: every backbone tensor, and head tensors of equal shape."""
    from lmcraft.hub import load_model

    keep = kept_model(model)
    loaded = load_model(folder, head=keep.head_kind, dtype="float32").state_dict()
    target = keep.state_dict()
    take = {k: v for k, v in loaded.items() if k in target and target[k].shape == v.shape}
    missing = [k for k in target if k.startswith("model.") and k not in take]
    if missing:
        raise ModelLoadError(f"{folder}: the checkpoint does not fit the configured model; {len(missing)} backbone "
                             f"tensor(s) missing or of another shape, e.g. {missing[:3]} (check model.overrides)")
    keep.load_state_dict(take, strict=False)
    keep.tie_weights()


# ---------------------------------------------------------------------------------------------- metrics


def masked_accuracy_fn(eval_data: Sequence[Any], batches: BatchMaker, batch_size: int,
                       max_batches: int | None) -> Callable[[Trainer], dict[str, float]]:
    """An `eval_fn` computing the masked-token accuracy of the MLM logits over the evaluation batches (all ranks)."""

    def evaluate(trainer: Trainer) -> dict[str, float]:
        import torch

        from lmcraft.objectives.base import IGNORE_INDEX
        from lmcraft.train.distributed import all_reduce_sum
        from lmcraft.train.loader import eval_batches
        from lmcraft.train.trainer import move_to

        model, device = trainer.model, trainer.device
        was_training = model.training
        model.eval()
        counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, masked
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=trainer.config.precision == "bf16")
        with torch.no_grad(), autocast:
            for batch, real in eval_batches(eval_data, batch_size, batches, trainer.ctx.rank, trainer.ctx.world_size,
                                            max_batches):
                batch = move_to(batch, device)
                out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                            token_type_ids=batch.get("token_type_ids"))
                logits = (out[0] if isinstance(out, tuple) else out).logits
                masked = batch["labels"] != IGNORE_INDEX
                if real:
                    hits = (logits[masked].argmax(-1) == batch["labels"][masked]).sum()
                    counts += torch.stack([hits, masked.sum()]).double()
        model.train(was_training)
        correct, total = all_reduce_sum(counts).tolist()
        return {"masked_accuracy": correct / total if total else float("nan")}

    return evaluate


# -------------------------------------------------------------------------------------------------- run


def pretrain(cfg: Any, progress: bool = True, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Run the stage (see the module docstring) with extra trainer `callbacks`; returns the summary (also written
    to OUT/summary.json on rank 0; other ranks get {"is_main": False})."""
    from lmcraft.tokenizer.load import load_tokenizer
    from lmcraft.train import ResumableLoader, Trainer, set_seed
    from lmcraft.train.checkpoint import atomic_write_json
    from lmcraft.train.distributed import barrier, full_model_state, init_distributed

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    ctx = init_distributed(cfg.trainer.device)
    if ctx.is_main:
        if cfg.data.inputs is not None:  # every input file exists: checked before anything is written
            _file_specs(data_inputs(cfg.data)[0])
        _check_run_folder(cfg, out)
        packed = _packed_folder(cfg.data.packed) if cfg.data.packed is not None else None
        tokenizer_path = _resolve_tokenizer(cfg, out, packed, progress)
        sources = _data_sources(cfg, tokenizer_path, out, progress)
        atomic_write_json(out / "resolved.json", {"tokenizer": str(tokenizer_path),
                                                  "train": [str(x) for x in sources.train],
                                                  "eval": [str(x) for x in sources.eval]})
    barrier()  # the other ranks wait for the tokenizer and the packed data
    resolved = json.loads((out / "resolved.json").read_text(encoding="utf-8"))
    tokenizer_path = Path(resolved["tokenizer"])
    sources = DataSources(*((Path(resolved[k][0]), resolved[k][1]) for k in ("train", "eval")))
    packed = sources.train[0]
    tokenizer_dir = tokenizer_path.parent if tokenizer_path.is_file() else tokenizer_path
    tok = load_tokenizer(tokenizer_path)
    ids = token_ids(tok, tokenizer_dir)
    corpus_vocab = json.loads((packed / "index.json").read_text(encoding="utf-8"))["vocab_size"]
    if corpus_vocab != ids.vocab_size:
        raise ConfigError(f"the packed data in {packed} was tokenised with a {corpus_vocab}-token vocabulary but "
                          f"the tokenizer {tokenizer_path} has {ids.vocab_size}; use the tokenizer it was packed with")

    objective = build_objective_with_ids(cfg.objective, ids, cfg.data.seq_len)
    pairs = cfg.objective.name in PAIR_OBJECTIVES
    train_data = _examples(cfg, sources.train, 0)
    if train_data is None:
        raise InputFileError(packed, f"split {sources.train[1]!r}",
                             f"at least one training example of {cfg.data.seq_len} tokens; lower data.seq_len or "
                             "give more text")
    eval_data = _examples(cfg, sources.eval, 1)
    if eval_data is None and ctx.is_main:
        print(f"note: no evaluation examples in {sources.eval[0]} (split {sources.eval[1]!r}); training without "
              "evaluation", file=sys.stderr)

    mcfg, from_folder = _model_config(cfg, ids, progress)
    set_seed(cfg.trainer.seed)  # the same initial weights on every rank and every rerun
    model = objective.build_model(mcfg)
    if from_folder is not None:
        _load_pretrained(model, from_folder)

    tcfg = cfg.trainer
    loader = ResumableLoader(train_data, tcfg.micro_batch_size, BatchMaker(objective, pairs), seed=tcfg.seed,
                             shuffle=tcfg.shuffle, rank=ctx.rank, world_size=ctx.world_size)
    eval_batches = BatchMaker(objective, pairs, seed=tcfg.seed)
    eval_set = Indexed(eval_data) if eval_data is not None else None
    eval_fn = None
    if eval_set is not None and cfg.objective.name in MASKED_OBJECTIVES:
        eval_fn = masked_accuracy_fn(eval_set, eval_batches, tcfg.eval_batch_size or tcfg.micro_batch_size,
                                     tcfg.eval_max_batches)
    trainer = Trainer(model, objective.loss, loader, eval_set, tcfg, out, collate_fn=eval_batches,
                      tokenizer_dir=tokenizer_dir, eval_fn=eval_fn, callbacks=callbacks)
    if ctx.is_main:
        trained = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        print(f"pretrain: {cfg.objective.name} on a {mcfg.model_type} {mcfg.arch}, "
              f"{kept_model(model).num_parameters():,} parameters kept ({trained:,} trained); "
              f"{len(train_data):,} training / {len(eval_data or ()):,} evaluation examples; "
              f"{trainer.total_steps:,} steps", file=sys.stderr)
    result = trainer.train()

    state = full_model_state(trainer.wrapped)
    summary: dict[str, Any] = {"is_main": ctx.is_main}
    if ctx.is_main:
        final = _save_final(objective, mcfg, state, out / "final", tokenizer_dir)
        summary = _summary(cfg, trainer, result, final, start)
        if kept_model(model).head_kind == "lm":
            summary["samples"] = _samples(cfg, final)
        atomic_write_json(out / "summary.json", summary)
        summary["is_main"] = True
    barrier()
    return summary


def _save_final(objective: Objective, mcfg: ModelConfig, state: dict[str, torch.Tensor], final: Path,
                tokenizer_dir: Path) -> Path:
    """Rebuild the trained model on CPU from the full state dict and save its kept part in HF layout."""
    from lmcraft.hub import save_model

    model = objective.build_model(mcfg)
    model.load_state_dict(state)
    return save_model(kept_model(model), final, tokenizer_dir=tokenizer_dir)


def _summary(cfg: Any, trainer: Trainer, result: dict[str, Any], final: Path, start: float) -> dict[str, Any]:
    history = trainer.state.history
    evals = [r for r in history if r["split"] == "eval"]
    train = [r for r in history if r["split"] == "train"]
    kept = kept_model(trainer.model)
    return {
        "objective": cfg.objective.name,
        "parameters": kept.num_parameters(),
        "steps": result["step"],
        "stopped": result["stopped"],
        "train_targets": sum(r["targets"] for r in train),
        "final_train_loss": train[-1]["loss"] if train else None,
        "eval": {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {},
        "best": {"metric": result["best_metric"], "step": result["best_step"]},
        "tokens_per_s": (sum(r["tokens_per_s"] for r in train) / len(train)) if train else None,
        "seconds": round(time.perf_counter() - start, 1),
        "final": str(final),
        "output_dir": str(cfg.output_dir),
    }


def _samples(cfg: Any, final: Path) -> list[dict[str, str]]:
    """Continuations of `samples.prompts` by the saved model, loaded back from final/ as any user would."""
    from lmcraft.generate import GenerationConfig, generate_text
    from lmcraft.hub import load_model
    from lmcraft.tokenizer.load import load_tokenizer

    s = cfg.samples
    model, tok = load_model(final), load_tokenizer(final)
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=s.temperature > 0,
                           temperature=s.temperature or 1.0, top_k=s.top_k, seed=s.seed)
    result = generate_text(model, tok, list(s.prompts), gen)
    return [{"prompt": p, "completion": t} for p, t in zip(s.prompts, result.texts or [], strict=True)]


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report printed by the CLI."""
    ev = summary["eval"]
    lines = [f"pre-training ({summary['objective']}) done: {summary['steps']} steps, {summary['parameters']:,} "
             f"parameters, {summary['seconds']:.0f} s; model saved to {summary['final']}"]
    if summary["final_train_loss"] is not None:
        lines.append(f"  train loss {summary['final_train_loss']:.4f}")
    if ev:
        lines.append("  " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in sorted(ev.items())))
    if "eval_masked_accuracy" in ev:
        lines.append(f"  masked-token accuracy: {100 * ev['eval_masked_accuracy']:.2f}%")
    for i, s in enumerate(summary.get("samples", []), 1):
        lines.append(f"--- sample {i} ---\n{s['prompt']}{s['completion']}")
    return "\n".join(lines)
