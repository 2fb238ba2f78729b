"""Scaling laws: fit loss against model size, data and compute, with bootstrap confidence intervals.

Laws (N: parameters, D: training tokens, C: training FLOPs, L: evaluation loss in nats per token):

- one variable (Kaplan et al. 2020):  L(x) = E + A / x^alpha,  for x = N, D or C;
- model size and data (Hoffmann et al. 2022, "Chinchilla"):  L(N, D) = E + A / N^alpha + B / D^beta;
- training compute of a dense transformer:  C = 6 N D  (forward 2ND + backward 4ND multiply-adds);
- compute-optimal allocation under C = 6ND from the joint law (Chinchilla, approach 3):
  N_opt(C) = G (C/6)^(beta/(alpha+beta)),  D_opt(C) = (C/6) / N_opt,  G = (alpha A / (beta B))^(1/(alpha+beta)).

Fitting is done in log space, as Chinchilla does: with u = ln(x/x0) (x0 = geometric mean of the data, which keeps
the problem well conditioned), E = e^e, A' = e^a (A = A' x0^alpha),

    ln L_hat = logsumexp(e, a - alpha u)        [joint: logsumexp(e, a - alpha u, b - beta v)]

and the parameters minimise sum_i rho(ln L_hat_i - ln L_i), rho = squared error (`loss="linear"`) or the Huber
loss with threshold `huber_delta` (`loss="huber"`). scipy's trust-region least squares runs from a small grid of
starting points (the law is not convex in alpha) and keeps the best; exponents are bounded to [0, 5].

Confidence intervals are percentile bootstrap intervals:

- `residual` (default; fits with few points): refit on ln L*_i = ln L_hat_i + r*_i, where r* is drawn with
  replacement from the centred residuals inflated by sqrt(n / (n - p)) for the p fitted parameters;
- `pairs`: refit on points drawn with replacement (redrawn until at least p + 1 distinct points).

With n points and p parameters the fit needs n >= p + 1. With few points the intervals are only as good as
the residuals are representative; they do not include run-to-run (seed) variation.

`pareto_frontier` keeps the (compute, loss) points that no cheaper point beats: the L(C) frontier of Kaplan et al.
fitted from the evaluation points of every run's training curve (runs with a decaying learning rate reach their
best loss only at the end, so the intermediate points sit slightly above a run trained to that compute).
`first_above_chance` is where a capability "appears": the smallest scale whose metric's lower confidence bound is
above chance.

Capability probe (`speaker_cloze`, `score_cloze`): in a play script each speech is a paragraph whose first line
names the speaker ("HELENA." / "Ham."). Given the text before a speech (up to `context_chars` characters, cut at a
paragraph start, ending with the blank line), the model picks who speaks next among `n_options` names: the true
speaker, the other speakers seen in the context, and other speakers of the same play. The true speaker always
appears in the context, so the task rewards reading the dialogue (copying a name from the context, and the
turn-taking pattern) over name frequencies; chance is 1/n_options. An item's prediction is
argmax_k sum_t log p(option_k,t | context, option_k,<t) (log-likelihood of the whole option).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmcraft.io import save_figure

__all__ = [
    "ClozeItem",
    "FitError",
    "JointFit",
    "LossCurve",
    "PowerLawFit",
    "TaskPoints",
    "compute_optimal",
    "first_above_chance",
    "fit_joint",
    "fit_power_law",
    "pareto_frontier",
    "plot_scaling",
    "score_cloze",
    "speaker_cloze",
    "training_flops",
]

Bootstrap = Literal["residual", "pairs"]
LossKind = Literal["linear", "huber"]
_MAX_EXPONENT = 5.0


class FitError(ValueError):
    """Too few or invalid points for a fit."""


def training_flops(n_params: float | np.ndarray, tokens: float | np.ndarray) -> float | np.ndarray:
    """C = 6 N D: training FLOPs of a dense transformer with N parameters on D tokens."""
    return 6.0 * np.asarray(n_params, dtype=float) * np.asarray(tokens, dtype=float)


def _check(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise FitError(f"{name} must be a 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise FitError(f"{name} must be finite and positive, got {arr.tolist()}")
    return arr


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


# ------------------------------------------------------------------------------------------------ least squares
def _terms(theta: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """The law's terms in log space, shape (1 + m, n): e, then a_k - gamma_k * feats[:, k] for each of m variables
    (theta = (e, a_1, gamma_1, ..., a_m, gamma_m))."""
    rows = [np.full(len(feats), theta[0])]
    rows += [theta[1 + 2 * k] - theta[2 + 2 * k] * feats[:, k] for k in range(feats.shape[1])]
    return np.stack(rows)


def _log_law(theta: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """ln L_hat = logsumexp of the terms."""
    from scipy.special import logsumexp

    return logsumexp(_terms(theta, feats), axis=0)


def _jacobian(theta: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """d ln L_hat / d theta: with softmax weights w_j of the terms, w_0 for e, w_k for a_k, -feats_k w_k for gamma_k."""
    from scipy.special import softmax

    w = softmax(_terms(theta, feats), axis=0)
    jac = np.empty((len(feats), len(theta)))
    jac[:, 0] = w[0]
    for k in range(feats.shape[1]):
        jac[:, 1 + 2 * k] = w[k + 1]
        jac[:, 2 + 2 * k] = -feats[:, k] * w[k + 1]
    return jac


def _least_squares(
    feats: np.ndarray,
    target: np.ndarray,
    starts: Sequence[np.ndarray],
    lower: np.ndarray,
    upper: np.ndarray,
    loss: LossKind,
    huber_delta: float,
) -> np.ndarray:
    """argmin_theta sum rho(ln L_hat(theta) - target) over several starting points (scipy TRF, bounded)."""
    from scipy.optimize import least_squares

    best, best_cost = None, math.inf
    for x0 in starts:
        x0 = np.clip(x0, lower + 1e-9, upper - 1e-9)
        res = least_squares(
            lambda th: _log_law(th, feats) - target,
            x0,
            jac=lambda th: _jacobian(th, feats),
            bounds=(lower, upper),
            method="trf",
            loss=loss,
            f_scale=huber_delta,
        )
        if np.all(np.isfinite(res.x)) and res.cost < best_cost:
            best, best_cost = res.x, res.cost
    if best is None:
        raise FitError("the least-squares fit did not converge from any starting point")
    return best


def _fit_law(
    feats: np.ndarray,
    log_y: np.ndarray,
    starts: Sequence[np.ndarray],
    method: Bootstrap,
    n_boot: int,
    seed: int,
    distinct_key: np.ndarray,
    loss: LossKind,
    huber_delta: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(theta, ln L_hat at the points, bootstrap draws of theta, one row each); see the module docstring.

    Bootstrap refits start from the point estimate; `pairs` redraws a resample until it has more than p distinct
    `distinct_key` rows (the points' coordinates).
    """
    p = feats.shape[1] * 2 + 1
    lower = np.array([-np.inf] + [-np.inf, 0.0] * feats.shape[1])
    upper = np.array([np.inf] + [np.inf, _MAX_EXPONENT] * feats.shape[1])
    theta = _least_squares(feats, log_y, starts, lower, upper, loss, huber_delta)
    log_fit = _log_law(theta, feats)
    rng = np.random.default_rng(seed)
    n = len(log_y)
    resid = log_y - log_fit
    resid = (resid - resid.mean()) * math.sqrt(n / (n - p))
    draws = np.empty((n_boot, p))
    for b in range(n_boot):
        if method == "residual":
            idx, target = np.arange(n), log_fit + rng.choice(resid, size=n, replace=True)
        else:
            while True:
                idx = rng.integers(0, n, size=n)
                if len(np.unique(distinct_key[idx], axis=0)) > p:
                    break
            target = log_y[idx]
        draws[b] = _least_squares(feats[idx], target, [theta], lower, upper, loss, huber_delta)
    return theta, log_fit, draws


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------ one variable
@dataclass
class PowerLawFit:
    """L(x) = E + A / x^alpha fitted to (x, loss); `ci[name] = (low, high)` for E, A, alpha at `level`."""

    variable: str
    E: float
    A: float
    alpha: float
    x: np.ndarray
    loss: np.ndarray
    ci: dict[str, tuple[float, float]]
    level: float
    rmse_log: float  # sqrt(mean (ln L_hat - ln L)^2) on the fitted points
    samples: np.ndarray = field(repr=False)  # bootstrap draws of (E, A, alpha), one row each

    def predict(self, x: float | np.ndarray) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** (-self.alpha)

    def band(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise `level` interval of the fitted curve at x, from the bootstrap draws."""
        x = np.asarray(x, dtype=float)
        curves = self.samples[:, :1] + self.samples[:, 1:2] * x[None, :] ** (-self.samples[:, 2:3])
        tail = (1.0 - self.level) / 2.0 * 100.0
        lo, hi = np.percentile(curves, [tail, 100.0 - tail], axis=0)
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        return {
            "law": f"L({self.variable}) = E + A / {self.variable}^alpha",
            "variable": self.variable,
            "E": self.E,
            "A": self.A,
            "alpha": self.alpha,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "level": self.level,
            "n_points": len(self.x),
            "n_boot": len(self.samples),
            "rmse_log": self.rmse_log,
        }


def fit_power_law(
    x: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    *,
    variable: str = "N",
    fit_loss: LossKind = "linear",
    huber_delta: float = 1e-3,
    bootstrap: Bootstrap = "residual",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PowerLawFit:
    """Fit L(x) = E + A / x^alpha in log space (see the module docstring) with bootstrap intervals."""
    x_arr, y = _check(variable, x), _check("loss", loss)
    if len(x_arr) != len(y):
        raise FitError(f"{variable} has {len(x_arr)} values but loss has {len(y)}")
    if len(np.unique(x_arr)) < 4:
        raise FitError(f"L({variable}) has 3 parameters: fitting it needs at least 4 distinct {variable} values")
    x0 = _geomean(x_arr)
    u, log_y = np.log(x_arr / x0), np.log(y)
    ymin = float(y.min())
    starts = [
        np.array([math.log(frac * ymin), math.log(max(float(np.exp(log_y.mean())) - frac * ymin, 1e-6)), alpha])
        for frac in (0.1, 0.5, 0.9)
        for alpha in (0.1, 0.3, 0.7, 1.5)
    ]
    theta, log_fit, draws = _fit_law(
        u[:, None], log_y, starts, bootstrap, n_boot, seed, x_arr[:, None], fit_loss, huber_delta
    )

    def natural(t: np.ndarray) -> np.ndarray:  # (e, a', alpha) -> (E, A, alpha)
        t = np.atleast_2d(t)
        return np.stack([np.exp(t[:, 0]), np.exp(t[:, 1]) * x0 ** t[:, 2], t[:, 2]], axis=1)

    nat, samples = natural(theta)[0], natural(draws)
    ci = {name: _interval(samples[:, k], level) for k, name in enumerate(("E", "A", "alpha"))}
    return PowerLawFit(
        variable,
        float(nat[0]),
        float(nat[1]),
        float(nat[2]),
        x_arr,
        y,
        ci,
        level,
        float(np.sqrt(np.mean((log_fit - log_y) ** 2))),
        samples,
    )


# ------------------------------------------------------------------------------------------------ N and D
@dataclass
class JointFit:
    """L(N, D) = E + A / N^alpha + B / D^beta; `ci[name] = (low, high)` for E, A, alpha, B, beta."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    ci: dict[str, tuple[float, float]]
    level: float
    rmse_log: float
    samples: np.ndarray = field(repr=False)  # bootstrap draws of (E, A, alpha, B, beta)

    def predict(self, n: float | np.ndarray, d: float | np.ndarray) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A * n ** (-self.alpha) + self.B * d ** (-self.beta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "law": "L(N, D) = E + A / N^alpha + B / D^beta",
            "E": self.E,
            "A": self.A,
            "alpha": self.alpha,
            "B": self.B,
            "beta": self.beta,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "level": self.level,
            "n_points": len(self.n),
            "n_boot": len(self.samples),
            "rmse_log": self.rmse_log,
        }


def fit_joint(
    n_params: Sequence[float] | np.ndarray,
    tokens: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    *,
    fit_loss: LossKind = "linear",
    huber_delta: float = 1e-3,
    bootstrap: Bootstrap = "residual",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> JointFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta in log space with bootstrap intervals (module docstring)."""
    n_arr, d_arr, y = _check("N", n_params), _check("D", tokens), _check("loss", loss)
    if not len(n_arr) == len(d_arr) == len(y):
        raise FitError(f"N, D and loss must have the same length, got {len(n_arr)}, {len(d_arr)}, {len(y)}")
    if len(np.unique(n_arr)) < 2 or len(np.unique(d_arr)) < 2 or len(y) < 6:
        raise FitError("L(N, D) has 5 parameters: it needs at least 6 runs over at least 2 sizes and 2 token budgets")
    n0, d0 = _geomean(n_arr), _geomean(d_arr)
    u, v, log_y = np.log(n_arr / n0), np.log(d_arr / d0), np.log(y)
    ymin = float(y.min())
    starts = []
    for frac in (0.2, 0.6, 0.9):
        rest = math.log(max(float(np.exp(log_y.mean())) - frac * ymin, 1e-6) / 2)
        for alpha in (0.2, 0.6, 1.2):
            for beta in (0.2, 0.6, 1.2):
                starts.append(np.array([math.log(frac * ymin), rest, alpha, rest, beta]))
    keys = np.stack([n_arr, d_arr], axis=1)
    theta, log_fit, draws = _fit_law(
        np.stack([u, v], axis=1), log_y, starts, bootstrap, n_boot, seed, keys, fit_loss, huber_delta
    )

    def natural(t: np.ndarray) -> np.ndarray:
        t = np.atleast_2d(t)
        return np.stack(
            [np.exp(t[:, 0]), np.exp(t[:, 1]) * n0 ** t[:, 2], t[:, 2], np.exp(t[:, 3]) * d0 ** t[:, 4], t[:, 4]],
            axis=1,
        )

    nat, samples = natural(theta)[0], natural(draws)
    names = ("E", "A", "alpha", "B", "beta")
    ci = {name: _interval(samples[:, k], level) for k, name in enumerate(names)}
    return JointFit(
        *(float(v) for v in nat),
        n_arr,
        d_arr,
        y,
        ci,
        level,
        float(np.sqrt(np.mean((log_fit - log_y) ** 2))),
        samples,
    )


def compute_optimal(fit: JointFit, flops: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) minimising the fitted L(N, D) subject to 6 N D = C (module docstring)."""
    c = np.asarray(flops, dtype=float)
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / (fit.alpha + fit.beta))
    n_opt = g * (c / 6.0) ** (fit.beta / (fit.alpha + fit.beta))
    return n_opt, (c / 6.0) / n_opt


# ------------------------------------------------------------------------------------------------ curves, emergence
def pareto_frontier(compute: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices of the points with a lower loss than every point of smaller or equal compute, by compute."""
    c, y = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    keep, best = [], math.inf
    for i in np.lexsort((y, c)):
        if y[i] < best:
            keep.append(int(i))
            best = y[i]
    return np.array(keep, dtype=int)


def first_above_chance(
    scale: Sequence[float], low: Sequence[float], chance: float
) -> float | None:
    """The smallest scale whose metric's lower confidence bound exceeds `chance` (None if none does)."""
    above = [s for s, lo in zip(scale, low, strict=True) if lo > chance]
    return min(above) if above else None


# ------------------------------------------------------------------------------------------------ capability probe
SPEAKER_LINE = re.compile(r"^[A-Z][A-Za-z' .-]{0,30}\.$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class ClozeItem:
    """A multiple-choice item scored by log-likelihood: `options[answer]` is the true continuation of `context`."""

    context: str
    options: tuple[str, ...]
    answer: int


def _speeches(text: str) -> list[tuple[int, str | None]]:
    """(start offset, speaker or None) of every paragraph; a speech's first line is its speaker's name."""
    starts = [0] + [m.end() for m in _PARAGRAPH_BREAK.finditer(text)]
    out = []
    for start in starts:
        lines = text[start:].split("\n", 2)
        first = lines[0].strip()
        is_speech = len(lines) > 1 and lines[1].strip() and SPEAKER_LINE.match(first)
        out.append((start, first if is_speech else None))
    return out


def speaker_cloze(
    texts: Sequence[str], n_items: int, n_options: int = 4, context_chars: int = 400, seed: int = 0
) -> list[ClozeItem]:
    """Next-speaker items from play scripts (module docstring); at most `n_items`, sampled with `seed`."""
    rng = random.Random(seed)
    candidates: list[tuple[str, list[str], str, list[str]]] = []
    for text in texts:
        paragraphs = _speeches(text)
        cast = sorted({who for _, who in paragraphs if who})
        if len(cast) < n_options:
            continue
        for k, (start, who) in enumerate(paragraphs):
            if who is None:
                continue
            window = [(s, w) for s, w in paragraphs[:k] if s >= start - context_chars]
            if not window:
                continue
            seen = sorted({w for _, w in window if w})
            if who in seen:
                candidates.append((text[window[0][0] : start], seen, who, cast))
    items = []
    for context, seen, who, cast in rng.sample(candidates, min(n_items, len(candidates))):
        others = [w for w in seen if w != who]
        rng.shuffle(others)
        options = [who, *others[: n_options - 1]]
        absent = [w for w in cast if w not in seen]
        options += rng.sample(absent, n_options - len(options))
        rng.shuffle(options)
        items.append(ClozeItem(context, tuple(options), options.index(who)))
    return items


def score_cloze(lm: Any, items: Sequence[ClozeItem]) -> list[int]:
    """The option each item's model picks: argmax of the options' log-likelihoods (`lm.loglikelihood`, the
    `lmcraft.prompting.lm.LM` protocol)."""
    pairs = [(item.context, option) for item in items for option in item.options]
    scores = lm.loglikelihood(pairs)
    picks, at = [], 0
    for item in items:
        logps = [scores[at + k][0] for k in range(len(item.options))]
        picks.append(int(np.argmax(logps)))
        at += len(item.options)
    return picks


# ------------------------------------------------------------------------------------------------ plot
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
