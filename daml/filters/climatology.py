"""Climatology: the reference every filter must beat.

The estimate ignores the observations: an ensemble drawn once from the climatological distribution
``N(mean, cov)`` of the system (its long-run mean and covariance) and kept at every time. Its RMSE is
the typical distance of the truth from its long-run mean, about ``sqrt(2)`` times smaller than that of
a random state (DAPPER's ``Climatology``: 3.6 on Lorenz-96 with F = 8).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _device
from ..errors import ShapeError
from ..models.base import as_covariance
from .base import EnsembleState, Filter, check_members, ensemble_init, ensemble_members, register

__all__ = ["climatology", "climatology_from_truth"]


@register("climatology")
def climatology(mean: Any, cov: Any, members: int = 100) -> Filter:
    """A fixed ensemble of ``members`` draws from ``N(mean, cov)``, ignoring model and observations.

    Parameters
    ----------
    mean : array (n,)
        Climatological mean.
    cov : scalar, (n,) or (n, n)
        Climatological covariance.
    members : int
        Ensemble size.
    """
    check_members(members)
    mu = _device.as_tensor(mean, "mean")
    if mu.ndim != 1:
        raise ShapeError("mean", "a vector (n,)", f"shape {tuple(mu.shape)}")
    sigma = as_covariance(cov, mu.shape[0], "cov")
    draw = ensemble_init(members)

    def init(model, prior_mean, prior_cov, g) -> EnsembleState:
        base = mu.to(prior_mean).expand_as(prior_mean)
        return draw(model, base, sigma.to(prior_mean), g)

    def forecast(state, model, g):
        return state

    def analysis(state, y, operator, mask, g):
        return state, {}

    config = {"members": members}
    return Filter("climatology", config, init, forecast, analysis, ensemble_members, inference=True)


def climatology_from_truth(truth: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(n,)`` and covariance ``(n, n)`` of a truth trajectory ``(..., time, n)`` pooled over all
    leading dims (what DAPPER's Climatology estimates)."""
    x = _device.as_tensor(truth, "truth")
    flat = x.reshape(-1, x.shape[-1])
    return flat.mean(0), torch.cov(flat.T).reshape(x.shape[-1], x.shape[-1])
