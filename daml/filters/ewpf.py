"""Equal-weight particle filters: the equivalent-weights PF (EWPF) and the implicit EWPF (IEWPF).

A standard particle filter in many dimensions puts almost all the weight on one particle, because
the weights ``w_i ~ p(y | x_i) p(x_i | x_i^-) / q(x_i)`` vary over many orders of magnitude when many
independent observations arrive at once. van Leeuwen's answer is to *choose* the proposal so that the
weights come out (nearly) equal, giving up the asymptotic exactness of importance sampling for a
sample that does not collapse. Both filters here need Gaussian model noise ``N(0, Q)`` (``model_noise``
or the model's ``noise_cov``) and a linear observation operator ``y = H x + N(0, R)``.

Relaxation between observations (both filters)
    On every model step before the one that lands on an observation, each particle is nudged toward
    the next observation: ``x = f + g + b`` with ``f = M(x^-)``, ``b ~ N(0, Q)`` and
    ``g = tau_j Q H^T S^-1 (y - H f)``, ``S = H Q H^T + R``. The strength ``tau_j`` grows linearly over
    the interval to ``nudging`` (``tau_j = nudging * j / K`` on the ``j``-th of ``K`` steps), so a
    ``nudging`` of 1 would remove the whole innovation in one step at the end of the interval. The
    weight pays for the nudge exactly: ``-log w += g^T Q^-1 g / 2 + g^T Q^-1 b``.

Equivalent-weights step (EWPF; van Leeuwen 2010, Ades & van Leeuwen 2013)
    On the step that lands on the observation, with ``d_i = y - H f_i`` and previous weights
    ``c_i = -log w_i``, a particle moved to ``x_i = f_i + alpha_i K d_i`` (``K = Q H^T S^-1``) has
    ``-log w_i(alpha) = c_i + phi_i + (1 - alpha)^2 A_i / 2`` with ``phi_i = d_i^T S^-1 d_i / 2`` and
    ``A_i = d_i^T R^-1 d_i - d_i^T S^-1 d_i``. Its best reachable weight is ``c_i + phi_i`` (at
    ``alpha = 1``). The target ``C`` is the ``keep``-quantile of these, so a fraction ``keep`` of the
    particles can reach it; each of them gets ``alpha_i = 1 - sqrt(2 (C - c_i - phi_i) / A_i)``, the
    smaller root, and so exactly the weight ``exp(-C)``. The rest cannot reach the target: they are
    dropped and replaced by copies of kept particles drawn with ``resampling``.
    Then a small random part is added, ``x_i += xi_i = P^(1/2) zeta_i`` with
    ``P = (Q^-1 + H^T R^-1 H)^-1`` and ``zeta_i`` from the mixture
    ``(1 - gaussian_prob) U[-uniform, uniform]^n + gaussian_prob N(0, gaussian_scale^2 I)``. Its weight
    is computed exactly, ``-log w_i += (alpha_i - 1) d_i^T R^-1 H xi_i + |zeta_i|^2 / 2 + log q(zeta_i)``,
    so the weights after the step are equal up to this random part
    (they are exactly equal with ``uniform=0`` and ``gaussian_prob=0``) and the next
    equivalent-weights step absorbs the difference through ``c_i``.

Implicit equal weights in two stages (IEWPF; Zhu, van Leeuwen & Amezcua 2016, Skauvold et al. 2019)
    Each particle is drawn around the mode ``xhat_i = f_i + K d_i`` of ``p(y | x) p(x | x_i^-)`` as
    ``x_i = xhat_i + P^(1/2) z_i``. The original scheme scaled one Gaussian vector,
    ``z = sqrt(alpha) xi``, with ``alpha`` solved so that all weights are equal; its proposal cannot
    reach a ball around ``xhat_i`` and its weights omit part of the Jacobian, which biases the sample
    (Skauvold et al. 2019). The two-stage form used here: stage one draws a random direction ``e`` and
    a Gaussian ``sqrt(beta) eta`` orthogonal to it (fixed scale ``beta``, no target involved); stage
    two moves the particle along ``e`` by ``t = T_i(s)``, ``s ~ N(0, 1)``, where ``T_i`` is the
    monotone map with ``Phi(-|t|) = exp(-Delta_i) Phi(-|s|)``, which pushes ``N(0, 1)`` onto the
    target restricted to ``|t| >= t_i0`` (``2 Phi(-t_i0) = exp(-Delta_i)``). ``Delta_i >= 0`` is what
    particle ``i`` must lose to reach the common target (the largest ``-log`` weight after stage one).
    With the exact one-dimensional density and the stage-one density in the weight, every weight
    equals the target exactly, Jacobian included. The price is the gap ``|t| < t_i0`` along one random
    direction instead of a ball in all directions. ``keep < 1`` first drops the worst particles as in
    the EWPF.

When they work and when they do not: the weights stay equal by construction, so the ESS never
collapses and a few tens of particles do not degenerate in hundreds or thousands of dimensions. The
posterior is not exact: particles with good weights are pushed away from the observations to lose
weight, so the spread and the rank histograms (not only the RMSE) must be checked, and a well-tuned
ETKF or LETKF is usually more accurate in near-Gaussian regimes (Browne 2016). ``Q`` matters most:
it is the only covariance the proposal uses, so unobserved variables are corrected only through its
off-diagonal terms. A static ``Q`` knows nothing of the flow; ``model_noise={"variance": v, "length": l,
"ensemble": gamma, "radius": r}`` makes it ``gamma * (taper o C) + Q_static`` with ``C`` the (weighted)
covariance of the particles at that step (see :class:`daml.filters.particle.NoiseModel`): every particle
still shares one ``Q``, so all the weight formulas above hold unchanged, and the correction of
unobserved variables now follows the ensemble's correlations, as in an ensemble Kalman filter. With a
perfect model ``Q`` is a modelling choice either way; with a stochastic model this replaces the model's
noise by a larger, ensemble-shaped one, which changes the posterior being targeted.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .. import resampling as _resampling
from ..errors import InputError, NonFiniteError, ShapeError, check_real
from ..models.base import Model, covariance_root
from ..models.observations import Observation
from .base import (EnsembleState, Filter, Upcoming, _bool_mask, _broadcast, _check_cov, _finite, _real, check_members,
                   ensemble_members, register)
from .particle import (NoiseModel, _init_with, deferred_forecast, check_resampling, check_threshold, resample_where, gather_members, gaussian_step, kish_ess,
                       check_record, particle_members, recorded_state,
                       log_normalise, masked_linear)

__all__ = ["ewpf", "iewpf", "equivalent_weights_step", "EWStep", "mixture_log_density", "tail_map"]


def _check_keep(keep: Any) -> float:
    k = check_real(keep, "keep", expected="a fraction in (0, 1] of particles that reach the target weight")
    if not 0.0 < k <= 1.0:
        raise InputError("keep", "a fraction in (0, 1] of particles that reach the target weight", repr(keep))
    return k


def _check_nudging(nudging: Any) -> float:
    return check_real(nudging, "nudging", positive=True,
                      expected="a positive relaxation strength (fraction of the innovation removed per step, "
                               "typically 0.05-1)")


def keep_cut(best: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep``-quantile of ``-log`` weights ``best`` ``(*batch, N)`` (the ``ceil(keep N)``-th
    smallest) and which particles are at or below it (to rounding)."""
    k = max(1, math.ceil(keep * best.shape[-1] - 1e-9))
    cut = torch.kthvalue(best, k, dim=-1).values
    return cut, best <= (cut + 1e-12 * cut.abs().clamp_min(1.0)).unsqueeze(-1)


def _require_linear(operator: Observation, who: str) -> None:
    if not operator.linear:
        raise InputError("operator", f"a linear observation operator for {who}", operator.description or "nonlinear")


def nudged_forecast(noise: NoiseModel, nudging: float, who: str):
    """``forecast`` with relaxation toward the next observation (see the module docstring)."""

    plain = deferred_forecast(noise)

    def forecast(state: EnsembleState, model: Model, g: torch.Generator, upcoming: Upcoming | None = None):
        if upcoming is None or upcoming.steps == 1:            # no observation ahead, or the analysis's step
            return plain(state, model, g, upcoming)
        _require_linear(upcoming.operator, who)
        f = model.step(state.x)
        q, root = noise.get(f, state.log_weight)
        tau = nudging * (upcoming.interval - upcoming.steps + 1) / upcoming.interval
        h, r = masked_linear(upcoming.operator, upcoming.mask, f)
        s = h @ q @ h.transpose(-1, -2) + r
        d = torch.where(upcoming.mask.unsqueeze(-2), upcoming.y.unsqueeze(-2) - f @ h.transpose(-1, -2), 0.0)
        hv = torch.linalg.solve(s, d.transpose(-1, -2)).transpose(-1, -2) @ h     # H^T S^-1 d, (.., N, n)
        nudge = tau * hv @ q
        b = torch.randn(f.shape, generator=g, dtype=f.dtype, device=f.device) @ root.transpose(-1, -2)
        neg = 0.5 * tau * (nudge * hv).sum(-1) + tau * (hv * b).sum(-1)          # g'Q^-1 g / 2 + g'Q^-1 b
        lw, _ = log_normalise(state.log_weight - neg, who)
        return EnsembleState(f + nudge + b, lw)

    return forecast


# -- the equivalent-weights step ------------------------------------------------------------------------

class EWStep(NamedTuple):
    """The deterministic equivalent-weights move (before resampling and the random part)."""

    x: torch.Tensor            # f + alpha K d                                      (*batch, N, n)
    neg_log_weight: torch.Tensor  # -log w after the move, exact (unnormalised)     (*batch, N)
    alpha: torch.Tensor        # the step fraction                                   (*batch, N)
    kept: torch.Tensor         # bool: reached the target                            (*batch, N)
    target: torch.Tensor       # C                                                   (*batch,)
    innovation: torch.Tensor   # d = y - H f (zero where unobserved)                 (*batch, N, m)
    r_inv_d: torch.Tensor      # R^-1 d                                              (*batch, N, m)
    h: torch.Tensor            # masked H                                            (*batch, m, n)
    r: torch.Tensor            # masked R                                            (*batch, m, m)
    cov: torch.Tensor          # P = (Q^-1 + H^T R^-1 H)^-1                          (*batch, n, n)


def equivalent_weights_step(f: torch.Tensor, log_weight: torch.Tensor, y: torch.Tensor, operator: Observation,
                            mask: torch.Tensor, q: torch.Tensor, keep: float) -> EWStep:
    """The equivalent-weights move of the EWPF from deterministic forecasts ``f`` ``(*batch, N, n)``.

    ``log_weight`` are the particles' log-weights before the observation (``c_i = -log w_i``). Every
    kept particle ends with ``neg_log_weight`` equal to ``target`` (to rounding); the others keep their
    best reachable weight (``alpha = 1``) and ``kept`` is ``False``.

    Parameters
    ----------
    f : (*batch, N, n)
        Finite deterministic forecasts.
    log_weight : (*batch, N)
        Finite log-weights.
    y : (*batch, m)
        Observations, finite where ``mask`` is ``True``.
    operator : Observation
        A linear observation operator of ``m`` observations of states of size ``n``.
    mask : (*batch, m) bool
        Observed entries.
    q : (n, n) or (*batch, n, n)
        The model noise covariance ``Q``: finite, symmetric positive definite.
    keep : float in (0, 1]
        Fraction of particles that reach the target.

    Raises
    ------
    InputError
        Naming the argument (its subclasses as fit) for any of the above not met.
    """
    if not isinstance(operator, Observation):
        raise InputError("operator", "a linear daml.models.Observation", type(operator).__name__)
    _require_linear(operator, "the equivalent-weights step")
    keep = _check_keep(keep)
    f = _real(f, "f", ndim=2)
    n, m = f.shape[-1], operator.size
    if n != operator.state_size:
        raise ShapeError("f", f"a last axis of length {operator.state_size} (the operator's state size)",
                         f"shape {tuple(f.shape)}")
    _finite(f, "f", "finite forecasts")
    log_weight = _real(log_weight, "log_weight", like=f)
    if tuple(log_weight.shape) != tuple(f.shape[:-1]):
        raise ShapeError("log_weight", f"shape {tuple(f.shape[:-1])} (one per member of f)",
                         f"shape {tuple(log_weight.shape)}")
    _finite(log_weight, "log_weight", "finite log-weights")
    y = _real(y, "y", like=f)
    if y.shape[-1] != m:
        raise ShapeError("y", f"a last axis of length {m} (the operator's observations)", f"shape {tuple(y.shape)}")
    mask = _bool_mask(mask, "mask", m, f)
    _broadcast("y", tuple(y.shape[:-1]), tuple(mask.shape[:-1]), tuple(f.shape[:-2]))
    _finite(torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device)), "y", "finite values where observed")
    q = _real(q, "q", ndim=2, like=f)
    _check_cov(q, "q", n)
    _broadcast("q", tuple(q.shape[:-2]), tuple(f.shape[:-2]))
    st = _equivalent_weights_step(f, log_weight, y, operator, mask, q, keep)
    if not (bool(torch.isfinite(st.x).all()) and bool(torch.isfinite(st.neg_log_weight).all())):
        raise NonFiniteError("f", "forecasts, observations and log-weights whose step stays finite",
                             "values whose equivalent-weights step overflows")
    return st


def _equivalent_weights_step(f: torch.Tensor, log_weight: torch.Tensor, y: torch.Tensor, operator: Observation,
                             mask: torch.Tensor, q: torch.Tensor, keep: float) -> EWStep:
    """:func:`equivalent_weights_step` without the input checks (the filter's per-cycle call)."""
    st = gaussian_step(f, y, operator, mask, q)
    d, u = st.innovation, st.s_inv_d
    chol_r = torch.linalg.cholesky(st.r)
    r_inv_d = torch.cholesky_solve(d.transpose(-1, -2), chol_r).transpose(-1, -2)
    d_s_d = (d * u).sum(-1)
    a = ((d * r_inv_d).sum(-1) - d_s_d).clamp_min(0.0)
    best = -log_weight + 0.5 * d_s_d
    target, kept = keep_cut(best, keep)
    delta = target.unsqueeze(-1) - best
    movable = kept & (a > 0)
    alpha = torch.where(movable, 1.0 - torch.sqrt(2.0 * delta.clamp_min(0.0) / torch.where(movable, a, 1.0)),
                        torch.ones_like(a))
    x = f + alpha.unsqueeze(-1) * st.gain_d
    neg = best + 0.5 * (1.0 - alpha) ** 2 * a
    return EWStep(x, neg, alpha, kept, target, d, r_inv_d, st.h, st.r, st.cov)


def mixture_log_density(zeta: torch.Tensor, uniform: float, gaussian_prob: float, gaussian_scale: float) -> torch.Tensor:
    """``log q(zeta)`` of the EWPF's random part, ``(1 - p) U[-a, a]^n + p N(0, b^2 I)`` per member."""
    n = zeta.shape[-1]
    terms = []
    if gaussian_prob < 1.0:
        inside = zeta.abs().amax(-1) <= uniform
        lu = math.log1p(-gaussian_prob) - n * math.log(2.0 * uniform)
        terms.append(torch.where(inside, torch.full_like(zeta[..., 0], lu), torch.full_like(zeta[..., 0], -math.inf)))
    if gaussian_prob > 0.0:
        lg = (math.log(gaussian_prob) - 0.5 * n * math.log(2 * math.pi * gaussian_scale**2)
              - 0.5 * (zeta**2).sum(-1) / gaussian_scale**2)
        terms.append(lg)
    return terms[0] if len(terms) == 1 else torch.logaddexp(terms[0], terms[1])


def _mixture_sample(shape, uniform, gaussian_prob, gaussian_scale, g, dtype, device):
    u = torch.rand(shape, generator=g, dtype=dtype, device=device)
    gauss = torch.randn(shape, generator=g, dtype=dtype, device=device)
    pick = torch.rand(shape[:-1], generator=g, dtype=dtype, device=device) < gaussian_prob
    return torch.where(pick.unsqueeze(-1), gaussian_scale * gauss, uniform * (2.0 * u - 1.0))


@register("ewpf")
def ewpf(members: int, keep: float = 0.8, nudging: float = 0.5, model_noise: Any = None, uniform: float = 0.5,
         gaussian_prob: float = 0.0, gaussian_scale: float = 1.0, threshold: float = 0.5,
         resampling: str = "systematic", record: str = "after_resampling") -> Filter:
    """Equivalent-weights particle filter (see the module docstring).

    Parameters
    ----------
    members : int
        Number of particles.
    keep : float in (0, 1]
        Fraction of particles that reach the target weight; the rest are resampled. Smaller: the
        target is easier to reach, particles move less far from their best fit, more duplicates.
    nudging : float > 0
        Relaxation strength at the end of each observation interval (``tau`` of the module docstring);
        larger pulls harder toward the next observation and costs more weight. Unused when every
        model step is observed.
    model_noise : optional
        ``Q`` (positive definite) instead of the model's ``noise_cov``; a mapping with ``ensemble``
        makes it flow-dependent (module docstring).
    uniform : float >= 0
        Half-width, in ``P``-whitened units, of the uniform part of the random perturbation at
        observation times. Larger: more spread, less equal weights.
    gaussian_prob : float in [0, 1]
        Probability of the Gaussian part of the mixture (gives the proposal full support).
    gaussian_scale : float > 0
        Standard deviation of the Gaussian part, in ``P``-whitened units (``1``: ``N(0, P)``).
    threshold : float in [0, 1]
        After the random part, resample when ``ESS <= threshold * N`` (the next equivalent-weights
        step would otherwise absorb the differences by moving the particles).
    resampling : str
        Scheme that replaces the particles that miss the target.
    record : str
        What each analysis reports: ``"after_resampling"`` (default), the members carried on;
        ``"before_resampling"``, the weighted ensemble after the random part and before the
        resampling that ``threshold`` triggers (as DAPPER scores particle filters). The replacement
        of the particles that miss the target is part of the proposal and comes before either. The
        filter's trajectory is the same either way.
    """
    members = check_members(members)
    keep = _check_keep(keep)
    nudging = _check_nudging(nudging)
    record = check_record(record)
    uniform = check_real(uniform, "uniform", expected="a non-negative half-width")
    gaussian_prob = check_real(gaussian_prob, "gaussian_prob", expected="a probability in [0, 1]")
    gaussian_scale = check_real(gaussian_scale, "gaussian_scale", positive=True, expected="a positive scale")
    if uniform < 0:
        raise InputError("uniform", "a non-negative half-width", repr(uniform))
    if not 0.0 <= gaussian_prob <= 1.0:
        raise InputError("gaussian_prob", "a probability in [0, 1]", repr(gaussian_prob))
    random_part = gaussian_prob > 0 or uniform > 0
    if gaussian_prob < 1.0 and uniform == 0 and gaussian_prob > 0:
        raise InputError("uniform", "a positive half-width when gaussian_prob < 1", repr(uniform))
    threshold = check_threshold(threshold)
    resampling = check_resampling(resampling)
    noise = NoiseModel(model_noise, "the equivalent-weights particle filter", required=True)

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator):
        f, lw = state
        q, _ = noise.get(f, lw)
        _require_linear(operator, "the equivalent-weights step")
        st = _equivalent_weights_step(f, lw, y, operator, mask, q, keep)
        det_lw = torch.where(st.kept, -st.neg_log_weight, torch.full_like(lw, -math.inf))
        det_lw, _ = log_normalise(det_lw, "ewpf")
        flag = ~st.kept.all(-1)
        anc = torch.arange(members, device=f.device).expand(lw.shape)
        if bool(flag.any()):
            drawn = _resampling.resample(torch.exp(det_lw), method=resampling, seed=g)
            anc = torch.where(flag.unsqueeze(-1), drawn, anc)
        x = gather_members(st.x, anc)
        new_lw = torch.where(flag.unsqueeze(-1), torch.full_like(lw, -math.log(members)), det_lw)
        if random_part:
            zeta = _mixture_sample(f.shape, uniform, gaussian_prob, gaussian_scale, g, f.dtype, f.device)
            xi = zeta @ covariance_root(st.cov).transpose(-1, -2)
            h_xi = xi @ st.h.transpose(-1, -2)
            alpha = torch.gather(st.alpha, -1, anc)
            r_inv_d = gather_members(st.r_inv_d, anc)
            neg = ((alpha - 1.0) * (r_inv_d * h_xi).sum(-1) + 0.5 * (zeta**2).sum(-1)
                   + mixture_log_density(zeta, uniform, gaussian_prob, gaussian_scale))
            x = x + xi
            new_lw, _ = log_normalise(new_lw - neg, "ewpf")
        ess = kish_ess(new_lw)
        late = ess <= threshold * members
        carried_x, carried_lw, _ = resample_where(x, new_lw, late, resampling, 0.0, g)
        kept = st.kept.to(f.dtype).mean(-1)
        return (recorded_state(carried_x, carried_lw, x, new_lw, record),
                {"ess": ess, "kept": kept, "resampled": (flag | late).to(f.dtype)})

    config = {"members": members, "keep": keep, "nudging": nudging, "model_noise": noise.config(),
              "uniform": uniform, "gaussian_prob": gaussian_prob, "gaussian_scale": gaussian_scale,
              "threshold": threshold, "resampling": resampling, "record": record}
    return Filter("ewpf", config, _init_with(noise, members, "ewpf"), nudged_forecast(noise, nudging, "ewpf"), analysis,
                  particle_members, lookahead=True, inference=True)


# -- implicit equal weights -----------------------------------------------------------------------------

def tail_map(s: torch.Tensor, delta: torch.Tensor, newton_steps: int = 4) -> torch.Tensor:
    """The IEWPF's one-dimensional map: ``t`` with ``sign(t) = sign(s)`` and
    ``Phi(-|t|) = exp(-delta) Phi(-|s|)``, for ``delta >= 0``; stable for large ``delta``.

    It pushes ``N(0, 1)`` forward to the density ``exp(delta) N(t; 0, 1)`` on ``|t| >= t0``.
    """
    a = s.abs()
    lp = torch.special.log_ndtr(-a) - delta                    # log Phi(-t), the target tail mass
    direct = -torch.special.ndtri(torch.exp(lp).clamp_min(torch.finfo(s.dtype).tiny))
    m2 = (-2.0 * lp).clamp_min(1.0)
    asym = torch.sqrt((m2 - torch.log(m2) - math.log(2 * math.pi)).clamp_min(0.0))
    t = torch.where(lp > -600.0, direct, asym).clamp_min(0.0)
    t = torch.maximum(t, a)                                   # the map never moves inward
    for _ in range(newton_steps):
        lt = torch.special.log_ndtr(-t)
        slope = -torch.exp(-0.5 * t * t - 0.5 * math.log(2 * math.pi) - lt)   # d/dt log Phi(-t)
        t = t - (lt - lp) / slope
    return torch.sign(s) * t


@register("iewpf")
def iewpf(members: int, keep: float = 1.0, nudging: float = 0.5, beta: float = 1.0, model_noise: Any = None,
          resampling: str = "systematic") -> Filter:
    """Implicit equal-weights particle filter, two-stage form (see the module docstring).

    Parameters
    ----------
    members : int
        Number of particles.
    keep : float in (0, 1]
        Fraction of particles kept before the implicit step (``1``: all, as in the original IEWPF).
    nudging : float > 0
        Relaxation strength between observations, as for :func:`ewpf`.
    beta : float > 0
        Variance scale of the first-stage perturbation (in units of ``P``). ``1`` samples the
        conditional posterior exactly in the directions orthogonal to the second-stage direction;
        smaller values shrink the spread to offset the second stage's outward push.
    model_noise : optional
        ``Q`` (positive definite) instead of the model's ``noise_cov``; a mapping with ``ensemble``
        makes it flow-dependent (module docstring).
    resampling : str
        Scheme that replaces the dropped particles when ``keep < 1``.
    """
    members = check_members(members)
    keep = _check_keep(keep)
    nudging = _check_nudging(nudging)
    beta = check_real(beta, "beta", positive=True, expected="a positive variance scale (1: none)")
    resampling = check_resampling(resampling)
    noise = NoiseModel(model_noise, "the implicit equal-weights particle filter", required=True)

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator):
        _require_linear(operator, "iewpf")
        f, lw = state
        q, _ = noise.get(f, lw)
        st = gaussian_step(f, y, operator, mask, q)
        best = -lw + 0.5 * (st.innovation * st.s_inv_d).sum(-1)
        _, kept = keep_cut(best, keep)
        flag = ~kept.all(-1)
        anc = torch.arange(members, device=f.device).expand(lw.shape)
        if bool(flag.any()):
            drawn = _resampling.resample(kept.to(f.dtype) / kept.sum(-1, keepdim=True), method=resampling, seed=g)
            anc = torch.where(flag.unsqueeze(-1), drawn, anc)
        mode = gather_members(f + st.gain_d, anc)
        best = torch.gather(best, -1, anc)
        n = f.shape[-1]
        direction = torch.randn(f.shape, generator=g, dtype=f.dtype, device=f.device)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        eta = torch.randn(f.shape, generator=g, dtype=f.dtype, device=f.device)
        eta = eta - (eta * direction).sum(-1, keepdim=True) * direction
        stage1 = 0.5 * (beta - 1.0) * (eta**2).sum(-1) - 0.5 * (n - 1) * math.log(beta)
        total = best + stage1
        delta = (total.amax(-1, keepdim=True) - total).clamp_min(0.0)
        s = torch.randn(lw.shape, generator=g, dtype=f.dtype, device=f.device)
        t = tail_map(s, delta)
        z = math.sqrt(beta) * eta + t.unsqueeze(-1) * direction
        root = covariance_root(st.cov)
        x = mode + z @ root.transpose(-1, -2)
        new_lw = torch.full_like(lw, -math.log(members))
        return EnsembleState(x, new_lw), {"ess": kish_ess(new_lw), "kept": kept.to(f.dtype).mean(-1),
                                          "resampled": flag.to(f.dtype), "max_push": t.abs().amax(-1)}

    config = {"members": members, "keep": keep, "nudging": nudging, "beta": beta, "model_noise": noise.config(),
              "resampling": resampling}
    return Filter("iewpf", config, _init_with(noise, members, "iewpf"), nudged_forecast(noise, nudging, "iewpf"), analysis,
                  ensemble_members, lookahead=True, inference=True)
