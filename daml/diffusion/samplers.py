"""Reverse-time samplers: from the terminal law at ``t = 1`` down to ``t_min`` with a score ``S(x, t)``.

``score(x, t) -> S`` is any callable returning ``grad_x log p_t(x)`` for particles ``x`` ``(*b, M, d)``
(the prior score plus a likelihood forcing, see :mod:`daml.diffusion.scores`). The pseudo-time grid
(:func:`time_grid`) is geometric by default, ``t_k = t_min^(k / steps)``, or uniform. Methods, with ``f, g^2`` the schedule's drift and
diffusion (:class:`~daml.diffusion.schedules.Schedule`) and ``dt = t_k - t_{k+1} > 0``:

``"sde"``
    Euler-Maruyama on the reverse SDE: ``x <- x - dt (f x - g^2 S) + sqrt(g^2 dt) xi``.
``"ode"``
    Euler on the probability-flow ODE: ``x <- x - dt (f x - g^2 S / 2)``.
``"exponential"``
    The first-order exponential integrator (DPM-Solver-1) of the probability-flow ODE, exact in its
    linear part: ``x <- (alpha_{k+1} / alpha_k) x + sigma_{k+1} sigma_k (e^{h} - 1) S`` with
    ``h = lambda_{k+1} - lambda_k``. With ``noise > 0`` its stochastic counterpart (SDE-DPM-Solver-1):
    ``x <- (alpha_{k+1} / alpha_k) x + 2 sigma_{k+1} sigma_k (e^{h} - 1) S + sigma_{k+1} sqrt(e^{2h} - 1) xi``.
``"interpolant"``
    Stochastic-interpolant stepping: the transport (the probability-flow velocity) and the
    diffusion are chosen separately. The reverse dynamics ``dx = [f x - (g^2 / 2 + eps_t) S] dt +
    sqrt(2 eps_t) dW`` have the same marginals for every ``eps_t >= 0``; here ``eps_t = noise g^2 / 2``,
    so ``noise = 0`` is the ODE and ``noise = 1`` the reverse SDE.

``corrector_steps`` Langevin corrector moves follow each predictor step (Song et al. 2021's
predictor-corrector): ``x <- x + delta S + sqrt(2 delta) xi`` with ``delta = corrector_size *
sigma_t^2``, each targeting the current noised marginal.

Divergence is caught, never returned. A score that turns non-finite stops the run with a
:class:`~daml.errors.DivergenceError` naming the reverse step and the pseudo-time. With a
:class:`DivergenceBound` (built from the prior ensemble by :func:`divergence_bound`; the analysis and
both filters always pass one) the final particles must also lie within ``factor`` prior standard
deviations of the prior mean in every coordinate, ``|x_j - m_j| <= factor * s_j``; a particle beyond it
raises :class:`~daml.errors.DivergenceError` with the worst distance. The default factor 10 is far
outside any posterior of the prior that the ensemble describes (for a Gaussian prior and linear
observations the posterior mean moves by at most the innovation's size in its own standard deviations,
so only a ten-sigma prior-data conflict reaches it), and far below the 1e19-1e61 of an explicit step
that has lost stability.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from ..errors import DivergenceError, InputError, NonFiniteError, SeedError, ShapeError, check_fits, check_int, check_real
from .schedules import Schedule
from .scores import _check_points, _log_weights, check_bandwidth

__all__ = ["SAMPLERS", "SPACINGS", "SamplerSettings", "check_sampler", "reverse", "terminal_sample", "time_grid",
           "DivergenceBound", "divergence_bound", "DIVERGENCE_FACTOR"]

DIVERGENCE_FACTOR = 10.0
"""Default of ``max_distance``: how many prior standard deviations from the prior mean a final particle
may lie before the run is refused (see the module docstring)."""

SAMPLERS = ("sde", "ode", "exponential", "interpolant")
SPACINGS = ("log", "uniform")


class SamplerSettings(NamedTuple):
    """Checked sampler parameters (see :func:`check_sampler`)."""

    method: str = "sde"
    steps: int = 100
    t_min: float = 1e-3
    noise: float = 1.0
    corrector_steps: int = 0
    corrector_size: float = 0.1
    clip: float | None = None
    spacing: str = "log"

    def config(self) -> dict:
        return dict(self._asdict())


def check_sampler(method: Any = "sde", steps: Any = 100, t_min: Any = 1e-3, noise: Any = None,
                  corrector_steps: Any = 0, corrector_size: Any = 0.1, clip: Any = None,
                  spacing: Any = "log") -> SamplerSettings:
    """Validate sampler parameters; ``noise=None`` means 1 for ``"sde"``/``"interpolant"``, 0 for the
    ODE and the deterministic exponential integrator."""
    if not isinstance(method, str) or method not in SAMPLERS:
        raise InputError("sampler", f"one of {SAMPLERS} (the sampler method)", repr(method))
    steps = _check_steps(steps)
    t_min = _check_t_min(t_min)
    if noise is None:
        noise = 1.0 if method in ("sde", "interpolant") else 0.0
    noise = check_real(noise, "noise", expected="a non-negative noise level")
    if noise < 0 or (method == "ode" and noise != 0) or (method == "sde" and noise != 1):
        raise InputError("noise", "0 for 'ode', 1 for 'sde', any value >= 0 for 'exponential' or 'interpolant'",
                         repr(noise))
    corrector_steps = check_int(corrector_steps, "corrector_steps", 0)
    corrector_size = check_real(corrector_size, "corrector_size", positive=True, expected="a positive step fraction")
    if clip is not None:
        clip = check_real(clip, "clip", positive=True, expected="a positive bound on |score| (or None)")
    if not isinstance(spacing, str) or spacing not in SPACINGS:
        raise InputError("spacing", f"one of {SPACINGS}", repr(spacing))
    return SamplerSettings(method, steps, float(t_min), float(noise), corrector_steps, float(corrector_size), clip,
                           spacing)


_GRID_BYTES = 32
"""Bytes per pseudo-time of :func:`time_grid`'s list (a Python float and its slot)."""


def _check_steps(steps: Any) -> int:
    """``steps`` as an int >= 1 whose time grid (``steps + 1`` floats) fits in memory."""
    steps = check_int(steps, "steps", 1)
    check_fits("steps", (steps + 1) * _GRID_BYTES, what=f"steps={steps} (a time grid of {steps + 1} pseudo-times)")
    return steps


def _check_generator(generator: Any) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise SeedError("generator", "a torch.Generator (daml._device.generator(seed))", type(generator).__name__)
    return generator


def _check_t_min(t_min: Any) -> float:
    import numbers

    ok = isinstance(t_min, numbers.Real) and not isinstance(t_min, bool) and 0.0 < t_min < 1.0
    if not ok:
        raise InputError("t_min", "a stopping time in (0, 1)", repr(t_min))
    return float(t_min)


def time_grid(steps: int, t_min: float, spacing: str = "log") -> list[float]:
    """``steps + 1`` pseudo-times from 1 down to ``t_min``: equal steps (``"uniform"``) or equal ratios
    (``"log"``, ``t_k = t_min^(k / steps)``: the score's scale grows like ``1 / sigma_t^2``, so the
    steps shrink with ``t``). Raises :class:`~daml.errors.InputError` naming ``steps``, ``t_min`` or
    ``spacing`` for values outside these."""
    steps = _check_steps(steps)
    t_min = _check_t_min(t_min)
    if not isinstance(spacing, str) or spacing not in SPACINGS:
        raise InputError("spacing", f"one of {SPACINGS}", repr(spacing))
    if spacing == "uniform":
        return [1.0 - k * (1.0 - t_min) / steps for k in range(steps + 1)]
    return [t_min ** (k / steps) for k in range(steps + 1)]


def terminal_sample(schedule: Schedule, mean: torch.Tensor, var: torch.Tensor, particles: int,
                    generator: torch.Generator) -> torch.Tensor:
    """``particles`` draws from ``N(alpha_1 mean, alpha_1^2 var + sigma_1^2)`` per coordinate: the
    noised prior's moments at ``t = 1`` (``mean``, ``var`` ``(*b, d)``, finite, ``var >= 0``). Returns
    ``(*b, M, d)``."""
    if not isinstance(schedule, Schedule):
        raise InputError("schedule", "a daml.diffusion Schedule", type(schedule).__name__)
    particles = check_int(particles, "particles", 1)
    _check_generator(generator)
    for name, value in (("mean", mean), ("var", var)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise InputError(name, "a real floating torch tensor (*b, d)", type(value).__name__)
        if value.ndim < 1 or value.shape[-1] == 0:
            raise ShapeError(name, "shape (*b, d) with d >= 1", f"shape {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(name, "finite values", "NaN or infinite entries")
    if var.shape != mean.shape:
        raise ShapeError("var", f"the shape of mean {tuple(mean.shape)}", f"shape {tuple(var.shape)}")
    if bool((var < 0).any()):
        raise InputError("var", "non-negative variances", f"a minimum of {float(var.min()):.3g}")
    check_fits("particles", float(particles) * mean.numel() * mean.element_size(),
               what=f"particles={particles} of {mean.numel()} values each", device=mean.device)
    a, s2 = schedule.alpha(1.0), schedule.sigma2(1.0)
    sd = torch.sqrt(a * a * var + s2)
    xi = torch.randn(*mean.shape[:-1], particles, mean.shape[-1], generator=generator, dtype=mean.dtype,
                     device=mean.device)
    return a * mean.unsqueeze(-2) + sd.unsqueeze(-2) * xi


class DivergenceBound(NamedTuple):
    """Where the final particles of a reverse run must lie: ``|x_j - centre_j| <= factor * scale_j``
    for every coordinate ``j`` (``centre`` and ``scale`` ``(*b, d)``, broadcast against the particles
    ``(*b, M, d)``). Built by :func:`divergence_bound`."""

    centre: torch.Tensor
    scale: torch.Tensor
    factor: float = DIVERGENCE_FACTOR


def divergence_bound(members: torch.Tensor, log_weight: torch.Tensor | None = None,
                     factor: float = DIVERGENCE_FACTOR, bandwidth: float = 0.0) -> DivergenceBound:
    """The :class:`DivergenceBound` of a prior ensemble ``members`` ``(*b, N, d)``.

    ``centre`` is the (weighted) prior mean; ``scale_j`` the prior standard deviation of coordinate
    ``j`` widened by the kernel ``bandwidth`` and floored at 1 % of the root-mean-square spread of all
    coordinates (so a coordinate without spread does not turn every move into a divergence), and at
    ``1e-8 (1 + |centre_j|)`` for an ensemble of identical members.
    """
    factor = check_real(factor, "factor", positive=True, expected="a positive number of prior standard deviations")
    h = check_bandwidth(bandwidth)
    members = _check_points(members, "members")
    w = _log_weights(members, log_weight).exp()
    w = w.unsqueeze(-1)
    centre = (w * members).sum(-2)
    var = (w * (members - centre.unsqueeze(-2)) ** 2).sum(-2) + h * h
    rms = var.mean(-1, keepdim=True)
    scale = torch.sqrt(torch.maximum(var, 1e-4 * rms))
    scale = torch.maximum(scale, 1e-8 * (1.0 + centre.abs()))
    return DivergenceBound(centre, scale, factor)


def _check_bound(x: torch.Tensor, bound: DivergenceBound, t_min: float) -> None:
    if not bool(torch.isfinite(x).all()):
        raise DivergenceError(f"the particles became non-finite by the last reverse step (t = {t_min:.6g})")
    dist = ((x - bound.centre.unsqueeze(-2)).abs() / bound.scale.unsqueeze(-2)).amax(-1)    # (*b, M)
    worst = float(dist.max())
    if worst > bound.factor:
        frac = float((dist > bound.factor).double().mean())
        raise DivergenceError(
            f"{100 * frac:.3g} % of the particles ended farther than max_distance = {bound.factor:g} prior "
            f"standard deviations from the prior mean (worst {worst:.3g}): the reverse integration diverged "
            "(try more steps, a larger t_min or clip=; if the observation truly lies that far from the prior, "
            "raise max_distance)")


def _checked(score: Callable, x: torch.Tensor, t: float, step: int, clip: float | None) -> torch.Tensor:
    s = score(x, t)
    if not isinstance(s, torch.Tensor) or s.shape != x.shape:
        raise ShapeError("score", f"a tensor of the particles' shape {tuple(x.shape)}",
                         f"{type(s).__name__} of shape {tuple(getattr(s, 'shape', ()))}")
    if not bool(torch.isfinite(s).all()):
        raise DivergenceError(f"the score became non-finite at reverse step {step}, pseudo-time t = {t:.6g} "
                              "(try more steps, a larger t_min, a kernel bandwidth or clip=)")
    return s if clip is None else s.clamp(-clip, clip)


def reverse(score: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, schedule: Schedule,
            settings: SamplerSettings, generator: torch.Generator,
            bound: DivergenceBound | None = None) -> torch.Tensor:
    """Integrate the reverse dynamics from ``x`` at ``t = 1`` to ``settings.t_min``; returns the particles.

    Raises :class:`~daml.errors.DivergenceError` when the score turns non-finite, when the particles
    do, or (with ``bound``) when a final particle lies outside the :class:`DivergenceBound`.
    """
    if not isinstance(settings, SamplerSettings):
        raise InputError("settings", "SamplerSettings from check_sampler()", type(settings).__name__)
    if not isinstance(schedule, Schedule):
        raise InputError("schedule", "a daml.diffusion Schedule", type(schedule).__name__)
    if not callable(score):
        raise InputError("score", "a callable score(x, t)", type(score).__name__)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise InputError("x", "a real floating torch tensor (*b, M, d)", type(x).__name__)
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("x", "finite starting particles", "NaN or infinite entries")
    _check_generator(generator)
    ts = time_grid(settings.steps, settings.t_min, settings.spacing)
    noise = settings.noise

    def randn() -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    for k in range(settings.steps):
        t, t_next = ts[k], ts[k + 1]
        dt = t - t_next
        s = _checked(score, x, t, k, settings.clip)
        f, g2 = schedule.drift(t), schedule.diffusion2(t)
        if settings.method == "exponential":
            ratio = schedule.alpha(t_next) / schedule.alpha(t)
            sig, sig_next = math.sqrt(schedule.sigma2(t)), math.sqrt(schedule.sigma2(t_next))
            h = schedule.log_snr(t_next) - schedule.log_snr(t)
            if noise == 0:
                x = ratio * x + sig_next * sig * math.expm1(h) * s
            else:     # noise scales the SDE variant's injected variance, keeping the marginals' mean step
                x = (ratio * x + (1.0 + noise) * sig_next * sig * math.expm1(h) * s
                     + sig_next * math.sqrt(noise * math.expm1(2.0 * h)) * randn())
        else:
            eps_t = 0.5 * g2 * (1.0 if settings.method == "sde" else noise if settings.method == "interpolant" else 0.0)
            x = x - dt * (f * x - (0.5 * g2 + eps_t) * s)
            if eps_t > 0:
                x = x + math.sqrt(2.0 * eps_t * dt) * randn()
        for _ in range(settings.corrector_steps):
            delta = settings.corrector_size * schedule.sigma2(t_next)
            s = _checked(score, x, t_next, k, settings.clip)
            x = x + delta * s + math.sqrt(2.0 * delta) * randn()
    if bound is None:
        if not bool(torch.isfinite(x).all()):
            raise DivergenceError(f"the particles became non-finite by the last reverse step (t = {ts[-1]:.6g})")
    else:
        _check_bound(x, bound, ts[-1])
    return x
