"""The laws and their fits: L(N), L(D), L(C), L(N, D), the compute-optimal split and the L(C) frontier.

Laws, fitting and confidence intervals: see `lmcraft.scaling`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["FitError", "JointFit", "PowerLawFit", "compute_optimal", "first_above_chance", "fit_joint",
           "fit_power_law", "pareto_frontier", "training_flops"]

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


def _percentiles(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` interval (low, high) of the draws along axis 0 of `samples`."""
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail], axis=0)
    return lo, hi


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = _percentiles(samples, level)
    return float(lo), float(hi)


def _intervals(names: Sequence[str], samples: np.ndarray, level: float) -> dict[str, tuple[float, float]]:
    """`level` interval of each parameter (one column of `samples` each, in the order of `names`)."""
    return {name: _interval(samples[:, k], level) for k, name in enumerate(names)}


def _rmse_log(log_fit: np.ndarray, log_y: np.ndarray) -> float:
    """sqrt(mean (ln L_hat - ln L)^2) on the fitted points."""
    return float(np.sqrt(np.mean((log_fit - log_y) ** 2)))


def _fit_summary(ci: dict[str, tuple[float, float]], level: float, n_points: int, samples: np.ndarray,
                 rmse_log: float) -> dict[str, Any]:
    """The keys every fit's `to_dict` ends with: intervals, their level, points, bootstrap draws, log-space RMSE."""
    return {"ci": {k: list(v) for k, v in ci.items()}, "level": level, "n_points": n_points,
            "n_boot": len(samples), "rmse_log": rmse_log}


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
        return _percentiles(curves, self.level)

    def to_dict(self) -> dict[str, Any]:
        return {
            "law": f"L({self.variable}) = E + A / {self.variable}^alpha",
            "variable": self.variable,
            "E": self.E,
            "A": self.A,
            "alpha": self.alpha,
            **_fit_summary(self.ci, self.level, len(self.x), self.samples, self.rmse_log),
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
    ci = _intervals(("E", "A", "alpha"), samples, level)
    return PowerLawFit(
        variable,
        float(nat[0]),
        float(nat[1]),
        float(nat[2]),
        x_arr,
        y,
        ci,
        level,
        _rmse_log(log_fit, log_y),
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
            **_fit_summary(self.ci, self.level, len(self.n), self.samples, self.rmse_log),
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
    ci = _intervals(("E", "A", "alpha", "B", "beta"), samples, level)
    return JointFit(
        *(float(v) for v in nat),
        n_arr,
        d_arr,
        y,
        ci,
        level,
        _rmse_log(log_fit, log_y),
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
