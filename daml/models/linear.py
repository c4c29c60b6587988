"""Linear models: the closed-form test bed of every filter.

For a linear model the Kalman filter is exact, so each ensemble or particle method can be checked
against it (see the architecture notes on closed-form oracles). Three models live here.

**LinearModel** is any linear map. With ``continuous=False`` the given matrix *is* the one-step map,
``x_{k+1} = M x_k``. With ``continuous=True`` it is the generator ``A`` of ``dx/dt = A x`` and the step
is one classical Runge-Kutta step of length ``h = dt``; for a linear ODE that step is exactly the
degree-4 Taylor polynomial of the matrix exponential,

.. math::

    M = I + hA + \\frac{(hA)^2}{2} + \\frac{(hA)^3}{6} + \\frac{(hA)^4}{24}
      \\approx e^{hA} \\quad (\\text{error } O(h^5)),

which is what ``step_matrix`` holds, so that ``step(x) == x @ M.T`` up to rounding and the filters'
Kalman oracle uses the very map the truth was stepped with.

**Identity** is the random walk ``x_{k+1} = x_k + eta_k``, ``eta_k ~ N(0, Q)``. With ``Q = q`` and
observations of every variable with variance ``R = r``, the Kalman filter's variances converge to the
fixed point of the Riccati recursion ``P_f = P_a + q``, ``P_a = P_f r / (P_f + r)``; for ``q = 1``,
``r = 2`` that is ``P_a = 1`` and ``P_f = 2``, the analytic check used in the filter tests.

**LinearDrag** is the motion of a particle with drag, the linear experiment of Satorras, Akata and
Welling (2019). Per spatial dimension the state is position ``p``, velocity ``v`` and acceleration
``a``, with

.. math::

    \\dot p = v, \\qquad \\dot v = a - c\\, v, \\qquad \\dot a = -\\tau\\, v,

where ``c`` is the drag coefficient and ``tau`` a restoring rate of the acceleration. The state
vector stacks the blocks ``[p_1..p_d, v_1..v_d, a_1..a_d]`` (length ``3 d``), so that
``A = [[0, I, 0], [0, -c I, I], [0, -tau I, 0]]`` (``matrix``). It is stepped with RK4 like every
``ODEModel``, and since the system is linear its exact one-step map is ``step_matrix`` as above.

References
----------
* V. G. Satorras, Z. Akata and M. Welling (2019), Combining generative and discriminative models for
  hybrid inference. *Advances in Neural Information Processing Systems* 32 (NeurIPS).
* R. E. Kalman (1960), A new approach to linear filtering and prediction problems. *J. Basic Eng.*
  82, 35-45.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import _device
from ..errors import InputError, ShapeError, check_int, check_real
from .base import ODEModel, _compact_cov, _rk4, as_real_tensor, check_memory

__all__ = ["LinearModel", "Identity", "LinearDrag", "rk4_matrix"]


def rk4_matrix(a: torch.Tensor, h: float) -> torch.Tensor:
    """The exact one-step map of RK4 with step ``h`` on ``dx/dt = A x``:
    ``sum_{k=0}^{4} (hA)^k / k!``, shape ``(n, n)``."""
    ha = h * a
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    # Horner form of I + hA (I + hA/2 (I + hA/3 (I + hA/4)))
    out = eye + ha / 4.0
    out = eye + (ha @ out) / 3.0
    out = eye + (ha @ out) / 2.0
    return eye + ha @ out


class LinearModel(ODEModel):
    """A linear model: ``x_{k+1} = M x_k`` (``continuous=False``) or ``dx/dt = A x`` stepped with RK4.

    Parameters
    ----------
    matrix : array (n, n)
        ``M`` (discrete) or ``A`` (continuous).
    dt : float
        Time per model step (default 1). With ``continuous=True`` it is the RK4 step.
    noise_cov : scalar, (n,) or (n, n), optional
        Covariance ``Q`` of additive Gaussian model noise per step.
    continuous : bool
        Whether ``matrix`` is the generator ``A`` of an ODE rather than the step map ``M``.

    Attributes
    ----------
    matrix : tensor (n, n)
        The matrix as given (float64).
    step_matrix : tensor (n, n)
        The one-step map ``M`` (``matrix`` itself when discrete, the RK4 propagator when continuous).
    """

    name = "linear"

    def __init__(self, matrix: Any, dt: float = 1.0, noise_cov: Any = None, continuous: bool = False):
        m = as_real_tensor(matrix, "matrix", dtype=torch.float64, device="cpu")
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
            raise ShapeError("matrix", "a non-empty square matrix (n, n)", f"shape {tuple(m.shape)}")
        if not torch.isfinite(m).all():
            raise InputError("matrix", "finite entries", "NaN or infinite entries")
        if not isinstance(continuous, (bool, np.bool_)):
            raise InputError("continuous", "True or False", repr(continuous))
        super().__init__(state_size=int(m.shape[0]), dt=dt, noise_cov=noise_cov)
        self.matrix = m
        self.continuous = bool(continuous)
        self.step_matrix = rk4_matrix(m, self.dt) if self.continuous else m

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for a continuous model; a discrete map has no tendency."""
        if not self.continuous:
            raise InputError("continuous", "True for a model with a tendency dx/dt = A x",
                             "False (a discrete map x -> M x)")
        return x @ self.matrix.to(x).T

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ M.T`` for states ``(..., n)``."""
        return x @ self.step_matrix.to(x).T

    def tangent_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``M`` broadcast to ``(..., n, n)`` (a linear map is its own Jacobian)."""
        n = self.state_size
        return self.step_matrix.to(x).expand(*x.shape[:-1], n, n)

    def config(self) -> dict:
        """The constructor arguments (the matrix as nested lists)."""
        return {"matrix": self.matrix.tolist(), "dt": self.dt, "noise_cov": _compact_cov(self.noise_cov),
                "continuous": self.continuous}


class Identity(LinearModel):
    """The random walk ``x_{k+1} = x_k (+ noise)``: a :class:`LinearModel` with ``M = I``.

    Parameters
    ----------
    n : int
        State size.
    noise_cov : scalar, (n,) or (n, n), optional
        Covariance ``Q`` of the random-walk increments.
    dt : float
        Time per model step (default 1; it only labels the time axis).
    """

    name = "identity"

    def __init__(self, n: int, noise_cov: Any = None, dt: float = 1.0):
        n = check_int(n, "n", 1, "a positive int (the state size)")
        check_memory(4 * 8 * n * n, "n", f"a state of size {n} (an ({n}, {n}) matrix)")
        super().__init__(torch.eye(n, dtype=torch.float64), dt=dt, noise_cov=noise_cov, continuous=False)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` itself (a copy, so the caller may modify either)."""
        return x.clone()

    def config(self) -> dict:
        """The constructor arguments."""
        return {"n": self.state_size, "noise_cov": _compact_cov(self.noise_cov), "dt": self.dt}


class LinearDrag(LinearModel):
    """Particle motion with drag (Satorras, Akata & Welling 2019): ``p' = v``, ``v' = a - c v``,
    ``a' = -tau v`` in each of ``dims`` spatial dimensions.

    A :class:`LinearModel` with ``continuous=True`` (the generator ``A`` below, its RK4 propagator
    ``step_matrix`` and tangent-linear map), stepped with RK4 on the elementwise tendency.

    Parameters
    ----------
    dims : int
        Number of spatial dimensions ``d`` (state size ``3 d``, layout ``[p, v, a]`` blocks).
    drag : float
        Drag coefficient ``c >= 0`` (default 0.1).
    tau : float
        Rate ``tau > 0`` at which velocity feeds back on the acceleration (default 0.05).
    dt : float
        RK4 step per model step (default 0.1).
    noise_cov : scalar, (3d,) or (3d, 3d), optional
        Covariance ``Q`` of additive Gaussian model noise per step (in the order of ``layout``).
    discretisation : {"rk4", "taylor2"}
        One RK4 step per model step (default), or the second-order Taylor map
        ``I + A dt + (A dt)^2 / 2`` with which the reference code of Satorras et al. generates its data.
    layout : {"blocks", "axis"}
        State order: ``[p_1..p_d, v_1..v_d, a_1..a_d]`` (default) or ``(p, v, a)`` per axis,
        ``[p_1, v_1, a_1, p_2, ...]`` (the reference code's order).

    Attributes
    ----------
    matrix : tensor (3d, 3d)
        The continuous-time generator ``A`` (in the order of ``layout``).
    step_matrix : tensor (3d, 3d)
        The one-step map: the RK4 propagator (see the module docstring) or ``I + A dt + (A dt)^2 / 2``.
    """

    name = "linear_drag"

    def __init__(self, dims: int = 2, drag: float = 0.1, tau: float = 0.05, dt: float = 0.1, noise_cov: Any = None,
                 discretisation: str = "rk4", layout: str = "blocks"):
        d = check_int(dims, "dims", expected="a positive int (spatial dimensions)")
        check_memory(4 * 8 * (3 * d) ** 2, "dims", f"{d} dimensions (a ({3 * d}, {3 * d}) generator)")
        if not isinstance(discretisation, str) or discretisation not in ("rk4", "taylor2"):
            raise InputError("discretisation", "'rk4' (one RK4 step) or 'taylor2' (I + A dt + (A dt)^2 / 2)",
                             repr(discretisation))
        if not isinstance(layout, str) or layout not in ("blocks", "axis"):
            raise InputError("layout", "'blocks' ([p, v, a] blocks of d) or 'axis' ((p, v, a) per axis)",
                             repr(layout))
        self.dims = d
        self.discretisation = discretisation
        self.layout = layout
        self.drag = check_real(drag, "drag", expected="a non-negative drag coefficient")
        if self.drag < 0:
            raise InputError("drag", "a non-negative drag coefficient (a negative one feeds energy in)", repr(drag))
        self.tau = check_real(tau, "tau", positive=True, expected="a positive restoring rate")
        eye = torch.eye(d, dtype=torch.float64)
        a = torch.zeros(3 * d, 3 * d, dtype=torch.float64)
        a[:d, d:2 * d] = eye
        a[d:2 * d, d:2 * d] = -self.drag * eye
        a[d:2 * d, 2 * d:] = eye
        a[2 * d:, d:2 * d] = -self.tau * eye
        if layout == "axis":                    # entry 3 i + k of the state is component k of axis i
            perm = torch.arange(3 * d).view(3, d).T.reshape(-1)
            a = a[perm][:, perm]
        super().__init__(a, dt=dt, noise_cov=noise_cov, continuous=True)
        if discretisation == "taylor2":
            ha = self.dt * a
            self.step_matrix = torch.eye(3 * d, dtype=torch.float64) + ha + (ha @ ha) / 2.0

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        """``(v, a - c v, -tau v)`` for states ``(..., 3d)``, elementwise (no matrix product), in the
        model's ``layout``."""
        d = self.dims
        if self.layout == "axis":
            xa = x.unflatten(-1, (d, 3))
            v, acc = xa[..., 1], xa[..., 2]
            return torch.stack([v, acc - self.drag * v, -self.tau * v], dim=-1).flatten(-2)
        v, acc = x[..., d:2 * d], x[..., 2 * d:]
        return torch.cat([v, acc - self.drag * v, -self.tau * v], dim=-1)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One RK4 step of the elementwise tendency (``discretisation="rk4"``) or the second-order
        Taylor step ``x + dt f(x) + dt^2 f(f(x)) / 2`` (``"taylor2"``): equal to ``x @ step_matrix.T``
        up to rounding, and exactly the same for a batch as row by row (a batched matrix product is not)."""
        if self.discretisation == "taylor2":
            f1 = self.tendency(x)
            return x + self.dt * f1 + (0.5 * self.dt * self.dt) * self.tendency(f1)
        return _rk4(self.tendency, x, self.dt)

    def config(self) -> dict:
        """The constructor arguments."""
        cfg = {"dims": self.dims, "drag": self.drag, "tau": self.tau, "dt": self.dt,
               "noise_cov": _compact_cov(self.noise_cov)}
        if self.discretisation != "rk4":            # the defaults are left out: older configs stay as they were
            cfg["discretisation"] = self.discretisation
        if self.layout != "blocks":
            cfg["layout"] = self.layout
        return cfg
