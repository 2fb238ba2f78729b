"""`lmcraft scaling CONFIG.yaml [key=value ...]`: a sweep of model sizes (and token budgets) with the pre-training
stage, scaling-law fits with confidence intervals, plots, and a capability probe per model.

1. shared data, once: the first run tokenises and packs `data.inputs` (training a tokenizer with
   `tokenizer.train`) into its OUT/runs/NAME/tokenizer and OUT/runs/NAME/data folders, as `lmcraft pretrain` does;
   every later run reads them (`tokenizer.path`, `data.packed`). Given `data.packed`, every run reads that;
2. runs: each size (`sizes`: model overrides per run, or `grid`: width x depth) at each token budget (`tokens`) is
   one `lmcraft pretrain` run in OUT/runs/NAME/ with `trainer.max_steps = tokens / (micro_batch_size *
   grad_accum * seq_len)` and an evaluation every 1/`curve_points` of the run. A rerun skips finished runs (those
   with summary.json) and resumes an interrupted one from its last checkpoint;
3. probe: the next-speaker cloze of `lmcraft.scaling` on the held-out documents (`probe`), scored on every
   run's final model, accuracy with its 95% Wilson interval (OUT/runs/NAME/probe.json); `probe.reference` also
   scores a pretrained model (e.g. an asset) on the first `reference_items` items, as a yardstick
   (OUT/probe_reference.json);
4. fits (`lmcraft.scaling`): L(N) over the final evaluation losses when only the size varies, L(D) when only the
   token budget does, L(N, D) when both do, and L(C) over the compute frontier of every run's evaluation curve,
   with C = 6 N D and N the non-embedding parameters (`fit.embeddings: true` counts embeddings too);
5. OUT/scaling.json (runs and fits), OUT/scaling.png and OUT/report.md + report.html; with `report.publish_dir`
   the Markdown and PNG are also written there as NAME.md / NAME.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from lmcraft.config import Section, StageConfig, validate_config
from lmcraft.errors import ConfigError
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import claim, load_training_config

if TYPE_CHECKING:
    from lmcraft.report import Report
    from lmcraft.scaling import ClozeItem, TaskPoints

__all__ = ["FitSection", "GridSection", "ProbeSection", "ReportSection", "SizeSpec", "add_arguments",
           "config_class", "plan_runs", "run", "scaling"]


class SizeSpec(Section):
    """One model size: ModelConfig `overrides` on top of `model.overrides`, and TrainerConfig fields for its runs."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    overrides: dict[str, Any] = {}
    trainer: dict[str, Any] = {}


class GridSection(Section):
    """Sizes width x depth: hidden_size = width, num_layers = depth, num_heads = num_kv_heads = width / head_dim,
    intermediate_size = mlp_ratio * width rounded up to a multiple of 8."""

    width: list[int] = Field(min_length=1)
    depth: list[int] = Field(min_length=1)
    head_dim: int = Field(32, ge=1)
    mlp_ratio: float = Field(8 / 3, gt=0)

    @model_validator(mode="after")
    def _divisible(self) -> GridSection:
        bad = [w for w in self.width if w % self.head_dim]
        if bad:
            raise ValueError(f"grid.width {bad} not divisible by grid.head_dim {self.head_dim}")
        return self

    def sizes(self) -> list[SizeSpec]:
        out = []
        for depth in self.depth:
            for width in self.width:
                heads = width // self.head_dim
                inter = 8 * math.ceil(self.mlp_ratio * width / 8)
                overrides = {"hidden_size": width, "num_layers": depth, "num_heads": heads, "num_kv_heads": heads,
                             "head_dim": self.head_dim, "intermediate_size": inter}
                out.append(SizeSpec(name=f"w{width}-d{depth}", overrides=overrides))
        return out


class FitSection(Section):
    """How the laws are fitted (see `lmcraft.scaling`)."""

    loss: Literal["linear", "huber"] = "linear"
    huber_delta: float = Field(1e-3, gt=0)
    bootstrap: Literal["residual", "pairs"] = "residual"
    n_boot: int = Field(1000, ge=50)
    level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    embeddings: bool = Field(False, description="count embedding parameters in N")


class ProbeSection(Section):
    """Next-speaker cloze on the held-out documents (play scripts), scored by log-likelihood."""

    items: int = Field(400, ge=10)
    options: int = Field(4, ge=2)
    context_chars: int = Field(400, ge=50)
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    reference: str | None = Field(None, description="a pretrained model (folder or asset) scored as a yardstick")
    reference_items: int = Field(100, ge=10, description="the reference scores this many of the items")


class ReportSection(Section):
    title: str = "Scaling sweep"
    publish_dir: Path | None = Field(None, description="also write NAME.md and NAME.png here (e.g. docs/results)")
    name: str = Field("scaling", pattern=r"^[A-Za-z0-9_.-]+$")


def _short(tokens: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if tokens >= size and tokens % (size // 10) == 0:
            return f"{tokens / size:g}{unit}"
    return str(tokens)


@functools.cache
def config_class() -> type[StageConfig]:
    """The stage config; built on first use because the pre-training sections import torch."""
    from lmcraft.stages.pretrain import DataSection, ModelSection, ObjectiveSection, SamplesSection, TokenizerSection
    from lmcraft.train import TrainerConfig

    class ScalingConfig(StageConfig):
        output_dir: Path
        model: ModelSection
        sizes: list[SizeSpec] = []
        grid: GridSection | None = None
        tokens: int | list[int] = Field(description="training tokens per run (sets trainer.max_steps); a list "
                                                    "sweeps the data too")
        objective: ObjectiveSection = ObjectiveSection(name="clm")
        data: DataSection
        tokenizer: TokenizerSection = TokenizerSection()
        trainer: TrainerConfig = TrainerConfig()
        samples: SamplesSection = SamplesSection(max_new_tokens=32)
        curve_points: int = Field(8, ge=1, description="evaluations per run (sets trainer.eval_every)")
        threads: int | None = Field(None, ge=1, description="torch CPU threads (1 is often faster on a busy machine)")
        fit: FitSection = FitSection()
        probe: ProbeSection | None = ProbeSection()
        report: ReportSection = ReportSection()

        @model_validator(mode="after")
        def _consistent(self) -> ScalingConfig:
            if self.model.preset is None:
                raise ValueError("the sweep trains fresh models: give model.preset (+ model.overrides), not model.from")
            if bool(self.sizes) == (self.grid is not None):
                raise ValueError("give exactly one of sizes (a list of {name, overrides}) and grid (width x depth)")
            names = [s.name for s in self.all_sizes()]
            if len(set(names)) != len(names):
                raise ValueError(f"size names must be unique, got {names}")
            budgets = self.token_budgets()
            if any(t < 1 for t in budgets) or len(set(budgets)) != len(budgets):
                raise ValueError(f"tokens must be positive and distinct, got {budgets}")
            if getattr(self.data, "eval_inputs", None) is not None:  # pretrain's held-out files (newer pretrain)
                raise ValueError("data.eval_inputs is not supported by the sweep (later runs reuse the first run's "
                                 "packed data, which has one folder); hold out documents with data.val_fraction")
            if self.probe is not None and self.objective.name != "clm":
                raise ValueError("the probe scores a decoder's log-likelihoods: set probe: null for objective "
                                 f"{self.objective.name!r}")
            return self

        def all_sizes(self) -> list[SizeSpec]:
            return self.grid.sizes() if self.grid is not None else list(self.sizes)

        def token_budgets(self) -> list[int]:
            return [self.tokens] if isinstance(self.tokens, int) else list(self.tokens)

    return ScalingConfig


def run(args: argparse.Namespace) -> int:
    cfg = load_training_config(config_class(), args)
    with claim(args, "scaling", cfg.output_dir, cfg):
        result = scaling(cfg, progress=not args.no_progress)
    print(_format_result(result))
    return 0


# ------------------------------------------------------------------------------------------------ plan


def _data_sections(cfg: Any, first_dir: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data and tokenizer sections of a run: the sweep's own for the first run (which tokenises and packs
    `data.inputs` into its OUT/tokenizer and OUT/data folders), and those folders for every later run."""
    data = cfg.data.model_dump(mode="json")
    tokenizer = cfg.tokenizer.model_dump(mode="json")
    if first_dir is None or cfg.data.packed is not None:
        return data, tokenizer
    shared = {"packed": str(first_dir / "data"), "seq_len": cfg.data.seq_len, "seed": cfg.data.seed}
    if cfg.tokenizer.train is not None:
        tokenizer = {"path": str(first_dir / "tokenizer")}
    return shared, tokenizer


def plan_runs(cfg: Any) -> list[tuple[str, Any]]:
    """(name, validated pre-training config) of every run of the sweep, smallest token budget first. The first
    run prepares the tokenizer and packed data; the others read them from its folder."""
    from lmcraft.stages.pretrain import config_class as pretrain_config

    budgets = cfg.token_budgets()
    per_step = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum * cfg.data.seq_len
    trainer = cfg.trainer.model_dump(mode="json")
    runs: list[tuple[str, Any]] = []
    first_dir: Path | None = None
    for tokens in budgets:
        steps = max(1, round(tokens / per_step))
        for size in cfg.all_sizes():
            name = size.name if len(budgets) == 1 else f"{size.name}-{_short(tokens)}"
            data, tokenizer = _data_sections(cfg, first_dir)
            run_trainer = {**trainer, "max_steps": steps, "eval_every": max(1, steps // cfg.curve_points),
                           **size.trainer}
            run_cfg = {
                "model": {"preset": cfg.model.preset, "overrides": {**cfg.model.overrides, **size.overrides}},
                "objective": cfg.objective.model_dump(mode="json"),
                "data": data,
                "tokenizer": tokenizer,
                "trainer": run_trainer,
                "samples": cfg.samples.model_dump(mode="json"),
                "output_dir": str(Path(cfg.output_dir) / "runs" / name),
            }
            runs.append((name, validate_config(pretrain_config(), run_cfg, f"scaling run {name}")))
            first_dir = first_dir or Path(run_cfg["output_dir"])
    return runs


# ------------------------------------------------------------------------------------------------ probe


def _probe_items(cfg: Any, first_run: Any, first_summary: dict[str, Any]) -> list[ClozeItem]:
    """Next-speaker items from the held-out documents (the evaluation split of the sweep's packed data, decoded)."""
    from lmcraft.data.datasets import PackedCorpus
    from lmcraft.scaling import speaker_cloze
    from lmcraft.tokenizer.load import load_tokenizer

    p = cfg.probe
    tok = load_tokenizer(first_summary["final"])  # the final folder holds the tokenizer files
    packed = Path(first_run.data.packed) if first_run.data.packed is not None else Path(first_run.output_dir) / "data"
    candidates = [packed.parent if packed.is_file() else packed, packed / "packed"]
    folder = next((c for c in candidates if (c / "index.json").is_file()), candidates[-1])
    corpus = PackedCorpus(folder, cfg.data.eval_split)
    texts = [tok.decode(corpus.tokens(d).tolist(), skip_special_tokens=True) for d in range(len(corpus))]
    items = speaker_cloze(texts, p.items, p.options, p.context_chars, p.seed)
    if len(items) < 10:
        raise ConfigError(f"the probe found {len(items)} next-speaker items in the {len(texts)} held-out documents "
                          f"of {folder} (split {cfg.data.eval_split!r}); it needs play scripts (a speaker line "
                          "such as 'HAMLET.' opening each speech), whole plays as documents (data.text_mode: "
                          "file) and enough held-out text (data.val_fraction). Set probe: null to skip it")
    return items


def _run_probe(cfg: Any, items: list[ClozeItem], model: Path | str, progress: bool,
               max_length: int | None = None) -> dict[str, Any]:
    """Accuracy of `model` on the items, with its 95% Wilson interval (contexts cut to `max_length` tokens)."""
    from lmcraft.evaluate import wilson_interval
    from lmcraft.prompting.model_lm import ModelLM
    from lmcraft.scaling import score_cloze

    lm = ModelLM.load(model, dtype="float32", batch_size=cfg.probe.batch_size, max_length=max_length,
                      progress=progress)
    picks = score_cloze(lm, items)
    correct = sum(int(p == it.answer) for p, it in zip(picks, items, strict=True))
    low, high = wilson_interval(correct, len(items))
    return {"task": "next_speaker", "items": len(items), "correct": correct, "accuracy": correct / len(items),
            "low": low, "high": high, "chance": 1.0 / cfg.probe.options}


# ------------------------------------------------------------------------------------------------ sweep


def _read_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, eval_loss) of every evaluation in the run's metrics.jsonl."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("split") == "eval" and "eval_loss" in rec:
            out.append((int(rec["step"]), float(rec["eval_loss"])))
    return out


def _row(cfg: Any, name: str, run_cfg: Any, summary: dict[str, Any], probe: dict[str, Any] | None) -> dict[str, Any]:
    from lmcraft.hub import load_config

    mcfg = load_config(Path(summary["final"]))
    t = run_cfg.trainer
    per_step = t.micro_batch_size * t.grad_accum * run_cfg.data.seq_len
    n = mcfg.num_parameters(include_embeddings=cfg.fit.embeddings)
    tokens = summary["steps"] * per_step
    run_dir = Path(run_cfg.output_dir)
    curve = [(step * per_step, loss) for step, loss in _read_curve(run_dir) if step > 0]
    return {
        "name": name,
        "hidden_size": mcfg.hidden_size,
        "num_layers": mcfg.num_layers,
        "params": n,
        "params_total": mcfg.num_parameters(include_embeddings=True),
        "tokens": tokens,
        "flops": 6.0 * n * tokens,
        "steps": summary["steps"],
        "eval_loss": summary["eval"].get("eval_loss"),
        "train_loss": summary["final_train_loss"],
        "seconds": summary["seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "curve": [{"tokens": d, "flops": 6.0 * n * d, "eval_loss": loss} for d, loss in curve],
        "probe": probe,
        "output_dir": str(run_dir),
    }


def scaling(cfg: Any, progress: bool = True) -> dict[str, Any]:
    """Run the sweep, fit, plot and report (see the module docstring); returns the content of scaling.json."""
    from lmcraft.io import write_json
    from lmcraft.stages.pretrain import pretrain

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    runs = plan_runs(cfg)
    items: list[ClozeItem] = []
    rows = []
    for k, (name, run_cfg) in enumerate(runs, 1):
        run_dir = Path(run_cfg.output_dir)
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            print(f"scaling: run {k}/{len(runs)} {name} finished before; skipped", file=sys.stderr)
        else:
            print(f"scaling: run {k}/{len(runs)} {name} ({run_cfg.trainer.max_steps} steps)", file=sys.stderr)
            summary = pretrain(run_cfg, progress=progress)
        probe = None
        if cfg.probe is not None:
            if k == 1:  # the first run made the data: the probe reads its held-out documents
                items = _probe_items(cfg, run_cfg, summary)
                write_json(out / "probe_items.json", [vars(it) for it in items])
            probe_path = run_dir / "probe.json"
            if probe_path.is_file():
                probe = json.loads(probe_path.read_text(encoding="utf-8"))
            else:
                probe = _run_probe(cfg, items, Path(summary["final"]), progress, max_length=cfg.data.seq_len)
                write_json(probe_path, probe)
        rows.append(_row(cfg, name, run_cfg, summary, probe))
    reference = None
    if cfg.probe is not None and cfg.probe.reference is not None:
        ref_path = out / "probe_reference.json"
        reference = json.loads(ref_path.read_text(encoding="utf-8")) if ref_path.is_file() else None
        wanted = min(cfg.probe.reference_items, len(items))
        if reference is None or (reference["model"], reference["items"]) != (cfg.probe.reference, wanted):
            print(f"scaling: probe reference {cfg.probe.reference}", file=sys.stderr)
            reference = {"model": cfg.probe.reference,
                         **_run_probe(cfg, items[:wanted], cfg.probe.reference, progress)}
            write_json(ref_path, reference)
    fits = _fit(cfg, rows)
    result = {"runs": rows, "fits": {k: v.to_dict() for k, v in fits.items() if not isinstance(v, str)},
              "not_fitted": {k: v for k, v in fits.items() if isinstance(v, str)}, "probe_reference": reference}
    if not isinstance(fits.get("NxD", ""), str):
        from lmcraft.scaling import compute_optimal

        top = max(r["flops"] for r in rows)
        n_opt, d_opt = compute_optimal(fits["NxD"], top)
        result["compute_optimal_at_max_flops"] = {"flops": top, "params": float(n_opt), "tokens": float(d_opt)}
    write_json(out / "scaling.json", result)
    _write_report(cfg, rows, fits, result)
    return result


# ------------------------------------------------------------------------------------------------ fits, report


def _fit(cfg: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each applicable law (module docstring) as a fit object, or the reason it was not fitted (a string)."""
    import numpy as np

    from lmcraft.scaling import FitError, fit_joint, fit_power_law, pareto_frontier

    f = cfg.fit
    opts = {"fit_loss": f.loss, "huber_delta": f.huber_delta, "bootstrap": f.bootstrap, "n_boot": f.n_boot,
            "level": f.level, "seed": f.seed}
    done = [r for r in rows if r["eval_loss"] is not None]
    n = np.array([r["params"] for r in done], dtype=float)
    d = np.array([r["tokens"] for r in done], dtype=float)
    loss = np.array([r["eval_loss"] for r in done], dtype=float)
    fits: dict[str, Any] = {}
    jobs: dict[str, Any] = {}
    if len(set(d)) == 1:
        jobs["N"] = lambda: fit_power_law(n, loss, variable="N", **opts)
    elif len(set(n)) == 1:
        jobs["D"] = lambda: fit_power_law(d, loss, variable="D", **opts)
    else:
        jobs["NxD"] = lambda: fit_joint(n, d, loss, **opts)
    points = [(p["flops"], p["eval_loss"]) for r in done for p in r["curve"]]
    if points:
        c, y = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        keep = pareto_frontier(c, y)
        jobs["C"] = lambda: fit_power_law(c[keep], y[keep], variable="C", **opts)
    for key, job in jobs.items():
        try:
            fits[key] = job()
        except FitError as err:
            fits[key] = str(err)
    return fits


def _write_report(cfg: Any, rows: list[dict[str, Any]], fits: dict[str, Any], result: dict[str, Any]) -> None:
    """OUT/scaling.png, OUT/report.md + report.html, and NAME.md + NAME.png in `report.publish_dir`."""
    from lmcraft.scaling import LossCurve, TaskPoints, plot_scaling

    out = Path(cfg.output_dir)
    done = [r for r in rows if r["eval_loss"] is not None]
    good = {k: v for k, v in fits.items() if not isinstance(v, str)}
    n_label = "parameters N" + ("" if cfg.fit.embeddings else " (non-embedding)")
    task = None
    probed = [r for r in done if r["probe"]]
    if probed:
        pr = [r["probe"] for r in probed]
        by_flops = len({r["tokens"] for r in probed}) > 1  # a data sweep: sizes repeat, so compute is the scale
        task = TaskPoints(
            "next-speaker accuracy",
            [r["flops"] if by_flops else r["params"] for r in probed],
            [p["accuracy"] for p in pr],
            [p["low"] for p in pr],
            [p["high"] for p in pr],
            pr[0]["chance"],
            "training compute C (FLOPs)" if by_flops else n_label,
            _reference_line(result.get("probe_reference")),
        )
    png = plot_scaling(
        out / "scaling.png",
        n_params=[r["params"] for r in done],
        loss=[r["eval_loss"] for r in done],
        tokens=[r["tokens"] for r in done],
        fit_n=good.get("N"),
        fit_nd=good.get("NxD"),
        curves=[LossCurve(r["name"], [p["flops"] for p in r["curve"]], [p["eval_loss"] for p in r["curve"]])
                for r in done],
        fit_c=good.get("C"),
        task=task,
        title=cfg.report.title,
        n_label=n_label,
    )
    _report(cfg, done, fits, result, task, png).write(out / "report.md", out / "report.html")
    if cfg.report.publish_dir is not None:
        pub = Path(cfg.report.publish_dir)
        pub.mkdir(parents=True, exist_ok=True)
        target = pub / f"{cfg.report.name}.png"
        tmp = pub / f".{cfg.report.name}.png.tmp"
        shutil.copyfile(png, tmp)
        tmp.replace(target)
        _report(cfg, done, fits, result, task, target).write(pub / f"{cfg.report.name}.md")


def _reference_line(reference: dict[str, Any] | None) -> tuple[str, float, float, float] | None:
    if reference is None:
        return None
    return (f"{reference['model']} ({reference['items']} items)", reference["accuracy"], reference["low"],
            reference["high"])


def _report(cfg: Any, done: list[dict[str, Any]], fits: dict[str, Any], result: dict[str, Any],
            task: TaskPoints | None, png: Path) -> Report:
    from lmcraft.report import Report
    from lmcraft.scaling import first_above_chance

    good = {k: v for k, v in fits.items() if not isinstance(v, str)}
    embed = "including" if cfg.fit.embeddings else "excluding"
    rep = Report(cfg.report.title)
    rep.text(f"{len(done)} pre-training runs ({cfg.objective.name}), sequence length {cfg.data.seq_len}; "
             f"N = parameters {embed} embeddings, D = training tokens, C = 6ND. Loss: final evaluation loss "
             "(nats/token) on the held-out split.")
    rep.section("Runs")
    headers = ["run", "width", "depth", "N", "N (total)", "D", "C (FLOPs)", "eval loss", "seconds"]
    table = [[r["name"], r["hidden_size"], r["num_layers"], r["params"], r["params_total"], r["tokens"],
              f"{r['flops']:.3g}", r["eval_loss"], r["seconds"]] for r in done]
    if task is not None:
        headers.append("next-speaker acc. [95% CI]")
        for row, r in zip(table, done, strict=True):
            p = r["probe"]
            row.append(f"{p['accuracy']:.3f} [{p['low']:.3f}, {p['high']:.3f}]" if p else "")
    rep.table(headers, table)
    total = sum(r["seconds"] for r in done)
    rep.text(f"Wall-clock time of the {len(done)} runs together: {total / 60:.1f} minutes (`seconds`: each "
             "pre-training run from start to saved model, without the probe).")
    rep.section("Fits")
    rows_fit = [[fit.to_dict()["law"], name, f"{getattr(fit, name):.4g}", f"[{lo:.4g}, {hi:.4g}]"]
                for fit in good.values() for name, (lo, hi) in fit.ci.items()]
    if rows_fit:
        rep.text(f"Least squares ({cfg.fit.loss}) on log loss; {cfg.fit.bootstrap} bootstrap with {cfg.fit.n_boot} "
                 f"refits, {cfg.fit.level:.0%} percentile intervals. L(C) is fitted on the compute frontier of every "
                 "run's evaluation points. The intervals do not include seed-to-seed variation.")
        rep.table(["law", "parameter", "estimate", "interval"], rows_fit)
    for key, reason in fits.items():
        if isinstance(reason, str):
            rep.text(f"L({key}) not fitted: {reason}.")
    if "compute_optimal_at_max_flops" in result:
        co = result["compute_optimal_at_max_flops"]
        rep.text(f"Compute-optimal split at C = {co['flops']:.3g} FLOPs: N = {co['params']:.3g}, "
                 f"D = {co['tokens']:.3g}.")
    rep.image(png, "loss vs compute, loss vs parameters (fit and bootstrap band), capability vs scale")
    if task is not None:
        probe = next(r["probe"] for r in done if r["probe"])
        onset = first_above_chance(task.x, task.low, task.chance or 0.0)
        where = f"from {task.xlabel} = {onset:,.0f}" if onset is not None else "at none of the scales"
        rep.section("Capability: who speaks next")
        rep.text(f"{probe['items']} next-speaker items from the held-out plays, {cfg.probe.options} options each "
                 f"(chance {probe['chance']:.2f}): the true speaker, who always appears in the context, the other "
                 "speakers of the context, and other speakers of the play; the model picks by log-likelihood. The "
                 f"lower end of the 95% Wilson interval is above chance {where}.")
        ref = result.get("probe_reference")
        if ref is not None:
            rep.text(f"Reference: the pretrained `{ref['model']}` scores {ref['accuracy']:.3f} "
                     f"[{ref['low']:.3f}, {ref['high']:.3f}] on the first {ref['items']} items (dashed line).")
    return rep


def _format_result(result: dict[str, Any]) -> str:
    lines = ["scaling sweep:"]
    for r in result["runs"]:
        probe = f", next-speaker accuracy {r['probe']['accuracy']:.3f}" if r["probe"] else ""
        lines.append(f"  {r['name']}: N = {r['params']:,}, D = {r['tokens']:,}, eval loss {r['eval_loss']:.4f}{probe}")
    for fit in result["fits"].values():
        ci = ", ".join(f"{k} {fit[k]:.4g} [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in fit["ci"].items())
        lines.append(f"  {fit['law']}: {ci}")
    for key, reason in result["not_fitted"].items():
        lines.append(f"  L({key}) not fitted: {reason}")
    ref = result["probe_reference"]
    if ref is not None:
        lines.append(f"  reference {ref['model']}: next-speaker accuracy {ref['accuracy']:.3f} on {ref['items']} items")
    return "\n".join(lines)
