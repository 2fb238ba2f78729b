"""lmcraft.scaling: the fits recover known laws from synthetic data with intervals that cover the truth, the
compute-optimal split minimises the fitted law, the frontier / emergence helpers, the next-speaker probe, the plot."""

from __future__ import annotations

import numpy as np
import pytest

from lmcraft.scaling import (
    ClozeItem,
    FitError,
    LossCurve,
    TaskPoints,
    compute_optimal,
    first_above_chance,
    fit_joint,
    fit_power_law,
    pareto_frontier,
    plot_scaling,
    score_cloze,
    speaker_cloze,
    training_flops,
)

E, A, ALPHA, B, BETA = 1.69, 406.4, 0.34, 410.7, 0.28  # Chinchilla's fitted law (Hoffmann et al. 2022)
N = np.geomspace(1e5, 1e8, 8)


def law(n: np.ndarray) -> np.ndarray:
    return E + A * n ** (-ALPHA)


def noisy(values: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return values * np.exp(np.random.default_rng(seed).normal(0.0, sigma, len(values)))


def covers(fit, name: str, truth: float) -> bool:
    lo, hi = fit.ci[name]
    return lo <= truth <= hi


def test_exact_data_is_recovered_exactly() -> None:
    fit = fit_power_law(N, law(N), n_boot=50)
    assert fit.E == pytest.approx(E, rel=1e-4)
    assert fit.A == pytest.approx(A, rel=1e-3)
    assert fit.alpha == pytest.approx(ALPHA, rel=1e-4)
    assert fit.rmse_log < 1e-6
    assert fit.ci["alpha"][1] - fit.ci["alpha"][0] < 1e-3  # no residuals: nothing to resample
    np.testing.assert_allclose(fit.predict(N), law(N), rtol=1e-5)


@pytest.mark.parametrize("bootstrap", ["residual", "pairs"])
def test_noisy_fit_is_close_and_intervals_cover_the_truth(bootstrap: str) -> None:
    fit = fit_power_law(N, noisy(law(N), 0.01, seed=0), bootstrap=bootstrap, n_boot=300, seed=1)
    assert fit.alpha == pytest.approx(ALPHA, rel=0.1)
    assert fit.E == pytest.approx(E, rel=0.1)
    for name, truth in (("E", E), ("A", A), ("alpha", ALPHA)):
        assert covers(fit, name, truth), (name, fit.ci[name])
    assert len(fit.samples) == 300
    lo, hi = fit.band(N)
    assert np.all(lo <= fit.predict(N) + 1e-9) and np.all(fit.predict(N) <= hi + 1e-9)
    assert fit.to_dict()["n_points"] == len(N)


def test_interval_coverage_over_repeated_experiments() -> None:
    """95% intervals should cover the true exponent in most of 12 independent noisy data sets."""
    hits = sum(covers(fit_power_law(N, noisy(law(N), 0.01, seed=s), n_boot=100, seed=s), "alpha", ALPHA)
               for s in range(12))
    assert hits >= 9


def test_huber_fit_ignores_an_outlier() -> None:
    y = noisy(law(N), 0.002, seed=3)
    y[4] *= 1.15
    plain = fit_power_law(N, y, n_boot=50)
    robust = fit_power_law(N, y, fit_loss="huber", huber_delta=1e-3, n_boot=50)
    assert abs(robust.alpha - ALPHA) < abs(plain.alpha - ALPHA)
    assert robust.alpha == pytest.approx(ALPHA, rel=0.05)


def test_fits_refuse_too_few_or_bad_points() -> None:
    with pytest.raises(FitError, match="at least 4"):
        fit_power_law(N[:3], law(N[:3]))
    with pytest.raises(FitError, match="positive"):
        fit_power_law(N, -law(N))
    with pytest.raises(FitError, match="values but loss has"):
        fit_power_law(N, law(N)[:-1])
    with pytest.raises(FitError, match="at least 6 runs"):
        fit_joint(N[:4], N[:4], law(N[:4]))


def joint_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nn, dd = np.meshgrid(np.geomspace(1e6, 1e10, 5), np.geomspace(1e8, 1e12, 5))
    n, d = nn.ravel(), dd.ravel()
    return n, d, E + A * n ** (-ALPHA) + B * d ** (-BETA)


def test_joint_fit_recovers_chinchilla_with_covering_intervals() -> None:
    n, d, y = joint_grid()
    fit = fit_joint(n, d, noisy(y, 0.003, seed=0), bootstrap="pairs", n_boot=200, seed=0)
    for name, truth in (("E", E), ("A", A), ("alpha", ALPHA), ("B", B), ("beta", BETA)):
        assert covers(fit, name, truth), (name, getattr(fit, name), fit.ci[name])
    assert fit.alpha == pytest.approx(ALPHA, rel=0.1) and fit.beta == pytest.approx(BETA, rel=0.1)
    np.testing.assert_allclose(fit.predict(n, d), y, rtol=0.01)


def test_compute_optimal_minimises_the_law_on_the_iso_flop_curve() -> None:
    n, d, y = joint_grid()
    fit = fit_joint(n, d, y, n_boot=50)
    flops = 1e21
    n_opt, d_opt = compute_optimal(fit, flops)
    assert training_flops(n_opt, d_opt) == pytest.approx(flops)
    sizes = np.geomspace(n_opt / 30, n_opt * 30, 2001)
    best = sizes[np.argmin(fit.predict(sizes, flops / (6 * sizes)))]
    assert best == pytest.approx(float(n_opt), rel=0.01)


def test_pareto_frontier_and_emergence_point() -> None:
    compute = [1, 2, 3, 4, 5, 6]
    loss = [5.0, 4.0, 4.5, 3.0, 3.0, 2.5]
    assert pareto_frontier(compute, loss).tolist() == [0, 1, 3, 5]
    assert first_above_chance([1e3, 1e4, 1e5], [0.20, 0.26, 0.24], chance=0.25) == 1e4
    assert first_above_chance([1e3, 1e4], [0.1, 0.2], chance=0.25) is None


PLAY = """THE TRAGEDY OF TESTING

ACT I.

ALICE.
Good morrow, Bob. How fares the day?

BOB.
It fares well, Alice. The sun is up.

ALICE.
Then let us walk together to the town.

BOB.
I will, if Carol comes along.

[Enter Carol.]

CAROL.
I come, I come. Wait for me.

ALICE.
We wait for thee, good Carol.

DAVE.
And I shall follow all of you.

EVE.
So shall I, though I am tired.

BOB.
Then all of us shall go.
"""


def test_speaker_cloze_items_are_well_formed() -> None:
    items = speaker_cloze([PLAY], n_items=100, n_options=4, context_chars=200, seed=0)
    assert items, "the play has speeches whose speaker spoke earlier in the context"
    for item in items:
        assert len(item.options) == 4 and len(set(item.options)) == 4
        answer = item.options[item.answer]
        assert item.context.endswith("\n\n")
        assert f"\n{answer}\n" in "\n" + item.context  # the true speaker appears in the context
        assert len(item.context) <= 200
        assert all(o.endswith(".") and o.isupper() for o in item.options)
    # "ALICE." at "We wait for thee" has ALICE in context: a valid item; the first speech never is (empty context)
    assert not any(item.context.strip() == "" for item in items)
    assert speaker_cloze([PLAY], n_items=3, seed=0) == speaker_cloze([PLAY], n_items=3, seed=0)
    assert len(speaker_cloze([PLAY], n_items=3, seed=0)) == 3
    assert speaker_cloze([PLAY], n_items=10, n_options=6) == []  # a cast of 5 cannot fill 6 options


class ShortestLM:
    """Scores a continuation by minus its length: always picks the shortest option."""

    def loglikelihood(self, pairs):  # noqa: ANN001, ANN201 - the LM protocol
        return [(-float(len(c)), len(c)) for _, c in pairs]


def test_score_cloze_picks_the_most_likely_option() -> None:
    items = [ClozeItem("x\n\n", ("LONGNAME.", "AB.", "ABCD."), 1), ClozeItem("y\n\n", ("ABC.", "ABCDE.", "A."), 0)]
    assert score_cloze(ShortestLM(), items) == [1, 2]


def test_plot_is_a_small_png(tmp_path) -> None:
    y = noisy(law(N), 0.01, seed=0)
    fit = fit_power_law(N, y, n_boot=100)
    curves = [LossCurve(f"run{k}", [1e12 * (k + 1) * s for s in (1, 2, 4)], [v + 1.0, v + 0.5, v])
              for k, v in enumerate(y)]
    c = [p for cv in curves for p in cv.compute]
    l_ = [p for cv in curves for p in cv.loss]
    keep = pareto_frontier(c, l_)
    fit_c = fit_power_law(np.array(c)[keep], np.array(l_)[keep], variable="C", n_boot=50)
    acc = np.array([0.25, 0.26, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    task = TaskPoints("accuracy", list(N), acc, acc - 0.05, acc + 0.05, chance=0.25)
    path = plot_scaling(tmp_path / "s.png", n_params=N, loss=y, fit_n=fit, curves=curves, fit_c=fit_c, task=task,
                        title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
