r"""Learned dynamics with the structure of mechanics: Hamiltonian, Lagrangian and plain networks.

Three networks learn the time derivative of a mechanical state. Each is a ``torch.nn.Module`` whose
``forward(x)`` returns ``dx/dt`` of a state ``x = (q, p)`` of ``2d`` numbers (``q`` first, shape
``(..., 2d)``), and each is also a *partitioned system* of :mod:`daml.models.mechanics` (``dim``,
``dq(q, p)``, ``dp(q, p)``, ``separable = False``), so the integrators there step it like a true system.

**Hamiltonian network** (:class:`HamiltonianNet`; Greydanus, Dzamba & Yosinski 2019). A dense network
outputs one scalar, read as the energy ``H(q, p)``. The vector field is its *symplectic gradient*

.. math::  \dot q = \partial H / \partial p, \qquad \dot p = -\partial H / \partial q,

i.e. ``dx/dt = J grad H(x)`` with ``J = [[0, I], [-I, 0]]``. Whatever the weights, the learned flow
conserves the learned ``H`` exactly and preserves phase-space volume; training fits ``J grad H`` to
observed derivatives. ``grad H`` is the gradient of ``sum_i H(x_i)`` over the batch (the states do not
interact, so this is every state's own gradient in one backward pass): by :func:`torch.func.grad` inside
``torch.func`` transforms, by ``torch.autograd.grad`` (with ``create_graph`` when grad mode is on)
outside them, where it costs a third of the overhead per call on small batches. Either way the field is
computed also under ``torch.no_grad()`` (filters run that way), inside :func:`torch.func.vmap` over
stacked member parameters (:func:`torch.func.functional_call`), inside :func:`torch.func.jacfwd` (the
EKF's tangent-linear map), and it stays differentiable with respect to the parameters for training, both
by ordinary autograd (``loss.backward()``) and by :func:`torch.func.grad` over a parameter dictionary
(all tested against autograd's own Jacobians and gradients).

**Lagrangian network** (:class:`LagrangianNet`; Cranmer et al. 2020). The network outputs a scalar
``L(q, v)`` of coordinates and *velocities*: its state is ``x = (q, v)``, not ``(q, p)`` (the second half
of ``x`` is ``dq/dt``). The Euler-Lagrange equation ``d/dt (dL/dv) = dL/dq`` expands by the chain rule to
``(d2L/dv2) q'' + (d2L/dv dq) q' = dL/dq``, so the acceleration is

.. math::  \ddot q = (\nabla_v \nabla_v^\top L)^{-1} \big[\nabla_q L - (\nabla_q \nabla_v^\top L)\, \dot q\big],

with ``(d2L/dv dq)_{ij} = d/dq_j (dL/dv_i)``. :func:`lagrangian_acceleration` evaluates it for any
scalar callable ``L`` and a whole batch at once: per state, one :func:`torch.func.grad` gives
``(dL/dq, dL/dv)``, and ``d + 1`` forward-mode directional derivatives of ``dL/dv`` (along each velocity
axis, and along ``q`` in the direction ``v``) give the velocity Hessian and the mixed term; all of this is
:func:`torch.func.vmap`-ed over the batch (no Python loop over states) and followed by one batched
``torch.linalg.solve`` (inside ``torch.func`` transforms the explicit inverse of the ``d x d`` Hessian
instead: in torch 2.13 ``vmap(jacfwd(.))`` through ``torch.linalg.solve`` returns wrong tangents, a
measured error of order 1 to several hundred, while the inverse is differentiated correctly). The field is
``dq = v``, ``dp = q''`` (``dp`` names the second half of the state, here an acceleration).

*Solve or pseudo-inverse.* Cranmer et al. multiply by the Moore-Penrose pseudo-inverse of the velocity
Hessian (``lnn.py``: ``jnp.linalg.pinv``), which never fails but, where the Hessian is singular, returns
the minimum-norm acceleration, an answer the Euler-Lagrange equation does not determine. daml solves by
LU (``solver="solve"``, the default: exact for a regular Hessian and cheaper) and checks the Hessian's
condition number ``kappa`` (eigenvalues of its symmetric part) outside ``torch.func`` transforms: a
numerically singular one (``kappa * eps >= 0.5``, or non-finite entries) raises
:class:`~daml.errors.DivergenceError` naming the state; an ill-conditioned one (``kappa * eps > 1e-2``,
accelerations with possibly more than 1 % relative error) gives an :class:`IllConditionedWarning`.
``solver="pinv"`` is Cranmer's pseudo-inverse (cut-off ``10 * d * eps`` relative to the largest singular
value, JAX's default) and only warns. Inside transforms (``vmap``, ``jacfwd``) no data-dependent check
can run: a singular Hessian there gives non-finite states, which the model wrapper refuses.

**Plain network** (:class:`DerivativeNet`): the same dense network with ``2d`` outputs read directly as
``dx/dt`` (Greydanus et al.'s "baseline" model). No structure: it need not conserve anything.

**Architecture and initialisation.** ``init="orthogonal"`` is that of ``greydanus/hamiltonian-nn``
(``nn_models.py``, class ``MLP``, used by ``hnn.py`` and ``experiment-spring/train.py``): ``layers``
hidden layers of width ``hidden`` (defaults 2 and 200), ``tanh``, weights of every layer drawn by
``torch.nn.init.orthogonal_`` (gain 1), hidden biases left at torch's default ``U(-1/sqrt(fan_in),
1/sqrt(fan_in))`` and an output layer without bias. Their Hamiltonian network has two outputs and reads
the energy from the second (``field_type="solenoidal"``); the second row of a random orthogonal ``2 x
200`` matrix is a uniformly random unit vector, exactly the distribution of our single output row.
``init="cranmer"`` is ``custom_init`` of ``MilesCranmer/lagrangian_nns`` (``lnn.py``): biases zero,
weight matrix ``i`` of ``n_layers`` (counting the output layer) Gaussian with standard deviation
``c_i / sqrt(n)``, ``n`` the larger of its two sizes, ``c_0 = 2.2``, ``c_i = 0.58 i`` for the middle
layers and ``c_last = n``. :class:`LagrangianNet`'s defaults are the double-pendulum configuration of
``notebooks/DoublePendulum.ipynb`` (``hidden_dim=600``, ``layers=3``, ``act="softplus"``, through
``hyperopt/HyperparameterSearch.py: extended_mlp``, with ``custom_init``); ``periodic=True`` wraps every
coordinate to ``[-pi, pi)`` before the network, as their ``utils.py: wrap_coords`` does for the two
angles. Their output layer has a bias initialised at zero; ours has none (a constant added to ``L`` or
``H`` changes no equation of motion). Weights are drawn from a :func:`daml._device.generator` on the
CPU in float64 and then cast, so one ``seed`` gives the same network on every device and dtype.

**Training.** :func:`fit_derivatives` fits ``forward(x)`` to observed derivatives with Adam as
``experiment-spring/train.py`` does (learning rate 1e-3, weight decay 1e-4 added to the gradient as
``torch.optim.Adam`` does, 2000 full-batch steps, mean squared error; a ``batch_size`` draws a fresh
subset without replacement every step, as ``experiment-2body/train.py``, whose weight decay is 0).
:func:`fit_trajectories` trains through the integrator instead (multi-step, Neural-ODE style): from
each recorded state it integrates ``horizon`` steps with :func:`daml.models.mechanics.step` and matches
the next ``horizon`` recorded states. Small networks train on one intra-op thread by default
(:func:`daml._device.auto_threads`; two threads made a Hamiltonian-network step ten times slower on a
2-core machine).

References
----------
* S. Greydanus, M. Dzamba and J. Yosinski (2019), Hamiltonian neural networks. NeurIPS 2019,
  arXiv:1906.01563. Code: ``greydanus/hamiltonian-nn``.
* M. Cranmer, S. Greydanus, S. Hoyer, P. Battaglia, D. Spergel and S. Ho (2020), Lagrangian neural
  networks. ICLR 2020 Workshop on Integration of Deep Neural Models and Differential Equations,
  arXiv:2003.04630. Code: ``MilesCranmer/lagrangian_nns``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
import abc
import warnings
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .. import _device
from ..errors import (ConvergenceWarning, DamlError, DeviceError, DivergenceError, DtypeError, InputError,
                      ModuleError, NonFiniteError, ShapeError, check_fits, check_int, check_real)
from .base import check_network_input

__all__ = [
    "HamiltonianNet",
    "LagrangianNet",
    "DerivativeNet",
    "lagrangian_acceleration",
    "FitResult",
    "fit_derivatives",
    "fit_trajectories",
    "IllConditionedWarning",
    "ACTIVATIONS",
    "INITS",
    "SOLVERS",
    "LOSSES",
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "softplus": torch.nn.functional.softplus,
    "sigmoid": torch.sigmoid,
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
}
"""Hidden-layer activations by name (Greydanus' ``choose_nonlinearity`` offers tanh, relu, sigmoid and
softplus; Cranmer's search adds swish, here ``silu``)."""

INITS = ("orthogonal", "cranmer")
"""Weight initialisations (see the module docstring)."""

SOLVERS = ("solve", "pinv")
"""How :func:`lagrangian_acceleration` inverts the velocity Hessian."""

LOSSES = ("mse", "l1")
"""Training losses of :func:`fit_derivatives` / :func:`fit_trajectories`."""

_MAX_THREADS = 1 << 15  # torch.set_num_threads takes a C int; more threads than this is a typo
_SINGULAR = 0.5        # kappa * eps at or above this: numerically singular velocity Hessian
_ILL = 1e-2            # kappa * eps above this: accelerations may carry more than 1 % relative error


class IllConditionedWarning(UserWarning):
    """The velocity Hessian ``d2L/dv2`` of a Lagrangian is ill-conditioned at some states: the
    accelerations there may carry large relative errors (the message names the worst state)."""


def _transformed() -> bool:
    from .base import _transformed as active
    return active()


def _choice(value: Any, name: str, choices: Any) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(name, f"one of {list(choices)}", repr(value))
    return value


# -- the dense network --------------------------------------------------------------------------------------
class _MLP(nn.Module):
    """``in -> hidden (x layers, activation) -> out`` without an output bias."""

    def __init__(self, inputs: int, hidden: int, layers: int, outputs: int, activation: str, init: str,
                 g: torch.Generator):
        super().__init__()
        widths = [inputs] + [hidden] * layers + [outputs]
        n_lin = len(widths) - 1
        self.linears = nn.ModuleList()
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == n_lin - 1
            lin = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out, bias=not last, dtype=torch.float64)
            with torch.no_grad():
                if init == "orthogonal":
                    nn.init.orthogonal_(lin.weight, gain=1.0, generator=g)
                    if not last:                    # torch's default Linear bias, as the peer leaves it
                        bound = 1.0 / math.sqrt(fan_in)
                        lin.bias.copy_((torch.rand(fan_out, generator=g, dtype=torch.float64) * 2 - 1) * bound)
                else:                               # Cranmer's custom_init
                    n = max(fan_in, fan_out)
                    c = 2.2 if i == 0 else (float(n) if last else 0.58 * i)
                    lin.weight.copy_(torch.randn((fan_out, fan_in), generator=g, dtype=torch.float64)
                                     * (c / math.sqrt(n)))
                    if not last:
                        lin.bias.zero_()
            self.linears.append(lin)
        self._act = ACTIVATIONS[activation]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        *hidden, out = self.linears
        for lin in hidden:
            z = self._act(lin(z))
        return out(z)


class _Net(nn.Module, metaclass=abc.ABCMeta):
    """Shared construction, checks and configuration of the three networks."""

    name = "network"
    separable = False
    _outputs_per_dim = 0          # 0: a scalar output; 2: 2d outputs
    _default_init = "orthogonal"

    def __init__(self, dim: int, hidden: int, layers: int, activation: str, init: str | None, seed: Any,
                 dtype: Any, device: Any):
        super().__init__()
        self.dim = check_int(dim, "dim", expected="a positive int (number of coordinates d; the state has 2d)")
        self.hidden = check_int(hidden, "hidden", expected="a positive int (hidden layer width)")
        self.layers = check_int(layers, "layers", expected="a positive int (number of hidden layers)")
        self.activation = _choice(activation, "activation", sorted(ACTIVATIONS))
        self.init = _choice(self._default_init if init is None else init, "init", INITS)
        self.state_size = 2 * self.dim
        outputs = 1 if self._outputs_per_dim == 0 else 2 * self.dim
        count = (2 * self.dim + 1) * self.hidden + (self.layers - 1) * (self.hidden + 1) * self.hidden \
            + self.hidden * outputs
        sizes = {"dim": self.dim, "hidden": self.hidden, "layers": self.layers}
        check_fits(max(sizes, key=lambda k: sizes[k]), 24.0 * count,
                   what=f"dim={self.dim}, hidden={self.hidden}, layers={self.layers} ({count} parameters)")
        dev = _device.resolve_device(device)
        dt = _device.resolve_dtype(dtype, dev)
        if not dt.is_floating_point or dt.is_complex:
            raise DtypeError("dtype", "a real floating dtype", str(dt))
        g = _device.generator(seed, "cpu")
        self.seed = int(seed) if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) else None
        self.mlp = _MLP(2 * self.dim, self.hidden, self.layers, outputs, self.activation, self.init, g)
        self.to(device=dev, dtype=dt)

    # -- properties -------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.mlp.linears[-1].weight.dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self.mlp.linears[-1].weight.device

    def config(self) -> dict:
        """The constructor arguments (JSON-able; the trained weights are in ``state_dict()``)."""
        return {"dim": self.dim, "hidden": self.hidden, "layers": self.layers, "activation": self.activation,
                "init": self.init, "seed": self.seed}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    # -- checks -----------------------------------------------------------------------------------------
    def _check(self, t: Any, name: str, size: int, finite: bool = True) -> torch.Tensor:
        """``t`` as a tensor of the network's dtype and device with last axis ``size`` (finite, when
        ``finite`` and no ``torch.func`` transform is active); else a daml error naming ``name``."""
        t = check_network_input(t, name, size, self.dtype, self.device)
        if finite and not _transformed() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(name, "finite values", f"{int((~torch.isfinite(t)).sum())} NaN or infinite entries")
        return t

    def _pair(self, q: Any, p: Any, names: tuple[str, str] = ("q", "p"), finite: bool = True) -> torch.Tensor:
        """``concat(q, p)`` over the last axis (leading dims broadcast), checked."""
        q = self._check(q, names[0], self.dim, finite)
        p = self._check(p, names[1], self.dim, finite)
        if q.shape[:-1] != p.shape[:-1]:
            try:
                q, p = torch.broadcast_tensors(q, p)
            except RuntimeError:
                raise ShapeError(names[1], f"leading dims broadcastable with {names[0]}'s {tuple(q.shape[:-1])}",
                                 f"shape {tuple(p.shape)}") from None
        return torch.cat([q, p], dim=-1)

    @abc.abstractmethod
    def _field(self, x: torch.Tensor) -> torch.Tensor:
        """The time derivative of checked states ``x`` ``(..., 2d)``: each network's own."""

    # -- the system -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The time derivative ``dx/dt`` ``(..., 2d)`` of states ``x = (q, p)`` ``(..., 2d)``.

        Raises
        ------
        DtypeError, DeviceError, ShapeError, NonFiniteError
            Naming ``x`` for another dtype or device than the network's, a last axis other than ``2d``,
            or NaN / infinite entries (checked outside ``torch.func`` transforms).
        """
        return self._field(self._check(x, "x", 2 * self.dim))

    def time_derivative(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`forward` (the name Greydanus et al.'s models use)."""
        return self.forward(x)

    def dq(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``dq/dt`` ``(..., d)`` at ``(q, p)`` (each ``(..., d)``).

        :meth:`dq` and :meth:`dp` are the integrators' hot path: like a true system's, they let
        non-finite states through (to non-finite derivatives), so that :func:`daml.simulate` and
        :func:`daml.filters.run` report a divergence at its time step; shapes and dtypes are checked.
        """
        return self._field(self._pair(q, p, finite=False))[..., :self.dim]

    def dp(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``dp/dt`` ``(..., d)`` at ``(q, p)`` (each ``(..., d)``); non-finite states pass (see :meth:`dq`)."""
        return self._field(self._pair(q, p, finite=False))[..., self.dim:]

    def dqdp(self, q: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dq/dt, dp/dt)`` from one evaluation of the field (the integrators use it where a step needs
        both at one point: RK4 and the implicit midpoint); non-finite states pass (see :meth:`dq`)."""
        f = self._field(self._pair(q, p, finite=False))
        return f[..., :self.dim], f[..., self.dim:]

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`forward` (the name of :class:`daml.models.ODEModel`)."""
        return self.forward(x)


class HamiltonianNet(_Net):
    """A Hamiltonian neural network: a scalar ``H(q, p)`` and its symplectic gradient as the field.

    Parameters
    ----------
    dim : int
        ``d``, the number of coordinates (the state ``x = (q, p)`` has ``2d`` entries).
    hidden, layers : int
        Hidden width and number of hidden layers (defaults 200 and 2: ``greydanus/hamiltonian-nn``,
        ``nn_models.py`` / ``experiment-spring/train.py``).
    activation : {"tanh", "softplus", "sigmoid", "silu", "relu"}
        Hidden activation (default ``"tanh"``, theirs).
    init : {"orthogonal", "cranmer"}
        Weight initialisation (default ``"orthogonal"``, theirs; see the module docstring).
    seed : int, SeedSequence, torch.Generator or None
        Seed of the initial weights (``None``: fresh entropy, not reproducible).
    dtype, device : optional
        Resolved by :mod:`daml._device` (float64 on the CPU by default).

    Raises
    ------
    InputError
        Naming ``dim``, ``hidden``, ``layers`` (not positive ints, or too large to fit in memory),
        ``activation`` or ``init``; a :class:`~daml.errors.SeedError` naming ``seed``.

    Examples
    --------
    >>> net = HamiltonianNet(1, seed=0)
    >>> net(torch.tensor([[1.0, 0.0]], dtype=torch.float64)).shape
    torch.Size([1, 2])
    """

    name = "hamiltonian_net"

    def __init__(self, dim: int, hidden: int = 200, layers: int = 2, activation: str = "tanh",
                 init: str = "orthogonal", seed: _device.Seed = None, dtype: Any = None, device: Any = None):
        super().__init__(dim, hidden, layers, activation, init, seed, dtype, device)

    def hamiltonian(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The learned energy ``H(q, p)``, shape ``(...)`` for ``q``, ``p`` of shape ``(..., d)``.

        A subclass may override it (e.g. with a known Hamiltonian): :meth:`forward`, :meth:`dq` and
        :meth:`dp` differentiate whatever this method returns.
        """
        return self.mlp(self._pair(q, p)).squeeze(-1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """``H`` at concatenated states ``x = (q, p)`` ``(..., 2d)``: shape ``(...)``."""
        x = self._check(x, "x", 2 * self.dim)
        return self.hamiltonian(x[..., :self.dim], x[..., self.dim:])

    def _energy(self, z: torch.Tensor) -> torch.Tensor:
        """``H`` at ``z = (q, p)`` without checks (:meth:`hamiltonian` when a subclass overrides it)."""
        if type(self).hamiltonian is HamiltonianNet.hamiltonian:
            return self.mlp(z).squeeze(-1)
        return self.hamiltonian(z[..., :self.dim], z[..., self.dim:])

    def _field(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dim
        g = _gradient(lambda z: self._energy(z).sum(), x)      # (..., 2d) = (dH/dq, dH/dp) per state
        return torch.cat([g[..., d:], -g[..., :d]], dim=-1)


class DerivativeNet(_Net):
    """The plain baseline: a dense network whose ``2d`` outputs are ``dx/dt`` directly.

    Parameters are those of :class:`HamiltonianNet` (defaults: Greydanus et al.'s baseline MLP, 2 hidden
    layers of 200, tanh, orthogonal initialisation, no output bias).

    Examples
    --------
    >>> DerivativeNet(2, seed=0)(torch.zeros(5, 4, dtype=torch.float64)).shape
    torch.Size([5, 4])
    """

    name = "derivative_net"
    _outputs_per_dim = 2

    def __init__(self, dim: int, hidden: int = 200, layers: int = 2, activation: str = "tanh",
                 init: str = "orthogonal", seed: _device.Seed = None, dtype: Any = None, device: Any = None):
        super().__init__(dim, hidden, layers, activation, init, seed, dtype, device)

    def _field(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class LagrangianNet(_Net):
    """A Lagrangian neural network: a scalar ``L(q, v)``; accelerations from the Euler-Lagrange equation.

    The state is ``x = (q, v)`` with **velocities** ``v = dq/dt``, not momenta. ``forward(x)`` returns
    ``(v, a)`` with ``a`` from :func:`lagrangian_acceleration`; ``dq(q, v) = v`` and ``dp(q, v) = a``.

    Parameters
    ----------
    dim : int
        ``d``, the number of coordinates.
    hidden, layers, activation, init : optional
        Defaults: Cranmer et al.'s double pendulum (``notebooks/DoublePendulum.ipynb``: width 600,
        3 hidden layers, softplus, ``custom_init``). ``"relu"`` is refused (its second derivatives vanish,
        so every velocity Hessian is singular).
    solver : {"solve", "pinv"}
        Invert the velocity Hessian by LU (default) or Cranmer's pseudo-inverse (module docstring).
    periodic : bool
        Wrap every coordinate to ``[-pi, pi)`` before the network (Cranmer's ``wrap_coords`` for angles).
    seed, dtype, device : optional
        As :class:`HamiltonianNet`.

    Examples
    --------
    >>> net = LagrangianNet(2, hidden=32, layers=2, seed=0)
    >>> net(torch.zeros(3, 4, dtype=torch.float64)).shape
    torch.Size([3, 4])
    """

    name = "lagrangian_net"
    _default_init = "cranmer"

    def __init__(self, dim: int, hidden: int = 600, layers: int = 3, activation: str = "softplus",
                 init: str = "cranmer", solver: str = "solve", periodic: bool = False, seed: _device.Seed = None,
                 dtype: Any = None, device: Any = None):
        if activation == "relu":
            raise InputError("activation", f"a smooth activation, one of {sorted(set(ACTIVATIONS) - {'relu'})}",
                             repr(activation), hint="relu has zero second derivatives: every d2L/dv2 is singular")
        self.solver = _choice(solver, "solver", SOLVERS)
        if not isinstance(periodic, (bool,)):
            raise InputError("periodic", "True or False", repr(periodic))
        self.periodic = bool(periodic)
        super().__init__(dim, hidden, layers, activation, init, seed, dtype, device)
        self.checks = True
        """Check the velocity Hessian's conditioning outside transforms (training switches it off)."""

    def config(self) -> dict:
        return {**super().config(), "solver": self.solver, "periodic": self.periodic}

    def lagrangian(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The learned ``L(q, v)``, shape ``(...)`` for ``q``, ``v`` of shape ``(..., d)``.

        A subclass may override it (e.g. with a known Lagrangian): the accelerations differentiate
        whatever this method returns.
        """
        return self._mlp_lagrangian(self._pair(q, v, ("q", "v")))

    def _mlp_lagrangian(self, z: torch.Tensor) -> torch.Tensor:
        if self.periodic:
            z = torch.cat([torch.remainder(z[..., :self.dim] + math.pi, 2 * math.pi) - math.pi,
                           z[..., self.dim:]], dim=-1)
        return self.mlp(z).squeeze(-1)

    def _lagrangian(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``L`` without checks (:meth:`lagrangian` when a subclass overrides it)."""
        if type(self).lagrangian is LagrangianNet.lagrangian:
            return self._mlp_lagrangian(torch.cat([q, v], dim=-1))
        return self.lagrangian(q, v)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """The energy ``E = v . dL/dv - L`` (conserved by the Euler-Lagrange flow) at ``x = (q, v)``."""
        x = self._check(x, "x", 2 * self.dim)
        q, v = x[..., :self.dim], x[..., self.dim:]

        gv = _gradient(lambda vv: self._lagrangian(q, vv).sum(), v)
        return (v * gv).sum(-1) - self._lagrangian(q, v)

    def acceleration(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q''`` ``(..., d)`` at ``(q, v)`` (:func:`lagrangian_acceleration` of :meth:`lagrangian`)."""
        z = self._pair(q, v, ("q", "v"))
        return self._field(z)[..., self.dim:]

    def _field(self, x: torch.Tensor) -> torch.Tensor:
        q, v = x[..., :self.dim], x[..., self.dim:]
        a = _acceleration(self._lagrangian, q, v, self.solver, check=self.checks and not _transformed())
        return torch.cat([v, a], dim=-1)


def _gradient(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``d f / d x`` of a scalar ``f``, differentiable in turn when autograd is on.

    Inside a ``torch.func`` transform (``vmap``, ``jacfwd``, ``grad``) and under ``torch.inference_mode``
    (where autograd records nothing) this is :func:`torch.func.grad`; otherwise ``torch.autograd.grad`` (with ``create_graph`` when grad mode is on, and computed also
    under ``torch.no_grad``): the same numbers, at a third of the overhead per call on small batches.
    """
    if _transformed() or torch.is_inference_mode_enabled():
        # under inference mode (daml.filters.run) autograd records nothing, so the tape below would see a
        # constant and return zeros: a frozen model; torch.func.grad differentiates there too
        return grad(f)(x)
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        z = x if (create and x.requires_grad) else x.detach().requires_grad_(True)
        out = f(z)
        if not out.requires_grad:                       # f does not depend on x (a constant override)
            return torch.zeros_like(x)
        (g,) = torch.autograd.grad(out, z, create_graph=create, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


# -- the Euler-Lagrange solve --------------------------------------------------------------------------------
def _hessian_parts(L: Callable, q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per state (``q``, ``v`` of shape ``(d,)``): the velocity Hessian ``(d, d)`` and the right-hand
    side ``dL/dq - (d2L/dv dq) v`` ``(d,)``, by one gradient and ``d + 1`` forward-mode derivatives."""
    d = q.shape[-1]

    def scalar(qq, vv):
        return L(qq, vv).reshape(())

    def grad_v(qq, vv):
        gq, gv = grad(scalar, argnums=(0, 1))(qq, vv)
        return gv, gq

    eye = torch.eye(d, dtype=q.dtype, device=q.device)
    tq = torch.cat([torch.zeros_like(eye), v.unsqueeze(0)], dim=0)      # (d+1, d): 0 ... 0, v
    tv = torch.cat([eye, torch.zeros_like(v).unsqueeze(0)], dim=0)      # (d+1, d): e_1 ... e_d, 0

    def directional(a, b):
        _, tangent, gq = jvp(grad_v, (q, v), (a, b), has_aux=True)
        return tangent, gq

    tangents, gq = vmap(directional)(tq, tv)                          # (d+1, d), (d+1, d) (copies)
    hess = tangents[:d].transpose(0, 1)                                 # column j = d(dL/dv)/dv_j
    return hess, gq[0] - tangents[d]


def _acceleration(L: Callable, q: torch.Tensor, v: torch.Tensor, solver: str, check: bool) -> torch.Tensor:
    """:func:`lagrangian_acceleration` without the input checks (the networks' hot path)."""
    shape = q.shape
    d = shape[-1]
    # copies: forward-mode AD cannot attach tangents to expanded (stride-0) inputs, which vmap over
    # members passes when every member sees the same states (daml.ensembles.fit's probe does)
    q2, v2 = q.reshape(-1, d).clone(), v.reshape(-1, d).clone()
    if q2.shape[0] == 0:
        return torch.zeros_like(v)
    hess, rhs = vmap(lambda a, b: _hessian_parts(L, a, b))(q2, v2)     # (B, d, d), (B, d)
    if solver == "pinv":
        eps = torch.finfo(hess.dtype).eps
        acc = (torch.linalg.pinv(hess, rtol=10.0 * d * eps) @ rhs.unsqueeze(-1)).squeeze(-1)
    elif _transformed():
        # torch 2.13: vmap(jacfwd(f)) through torch.linalg.solve (also lu_solve) returns wrong tangents
        # (measured: errors of 1 to 300 against autograd, differing from run to run); the explicit
        # inverse is batched and differentiated correctly, and for d x d Hessians costs the same
        acc = (torch.linalg.inv_ex(hess)[0] @ rhs.unsqueeze(-1)).squeeze(-1)
    else:
        acc = torch.linalg.solve_ex(hess, rhs.unsqueeze(-1))[0].squeeze(-1)
    if check:
        _check_hessian(hess.detach(), acc.detach(), q2, v2, solver)
    return acc.reshape(shape)


def _check_hessian(hess: torch.Tensor, acc: torch.Tensor, q: torch.Tensor, v: torch.Tensor, solver: str) -> None:
    """Refuse (solve) or flag (pinv) singular velocity Hessians; flag ill-conditioned ones."""
    eps = torch.finfo(hess.dtype).eps
    index = torch.arange(hess.shape[0], device=hess.device)
    inputs_ok = torch.isfinite(q).all(-1) & torch.isfinite(v).all(-1)
    if not bool(inputs_ok.all()):              # non-finite states give non-finite accelerations, as they should
        hess, acc, q, v, index = hess[inputs_ok], acc[inputs_ok], q[inputs_ok], v[inputs_ok], index[inputs_ok]
        if hess.shape[0] == 0:
            return
    finite = torch.isfinite(hess).all(-1).all(-1)
    sym = 0.5 * (hess + hess.transpose(-1, -2))
    sym = torch.where(finite[:, None, None], sym, torch.eye(hess.shape[-1], dtype=hess.dtype, device=hess.device))
    ev = torch.linalg.eigvalsh(sym).abs()
    cond = ev.max(-1).values / ev.min(-1).values                        # inf where an eigenvalue is 0
    cond = torch.where(finite, cond, torch.full_like(cond, math.inf))
    scaled = torch.nan_to_num(cond * eps, nan=math.inf)
    worst = int(torch.argmax(scaled))
    where = (f"state index {int(index[worst])} (q={q[worst].tolist()}, v={v[worst].tolist()}), condition number "
             f"{float(cond[worst]):.3g}")
    if solver == "solve" and (bool(scaled[worst] >= _SINGULAR) or not bool(torch.isfinite(acc).all())):
        raise DivergenceError(
            f"lagrangian_acceleration: the velocity Hessian d2L/dv2 is singular at {where}: the "
            "Euler-Lagrange equation does not determine the acceleration there (solver='pinv' returns the "
            "minimum-norm one, as Cranmer et al. do)")
    if bool(scaled[worst] > _ILL):
        n_bad = int((scaled > _ILL).sum())
        kind = "singular" if bool(scaled[worst] >= _SINGULAR) else "ill-conditioned"
        warnings.warn(f"lagrangian_acceleration: the velocity Hessian d2L/dv2 is {kind} at {n_bad} of "
                      f"{hess.shape[0]} states (worst: {where}); accelerations there may be inaccurate"
                      + (" (pseudo-inverse: minimum-norm accelerations)" if solver == "pinv" else ""),
                      IllConditionedWarning, stacklevel=4)


def lagrangian_acceleration(L: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], q: torch.Tensor,
                            v: torch.Tensor, *, solver: str = "solve", check: bool = True) -> torch.Tensor:
    r"""Accelerations ``q''`` from the Euler-Lagrange equation of a scalar Lagrangian, batched.

    ``q'' = (d2L/dv2)^{-1} [dL/dq - (d2L/dv dq) v]`` at every state (module docstring): one
    :func:`torch.func.vmap` over the flattened batch of a gradient and ``d + 1`` forward-mode directional
    derivatives, then one batched solve. Differentiable (with respect to ``q``, ``v`` and any parameters
    of ``L``), and usable inside ``vmap`` / ``jacfwd`` / ``grad`` and under ``torch.no_grad``.

    Parameters
    ----------
    L : callable
        ``L(q, v) -> (...)``: the Lagrangian of one state (``q``, ``v`` of shape ``(d,)``, returning a
        scalar); it is called under ``vmap``, so a function written for batches ``(..., d)`` works too.
    q, v : tensor (..., d)
        Coordinates and velocities (same shape, real floating, same dtype).
    solver : {"solve", "pinv"}
        LU solve (default) or the pseudo-inverse of Cranmer et al.
    check : bool
        Check the velocity Hessian's conditioning (outside ``torch.func`` transforms only).

    Returns
    -------
    tensor (..., d)

    Raises
    ------
    InputError
        Naming ``L`` (not callable, or not returning one real number per state), ``solver``, ``check``.
    DtypeError, ShapeError, NonFiniteError
        Naming ``q`` or ``v``.
    DivergenceError
        ``solver="solve"``: a numerically singular velocity Hessian (naming the state).

    Warns
    -----
    IllConditionedWarning
        An ill-conditioned velocity Hessian (or, with ``"pinv"``, a singular one).

    Examples
    --------
    >>> def L(q, v):          # a unit-mass spring: q'' = -q
    ...     return 0.5 * (v ** 2).sum(-1) - 0.5 * (q ** 2).sum(-1)
    >>> lagrangian_acceleration(L, torch.tensor([[1.0]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    tensor([[-1.]], dtype=torch.float64)
    """
    if not callable(L):
        raise InputError("L", "a callable L(q, v) returning one number per state", type(L).__name__)
    solver = _choice(solver, "solver", SOLVERS)
    if not isinstance(check, bool):
        raise InputError("check", "True or False", repr(check))
    from .base import as_real_tensor
    q = q if isinstance(q, torch.Tensor) else as_real_tensor(q, "q")
    v = v if isinstance(v, torch.Tensor) else as_real_tensor(v, "v", dtype=q.dtype if q.is_floating_point() else None)
    for name, t in (("q", q), ("v", v)):
        if t.is_complex() or not t.is_floating_point():
            raise DtypeError(name, "a real floating tensor", f"dtype {t.dtype}")
        if t.ndim == 0 or t.shape[-1] == 0:
            raise ShapeError(name, "a non-empty last axis (..., d)", f"shape {tuple(t.shape)}")
    if v.dtype != q.dtype:
        raise DtypeError("v", f"q's dtype {q.dtype}", f"dtype {v.dtype}")
    if v.device != q.device:
        raise DeviceError("v", f"a tensor on q's device {q.device}", str(v.device))
    if v.shape != q.shape:
        raise ShapeError("v", f"q's shape {tuple(q.shape)}", f"shape {tuple(v.shape)}")
    transformed = _transformed()
    if not transformed:
        for name, t in (("q", q), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(name, "finite values", f"{int((~torch.isfinite(t)).sum())} NaN or infinite entries")
        if q.numel() > 0:
            q0, v0 = q.reshape(-1, q.shape[-1])[0], v.reshape(-1, v.shape[-1])[0]
            try:
                with torch.no_grad():
                    out = L(q0, v0)
            except DamlError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of the user's callable is the same error
                raise InputError("L", "a callable L(q, v) of one state (q, v of shape (d,))",
                                 f"{type(exc).__name__}: {str(exc)[:200]}") from None
            if not isinstance(out, torch.Tensor) or out.numel() != 1 or not out.is_floating_point() \
                    or out.is_complex():
                got = f"shape {tuple(out.shape)}, dtype {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise InputError("L", "one real floating number per state (a scalar for q, v of shape (d,))", got)
    return _acceleration(L, q, v, solver, check=check and not transformed)


# -- training --------------------------------------------------------------------------------------------------
class FitResult(NamedTuple):
    """What :func:`fit_derivatives` / :func:`fit_trajectories` return.

    Attributes
    ----------
    net : torch.nn.Module
        The trained network (the same object that was passed in, trained in place).
    history : tensor (steps,)
        Training loss (on the step's batch, before the update) per step, float64 on the CPU.
    val_history : tensor (steps,) or None
        Validation loss after each step (``None`` without validation data).
    converged : bool
        ``False`` when the loss had not settled at the end: the mean over the last quarter of the steps
        more than ``tol`` below the mean over the quarter before it, relatively (still falling), or more
        than ``tol`` above it (rising: an unstable step size), or too few steps (< 2) to judge.
    seconds : float
        Wall-clock training time.
    config : dict
        The training configuration (JSON-able).
    """

    net: nn.Module
    history: torch.Tensor
    val_history: torch.Tensor | None
    converged: bool
    seconds: float
    config: dict


def _check_net(net: Any) -> nn.Module:
    if isinstance(net, type):
        raise ModuleError("net", "a network instance (HamiltonianNet, LagrangianNet, DerivativeNet)",
                          f"the class {net.__name__}")
    if not isinstance(net, nn.Module) or not hasattr(net, "dim"):
        raise ModuleError("net", "a HamiltonianNet, LagrangianNet or DerivativeNet (an nn.Module with dim)",
                          type(net).__name__)
    if not any(p.requires_grad for p in net.parameters()):
        raise ModuleError("net", "a network with trainable parameters", "none that require grad")
    return net


def _as_data(net: nn.Module, value: Any, name: str, n: int | None = None) -> torch.Tensor:
    t = net._check(value, name, 2 * net.dim) if isinstance(net, _Net) else value
    if t.ndim != 2:
        raise ShapeError(name, f"a matrix (N, {2 * net.dim}) of states", f"shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ShapeError(name, "at least one row", f"shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ShapeError(name, f"{n} rows (as many as the states)", f"shape {tuple(t.shape)}")
    return t


def _loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "mse":
        return lambda a, b: (a - b).pow(2).mean()
    return lambda a, b: (a - b).abs().mean()


def _convergence(history: torch.Tensor, tol: float) -> tuple[bool, float]:
    """Whether the loss has settled: mean of the last quarter vs the quarter before (relative change at most
    ``tol`` either way; a loss that rose at the end, an unstable step size, is not settled either)."""
    n = history.shape[0]
    w = max(1, n // 4)
    if n < 2 * w or n < 2:
        return False, math.nan
    last = float(history[-w:].mean())
    prev = float(history[-2 * w:-w].mean())
    rel = (prev - last) / max(abs(prev), 1e-300)
    return abs(rel) <= tol, rel           # still falling (rel > tol) or rising (rel < -tol): not settled


@contextlib.contextmanager
def _unchecked(net: nn.Module) -> Iterator[None]:
    """Switch a LagrangianNet's Hessian checks off (training: a non-finite loss is caught instead)."""
    old = getattr(net, "checks", None)
    if old is not None:
        net.checks = False
    try:
        yield
    finally:
        if old is not None:
            net.checks = old


def _common(net, steps, lr, weight_decay, loss, threads, tol):
    net = _check_net(net)
    steps = check_int(steps, "steps", expected="a positive int (optimiser steps)")
    lr = check_real(lr, "lr", positive=True, expected="a positive learning rate")
    weight_decay = check_real(weight_decay, "weight_decay", expected="a non-negative weight decay")
    if weight_decay < 0:
        raise InputError("weight_decay", "a non-negative weight decay", repr(weight_decay))
    loss = _choice(loss, "loss", LOSSES)
    if threads is not None:
        threads = check_int(threads, "threads", expected="None or a positive int (intra-op threads)")
        if threads > _MAX_THREADS:
            raise InputError("threads", f"None or a positive int up to {_MAX_THREADS} (intra-op threads)", repr(threads))
    check_fits("steps", 16.0 * steps, what=f"steps={steps} (the loss histories)")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or math.isnan(tol) or tol < 0:
        raise InputError("tol", "a non-negative relative improvement (inf: never warn)", repr(tol))
    tol = float(tol)
    return net, steps, lr, weight_decay, loss, threads, tol


def _check_seed(seed: Any) -> None:
    """Refuse a bad ``seed`` at once (also when full batches never draw from it)."""
    if not isinstance(seed, torch.Generator):
        _device.seed_sequence(seed)


def _train(net, steps, lr, weight_decay, batch_size, n, seed, threads, tol, who, loss_of, val_loss_of, config):
    """The Adam loop shared by the two fits."""
    g = _device.generator(seed, "cpu") if batch_size is not None and batch_size < n else None
    batch = n if g is None else batch_size
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    history = torch.empty(steps, dtype=torch.float64)
    val = None if val_loss_of is None else torch.empty(steps, dtype=torch.float64)
    work = _device.network_work(net, 1, batch)
    start = time.perf_counter()
    # small networks train on one intra-op thread (daml._device.auto_threads; DAML_THREADS forces a count)
    one_thread_below = _device.SMALL_NETWORK_WORK
    with torch.enable_grad(), _device.auto_threads(work, threads, device=net.device, small=one_thread_below), \
            _unchecked(net):
        for k in range(steps):
            idx = None if g is None else torch.randperm(n, generator=g)[:batch].to(net.device)
            value = loss_of(idx)
            if not bool(torch.isfinite(value)):
                raise DivergenceError(f"{who}: the training loss is {float(value.detach())} (lower lr; for a "
                                      "LagrangianNet a singular velocity Hessian also does this: try solver='pinv')",
                                      step=k)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            history[k] = float(value.detach())
            if val is not None:
                with torch.no_grad():
                    val[k] = float(val_loss_of())
    seconds = time.perf_counter() - start
    if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
        raise DivergenceError(f"{who}: training produced non-finite parameters (lower lr)", step=steps - 1)
    converged, rel = _convergence(history, tol)
    if not converged and not rel < 0:
        warnings.warn(f"{who}: the training loss was still falling after steps={steps} (relative improvement "
                      f"{rel:.3g} over the last quarter > tol={tol}): raise steps", ConvergenceWarning, stacklevel=3)
    elif not converged:
        warnings.warn(f"{who}: the training loss rose over the last quarter of steps={steps} (relative change "
                      f"{rel:.3g}, beyond tol={tol}): the optimisation is unstable or overshooting; lower lr",
                      ConvergenceWarning, stacklevel=3)
    config = {**config, "net": type(net).__name__, "net_config": net.config() if hasattr(net, "config") else None,
              "steps": steps, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "tol": tol,
              "seed": _device.seed_to_attr(seed),
              "relative_improvement": rel if math.isfinite(rel) else None}
    return FitResult(net=net, history=history, val_history=val, converged=bool(converged), seconds=seconds,
                     config=config)


def fit_derivatives(net: nn.Module, x: torch.Tensor, dxdt: torch.Tensor, *, steps: int = 2000, lr: float = 1e-3,
                    weight_decay: float = 1e-4, batch_size: int | None = None, loss: str = "mse",
                    x_val: torch.Tensor | None = None, dxdt_val: torch.Tensor | None = None,
                    threads: int | None = None, tol: float = 1e-2, seed: _device.Seed = None) -> FitResult:
    """Train ``net`` so that ``net(x)`` matches observed time derivatives ``dxdt`` (in place).

    Adam as ``greydanus/hamiltonian-nn`` ``experiment-spring/train.py`` (defaults: ``lr=1e-3``,
    ``weight_decay=1e-4`` as ``torch.optim.Adam``'s L2 term, 2000 full-batch steps, mean squared error;
    their loop runs ``total_steps + 1 = 2001`` updates, this one exactly ``steps``). With ``batch_size``,
    every step trains on a fresh random subset of that many rows, drawn without replacement
    (``experiment-2body/train.py``: ``torch.randperm(N)[:batch_size]``), from ``seed``.

    Parameters
    ----------
    net : HamiltonianNet, LagrangianNet or DerivativeNet
        The network (trained in place, and returned in the result).
    x, dxdt : tensor (N, 2d)
        States and their time derivatives, in the network's dtype (arrays are converted to it). For a
        :class:`LagrangianNet` the states are ``(q, v)`` and the derivatives ``(v, q'')``.
    steps : int
        Optimiser steps.
    lr, weight_decay : float
        Adam's learning rate and L2 weight decay.
    batch_size : int, optional
        Rows per step (``None``: all of them, full batch).
    loss : {"mse", "l1"}
        Mean squared or mean absolute error over all entries (``"l1"``: Cranmer et al.'s loss; their
        notebook sums the absolute errors and divides by 2, a constant factor that Adam's steps do not
        see, up to its ``eps``).
    x_val, dxdt_val : tensor (M, 2d), optional
        Validation data (both or neither): its loss is recorded after every step.
    threads : int, optional
        Intra-op threads (default: one below :data:`daml._device.SMALL_NETWORK_WORK` elements per operation,
        which includes the peers' configurations; :func:`daml._device.auto_threads`).
    tol : float
        The convergence criterion of :class:`FitResult` (default 1e-2: less than 1 % improvement of the
        mean loss over the last quarter of the steps; ``inf``: never warn).
    seed : int, SeedSequence, torch.Generator or None
        Seed of the minibatch draws (unused with full batches).

    Returns
    -------
    FitResult

    Raises
    ------
    ModuleError
        Naming ``net`` for anything but a network of this module.
    InputError
        Naming ``steps``, ``lr``, ``weight_decay``, ``batch_size``, ``loss``, ``threads``, ``tol``, ``seed``,
        ``x_val`` / ``dxdt_val`` (one given without the other).
    DtypeError, ShapeError, NonFiniteError
        Naming ``x``, ``dxdt``, ``x_val`` or ``dxdt_val``.
    DivergenceError
        A non-finite training loss (naming the step).

    Warns
    -----
    ConvergenceWarning
        The loss was still falling, or rising, at the end (``converged=False``).

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(50, 2, generator=g, dtype=torch.float64); dxdt = torch.stack([2 * x[:, 1], -2 * x[:, 0]], -1)
    >>> res = fit_derivatives(HamiltonianNet(1, hidden=16, seed=0), x, dxdt, steps=200)
    """
    net, steps, lr, weight_decay, loss, threads, tol = _common(net, steps, lr, weight_decay, loss, threads, tol)
    x = _as_data(net, x, "x")
    n = x.shape[0]
    dxdt = _as_data(net, dxdt, "dxdt", n)
    if (x_val is None) != (dxdt_val is None):
        missing = "dxdt_val" if dxdt_val is None else "x_val"
        raise InputError(missing, "validation data given together with "
                         + ("x_val" if missing == "dxdt_val" else "dxdt_val"), None)
    if x_val is not None:
        x_val = _as_data(net, x_val, "x_val")
        dxdt_val = _as_data(net, dxdt_val, "dxdt_val", x_val.shape[0])
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", expected="None or a positive int (rows per step)")
    _check_seed(seed)
    crit = _loss_fn(loss)

    def loss_of(idx):
        if idx is None:
            return crit(net(x), dxdt)
        return crit(net(x[idx]), dxdt[idx])

    val_loss_of = None if x_val is None else (lambda: crit(net(x_val), dxdt_val))
    config = {"fit": "derivatives", "loss": loss, "n": n}
    return _train(net, steps, lr, weight_decay, batch_size, n, seed, threads, tol, "fit_derivatives", loss_of,
                  val_loss_of, config)


def _as_trajectory(net: nn.Module, value: Any, name: str) -> torch.Tensor:
    """A recorded trajectory ``(T, B, 2d)`` from a tensor ``(T, B, 2d)`` / ``(T, 2d)`` or a
    mechanics ``Trajectory`` (``q``, ``p`` of shape ``(T, *batch, d)``)."""
    if hasattr(value, "q") and hasattr(value, "p") and not isinstance(value, torch.Tensor):
        q = net._check(value.q, f"{name}.q", net.dim)
        p = net._check(value.p, f"{name}.p", net.dim)
        if q.shape != p.shape:
            raise ShapeError(f"{name}.p", f"{name}.q's shape {tuple(q.shape)}", f"shape {tuple(p.shape)}")
        t = torch.cat([q, p], dim=-1)
    else:
        t = net._check(value, name, 2 * net.dim)
    if t.ndim == 2:
        t = t.unsqueeze(1)
    if t.ndim < 3 or t.numel() == 0:
        raise ShapeError(name, f"a non-empty trajectory (T, B, {2 * net.dim}) (time first)", f"shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1, t.shape[-1])


def fit_trajectories(net: nn.Module, trajectory: Any, dt: float, *, horizon: int = 5, method: str = "leapfrog",
                     steps: int = 500, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int | None = None,
                     loss: str = "mse", val_trajectory: Any = None, substeps: int = 1, step_tol: float | None = None,
                     max_iter: int = 50, threads: int | None = None, tol: float = 1e-2, seed: _device.Seed = None) -> FitResult:
    """Train ``net`` through the integrator: ``horizon`` steps from each recorded state match the record.

    From every state ``x_k`` of ``trajectory`` that has ``horizon`` successors, ``horizon`` steps of length
    ``dt`` (each ``substeps`` steps of :func:`daml.models.mechanics.step` with ``method``) are integrated
    with ``net`` as the system, and the loss compares them with ``x_{k+1}, ..., x_{k+horizon}``;
    gradients flow through the integrator (implicit stages included). Adam as :func:`fit_derivatives`.

    Parameters
    ----------
    net : HamiltonianNet, LagrangianNet or DerivativeNet
        The network (trained in place).
    trajectory : tensor (T, B, 2d) or (T, 2d), or a mechanics ``Trajectory``
        Recorded states, time first, spaced ``dt`` apart.
    dt : float
        Time between records.
    horizon : int
        Steps integrated per start (default 5; must be below ``T``).
    method : str
        One of :data:`daml.models.mechanics.METHODS` (default ``"leapfrog"``; ``"rk4"`` is explicit, so the
        cheapest for these non-separable networks).
    steps, lr, weight_decay, batch_size, loss, threads, tol, seed
        As :func:`fit_derivatives` (``steps`` default 500; a batch draws start states).
    val_trajectory : optional
        A validation trajectory (same layout): its loss is recorded after every step.
    substeps : int
        Integrator steps per record interval.
    step_tol, max_iter : optional
        ``tol`` and ``max_iter`` of :func:`daml.models.mechanics.step` (the implicit stages' fixed-point
        iteration: relative tolerance, default 10 eps of the dtype, and iteration limit).

    Returns
    -------
    FitResult

    Raises
    ------
    InputError, ShapeError, DtypeError, NonFiniteError, ModuleError, DivergenceError
        As :func:`fit_derivatives`, naming ``trajectory``, ``dt``, ``horizon``, ``method``, ``substeps``.

    Examples
    --------
    >>> traj = torch.randn(20, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # (T, B, 2d)
    >>> res = fit_trajectories(DerivativeNet(1, hidden=8, seed=0), traj, 0.1, horizon=2, method="rk4", steps=5)
    """
    from . import mechanics

    net, steps, lr, weight_decay, loss, threads, tol = _common(net, steps, lr, weight_decay, loss, threads, tol)
    dt = check_real(dt, "dt", positive=True, expected="a positive time step")
    horizon = check_int(horizon, "horizon", expected="a positive int (integrated steps per start)")
    substeps = check_int(substeps, "substeps", expected="a positive int")
    max_iter = check_int(max_iter, "max_iter", expected="a positive int")
    if step_tol is not None:
        step_tol = check_real(step_tol, "step_tol", positive=True, expected="None or a positive relative tolerance")
    method = _choice(method, "method", mechanics.METHODS)
    traj = _as_trajectory(net, trajectory, "trajectory")
    if traj.shape[0] <= horizon:
        raise ShapeError("trajectory", f"more than horizon={horizon} records in time", f"shape {tuple(traj.shape)}")
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", expected="None or a positive int (start states per step)")
    _check_seed(seed)
    vtraj = None if val_trajectory is None else _as_trajectory(net, val_trajectory, "val_trajectory")
    if vtraj is not None and vtraj.shape[0] <= horizon:
        raise ShapeError("val_trajectory", f"more than horizon={horizon} records in time", f"shape {tuple(vtraj.shape)}")
    d = net.dim
    h = dt / substeps
    crit = _loss_fn(loss)

    def windows(tr):
        k = tr.shape[0] - horizon
        starts = tr[:k].reshape(-1, 2 * d)                                       # (K*B, 2d)
        targets = torch.stack([tr[j + 1:j + 1 + k] for j in range(horizon)], 0)  # (horizon, K, B, 2d)
        return starts, targets.reshape(horizon, -1, 2 * d)

    starts, targets = windows(traj)
    n = starts.shape[0]
    rows = n if batch_size is None else min(n, batch_size)
    width = sum(int(p.shape[0]) for p in net.parameters() if p.ndim == 2)
    # the autograd graph of one rollout: every substep keeps a few activations per row and layer
    check_fits("substeps", 8.0 * 8 * substeps * horizon * rows * max(width, 2 * d),
               what=f"substeps={substeps} x horizon={horizon} integrator steps on {rows} start states")

    def rollout(x0):
        q, p = x0[..., :d], x0[..., d:]
        out = []
        for _ in range(horizon):
            for _ in range(substeps):
                q, p = mechanics.step(net, q, p, h, method, tol=step_tol, max_iter=max_iter)
            out.append(torch.cat([q, p], dim=-1))
        return torch.stack(out, 0)

    def loss_of(idx):
        if idx is None:
            return crit(rollout(starts), targets)
        return crit(rollout(starts[idx]), targets[:, idx])

    val_loss_of = None
    if vtraj is not None:
        vs, vt = windows(vtraj)

        def val_loss() -> torch.Tensor:
            return crit(rollout(vs), vt).detach()

        val_loss_of = val_loss

    config = {"fit": "trajectories", "loss": loss, "n": n, "dt": dt, "horizon": horizon, "method": method,
              "substeps": substeps, "step_tol": step_tol, "max_iter": max_iter}
    return _train(net, steps, lr, weight_decay, batch_size, n, seed, threads, tol, "fit_trajectories", loss_of,
                  val_loss_of, config)
