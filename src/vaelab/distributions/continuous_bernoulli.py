"""The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019) with a mean accurate for every
logit: torch's ``ContinuousBernoulli.mean`` loses most of its digits near λ = ½."""

from __future__ import annotations

import torch
from torch.distributions import ContinuousBernoulli

# Below this |logit| the mean is summed as its series; above it, in closed form.
SERIES_CUT = 0.5


class AccurateContinuousBernoulli(ContinuousBernoulli):
    """``torch.distributions.ContinuousBernoulli`` whose ``mean`` is computed from the logits l
    rather than from λ = σ(l).

    The mean (Loaiza-Ganem & Cunningham 2019, "The continuous Bernoulli", eq. 5 and App.)

        E[x] = λ / (2λ − 1) + 1 / (2 artanh(1 − 2λ)) = 1 / (1 − e^{−l}) − 1 / l,

    is a difference of two terms near ±1/l. torch evaluates it through λ, outside
    0.499 < λ < 0.501, so at l = −0.012 both terms are about ±83 and their difference, ½ − 0.001,
    keeps four digits: 4·10⁻⁴ off in float32. Here, for |l| ≥ ``SERIES_CUT`` the closed form
    −1 / expm1(−l) − 1 / l loses at most a factor 1/(1 − e^{−½}) ≈ 2.5 of float precision, and
    below it the series of x / (1 − e^{−x}) in Bernoulli numbers gives

        E[x] = ½ + l/12 − l³/720 + l⁵/30240 − l⁷/1209600 + O(l⁹),

    whose first omitted term is below 10⁻⁹ at the cut."""

    @property
    def mean(self) -> torch.Tensor:
        logits = self.logits
        small = logits.abs() < SERIES_CUT
        # The closed form is fed a harmless stand-in where the series is taken (1/0 otherwise).
        far = torch.where(small, torch.ones_like(logits), logits)
        closed = -1.0 / torch.expm1(-far) - 1.0 / far
        square = logits.square()
        series = 0.5 + logits * (
            1 / 12 + square * (-1 / 720 + square * (1 / 30240 - square / 1209600))
        )
        return torch.where(small, series, closed)
