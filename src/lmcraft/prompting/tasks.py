"""Tasks as YAML: where the documents come from, how they become prompts, which strategies to compare, how
answers are read and scored (in the spirit of lm-evaluation-harness task files).

    name: gsm_symbolic
    data: {source: reasoning_gym, dataset: gsm_symbolic, size: 200, seed: 42,
           fields: {cot: metadata.answer_cot}}
    fewshot: {source: reasoning_gym, dataset: gsm_symbolic, size: 50, seed: 7, fields: {cot: metadata.answer_cot}}
    template: {input: "Question: {question}", answer_prefix: "Answer:", target: "{answer}", reasoning: "{cot}"}
    answer: {type: numeric}
    generation: {max_new_tokens: 256, answer_max_new_tokens: 16}
    strategies: [{name: zero_shot}, {name: zero_shot_cot}, {name: self_consistency, n: 5}]
    metrics: [accuracy]

Data sources (`data.source`): `reasoning_gym` (a seeded procedural data set of the `reasoning-gym` package),
`arithmetic` (seeded sums and differences generated here, with worked reasoning),
`jsonl` (a JSON-lines or JSON-list file, relative to the task file or `asset:`), `inline` (records in the YAML), and
`files` (text or e-mail files under a folder or a named asset `asset:NAME[/sub/dir]`, labelled by path
pattern, optionally cut into chunks). Every source may rename / flatten fields (`fields: {new: dotted.path}`),
shuffle with a seed, and keep the first `limit` records.

Built-in tasks ship as package data in `lmcraft/prompting/tasks/*.yaml`; `load_task("gsm_symbolic")` finds
them by name, `load_task("my_task.yaml")` reads a file.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import fnmatch
import html as htmllib
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from lmcraft.config import Section, apply_overrides, validate_config
from lmcraft.data.readers import resolve_path
from lmcraft.data.records import read_records
from lmcraft.errors import ConfigError, InputFileError
from lmcraft.prompting.answers import AnswerSpec
from lmcraft.prompting.strategies import Strategy, ZeroShot
from lmcraft.prompting.templates import PromptTemplate

__all__ = ["Task", "TaskConfig", "builtin_tasks", "load_task"]


class _Source(Section):
    fields: dict[str, str] = {}
    shuffle: bool = False
    seed: int = 0
    skip: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)

    def records(self, base_dir: Path) -> list[dict[str, Any]]:
        raise NotImplementedError(type(self).__name__)

    def load(self, base_dir: Path) -> list[dict[str, Any]]:
        recs = self.records(base_dir)
        if self.shuffle:
            random.Random(self.seed).shuffle(recs)
        recs = recs[self.skip : None if self.limit is None else self.skip + self.limit]
        return [self._map(r, i) for i, r in enumerate(recs)]

    def _map(self, rec: dict[str, Any], index: int) -> dict[str, Any]:
        out = dict(rec)
        for name, dotted in self.fields.items():
            value: Any = rec
            for part in dotted.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ConfigError(
                        f"data.fields maps {name!r} to {dotted!r}, but record {index} has no {part!r} "
                        f"(its keys: {sorted(value) if isinstance(value, dict) else type(value).__name__})"
                    )
                value = value[part]
            out[name] = value
        return out


class ReasoningGymData(_Source):
    """`reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config)`: records with question, answer,
    metadata (for gsm_symbolic: `metadata.answer_cot`, a worked solution ending in `#### n`)."""

    source: Literal["reasoning_gym"]
    dataset: str
    size: int = Field(100, ge=1)
    config: dict[str, Any] = {}

    def records(self, base_dir: Path) -> list[dict[str, Any]]:
        try:
            import reasoning_gym
        except ImportError:
            raise ConfigError(
                "data.source reasoning_gym needs the reasoning-gym package: pip install 'lmcraft[eval]'"
            ) from None
        ds = reasoning_gym.create_dataset(self.dataset, size=self.size, seed=self.seed, **self.config)
        return [dict(ds[i]) for i in range(len(ds))]


_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class ArithmeticData(_Source):
    """Seeded arithmetic problems, generated here (no data file, no extra package): `terms` integers drawn uniformly
    from [min_operand, max_operand] joined by operators drawn from `operators`, evaluated left to right.

    Each record: `question` ("What is 7 + 5 - 3?"), `answer` ("9"), `reasoning` (the running result after each
    operation, "7 + 5 = 12. 12 - 3 = 9. The answer is 9."), `steps` (the partial expressions)."""

    source: Literal["arithmetic"]
    size: int = Field(200, ge=1)
    terms: int = Field(2, ge=2, le=8)
    min_operand: int = 0
    max_operand: int = Field(9, ge=0)
    operators: list[Literal["+", "-", "*"]] = Field(["+", "-"], min_length=1)

    def records(self, base_dir: Path) -> list[dict[str, Any]]:
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.size):
            numbers = [rng.randint(self.min_operand, self.max_operand) for _ in range(self.terms)]
            ops = [rng.choice(self.operators) for _ in range(self.terms - 1)]
            value, steps, sentences = numbers[0], [], []
            for op, n in zip(ops, numbers[1:], strict=True):
                result = _OPERATIONS[op](value, n)
                steps.append(f"{value} {op} {n}")
                sentences.append(f"{value} {op} {n} = {result}.")
                value = result
            expression = " ".join([str(numbers[0]), *(f"{op} {n}" for op, n in zip(ops, numbers[1:], strict=True))])
            out.append({"question": f"What is {expression}?", "answer": str(value), "steps": steps,
                        "reasoning": " ".join([*sentences, f"The answer is {value}."])})
        return out


class JsonlData(_Source):
    """Records from a `.jsonl` file (one JSON object per line) or a `.json` list of objects: a path relative to the
    task file, or `asset:NAME/file` (a fetched lmcraft asset)."""

    source: Literal["jsonl"]
    path: Path

    def records(self, base_dir: Path) -> list[dict[str, Any]]:
        given = str(self.path)
        path = resolve_path(given) if given.startswith("asset:") else base_dir / self.path
        if not path.is_file():
            raise ConfigError(f"task data file not found: {path}")
        return [record.fields for record in read_records(str(path), "json" if path.suffix == ".json" else "jsonl")]


class InlineData(_Source):
    source: Literal["inline"]
    records_: list[dict[str, Any]] = Field(alias="records")

    def records(self, base_dir: Path) -> list[dict[str, Any]]:
        return [dict(r) for r in self.records_]


_TAG = re.compile(r"<[^>]*>")


def _part_text(part: email.message.Message) -> str:
    try:
        return str(part.get_content())
    except (LookupError, UnicodeError, KeyError):
        payload = part.get_payload(decode=True)
        return payload.decode("latin-1", "replace") if isinstance(payload, bytes) else ""


def _email_text(raw: bytes) -> str:
    """Subject and body of an RFC 822 message: its text/plain parts, else its HTML parts without tags;
    whitespace collapsed, attachments skipped."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    plain, html = [], []
    for part in msg.walk():
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(_part_text(part))
        elif kind == "text/html":
            html.append(htmllib.unescape(_TAG.sub(" ", _part_text(part))))
    subject = str(msg.get("subject", "") or "")
    body = " ".join(" ".join(plain or html).split())
    return f"Subject: {subject}\n\n{body}".strip()


def _natural(path: Path) -> list[Any]:
    """Sort key reading digit runs as numbers: chapter_2 before chapter_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def _chunks(text: str, size: int) -> list[str]:
    """Paragraph-aligned pieces of about `size` characters (a paragraph longer than `size` stays whole)."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) + 2 > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur.strip():
        out.append(cur)
    return [c.strip() for c in out if c.strip()]


class FilesData(_Source):
    """Documents from files: `{text, label, path}` per file (or per chunk), plus a JSON file's own keys.

    root: a folder, or `asset:NAME[/sub/dir]` (fetched through `lmcraft.assets`). glob: which files.
    labels: `{path pattern: label}`, fnmatch on the path relative to root, first match wins (files matching
    none are skipped when labels are given). format: `text` (the file is the text) or `json` (the file is one
    object whose `text` key is the text). email: the text is an RFC 822 message; keep subject + plain body.
    max_chars: cut each document; chunk_chars: split each file into paragraph-aligned chunks first.
    """

    source: Literal["files"]
    root: str
    glob: str = "**/*"
    labels: dict[str, str] = {}
    format: Literal["text", "json"] = "text"
    email: bool = False
    max_chars: int = Field(0, ge=0)
    chunk_chars: int = Field(0, ge=0)

    def _root(self, base_dir: Path) -> Path:
        root = resolve_path(self.root)
        root = root if root.is_absolute() else base_dir / root
        if not root.is_dir():
            raise ConfigError(f"data.root {self.root!r} is not a folder ({root})")
        return root

    def _read(self, path: Path) -> dict[str, Any]:
        raw = path.read_text(encoding="utf-8", errors="surrogateescape")
        if self.format == "text":
            return {"text": raw}
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InputFileError(path, f"line {err.lineno}", f"one JSON object ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise InputFileError(path, "top level", 'a JSON object with a string "text"')
        return rec

    def records(self, base_dir: Path) -> list[dict[str, Any]]:
        root = self._root(base_dir)
        out = []
        for path in sorted((p for p in root.glob(self.glob) if p.is_file()), key=_natural):
            rel = path.relative_to(root).as_posix()
            label = next((lab for pat, lab in self.labels.items() if fnmatch.fnmatch(rel, pat)), None)
            if self.labels and label is None:
                continue
            rec = self._read(path)
            text = _email_text(rec["text"].encode("utf-8", "surrogateescape")) if self.email else rec["text"]
            pieces = _chunks(text, self.chunk_chars) if self.chunk_chars else [text]
            for piece in pieces:
                piece = piece[: self.max_chars] if self.max_chars else piece
                out.append({**rec, "text": piece, "label": label, "path": rel})
        if not out:
            raise ConfigError(f"no files match {self.glob!r} (and the label patterns) under {root}")
        return out


DataSpec = Annotated[ReasoningGymData | ArithmeticData | JsonlData | InlineData | FilesData,
                     Field(discriminator="source")]


class Generation(Section):
    """Decoding budgets: `max_new_tokens` for reasoning, `answer_max_new_tokens` for short answers."""

    max_new_tokens: int = Field(256, ge=1)
    answer_max_new_tokens: int = Field(32, ge=1)
    stop: list[str] = []
    seed: int = 0


Metric = Literal["accuracy", "f1", "exact_match", "bleu", "chrf", "rouge", "perplexity"]


class TaskConfig(Section):
    name: str
    description: str = ""
    data: DataSpec
    fewshot: DataSpec | None = None
    template: PromptTemplate = PromptTemplate()
    answer: AnswerSpec = AnswerSpec()
    generation: Generation = Generation()
    strategies: list[Strategy] = Field(default_factory=lambda: [ZeroShot()], min_length=1)
    metrics: list[Metric] = ["accuracy"]


@dataclass
class Task:
    """A validated task and the folder its relative paths are resolved against."""

    config: TaskConfig
    base_dir: Path

    def docs(self, limit: int | None = None) -> list[dict[str, Any]]:
        docs = self.config.data.load(self.base_dir)
        return docs[:limit] if limit else docs

    def fewshot_docs(self) -> list[dict[str, Any]]:
        return self.config.fewshot.load(self.base_dir) if self.config.fewshot else []


def _builtin_dir() -> Any:
    return resources.files("lmcraft.prompting").joinpath("tasks")


def builtin_tasks() -> list[str]:
    """Names of the tasks shipped with lmcraft."""
    return sorted(p.name.removesuffix(".yaml") for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_task(ref: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> Task:
    """A task from a built-in name, a YAML path, or a dict; `overrides` are dotted keys (`data.size: 20`)."""
    base_dir = Path.cwd()
    source = "task"
    if isinstance(ref, dict):
        data = json.loads(json.dumps(ref))
    else:
        path = Path(ref)
        if not path.is_file():
            builtin = _builtin_dir().joinpath(f"{ref}.yaml")
            if not builtin.is_file():
                raise ConfigError(
                    f"task {str(ref)!r} is neither a YAML file nor a built-in task ({', '.join(builtin_tasks())})"
                )
            text, source = builtin.read_text(encoding="utf-8"), f"built-in task {ref}"
        else:
            text, source, base_dir = path.read_text(encoding="utf-8"), str(path), path.parent
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"task {source} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"task {source} must be a mapping (name, data, template, strategies, ...)")
    apply_overrides(data, overrides or {})
    return Task(validate_config(TaskConfig, data, source), base_dir)
