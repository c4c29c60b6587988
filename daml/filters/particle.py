"""Particle filters: bootstrap, optimal-proposal, auxiliary and improved auxiliary.

A particle filter carries a weighted sample ``{x_i, w_i}`` of the filtering distribution. Between
observations the particles follow the model; at an observation time each weight is multiplied by
``p(y | x_i) p(x_i | x_i^-) / q(x_i | x_i^-, y)``, the target over the proposal that drew the particle,
and the weights are renormalised. All weights are kept as logarithms, so nothing underflows until the
very last ``exp``. When one weight takes almost everything (the effective sample size
``ESS = 1 / sum w_i^2`` drops), the sample is resampled: each particle is replaced by ``n_i`` copies
with ``E[n_i] = N w_i`` (the schemes of :mod:`daml.resampling`) and the weights become ``1/N``.

The four filters here differ in the proposal ``q`` of the last model step before an observation:

``bootstrap`` (Gordon et al. 1993)
    ``q`` is the model itself, so the weight is the likelihood ``p(y | x_i)``. Simple and general (any
    model, any observation operator) but the weights degenerate as the number of independent
    observations grows: the ESS collapses roughly like ``exp(-c m)`` (Snyder et al. 2008). Options:
    adaptive resampling below ``threshold * N`` and regularisation ``jitter`` (DAPPER's ``reg``):
    resampled copies of one particle get Gaussian noise with covariance
    ``(jitter * N^(-1/(n+4)))^2`` times the weighted ensemble covariance (Scott's bandwidth), so
    they do not stay identical under a perfect model.
``optimal`` (Doucet et al. 2000)
    For Gaussian model noise ``N(0, Q)`` and linear Gaussian observations, the last step draws from
    ``p(x | x_i^-, y) = N(f_i + K (y - H f_i), P)`` with ``f_i = M(x_i^-)``, ``K = Q H^T S^-1``,
    ``S = H Q H^T + R``, ``P = Q - K H Q``; the weight ``N(y; H f_i, S)`` does not depend on the draw,
    so its variance is the smallest possible for a one-step proposal. For a nonlinear ``h`` the
    proposal uses ``h`` linearised at ``f_i`` (a Gaussian approximation) and the weights are the exact
    ratio ``p(y | x) N(x; f_i, Q) / N(x; mean_i, P_i)``, so the filter stays consistent.
``auxiliary`` (Pitt & Shephard 1999; second stage in the multiple-importance-sampling reading of Elvira et al. 2019)
    Looks ahead before moving: ancestors are drawn with first-stage weights ``lambda_i`` proportional
    to ``w_i`` times the predictive likelihood ``N(y; h(f_i), H Q H^T + R)``, moved with the model
    noise, and weighted by the target over the mixture proposal,
    ``p(y | x) sum_j w_j N(x; f_j, Q) / sum_j lambda_j N(x; f_j, Q)`` (the multiple-importance-sampling
    form, ``O(N^2)`` kernel evaluations, batched).
``iapf`` (the improved auxiliary particle filter of Elvira, Martino, Bugallo & Djuric 2019)
    The same two stages with the first-stage weights
    ``lambda_i ~ p(y | mu_i) sum_j w_j f(mu_i | x_j) / sum_j f(mu_i | x_j)`` at the predicted means
    ``mu_i`` (the observation likelihood at the point, as in the paper), which match the proposal
    mixture to the target at those points when the kernels overlap. It evaluates the model's own
    transition density where the model has one (``sample_step`` and ``log_transition``, see
    :mod:`daml.models.base`), so it also runs non-Gaussian transitions.

When several model steps separate two observations, the earlier steps follow the model with its
noise (weights unchanged) and only the last step uses the proposal. Every analysis reports the
``ess`` (after reweighting, before resampling), whether it ``resampled``, and ``log_evidence``, the
estimate of ``log p(y_t | y_1:t-1)``: the sum over times estimates the log marginal likelihood, and
its exponential is unbiased (Del Moral 2004), which the tests check against the Kalman filter.

What an analysis reports (``record`` of :func:`bootstrap` and :func:`optimal`): by default the
members after the resampling and jitter, which the filter carries on; with
``record="before_resampling"`` the weighted ensemble before them (the reweighted forecast), as DAPPER
scores its particle filters. Only the report changes: the resampling still happens inside the
analysis, on the same random stream, so the members carried into the next forecast are the same.

Non-Gaussian transitions: a model with ``sample_step`` draws its own steps in every filter here that
only samples the model (``bootstrap``, the steps between observations of ``iapf``); ``iapf`` also
weighs with its ``log_transition``; ``optimal`` and ``auxiliary``, whose algebra needs
``step(x) + N(0, Q)``, refuse it at ``init`` naming ``model``.

Model noise: the proposal filters need ``Q``. It is the model's ``noise_cov`` unless the filter is
given ``model_noise`` (a scalar variance, a vector of variances, a matrix, or a mapping
``{"variance": v, "length": L}`` for :func:`daml.models.periodic_covariance`, which TOML files can
write as ``model_noise = {variance = 0.5, length = 2.0}``), which then replaces it
for the filter's own propagation (for example to assimilate with a perfect model, whose truth has no
noise, as DAPPER's ``OptPF`` does with ``Qs``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import torch

from .. import _device
from .. import resampling as _resampling
from ..errors import DivergenceError, InputError, check_real
from ..models.base import (Model, as_covariance, check_gaussian_transition, covariance_root, has_gaussian_transition,
                           periodic_covariance, transition_log_density, transition_sample)
from ..models.observations import Observation
from .base import (EnsembleState, Filter, Upcoming, check_members, ensemble_init, ensemble_members,
                   gaussian_loglik, weighted_anomalies, gaussian_logpdf_chol, masked_logpdf_chol, masked_observation, register)

__all__ = ["bootstrap", "auxiliary", "iapf", "optimal", "NoiseModel", "log_normalise"]


# -- shared pieces -------------------------------------------------------------------------------------

def weighted_covariance(x: torch.Tensor, log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sample covariance ``(*batch, n, n)`` of members ``x`` ``(*batch, N, n)`` with the unbiased
    normalisation ``sum_i w_i (x_i - m)(x_i - m)^T / (1 - sum_i w_i^2)``; equal weights without
    ``log_weight``, and where one weight holds everything (no spread to measure)."""
    if log_weight is None:
        w = torch.full(x.shape[:-1], 1.0 / x.shape[-2], dtype=x.dtype, device=x.device)
    else:
        w = torch.softmax(log_weight, dim=-1)
    cov = _covariance_lower(x, w)
    return 0.5 * (cov + cov.transpose(-1, -2))


def _covariance_lower(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`weighted_covariance` for normalised weights ``w``, symmetric up to rounding; the lower
    triangle is all :func:`covariance_root` reads (Cholesky, and ``eigh`` where that fails).
    ``dtype``: form the product ``A^T A`` of the anomalies (computed in ``x``'s dtype) in this one."""
    degenerate = (w * w).sum(-1, keepdim=True) > 1.0 - 1e-10
    w = torch.where(degenerate, torch.full_like(w, 1.0 / x.shape[-2]), w)
    _, a = weighted_anomalies(x, w)
    if dtype is not None:
        a = a.to(dtype)
    return a.transpose(-1, -2) @ a


class NoiseModel:
    """The filter's model-noise covariance ``Q``: given, or the model's ``noise_cov`` (resolved at
    ``init``). Holds ``Q`` and a square root ``L`` (``L L^T = Q``).

    ``model_noise`` as a mapping ``{"variance", "length"}`` is the periodic covariance of
    :func:`daml.models.periodic_covariance`. Adding ``"ensemble": gamma`` (and optionally
    ``"radius"``) makes ``Q`` flow-dependent: at every use it is
    ``gamma * (rho o C) + Q_static``, with ``C`` the (weighted) sample covariance of the ensemble it
    is applied to, ``rho`` the Gaspari-Cohn taper of :func:`daml.filters.letkf.ring_taper` with
    ``radius`` in grid points of a ring (``math.inf``, the default: no taper) and ``Q_static`` the
    periodic part, which keeps ``Q`` positive definite when the ensemble is smaller than the state.
    All members share the same ``Q`` at a given step, so the transition density stays one Gaussian
    per member, ``N(M(x_i), Q)``: the prior of an analysis is the Gaussian mixture (kernel density)
    of the forecasts with kernel ``Q``, as in Gaussian-mixture and kernel particle filters.
    """

    KEYS = {"variance", "length", "ensemble", "radius"}

    def __init__(self, model_noise: Any, who: str, required: bool):
        self.given = model_noise
        self.who = who
        self.required = required
        self.q: torch.Tensor | None = None
        self.root: torch.Tensor | None = None
        self.gamma = 0.0
        self.taper: torch.Tensor | None = None
        expected = ("a mapping {variance, length} (a periodic covariance), optionally with "
                    "ensemble (a non-negative scale) and radius (a positive localisation radius)")
        if isinstance(model_noise, dict):
            unknown = set(model_noise) - self.KEYS
            if unknown or "variance" not in model_noise:
                raise InputError("model_noise", expected, repr(model_noise))
            periodic_covariance(2, model_noise["variance"], model_noise.get("length", 0.0))   # validates
            gamma = model_noise.get("ensemble", 0.0)
            if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not (math.isfinite(gamma) and gamma >= 0):
                raise InputError("model_noise", "ensemble: a finite non-negative scale of the ensemble covariance",
                                 repr(gamma))
            radius = model_noise.get("radius", math.inf)
            if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or not radius > 0:
                raise InputError("model_noise", "radius: a positive localisation radius in grid points (inf: none)",
                                 repr(radius))
            if "radius" in model_noise and "ensemble" not in model_noise:
                raise InputError("model_noise", "radius only together with ensemble", repr(model_noise))
            self.gamma = float(gamma)
        elif isinstance(model_noise, numbers.Real) and not (math.isfinite(model_noise) and model_noise > 0):
            raise InputError("model_noise", "a positive variance or a positive-definite covariance",
                             repr(model_noise))

    @property
    def flow_dependent(self) -> bool:
        return self.gamma > 0

    def resolve(self, model: Model) -> None:
        n = model.state_size
        q = self.given if self.given is not None else getattr(model, "noise_cov", None)
        if isinstance(q, dict):
            if self.flow_dependent and math.isfinite(q.get("radius", math.inf)):
                from .letkf import ring_taper
                self.taper = ring_taper(n, float(q["radius"]))
            q = periodic_covariance(n, q["variance"], q.get("length", 0.0))
        if q is not None:
            q = as_covariance(q, n, "model_noise", allow_zero=not self.required)
        if q is None and self.required:
            raise InputError("model_noise", f"a model-noise covariance Q for {self.who} (the model is perfect)",
                             None, hint="pass model_noise=<variance or (n, n) matrix>")
        self.q = q
        self.root = None if q is None else covariance_root(q)

    def get(self, like: torch.Tensor,
            log_weight: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``Q`` and its root for the members ``like`` ``(*batch, N, n)`` (flow-dependent ``Q``: from
        their sample covariance, weighted by ``log_weight`` when given; one ``Q`` per experiment)."""
        if self.q is None:
            return None, None
        if not self.flow_dependent:
            return self.q.to(like), self.root.to(like)
        cov = weighted_covariance(like, log_weight)
        if self.taper is not None:
            cov = cov * self.taper.to(like)
        q = self.gamma * cov + self.q.to(like)
        q = 0.5 * (q + q.transpose(-1, -2))
        root, info = torch.linalg.cholesky_ex(q)
        if bool((info != 0).any()):
            if not bool(torch.isfinite(like).all()):
                raise DivergenceError(f"{self.who}: non-finite members in the ensemble part of model_noise")
            root = covariance_root(q)
        return q, root

    def config(self) -> Any:
        if self.given is None:
            return "model"
        if isinstance(self.given, dict):
            return dict(self.given)
        t = torch.as_tensor(self.given)
        return float(t) if t.ndim == 0 else t.tolist()


def log_normalise(log_weight: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise log-weights over the last axis; return them and the log of the normalising sum.

    Raises :class:`DivergenceError` (without a step: :func:`daml.filters.run` adds it) when the sum is
    zero or not finite, that is when every weight underflowed to zero or a likelihood was NaN.
    """
    log_z = torch.logsumexp(log_weight, dim=-1)
    if not bool(torch.isfinite(log_z).all()):
        bad = int((~torch.isfinite(log_z)).sum())
        raise DivergenceError(f"{what}: every particle weight is zero or not finite in {bad} of "
                              f"{log_z.numel()} experiments (the observations are impossible under "
                              f"every particle, or the likelihood returned NaN)")
    return log_weight - log_z.unsqueeze(-1), log_z


def kish_ess(log_weight: torch.Tensor) -> torch.Tensor:
    """``1 / sum w^2`` for normalised log-weights ``(..., N)``."""
    return torch.exp(-torch.logsumexp(2.0 * log_weight, dim=-1))


def check_threshold(threshold: Any) -> float:
    t = check_real(threshold, "threshold", expected="a fraction in [0, 1] of N below which the ESS triggers resampling")
    if not 0.0 <= t <= 1.0:
        raise InputError("threshold", "a fraction in [0, 1] of N", repr(threshold))
    return t


def check_resampling(method: Any) -> str:
    if method not in _resampling.METHODS:
        raise InputError("resampling", f"one of {sorted(_resampling.METHODS)}", repr(method))
    return method


def check_jitter(jitter: Any) -> float:
    j = check_real(jitter, "jitter", expected="a non-negative bandwidth factor (0: none)")
    if j < 0:
        raise InputError("jitter", "a non-negative bandwidth factor (0: none)", repr(jitter))
    return j


def gather_members(x: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """``x[..., ancestors[..., j], :]``: members ``(*batch, N, n)`` picked by ``(*batch, N)`` indices."""
    return torch.gather(x, -2, ancestors.unsqueeze(-1).expand(*ancestors.shape, x.shape[-1]))


def duplicates(ancestors: torch.Tensor) -> torch.Tensor:
    """``True`` for every particle whose ancestor was drawn more than once (all its copies, as in
    DAPPER's ``reg``); particles drawn once are left alone. Shape of ``ancestors``."""
    counts = torch.zeros_like(ancestors).scatter_add_(-1, ancestors, torch.ones_like(ancestors))
    return torch.gather(counts, -1, ancestors) > 1


def resample_where(x: torch.Tensor, log_weight: torch.Tensor, flag: torch.Tensor, method: str, jitter: float,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample the experiments where ``flag`` ``(*batch,)`` holds; others are left alone.

    Returns the members, log-weights (``-log N`` where resampled) and the ancestors (identity where
    not resampled). With ``jitter > 0`` the duplicated copies get regularisation noise scaled by
    Scott's bandwidth times the weighted covariance before resampling (DAPPER's ``reg``).
    """
    n_members, n = x.shape[-2], x.shape[-1]
    identity = torch.arange(n_members, device=x.device).expand(log_weight.shape)
    if not bool(flag.any()):
        return x, log_weight, identity
    w = torch.exp(log_weight)
    anc = _resampling.resample_normalised(w, method, g)
    anc = torch.where(flag.unsqueeze(-1), anc, identity)
    new_x = gather_members(x, anc)
    if jitter > 0:
        _jitter_duplicates(new_x, x, w, duplicates(anc) & flag.unsqueeze(-1),
                           jitter * n_members ** (-1.0 / (n + 4)), g)
    uniform = torch.full_like(log_weight, -math.log(n_members))
    return new_x, torch.where(flag.unsqueeze(-1), uniform, log_weight), anc


def _jitter_duplicates(new_x: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dup: torch.Tensor, bandwidth: float,
                       g: torch.Generator) -> None:
    """Add ``bandwidth * L z`` to the rows of ``new_x`` marked in ``dup``, with ``L L^T`` the weighted
    covariance of the members ``x`` before resampling (weights ``w``) and ``z`` standard normal.

    Row ``k`` of the one draw ``z`` belongs to the ``k``-th duplicate in row-major order. The
    covariance product and ``L z`` are formed in :func:`daml._device.smoothing_dtype` (float32 for
    float64 members on the CPU, where they are cheaper): the noise only smooths the sample and
    its scale is an estimate, so float32's rounding is far below its Monte Carlo error. The anomalies
    and the Cholesky factor are computed in the members' dtype; where the rounding of the product has
    left a nearly singular covariance indefinite, :func:`_rounded_root` shifts its diagonal by that
    rounding's size.
    """
    work = _device.smoothing_dtype(x.dtype, x.device)
    cov = _covariance_lower(x, w, dtype=work).to(x.dtype)
    root = (covariance_root(cov) if work == x.dtype else _rounded_root(cov, torch.finfo(work).eps / 2))
    root = (root * bandwidth).to(work)
    where = dup.nonzero(as_tuple=True)
    z = _device.smoothing_noise((where[0].numel(), x.shape[-1]), g, x.dtype, x.device)
    # (L z^T)^T rather than z L^T: the same product, faster on the CPU with the long axis last
    if dup.ndim == 1:                                 # one experiment: transform the duplicates' rows only
        new_x.index_add_(0, where[0], (root @ z.mT).mT.to(new_x.dtype))
        return
    eps = torch.zeros(new_x.shape, dtype=work, device=new_x.device)
    eps[where] = z
    new_x.add_((root @ eps.mT).mT)


def _rounded_root(cov: torch.Tensor, unit: float) -> torch.Tensor:
    """A square root of ``cov`` ``(*batch, n, n)``, a covariance formed by a product in a dtype of unit
    roundoff ``unit``: its Cholesky factor; where rounding has left a nearly singular ``cov`` indefinite,
    the factor of ``cov + delta I`` with ``delta = n * unit * max_i cov_ii`` (the size of that
    rounding: the directions it blurs get noise of at most that variance); the eigendecomposition
    (:func:`covariance_root`) only where that fails too."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info.max()) == 0:
        return chol
    n = cov.shape[-1]
    delta = torch.where(info != 0, n * unit * torch.diagonal(cov, dim1=-2, dim2=-1).amax(-1), 0.0)
    chol, info = torch.linalg.cholesky_ex(torch.diagonal_scatter(cov, torch.diagonal(cov, dim1=-2, dim2=-1)
                                                                 + delta.unsqueeze(-1), dim1=-2, dim2=-1))
    if int(info.max()) == 0:
        return chol
    return covariance_root(cov)


def check_sir(members: Any, threshold: Any, resampling: Any, jitter: Any) -> tuple[int, float, str, float]:
    """The parameters shared by the sequential-importance-resampling filters, checked."""
    return check_members(members), check_threshold(threshold), check_resampling(resampling), check_jitter(jitter)


def reweight_and_resample(x: torch.Tensor, log_weight: torch.Tensor, increment: torch.Tensor, who: str,
                          threshold: float, resampling: str, jitter: float, g: torch.Generator,
                          record: str = "after_resampling"):
    """Add the log-weight ``increment`` (NaN counts as impossible), renormalise, resample where
    ``ESS <= threshold * N``; return the state and the ``info`` of a particle-filter analysis.
    ``record``: which ensemble the state reports as the analysis (:func:`recorded_state`)."""
    lw, log_z = log_normalise(log_weight + torch.nan_to_num(increment, nan=-math.inf), who)
    ess = kish_ess(lw)
    flag = ess <= threshold * x.shape[-2]
    new_x, new_lw, _ = resample_where(x, lw, flag, resampling, jitter, g)
    return (recorded_state(new_x, new_lw, x, lw, record),
            {"ess": ess, "resampled": flag.to(x.dtype), "loglik": log_z})


# -- what an analysis records: before or after the resampling -------------------------------------------

RECORDS = ("after_resampling", "before_resampling")


def check_record(record: Any) -> str:
    """``record``: ``"after_resampling"`` or ``"before_resampling"``."""
    if not isinstance(record, str) or record not in RECORDS:
        raise InputError("record", f"one of {list(RECORDS)}", repr(record))
    return record


class RecordedEnsemble(EnsembleState):
    """An :class:`EnsembleState` (the resampled, jittered members the filter carries into the next
    forecast) that also holds ``recorded``, the weighted ensemble before the resampling: what
    :func:`particle_members`, and so :func:`daml.filters.run`, reports as the analysis. The two
    differ only in what is reported; the filter's trajectory is the same."""

    def __new__(cls, x: torch.Tensor, log_weight: torch.Tensor,
                recorded: tuple[torch.Tensor, torch.Tensor]) -> "RecordedEnsemble":
        self = super().__new__(cls, x, log_weight)
        self.recorded = recorded
        return self


def recorded_state(x: torch.Tensor, log_weight: torch.Tensor, before_x: torch.Tensor, before_log_weight: torch.Tensor,
                   record: str) -> EnsembleState:
    """The state after an analysis: the members ``x`` (after resampling) carried on; with
    ``record="before_resampling"`` it reports the weighted ensemble ``before_x`` as the analysis."""
    if record == "before_resampling":
        return RecordedEnsemble(x, log_weight, (before_x, before_log_weight))
    return EnsembleState(x, log_weight)


def particle_members(state: EnsembleState) -> tuple[torch.Tensor, torch.Tensor]:
    """The members an analysis reports: the weighted ensemble before the resampling where the filter
    was asked to record it (``record="before_resampling"``), else the ensemble as it is."""
    recorded = getattr(state, "recorded", None)
    return recorded if recorded is not None else (state.x, state.log_weight)


def masked_linear(operator: Observation, mask: torch.Tensor, like: torch.Tensor,
                  at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``H`` with unobserved rows zeroed, ``(*batch, m, n)`` (``(*batch, N, m, n)`` for a nonlinear
    operator linearised at ``at``), and ``R`` with the identity in the unobserved block."""
    zero = torch.zeros(mask.shape, dtype=like.dtype, device=like.device)
    if operator.linear:
        _, ht, r = masked_observation(zero, operator.matrix.to(like).T, operator.noise_cov, mask)
        return ht.transpose(-1, -2), r
    # one H per member: an extra member axis on the mask, dropped again from R
    _, ht, r = masked_observation(zero.unsqueeze(-2), operator.jacobian(at).transpose(-1, -2), operator.noise_cov,
                                  mask.unsqueeze(-2))
    return ht.transpose(-1, -2), r.squeeze(-3)


class GaussianStep(NamedTuple):
    """The Gaussian algebra of one proposal step from forecasts ``f`` (see :func:`gaussian_step`)."""

    innovation: torch.Tensor   # d = y - h(f), zero where unobserved        (*batch, N, m)
    gain_d: torch.Tensor       # K d = Q H^T S^-1 d                          (*batch, N, n)
    s_inv_d: torch.Tensor      # S^-1 d                                       (*batch, N, m)
    chol_s: torch.Tensor       # Cholesky factor of S                         (*batch[, N], m, m)
    cov: torch.Tensor          # P = Q - K H Q                                (*batch[, N], n, n)
    h: torch.Tensor            # masked H                                     (*batch[, N], m, n)
    r: torch.Tensor            # masked R                                     (*batch, m, m)


def gaussian_step(f: torch.Tensor, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                  q: torch.Tensor) -> GaussianStep:
    """Posterior of one step ``x ~ N(f, Q)`` given ``y = h(x) + N(0, R)``, ``h`` linear or linearised
    at ``f``; batched over experiments and members (``S``, ``P`` are shared by the members of an
    experiment when ``h`` is linear)."""
    h, r = masked_linear(operator, mask, f, at=f)
    zero = torch.zeros((), dtype=f.dtype, device=f.device)
    d = torch.where(mask.unsqueeze(-2), operator.residual(y.unsqueeze(-2), f), zero)
    hq = h @ q                                                     # (.., m, n)
    s = hq @ h.transpose(-1, -2) + (r if h.ndim == r.ndim else r.unsqueeze(-3))
    chol = torch.linalg.cholesky(0.5 * (s + s.transpose(-1, -2)))
    if h.ndim == f.ndim:                                           # shared S: solve all members at once
        s_inv_d = torch.cholesky_solve(d.transpose(-1, -2), chol).transpose(-1, -2)
        gain_d = s_inv_d @ hq
    else:                                                          # one S per member
        s_inv_d = torch.cholesky_solve(d.unsqueeze(-1), chol).squeeze(-1)
        gain_d = (s_inv_d.unsqueeze(-2) @ hq).squeeze(-2)
    p = q - hq.transpose(-1, -2) @ torch.cholesky_solve(hq, chol)
    return GaussianStep(d, gain_d, s_inv_d, chol, 0.5 * (p + p.transpose(-1, -2)), h, r)


def apply_root(eps: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``L eps`` for members ``eps`` ``(*batch, N, n)`` and roots ``L`` shared per experiment
    ``(*batch, n, n)`` or one per member ``(*batch, N, n, n)``."""
    if root.ndim == eps.ndim:
        return eps @ root.transpose(-1, -2)
    return (root @ eps.unsqueeze(-1)).squeeze(-1)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, L L^T)`` over the last axis, ``L`` lower triangular and invertible, shared by
    the members or one per member (see :func:`daml.filters.base.gaussian_logpdf_chol`)."""
    return gaussian_logpdf_chol(x - mean, root)


def pairwise_log_kernel(x: torch.Tensor, centres: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``log N(x_m; c_j, L L^T)`` for every pair: ``(*batch, M, J)``, through one matrix product
    (``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b`` in whitened coordinates), never an ``(M, J, n)`` tensor."""
    zx = torch.linalg.solve_triangular(root, x.transpose(-1, -2), upper=False).transpose(-1, -2)
    zc = torch.linalg.solve_triangular(root, centres.transpose(-1, -2), upper=False).transpose(-1, -2)
    sq = ((zx**2).sum(-1).unsqueeze(-1) + (zc**2).sum(-1).unsqueeze(-2)
          - 2.0 * zx @ zc.transpose(-1, -2)).clamp_min(0.0)
    logdet = torch.log(torch.diagonal(root, dim1=-2, dim2=-1)).sum(-1)[..., None, None]   # one root per experiment
    return -0.5 * sq - logdet - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def model_noise_step(model: Model, noise: NoiseModel) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """One model step with the filter's noise ``Q`` (none if ``Q`` is ``None``). A model with a
    non-Gaussian transition (``sample_step``, see :mod:`daml.models.base`) draws its own step
    (:func:`daml.models.base.transition_sample`) unless the filter was given ``model_noise``."""

    if noise.given is None and not has_gaussian_transition(model):
        return lambda x, g: transition_sample(model, x, g)

    def step(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        f = model.step(x)
        _, root = noise.get(f)
        if root is None:
            return f
        return f + torch.randn(f.shape, generator=g, dtype=f.dtype, device=f.device) @ root.transpose(-1, -2)

    return step


def deferred_forecast(noise: NoiseModel) -> Callable[..., EnsembleState]:
    """``forecast`` of a proposal filter: the model with noise ``Q``, except on the step that lands on
    an observation, which is left deterministic (``f = M(x)``) for the analysis to complete."""

    def forecast(state: EnsembleState, model: Model, g: torch.Generator, upcoming: Upcoming | None = None):
        if upcoming is not None and upcoming.steps == 1:
            return EnsembleState(model.step(state.x), state.log_weight)
        return EnsembleState(model_noise_step(model, noise)(state.x, g), state.log_weight)

    return forecast


def _init_with(noise: NoiseModel, members: int, gaussian: str | None = None):
    """``init`` resolving ``noise`` from the model; with ``gaussian`` (the filter's name) a model with
    a non-Gaussian transition is refused (:func:`daml.models.base.check_gaussian_transition`)."""
    base = ensemble_init(members)

    def init(model, mean, cov, g):
        if gaussian is not None:
            check_gaussian_transition(model, gaussian)
        noise.resolve(model)
        return base(model, mean, cov, g)

    return init


# -- bootstrap ------------------------------------------------------------------------------------------

@register("bootstrap")
def bootstrap(members: int, threshold: float = 0.5, resampling: str = "systematic", jitter: float = 0.0,
              model_noise: Any = None, record: str = "after_resampling") -> Filter:
    """Bootstrap particle filter (sequential importance resampling with the model as proposal).

    Parameters
    ----------
    members : int
        Number of particles ``N`` (at least 2).
    threshold : float in [0, 1]
        Resample when ``ESS <= threshold * N`` (DAPPER's ``NER``); ``1``: at every analysis, ``0``:
        never (plain sequential importance sampling).
    resampling : str
        ``"systematic"`` (default), ``"stratified"``, ``"residual"`` or ``"multinomial"``.
    jitter : float
        Regularisation of resampled copies (DAPPER's ``reg``), ``0``: none.
    model_noise : scalar, (n,) or (n, n), optional
        ``Q`` for the filter's propagation instead of the model's ``noise_cov``.
    record : str
        What each analysis reports: ``"after_resampling"`` (default), the equally weighted, jittered
        members the filter carries on; ``"before_resampling"``, the weighted ensemble before the
        resampling and jitter (the reweighted forecast), which is what DAPPER scores as its
        analysis. The filter's trajectory is the same either way (same seed, same members carried).
    """
    members, threshold, resampling, jitter = check_sir(members, threshold, resampling, jitter)
    record = check_record(record)
    noise = NoiseModel(model_noise, "bootstrap", required=False)

    forecast = deferred_forecast(noise)          # without lookahead: the model and its noise, every step

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator):
        x, lw = state
        ll = gaussian_loglik(operator.residual(y.unsqueeze(-2), x), operator.noise_cov, mask)
        return reweight_and_resample(x, lw, ll, "bootstrap", threshold, resampling, jitter, g, record)

    config = {"members": members, "threshold": threshold, "resampling": resampling, "jitter": jitter,
              "model_noise": noise.config(), "record": record}
    return Filter("bootstrap", config, _init_with(noise, members), forecast, analysis, particle_members, inference=True)


# -- optimal proposal -----------------------------------------------------------------------------------

@register("optimal")
def optimal(members: int, threshold: float = 0.5, resampling: str = "systematic", jitter: float = 0.0,
            model_noise: Any = None, record: str = "after_resampling") -> Filter:
    """Particle filter with the optimal proposal ``p(x_t | x_t-1, y_t)`` for Gaussian model noise.

    Exact for linear Gaussian observations; for a nonlinear ``h`` the proposal is Gaussian around
    ``h`` linearised at each forecast and the weights are the exact importance ratio. Parameters as
    :func:`bootstrap` (``record="before_resampling"`` reports the particles drawn from the proposal
    with their weights, before the resampling); ``Q`` (``model_noise`` or the model's ``noise_cov``)
    must be positive definite.
    """
    members, threshold, resampling, jitter = check_sir(members, threshold, resampling, jitter)
    record = check_record(record)
    noise = NoiseModel(model_noise, "the optimal-proposal particle filter", required=True)

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator):
        f, lw = state
        q, q_root = noise.get(f, lw)
        step = gaussian_step(f, y, operator, mask, q)
        mean = f + step.gain_d
        root = torch.linalg.cholesky(step.cov)
        x = mean + apply_root(torch.randn(f.shape, generator=g, dtype=f.dtype, device=f.device), root)
        if operator.linear:                    # N(y; H f, S), S already masked and factored
            inc = masked_logpdf_chol(step.innovation, step.chol_s, mask)
        else:
            inc = (gaussian_loglik(operator.residual(y.unsqueeze(-2), x), operator.noise_cov, mask)
                   + gaussian_log_density(x, f, q_root) - gaussian_log_density(x, mean, root))
        return reweight_and_resample(x, lw, inc, "optimal", threshold, resampling, jitter, g, record)

    config = {"members": members, "threshold": threshold, "resampling": resampling, "jitter": jitter,
              "model_noise": noise.config(), "record": record}
    return Filter("optimal", config, _init_with(noise, members, "optimal"), deferred_forecast(noise), analysis,
                  particle_members, lookahead=True, inference=True)


# -- auxiliary particle filters -------------------------------------------------------------------------

def apf_first_stage(loglik: torch.Tensor, log_weight: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Unnormalised log first-stage weights of the improved auxiliary particle filter (Elvira et al.
    2019): ``log lambda_i = log p(y | mu_i) + log sum_j w_j f(mu_i | x_j) - log sum_j f(mu_i | x_j)``.

    ``loglik`` ``(*batch, N)``: ``log p(y | mu_i)``; ``log_weight`` ``(*batch, J)``: the normalised
    previous log-weights; ``kernel`` ``(*batch, N, J)``: ``log f(mu_i | x_j)``.
    """
    return loglik + torch.logsumexp(log_weight.unsqueeze(-2) + kernel, -1) - torch.logsumexp(kernel, -1)


def apf_second_stage(loglik: torch.Tensor, log_weight: torch.Tensor, log_lambda: torch.Tensor,
                     kernel: torch.Tensor) -> torch.Tensor:
    """Unnormalised log second-stage (multiple-importance-sampling) weights of an auxiliary particle
    filter: ``log w_i = log p(y | x_i) + log sum_j w_j f(x_i | x_j) - log sum_j lambda_j f(x_i | x_j)``,
    the target over the mixture proposal the particles were drawn from.

    ``loglik`` ``(*batch, N)``: ``log p(y | x_i)``; ``log_weight``, ``log_lambda`` ``(*batch, J)``:
    the normalised previous and first-stage log-weights; ``kernel`` ``(*batch, N, J)``: ``log f(x_i | x_j)``.
    """
    return (loglik + torch.logsumexp(log_weight.unsqueeze(-2) + kernel, -1)
            - torch.logsumexp(log_lambda.unsqueeze(-2) + kernel, -1))


def _apf_result(x: torch.Tensor, log_w: torch.Tensor, who: str):
    """The analysis state (second-stage weights carried, normalised) and its ``info``: the evidence
    increment is the log of the mean of the unnormalised second-stage weights."""
    new_lw, log_z = log_normalise(torch.nan_to_num(log_w, nan=-math.inf), who)
    return EnsembleState(x, new_lw), {"ess": kish_ess(new_lw), "resampled": torch.ones_like(log_z),
                                      "loglik": log_z - math.log(x.shape[-2])}


def _observation_loglik(x: torch.Tensor, y: torch.Tensor, operator: Observation, mask: torch.Tensor) -> torch.Tensor:
    return gaussian_loglik(operator.residual(y.unsqueeze(-2), x), operator.noise_cov, mask)


@register("auxiliary")
def auxiliary(members: int, resampling: str = "systematic", model_noise: Any = None, **removed: Any) -> Filter:
    """The auxiliary particle filter of Pitt & Shephard (1999) with multiple-importance-sampling
    second-stage weights (see the module docstring).

    First stage: ancestors drawn with ``lambda_i ~ w_i N(y; h(f_i), H Q H^T + R)`` (the predictive
    likelihood of the forecast ``f_i``, ``h`` linearised there); second stage: each drawn ancestor
    moved with the model noise and weighted by :func:`apf_second_stage`. For the improved first stage
    of Elvira et al. (2019) use :func:`iapf`.

    Parameters
    ----------
    members : int
        Number of particles.
    resampling : str
        Scheme for the first-stage (ancestor) draw.
    model_noise : optional
        ``Q``; must be positive definite (the second-stage weights evaluate ``N(x; f_j, Q)``).

    Raises
    ------
    InputError
        Naming ``improved`` (a keyword of earlier versions: the improved filter is now ``iapf``), and
        at ``init`` ``model`` for a model with a non-Gaussian transition and ``model_noise`` for a
        perfect model without ``model_noise``.
    """
    if "improved" in removed:
        raise InputError("improved", "no such keyword: 'auxiliary' is the classic auxiliary particle filter",
                         repr(removed["improved"]),
                         hint="the improved auxiliary particle filter of Elvira et al. (2019) is the filter 'iapf'")
    if removed:
        raise TypeError(f"auxiliary() got an unexpected keyword argument {sorted(removed)[0]!r}")
    members = check_members(members)
    resampling = check_resampling(resampling)
    noise = NoiseModel(model_noise, "the auxiliary particle filter", required=True)

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator):
        f, lw = state
        q, q_root = noise.get(f, lw)
        q_chol = torch.linalg.cholesky(q)
        h, r = masked_linear(operator, mask, f, at=f)
        s = h @ q @ h.transpose(-1, -2) + (r if h.ndim == r.ndim else r.unsqueeze(-3))
        look = gaussian_loglik(operator.residual(y.unsqueeze(-2), f), s, mask)        # log p^(y | f_i)
        log_lam, _ = log_normalise(torch.nan_to_num(lw + look, nan=-math.inf), "auxiliary (first stage)")
        anc = _resampling.resample(torch.exp(log_lam), method=resampling, seed=g)
        mean = gather_members(f, anc)
        x = mean + torch.randn(f.shape, generator=g, dtype=f.dtype, device=f.device) @ q_root.transpose(-1, -2)
        kern_x = pairwise_log_kernel(x, f, q_chol)                                    # (.., m, j)
        log_w = apf_second_stage(_observation_loglik(x, y, operator, mask), lw, log_lam, kern_x)
        return _apf_result(x, log_w, "auxiliary")

    config = {"members": members, "resampling": resampling, "model_noise": noise.config()}
    return Filter("auxiliary", config, _init_with(noise, members, "auxiliary"), deferred_forecast(noise), analysis,
                  ensemble_members, lookahead=True, inference=True)


class _Pending(EnsembleState):
    """The forecast state of :func:`iapf` one step before an observation for a model that draws its
    own steps: ``x`` are the predicted means ``mu_i = model.step(prev_i)``, and the state keeps the
    particles ``prev`` before that step and the ``model`` whose transition the analysis evaluates."""

    def __new__(cls, x: torch.Tensor, log_weight: torch.Tensor, prev: torch.Tensor, model: Model) -> "_Pending":
        self = super().__new__(cls, x, log_weight)
        self.prev = prev
        self.model = model
        return self


@register("iapf")
def iapf(members: int, resampling: str = "multinomial", model_noise: Any = None) -> Filter:
    """The improved auxiliary particle filter of Elvira, Martino, Bugallo & Djuric (2019).

    At an observation ``y`` the previous weighted particles ``{x_j, w_j}`` are moved in two stages:

    1. first-stage weights at the predicted means ``mu_i = E[x_t | x_j = x_i]`` (the model step),
       ``lambda_i ~ p(y | mu_i) sum_j w_j f(mu_i | x_j) / sum_j f(mu_i | x_j)`` (:func:`apf_first_stage`);
       ``p(y | mu_i)`` is the observation likelihood at the point ``mu_i``, the paper's choice (not a
       predictive likelihood). Where the transition kernels overlap the ratio corrects ``lambda``
       for the particles' crowding, so the proposal mixture matches the predictive prior there;
    2. ancestors ``a_i ~ lambda``, ``x_i ~ f(x | x_{a_i})``, and second-stage weights
       ``w_i ~ p(y | x_i) sum_j w_j f(x_i | x_j) / sum_j lambda_j f(x_i | x_j)``
       (:func:`apf_second_stage`), the target over the mixture proposal (multiple importance
       sampling), carried to the next analysis (not reset).

    ``info``: ``ess`` of the second-stage weights, ``resampled`` (always 1: ancestors are drawn at
    every analysis) and ``loglik``, the log of the mean of the unnormalised second-stage weights,
    whose exponential is an unbiased estimate of ``p(y_t | y_1:t-1)``. ``O(N^2)`` kernel
    evaluations per analysis, batched.

    The transition ``f`` is the model's: ``N(x; model.step(x_j), Q)`` (pairwise through one whitened
    matrix product) for a Gaussian model or with ``model_noise``, else the model's own
    ``sample_step`` and ``log_transition`` (:func:`daml.models.base.transition_sample`,
    :func:`daml.models.base.transition_log_density`), for example a
    :class:`daml.models.mixture.MixtureTransition`. When several model steps separate two
    observations the earlier ones follow the transition with weights unchanged.

    Parameters
    ----------
    members : int
        Number of particles ``N`` (at least 2).
    resampling : str
        Scheme for the ancestor draw: ``"multinomial"`` (default, as in the paper), ``"systematic"``,
        ``"stratified"`` or ``"residual"``.
    model_noise : optional
        ``Q`` for the filter's transition ``N(model.step(x), Q)`` instead of the model's (as for
        :func:`optimal`); must be positive definite.

    Raises
    ------
    InputError
        Naming ``members``, ``resampling`` or ``model_noise`` for bad values; at ``init``
        ``model_noise`` for a perfect Gaussian model without ``model_noise`` (its transition has no
        density) and ``model`` for a model with ``sample_step`` but no ``log_transition``.
    """
    members = check_members(members)
    resampling = check_resampling(resampling)
    noise = NoiseModel(model_noise, "the improved auxiliary particle filter", required=True)

    def own_transition(model: Model) -> bool:          # the model draws its own steps (no override)
        return noise.given is None and not has_gaussian_transition(model)

    base = ensemble_init(members)

    def init(model, mean, cov, g):
        if own_transition(model):
            if not callable(getattr(model, "log_transition", None)):
                raise InputError("model", "a model with log_transition(x_prev, x) (the transition density the "
                                 "iapf weights evaluate), or model_noise", type(model).__name__,
                                 hint="its sample_step has no density")
        else:
            noise.resolve(model)
        return base(model, mean, cov, g)

    def forecast(state: EnsembleState, model: Model, g: torch.Generator, upcoming: Upcoming | None = None):
        if upcoming is not None and upcoming.steps == 1:
            mu = model.step(state.x)
            if own_transition(model):
                return _Pending(mu, state.log_weight, state.x, model)
            return EnsembleState(mu, state.log_weight)
        return EnsembleState(model_noise_step(model, noise)(state.x, g), state.log_weight)

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator):
        mu, lw = state
        prev = getattr(state, "prev", None)
        if prev is None:                                   # f(x | x_j) = N(x; mu_j, Q)
            q, q_root = noise.get(mu, lw)
            if q is None:
                raise InputError("state", "the forecast of iapf's own forecast step (it keeps the particles "
                                 "before the step for a model with sample_step)", type(state).__name__)
            q_chol = torch.linalg.cholesky(q)
            kern_mu = pairwise_log_kernel(mu, mu, q_chol)                            # (.., i, j)
        else:
            model = state.model
            kern_mu = transition_log_density(model, prev.unsqueeze(-3), mu.unsqueeze(-2))
        log_lam = apf_first_stage(_observation_loglik(mu, y, operator, mask), lw, kern_mu)
        log_lam, _ = log_normalise(torch.nan_to_num(log_lam, nan=-math.inf), "iapf (first stage)")
        anc = _resampling.resample_normalised(torch.exp(log_lam), resampling, g)
        if prev is None:
            eps = torch.randn(mu.shape, generator=g, dtype=mu.dtype, device=mu.device)
            x = gather_members(mu, anc) + eps @ q_root.transpose(-1, -2)
            kern_x = pairwise_log_kernel(x, mu, q_chol)                              # (.., i, j)
        else:
            x = transition_sample(model, gather_members(prev, anc), g)
            kern_x = transition_log_density(model, prev.unsqueeze(-3), x.unsqueeze(-2))
        log_w = apf_second_stage(_observation_loglik(x, y, operator, mask), lw, log_lam, kern_x)
        return _apf_result(x, log_w, "iapf")

    config = {"members": members, "resampling": resampling, "model_noise": noise.config()}
    return Filter("iapf", config, init, forecast, analysis, ensemble_members, lookahead=True, inference=True)
