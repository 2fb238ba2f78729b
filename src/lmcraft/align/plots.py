"""Curves of alignment runs as PNG: PPO's rollout statistics, SFT-style loss curves, any logged metric by step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcraft.io import save_figure

__all__ = ["plot_dpo", "plot_metrics", "plot_ppo", "plot_training"]


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def _figure(panels: int, columns: int = 3) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.axis("off")
    return fig, flat[:panels]


def plot_ppo(rollouts: Sequence[dict[str, float]], history: Sequence[dict[str, Any]], steps_per_rollout: int,
             path: Path, title: str = "PPO", start_score: float | None = None) -> None:
    """Score (rollouts; held-out evaluations, from `start_score` at 0), KL and beta, entropy, clip fraction, value
    and policy loss per rollout."""
    x = [r["rollout"] + 1 for r in rollouts]
    train = [r for r in history if r["split"] == "train"]
    evals = [(r["step"] / steps_per_rollout, r["eval_score"]) for r in history
             if r["split"] == "eval" and "eval_score" in r]
    if start_score is not None:
        evals.insert(0, (0.0, start_score))
    tx = [r["step"] / steps_per_rollout for r in train]
    fig, axes = _figure(6)
    axes[0].plot(x, [r["score"] for r in rollouts], label="reward of rollouts")
    axes[0].set_ylabel("reward", color="C0")
    if evals:
        ax_eval = axes[0].twinx()
        ax_eval.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="C1")
        ax_eval.set_ylabel("held-out score", color="C1")
    axes[1].plot(x, [r["kl"] for r in rollouts])
    betas = [r["beta"] for r in rollouts]
    if max(betas) > min(betas):  # adaptive KL coefficient
        ax_beta = axes[1].twinx()
        ax_beta.plot(x, betas, color="C1")
        ax_beta.set_ylabel("beta", color="C1")
    axes[2].plot(x, [r["entropy"] for r in rollouts])
    for ax, key, name in ((axes[3], "clip_fraction", "clip fraction"), (axes[4], "value_loss", "value loss"),
                          (axes[5], "policy_loss", "policy loss")):
        ax.plot(tx, [r.get(key, float("nan")) for r in train])
        ax.set(title=name, xlabel="rollout")
    for ax, name in ((axes[0], "reward / score"), (axes[1], "KL(pi || ref) per answer (nats)"),
                     (axes[2], "entropy (nats/token)")):
        ax.set(title=name, xlabel="rollout")
    fig.suptitle(title)
    _save(fig, path)


def plot_metrics(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str = "",
                 xlabel: str = "step") -> None:
    """One panel per named (x, y) series."""
    fig, axes = _figure(len(series), columns=2 if len(series) == 4 else min(3, len(series)))
    for ax, (name, (xs, ys)) in zip(axes, series.items(), strict=True):
        ax.plot(xs, ys, "o-" if len(xs) < 15 else "-")
        ax.set(title=name, xlabel=xlabel)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_training(history: Sequence[dict[str, Any]], path: Path, title: str = "", start_eval: float | None = None,
                  window: int = 5) -> None:
    """Train loss per step with its `window`-step moving average, and the evaluation loss (from `start_eval`, the
    start model's, at step 0), next to the learning rate."""
    train = [r for r in history if r["split"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in history if r["split"] == "eval" and "eval_loss" in r]
    if start_eval is not None:
        evals.insert(0, (0, start_eval))
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
              for i in range(len(losses))]
    fig, axes = _figure(2, columns=2)
    axes[0].plot(steps, losses, color="C0", alpha=0.35, label="train (per step)")
    axes[0].plot(steps, smooth, color="C0", label=f"train ({window}-step mean)")
    if evals:
        axes[0].plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="C1", label="held-out")
    axes[0].set(title="loss (assistant tokens)", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train], color="C2")
    axes[1].set(title="learning rate", xlabel="step")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_dpo(history: Sequence[dict[str, Any]], start_score: float | None, path: Path,
             start_eval: dict[str, float] | None = None, title: str = "DPO") -> None:
    """Train loss and implicit-reward margin, held-out reward accuracy (from `start_eval`, the start model's, at
    step 0), and the held-out score (from the start). KTO: the held-out answers on their label's side, and where it
    was trained on pairs the held-out pairs' reward accuracy (`eval_pair_reward_accuracy`)."""
    train = [r for r in history if r["split"] == "train"]
    evals = [r for r in history if r["split"] == "eval"]
    series = {f"{title} loss (train)": ([r["step"] for r in train], [r["loss"] for r in train]),
              "reward margin (train)": ([r["step"] for r in train], [r["reward_margin"] for r in train])}
    unpaired = title == "KTO"
    names = {"eval_reward_accuracy": "held-out answers on their label's side" if unpaired else
             "reward accuracy (held-out pairs)", "eval_pair_reward_accuracy": "reward accuracy (held-out pairs)"}
    for key, name in names.items():
        accuracy = [(r["step"], r[key]) for r in evals if key in r]
        if accuracy and start_eval and key in start_eval:
            accuracy.insert(0, (0, start_eval[key]))
        if accuracy:
            series[name] = ([s for s, _ in accuracy], [v for _, v in accuracy])
    scored = [(r["step"], r["eval_score"]) for r in evals if "eval_score" in r]
    if scored:
        scored.insert(0, (0, start_score))
        series["held-out score (sampled answers)"] = ([s for s, _ in scored], [v for _, v in scored])
    plot_metrics(series, path, title)
