"""The Lorenz-63 and Lorenz-96 systems: the two workhorses of data-assimilation experiments.

**Lorenz-63** (Lorenz 1963) is a three-variable truncation of Rayleigh-Bénard convection,

.. math::

    \\dot x = \\sigma (y - x), \\qquad
    \\dot y = x (\\rho - z) - y, \\qquad
    \\dot z = x y - \\beta z,

chaotic for the classical parameters ``sigma = 10``, ``rho = 28``, ``beta = 8/3`` (leading Lyapunov
exponent about 0.9, so errors double in about 0.8 time units). The flow contracts phase-space volume
at the constant rate ``div f = -(sigma + 1 + beta)``.

**Lorenz-96** (Lorenz 1996; Lorenz & Emanuel 1998) is a ring of ``n`` variables with cyclic indices,

.. math::

    \\dot x_i = (x_{i+1} - x_{i-2})\\, x_{i-1} - x_i + F, \\qquad x_{i+n} = x_i,

an advection term that conserves ``sum x_i^2 / 2``, linear damping and a constant forcing ``F``. The
uniform state ``x_i = F`` is a fixed point, unstable for ``F = 8``; with ``n = 40`` and ``F = 8`` the
attractor has about 13 positive Lyapunov exponents and errors double in about 0.42 time units. A
model step of ``dt = 0.05`` is nominally "6 hours" of atmospheric time.

Both models take one classical Runge-Kutta step of length ``dt`` per model step (as DAPPER does),
are written in pure torch, batch over any leading dims (the last axis is the state) and follow the
dtype and device of the input, so they run for whole ensembles at once and are differentiable for
the tangent-linear maps of the EKF.

The default initial states follow DAPPER: ``(1.509, -1.531, 25.46)`` for Lorenz-63, which is near the
attractor, and the unit vector ``e_1`` for Lorenz-96, which is not: spin it up for a few hundred steps
(e.g. ``propagate(model, model.default_x0(), steps=500)``) before using it as a truth.

References
----------
* E. N. Lorenz (1963), Deterministic nonperiodic flow. *J. Atmos. Sci.* 20, 130-141.
* E. N. Lorenz (1996), Predictability: a problem partly solved. *Proc. ECMWF Seminar on
  Predictability*, vol. 1, 1-18.
* E. N. Lorenz and K. A. Emanuel (1998), Optimal sites for supplementary weather observations:
  simulation with a small model. *J. Atmos. Sci.* 55, 399-414.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _device
from ..errors import check_int, check_real
from .base import ODEModel, _compact_cov, check_memory

__all__ = ["Lorenz63", "Lorenz96"]


class Lorenz63(ODEModel):
    """The Lorenz (1963) convection model, three variables ``(x, y, z)``.

    Parameters
    ----------
    sigma, rho, beta : float
        Prandtl number, scaled Rayleigh number and aspect factor (default 10, 28, 8/3).
    dt : float
        RK4 step per model step (default 0.01).
    noise_cov : scalar, (3,) or (3, 3), optional
        Covariance ``Q`` of additive Gaussian model noise per step.

    Examples
    --------
    >>> m = Lorenz63()
    >>> m.step(m.default_x0()).shape
    torch.Size([3])
    """

    name = "lorenz63"

    def __init__(self, sigma: float = 10.0, rho: float = 28.0, beta: float = 8.0 / 3.0, dt: float = 0.01,
                 noise_cov: Any = None):
        self.sigma = check_real(sigma, "sigma")
        self.rho = check_real(rho, "rho")
        self.beta = check_real(beta, "beta")
        super().__init__(state_size=3, dt=dt, noise_cov=noise_cov)

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)`` for states ``(..., 3)``; returns ``(..., 3)``."""
        a, b, c = x[..., 0], x[..., 1], x[..., 2]
        return torch.stack(
            [self.sigma * (b - a), a * (self.rho - c) - b, a * b - self.beta * c], dim=-1
        )

    def factor_matrix(self, x: torch.Tensor) -> torch.Tensor:
        r"""A state-dependent matrix ``A(x)`` with ``tendency(x) = A(x) x``: the factorisation

        .. math::

            A(x) = \begin{pmatrix} -\sigma & \sigma & 0 \\ \rho - z & -1 & 0 \\ y & 0 & -\beta \end{pmatrix},

        which the hybrid-inference reference code (Garcia Satorras et al. 2019) uses in place of the
        Jacobian (it is not the Jacobian: that has ``-x`` and ``x`` in the last column and row). States
        ``(..., 3)``; returns ``(..., 3, 3)``.
        """
        y, z = x[..., 1], x[..., 2]
        zero = torch.zeros_like(y)
        rows = [
            torch.stack([zero - self.sigma, zero + self.sigma, zero], dim=-1),
            torch.stack([self.rho - z, zero - 1.0, zero], dim=-1),
            torch.stack([y, zero, zero - self.beta], dim=-1),
        ]
        return torch.stack(rows, dim=-2)

    @staticmethod
    def default_x0(dtype: Any = None, device: Any = None) -> torch.Tensor:
        """DAPPER's initial state ``(1.509, -1.531, 25.46)``, close to the attractor; shape ``(3,)``."""
        dev = _device.resolve_device(device)
        return torch.tensor([1.509, -1.531, 25.46], dtype=_device.resolve_dtype(dtype, dev), device=dev)

    def config(self) -> dict:
        """The constructor arguments (``make_model("lorenz63", **config)`` rebuilds the model)."""
        return {"sigma": self.sigma, "rho": self.rho, "beta": self.beta, "dt": self.dt,
                "noise_cov": _compact_cov(self.noise_cov)}


class Lorenz96(ODEModel):
    """The Lorenz (1996) ring model ``dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F``.

    Parameters
    ----------
    n : int
        Number of variables on the ring (at least 4; default 40).
    forcing : float
        The constant forcing ``F`` (default 8, chaotic).
    dt : float
        RK4 step per model step (default 0.05).
    noise_cov : scalar, (n,) or (n, n), optional
        Covariance ``Q`` of additive Gaussian model noise per step.
    """

    name = "lorenz96"

    def __init__(self, n: int = 40, forcing: float = 8.0, dt: float = 0.05, noise_cov: Any = None):
        n = check_int(n, "n", 4, "an int >= 4 (the ring needs neighbours i-2, i-1, i+1 distinct from i)")
        check_memory(8 * 8 * n, "n", f"n={n} (RK4 stages of a state of {n} variables)")
        self.forcing = check_real(forcing, "forcing")
        super().__init__(state_size=n, dt=dt, noise_cov=noise_cov)

    @property
    def n(self) -> int:
        """Number of variables (the state size)."""
        return self.state_size

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)`` for states ``(..., n)``; the cyclic neighbours are views of one wrapped copy
        ``[x_{n-2}, x_{n-1}, x_0, ..., x_{n-1}, x_0]`` (one copy instead of three rolls)."""
        wrapped = torch.cat([x[..., -2:], x, x[..., :1]], dim=-1)
        ahead, behind, behind2 = wrapped[..., 3:], wrapped[..., 1:-2], wrapped[..., :-3]   # x_{i+1}, x_{i-1}, x_{i-2}
        # in place on the one new tensor: each allocation of a large batch costs more than the arithmetic
        return torch.sub(ahead, behind2).mul_(behind).sub_(x).add_(self.forcing)

    def _step_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`rk4_step` of :meth:`tendency`, bit-identical, with each stage's state written into
        the middle of one wrapped buffer ``[s_{n-2}, s_{n-1}, s_0, ..., s_{n-1}, s_0]``: only the three
        wrapped entries are copied per stage, where :meth:`tendency` copies the whole state."""
        n, dt = x.shape[-1], self.dt
        wrapped = torch.empty(*x.shape[:-1], n + 3, dtype=x.dtype, device=x.device)
        stage = wrapped[..., 2:-1]
        ahead, behind, behind2 = wrapped[..., 3:], wrapped[..., 1:-2], wrapped[..., :-3]

        def tendency() -> torch.Tensor:               # f(stage), the same operations as tendency()
            wrapped[..., :2] = wrapped[..., n:n + 2]
            wrapped[..., -1] = wrapped[..., 2]
            return torch.sub(ahead, behind2).mul_(behind).sub_(stage).add_(self.forcing)

        stage.copy_(x)
        k1 = tendency()
        torch.add(x, k1, alpha=0.5 * dt, out=stage)
        k2 = tendency()
        torch.add(x, k2, alpha=0.5 * dt, out=stage)
        k3 = tendency()
        torch.add(x, k3, alpha=dt, out=stage)
        k4 = tendency()
        # k1 + 2 (k2 + k3): the doubling is exact, so one fused add gives rk4_step's 2 (k2 + k3) + k1
        return torch.add(x, k1.add_(k2.add_(k3), alpha=2.0).add_(k4), alpha=dt / 6.0)

    def default_x0(self, dtype: Any = None, device: Any = None) -> torch.Tensor:
        """DAPPER's initial state ``e_1`` (1 at index 0, zeros elsewhere), shape ``(n,)``.

        It is far from the attractor: a spin-up of a few hundred steps reaches it.
        """
        dev = _device.resolve_device(device)
        x0 = torch.zeros(self.state_size, dtype=_device.resolve_dtype(dtype, dev), device=dev)
        x0[0] = 1.0
        return x0

    def config(self) -> dict:
        """The constructor arguments (``make_model("lorenz96", **config)`` rebuilds the model)."""
        return {"n": self.state_size, "forcing": self.forcing, "dt": self.dt,
                "noise_cov": _compact_cov(self.noise_cov)}
