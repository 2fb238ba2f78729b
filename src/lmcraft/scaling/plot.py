"""The scaling figure: loss vs compute (every run's curve and the L(C) fit), loss vs parameters (with the L(N)
or L(N, D) fit and its bootstrap band), and a capability metric vs scale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmcraft.io import save_figure
from lmcraft.scaling.laws import JointFit, PowerLawFit, first_above_chance

__all__ = ["LossCurve", "TaskPoints", "plot_scaling"]

@dataclass
class LossCurve:
    """One run's evaluation loss against training compute (FLOPs), labelled for the legend."""

    label: str
    compute: Sequence[float]
    loss: Sequence[float]


@dataclass
class TaskPoints:
    """A task metric per run at scale `x` (parameters, or compute), with interval (low, high), the chance level, and
    optionally a reference model's score drawn across the panel: (label, value, low, high)."""

    name: str
    x: Sequence[float]
    value: Sequence[float]
    low: Sequence[float]
    high: Sequence[float]
    chance: float | None = None
    xlabel: str = "parameters N"
    reference: tuple[str, float, float, float] | None = None


def _fmt_ci(fit: PowerLawFit | JointFit, name: str) -> str:
    lo, hi = fit.ci[name]
    return f"{getattr(fit, name):.3f} [{lo:.3f}, {hi:.3f}]"


def plot_scaling(
    path: str | Path,
    *,
    n_params: Sequence[float],
    loss: Sequence[float],
    tokens: Sequence[float] | None = None,
    fit_n: PowerLawFit | None = None,
    fit_nd: JointFit | None = None,
    curves: Sequence[LossCurve] = (),
    fit_c: PowerLawFit | None = None,
    task: TaskPoints | None = None,
    title: str = "",
    n_label: str = "parameters N",
    dpi: int = 100,
) -> Path:
    """Panels on log axes, saved as PNG (atomically): loss vs compute (every run's evaluation curve, the frontier
    and its fit), loss vs parameters (final losses, the fitted law with its bootstrap band), and, given `task`,
    the task metric vs scale with its intervals and chance level. `curves[k]` belongs to run k (same colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    def log_axes(ax: Any, log_y: bool = True) -> None:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(which="both", alpha=0.25)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_arr, y = np.asarray(n_params, dtype=float), np.asarray(loss, dtype=float)
    panels = 1 + bool(curves) + (task is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 4.2))
    axes = list(np.atleast_1d(axes))
    cmap = plt.get_cmap("viridis")
    order = np.argsort(n_arr)
    colour = {int(i): cmap(k / max(1, len(order) - 1)) for k, i in enumerate(order)}

    if curves:
        ax = axes.pop(0)
        all_c, all_l = [], []
        for k, curve in enumerate(curves):
            ax.plot(curve.compute, curve.loss, lw=1.2, alpha=0.85, color=colour.get(k, "C0"), label=curve.label)
            all_c += list(curve.compute)
            all_l += list(curve.loss)
        if fit_c is not None:
            grid = np.geomspace(min(fit_c.x), max(fit_c.x), 100)
            ax.scatter(fit_c.x, fit_c.loss, s=10, color="k", zorder=3, label="frontier")
            ax.plot(grid, fit_c.predict(grid), "k--", lw=1.5, label=f"fit: alpha_C = {_fmt_ci(fit_c, 'alpha')}")
        log_axes(ax)
        ax.set_xlabel("training compute C = 6ND (FLOPs)")
        ax.set_ylabel("evaluation loss (nats/token)")
        ax.set_title("loss vs compute")
        ax.legend(fontsize=7)

    ax = axes.pop(0)
    grid = np.geomspace(n_arr.min() / 1.3, n_arr.max() * 1.3, 100)
    if fit_nd is not None and tokens is not None:
        d_arr = np.asarray(tokens, dtype=float)
        for k, d in enumerate(np.unique(d_arr)):
            sel = d_arr == d
            ax.scatter(n_arr[sel], y[sel], color=f"C{k}", zorder=3, label=f"D = {d:.3g} tokens")
            ax.plot(grid, fit_nd.predict(grid, d), "--", color=f"C{k}", lw=1.2)
        ax.set_title(f"L(N, D): alpha = {_fmt_ci(fit_nd, 'alpha')}, beta = {_fmt_ci(fit_nd, 'beta')}", fontsize=9)
    else:
        ax.scatter(n_arr, y, color=[colour[int(i)] for i in range(len(n_arr))], zorder=3, label="runs")
        if fit_n is not None:
            lo, hi = fit_n.band(grid)
            ax.fill_between(grid, lo, hi, color="C1", alpha=0.2, label=f"{fit_n.level:.0%} bootstrap band")
            ax.plot(grid, fit_n.predict(grid), "--", color="C1", label=f"E + A/N^alpha, E = {fit_n.E:.3g}")
            ax.set_title(f"L(N): alpha = {_fmt_ci(fit_n, 'alpha')}", fontsize=10)
    log_axes(ax)
    ax.set_xlabel(n_label)
    ax.set_ylabel("final evaluation loss (nats/token)")
    ax.legend(fontsize=7)

    if task is not None:
        ax = axes.pop(0)
        value = np.asarray(task.value, dtype=float)
        err = np.clip([value - np.asarray(task.low, dtype=float), np.asarray(task.high, dtype=float) - value], 0, None)
        ax.errorbar(task.x, value, yerr=err, fmt="o-", capsize=3, color="C2", label=task.name)
        if task.chance is not None:
            ax.axhline(task.chance, color="grey", ls=":", label=f"chance ({task.chance:.3g})")
            onset = first_above_chance(task.x, task.low, task.chance)
            if onset is not None:
                ax.axvline(onset, color="C3", ls="--", lw=1, label=f"above chance from {onset:.3g}")
        if task.reference is not None:
            label, ref, ref_low, ref_high = task.reference
            ax.axhline(ref, color="C4", ls="--", lw=1.2, label=f"{label}: {ref:.3g}")
            ax.axhspan(ref_low, ref_high, color="C4", alpha=0.12)
        log_axes(ax, log_y=False)
        ax.set_xlabel(task.xlabel)
        ax.set_ylabel(task.name)
        ax.set_title("capability vs scale")
        ax.legend(fontsize=7)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
    return path
