"""The diffusion analysis step and the two filters built on it (``diffusion`` and the EnSF baseline).

:func:`analysis` turns a forecast ensemble and one observation into posterior particles: it builds
the prior score from the ensemble (no network), adds a likelihood forcing, draws particles from the
noised prior's moments at ``t = 1`` and integrates the reverse dynamics down to ``t_min``.

``forcing`` picks the prior and the likelihood term (:mod:`daml.diffusion.scores`):

``"weighted"``
    Kernel prior on the members (``bandwidth`` ``h``; or local kernels with ``neighbours``; or a
    Gaussian mixture with ``components`` fitted by EM) and the exact Chapman-Kolmogorov forcing for it: the particles sample the exact posterior of the kernel
    prior. With ``h = 0`` that posterior is the likelihood-weighted ensemble itself: a particle filter
    in disguise, with its degeneracy.
``"gaussian"``
    One Gaussian prior with the ensemble mean and covariance (tapered with ``radius``) and the exact
    Gaussian gain forcing: a stochastic Kalman analysis by diffusion (nonlinear ``h`` linearised at the
    mean).
``"ensemble"``
    The seed's construction: kernel prior score plus the joint-Gaussian ensemble forcing with weights
    ``p(y | x_i)`` (``conditional=True`` adds the Gaussian conditional factor to the weights).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .. import _device
from ..errors import DivergenceError, DtypeError, InputError, NonFiniteError, ShapeError, check_fits, check_int, check_real
from ..filters.base import (EnsembleState, Filter, check_members, ensemble_forecast, ensemble_init,
                           ensemble_members, register)
from ..filters.letkf import _check_radius, ring_taper
from ..filters.particle import kish_ess
from .samplers import (DIVERGENCE_FACTOR, SamplerSettings, check_sampler, divergence_bound, reverse, terminal_sample,
                       time_grid)
from .schedules import Schedule, VPLinear, make_schedule
from .scores import (_HALF, _broadcasts_to, check_bandwidth, ensemble_forcing, exact_forcing, fitted_mixture, gaussian_prior, kernel_mixture,
                     likelihood_score, linearise, local_mixture, mixture_score)

__all__ = ["FORCINGS", "analysis", "posterior_score", "diffusion", "ensf", "ensf_growth", "ENSF_CLIP"]

FORCINGS = ("weighted", "gaussian", "ensemble", "none")


def _check_forcing(value: Any) -> str:
    if not isinstance(value, str) or value not in FORCINGS:
        raise InputError("forcing", f"one of {FORCINGS}", repr(value))
    return value


def _prior_mixture(members, log_weight, bandwidth, neighbours, components, taper):
    if components is not None:
        return fitted_mixture(members, log_weight, components, taper=taper)
    if neighbours is not None:
        return local_mixture(members, log_weight, neighbours, bandwidth, taper=taper)
    return kernel_mixture(members, log_weight, bandwidth)


def _check_prior(bandwidth, neighbours, components):
    if neighbours is not None and components is not None:
        raise InputError("neighbours/components", "at most one of local kernels or a fitted mixture", "both")
    check_bandwidth(bandwidth, upper=None if neighbours is None else 1.0)
    neighbours = None if neighbours is None else check_int(neighbours, "neighbours", 2)
    components = None if components is None else check_int(components, "components", 1)
    return float(bandwidth), neighbours, components


def posterior_score(members: torch.Tensor, y: torch.Tensor, operator, *, mask: torch.Tensor | None = None,
                    log_weight: torch.Tensor | None = None, forcing: str = "weighted", bandwidth: float = 0.0,
                    neighbours: int | None = None, components: int | None = None, radius: float | None = None,
                    conditional: bool = False, schedule: Schedule | str = "vp-linear") -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The score ``S(x, t)`` of the noised posterior approximation chosen by ``forcing`` (see the
    module docstring). ``members`` ``(*b, N, d)``, ``y`` ``(*b, p)``; returns ``score(x, t)`` for
    particles ``x`` ``(*b, M, d)``."""
    forcing = _check_forcing(forcing)
    bandwidth, neighbours, components = _check_prior(bandwidth, neighbours, components)
    sched = make_schedule(schedule)
    _check_inputs(members, y, operator, log_weight, mask)
    if y.shape[-1] != operator.size or y.shape[:-1] != members.shape[:-2]:
        raise ShapeError("y", f"shape {tuple(members.shape[:-2]) + (operator.size,)} (batch, then the "
                         f"operator's {operator.size} observations)", f"shape {tuple(y.shape)}")
    if operator.state_size != members.shape[-1]:
        raise ShapeError("members", f"states of length {operator.state_size} (the operator's)",
                         f"shape {tuple(members.shape)}")
    if members.dtype in _HALF:      # widened losslessly (half precision has no eigh, cdist or Cholesky)
        members = members.float()
    mask = torch.isfinite(y) if mask is None else mask.to(torch.bool).expand(y.shape)
    taper = None if radius is None else ring_taper(members.shape[-1], _check_radius(radius)).to(members)

    if forcing == "gaussian":
        mix = gaussian_prior(members, log_weight, taper)
        lin = linearise(mix, y, operator, mask)
        return lambda x, t: exact_forcing(mix, lin, x, sched.alpha(t), sched.sigma2(t), forcing=False)[1]
    prior = _prior_mixture(members, log_weight, bandwidth, neighbours, components, taper)
    if forcing == "none":
        return lambda x, t: mixture_score(prior, x, sched.alpha(t), sched.sigma2(t))
    if forcing == "weighted":
        zero_width = prior.isotropic and prior.floor == 0.0
        lin = linearise(prior, y, operator, mask, jacobians=not zero_width)
        return lambda x, t: exact_forcing(prior, lin, x, sched.alpha(t), sched.sigma2(t), forcing=False)[1]
    gauss = gaussian_prior(members, log_weight, taper)
    loglik = linearise(kernel_mixture(members), y, operator, mask, jacobians=False).loglik
    if log_weight is not None:
        loglik = loglik + torch.log_softmax(log_weight.to(members), -1)

    def score(x, t):
        a, s2 = sched.alpha(t), sched.sigma2(t)
        return mixture_score(prior, x, a, s2) + ensemble_forcing(gauss, members, loglik, x, a, s2, conditional)

    return score


def _check_inputs(members, y, operator, log_weight, mask) -> None:
    """Refuse what would otherwise reach torch or come back as NaN (:mod:`daml.errors` types)."""
    from ..models.observations import Observation

    if not isinstance(operator, Observation):
        raise InputError("operator", "a daml.models Observation (observe_indices, observe_linear, ...)",
                         type(operator).__name__)
    for name, value in (("members", members), ("y", y)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise InputError(name, "a real floating torch tensor", type(value).__name__)
    if members.ndim < 2 or members.shape[-2] < 1 or members.shape[-1] < 1:
        raise ShapeError("members", "(..., N, d) members with N >= 1 and d >= 1", f"shape {tuple(members.shape)}")
    if not bool(torch.isfinite(members).all()):
        raise NonFiniteError("members", "finite members", f"{int((~torch.isfinite(members)).sum())} NaN or "
                             "infinite entries")
    if y.ndim < 1:
        raise ShapeError("y", f"(..., {operator.size}) observations", f"shape {tuple(y.shape)}")
    if bool(torch.isinf(y).any()):
        raise NonFiniteError("y", "finite observations (NaN, or mask=False, marks a missing one)",
                             "infinite entries")
    if log_weight is not None:
        if not isinstance(log_weight, torch.Tensor) or log_weight.shape != members.shape[:-1]:
            raise ShapeError("log_weight", f"a tensor of shape {tuple(members.shape[:-1])} (one per member of members)",
                             f"shape {tuple(getattr(log_weight, 'shape', ()))}")
        if bool(torch.isnan(log_weight).any()) or bool((log_weight == math.inf).any()) \
                or not bool(torch.isfinite(log_weight).any(-1).all()):
            raise NonFiniteError("log_weight", "finite log-weights (-inf allowed for some members, not all)",
                                 "NaN, +inf, or every member -inf")
    if mask is not None and (not isinstance(mask, torch.Tensor) or not _broadcasts_to(mask.shape, y.shape)):
        raise ShapeError("mask", f"a boolean tensor shaped like y {tuple(y.shape)}",
                         f"shape {tuple(getattr(mask, 'shape', ()))}")
    if mask is not None and bool((mask.to(torch.bool) & torch.isnan(y)).any()):
        raise NonFiniteError("y", "finite values where mask is True", "NaN where mask says observed")


def _tensor(value: Any, name: str, dtype, device, floating: bool = True) -> torch.Tensor:
    """:func:`daml._device.as_tensor`, with what numpy or torch cannot convert (strings, None, ragged
    lists) refused as an :class:`InputError` naming the argument."""
    if value is None or isinstance(value, (str, bytes)):
        raise InputError(name, "an array of numbers", repr(value))
    try:
        return _device.as_tensor(value, name, dtype=dtype, device=device, floating=floating)
    except InputError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(name, "an array of numbers", f"{type(value).__name__} ({exc})") from exc


def _moments(members: torch.Tensor, log_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.full(members.shape[:-1], 1.0 / members.shape[-2], dtype=members.dtype, device=members.device)
         if log_weight is None else torch.softmax(log_weight.to(members), -1)).unsqueeze(-1)
    mean = (w * members).sum(-2)
    return mean, (w * (members - mean.unsqueeze(-2)) ** 2).sum(-2)


def analysis(members: Any, y: Any, operator, *, mask: Any = None, log_weight: Any = None,
             particles: int | None = None, forcing: str = "weighted", bandwidth: float = 0.0,
             neighbours: int | None = None, components: int | None = None, radius: float | None = None,
             conditional: bool = False, schedule: Schedule | str | dict = "vp-linear", sampler: str = "sde",
             steps: int = 100, t_min: float = 1e-4, noise: float | None = None, corrector_steps: int = 0,
             corrector_size: float = 0.1, clip: float | None = None, spacing: str = "log",
             max_distance: float = DIVERGENCE_FACTOR, seed: _device.Seed = None,
             dtype: Any = None, device: Any = None) -> torch.Tensor:
    """One diffusion analysis: posterior particles ``(*b, M, d)`` from forecast ``members`` ``(*b, N, d)``.

    Parameters
    ----------
    members : array (*b, N, d)
        The forecast ensemble (any leading batch dims: independent problems, solved together).
    y : array (*b, p)
        Observations (NaN where unobserved, or give ``mask``).
    operator : daml.models.Observation
        ``h`` (a matrix or a function; nonlinear ones are differentiated by autograd) and ``R``.
    log_weight : array (*b, N), optional
        Prior member log-weights (default equal).
    particles : int, optional
        ``M``, the number of posterior particles (default ``N``).
    forcing : {"weighted", "gaussian", "ensemble", "none"}
        The prior and likelihood term (module docstring); ``"none"`` samples the prior.
    bandwidth : float
        Kernel standard deviation ``h >= 0``; with ``neighbours`` the fraction ``beta`` in ``[0, 1]``
        of each neighbourhood covariance carried by its kernel (:func:`~daml.diffusion.scores.local_mixture`).
    neighbours, components : int, optional
        Local kernels from each member's ``neighbours`` nearest members, or a mixture of
        ``components`` Gaussians fitted by EM (:func:`~daml.diffusion.scores.fitted_mixture`) instead
        of the isotropic kernels. Used by ``"weighted"``, ``"ensemble"`` and ``"none"``.
    radius : float, optional
        Localise every ensemble covariance with a Gaspari-Cohn taper on a ring (grid-point units, as
        :func:`daml.filters.letkf`; dense ``d x d``): the Gaussian of ``"gaussian"`` and of the
        ``"ensemble"`` forcing, the neighbourhood covariances of local kernels and the components of
        a fitted mixture (isotropic kernels have none). A radius under ``1 / 3.64`` makes them diagonal.
    schedule, sampler, steps, t_min, noise, corrector_steps, corrector_size, clip, spacing
        The noise schedule (:mod:`~daml.diffusion.schedules`) and the reverse integration
        (:mod:`~daml.diffusion.samplers`).
    max_distance : float
        Divergence bound: a particle that ends more than ``max_distance`` prior standard deviations
        from the prior mean in any coordinate raises :class:`~daml.errors.DivergenceError`
        (:func:`~daml.diffusion.samplers.divergence_bound`; default 10).
    seed, dtype, device
        Explicit random stream; float64 on the CPU by default.

    Raises
    ------
    DivergenceError
        When the score or the particles turn non-finite, or a particle ends beyond ``max_distance``.
    """
    dev = _device.resolve_device(device, like=members)
    dt = _device.resolve_dtype(dtype, dev)
    x0 = _tensor(members, "members", dt, dev)
    yy = _tensor(y, "y", dt, dev)
    mk = None if mask is None else _tensor(mask, "mask", None, dev, floating=False)
    if mk is not None and mk.dtype != torch.bool:
        raise DtypeError("mask", "a boolean array (True where observed)", f"dtype {mk.dtype}")
    lw = None if log_weight is None else _tensor(log_weight, "log_weight", dt, dev)
    settings = check_sampler(sampler, steps, t_min, noise, corrector_steps, corrector_size, clip, spacing)
    sched = make_schedule(schedule)
    max_distance = check_real(max_distance, "max_distance", positive=True,
                              expected="a positive number of prior standard deviations")
    score = posterior_score(x0, yy, operator, mask=mk, log_weight=lw, forcing=forcing, bandwidth=bandwidth,
                            neighbours=neighbours, components=components, radius=radius, conditional=conditional,
                            schedule=sched)
    m = x0.shape[-2] if particles is None else check_int(particles, "particles", 1)
    # at least the (*b, M, d) particles themselves: refuse up front what cannot fit
    batch = x0[..., 0, 0].numel()
    check_fits("particles", float(m) * batch * x0.shape[-1] * x0.element_size(),
               what=f"particles={m} of length {x0.shape[-1]} in {batch} problems", device=x0.device)
    bound = divergence_bound(x0, lw, max_distance, bandwidth if neighbours is None else 0.0)
    g = _device.generator(seed, dev)
    mean, var = _moments(x0, lw)
    return reverse(score, terminal_sample(sched, mean, var, m, g), sched, settings, g, bound)


# -- filters --------------------------------------------------------------------------------------------------

def _weights_info(x: torch.Tensor, lw0: torch.Tensor, y, operator, mask) -> dict:
    from ..filters.etpf import _weigh

    _, lw, log_z = _weigh(EnsembleState(x, lw0), y, operator, mask, "diffusion")
    return {"ess": kish_ess(lw), "loglik": log_z}


@register("diffusion")
def diffusion(members: int, forcing: str = "weighted", bandwidth: float = 0.0, neighbours: int | None = None,
              components: int | None = None, radius: float | None = None, conditional: bool = False,
              schedule: Any = "vp-linear", sampler: str = "sde", steps: int = 100, t_min: float = 1e-4, noise: float | None = None,
              corrector_steps: int = 0, corrector_size: float = 0.1, clip: float | None = None,
              spacing: str = "log", max_distance: float = DIVERGENCE_FACTOR) -> Filter:
    """Score-based diffusion analysis as a filter: the forecast members are the prior, ``N`` particles
    are drawn by :func:`analysis` and carried with equal weights.

    ``info``: ``ess`` (Kish ESS of the likelihood weights of the forecast members, the degeneracy a
    particle filter would see) and ``loglik`` (the log-evidence increment under the bare ensemble).
    Parameters as for :func:`analysis`; an analysis whose particles end beyond ``max_distance`` prior
    standard deviations raises :class:`~daml.errors.DivergenceError` (``daml.filters.run`` adds the step).
    """
    n_mem = check_members(members)
    forcing = _check_forcing(forcing)
    bandwidth, neighbours, components = _check_prior(bandwidth, neighbours, components)
    rad = None if radius is None else _check_radius(radius)
    settings: SamplerSettings = check_sampler(sampler, steps, t_min, noise, corrector_steps, corrector_size, clip,
                                              spacing)
    sched = make_schedule(schedule)
    max_distance = check_real(max_distance, "max_distance", positive=True,
                              expected="a positive number of prior standard deviations")
    config = {"members": n_mem, "forcing": forcing, "bandwidth": bandwidth, "neighbours": neighbours,
              "components": components, "radius": rad, "conditional": bool(conditional), **sched.config(),
              **settings.config(), "max_distance": max_distance}

    def analysis_step(state: EnsembleState, y, operator, mask, g):
        x, lw0 = state
        score = posterior_score(x, y, operator, mask=mask, log_weight=lw0, forcing=forcing, bandwidth=bandwidth,
                                neighbours=neighbours, components=components, radius=rad, conditional=conditional,
                                schedule=sched)
        mean, var = _moments(x, lw0)
        bound = divergence_bound(x, lw0, max_distance, bandwidth if neighbours is None else 0.0)
        xa = reverse(score, terminal_sample(sched, mean, var, n_mem, g), sched, settings, g, bound)
        uniform = torch.full(xa.shape[:-1], -math.log(n_mem), dtype=x.dtype, device=x.device)
        return EnsembleState(xa, uniform), _weights_info(x, lw0, y, operator, mask)

    return Filter("diffusion", config, ensemble_init(n_mem), ensemble_forecast, analysis_step, ensemble_members)


ENSF_CLIP = 1000.0
"""EnSF's published bound on the posterior score: ``post_score(..., score_max=1000)`` in
``ScoreFilter/diffusion.py`` of the authors' code (github.com/zezhongzhang/EnSF), used with that default
by its tuned runs (``run_all_EnSF``): the sum of the prior score and the damped likelihood score is
clipped entrywise to ``[-1000, 1000]``."""

ENSF_MAX_GROWTH = 10.0
"""The largest amplification of a perturbation by the linearised reverse Euler steps that
:func:`ensf` accepts (see :func:`ensf_growth`)."""


def _likelihood_curvature(x0: torch.Tensor, operator, mask: torch.Tensor) -> float:
    """The largest eigenvalue of ``H^T R^-1 H`` over the observed entries (the curvature of
    ``-log p(y | x)``): exact for a linear operator, at the forecast members (``H`` their Jacobian) for a
    nonlinear one."""
    r = operator.noise_cov.to(x0)
    hmat = operator.matrix.to(x0) if operator.linear else operator.jacobian(x0)       # (p, d) or (*b, N, p, d)
    m = mask.to(torch.bool)
    while m.ndim < hmat.ndim - 1:
        m = m.unsqueeze(-2)
    eye = torch.eye(r.shape[-1], dtype=x0.dtype, device=x0.device)
    r = torch.where(m.unsqueeze(-1) & m.unsqueeze(-2), r, eye)
    hmat = torch.where(m.unsqueeze(-1), hmat, torch.zeros((), dtype=x0.dtype, device=x0.device))
    white = torch.linalg.solve_triangular(torch.linalg.cholesky(r), hmat, upper=False)
    return float(torch.linalg.matrix_norm(white, ord=2).max()) ** 2


def ensf_growth(curvature: float, steps: int = 100, eps_alpha: float = 0.05, eps_sigma: float = 0.0,
                t_min: float = 1e-3, damping: bool = True) -> float:
    """How much EnSF's explicit reverse Euler steps can amplify a perturbation, for a likelihood of
    curvature ``curvature`` (``1 / sd^2`` for one variable observed with noise sd).

    Linearised, one step maps a perturbation ``e`` to ``a_k e`` with ``a_k = 1 - dt f(t_k) - dt g^2(t_k)
    (1 / sigma^2(t_k) + tau(t_k) curvature)``, ``tau = 1 - t`` the damping. Steps with ``|a_k| > 1``
    amplify; the result is the product of ``max(1, |a_k|)`` over the uniform grid. A value above 1 means
    the step size exceeds Euler's stability limit somewhere, and a large one means divergence (clipped at
    :data:`ENSF_CLIP` the particles then oscillate with a bounded but meaningless amplitude).
    """
    curvature = check_real(curvature, "curvature", expected="a non-negative curvature")
    if curvature < 0:
        raise InputError("curvature", "a non-negative curvature", repr(curvature))
    sched = VPLinear(eps_alpha, eps_sigma)
    ts = time_grid(steps, t_min, "uniform")
    log_growth = 0.0
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t - t_next
        stiff = 1.0 / sched.sigma2(t) + ((1.0 - t) if damping else 1.0) * curvature
        a = 1.0 - dt * sched.drift(t) - dt * sched.diffusion2(t) * stiff
        log_growth += max(0.0, math.log(abs(a))) if a != 0 else 0.0
    return math.exp(min(log_growth, 700.0))


@register("ensf")
def ensf(members: int, steps: int = 100, eps_alpha: float = 0.05, eps_sigma: float = 0.0, t_min: float = 1e-3,
         damping: bool = True, clip: float | None = ENSF_CLIP, max_distance: float = DIVERGENCE_FACTOR,
         max_growth: float = ENSF_MAX_GROWTH) -> Filter:
    """The ensemble score filter baseline (Bao, Zhang & Zhang 2024), as in its public scripts.

    Particle ``j`` starts from ``N(0, I)`` and follows the reverse SDE (Euler-Maruyama on a uniform
    grid, schedule :class:`~daml.diffusion.schedules.VPLinear` ``(eps_alpha, eps_sigma)``) with the
    *paired* prior score ``-(x_j - alpha_t x_j^0) / sigma_t^2`` of its own forecast member and the
    likelihood score ``grad log p(y | x)`` evaluated at the particle itself (autograd), damped by
    ``1 - t`` when ``damping`` is true. No Chapman-Kolmogorov step: the balance between the two terms
    is heuristic.

    Safeguards (none of them changes a run that was stable):

    * ``clip`` (default :data:`ENSF_CLIP` = 1000) bounds every entry of the posterior score, the
      default of ``post_score`` (``score_max=1000``) in the authors' ``ScoreFilter/diffusion.py``
      (github.com/zezhongzhang/EnSF), which their tuned runs use; ``None`` turns it off.
    * Before integrating, the stability of the explicit steps is checked against the likelihood's
      curvature (largest eigenvalue of ``H^T R^-1 H``; for a nonlinear ``h`` at the forecast members):
      when :func:`ensf_growth` exceeds ``max_growth`` (default 10), the analysis raises
      :class:`~daml.errors.DivergenceError` naming the number of steps that would be stable. Without
      this, an observation sd below about 0.1 with 100 steps sent members to 1e19-1e61 unclipped, and
      to a bounded but meaningless oscillation clipped.
    * Particles that end beyond ``max_distance`` prior standard deviations from the forecast mean
      raise :class:`~daml.errors.DivergenceError` (:func:`~daml.diffusion.samplers.divergence_bound`).
    """
    n_mem = check_members(members)
    settings = check_sampler("sde", steps, t_min, None, 0, 0.1, clip, "uniform")
    sched = VPLinear(eps_alpha, eps_sigma)
    max_distance = check_real(max_distance, "max_distance", positive=True,
                              expected="a positive number of prior standard deviations")
    max_growth = check_real(max_growth, "max_growth", positive=True, expected="a growth factor >= 1")
    if max_growth < 1:
        raise InputError("max_growth", "a growth factor >= 1", repr(max_growth))
    config = {"members": n_mem, **sched.config(), "steps": settings.steps, "t_min": settings.t_min,
              "damping": bool(damping), "clip": settings.clip, "max_distance": max_distance,
              "max_growth": max_growth}

    def analysis_step(state: EnsembleState, y, operator, mask, g):
        x0, lw0 = state
        curvature = _likelihood_curvature(x0, operator, mask)
        growth = ensf_growth(curvature, settings.steps, sched.eps_alpha, sched.eps_sigma, settings.t_min, damping)
        if growth > max_growth:
            need = settings.steps
            while need < 10**7 and ensf_growth(curvature, need, sched.eps_alpha, sched.eps_sigma, settings.t_min,
                                               damping) > max_growth:
                need *= 2
            raise DivergenceError(
                f"ensf: {settings.steps} reverse steps are unstable for this observation: the likelihood "
                f"curvature {curvature:.3g} (1 / sd^2 of the most precise observed direction) amplifies "
                f"perturbations {growth:.3g}-fold (more than max_growth = {max_growth:g}); about {need} steps "
                "would be stable")

        def score(x, t):
            a, s2 = sched.alpha(t), sched.sigma2(t)
            lik = likelihood_score(x, y, operator, mask)
            return -(x - a * x0) / s2 + ((1.0 - t) if damping else 1.0) * lik

        start = torch.randn(x0.shape, generator=g, dtype=x0.dtype, device=x0.device)
        xa = reverse(score, start, sched, settings, g, divergence_bound(x0, lw0, max_distance))
        uniform = torch.full(xa.shape[:-1], -math.log(n_mem), dtype=x0.dtype, device=x0.device)
        return EnsembleState(xa, uniform), _weights_info(x0, lw0, y, operator, mask)

    return Filter("ensf", config, ensemble_init(n_mem), ensemble_forecast, analysis_step, ensemble_members)
