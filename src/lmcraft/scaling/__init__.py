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

from lmcraft.scaling.laws import (
    FitError,
    JointFit,
    PowerLawFit,
    compute_optimal,
    first_above_chance,
    fit_joint,
    fit_power_law,
    pareto_frontier,
    training_flops,
)
from lmcraft.scaling.plot import LossCurve, TaskPoints, plot_scaling
from lmcraft.scaling.probe import ClozeItem, score_cloze, speaker_cloze

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
