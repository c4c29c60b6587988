"""Ensemble transform particle filters: global (Reich 2013) and local, with optional second-order
correction.

An ETPF is a particle filter whose resampling step is replaced by an optimal-transport map (see
:mod:`daml.transport.transform`): after weighting the forecast members by their likelihood, the
members move to ``x_new = T^T x`` with ``T = N P`` and ``P`` the optimal coupling between the weighted
and the uniform ensemble. Every analysis returns equally weighted members, so the filter never
carries degenerate weights from one cycle to the next; in high dimension the weights of the *global*
filter still collapse within one analysis, like those of any particle filter.

The **local** ETPF (Reich & Cotter 2015, chapter 8; Farchi & Bocquet 2018 compare local OT filters on
Lorenz-96) solves one transport problem per state variable ``l``: the weights use only the
observations near ``l``, each observation's log-likelihood multiplied by the Gaspari-Cohn taper of
its distance to ``l`` (R-localisation, the same taper and ``radius`` convention as
:func:`daml.filters.letkf`), and the cost compares members on a tapered neighbourhood of ``l``,
``C^l_ij = sum_k rho(d_lk) (x_ik - x_jk)^2``. Variable ``l`` of member ``j`` becomes
``sum_i T^l_ij x_il``. The ``n`` problems of all experiments are solved in one batched Sinkhorn call
(or a loop of exact ``ot.emd`` calls).

Deterministic models need fresh spread after each analysis (the transform only contracts, and the
exact plan copies members): ``rejuvenation`` adds ``tau * sum_k xi_jk (x_k - mean) / sqrt(N - 1)``
with ``xi`` standard normal and centred over members, a random draw from the ensemble's own
covariance scaled by ``tau^2`` (mean kept).

``info``: ``ess`` (before the transform; for the local filter the mean over variables), ``loglik``
(the log-evidence increment of the global weights), ``transport_error`` (largest L1 marginal error
of the plans) and ``unconverged`` (number of Sinkhorn problems that missed ``tol``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import InputError
from ..models.observations import Observation
from ..transport.transform import check_solver, check_transport_params, ensemble_transform
from .base import EnsembleState, Filter, check_members, ensemble_members, gaussian_loglik, register
from .letkf import _check_radius, _local_precision, ring_taper
from .particle import NoiseModel, _init_with, deferred_forecast, kish_ess, log_normalise

__all__ = ["etpf", "letpf"]


def _check_rejuvenation(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError("rejuvenation", "a non-negative fraction of the ensemble spread", repr(value))
    return float(value)


def _rejuvenate(x: torch.Tensor, tau: float, g: torch.Generator) -> torch.Tensor:
    """Add ``tau`` times a centred random combination of the anomalies (covariance ``tau^2 cov``)."""
    if tau == 0:
        return x
    n_mem = x.shape[-2]
    anom = x - x.mean(-2, keepdim=True)
    xi = torch.randn(*x.shape[:-2], n_mem, n_mem, generator=g, dtype=x.dtype, device=x.device)
    xi = xi - xi.mean(-2, keepdim=True)
    return x + tau / math.sqrt(n_mem - 1) * (xi @ anom)


def _settings(who: str, members: Any, epsilon: Any, solver: Any, second_order: Any, rejuvenation: Any, tol: Any,
              max_iter: Any, model_noise: Any):
    """The checked parameters shared by :func:`etpf` and :func:`letpf`: ``(N, transport keywords,
    rejuvenation, noise model, config)``."""
    n_mem = check_members(members)
    eps, tol, max_iter = check_transport_params(epsilon, tol, max_iter)
    transport = {"solver": check_solver(solver), "epsilon": eps, "tol": tol, "max_iter": max_iter,
                 "second_order": bool(second_order)}
    tau = _check_rejuvenation(rejuvenation)
    noise = NoiseModel(model_noise, who, required=False)
    config = {"members": n_mem, **transport, "rejuvenation": tau, "model_noise": noise.config()}
    return n_mem, transport, tau, noise, config


def _weigh(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor, who: str):
    """Innovations ``y - h(x)`` ``(*b, N, m)`` and the normalised posterior log-weights with the
    log-evidence increment."""
    innovation = operator.residual(y.unsqueeze(-2), state.x)
    ll = gaussian_loglik(innovation, operator.noise_cov, mask)
    lw, log_z = log_normalise(state.log_weight + torch.nan_to_num(ll, nan=-math.inf), who)
    return innovation, lw, log_z


def _equal_weights(x: torch.Tensor, tau: float, g: torch.Generator) -> EnsembleState:
    """The analysis state: rejuvenated members with equal weights."""
    n_mem = x.shape[-2]
    uniform = torch.full(x.shape[:-1], -math.log(n_mem), dtype=x.dtype, device=x.device)
    return EnsembleState(_rejuvenate(x, tau, g), uniform)


def _info(lw: torch.Tensor, log_z: torch.Tensor, err: torch.Tensor, conv: torch.Tensor, ess: torch.Tensor) -> dict:
    """The analysis ``info``; ``err`` and ``conv`` have one entry per transport problem."""
    return {"ess": ess, "loglik": log_z,
            "transport_error": err.reshape(*lw.shape[:-1], -1).amax(-1).to(lw.dtype),
            "unconverged": (~conv).reshape(*lw.shape[:-1], -1).sum(-1).to(lw.dtype)}


@register("etpf")
def etpf(members: int, epsilon: float = 0.05, solver: str = "sinkhorn", second_order: bool = False,
         rejuvenation: float = 0.0, tol: float = 1e-6, max_iter: int = 2000, model_noise: Any = None) -> Filter:
    """The ensemble transform particle filter (Reich 2013).

    Parameters
    ----------
    members : int
        Ensemble size ``N`` (at least 2).
    epsilon : float
        Sinkhorn regularisation as a fraction of the mean squared distance between members (ignored
        by ``solver="emd"``). Smaller is closer to the exact transform and slower.
    solver : {"sinkhorn", "emd"}
        :func:`daml.transport.sinkhorn` (batched, smooth) or POT's exact ``ot.emd`` (one call per
        experiment).
    second_order : bool
        Correct the transform so the analysis ensemble has the weighted covariance exactly.
    rejuvenation : float
        ``tau`` of the ensemble-space noise added after the transform (0: none).
    tol, max_iter : float, int
        Sinkhorn's L1 marginal tolerance and iteration limit.
    model_noise : optional
        ``Q`` for the filter's propagation instead of the model's ``noise_cov`` (as for the
        bootstrap filter).
    """
    n_mem, transport, tau, noise, config = _settings("etpf", members, epsilon, solver, second_order, rejuvenation,
                                                     tol, max_iter, model_noise)

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator):
        x = state.x
        _, lw, log_z = _weigh(state, y, operator, mask, "etpf")
        res = ensemble_transform(x, lw, **transport)
        return _equal_weights(res.x, tau, g), _info(lw, log_z, res.error, res.converged, kish_ess(lw))

    return Filter("etpf", config, _init_with(noise, n_mem), deferred_forecast(noise), analysis, ensemble_members,
                  inference=True)


@register("letpf")
def letpf(members: int, radius: float, epsilon: float = 0.05, solver: str = "sinkhorn",
          second_order: bool = False, rejuvenation: float = 0.0, tol: float = 1e-6, max_iter: int = 2000,
          model_noise: Any = None) -> Filter:
    """The local ensemble transform particle filter: one transport problem per state variable.

    Parameters
    ----------
    members : int
        Ensemble size ``N``.
    radius : float
        Localisation radius in grid points (DAPPER's ``loc_rad``, as in :func:`letkf`): the taper of
        the observation log-likelihoods and of the cost reaches zero at ``3.64 radius``. State
        variable ``j`` sits at ``j`` on a ring of ``n`` points; observations at the variable they
        select (a linear selection operator with diagonal ``R`` is required).
    epsilon, solver, second_order, rejuvenation, tol, max_iter, model_noise
        As for :func:`etpf`; ``second_order`` corrects each variable's transform.
    """
    rad = _check_radius(radius)
    n_mem, transport, tau, noise, config = _settings("letpf", members, epsilon, solver, second_order, rejuvenation,
                                                     tol, max_iter, model_noise)
    cache: dict[str, Any] = {}

    def tapers(operator: Observation, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = like.shape[-1]
        key = (id(operator), n, like.dtype, like.device)
        if cache.get("key") != key or cache.get("operator") is not operator:
            with torch.inference_mode(False):      # kept across runs: ordinary tensors, not inference ones
                prec = _local_precision(operator, n, rad, None, None).to(like)              # (n, m): rho / r
                state_taper = ring_taper(n, rad).to(like)                                   # (n, n)
            cache.update(key=key, operator=operator, value=(prec, state_taper))
        return cache["value"]

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator):
        x, lw0 = state                                           # (*b, N, n), (*b, N)
        prec, taper = tapers(operator, x)
        innovation, lw_glob, log_z = _weigh(state, y, operator, mask, "letpf")   # global: evidence only
        d = torch.where(mask.unsqueeze(-2), innovation, 0.0)                                # (*b, N, m)
        local_ll = -0.5 * (d**2 * mask.unsqueeze(-2).to(x)) @ prec.T                        # (*b, N, n)
        lw_loc = torch.log_softmax(lw0.unsqueeze(-1) + local_ll, dim=-2).transpose(-1, -2)  # (*b, n, N)
        diff2 = (x.unsqueeze(-2) - x.unsqueeze(-3)) ** 2                                    # (*b, N, N, n)
        cost = (diff2 @ taper).permute(*range(diff2.ndim - 3), -1, -3, -2)                   # (*b, n, N, N)
        # variable l of member j becomes sum_i T^l_ij x_il: an ensemble of 1-d members per variable
        res = ensemble_transform(x.transpose(-1, -2).unsqueeze(-1), lw_loc, cost=cost, **transport)
        xa = res.x.squeeze(-1).transpose(-1, -2)
        ess = kish_ess(lw_loc).mean(-1)
        return _equal_weights(xa, tau, g), _info(lw_glob, log_z, res.error, res.converged, ess)

    config = {"radius": rad, **config}
    return Filter("letpf", config, _init_with(noise, n_mem), deferred_forecast(noise), analysis, ensemble_members,
                  inference=True)
