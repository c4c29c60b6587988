"""The model protocol: what a dynamical model must offer to be simulated and assimilated.

A model is any object with

* ``state_size`` (int): the length ``n`` of the state vector, the **last** axis of every state tensor;
* ``dt`` (float): the time step of one model step;
* ``step(x)``: one deterministic step, a pure torch function of ``x`` with shape ``(..., n)``,
  batched over all leading dims (members, experiments) and differentiable;
* ``noise_cov`` (tensor ``(n, n)`` or ``None``): the covariance ``Q`` of additive Gaussian model noise
  added after each step (``None``: a perfect model).

Everything else (stochastic propagation, tangent-linear maps for the EKF, the name and configuration
recorded in a posterior's attrs) is derived from these by the functions below, so a user model needs
only the four attributes.

**Non-Gaussian transitions.** A model whose noise is not additive Gaussian (the Gaussian-mixture
transition of :mod:`daml.models.mixture`, learned from observations) has ``noise_cov = None`` and two
more methods:

* ``sample_step(x, generator)``: one stochastic step, a draw from ``p(x_k | x_{k-1} = x)`` batched over
  leading dims (reparameterised where the model can, so that gradients flow through the draw);
* ``log_transition(x_prev, x)``: ``log p(x | x_prev)`` over the last axis, broadcasting the leading
  dims of the two arguments against each other (``(..., 1, J, n)`` against ``(..., M, 1, n)`` gives
  every pair).

:func:`transition_sample` and :func:`transition_log_density` use them when present and the Gaussian
``step(x) + N(0, Q)`` otherwise, so every filter that samples the model (ensemble Kalman filters,
bootstrap and differentiable particle filters) runs such a model unchanged; ``step(x)`` is then the
transition's mean. Filters whose algebra needs Gaussian model noise (Kalman filters, the
optimal-proposal and equivalent-weights particle filters) refuse it through
:func:`check_gaussian_transition` rather than treat it as a perfect model. :class:`ODEModel` is a convenient base: subclass it and write the tendency
``f(x)`` of ``dx/dt = f(x)``; the step is one classical fourth-order Runge-Kutta step.

Example: a user-defined model (a damped linear oscillator)::

    import torch
    from daml.models import ODEModel

    class Oscillator(ODEModel):
        def __init__(self, omega=1.0, damping=0.1, dt=0.05):
            super().__init__(state_size=2, dt=dt)
            self.omega, self.damping = omega, damping

        def tendency(self, x):
            pos, vel = x[..., 0], x[..., 1]
            return torch.stack([vel, -self.omega**2 * pos - self.damping * vel], dim=-1)

        def config(self):
            return {"omega": self.omega, "damping": self.damping, "dt": self.dt}
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from .. import _device
from ..errors import DamlError, DtypeError, InputError, NonFiniteError, ShapeError, check_fits, check_int, check_real

__all__ = [
    "Model",
    "ODEModel",
    "rk4_step",
    "propagate",
    "tangent_linear",
    "model_config",
    "check_state",
    "as_covariance",
    "covariance_root",
    "batched_jacobian",
    "periodic_covariance",
    "transition_sample",
    "transition_log_density",
    "check_gaussian_transition",
    "has_gaussian_transition",
]


def check_network_input(t: Any, name: str, size: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` as a real floating tensor of a network's ``dtype`` and ``device`` whose last axis has
    ``size`` entries (any when ``None``); else a daml error naming ``name``. Internal helper of the
    learned networks (:mod:`daml.models.mixture`, :mod:`daml.models.hamiltonian`)."""
    from ..errors import DeviceError

    if not isinstance(t, torch.Tensor):
        t = as_real_tensor(t, name, dtype=dtype, device=device)
    if t.is_complex() or not t.is_floating_point():
        raise DtypeError(name, f"a real floating tensor of dtype {dtype}", f"dtype {t.dtype}")
    if t.dtype != dtype:
        raise DtypeError(name, f"the network's dtype {dtype}", f"dtype {t.dtype}",
                         hint="convert the input, or the network with .to(dtype)")
    if t.device != device:
        raise DeviceError(name, f"a tensor on the network's device {device}", str(t.device))
    if size is not None and (t.ndim == 0 or t.shape[-1] != size):
        raise ShapeError(name, f"a last axis of length {size}", f"shape {tuple(t.shape)}")
    return t


@runtime_checkable
class Model(Protocol):
    """The four attributes daml needs of a model (see the module docstring)."""

    state_size: int
    dt: float
    noise_cov: torch.Tensor | None

    def step(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - protocol
        ...


def rk4_step(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dt: float) -> torch.Tensor:
    """One classical Runge-Kutta step of ``dx/dt = f(x)`` (autonomous), batched over leading dims.

    Raises
    ------
    InputError
        Naming ``f`` when it is not callable, ``dt`` when it is not a finite real number.
    DtypeError, ShapeError, NonFiniteError
        Naming ``x`` for text, complex or integer-only input, a 0-d or empty state, NaN or infinite
        entries.
    """
    if not callable(f):
        raise InputError("f", "a callable tendency f(x)", type(f).__name__)
    dt = check_real(dt, "dt", expected="a finite real time step")
    x = _check_finite_state(x, "x")
    return _rk4(f, x, dt)


def _rk4(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dt: float) -> torch.Tensor:
    """:func:`rk4_step` without the checks (the models' hot path, also inside ``vmap`` / ``jacfwd``)."""
    k1 = f(x)
    k2 = f(torch.add(x, k1, alpha=0.5 * dt))
    k3 = f(torch.add(x, k2, alpha=0.5 * dt))
    k4 = f(torch.add(x, k3, alpha=dt))
    return torch.add(x, torch.add(k2, k3).mul_(2.0).add_(k1).add_(k4), alpha=dt / 6.0)


def _check_finite_state(x: Any, name: str, model: Any = None) -> torch.Tensor:
    """``x`` as a real floating tensor with a non-empty last axis (the model's state size when
    ``model`` is given) and only finite entries; else a daml error naming ``name``."""
    if isinstance(x, torch.Tensor) and x.is_complex():
        raise DtypeError(name, "real numbers", f"dtype {x.dtype}")
    t = check_state(model, x, name) if model is not None else as_real_tensor(x, name)
    if not t.is_floating_point():
        t = t.to(_device.resolve_dtype(None, t.device))
    if t.ndim == 0 or t.shape[-1] == 0:
        raise ShapeError(name, "a state with a non-empty last axis (..., n)", f"shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(name, "finite states", f"{int((~torch.isfinite(t)).sum())} NaN or infinite entries")
    return t


def as_covariance(value: Any, n: int, name: str, *, dtype=None, device=None, allow_zero: bool = True) -> torch.Tensor:
    """A symmetric positive-(semi)definite ``(n, n)`` matrix from a scalar variance, a vector of
    variances or a full matrix; checked with a Cholesky factorisation (an eigenvalue check when
    ``allow_zero`` and the matrix is singular)."""
    t = as_real_tensor(value, name, dtype=dtype, device=device)
    if t.ndim == 0:
        t = t * torch.eye(n, dtype=t.dtype, device=t.device)
    elif t.ndim == 1:
        if t.shape[0] != n:
            raise ShapeError(name, f"{n} variances", f"{t.shape[0]}")
        t = torch.diag(t)
    if tuple(t.shape) != (n, n):
        raise ShapeError(name, f"a scalar, {n} variances or an ({n}, {n}) matrix", f"shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise NonFiniteError(name, "finite entries", "NaN or infinite entries")
    if not torch.allclose(t, t.T, rtol=1e-10, atol=1e-12 * float(t.abs().max().clamp_min(1e-300))):
        raise InputError(name, "a symmetric matrix", "an asymmetric one")
    _, info = torch.linalg.cholesky_ex(t)
    if int(info) != 0:
        eig_min = float(torch.linalg.eigvalsh(t).min())
        tol = max(1e-12, 10 * n * torch.finfo(t.dtype).eps)          # rounding of a semidefinite matrix
        if not (allow_zero and eig_min >= -tol * float(t.abs().max())):
            raise InputError(name, "a positive-definite covariance" if not allow_zero else
                             "a positive-semidefinite covariance", f"smallest eigenvalue {eig_min:.3g}")
    return t


_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)
_FORWARD_AD = torch.autograd.forward_ad


def _transformed() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``jacfwd``, ``grad``...) or a forward-mode AD
    level (``torch.autograd.forward_ad.dual_level``) is active: then only functional code is safe."""
    if _FUNCTORCH_ACTIVE() if _FUNCTORCH_ACTIVE is not None else torch._C._functorch.maybe_current_level() is not None:
        return True
    return _FORWARD_AD._current_level >= 0


class ODEModel(abc.ABC):
    """Base class for models given by an autonomous ODE ``dx/dt = f(x)``, stepped with RK4.

    Parameters
    ----------
    state_size : int
        Length of the state vector.
    dt : float
        RK4 step.
    noise_cov : scalar, (n,) or (n, n), optional
        Covariance ``Q`` of additive Gaussian noise per step.
    """

    name: str = "ode"

    def __init__(self, state_size: int, dt: float, noise_cov: Any = None):
        self.state_size = check_int(state_size, "state_size", expected="a positive int")
        if noise_cov is not None:
            check_memory(3 * 8 * self.state_size**2, "noise_cov", f"a {self.state_size} x {self.state_size} covariance")
        self.dt = check_real(dt, "dt", positive=True, expected="a positive time step")
        self.noise_cov = None if noise_cov is None else as_covariance(noise_cov, state_size, "noise_cov")

    @abc.abstractmethod
    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)``: the time derivative, shape ``(..., n)``. Subclasses implement it."""

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One RK4 step of length ``dt``.

        Large batches on the CPU are stepped in cache-sized pieces of rows (see
        :func:`daml._device.elementwise_rows`; ``tendency`` treats each state on its own) when
        autograd is off (``torch.no_grad``, as in :func:`daml.filters.run`); with autograd on they
        are stepped in one go, so that gradients reach ``x`` and any parameters of ``tendency``
        through one plain graph. Inside a ``torch.func`` transform (``vmap``, ``jacfwd``: the
        tangent-linear map of the EKF, :func:`tangent_linear`) or a forward-mode AD level, the step is
        always the plain, functional :func:`rk4_step`: a subclass's faster ``_step_no_grad`` may write
        in place into buffers of its own, which such transforms cannot batch or differentiate.
        """
        if torch.is_grad_enabled() or _transformed():
            return _rk4(self.tendency, x, self.dt)
        rows = _device.elementwise_rows(x)
        if rows is None:
            return self._step_no_grad(x)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
        for start in range(0, flat.shape[0], rows):
            out[start:start + rows] = self._step_no_grad(flat[start:start + rows])
        return out.view(x.shape)

    def _step_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """One RK4 step with autograd off; a subclass may replace it by a cheaper evaluation whose
        results are bit-identical to :func:`rk4_step` (tested for every such subclass)."""
        return _rk4(self.tendency, x, self.dt)

    def config(self) -> dict:
        """The parameters that define the model (recorded in posteriors' attrs)."""
        return {"state_size": self.state_size, "dt": self.dt}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def as_real_tensor(value: Any, name: str, *, dtype=None, device=None) -> torch.Tensor:
    """:func:`daml._device.as_tensor` (which refuses text, None and other non-numeric input with a
    :class:`~daml.errors.DtypeError` naming ``name``), with any other conversion failure (nested lists of
    text, ragged lists) turned into that error too. Internal helper of the models and filters."""
    try:
        return _device.as_tensor(value, name, dtype=dtype, device=device)
    except DamlError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DtypeError(name, "real numbers", f"{type(value).__name__} ({exc})") from exc


def check_state(model: Model, x: Any, name: str = "x", *, dtype=None, device=None) -> torch.Tensor:
    """``x`` as a tensor whose last axis has the model's state size."""
    t = as_real_tensor(x, name, dtype=dtype, device=device)
    if t.ndim == 0 or t.shape[-1] != model.state_size:
        raise ShapeError(name, f"a last axis of length {model.state_size} (the state size)",
                         f"shape {tuple(t.shape)}")
    return t


def _check_model(model: Any, name: str = "model") -> None:
    """Refuse an object without the :class:`Model` protocol's ``state_size`` (a positive int) and
    callable ``step``, naming ``name``."""
    size = getattr(model, "state_size", None)
    if not callable(getattr(model, "step", None)) or isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(name, "a model with state_size and step(x) (see daml.models.Model)", type(model).__name__)


def propagate(model: Model, x: torch.Tensor, steps: int = 1, seed: _device.Seed = None) -> torch.Tensor:
    """Apply ``steps`` model steps to ``x`` (..., n), adding ``N(0, Q)`` noise after each step if the
    model has ``noise_cov``. ``seed`` is only used (and required to be reproducible) for noisy models.

    Raises
    ------
    InputError
        Naming ``model`` for an object without ``state_size`` and ``step``, ``steps`` for anything but
        an int ``>= 0`` (0 returns ``x``).
    ShapeError
        Naming ``x`` when its last axis is not the model's state size.
    NonFiniteError
        Naming ``x`` when it holds NaN or infinite entries (a state no model step can make finite).
    """
    _check_model(model)
    steps = check_int(steps, "steps", 0, "an int >= 0 (model steps)")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        x = _check_finite_state(x, "x", model)
    elif x.ndim == 0 or x.shape[-1] != model.state_size:
        raise ShapeError("x", f"a last axis of length {model.state_size} (the state size)", f"shape {tuple(x.shape)}")
    elif not bool(torch.isfinite(x).all()):
        raise NonFiniteError("x", "finite states", f"{int((~torch.isfinite(x)).sum())} NaN or infinite entries")
    return _propagate(model, x, steps, seed)


def _propagate(model: Model, x: torch.Tensor, steps: int, seed: _device.Seed) -> torch.Tensor:
    """:func:`propagate` without the checks of its arguments (for callers that checked them once)."""
    if not has_gaussian_transition(model):              # a model that draws its own steps
        g = _device.generator(seed, x.device)
        for _ in range(steps):
            x = model.sample_step(x, g)
        return x
    q = getattr(model, "noise_cov", None)
    root = None if q is None else covariance_root(q.to(x))
    g = None if q is None else _device.generator(seed, x.device)
    for _ in range(steps):
        x = model.step(x)
        if root is not None:
            x = x + torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device) @ root.T
    return x


def has_gaussian_transition(model: Any) -> bool:
    """Whether ``model`` steps as ``step(x) + N(0, Q)`` (``Q = noise_cov``, ``None`` for a perfect model)
    rather than drawing its own steps with ``sample_step`` (see the module docstring)."""
    return not callable(getattr(model, "sample_step", None))


def check_gaussian_transition(model: Any, who: str) -> None:
    """Refuse a model with a non-Gaussian transition (one with ``sample_step``), naming ``model``: for
    the filters whose algebra needs ``x_k = step(x_{k-1}) + N(0, Q)`` (``who`` names the filter)."""
    if not has_gaussian_transition(model):
        raise InputError("model", f"a model with additive Gaussian noise (step(x) + N(0, noise_cov)) for {who}",
                         f"{type(model).__name__}, whose transition is not Gaussian (it has sample_step)",
                         hint="filters that sample the model run it: bootstrap, dpf, iapf, enkf, etkf, letkf, etpf")


def transition_sample(model: Model, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One stochastic model step from every state of ``x`` ``(..., n)``: ``model.sample_step(x, g)``
    where the model has it, else ``step(x)`` plus ``N(0, Q)`` noise (none for a perfect model). Not
    checked (the filters' hot path); gradients flow through ``step`` and a reparameterised draw."""
    if not has_gaussian_transition(model):
        return model.sample_step(x, generator)
    f = model.step(x)
    q = getattr(model, "noise_cov", None)
    if q is None:
        return f
    root = covariance_root(q.to(f))
    return f + torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device) @ root.T


def transition_log_density(model: Model, x_prev: torch.Tensor, x: torch.Tensor,
                           mean: torch.Tensor | None = None) -> torch.Tensor:
    """``log p(x | x_prev)`` of one model step over the last axis, the leading dims of ``x_prev`` and
    ``x`` broadcast against each other: ``model.log_transition`` where the model has it, else the
    Gaussian ``N(x; step(x_prev), Q)``. ``mean``: ``step(x_prev)`` already computed (Gaussian models
    only; it is not computed again).

    Raises
    ------
    InputError
        Naming ``model`` for a perfect model (no ``noise_cov``: the transition has no density) or a
        singular ``Q``.
    """
    own = getattr(model, "log_transition", None)
    if callable(own):
        return own(x_prev, x)
    q = getattr(model, "noise_cov", None)
    if q is None:
        raise InputError("model", "a model with a transition density (noise_cov, or log_transition)",
                         f"{type(model).__name__} without model noise (a perfect model has no density)")
    f = model.step(x_prev) if mean is None else mean
    chol, info = torch.linalg.cholesky_ex(q.to(f))
    if int(info) != 0:
        raise InputError("model", "a positive-definite noise_cov (a transition density)", "a singular one")
    d = x - f
    z = torch.linalg.solve_triangular(chol, d.reshape(-1, d.shape[-1]).T, upper=False).T.reshape(d.shape)
    n = d.shape[-1]
    return (-0.5 * (z * z).sum(-1) - torch.log(torch.diagonal(chol)).sum()
            - 0.5 * n * math.log(2 * math.pi))


def periodic_covariance(n: int, variance: float, length: float = 0.0, *, dtype=None, device=None) -> torch.Tensor:
    """A smooth, spatially correlated covariance for models on a periodic 1-d grid of ``n`` points
    (Lorenz-96, Kuramoto): ``variance * exp(-c(i, j)^2 / (2 length^2))`` with ``c`` the **chordal**
    distance ``(n / pi) sin(pi |i - j| / n)`` between the points as placed on a circle of
    circumference ``n``. ``length = 0`` gives ``variance * I``.

    The chordal distance is the Euclidean distance of the points in the plane, so the Gaussian kernel
    of it is positive semidefinite for every ``n`` and ``length``; it equals the grid distance
    ``min(|i - j|, n - |i - j|)`` to first order for distances small against ``n`` (for ``n = 40`` and
    neighbours, 0.999 instead of 1). The Gaussian kernel of the grid distance itself is *not* a
    covariance (``n = 4``, ``length = 1`` has eigenvalue ``-0.078``). A small diagonal (``1e-9`` of
    the variance) keeps long length scales numerically positive definite.

    Raises
    ------
    InputError
        Naming ``n`` for a non-positive int or a size whose ``(n, n)`` matrix cannot fit in memory,
        ``variance`` for a non-positive one, ``length`` for a negative or non-finite one.
    """
    n = check_int(n, "n", expected="a positive int")
    variance = check_real(variance, "variance", positive=True, expected="a positive variance")
    length = check_real(length, "length", expected="a non-negative correlation length (grid points)")
    if length < 0:
        raise InputError("length", "a non-negative correlation length (grid points)", repr(length))
    dev = _device.resolve_device(device)
    dt = _device.resolve_dtype(dtype, dev)
    check_memory(4 * torch.empty((), dtype=dt).element_size() * float(n) ** 2, "n", f"n={n} ({n} x {n} covariance)",
                 dev)
    if length == 0:
        return variance * torch.eye(n, dtype=dt, device=dev)
    i = torch.arange(n, dtype=torch.float64)                 # float64 on the CPU (not every device has it)
    dist = (i.unsqueeze(0) - i.unsqueeze(1)).abs()
    chord = (n / math.pi) * torch.sin((math.pi / n) * dist)  # a function of |i - j|: exactly symmetric
    cov = torch.exp(-0.5 * (chord / length) ** 2).to(device=dev, dtype=dt)
    return variance * (cov + 1e-9 * torch.eye(n, dtype=dt, device=dev))


def covariance_root(cov: torch.Tensor) -> torch.Tensor:
    """A square root ``L`` with ``L L^T = cov``: the Cholesky factor, or ``V sqrt(max(E, 0))`` from an
    eigendecomposition when ``cov`` is only semidefinite."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info.max()) == 0:
        return chol
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)


def tangent_linear(model: Model, x: torch.Tensor) -> torch.Tensor:
    """Jacobian of one model step at ``x``: shape ``(..., n, n)`` for ``x`` of shape ``(..., n)``.

    Computed by forward-mode automatic differentiation (``torch.func.jacfwd``), vectorised over the
    leading dims; a model may provide its own ``tangent_linear(x)`` method, which is then used.

    Raises
    ------
    InputError
        Naming ``model`` for an object without ``state_size`` and ``step``.
    DtypeError, ShapeError, NonFiniteError
        Naming ``x`` for non-real input, a last axis that is not the state size, NaN or infinite
        entries.
    """
    _check_model(model)
    return _tangent_linear(model, _check_finite_state(x, "x", model))


def _tangent_linear(model: Model, x: torch.Tensor) -> torch.Tensor:
    """:func:`tangent_linear` without the checks of its arguments (for callers that checked them once)."""
    own = getattr(model, "tangent_linear", None)
    if callable(own):
        return own(x)
    return batched_jacobian(model.step, x)


def batched_jacobian(func: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Jacobian of a function of the last axis, ``(..., n) -> (..., m)``, at every ``x`` ``(..., n)``:
    shape ``(..., m, n)``, by forward-mode automatic differentiation vectorised over the leading dims."""
    flat = x.reshape(-1, x.shape[-1])
    jac = torch.func.vmap(torch.func.jacfwd(func))(flat)
    return jac.reshape(*x.shape[:-1], *jac.shape[1:])


def model_config(model: Model) -> dict:
    """Name and configuration of a model, JSON-serialisable (for attrs)."""
    cfg = model.config() if callable(getattr(model, "config", None)) else {}
    return {"model": type(model).__name__, **{k: _jsonable(v) for k, v in cfg.items()}}


def _compact_cov(q: torch.Tensor | None) -> Any:
    """A JSON-able form of a noise covariance: ``None``, a scalar (``q I``), a vector of variances
    (diagonal) or the full matrix as nested lists. ``as_covariance`` reads each form back."""
    if q is None:
        return None
    diag = torch.diagonal(q)
    if torch.equal(q, torch.diag(diag)):
        if torch.all(diag == diag[0]):
            return float(diag[0])
        return diag.tolist()
    return q.tolist()


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def check_memory(nbytes: int, argument: str, given: str, device: Any = None) -> None:
    """:func:`daml.errors.check_fits` with the models' argument order: refuse, before anything is
    allocated, arrays of ``nbytes`` that need more than the free memory of ``device``. Internal helper."""
    check_fits(argument, nbytes, what=given, device=device)
