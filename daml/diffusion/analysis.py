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
from ..errors import InputError, ShapeError, check_int
from ..filters.base import (EnsembleState, Filter, check_members, ensemble_forecast, ensemble_init,
                           ensemble_members, register)
from ..filters.letkf import _check_radius, ring_taper
from ..filters.particle import kish_ess
from .samplers import SamplerSettings, check_sampler, reverse, terminal_sample
from .schedules import Schedule, VPLinear, make_schedule
from .scores import (check_bandwidth, ensemble_forcing, exact_forcing, fitted_mixture, gaussian_prior, kernel_mixture,
                     likelihood_score, linearise, local_mixture, mixture_score)

__all__ = ["FORCINGS", "analysis", "posterior_score", "diffusion", "ensf"]

FORCINGS = ("weighted", "gaussian", "ensemble", "none")


def _check_forcing(value: Any) -> str:
    if value not in FORCINGS:
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
    if members.ndim < 2:
        raise ShapeError("members", "(..., N, d) members", f"shape {tuple(members.shape)}")
    if y.shape[-1] != operator.size or y.shape[:-1] != members.shape[:-2]:
        raise ShapeError("y", f"shape {tuple(members.shape[:-2]) + (operator.size,)} (batch, then the "
                         f"operator's {operator.size} observations)", f"shape {tuple(y.shape)}")
    if operator.state_size != members.shape[-1]:
        raise ShapeError("members", f"states of length {operator.state_size} (the operator's)",
                         f"shape {tuple(members.shape)}")
    mask = torch.isfinite(y) if mask is None else mask.to(torch.bool)
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
             seed: _device.Seed = None,
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
    seed, dtype, device
        Explicit random stream; float64 on the CPU by default.
    """
    dev = _device.resolve_device(device, like=members)
    dt = _device.resolve_dtype(dtype, dev)
    x0 = _device.as_tensor(members, "members", dtype=dt, device=dev)
    yy = _device.as_tensor(y, "y", dtype=dt, device=dev)
    mk = None if mask is None else _device.as_tensor(mask, "mask", dtype=torch.bool, device=dev)
    lw = None if log_weight is None else _device.as_tensor(log_weight, "log_weight", dtype=dt, device=dev)
    settings = check_sampler(sampler, steps, t_min, noise, corrector_steps, corrector_size, clip, spacing)
    sched = make_schedule(schedule)
    m = x0.shape[-2] if particles is None else check_int(particles, "particles", 1)
    score = posterior_score(x0, yy, operator, mask=mk, log_weight=lw, forcing=forcing, bandwidth=bandwidth,
                            neighbours=neighbours, components=components, radius=radius, conditional=conditional,
                            schedule=sched)
    g = _device.generator(seed, dev)
    mean, var = _moments(x0, lw)
    return reverse(score, terminal_sample(sched, mean, var, m, g), sched, settings, g)


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
              spacing: str = "log") -> Filter:
    """Score-based diffusion analysis as a filter: the forecast members are the prior, ``N`` particles
    are drawn by :func:`analysis` and carried with equal weights.

    ``info``: ``ess`` (Kish ESS of the likelihood weights of the forecast members, the degeneracy a
    particle filter would see) and ``loglik`` (the log-evidence increment under the bare ensemble).
    Parameters as for :func:`analysis`.
    """
    n_mem = check_members(members)
    forcing = _check_forcing(forcing)
    bandwidth, neighbours, components = _check_prior(bandwidth, neighbours, components)
    rad = None if radius is None else _check_radius(radius)
    settings: SamplerSettings = check_sampler(sampler, steps, t_min, noise, corrector_steps, corrector_size, clip,
                                              spacing)
    sched = make_schedule(schedule)
    config = {"members": n_mem, "forcing": forcing, "bandwidth": bandwidth, "neighbours": neighbours,
              "components": components, "radius": rad, "conditional": bool(conditional), **sched.config(), **settings.config()}

    def analysis_step(state: EnsembleState, y, operator, mask, g):
        x, lw0 = state
        score = posterior_score(x, y, operator, mask=mask, log_weight=lw0, forcing=forcing, bandwidth=bandwidth,
                                neighbours=neighbours, components=components, radius=rad, conditional=conditional,
                                schedule=sched)
        mean, var = _moments(x, lw0)
        xa = reverse(score, terminal_sample(sched, mean, var, n_mem, g), sched, settings, g)
        uniform = torch.full(xa.shape[:-1], -math.log(n_mem), dtype=x.dtype, device=x.device)
        return EnsembleState(xa, uniform), _weights_info(x, lw0, y, operator, mask)

    return Filter("diffusion", config, ensemble_init(n_mem), ensemble_forecast, analysis_step, ensemble_members)


@register("ensf")
def ensf(members: int, steps: int = 100, eps_alpha: float = 0.05, eps_sigma: float = 0.0, t_min: float = 1e-3,
         damping: bool = True, clip: float | None = None) -> Filter:
    """The ensemble score filter baseline (Bao, Zhang & Zhang 2024), as in its public scripts.

    Particle ``j`` starts from ``N(0, I)`` and follows the reverse SDE (Euler-Maruyama, schedule
    :class:`~daml.diffusion.schedules.VPLinear` ``(eps_alpha, eps_sigma)``) with the *paired* prior
    score ``-(x_j - alpha_t x_j^0) / sigma_t^2`` of its own forecast member and the likelihood score
    ``grad log p(y | x)`` evaluated at the particle itself (autograd), damped by ``1 - t`` when
    ``damping`` is true. No Chapman-Kolmogorov step: the balance between the two terms is heuristic.
    """
    n_mem = check_members(members)
    settings = check_sampler("sde", steps, t_min, None, 0, 0.1, clip, "uniform")
    sched = VPLinear(eps_alpha, eps_sigma)
    config = {"members": n_mem, **sched.config(), "steps": settings.steps, "t_min": settings.t_min,
              "damping": bool(damping), "clip": settings.clip}

    def analysis_step(state: EnsembleState, y, operator, mask, g):
        x0, lw0 = state

        def score(x, t):
            a, s2 = sched.alpha(t), sched.sigma2(t)
            lik = likelihood_score(x, y, operator, mask)
            return -(x - a * x0) / s2 + ((1.0 - t) if damping else 1.0) * lik

        start = torch.randn(x0.shape, generator=g, dtype=x0.dtype, device=x0.device)
        xa = reverse(score, start, sched, settings, g)
        uniform = torch.full(xa.shape[:-1], -math.log(n_mem), dtype=x0.dtype, device=x0.device)
        return EnsembleState(xa, uniform), _weights_info(x0, lw0, y, operator, mask)

    return Filter("ensf", config, ensemble_init(n_mem), ensemble_forecast, analysis_step, ensemble_members)
