r"""Mechanics: partitioned ``(q, p)`` systems, fixed-step symplectic integrators, and the daml model
that steps them.

**Partitioned systems.** A mechanical system with ``d`` coordinates is written in the canonical
variables of Hamiltonian mechanics, positions ``q`` and momenta ``p`` (each ``(..., d)``),

.. math::

    \dot q = \frac{\partial H}{\partial p}(q, p), \qquad \dot p = -\frac{\partial H}{\partial q}(q, p),

or, more generally, as any pair of vector fields ``dq(q, p)``, ``dp(q, p)`` (a *partitioned* system,
the shape of diffrax's ``SemiImplicitEuler``, whose vector field is a 2-tuple of terms). A system here
is any object with ``dim`` (``d``), ``dq(q, p)``, ``dp(q, p)`` and ``separable`` (``True`` when
``dq`` depends on ``p`` only and ``dp`` on ``q`` only, as for ``H = T(p) + V(q)``); optionally also
``dqdp(q, p) -> (dq, dp)``, both at one point from one evaluation (a learned Hamiltonian gets both
from one gradient), which the integrators use wherever both are needed at one point (the RK4 stages,
the implicit-midpoint predictor, :meth:`Mechanical.tendency`). The state of the
daml model :class:`Mechanical` is ``x = (q, p)`` concatenated on the last axis, ``q`` first.

**Integrators** (one step of length ``h`` from ``(q_0, p_0)``; Hairer, Lubich & Wanner 2006, ch. I,
II and VI):

* *symplectic Euler* (order 1; HLW §I.1 and §VI.3), momenta implicit, positions explicit:
  ``p_1 = p_0 + h dp(q_0, p_1)``, ``q_1 = q_0 + h dq(q_0, p_1)``;
* *Stormer-Verlet / leapfrog* (order 2; HLW §I.3 and §VI.3, the general non-separable form): a half
  step in ``p`` (implicit), a full step in ``q`` (implicit, trapezoidal) and a half step in ``p``
  (explicit),

  .. math::

      p_{1/2} &= p_0 + \tfrac h2\, dp(q_0, p_{1/2}), \\
      q_1 &= q_0 + \tfrac h2\, \bigl(dq(q_0, p_{1/2}) + dq(q_1, p_{1/2})\bigr), \\
      p_1 &= p_{1/2} + \tfrac h2\, dp(q_1, p_{1/2});

* *implicit midpoint* (order 2; HLW §VI.3 and §IV.2), ``z_1 = z_0 + h f((z_0 + z_1)/2)`` with
  ``z = (q, p)``: symplectic, and it preserves every quadratic invariant exactly (the spring's
  ``H``), up to the solve's tolerance and rounding;
* *classical Runge-Kutta* (RK4, order 4) for comparison: accurate, but not symplectic.

On a Hamiltonian system the three symplectic methods keep the energy error bounded, without secular
drift, over exponentially long times (backward error analysis, HLW ch. IX), where RK4's energy error
grows linearly in time. Steps are **fixed**: an adaptive step size destroys the symplectic
structure that makes this true (HLW ch. VIII), so there is no step-size control here.

For a **separable** system the implicit stages of symplectic Euler and leapfrog are explicit, and
are computed in closed form (no iteration). Otherwise (and always for implicit midpoint) they are
solved by fixed-point iteration from an explicit predictor (an Euler step; for implicit midpoint an
explicit midpoint step, and Gauss-Seidel sweeps in which the updated positions enter the momentum
update: the same fixed point, about half the iterations), stopping when the largest change relative
to the size of the unknown (per sample and component, the inf-norm over the last axis against the
larger of the starting state's and the predictor's) is below ``tol`` (default ten times the machine
epsilon of the dtype), or when the change stops decreasing below ``100 eps`` (the rounding floor),
after at most ``max_iter`` iterations. The iteration contracts when ``h`` times the
Lipschitz constant of the field is below about 1 (2 for the half steps); an iteration that has not
converged at ``max_iter`` gives a :class:`~daml.errors.ConvergenceWarning` naming ``dt`` (reduce it),
and non-finite states a :class:`~daml.errors.DivergenceError`. Inside ``torch.func`` transforms
(``vmap``, ``jacfwd``: the tangent-linear map of the EKF) there is no data-dependent stopping: exactly
``max_iter`` iterations run. Gradients flow through the iterations (unrolled differentiation).

**True systems** (physical units; each ``config()`` rebuilds it):

* :class:`MassSpring` ``H = p^2 / (2m) + k q^2 / 2``; Greydanus et al.'s spring ``H = q^2 + p^2``
  is ``MassSpring(mass=0.5, stiffness=2.0)``.
* :class:`Pendulum` ``H = p^2 / (2 m l^2) + m g l (1 - cos q)`` (``q`` the angle from the downward
  vertical, ``p = m l^2 dq/dt``); Greydanus et al.'s pendulum ``H = 3 (1 - cos q) + p^2`` is
  ``Pendulum(mass=2.0, length=0.5, gravity=3.0)``.
* :class:`DoublePendulum`: two point masses on rigid massless rods, angles from the downward
  vertical; given by its Lagrangian ``L = T - V`` with the mass matrix
  ``M(q) = [[(m1 + m2) l1^2, m2 l1 l2 cos(q1 - q2)], [m2 l1 l2 cos(q1 - q2), m2 l2^2]]``,
  ``T = v^T M(q) v / 2`` and ``V = -(m1 + m2) g l1 cos q1 - m2 g l2 cos q2``, the standard closed-form
  accelerations, and the Hamiltonian ``H = p^T M(q)^{-1} p / 2 + V(q)`` through ``p = M(q) v``
  (not separable: the kinetic energy depends on ``q``). Its field is ``dq = M(q)^{-1} p`` and
  ``dp = dL/dq`` at ``v = M(q)^{-1} p`` (``dH/dq = -dL/dq`` at corresponding points, HLW §VI.1).
  Cranmer et al.'s configuration is ``m1 = m2 = l1 = l2 = 1``, ``g = 9.8`` (the defaults).
* :class:`TwoBody`: two point masses in the plane under Newtonian gravity,
  ``H = |p1|^2 / (2 m1) + |p2|^2 / (2 m2) - G m1 m2 / |x1 - x2|``; separable. Leapfrog conserves its
  total momentum and angular momentum exactly (up to rounding): both are linear or quadratic
  invariants of a symmetric pairwise force, and symplectic partitioned Runge-Kutta methods keep them
  (HLW §IV.2).

Every system also has ``lagrangian(q, v)``, ``acceleration(q, v)`` (analytic), ``velocity(q, p)`` and
``momentum(q, v)`` (the Legendre map ``p = dL/dv``), ``default_state()`` and ``config()``.

**The daml model.** :class:`Mechanical` wraps a system and a method into the
:class:`~daml.models.base.Model` protocol: ``state_size = 2 d``, ``step(x)`` = ``substeps`` steps of
length ``dt / substeps``, optional additive noise ``noise_cov``; it runs in :func:`daml.simulate`,
every filter (under ``torch.no_grad``) and the EKF's ``vmap(jacfwd(step))``. Learned systems
(:mod:`daml.models.hamiltonian`) plug into the same integrators and the same wrapper.

References
----------
* E. Hairer, C. Lubich and G. Wanner (2006), *Geometric Numerical Integration: Structure-Preserving
  Algorithms for Ordinary Differential Equations*, 2nd ed., Springer (HLW).
* P. Kidger, diffrax: ``diffrax.SemiImplicitEuler`` (a partitioned vector field as a pair of terms,
  fixed steps), https://docs.kidger.site/diffrax/ -- the API model.
* S. Greydanus, M. Dzamba and J. Yosinski (2019), Hamiltonian neural networks, NeurIPS
  (``greydanus/hamiltonian-nn``, the spring and pendulum Hamiltonians).
* M. Cranmer et al. (2020), Lagrangian neural networks, ICLR DeepDiffEq workshop
  (``MilesCranmer/lagrangian_nns``, the double-pendulum configuration).
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, NamedTuple, Sequence

import torch

from .. import _device
from ..errors import (
    ConvergenceWarning,
    DamlError,
    DeviceError,
    DivergenceError,
    DtypeError,
    InputError,
    NonFiniteError,
    ShapeError,
    check_int,
    check_real,
)
from .base import _compact_cov, _transformed, as_covariance, as_real_tensor, check_memory

__all__ = [
    "METHODS",
    "step",
    "integrate",
    "Trajectory",
    "energy",
    "convergence_order",
    "MassSpring",
    "Pendulum",
    "DoublePendulum",
    "TwoBody",
    "Mechanical",
    "SYSTEMS",
    "make_mechanical",
]

METHODS = ("symplectic_euler", "leapfrog", "implicit_midpoint", "rk4")
"""The fixed-step integrators, by name."""


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------

def _check_system(system: Any, name: str = "system") -> int:
    """The system's ``dim``, or an :class:`InputError` naming ``name`` for an object without the
    partitioned-system protocol (``dim`` a positive int, callable ``dq`` and ``dp``)."""
    dim = getattr(system, "dim", None)
    if (not callable(getattr(system, "dq", None)) or not callable(getattr(system, "dp", None))
            or isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise InputError(name, "a partitioned system with dim (a positive int), dq(q, p) and dp(q, p)",
                         type(system).__name__)
    return dim


def _check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise InputError("method", f"one of {list(METHODS)}", repr(method))
    return method


def _check_tol(tol: Any) -> float | None:
    if tol is None:
        return None
    return check_real(tol, "tol", positive=True, expected="None or a positive relative tolerance")


def _check_qp(q: Any, p: Any, dim: int, *, finite: bool = True, qname: str = "q",
              pname: str = "p") -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` and ``p`` as real floating tensors of one shape ``(..., dim)``, dtype and device."""
    out = []
    for value, name in ((q, qname), (p, pname)):
        if isinstance(value, torch.Tensor) and value.is_complex():
            raise DtypeError(name, "real numbers", f"dtype {value.dtype}")
        t = as_real_tensor(value, name)
        if t.ndim == 0 or t.shape[-1] != dim:
            raise ShapeError(name, f"a last axis of length {dim} (the system's dim)", f"shape {tuple(t.shape)}")
        out.append(t)
    q, p = out
    if q.shape != p.shape:
        raise ShapeError(pname, f"the shape of {qname}, {tuple(q.shape)}", f"shape {tuple(p.shape)}")
    if q.dtype != p.dtype:
        raise DtypeError(pname, f"the dtype of {qname}, {q.dtype}", f"dtype {p.dtype}")
    if q.device != p.device:
        raise DeviceError(pname, f"the device of {qname}, {q.device}", f"device {p.device}")
    if finite and not _transformed():
        for t, name in ((q, qname), (p, pname)):
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(name, "finite states",
                                     f"{int((~torch.isfinite(t)).sum())} NaN or infinite entries")
    return q, p


def _default_tol(dtype: torch.dtype) -> float:
    return 10.0 * torch.finfo(dtype).eps


# ----------------------------------------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------------------------------------

class _Solve:
    """Outcome of the implicit stages of one step: ``ok`` False when an iteration stopped at
    ``max_iter`` (``change`` its last relative change), ``finite`` False when it met non-finite values."""

    __slots__ = ("ok", "finite", "change")

    def __init__(self) -> None:
        self.ok, self.finite, self.change = True, True, 0.0


def _scale(*states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Per-sample sizes of each component of an implicit stage's unknown: the larger inf-norm (over the
    last axis) of the state the stage starts from and of the predictor, at least the smallest normal."""
    out = []
    for parts in zip(*states):
        size = parts[0].detach().abs().amax(-1)
        for t in parts[1:]:
            size = torch.maximum(size, t.detach().abs().amax(-1))
        out.append(size.clamp_min(torch.finfo(size.dtype).tiny))
    return tuple(out)


def _relative_change(new: tuple[torch.Tensor, ...], old: tuple[torch.Tensor, ...],
                     scale: tuple[torch.Tensor, ...]) -> float:
    """Largest change of the iterate relative to its size (per sample: the inf-norm over the last axis
    of each component, divided by the component's size from :func:`_scale`), maximised over the batch
    and the components; NaN or inf when non-finite values appear."""
    worst = None
    for a, b, s in zip(new, old, scale):
        r = torch.linalg.vector_norm((a - b).detach(), math.inf, dim=-1).div_(s)
        worst = r if worst is None else torch.maximum(worst, r)
    return float(worst.max()) if worst.numel() else 0.0


def _fixed_point(g, z: tuple[torch.Tensor, ...], base: tuple[torch.Tensor, ...], tol: float, max_iter: int,
                 status: _Solve) -> tuple[torch.Tensor, ...]:
    """Iterate ``z <- g(z)`` from the predictor ``z`` (a tuple of tensors); ``base`` is the state the
    stage starts from (with the predictor, it sets the size against which changes are measured)."""
    if _transformed():                       # no data-dependent stopping inside vmap / jacfwd
        for _ in range(max_iter):
            z = g(z)
        return z
    scale = _scale(base, z)
    floor = 100.0 * torch.finfo(z[0].dtype).eps
    prev = math.inf
    for _ in range(max_iter):
        new = g(z)
        c = _relative_change(new, z, scale)
        z = new
        if not math.isfinite(c):
            status.finite = False
            return z
        if c <= tol or (c >= prev and c <= floor):
            return z
        prev = c
    status.ok = False
    status.change = max(status.change, prev)
    return z


def _field(system: Any):
    """``(q, p) -> (dq, dp)``: the system's own ``dqdp`` when it has one (both derivatives from one
    evaluation, as a learned Hamiltonian gets them from one gradient), else ``dq`` and ``dp``."""
    own = getattr(system, "dqdp", None)
    if callable(own):
        return own
    dq, dp = system.dq, system.dp
    return lambda q, p: (dq(q, p), dp(q, p))


def _raw_step(system: Any, q: torch.Tensor, p: torch.Tensor, h: float, method: str, tol: float,
              max_iter: int, status: _Solve) -> tuple[torch.Tensor, torch.Tensor]:
    """One step without checks; implicit-stage trouble goes into ``status``."""
    dq, dp = system.dq, system.dp
    separable = bool(getattr(system, "separable", False))
    if method == "symplectic_euler":
        if separable:
            p1 = p + h * dp(q, p)
        else:
            (p1,) = _fixed_point(lambda z: (p + h * dp(q, z[0]),), (p + h * dp(q, p),), (p,), tol, max_iter,
                                 status)
        return q + h * dq(q, p1), p1
    if method == "leapfrog":
        half = 0.5 * h
        if separable:
            ph = p + half * dp(q, p)
            q1 = q + h * dq(q, ph)
        else:
            (ph,) = _fixed_point(lambda z: (p + half * dp(q, z[0]),), (p + half * dp(q, p),), (p,), tol,
                                 max_iter, status)
            a = dq(q, ph)
            (q1,) = _fixed_point(lambda z: (q + half * (a + dq(z[0], ph)),), (q + h * a,), (q,), tol, max_iter,
                                 status)
        return q1, ph + half * dp(q1, ph)
    if method == "implicit_midpoint":
        half = 0.5 * h

        def g(z):                            # Gauss-Seidel sweep: the new q enters the p update
            pm = 0.5 * (p + z[1])
            q1 = q + h * dq(0.5 * (q + z[0]), pm)
            return q1, p + h * dp(0.5 * (q + q1), pm)

        # predictor: an explicit midpoint (RK2) step, second-order accurate
        f = _field(system)
        k1q, k1p = f(q, p)
        k2q, k2p = f(q + half * k1q, p + half * k1p)
        q1, p1 = _fixed_point(g, (q + h * k2q, p + h * k2p), (q, p), tol, max_iter, status)
        return q1, p1
    # rk4
    f = _field(system)
    k1q, k1p = f(q, p)
    k2q, k2p = f(q + 0.5 * h * k1q, p + 0.5 * h * k1p)
    k3q, k3p = f(q + 0.5 * h * k2q, p + 0.5 * h * k2p)
    k4q, k4p = f(q + h * k3q, p + h * k3p)
    return (q + (h / 6.0) * (k1q + 2.0 * (k2q + k3q) + k4q),
            p + (h / 6.0) * (k1p + 2.0 * (k2p + k3p) + k4p))


def _unconverged_message(method: str, dt: float, max_iter: int, change: float, tol: float, count: int = 1) -> str:
    steps = "a step" if count == 1 else f"{count} steps"
    return (f"{method}: the fixed-point iteration of the implicit stages did not converge in max_iter={max_iter} "
            f"iterations in {steps} (relative change {change:.2g} > tol {tol:.2g}); the result is inaccurate: "
            f"reduce dt={dt!r} (or raise max_iter)")


def step(system: Any, q: Any, p: Any, dt: float, method: str = "leapfrog", *, tol: float | None = None,
         max_iter: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed step of a partitioned system ``dq/dt = dq(q, p)``, ``dp/dt = dp(q, p)``.

    Parameters
    ----------
    system : partitioned system
        An object with ``dim`` (``d``), ``dq(q, p)``, ``dp(q, p)`` and ``separable`` (see the module
        docstring): a true system of this module or a learned one.
    q, p : tensor (..., d)
        Positions and momenta, of one shape, dtype and device; batched over all leading dims.
    dt : float
        The step (positive).
    method : str
        One of :data:`METHODS`: ``"symplectic_euler"``, ``"leapfrog"`` (Stormer-Verlet, the default),
        ``"implicit_midpoint"``, ``"rk4"``.
    tol : float, optional
        Relative tolerance of the fixed-point iteration of implicit stages (default ``10 eps`` of the
        dtype). Not used by explicit steps (RK4; symplectic Euler and leapfrog on separable systems).
    max_iter : int
        Iteration limit of each implicit stage (and the exact count inside ``torch.func`` transforms).

    Returns
    -------
    (q1, p1) : tensors (..., d)
        The state after one step, differentiable with respect to ``q``, ``p`` and the system's
        parameters.

    Raises
    ------
    InputError
        Naming ``system`` for an object without ``dim``, ``dq`` and ``dp``; ``method`` for an unknown
        method; ``dt`` for a non-positive or non-finite step; ``tol`` / ``max_iter`` for bad values.
    ShapeError, DtypeError, NonFiniteError
        Naming ``q`` or ``p`` for a last axis other than ``d``, shapes or dtypes that differ, NaN or
        infinite entries.
    DivergenceError
        When the step produces non-finite states (``dt`` too large, or a singular field).

    Warns
    -----
    ConvergenceWarning
        When an implicit stage stops at ``max_iter`` before reaching ``tol`` (names ``dt``).

    Examples
    --------
    >>> q1, p1 = step(Pendulum(), torch.tensor([1.0]), torch.tensor([0.0]), 0.01)
    >>> q1.shape
    torch.Size([1])
    """
    dim = _check_system(system)
    method = _check_method(method)
    dt = check_real(dt, "dt", positive=True, expected="a positive time step")
    tol = _check_tol(tol)
    max_iter = check_int(max_iter, "max_iter", 1, "an int >= 1 (fixed-point iterations)")
    q, p = _check_qp(q, p, dim)
    tol = _default_tol(q.dtype) if tol is None else tol
    status = _Solve()
    q1, p1 = _raw_step(system, q, p, dt, method, tol, max_iter, status)
    if not _transformed():
        if not status.finite or not (bool(torch.isfinite(q1).all()) and bool(torch.isfinite(p1).all())):
            raise DivergenceError(f"{method} step with dt={dt!r}: non-finite states (reduce dt or check the state)")
        if not status.ok:
            warnings.warn(_unconverged_message(method, dt, max_iter, status.change, tol), ConvergenceWarning,
                          stacklevel=2)
    return q1, p1


class Trajectory(NamedTuple):
    """A recorded trajectory, time first."""

    t: torch.Tensor
    """Times ``(T,)``, starting at 0."""
    q: torch.Tensor
    """Positions ``(T, *batch, d)``."""
    p: torch.Tensor
    """Momenta ``(T, *batch, d)``."""


def integrate(system: Any, q0: Any, p0: Any, *, dt: float, steps: int, method: str = "leapfrog", every: int = 1,
              tol: float | None = None, max_iter: int = 50) -> Trajectory:
    """Integrate a partitioned system with ``steps`` fixed steps of length ``dt``.

    Parameters
    ----------
    system : partitioned system
        See :func:`step`.
    q0, p0 : tensor (*batch, d)
        Initial positions and momenta (one shape); every leading dim is an independent problem.
    dt : float
        The fixed step (positive).
    steps : int
        Number of steps (``>= 0``).
    method : str
        One of :data:`METHODS` (default ``"leapfrog"``).
    every : int
        Record every ``every``-th state (``>= 1``), the initial state included: ``steps // every + 1``
        records at times ``0, every dt, 2 every dt, ...``.
    tol, max_iter
        As in :func:`step`.

    Returns
    -------
    Trajectory
        ``t`` ``(T,)``, ``q`` and ``p`` ``(T, *batch, d)``; differentiable.

    Raises
    ------
    InputError, ShapeError, DtypeError, NonFiniteError
        As :func:`step` (naming ``q0`` / ``p0``), and naming ``steps`` (an int ``>= 0``, and a record of
        ``steps // every + 1`` states that fits in memory) or ``every`` (an int ``>= 1``).
    DivergenceError
        With the first recorded step whose state is non-finite.

    Warns
    -----
    ConvergenceWarning
        Once, with the number of steps whose implicit stages did not converge.

    Examples
    --------
    >>> traj = integrate(MassSpring(), torch.ones(5, 1), torch.zeros(5, 1), dt=0.1, steps=100, every=10)
    >>> traj.q.shape
    torch.Size([11, 5, 1])
    """
    dim = _check_system(system)
    method = _check_method(method)
    dt = check_real(dt, "dt", positive=True, expected="a positive time step")
    steps = check_int(steps, "steps", 0, "an int >= 0 (integration steps)")
    every = check_int(every, "every", 1, "an int >= 1 (record every every-th step)")
    tol = _check_tol(tol)
    max_iter = check_int(max_iter, "max_iter", 1, "an int >= 1 (fixed-point iterations)")
    q, p = _check_qp(q0, p0, dim, qname="q0", pname="p0")
    records = steps // every + 1
    check_memory(2.0 * records * max(q.numel(), 1) * q.element_size(), "steps",
                 f"steps={steps}, every={every}: {records} recorded states of shape {tuple(q.shape)}", q.device)
    tol = _default_tol(q.dtype) if tol is None else tol
    transformed = _transformed()
    qs, ps, status, bad = [q], [p], _Solve(), 0
    for k in range(1, steps + 1):
        one = _Solve()
        q, p = _raw_step(system, q, p, dt, method, tol, max_iter, one)
        if not one.ok:
            bad += 1
            status.change = max(status.change, one.change)
        if not transformed and not one.finite:
            raise DivergenceError(f"integrate ({method}, dt={dt!r}): non-finite states", step=k)
        if k % every == 0:
            if not transformed and not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(p).all())):
                raise DivergenceError(f"integrate ({method}, dt={dt!r}): non-finite states at or before this "
                                      f"recorded step", step=k)
            qs.append(q)
            ps.append(p)
    if bad and not transformed:
        warnings.warn(_unconverged_message(method, dt, max_iter, status.change, tol, bad), ConvergenceWarning,
                      stacklevel=2)
    t = torch.arange(0, steps + 1, every, dtype=q.dtype, device=q.device) * dt
    return Trajectory(t, torch.stack(qs), torch.stack(ps))


def energy(system: Any, q: Any, p: Any) -> torch.Tensor:
    """The system's Hamiltonian ``H(q, p)``, shape ``(...)`` for ``q``, ``p`` ``(..., d)``.

    Raises
    ------
    InputError
        Naming ``system`` when it has no ``hamiltonian`` (or not the system protocol).
    ShapeError, DtypeError, NonFiniteError
        Naming ``q`` / ``p`` as :func:`step` does.

    Examples
    --------
    >>> float(energy(MassSpring(), torch.tensor([1.0]), torch.tensor([0.0])))
    0.5
    """
    dim = _check_system(system)
    if not callable(getattr(system, "hamiltonian", None)):
        raise InputError("system", "a system with hamiltonian(q, p)", type(system).__name__)
    q, p = _check_qp(q, p, dim)
    return system.hamiltonian(q, p)


_MAX_ORDER_STEPS = 10**7
"""The most integration steps :func:`convergence_order` takes (a guard against a mistyped tiny ``dt``)."""


def convergence_order(system: Any, q0: Any, p0: Any, *, method: str, t_end: float, dts: Sequence[float]) -> float:
    """Measured order of convergence of ``method``: the least-squares slope of ``log error`` against
    ``log dt`` over the steps ``dts``.

    The error at ``t_end`` is the largest absolute difference of ``(q, p)`` (over the batch and the
    coordinates) from a reference solution: RK4 with step ``min(dts) / 16`` (its error is ``16^-4`` of
    RK4's at the smallest step, far below every method's error there). Choose ``dts`` in the
    asymptotic range, with errors well above rounding (float64 recommended).

    Parameters
    ----------
    system : partitioned system
    q0, p0 : tensor (*batch, d)
    method : str
        One of :data:`METHODS`.
    t_end : float
        The final time; a whole multiple of every ``dt`` (to a relative ``1e-9``).
    dts : sequence of float
        At least two distinct positive steps.

    Returns
    -------
    float
        The slope (about 1 for symplectic Euler, 2 for leapfrog and implicit midpoint, 4 for RK4).

    Raises
    ------
    InputError
        Naming ``dts`` for fewer than two distinct positive steps, a step that does not divide
        ``t_end`` or steps so small that more than ``1e7`` integration steps would be needed;
        ``t_end`` for a non-positive one; and as :func:`integrate`.
        Naming ``q0`` when an error is exactly zero (an equilibrium: no slope can be measured).
    DivergenceError
        When an error is non-finite.

    Examples
    --------
    >>> round(convergence_order(Pendulum(), torch.tensor([1.0]), torch.tensor([0.0]), method="leapfrog",
    ...                         t_end=1.0, dts=[0.1, 0.05, 0.025]))
    2
    """
    _check_system(system)
    method = _check_method(method)
    t_end = check_real(t_end, "t_end", positive=True, expected="a positive final time")
    try:
        values = [float(h) for h in dts]
    except (TypeError, ValueError) as exc:
        raise InputError("dts", "a sequence of positive steps", repr(dts)[:120]) from exc
    if len(set(values)) < 2 or not all(math.isfinite(h) and h > 0 for h in values):
        raise InputError("dts", "at least two distinct positive finite steps", repr(dts)[:120])
    counts = []
    for h in values:
        n = round(t_end / h)
        if n < 1 or abs(n * h - t_end) > 1e-9 * t_end:
            raise InputError("dts", f"steps that divide t_end={t_end!r}", repr(h))
        counts.append(n)
    h_ref = min(values) / 16.0
    n_ref = round(t_end / h_ref)
    if n_ref + sum(counts) > _MAX_ORDER_STEPS:
        raise InputError("dts", f"steps needing at most {_MAX_ORDER_STEPS:.0e} integration steps in all (the "
                         f"reference takes t_end / (min(dts) / 16))", f"{n_ref + sum(counts):.3g} steps for {values}")
    ref = integrate(system, q0, p0, dt=h_ref, steps=n_ref, method="rk4", every=n_ref)
    q_ref, p_ref = ref.q[-1], ref.p[-1]
    errs = []
    for h, n in zip(values, counts):
        traj = integrate(system, q0, p0, dt=h, steps=n, method=method, every=n)
        err = max(float((traj.q[-1] - q_ref).abs().max()), float((traj.p[-1] - p_ref).abs().max()))
        if not math.isfinite(err):
            raise DivergenceError(f"convergence_order: error {err!r} at dt={h!r}; no slope can be measured")
        if err == 0:
            raise InputError("q0", "an initial state with a non-zero discretisation error (not a fixed point)",
                             f"error 0 at dt={h!r}")
        errs.append(err)
    x = torch.log(torch.tensor(values, dtype=torch.float64))
    y = torch.log(torch.tensor(errs, dtype=torch.float64))
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


# ----------------------------------------------------------------------------------------------------
# true systems
# ----------------------------------------------------------------------------------------------------

def _state(values: Sequence[float], dtype: Any, device: Any) -> torch.Tensor:
    dev = _device.resolve_device(device)
    return torch.tensor(values, dtype=_device.resolve_dtype(dtype, dev), device=dev)


class _System:
    """Shared parts of the true systems."""

    name = "system"
    dim = 1
    separable = True

    def config(self) -> dict:  # pragma: no cover - overridden
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config() == self.config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.config().items()))))


class MassSpring(_System):
    """A mass on a linear spring: ``H = p^2 / (2 m) + k q^2 / 2`` (``d = 1``, separable).

    Greydanus et al.'s ideal spring ``H = q^2 + p^2`` (``greydanus/hamiltonian-nn``,
    ``experiment-spring``) is ``MassSpring(mass=0.5, stiffness=2.0)``.

    Parameters
    ----------
    mass, stiffness : float
        Positive ``m`` and ``k`` (angular frequency ``sqrt(k / m)``).

    Examples
    --------
    >>> MassSpring(mass=0.5, stiffness=2.0).hamiltonian(torch.tensor([1.0]), torch.tensor([1.0]))
    tensor(2.)
    """

    name = "mass_spring"
    dim = 1
    separable = True

    def __init__(self, mass: float = 1.0, stiffness: float = 1.0):
        self.mass = check_real(mass, "mass", positive=True, expected="a positive mass")
        self.stiffness = check_real(stiffness, "stiffness", positive=True, expected="a positive stiffness")

    def dq(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``dH/dp = p / m``, shape ``(..., 1)``."""
        return p / self.mass

    def dp(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``-dH/dq = -k q``, shape ``(..., 1)``."""
        return -self.stiffness * q

    def hamiltonian(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``H(q, p)``, shape ``(...)``."""
        return (0.5 / self.mass * p * p + 0.5 * self.stiffness * q * q).sum(-1)

    def lagrangian(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``L(q, v) = m v^2 / 2 - k q^2 / 2``, shape ``(...)``."""
        return (0.5 * self.mass * v * v - 0.5 * self.stiffness * q * q).sum(-1)

    def acceleration(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``-k q / m``, shape ``(..., 1)``."""
        return -(self.stiffness / self.mass) * q + 0.0 * v

    def velocity(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``v = p / m``."""
        return p / self.mass

    def momentum(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``p = m v``."""
        return self.mass * v

    def default_state(self, dtype: Any = None, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``q = 1``, ``p = 0`` (shape ``(1,)`` each)."""
        return _state([1.0], dtype, device), _state([0.0], dtype, device)

    def config(self) -> dict:
        """The constructor arguments."""
        return {"mass": self.mass, "stiffness": self.stiffness}


class Pendulum(_System):
    """An ideal pendulum: ``H = p^2 / (2 m l^2) + m g l (1 - cos q)`` (``d = 1``, separable).

    ``q`` is the angle from the downward vertical (not wrapped), ``p = m l^2 dq/dt`` the angular
    momentum. Greydanus et al.'s ideal pendulum ``H = 3 (1 - cos q) + p^2``
    (``greydanus/hamiltonian-nn``, ``experiment-pend``) is ``Pendulum(mass=2.0, length=0.5, gravity=3.0)``.

    Parameters
    ----------
    mass, length, gravity : float
        Positive ``m``, ``l`` and ``g`` (small-angle frequency ``sqrt(g / l)``).

    Examples
    --------
    >>> Pendulum(mass=2.0, length=0.5, gravity=3.0).hamiltonian(torch.tensor([0.0]), torch.tensor([1.0]))
    tensor(1.)
    """

    name = "pendulum"
    dim = 1
    separable = True

    def __init__(self, mass: float = 1.0, length: float = 1.0, gravity: float = 9.81):
        self.mass = check_real(mass, "mass", positive=True, expected="a positive mass")
        self.length = check_real(length, "length", positive=True, expected="a positive length")
        self.gravity = check_real(gravity, "gravity", positive=True, expected="a positive gravity")

    @property
    def _inertia(self) -> float:
        return self.mass * self.length ** 2

    def dq(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``p / (m l^2)``."""
        return p / self._inertia

    def dp(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``-m g l sin q``."""
        return -(self.mass * self.gravity * self.length) * torch.sin(q)

    def hamiltonian(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``H(q, p)``, shape ``(...)``; ``1 - cos q`` as ``2 sin^2(q / 2)`` (no cancellation near 0)."""
        pot = 2.0 * torch.sin(0.5 * q) ** 2
        return (0.5 / self._inertia * p * p + self.mass * self.gravity * self.length * pot).sum(-1)

    def lagrangian(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``L(q, v) = m l^2 v^2 / 2 - m g l (1 - cos q)``."""
        pot = 2.0 * torch.sin(0.5 * q) ** 2
        return (0.5 * self._inertia * v * v - self.mass * self.gravity * self.length * pot).sum(-1)

    def acceleration(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``-(g / l) sin q``."""
        return -(self.gravity / self.length) * torch.sin(q) + 0.0 * v

    def velocity(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``v = p / (m l^2)``."""
        return p / self._inertia

    def momentum(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``p = m l^2 v``."""
        return self._inertia * v

    def default_state(self, dtype: Any = None, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``q = 1`` rad at rest."""
        return _state([1.0], dtype, device), _state([0.0], dtype, device)

    def config(self) -> dict:
        """The constructor arguments."""
        return {"mass": self.mass, "length": self.length, "gravity": self.gravity}


class DoublePendulum(_System):
    """A planar double pendulum (``d = 2``, angles from the downward vertical; not separable).

    Lagrangian ``L = v^T M(q) v / 2 - V(q)`` with ``M(q)`` and ``V`` of the module docstring; the
    analytic accelerations are the standard closed form (with ``D = q1 - q2``)

    .. math::

        a_1 = \\frac{l_2 m_2}{l_1 (m_1 + m_2)} \\cos D, \\quad a_2 = \\frac{l_1}{l_2} \\cos D, \\\\
        f_1 = -\\frac{l_2 m_2}{l_1 (m_1 + m_2)} \\omega_2^2 \\sin D - \\frac{g}{l_1} \\sin q_1, \\quad
        f_2 = \\frac{l_1}{l_2} \\omega_1^2 \\sin D - \\frac{g}{l_2} \\sin q_2, \\\\
        \\ddot q_1 = \\frac{f_1 - a_1 f_2}{1 - a_1 a_2}, \\quad \\ddot q_2 = \\frac{f_2 - a_2 f_1}{1 - a_1 a_2}

    (the form of ``MilesCranmer/lagrangian_nns``, ``experiment_dblpend/physics.py``). The Hamiltonian
    state is ``(q, p)`` with ``p = M(q) v``. Defaults are Cranmer et al.'s ``m = l = 1``, ``g = 9.8``.

    Parameters
    ----------
    m1, m2, l1, l2, gravity : float
        Positive masses, rod lengths and gravity.

    Examples
    --------
    >>> dp = DoublePendulum()
    >>> dp.acceleration(torch.zeros(2), torch.zeros(2)).abs().max().item()
    0.0
    """

    name = "double_pendulum"
    dim = 2
    separable = False

    def __init__(self, m1: float = 1.0, m2: float = 1.0, l1: float = 1.0, l2: float = 1.0, gravity: float = 9.8):
        self.m1 = check_real(m1, "m1", positive=True, expected="a positive mass")
        self.m2 = check_real(m2, "m2", positive=True, expected="a positive mass")
        self.l1 = check_real(l1, "l1", positive=True, expected="a positive length")
        self.l2 = check_real(l2, "l2", positive=True, expected="a positive length")
        self.gravity = check_real(gravity, "gravity", positive=True, expected="a positive gravity")

    def mass_matrix(self, q: torch.Tensor) -> torch.Tensor:
        """``M(q)``, shape ``(..., 2, 2)``."""
        c = torch.cos(q[..., 0] - q[..., 1])
        m11 = torch.full_like(c, (self.m1 + self.m2) * self.l1 ** 2)
        m12 = self.m2 * self.l1 * self.l2 * c
        m22 = torch.full_like(c, self.m2 * self.l2 ** 2)
        return torch.stack([torch.stack([m11, m12], -1), torch.stack([m12, m22], -1)], -2)

    def potential(self, q: torch.Tensor) -> torch.Tensor:
        """``V(q) = -(m1 + m2) g l1 cos q1 - m2 g l2 cos q2``, shape ``(...)``."""
        g = self.gravity
        return -(self.m1 + self.m2) * g * self.l1 * torch.cos(q[..., 0]) - self.m2 * g * self.l2 * torch.cos(q[..., 1])

    def lagrangian(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``L(q, v) = T - V``, shape ``(...)``."""
        w1, w2 = v[..., 0], v[..., 1]
        c = torch.cos(q[..., 0] - q[..., 1])
        kin = (0.5 * (self.m1 + self.m2) * self.l1 ** 2 * w1 * w1 + 0.5 * self.m2 * self.l2 ** 2 * w2 * w2
               + self.m2 * self.l1 * self.l2 * w1 * w2 * c)
        return kin - self.potential(q)

    def acceleration(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The closed-form angular accelerations, shape ``(..., 2)``."""
        t1, t2 = q[..., 0], q[..., 1]
        w1, w2 = v[..., 0], v[..., 1]
        d = t1 - t2
        r = self.l2 / self.l1 * self.m2 / (self.m1 + self.m2)
        a1 = r * torch.cos(d)
        a2 = self.l1 / self.l2 * torch.cos(d)
        f1 = -r * w2 * w2 * torch.sin(d) - self.gravity / self.l1 * torch.sin(t1)
        f2 = self.l1 / self.l2 * w1 * w1 * torch.sin(d) - self.gravity / self.l2 * torch.sin(t2)
        den = 1.0 - a1 * a2
        return torch.stack([(f1 - a1 * f2) / den, (f2 - a2 * f1) / den], -1)

    def velocity(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``v = M(q)^{-1} p`` in closed form (``det M = m2 l1^2 l2^2 (m1 + m2 sin^2 D)``)."""
        d = q[..., 0] - q[..., 1]
        c, s = torch.cos(d), torch.sin(d)
        p1, p2 = p[..., 0], p[..., 1]
        den = self.m1 + self.m2 * s * s
        v1 = (self.l2 * p1 - self.l1 * c * p2) / (self.l1 ** 2 * self.l2 * den)
        v2 = (((self.m1 + self.m2) * self.l1 * p2 - self.m2 * self.l2 * c * p1)
              / (self.m2 * self.l1 * self.l2 ** 2 * den))
        return torch.stack([v1, v2], -1)

    def momentum(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``p = M(q) v = dL/dv``."""
        c = torch.cos(q[..., 0] - q[..., 1])
        w1, w2 = v[..., 0], v[..., 1]
        k = self.m2 * self.l1 * self.l2
        return torch.stack([(self.m1 + self.m2) * self.l1 ** 2 * w1 + k * c * w2,
                            k * c * w1 + self.m2 * self.l2 ** 2 * w2], -1)

    def dq(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``dH/dp = M(q)^{-1} p``."""
        return self.velocity(q, p)

    def dp(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``-dH/dq = dL/dq`` at ``v = M(q)^{-1} p``."""
        v = self.velocity(q, p)
        t1, t2 = q[..., 0], q[..., 1]
        coupling = self.m2 * self.l1 * self.l2 * v[..., 0] * v[..., 1] * torch.sin(t1 - t2)
        g = self.gravity
        return torch.stack([-coupling - (self.m1 + self.m2) * g * self.l1 * torch.sin(t1),
                            coupling - self.m2 * g * self.l2 * torch.sin(t2)], -1)

    def hamiltonian(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``H = p^T M(q)^{-1} p / 2 + V(q)``, shape ``(...)``."""
        return 0.5 * (p * self.velocity(q, p)).sum(-1) + self.potential(q)

    def default_state(self, dtype: Any = None, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both rods horizontal (``q = (pi/2, pi/2)``), at rest: a chaotic motion."""
        return _state([0.5 * math.pi, 0.5 * math.pi], dtype, device), _state([0.0, 0.0], dtype, device)

    def config(self) -> dict:
        """The constructor arguments."""
        return {"m1": self.m1, "m2": self.m2, "l1": self.l1, "l2": self.l2, "gravity": self.gravity}


class TwoBody(_System):
    """Two point masses in the plane under Newtonian gravity (``d = 4``, separable).

    ``q = (x1, y1, x2, y2)``, ``p = (px1, py1, px2, py2)``,
    ``H = |p1|^2 / (2 m1) + |p2|^2 / (2 m2) - G m1 m2 / r`` with ``r = |x1 - x2|``. The force is
    singular at ``r = 0``: a collision gives non-finite states (:class:`~daml.errors.DivergenceError`
    from :func:`step` / :func:`integrate`).

    Parameters
    ----------
    m1, m2, gravity : float
        Positive masses and gravitational constant ``G``.

    Examples
    --------
    >>> q, p = TwoBody().default_state()
    >>> round(float(TwoBody().hamiltonian(q, p)), 12)
    -0.5
    """

    name = "two_body"
    dim = 4
    separable = True

    def __init__(self, m1: float = 1.0, m2: float = 1.0, gravity: float = 1.0):
        self.m1 = check_real(m1, "m1", positive=True, expected="a positive mass")
        self.m2 = check_real(m2, "m2", positive=True, expected="a positive mass")
        self.gravity = check_real(gravity, "gravity", positive=True, expected="a positive gravitational constant")

    def _masses(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.m1, self.m1, self.m2, self.m2], dtype=like.dtype, device=like.device)

    def dq(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``p / m`` per body."""
        return p / self._masses(p)

    def dp(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``-G m1 m2 (x1 - x2) / r^3`` on body 1 and its opposite on body 2."""
        rel = q[..., 0:2] - q[..., 2:4]
        r2 = (rel * rel).sum(-1, keepdim=True)
        force = -(self.gravity * self.m1 * self.m2) * rel / (r2 * torch.sqrt(r2))
        return torch.cat([force, -force], -1)

    def potential(self, q: torch.Tensor) -> torch.Tensor:
        """``-G m1 m2 / r``, shape ``(...)``."""
        rel = q[..., 0:2] - q[..., 2:4]
        return -(self.gravity * self.m1 * self.m2) / torch.sqrt((rel * rel).sum(-1))

    def hamiltonian(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``H(q, p)``, shape ``(...)``."""
        return 0.5 * (p * p / self._masses(p)).sum(-1) + self.potential(q)

    def lagrangian(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``L = m1 |v1|^2 / 2 + m2 |v2|^2 / 2 + G m1 m2 / r``."""
        return 0.5 * (self._masses(v) * v * v).sum(-1) - self.potential(q)

    def acceleration(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The gravitational accelerations, shape ``(..., 4)``."""
        return self.dp(q, v) / self._masses(v)

    def velocity(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``v = p / m``."""
        return p / self._masses(p)

    def momentum(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``p = m v``."""
        return self._masses(v) * v

    def total_momentum(self, p: torch.Tensor) -> torch.Tensor:
        """``p1 + p2``, shape ``(..., 2)`` (conserved)."""
        return p[..., 0:2] + p[..., 2:4]

    def angular_momentum(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``sum_i x_i py_i - y_i px_i``, shape ``(...)`` (conserved)."""
        return (q[..., 0] * p[..., 1] - q[..., 1] * p[..., 0]) + (q[..., 2] * p[..., 3] - q[..., 3] * p[..., 2])

    def default_state(self, dtype: Any = None, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A circular orbit of separation 1 about the centre of mass at the origin, total momentum 0."""
        mt = self.m1 + self.m2
        speed = math.sqrt(self.gravity * mt)            # relative speed of a circular orbit, r = 1
        q = [self.m2 / mt, 0.0, -self.m1 / mt, 0.0]
        v1, v2 = self.m2 / mt * speed, -self.m1 / mt * speed
        p = [0.0, self.m1 * v1, 0.0, self.m2 * v2]
        return _state(q, dtype, device), _state(p, dtype, device)

    def config(self) -> dict:
        """The constructor arguments."""
        return {"m1": self.m1, "m2": self.m2, "gravity": self.gravity}


SYSTEMS: dict[str, type] = {
    "mass_spring": MassSpring,
    "pendulum": Pendulum,
    "double_pendulum": DoublePendulum,
    "two_body": TwoBody,
}
"""The true systems by name (:func:`make_mechanical`)."""


def _build_system(name: Any, params: dict) -> Any:
    cls = SYSTEMS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InputError("system", f"one of {sorted(SYSTEMS)} or a partitioned system", repr(name))
    try:
        return cls(**params)
    except DamlError:
        raise
    except TypeError as exc:
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise InputError(name, f"parameters among {accepted}", f"{sorted(params)}") from exc


# ----------------------------------------------------------------------------------------------------
# the daml model
# ----------------------------------------------------------------------------------------------------

class Mechanical:
    """A partitioned system as a daml :class:`~daml.models.base.Model`: state ``x = (q, p)``.

    Parameters
    ----------
    system : partitioned system or str
        A system (``dim``, ``dq``, ``dp``, ``separable``), or the name of a true one in
        :data:`SYSTEMS` with its parameters given as further keywords (so that
        ``Mechanical(**m.config())`` rebuilds a model of a true system).
    dt : float
        Time of one model step (positive).
    substeps : int
        Integrator steps per model step (each of length ``dt / substeps``).
    method : str
        One of :data:`METHODS` (default ``"leapfrog"``).
    noise_cov : scalar, (2d,) or (2d, 2d), optional
        Covariance ``Q`` of additive Gaussian model noise per model step.
    tol, max_iter
        Of the implicit stages, as in :func:`step`.
    **params
        The true system's parameters when ``system`` is a name.

    Notes
    -----
    ``step`` lets non-finite states through (no exception): :func:`daml.simulate` and
    :func:`daml.filters.run` check every state and report the step where they appear, as for every
    other model. An implicit stage that does not converge gives a :class:`~daml.errors.ConvergenceWarning`.

    Examples
    --------
    >>> m = Mechanical(Pendulum(), dt=0.1)
    >>> m.step(m.default_x0()).shape
    torch.Size([2])
    """

    name = "mechanical"

    def __init__(self, system: Any, dt: float, *, substeps: int = 1, method: str = "leapfrog", noise_cov: Any = None,
                 tol: float | None = None, max_iter: int = 50, **params: Any):
        if isinstance(system, str):
            system = _build_system(system, params)
        elif params:
            raise InputError("params", "no extra keywords when system is an object (they are for a system name)",
                             sorted(params))
        self.dim = _check_system(system)
        self.system = system
        self.state_size = 2 * self.dim
        self.dt = check_real(dt, "dt", positive=True, expected="a positive time step")
        self.substeps = check_int(substeps, "substeps", 1, "an int >= 1 (integrator steps per model step)")
        self.method = _check_method(method)
        self.tol = _check_tol(tol)
        self.max_iter = check_int(max_iter, "max_iter", 1, "an int >= 1 (fixed-point iterations)")
        self.noise_cov = None if noise_cov is None else as_covariance(noise_cov, self.state_size, "noise_cov")

    def _split(self, x: torch.Tensor, name: str = "x") -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            x = as_real_tensor(x, name)
            if not x.is_floating_point():
                x = x.to(_device.resolve_dtype(None, x.device))
        if x.ndim == 0 or x.shape[-1] != self.state_size:
            raise ShapeError(name, f"a last axis of length {self.state_size} (the state size, 2 x dim)",
                             f"shape {tuple(x.shape)}")
        return x[..., :self.dim], x[..., self.dim:]

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """``substeps`` integrator steps of length ``dt / substeps`` of states ``(..., 2d)``."""
        q, p = self._split(x)
        h = self.dt / self.substeps
        tol = _default_tol(q.dtype) if self.tol is None else self.tol
        status = _Solve()
        for _ in range(self.substeps):
            q, p = _raw_step(self.system, q, p, h, self.method, tol, self.max_iter, status)
            if not status.finite:
                break
        if not status.ok and status.finite and not _transformed():
            warnings.warn(_unconverged_message(self.method, self.dt, self.max_iter, status.change, tol).replace(
                "dt=", "dt / substeps = "), ConvergenceWarning, stacklevel=2)
        return torch.cat([q, p], -1)

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        """The time derivative ``(dq, dp)`` of states ``(..., 2d)``."""
        q, p = self._split(x)
        return torch.cat(_field(self.system)(q, p), -1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """The system's Hamiltonian of states ``(..., 2d)``, shape ``(...)``."""
        if not callable(getattr(self.system, "hamiltonian", None)):
            raise InputError("system", "a system with hamiltonian(q, p)", type(self.system).__name__)
        q, p = self._split(x)
        return self.system.hamiltonian(q, p)

    def default_x0(self, dtype: Any = None, device: Any = None) -> torch.Tensor:
        """The system's ``default_state()`` concatenated, shape ``(2d,)`` (zeros for a system without one)."""
        own = getattr(self.system, "default_state", None)
        if callable(own):
            q, p = own(dtype=dtype, device=device)
            return torch.cat([q, p], -1)
        return _state([0.0] * self.state_size, dtype, device)

    def config(self) -> dict:
        """``{"system": name, **system.config(), "dt", "substeps", "method", "noise_cov"}`` (and ``tol`` /
        ``max_iter`` when not the defaults); ``Mechanical(**config)`` (or ``make_mechanical(name, **rest)``)
        rebuild a model of a true system."""
        own = getattr(self.system, "config", None)
        cfg = {"system": getattr(self.system, "name", type(self.system).__name__),
               **(own() if callable(own) else {}),
               "dt": self.dt, "substeps": self.substeps, "method": self.method,
               "noise_cov": _compact_cov(self.noise_cov)}
        if getattr(self, "file", None) is not None:              # a network read by from_file
            cfg["file"] = self.file
        if self.tol is not None:
            cfg["tol"] = self.tol
        if self.max_iter != 50:
            cfg["max_iter"] = self.max_iter
        return cfg

    @classmethod
    def from_file(cls, file: Any, dt: float, *, substeps: int = 1, method: str = "leapfrog", noise_cov: Any = None,
                  tol: float | None = None, max_iter: int = 50, dtype: Any = None, device: Any = None,
                  **expected: Any) -> "Mechanical":
        """A model of a learned network saved by :func:`daml.io.save_network` (a
        :class:`~daml.models.HamiltonianNet`, :class:`~daml.models.LagrangianNet` or
        :class:`~daml.models.DerivativeNet`): ``make_model("mechanical", file="hnn.pt", dt=0.1)`` in
        Python, or ``name = "mechanical"``, ``file = "hnn.pt"``, ``dt = 0.1`` in an experiment file (a path
        relative to the working directory), for example as one method's forecast model against a true
        system.

        ``expected`` may repeat the network's configuration (``system`` = its name, ``dim``, ``hidden``,
        ``layers``, ...: what :meth:`config` records), each checked against the file's; ``seed`` is
        ignored (the weights come from the file).

        Raises
        ------
        InputError
            Naming ``file`` for a missing file or one that holds no such network, and the key of an
            expected value that differs from the file's.
        """
        from ..io import load_network

        net = load_network(file, dtype=dtype, device=device)
        if not callable(getattr(net, "dq", None)) or not callable(getattr(net, "dp", None)):
            raise InputError("file", "a saved dynamics network (HamiltonianNet, LagrangianNet or DerivativeNet)",
                             f"{file} holds a {type(net).__name__}")
        have = {"system": getattr(net, "name", type(net).__name__), **net.config()}
        for key, value in expected.items():
            if key == "seed":
                continue
            if key not in have:
                raise InputError(key, f"one of the network's settings {sorted(have)}", repr(key))
            if value != have[key]:
                raise InputError(key, f"{have[key]!r} (the value in {file})", repr(value))
        model = cls(net, dt, substeps=substeps, method=method, noise_cov=noise_cov, tol=tol, max_iter=max_iter)
        model.file = str(file)
        return model

    def __repr__(self) -> str:
        return f"Mechanical({self.system!r}, dt={self.dt!r}, substeps={self.substeps}, method={self.method!r})"


def make_mechanical(name: str, *, dt: float, substeps: int = 1, method: str = "leapfrog", noise_cov: Any = None,
                    tol: float | None = None, max_iter: int = 50, **params: Any) -> Mechanical:
    """A :class:`Mechanical` model of the true system ``name`` (a key of :data:`SYSTEMS`).

    Parameters
    ----------
    name : str
        ``"mass_spring"``, ``"pendulum"``, ``"double_pendulum"`` or ``"two_body"``.
    dt, substeps, method, noise_cov, tol, max_iter
        As :class:`Mechanical`.
    **params
        The system's constructor arguments (e.g. ``length=2.0``).

    Raises
    ------
    InputError
        Naming ``name`` for an unknown system; naming the system for parameters it does not take.

    Examples
    --------
    >>> make_mechanical("pendulum", dt=0.05, length=2.0).config()["length"]
    2.0
    """
    if not isinstance(name, str) or name not in SYSTEMS:
        raise InputError("name", f"one of {sorted(SYSTEMS)}", repr(name))
    return Mechanical(_build_system(name, params), dt, substeps=substeps, method=method, noise_cov=noise_cov,
                      tol=tol, max_iter=max_iter)
