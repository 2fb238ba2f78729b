"""Run a list of stages, each in its own folder under `run_dir`, then write one report.

Each stage runs as `python -m lmcraft <stage> <run_dir>/<name>/config.yaml` in a child process: stages
read files and write files, so a stage's memory and threads are released when it ends, and a crash in
one stage leaves the finished ones untouched. A stage counts as complete when `<name>/.done.json`
exists and records the same config hash; a rerun skips complete stages and reruns the others, which
resume from their own checkpoints (the trainer and the data stage resume exactly), so a pipeline killed
at any moment and rerun finishes with the same results as an uninterrupted run.

Config values may refer to other stages' folders: `${pretrain}` is `<run_dir>/pretrain`, and
`${run_dir}` is the run folder itself. The pipeline sets each stage's `output_key` (default
`output_dir`) to the stage's folder.

The same plan and the same rule of done serve the sweeps (`lmcraft compare`, `lmcraft scaling`): a sweep builds
its list of `StageSpec`s, runs them with `Pipeline.run_stages` (`keep_going` records a failed stage and goes on;
`InProcessPipeline` runs the stages in this process) and reads each folder's summary with `read_summary`.

Stages report to the pipeline through `summary.json` in their folder (the eval stage: `results.json`, in
lm-evaluation-harness's `{"results": ...}` layout; also older fine-tuning runs): scalar entries (and
those of one-level nested dicts such as `"eval": {...}`) become the metrics table, `samples` (a list of
`{"prompt", "before", "after" | "completion"}` records, or parallel lists; also read from `samples.json`) the
samples table, and every PNG in the folder an image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from lmcraft.config import Section, StageConfig
from lmcraft.errors import LmcraftError
from lmcraft.headlines import headline_rows
from lmcraft.io import read_json, read_yaml, write_json, write_text
from lmcraft.report import Report
from lmcraft.stage_table import STAGES, stage_config_class, stage_module

DONE_FILE = ".done.json"
_REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")


class StageSpec(Section):
    """One step of the pipeline."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="unique; also the stage's folder name")
    stage: str = Field(description="a CLI stage, e.g. pretrain, finetune, sft, dpo, eval")
    config: dict[str, Any] = Field(default_factory=dict, description="the stage's config (inline)")
    config_file: Path | None = Field(None, description="a YAML config; `config` keys override it")
    output_key: str | None = Field("output_dir", description="config key set to the stage's folder; null = none")
    estimate_minutes: float | None = Field(None, gt=0, description="shown by --dry-run before the first run")
    title: str | None = None

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, v: str) -> str:
        if v == "pipeline" or v not in STAGES:
            allowed = ", ".join(s for s in STAGES if s != "pipeline")
            raise ValueError(f"unknown stage {v!r}; allowed: {allowed}")
        return v


class PipelineConfig(StageConfig):
    run_dir: Path = Path("runs/pipeline")
    title: str = "lmcraft pipeline report"
    description: str = ""
    stages: list[StageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_names(self) -> PipelineConfig:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        for i, spec in enumerate(self.stages):
            for ref in _references(spec.config):
                if ref != "run_dir" and ref.split(".")[0] not in names[:i]:
                    raise ValueError(f"stage {spec.name!r} refers to ${{{ref}}}, which is not an earlier stage")
        return self


def _references(value: Any) -> list[str]:
    if isinstance(value, str):
        return _REF.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _references(v)]
    if isinstance(value, list):
        return [r for v in value for r in _references(v)]
    return []


def _substitute(value: Any, folders: dict[str, Path]) -> Any:
    """Replace `${name}` by that stage's folder (and `${name.sub/path}` is just text after it)."""
    if isinstance(value, str):
        return _REF.sub(lambda m: str(folders[m.group(1).split(".")[0]]), value)
    if isinstance(value, dict):
        return {k: _substitute(v, folders) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, folders) for v in value]
    return value


def stage_config(spec: StageSpec, folder: Path, folders: dict[str, Path]) -> dict[str, Any]:
    """The full config a stage runs with: file, then inline keys, then references and its output folder."""
    data: dict[str, Any] = {}
    if spec.config_file is not None:
        if not spec.config_file.is_file():
            raise LmcraftError(f"stage {spec.name!r}: config_file {spec.config_file} does not exist")
        data = read_yaml(spec.config_file, "stage config") or {}
    data = _deep_merge(data, spec.config)
    data = _substitute(data, folders)
    if spec.output_key:
        data[spec.output_key] = str(folder)
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_hash(stage: str, config: dict[str, Any]) -> str:
    """The identity of a planned stage: sha256 of its name and full config (output folder included)."""
    blob = json.dumps({"stage": stage, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_done(folder: Path) -> dict[str, Any] | None:
    """The stage's `.done.json` record, or None when it has none (or an unreadable one)."""
    data = _read_json(folder / DONE_FILE)
    return data if isinstance(data, dict) else None


def is_done(folder: Path, digest: str) -> bool:
    """The one definition of done: the folder's `.done.json` records the same config hash."""
    done = read_done(folder)
    return done is not None and done.get("hash") == digest


class StageFailed(LmcraftError):
    """A stage's process ended with an error; `code` is its exit code and `log` its log file."""

    def __init__(self, message: str, code: int, log: Path) -> None:
        super().__init__(message)
        self.code, self.log = code, log


class Pipeline:
    """Plans, runs (skipping complete stages) and reports a `PipelineConfig`."""

    def __init__(self, cfg: PipelineConfig, python: str = sys.executable) -> None:
        self.cfg = cfg
        self.python = python
        self.run_dir = cfg.run_dir
        self.folders = {"run_dir": self.run_dir, **{s.name: self.run_dir / s.name for s in cfg.stages}}

    def plan(self) -> list[dict[str, Any]]:
        """One row per stage: name, stage, status (done | pending), config, hash, minutes (recorded or estimated)."""
        rows = []
        for spec in self.cfg.stages:
            folder = self.folders[spec.name]
            config = stage_config(spec, folder, self.folders)
            digest = config_hash(spec.stage, config)
            done = read_done(folder)
            minutes = done["seconds"] / 60 if done else spec.estimate_minutes
            rows.append({"spec": spec, "folder": folder, "config": config, "hash": digest,
                         "status": "done" if is_done(folder, digest) else "pending", "minutes": minutes})
        return rows

    def check(self) -> None:
        """Validate every pending stage's config before any work (outputs of earlier stages may not exist yet)."""
        from lmcraft.config import precheck_config

        run_dir = str(self.run_dir.resolve())
        for row in self.plan():
            if row["status"] == "done":
                continue
            spec = row["spec"]
            config_class = stage_config_class(spec.stage)
            if config_class is not None:
                precheck_config(config_class, row["config"], f"of pipeline stage {spec.name!r}",
                                lambda path: str(Path(path).resolve()).startswith(run_dir))

    def describe(self) -> str:
        rows = self.plan()
        lines = [f"pipeline: {len(rows)} stages in {self.run_dir}", ""]
        lines.append(f"  {'#':>2}  {'name':<16} {'stage':<18} {'status':<8} {'minutes':>8}")
        total = 0.0
        for i, r in enumerate(rows, 1):
            mins = r["minutes"]
            if r["status"] == "pending" and mins:
                total += mins
            shown = f"{mins:8.1f}" if mins else "       ?"
            lines.append(f"  {i:>2}  {r['spec'].name:<16} {r['spec'].stage:<18} {r['status']:<8} {shown}")
        unknown = any(not r["minutes"] for r in rows if r["status"] == "pending")
        lines += ["", f"  estimated time for the pending stages: {total:.1f} min"
                  + (" (+ stages with no estimate)" if unknown else "")]
        return "\n".join(lines)

    def run(self, stream: Any = None) -> Path:
        """Run every pending stage in order; returns the report's HTML path."""
        stream = stream or sys.stderr
        self.check()
        start = time.perf_counter()
        self.run_stages(stream, after_each=self.write_report)
        html = self.write_report()
        print(f"== pipeline complete in {(time.perf_counter() - start) / 60:.1f} min; report: {html}", file=stream)
        return html

    def run_stages(self, stream: Any = None, keep_going: bool = False, rerun: bool = False,
                   after_each: Callable[[], Any] | None = None) -> dict[str, StageFailed | None]:
        """Run the pending stages in order (every stage with `rerun`), marking each complete one done; returns
        name -> None (complete) or its failure. A failure stops the run unless `keep_going`."""
        stream = stream or sys.stderr
        rows = self.plan()
        start = time.perf_counter()
        outcome: dict[str, StageFailed | None] = {}
        for i, row in enumerate(rows, 1):
            spec = row["spec"]
            elapsed = time.perf_counter() - start
            banner = f"[{i}/{len(rows)}] {spec.name} ({spec.stage})"
            outcome[spec.name] = None
            if row["status"] == "done" and not rerun:
                print(f"== {banner}: complete, reusing its results", file=stream, flush=True)
                continue
            print(f"== {banner}: running  (pipeline elapsed {elapsed / 60:.1f} min)", file=stream, flush=True)
            (row["folder"] / DONE_FILE).unlink(missing_ok=True)  # not done until this run says so
            cpu_start = cpu_seconds()
            try:
                seconds = self._run_stage(spec, row["folder"], row["config"], stream)
            except StageFailed as err:
                if not keep_going:
                    raise
                outcome[spec.name] = err
                print(f"== {banner}: FAILED ({err})", file=stream, flush=True)
                continue
            cpu = cpu_seconds() - cpu_start
            write_json(row["folder"] / DONE_FILE, {"hash": row["hash"], "seconds": seconds, "cpu_seconds": cpu,
                                                   "stage": spec.stage, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
            print(f"== {banner}: done in {seconds / 60:.1f} min ({cpu / 60:.1f} CPU min)", file=stream, flush=True)
            if after_each is not None:
                after_each()
        return outcome

    def _run_stage(self, spec: StageSpec, folder: Path, config: dict[str, Any], stream: Any) -> float:
        argv = _stage_argv(spec, folder, config)
        cmd = [self.python, "-m", "lmcraft", *argv]
        t0 = time.perf_counter()
        with open(folder / "log.txt", "ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env(),
                                    preexec_fn=_die_with_parent)
            assert proc.stdout is not None
            while chunk := os.read(proc.stdout.fileno(), 65536):
                log.write(chunk)
                out = getattr(stream, "buffer", None)
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    stream.write(chunk.decode("utf-8", "replace"))
            code = proc.wait()
        if code != 0:
            raise StageFailed(
                f"stage {spec.name!r} ({spec.stage}) failed with exit code {code}; its log is {folder / 'log.txt'}. "
                f"Fix the cause and rerun the same command: complete stages are skipped and this one resumes.",
                code, folder / "log.txt",
            )
        return time.perf_counter() - t0

    def write_report(self) -> Path:
        report = build_report(self.cfg, self.plan())
        md, html = self.run_dir / "report.md", self.run_dir / "report.html"
        report.write(md, html)
        return html


class InProcessPipeline(Pipeline):
    """A plan whose stages run in this process, each through its module's `run` with the stage's own argument
    parser (`argv` are extra flags, e.g. `--no-progress`): for sweeps of many short stages, where starting a
    process per stage costs more than the stage. A stage's error propagates as it is."""

    def __init__(self, cfg: PipelineConfig, argv: list[str] | None = None) -> None:
        super().__init__(cfg)
        self.argv = argv or []

    def _run_stage(self, spec: StageSpec, folder: Path, config: dict[str, Any], stream: Any) -> float:
        import argparse

        module = stage_module(spec.stage)
        parser = argparse.ArgumentParser(prog=f"lmcraft {spec.stage}")
        module.add_arguments(parser)
        args = parser.parse_args([*_stage_argv(spec, folder, config)[1:], *self.argv])
        t0 = time.perf_counter()
        code = int(module.run(args) or 0)
        if code != 0:
            raise StageFailed(f"stage {spec.name!r} ({spec.stage}) ended with exit code {code}", code,
                              folder / "log.txt")
        return time.perf_counter() - t0


def _stage_argv(spec: StageSpec, folder: Path, config: dict[str, Any]) -> list[str]:
    """`STAGE FOLDER/config.yaml [--overwrite]`: the stage's config written to its prepared folder."""
    flags = _prepare_folder(spec, folder, config)
    config_path = folder / "config.yaml"
    write_text(config_path, yaml.safe_dump(config, sort_keys=False))
    return [spec.stage, str(config_path), *flags]


def _prepare_folder(spec: StageSpec, folder: Path, config: dict[str, Any]) -> list[str]:
    """The stage's folder, prepared for its claim (`run_folder.prepare_stage_folder`); returns extra flags."""
    from lmcraft.config import validate_config
    from lmcraft.run_folder import prepare_stage_folder

    folder.mkdir(parents=True, exist_ok=True)
    config_class = stage_config_class(spec.stage)
    if spec.output_key is None or config_class is None:
        return []
    try:
        validated = validate_config(config_class, config)
    except LmcraftError:
        return []  # the stage itself reports the bad config, in its log
    return prepare_stage_folder(folder, spec.stage, validated, spec.output_key)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (a stage's process counts once it has
    been waited for): the load-independent cost of a stage, where wall time grows with whatever shares the cores."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, ask for SIGKILL when the pipeline process dies, so that killing the
    pipeline stops its running stage too (which then resumes from its last checkpoint on rerun)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _artifacts(folder: Path) -> list[tuple[str, str]]:
    """What lies in a stage folder: models, adapters, tokenizers, data shards (depth <= 2)."""
    found = []
    for path in sorted([folder, *folder.glob("*"), *folder.glob("*/*")]):
        if not path.is_dir() or path.name.startswith((".", "step-")) or "trainer_state" in path.parts:
            continue
        if (path / "adapter_config.json").exists():
            found.append(("adapter", str(path)))
        elif (path / "config.json").exists() and any(path.glob("*.safetensors")):
            found.append(("model", str(path)))
        elif (path / "tokenizer.json").exists():
            found.append(("tokenizer", str(path)))
        if (path / "index.json").exists() and any(path.glob("*.bin")):
            found.append(("token shards", str(path)))
    return found


def _images(folder: Path, summary: dict[str, Any]) -> list[Path]:
    listed = [folder / p for p in summary.get("images", [])]
    found = [p for p in sorted(folder.glob("*.png")) + sorted(folder.glob("*/*.png")) if "step-" not in str(p)]
    return list(dict.fromkeys([p for p in listed + found if p.exists()]))


def build_report(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> Report:
    report = Report(cfg.title)
    if cfg.description:
        report.text(cfg.description)
    overview = []
    for r in rows:
        done = read_done(r["folder"])
        cpu = done.get("cpu_seconds") if done else None
        overview.append([r["spec"].name, r["spec"].stage, r["status"],
                         f"{done['seconds'] / 60:.1f}" if done else "-",
                         f"{cpu / 60:.1f}" if isinstance(cpu, int | float) else "-", str(r["folder"])])
    report.section("Overview")
    report.text("Minutes are wall-clock; CPU minutes are user + system time of the stage's process and its workers "
                "(independent of what else shares the cores).")
    report.table(["stage", "kind", "status", "minutes", "CPU minutes", "folder"], overview)
    headlines = [[r["spec"].name, *row] for r in rows if r["status"] == "done"
                 for row in headline_rows(r["spec"].stage, read_summary(r["folder"]), r["folder"])]
    if headlines:
        report.section("Headlines")
        report.text("What each stage changed, measured on data it did not train on where it has some (intervals: 95% "
                    "Wilson; paired changes: exact McNemar test on the same items).")
        report.table(["stage", "metric", "before", "after", "interval / test"], headlines)
    for r in rows:
        spec, folder = r["spec"], r["folder"]
        report.section(spec.title or f"{spec.name} ({spec.stage})")
        summary = read_summary(folder)
        metrics = _metric_rows(summary)
        if metrics:
            report.table(["metric", "value"], metrics)
        for image in _images(folder, summary):
            report.image(image, image.stem.replace("_", " "))
        cols, samples = _sample_rows(summary.get("samples"))
        if samples:
            report.table(cols, samples)
        artifacts = _artifacts(folder) if folder.exists() else []
        if artifacts:
            report.table(["artefact", "path"], [list(a) for a in artifacts])
        report.code(yaml.safe_dump(r["config"], sort_keys=False), "yaml")
    return report


def _read_json(path: Path) -> Any:
    """The JSON a stage left in its folder, or None when it is missing or unreadable (a report never fails)."""
    try:
        return read_json(path)
    except (OSError, LmcraftError):
        return None


def read_summary(folder: Path) -> dict[str, Any]:
    """What a stage left for the report: `summary.json` merged over `results.json`, plus `samples.json`."""
    summary: dict[str, Any] = {}
    for name in ("results.json", "summary.json"):
        data = _read_json(folder / name)
        if isinstance(data, dict):
            summary.update(data)
    samples = _read_json(folder / "samples.json")
    if samples is not None and "samples" not in summary:
        summary["samples"] = samples
    return summary


def _metric_rows(summary: dict[str, Any]) -> list[list[Any]]:
    """Scalars of a summary (and of its one-level-nested dicts) as `[key, value]` rows."""
    rows: list[list[Any]] = []
    for key, value in summary.items():
        if key in ("samples", "images", "artifacts"):
            continue
        items = value.items() if isinstance(value, dict) and key != "metrics" else [(None, value)]
        if key == "metrics" and isinstance(value, dict):
            items = [(k, v) for k, v in value.items()]
            key = ""
        for sub, v in items:
            if isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) <= 60):
                rows.append([".".join(p for p in (key, sub) if p), v])
    return rows


def _sample_rows(samples: Any) -> tuple[list[str], list[list[str]]]:
    """Samples as a table: a list of records, or parallel lists {"prompts": [...], "before": [...], ...}."""
    if isinstance(samples, dict):
        columns = {("prompt" if k == "prompts" else k): v for k, v in samples.items() if isinstance(v, list)}
        n = max((len(v) for v in columns.values()), default=0)
        samples = [{k: v[i] for k, v in columns.items() if i < len(v)} for i in range(n)]
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        return [], []
    cols = [c for c in ("prompt", "before", "after", "completion", "output", "answer") if any(c in s for s in samples)]
    return cols, [[str(s.get(c, "")) for c in cols] for s in samples]
