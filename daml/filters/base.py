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

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from ..errors import DtypeError, InputError, NonFiniteError, ShapeError, check_int, check_real
from ..models.base import Model, _propagate, as_covariance, as_real_tensor, check_memory, covariance_root, propagate

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


# -- input checks of the public building blocks ------------------------------------------------------------

_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("daml_filters_checks", default=True)


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Inside this block the public building blocks of this module (:func:`ensemble_members`,
    :func:`gaussian_members`, :func:`masked_observation`, :func:`gaussian_loglik`,
    :func:`ensemble_forecast`) skip their input checks.

    :func:`daml.filters.run` runs its time loop inside it: it validates the data and prior once, and
    checks the members and weights for divergence after every analysis, so checking the inputs of
    every building block again on every cycle would only cost time (and would report a divergence as
    bad input). Called anywhere else, the building blocks check everything.
    """
    token = _CHECKS.set(False)
    try:
        yield
    finally:
        _CHECKS.reset(token)


def _real(value: Any, name: str, ndim: int = 1, like: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` as a float32/float64 tensor with at least ``ndim`` dims, none of them empty (in the
    dtype and on the device of ``like`` if given), else a daml error naming ``name``."""
    t = as_real_tensor(value, name, dtype=None if like is None else like.dtype,
                       device=None if like is None else like.device)
    if t.dtype not in (torch.float32, torch.float64):
        raise DtypeError(name, "float32 or float64 values", f"dtype {t.dtype}")
    if t.ndim < ndim or 0 in t.shape:
        raise ShapeError(name, f"a non-empty array with at least {ndim} dims", f"shape {tuple(t.shape)}")
    return t


def _finite(t: torch.Tensor, name: str, what: str = "finite values") -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(name, what, "NaN or infinite entries")


def _bool_mask(value: Any, name: str, m: int, like: torch.Tensor) -> torch.Tensor:
    """A bool mask ``(*batch, m)``: a float or int mask is refused (``0.5`` or NaN is no answer to
    "observed?")."""
    if isinstance(value, torch.Tensor):
        t = value
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise DtypeError(name, "a bool array (True where observed)", type(value).__name__) from exc
        if arr.dtype != bool:
            raise DtypeError(name, "a bool array (True where observed)", f"{type(value).__name__} of dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype != torch.bool:
        raise DtypeError(name, "a bool tensor (True where observed)", f"dtype {t.dtype}")
    if t.ndim == 0 or t.shape[-1] != m:
        raise ShapeError(name, f"a last axis of length {m} (one flag per observation)", f"shape {tuple(t.shape)}")
    return t.to(like.device)


def _broadcast(name: str, *shapes: tuple[int, ...]) -> None:
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError as exc:
        raise ShapeError(name, "batch dims that broadcast with the other arguments'",
                         f"shapes {[tuple(s) for s in shapes]}") from exc


def _check_cov(c: torch.Tensor, name: str, n: int, semidefinite: bool = False) -> None:
    """``c`` ``(*batch, n, n)``: finite, symmetric (to rounding) and positive definite (or, with
    ``semidefinite``, no eigenvalue below rounding of zero), else a daml error naming ``name``."""
    if c.ndim < 2 or tuple(c.shape[-2:]) != (n, n):
        raise ShapeError(name, f"a covariance of shape (..., {n}, {n})", f"shape {tuple(c.shape)}")
    _finite(c, name, "a finite covariance")
    scale = float(c.abs().max()) if c.numel() else 0.0
    tol = max(1e-12, 10 * n * torch.finfo(c.dtype).eps)
    if float((c - c.transpose(-1, -2)).abs().max()) > tol * scale:
        raise InputError(name, "a symmetric covariance", "an asymmetric matrix")
    _, info = torch.linalg.cholesky_ex(c)
    if int(info.max()) != 0:
        eig_min = float(torch.linalg.eigvalsh(c).min())
        if not (semidefinite and eig_min >= -tol * scale):
            raise InputError(name, "a positive-semidefinite covariance" if semidefinite else
                             "a positive-definite covariance", f"smallest eigenvalue {eig_min:.3g}")


def register(name: str) -> Callable[[Callable[..., Filter]], Callable[..., Filter]]:
    """Decorator registering a filter constructor under ``name`` (a non-empty string)."""
    if not isinstance(name, str) or not name:
        raise InputError("name", "a non-empty string (the filter's registry name)", repr(name))

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
    """``init`` drawing ``members`` equally weighted members from ``N(mean, cov)``.

    ``members`` is checked at once (an int ``>= 1``); the returned ``init(model, mean, cov, g)``
    checks ``mean`` (finite, ``(*batch, n)`` with ``n`` the model's state size), ``cov`` (a finite,
    symmetric, positive-semidefinite ``(n, n)`` matrix) and ``g`` (a ``torch.Generator``), and that the
    draws fit in memory.
    """
    members = check_members(members, minimum=1)

    def init(model: Model, mean: torch.Tensor, cov: torch.Tensor, g: torch.Generator) -> EnsembleState:
        mean = _real(mean, "mean")
        _finite(mean, "mean", "a finite prior mean")
        size = getattr(model, "state_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and mean.shape[-1] != size:
            raise ShapeError("mean", f"a last axis of length {size} (the model's state size)",
                             f"shape {tuple(mean.shape)}")
        if not isinstance(g, torch.Generator):
            raise InputError("g", "a torch.Generator (the random stream of the draws)", type(g).__name__)
        # the draws, the members and the product's temporary: three arrays of the ensemble's size
        nbytes = 3 * math.prod(mean.shape[:-1]) * members * mean.shape[-1] * mean.element_size()
        check_memory(nbytes, "members", f"{members} members of {mean.shape[-1]} variables"
                     + (f" in {math.prod(mean.shape[:-1])} experiments" if mean.ndim > 1 else ""), mean.device)
        cov = as_covariance(cov, mean.shape[-1], "cov", dtype=mean.dtype, device=mean.device)
        root = covariance_root(cov)
        z = torch.randn(*mean.shape[:-1], members, mean.shape[-1], generator=g, dtype=mean.dtype, device=mean.device)
        x = mean.unsqueeze(-2) + z @ root.T
        lw = torch.full(x.shape[:-1], -math.log(members), dtype=mean.dtype, device=mean.device)
        return EnsembleState(x, lw)

    return init


def ensemble_forecast(state: EnsembleState, model: Model, g: torch.Generator) -> EnsembleState:
    """Propagate every member one model step (noise from ``model.noise_cov`` if any); weights unchanged."""
    if not _CHECKS.get():      # inside run's loop: a blow-up is run's DivergenceError, not bad input
        return EnsembleState(_propagate(model, state.x, 1, g), state.log_weight)
    if not isinstance(state, EnsembleState):
        raise InputError("state", "an EnsembleState(x, log_weight)", type(state).__name__)
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
    """The ensemble as it is, after checking it: ``x`` ``(*batch, N, n)`` and ``log_weight``
    ``(*batch, N)`` real and finite (a NaN, an infinite member or a weight of ``exp(inf)`` or of
    zero for every member would be recorded as a posterior)."""
    if not _CHECKS.get():
        return state.x, state.log_weight
    if not isinstance(state, EnsembleState):
        raise InputError("state", "an EnsembleState(x, log_weight)", type(state).__name__)
    x = _real(state.x, "x", ndim=2)
    lw = _real(state.log_weight, "log_weight", like=x)
    if tuple(lw.shape) != tuple(x.shape[:-1]):
        raise ShapeError("log_weight", f"shape {tuple(x.shape[:-1])} (one per member of x)", f"shape {tuple(lw.shape)}")
    _finite(x, "x", "finite members")
    _finite(lw, "log_weight", "finite log-weights")
    return x, lw


def gaussian_members(state: GaussianState) -> tuple[torch.Tensor, torch.Tensor]:
    """``2n`` sigma points ``mean +- sqrt(n) L e_i`` with equal weights: their weighted mean and
    (plug-in) covariance are exactly ``mean`` and ``cov``.

    Raises
    ------
    InputError
        Naming ``state``, ``mean`` or ``cov`` (its subclasses as fit): not a :class:`GaussianState`,
        not real, wrong shapes, NaN or infinite entries, a ``cov`` that is not symmetric positive
        semidefinite (its sigma points would have another covariance).
    """
    if _CHECKS.get():
        if not isinstance(state, GaussianState):
            raise InputError("state", "a GaussianState(mean, cov)", type(state).__name__)
        mean = _real(state.mean, "mean")
        cov = _real(state.cov, "cov", ndim=2, like=mean)
        n = mean.shape[-1]
        if tuple(cov.shape[-2:]) != (n, n):
            raise ShapeError("cov", f"shape (..., {n}, {n}) ({n}: the last axis of mean)", f"shape {tuple(cov.shape)}")
        _finite(mean, "mean", "a finite mean")
        _check_cov(cov, "cov", n, semidefinite=True)
        _broadcast("cov", tuple(mean.shape[:-1]), tuple(cov.shape[:-2]))
        state = GaussianState(mean, cov)
    return _gaussian_members(state)


def _gaussian_members(state: GaussianState) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gaussian_members` without the checks."""
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

    Raises
    ------
    InputError
        Naming the argument (its subclasses as fit): not real, shapes that do not match, a ``mask``
        that is not bool, NaN or infinite entries where observed, or an ``R`` whose observed block is
        not symmetric positive definite.
    """
    if not _CHECKS.get():
        return _masked_observation(innovation, obs_anomalies, noise_cov, mask)
    innovation = _real(innovation, "innovation")
    m = innovation.shape[-1]
    obs_anomalies = _real(obs_anomalies, "obs_anomalies", ndim=2, like=innovation)
    if obs_anomalies.shape[-1] != m:
        raise ShapeError("obs_anomalies", f"a last axis of length {m} (that of innovation)",
                         f"shape {tuple(obs_anomalies.shape)}")
    noise_cov = _real(noise_cov, "noise_cov", ndim=2, like=innovation)
    if tuple(noise_cov.shape) != (m, m):
        raise ShapeError("noise_cov", f"shape ({m}, {m}) ({m}: the length of innovation)", f"shape {tuple(noise_cov.shape)}")
    mask = _bool_mask(mask, "mask", m, innovation)
    _broadcast("mask", tuple(mask.shape), tuple(innovation.shape), tuple(obs_anomalies.shape[:-2]) + (m,))
    innov, anom, r = _masked_observation(innovation, obs_anomalies, noise_cov, mask)
    _finite(innov, "innovation", "finite values where observed")
    _finite(anom, "obs_anomalies", "finite values where observed")
    _check_cov(r, "noise_cov", m)
    return innov, anom, r


def _masked_observation(innovation: torch.Tensor, obs_anomalies: torch.Tensor, noise_cov: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`masked_observation` without the checks."""
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
        the density does not exist, and a NaN or a wrong number would pass for one. Naming the
        other arguments (its subclasses as fit) when they are not real, their shapes do not match,
        ``mask`` is not bool, or an observed innovation is NaN or infinite.
    """
    if not _CHECKS.get():
        return _gaussian_loglik(innovation, noise_cov, mask)
    innovation = _real(innovation, "innovation", ndim=2)
    m = innovation.shape[-1]
    noise_cov = _real(noise_cov, "noise_cov", ndim=2, like=innovation)
    if tuple(noise_cov.shape[-2:]) != (m, m) or noise_cov.ndim > innovation.ndim + 1:
        raise ShapeError("noise_cov", f"shape (..., {m}, {m}) with at most {innovation.ndim + 1} dims (those of "
                         f"innovation, shape {tuple(innovation.shape)})",
                         f"shape {tuple(noise_cov.shape)}")
    _finite(noise_cov, "noise_cov", "a finite covariance")
    mask = _bool_mask(mask, "mask", m, innovation)
    _broadcast("mask", tuple(mask.shape[:-1]), tuple(innovation.shape[:-2]))
    out = _gaussian_loglik(innovation, noise_cov, mask)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError("innovation", "finite values where observed (and small enough that their squares "
                             "are finite)", "NaN or infinite entries, or a log-density that overflows")
    return out


def _gaussian_loglik(innovation: torch.Tensor, noise_cov: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`gaussian_loglik` without the input checks (``noise_cov`` is still factorised with a
    check: the density does not exist without it)."""
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
    if not isinstance(filt, Filter):
        raise InputError("filt", "a daml.filters.Filter to inflate", type(filt).__name__)
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
