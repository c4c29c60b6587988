"""The Kuramoto model of coupled phase oscillators.

``n`` oscillators with phases ``theta_i`` and natural frequencies ``omega_i`` are coupled all-to-all
through the sine of their phase differences (Kuramoto 1975; the review of Strogatz 2000):

.. math::

    \\dot\\theta_i = \\omega_i + \\frac{K}{n} \\sum_{j=1}^{n} \\sin(\\theta_j - \\theta_i).

The double sum costs ``O(n^2)`` if written as it stands; expanding the sine of a difference gives

.. math::

    \\sum_j \\sin(\\theta_j - \\theta_i) = \\cos\\theta_i\\, S - \\sin\\theta_i\\, C, \\qquad
    S = \\sum_j \\sin\\theta_j, \\quad C = \\sum_j \\cos\\theta_j,

which is ``O(n)`` and is what :meth:`Kuramoto.tendency` computes, batched over leading dims.

Synchrony is measured by the **order parameter** ``r = |(1/n) sum_j exp(i theta_j)|`` in ``[0, 1]``:
near 0 for incoherent phases, 1 for perfect synchrony. For natural frequencies drawn from a
density ``g`` the incoherent state loses stability at ``K_c = 2 / (pi g(0))`` (``K_c = 2 sqrt(2/pi)``,
about 1.6, for standard normal frequencies) and ``r`` grows with ``K`` beyond it. With identical
frequencies any ``K > 0`` synchronises almost every initial condition.

The coupling terms cancel in the sum over oscillators, so ``sum_i theta_i`` advances at the constant
rate ``sum_i omega_i`` whatever ``K`` is. Phases are not wrapped to ``[0, 2 pi)``: the state is
continuous in time, which keeps filters and finite differences simple; wrap them for display.

References
----------
* Y. Kuramoto (1975), Self-entrainment of a population of coupled non-linear oscillators. In
  *International Symposium on Mathematical Problems in Theoretical Physics*, Lecture Notes in
  Physics 39, 420-422, Springer.
* S. H. Strogatz (2000), From Kuramoto to Crawford: exploring the onset of synchronization in
  populations of coupled oscillators. *Physica D* 143, 1-20.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _device
from ..errors import InputError, ShapeError, check_int, check_real
from .base import ODEModel, _compact_cov, as_real_tensor, check_memory

__all__ = ["Kuramoto", "order_parameter"]


def order_parameter(theta: torch.Tensor) -> torch.Tensor:
    """The Kuramoto order parameter ``r = |mean_j exp(i theta_j)|``.

    Parameters
    ----------
    theta : tensor (..., n)
        Phases, the last axis over oscillators.

    Returns
    -------
    tensor (...)
        ``r`` in ``[0, 1]``.
    """
    theta = as_real_tensor(theta, "theta")
    if theta.ndim == 0 or theta.shape[-1] == 0:
        raise ShapeError("theta", "phases with a non-empty last axis (..., n)", f"shape {tuple(theta.shape)}")
    return torch.hypot(torch.cos(theta).mean(-1), torch.sin(theta).mean(-1))


class Kuramoto(ODEModel):
    """``n`` all-to-all coupled phase oscillators.

    Parameters
    ----------
    n : int
        Number of oscillators (at least 2).
    coupling : float
        The coupling strength ``K`` (any finite real; negative values repel).
    omega : array (n,), optional
        Natural frequencies. Without it they are drawn from ``N(0, 1)`` with ``seed`` and stored in
        ``self.omega`` (and in :meth:`config`, so the model can be rebuilt exactly).
    dt : float
        RK4 step per model step (default 0.01).
    noise_cov : scalar, (n,) or (n, n), optional
        Covariance ``Q`` of additive Gaussian model noise per step.
    seed : int, SeedSequence, torch.Generator or None
        Random stream for ``omega`` when it is not given (``None``: fresh entropy, not reproducible).
    """

    name = "kuramoto"

    def __init__(self, n: int, coupling: float, omega: Any = None, dt: float = 0.01, noise_cov: Any = None,
                 seed: _device.Seed = None):
        n = check_int(n, "n", 2, "an int >= 2 (the number of oscillators)")
        check_memory(2 * 8 * n, "n", f"{n} oscillators")
        self.coupling = check_real(coupling, "coupling")
        if omega is None:
            g = _device.generator(seed, "cpu")
            w = torch.randn(n, generator=g, dtype=torch.float64)
        else:
            w = as_real_tensor(omega, "omega", dtype=torch.float64, device="cpu")
            if tuple(w.shape) != (n,):
                raise ShapeError("omega", f"{n} natural frequencies (shape ({n},))", f"shape {tuple(w.shape)}")
            if not torch.isfinite(w).all():
                raise InputError("omega", "finite frequencies", "NaN or infinite entries")
        self.omega = w
        super().__init__(state_size=n, dt=dt, noise_cov=noise_cov)

    @property
    def n(self) -> int:
        """Number of oscillators (the state size)."""
        return self.state_size

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        """``d theta / dt`` for phases ``(..., n)`` in ``O(n)`` per state."""
        sin, cos = torch.sin(x), torch.cos(x)
        s = sin.sum(-1, keepdim=True)
        c = cos.sum(-1, keepdim=True)
        return self.omega.to(x) + (self.coupling / self.state_size) * (cos * s - sin * c)

    order_parameter = staticmethod(order_parameter)

    def config(self) -> dict:
        """The constructor arguments, with the (possibly drawn) frequencies ``omega`` as a list."""
        return {"n": self.state_size, "coupling": self.coupling, "omega": self.omega.tolist(), "dt": self.dt,
                "noise_cov": _compact_cov(self.noise_cov)}
