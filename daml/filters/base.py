"""The filter protocol: every filter is a :class:`Filter` of four pure functions.

A filter carries a state from one time to the next, in the style of blackjax and optax: pure
functions over a NamedTuple state, composed rather than configured by flags. The one time loop,
:func:`daml.filters.run`, drives any filter:

``init(model, mean, cov, generator) -> state``
    The initial state from the prior ``N(mean, cov)``; ``mean`` has shape ``(*batch, n)`` (any
    leading batch dims: independent experiments), ``cov`` ``(n, n)``.
``forecast(state, model, generator) -> state``
    One model step (with model noise if the model has any). A filter whose ``lookahead`` is ``True``
    is called as ``forecast(state, model, generator, upcoming)`` with an :class:`Upcoming` (the next
    observation and how many model steps away it is, or ``None`` after the last one): proposal
    particle filters nudge toward it and leave the step that lands on it to the analysis.
``analysis(state, y, operator, mask, generator) -> (state, info)``
    Assimilate the observations ``y`` ``(*batch, m)`` through the
    :class:`~daml.models.Observation` ``operator``. ``mask`` ``(*batch, m)`` is ``True`` where an
    entry is observed; entries outside it (NaN in the data) must have no influence. ``info`` is a
    dict of tensors of shape ``(*batch,)`` (for example the ESS), stored per analysis time.
``members(state) -> (x, log_weight)``
    The state as a weighted sample ``x`` ``(*batch, N, n)`` with normalised ``log_weight``
    ``(*batch, N)``: what the posterior records. Gaussian filters return ``2n`` symmetric sigma
    points ``mean +- sqrt(n) L e_i`` with equal weights, which reproduce the mean and covariance
    exactly.

Wrappers take a filter and return a filter: :func:`inflate` (multiplicative inflation of the
analysis anomalies). Every filter constructor is registered by name in :data:`REGISTRY` (used by
TOML configurations and by the contract test).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from ..errors import InputError, ShapeError, check_int, check_real
from ..models.base import Model, check_memory, covariance_root, propagate

__all__ = [
    "Filter",
    "EnsembleState",
    "GaussianState",
    "REGISTRY",
    "register",
    "make_filter",
    "inflate",
    "ensemble_init",
    "ensemble_forecast",
    "ensemble_members",
    "weighted_mean",
    "gaussian_members",
    "masked_observation",
    "check_members",
    "Upcoming",
    "gaussian_loglik",
    "gaussian_logpdf_chol",
    "masked_logpdf_chol",
]


class Filter(NamedTuple):
    """A filter: a name, its configuration and four pure functions (see the module docstring)."""

    name: str
    config: dict
    init: Callable[..., Any]
    forecast: Callable[..., Any]
    analysis: Callable[..., tuple[Any, dict]]
    members: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
    lookahead: bool = False
    """Whether ``forecast`` takes a fourth argument, the :class:`Upcoming` observation."""
    inference: bool = False
    """Whether the steps never use autograd, so that :func:`daml.filters.run` may run its loop under
    ``torch.inference_mode`` (cheaper per operation than ``torch.no_grad``: no version counters, no
    view tracking). Leave it ``False`` for a filter that differentiates anything in its steps."""


class Upcoming(NamedTuple):
    """The next observation, as seen by a ``lookahead`` filter's ``forecast``.

    ``steps`` counts the model steps from the current state to the observation time (``1``: the step
    about to be taken lands on it); ``interval`` is the number of model steps between the previous
    observation time (or the start) and this one.
    """

    y: torch.Tensor
    mask: torch.Tensor
    operator: Any
    steps: int
    interval: int


class EnsembleState(NamedTuple):
    """A weighted ensemble: ``x`` ``(*batch, N, n)``, ``log_weight`` ``(*batch, N)`` (normalised)."""

    x: torch.Tensor
    log_weight: torch.Tensor


class GaussianState(NamedTuple):
    """A Gaussian: ``mean`` ``(*batch, n)``, ``cov`` ``(*batch, n, n)``."""

    mean: torch.Tensor
    cov: torch.Tensor


REGISTRY: dict[str, Callable[..., Filter]] = {}


def register(name: str) -> Callable[[Callable[..., Filter]], Callable[..., Filter]]:
    """Decorator registering a filter constructor under ``name``."""

    def deco(fn: Callable[..., Filter]) -> Callable[..., Filter]:
        REGISTRY[name] = fn
        return fn

    return deco


def make_filter(name: str, **params: Any) -> Filter:
    """Build the registered filter ``name`` with ``params`` (``inflation=`` wraps it in :func:`inflate`)."""
    if name not in REGISTRY:
        raise InputError("method", f"one of {sorted(REGISTRY)}", repr(name))
    inflation = params.pop("inflation", None)
    try:
        filt = REGISTRY[name](**params)
    except TypeError as exc:
        raise InputError(f"{name} parameters", "the constructor's keywords", sorted(params), hint=str(exc)) from exc
    return filt if inflation is None else inflate(filt, inflation)


MAX_MEMBERS = 2**31 - 1
"""The largest ensemble size a filter accepts (torch indexes sizes beyond it poorly); whether an
ensemble fits in memory is checked when it is drawn (:func:`ensemble_init`)."""


def check_members(members: Any, minimum: int = 2) -> int:
    """Validate an ensemble size: an int in ``[minimum, MAX_MEMBERS]`` (2 by default: a spread needs
    two members); floats such as ``1e3``, bools and strings are refused with an :class:`InputError`
    naming ``members``."""
    n = check_int(members, "members", minimum, f"an int >= {minimum} (the ensemble size)")
    if n > MAX_MEMBERS:
        raise InputError("members", f"an int <= {MAX_MEMBERS} (the ensemble size)", repr(members))
    return n


# -- ensembles ------------------------------------------------------------------------------------------

def ensemble_init(members: int) -> Callable[..., EnsembleState]:
    """``init`` drawing ``members`` equally weighted members from ``N(mean, cov)``."""

    def init(model: Model, mean: torch.Tensor, cov: torch.Tensor, g: torch.Generator) -> EnsembleState:
        # the draws, the members and the product's temporary: three arrays of the ensemble's size
        nbytes = 3 * math.prod(mean.shape[:-1]) * members * mean.shape[-1] * mean.element_size()
        check_memory(nbytes, "members", f"{members} members of {mean.shape[-1]} variables"
                     + (f" in {math.prod(mean.shape[:-1])} experiments" if mean.ndim > 1 else ""), mean.device)
        root = covariance_root(cov.to(mean))
        z = torch.randn(*mean.shape[:-1], members, mean.shape[-1], generator=g, dtype=mean.dtype, device=mean.device)
        x = mean.unsqueeze(-2) + z @ root.T
        lw = torch.full(x.shape[:-1], -math.log(members), dtype=mean.dtype, device=mean.device)
        return EnsembleState(x, lw)

    return init


def ensemble_forecast(state: EnsembleState, model: Model, g: torch.Generator) -> EnsembleState:
    """Propagate every member one model step (noise from ``model.noise_cov`` if any); weights unchanged."""
    return EnsembleState(propagate(model, state.x, 1, seed=g), state.log_weight)


def weighted_mean(x: torch.Tensor, log_weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean ``(*batch, 1, n)`` of members ``x`` ``(*batch, N, n)`` with normalised log-weights."""
    return (torch.exp(log_weight).unsqueeze(-1) * x).sum(-2, keepdim=True)


def weighted_anomalies(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted mean ``(*batch, 1, n)`` of members ``x`` ``(*batch, N, n)`` with normalised weights
    ``w`` ``(*batch, N)``, and anomalies ``A`` scaled so that ``A^T A`` is the unbiased weighted
    covariance ``sum_i w_i (x_i - m)(x_i - m)^T / (1 - sum_i w_i^2)`` (``A`` keeps the ensemble's
    rank, for SVDs)."""
    mean = w.unsqueeze(-2) @ x
    scale = (w / (1.0 - (w * w).sum(-1, keepdim=True))).sqrt().unsqueeze(-1)
    return mean, torch.sub(x, mean).mul_(scale)


def ensemble_members(state: EnsembleState) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble as it is."""
    return state.x, state.log_weight


def gaussian_members(state: GaussianState) -> tuple[torch.Tensor, torch.Tensor]:
    """``2n`` sigma points ``mean +- sqrt(n) L e_i`` with equal weights: their weighted mean and
    (plug-in) covariance are exactly ``mean`` and ``cov``."""
    n = state.mean.shape[-1]
    root = covariance_root(state.cov) * math.sqrt(n)          # (*batch, n, n), columns L e_i
    pts = torch.cat([state.mean.unsqueeze(-2) + root.transpose(-1, -2),
                     state.mean.unsqueeze(-2) - root.transpose(-1, -2)], dim=-2)
    lw = torch.full(pts.shape[:-1], -math.log(2 * n), dtype=pts.dtype, device=pts.device)
    return pts, lw


# -- observations with missing entries ---------------------------------------------------------------

def masked_observation(innovation: torch.Tensor, obs_anomalies: torch.Tensor, noise_cov: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove unobserved entries exactly, keeping shapes fixed for batching.

    Parameters
    ----------
    innovation : (*batch, m)
        ``y - h(x)`` (any value where unobserved).
    obs_anomalies : (*batch, k, m)
        Observation-space anomalies or rows of ``H^T`` (``k`` members or state variables).
    noise_cov : (m, m)
        ``R``.
    mask : (*batch, m) bool
        Observed entries.

    Returns
    -------
    innovation, obs_anomalies, noise_cov
        Zero in the unobserved entries, and ``R`` with unobserved rows and columns replaced by those
        of the identity, shape ``(*batch, m, m)``. The Gaussian likelihood of the returned quantities
        equals that of the observed sub-vector alone: the unobserved block is decoupled and carries
        zero innovation and zero sensitivity.
    """
    zero = torch.zeros((), dtype=innovation.dtype, device=innovation.device)
    innov = torch.where(mask, innovation, zero)          # where, not a product: NaN * 0 would stay NaN
    anom = torch.where(mask.unsqueeze(-2), obs_anomalies, zero)
    both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    eye = torch.eye(noise_cov.shape[-1], dtype=innovation.dtype, device=innovation.device)
    r = torch.where(both, noise_cov.to(innovation), eye)
    return innov, anom, r


def gaussian_loglik(innovation: torch.Tensor, noise_cov: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log N(d; 0, C)`` of the observed entries of innovations ``d`` ``(*batch, k, m)``.

    ``noise_cov`` ``C`` is ``(m, m)`` or ``(*batch, m, m)`` (or per member, ``(*batch, k, m, m)``);
    ``mask`` ``(*batch, m)`` selects the observed entries. Unobserved entries are removed exactly (see
    :func:`masked_observation`): the result is the log-density of the observed sub-vector, with its
    normalising constant, so it can be summed into a log-evidence. Returns ``(*batch, k)``.

    Raises
    ------
    InputError
        Naming ``noise_cov`` when ``C`` (restricted to the observed entries) is not positive definite:
        the density does not exist, and a NaN or a wrong number would pass for one.
    """
    zero = torch.zeros((), dtype=innovation.dtype, device=innovation.device)
    if noise_cov.ndim == 2 and bool(mask.all()):          # fast path: one R, everything observed
        r = noise_cov.to(innovation)
        m = innovation.shape[-1]
        diag = torch.diagonal(r)
        if torch.count_nonzero(r - torch.diag(diag)) == 0:          # diagonal R: scale each entry
            if not bool((diag > 0).all()):
                raise InputError("noise_cov", "a positive-definite covariance (positive variances)",
                                 f"smallest diagonal entry {float(diag.min()):.3g}")
            # a mat-vec with 1/R_ii: on the CPU much faster than a broadcast division and a sum
            white_sq = (innovation * innovation) @ diag.reciprocal()
            logdet = 0.5 * torch.log(diag).sum()
        else:                                                        # one matrix product with L^-1
            chol = _cholesky_pd(r)
            inv = torch.linalg.solve_triangular(chol, torch.eye(m, dtype=r.dtype, device=r.device), upper=False)
            white_sq = ((innovation @ inv.T) ** 2).sum(-1)
            logdet = torch.log(torch.diagonal(chol)).sum()
        return -0.5 * white_sq - logdet - 0.5 * m * math.log(2 * math.pi)
    d = torch.where(mask.unsqueeze(-2), innovation, zero)
    both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
    c = noise_cov.to(d)
    c = torch.where(both if c.ndim <= d.ndim else both.unsqueeze(-3), c, eye)
    return masked_logpdf_chol(d, _cholesky_pd(c), mask)


def _cholesky_pd(c: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of ``c``, or an :class:`InputError` naming ``noise_cov`` when ``c`` is not
    symmetric positive definite (or not finite)."""
    chol, info = torch.linalg.cholesky_ex(c)
    if bool((info != 0).any()) or not bool(torch.isfinite(chol).all()):
        raise InputError("noise_cov", "a finite positive-definite covariance", "a matrix whose Cholesky "
                         "factorisation fails (not positive definite, or NaN/infinite entries)")
    return chol


def gaussian_logpdf_chol(d: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``log N(d; 0, L L^T)`` for ``d`` ``(*batch, k, m)`` and a lower-triangular ``L`` shared by the
    ``k`` rows (``(*batch, m, m)`` or any broadcastable shape with fewer dims) or one per row
    (``(*batch, k, m, m)``). Returns ``(*batch, k)``."""
    if chol.ndim == d.ndim + 1:                                       # one factor per row
        white = torch.linalg.solve_triangular(chol, d.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    else:
        white = torch.linalg.solve_triangular(chol, d.transpose(-1, -2), upper=False).transpose(-1, -2)
        logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1).unsqueeze(-1)
    return -0.5 * (white**2).sum(-1) - logdet - 0.5 * d.shape[-1] * math.log(2 * math.pi)


def masked_logpdf_chol(d: torch.Tensor, chol: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`gaussian_logpdf_chol` of innovations already masked by :func:`masked_observation`
    (zero where unobserved, identity block in the covariance): the log-density of the observed
    entries alone, so the ``2 pi`` constant counts only those."""
    unobserved = (~mask).sum(-1, keepdim=True).to(d.dtype)
    return gaussian_logpdf_chol(d, chol) + 0.5 * unobserved * math.log(2 * math.pi)


# -- wrappers ------------------------------------------------------------------------------------------

def inflate(filt: Filter, factor: float) -> Filter:
    """Multiplicative inflation of the analysis: anomalies about the weighted mean are scaled by
    ``factor`` after each analysis (DAPPER's ``infl``), covariances by ``factor^2``.

    Returns a new :class:`Filter` named ``"<name>"`` with ``config["inflation"] = factor``.
    """
    factor = check_real(factor, "inflation", positive=True, expected="a positive factor (1 = none, typically 1.01-1.1)")

    def analysis(state, y, operator, mask, g):
        state, info = filt.analysis(state, y, operator, mask, g)
        if isinstance(state, GaussianState):
            return GaussianState(state.mean, state.cov * factor**2), info
        if isinstance(state, EnsembleState):
            mean = weighted_mean(state.x, state.log_weight)
            return state._replace(x=mean + factor * (state.x - mean)), info
        raise ShapeError("state", "an EnsembleState or GaussianState to inflate", type(state).__name__)

    return filt._replace(config={**filt.config, "inflation": factor}, analysis=analysis)
