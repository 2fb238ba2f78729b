"""The sweep's report: OUT/scaling.png, OUT/report.md + report.html (runs, fits with intervals, the
compute-optimal split, the capability probe), NAME.md + NAME.png in `report.publish_dir`, and the console
summary (`format_result`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcraft.io import write_bytes
from lmcraft.report import Report
from lmcraft.scaling.laws import first_above_chance
from lmcraft.scaling.plot import LossCurve, TaskPoints, plot_scaling
from lmcraft.scaling.sections import FitSection, ProbeSection, ReportSection
from lmcraft.scaling.sweep import Fits

__all__ = ["SweepDescription", "format_result", "write_report"]


@dataclass
class SweepDescription:
    """What the report says about the sweep besides its runs: folder, objective, sequence length, settings."""

    out: Path
    objective: str
    seq_len: int
    fit: FitSection
    report: ReportSection
    probe: ProbeSection | None


def write_report(desc: SweepDescription, rows: list[dict[str, Any]], fits: Fits, result: dict[str, Any]) -> None:
    """OUT/scaling.png, OUT/report.md + report.html, and NAME.md + NAME.png in `report.publish_dir`."""
    out = Path(desc.out)
    done = [r for r in rows if r["eval_loss"] is not None]
    good = {k: v for k, v in fits.items() if not isinstance(v, str)}
    n_label = "parameters N" + ("" if desc.fit.embeddings else " (non-embedding)")
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
        title=desc.report.title,
        n_label=n_label,
    )
    _report(desc, done, fits, result, task, png).write(out / "report.md", out / "report.html")
    if desc.report.publish_dir is not None:
        pub = Path(desc.report.publish_dir)
        target = pub / f"{desc.report.name}.png"
        write_bytes(target, png.read_bytes())
        _report(desc, done, fits, result, task, target).write(pub / f"{desc.report.name}.md")


def _reference_line(reference: dict[str, Any] | None) -> tuple[str, float, float, float] | None:
    if reference is None:
        return None
    return (f"{reference['model']} ({reference['items']} items)", reference["accuracy"], reference["low"],
            reference["high"])


def _report(desc: SweepDescription, done: list[dict[str, Any]], fits: Fits, result: dict[str, Any],
            task: TaskPoints | None, png: Path) -> Report:
    good = {k: v for k, v in fits.items() if not isinstance(v, str)}
    embed = "including" if desc.fit.embeddings else "excluding"
    rep = Report(desc.report.title)
    rep.text(f"{len(done)} pre-training runs ({desc.objective}), sequence length {desc.seq_len}; "
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
        rep.text(f"Least squares ({desc.fit.loss}) on log loss; {desc.fit.bootstrap} bootstrap with {desc.fit.n_boot} "
                 f"refits, {desc.fit.level:.0%} percentile intervals. L(C) is fitted on the compute frontier of every "
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
        rep.text(f"{probe['items']} next-speaker items from the held-out plays, {desc.probe.options} options each "
                 f"(chance {probe['chance']:.2f}): the true speaker, who always appears in the context, the other "
                 "speakers of the context, and other speakers of the play; the model picks by log-likelihood. The "
                 f"lower end of the 95% Wilson interval is above chance {where}.")
        ref = result.get("probe_reference")
        if ref is not None:
            rep.text(f"Reference: the pretrained `{ref['model']}` scores {ref['accuracy']:.3f} "
                     f"[{ref['low']:.3f}, {ref['high']:.3f}] on the first {ref['items']} items (dashed line).")
    return rep


def format_result(result: dict[str, Any]) -> str:
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
