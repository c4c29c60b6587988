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
from ..errors import NonFiniteError, ShapeError
from ..models.base import as_covariance, as_real_tensor
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
    members = check_members(members)
    mu = as_real_tensor(mean, "mean")
    if mu.ndim != 1 or mu.shape[0] == 0:
        raise ShapeError("mean", "a non-empty vector (n,)", f"shape {tuple(mu.shape)}")
    if not bool(torch.isfinite(mu).all()):
        raise NonFiniteError("mean", "a finite climatological mean", "NaN or infinite entries")
    sigma = as_covariance(cov, mu.shape[0], "cov")
    draw = ensemble_init(members)

    def init(model, prior_mean, prior_cov, g) -> EnsembleState:
        if prior_mean.shape[-1] != mu.shape[0]:
            raise ShapeError("mean", f"a climatological mean of the model's state size {prior_mean.shape[-1]}",
                             f"size {mu.shape[0]}")
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
    leading dims (what DAPPER's Climatology estimates).

    Raises
    ------
    ShapeError
        Naming ``truth`` for fewer than 2 dims or fewer than 2 states (one state has no covariance).
    NonFiniteError
        Naming ``truth`` for NaN or infinite entries.
    """
    x = as_real_tensor(truth, "truth")
    if x.ndim < 2 or x.shape[-1] == 0:
        raise ShapeError("truth", "a trajectory (..., time, n) with a non-empty state axis", f"shape {tuple(x.shape)}")
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] < 2:
        raise ShapeError("truth", "at least 2 states to estimate a covariance", f"{flat.shape[0]} state(s), "
                         f"shape {tuple(x.shape)}")
    if not bool(torch.isfinite(flat).all()):
        raise NonFiniteError("truth", "finite states", "NaN or infinite entries")
    return flat.mean(0), torch.cov(flat.T).reshape(x.shape[-1], x.shape[-1])
