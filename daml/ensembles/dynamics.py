"""Ensembles of learned dynamics: member weights for Hamiltonian (and other) networks, and the forecast
model that carries the networks' own uncertainty.

A network that learns a vector field ``dx/dt = f(x)`` from pairs ``(x_j, dx_j/dt)`` is a regression with a
vector output. :func:`fit` of this package trains scalar regressions, so the adapter
:class:`ComponentRegression` reads the field one component at a time: the row ``(x_j, e_k)`` (the state
and the ``k``-th unit vector) has the target ``(dx_j/dt)_k``, and the module returns ``e_kᵀ f(x_j)``.
For ``s`` state components the ``n`` pairs become ``n s`` rows with the same Gaussian likelihood
(independent errors of one standard deviation on every component), so the training, the anchored prior
draws, the randomised-maximum-likelihood target perturbations, the Gauss-Newton statistics and the
importance weights of :func:`~daml.ensembles.weigh` apply unchanged. The inputs are not standardised
(``normalise=False``): a per-coordinate rescaling of ``q`` and ``p`` would break the symplectic
structure of a Hamiltonian network's field.

:func:`fit_dynamics` does this in one call; :func:`dynamics_data` builds the rows.

The trained members define a **mixture transition**: with member weights ``w_i`` and the one-step map
``Φ_i`` of member ``i`` (the network's field integrated by a fixed-step method of
:mod:`daml.models.mechanics`),

.. math::

    p(x_{k+1} \\mid x_k) = \\sum_i w_i\\, \\mathcal{N}(x_{k+1};\\ \\Phi_i(x_k),\\ Q),

which is :class:`EnsembleDynamics`, a daml model of the non-Gaussian kind
(:mod:`daml.models.base`): ``sample_step`` draws a member by its weight for every state and steps it, so
every filter that samples its model (EnKF, ETKF, LETKF, the bootstrap particle filter) runs it unchanged
and its forecast spread includes the model's own uncertainty (source 5 of seed 001); ``step`` is the
transition's mean ``Σ_i w_i Φ_i(x)``. Drawing a member anew at every step treats the parameter
uncertainty as a Markov (per-step) model error, which is how a filter can use it; a parameter error is
persistent in reality, and :meth:`EnsembleDynamics.forecast` runs every member on its own from one state
(a posterior over members with the ensemble's weights) for forecasts without data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import xarray as xr
from torch import nn
from torch.func import functional_call, vmap

from .. import _device
from ..errors import InputError, ShapeError, check_int, check_real
from .training import Ensemble, as_numeric, check_ensemble, fit

__all__ = ["ComponentRegression", "dynamics_data", "fit_dynamics", "EnsembleDynamics"]


def _state_size(net: Any) -> int:
    dim = getattr(net, "dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InputError("net", "a dynamics network with dim (coordinates) and forward(x) -> dx/dt, e.g. "
                         "daml.models.HamiltonianNet", type(net).__name__)
    return 2 * dim


class ComponentRegression(nn.Module):
    """A dynamics network ``f: (..., s) -> (..., s)`` read as the scalar regression
    ``(x, e_k) -> e_kᵀ f(x)`` (see the module docstring).

    Parameters
    ----------
    net : torch.nn.Module
        A network with ``dim`` (``s = 2 dim``) whose ``forward(x)`` is the time derivative of ``x``
        (:class:`~daml.models.HamiltonianNet`, :class:`~daml.models.LagrangianNet`,
        :class:`~daml.models.DerivativeNet`).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise InputError("net", "a torch.nn.Module dynamics network", type(net).__name__)
        self.size = _state_size(net)
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(..., 2 s)`` rows ``(x, e_k)`` to ``(..., 1)`` field components."""
        x, e = z[..., :self.size], z[..., self.size:]
        return (self.net(x) * e).sum(-1, keepdim=True)


def dynamics_data(x: Any, dxdt: Any, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows ``(x_j, e_k)`` and targets ``(dx_j/dt)_k`` of :class:`ComponentRegression`.

    Parameters
    ----------
    x, dxdt : array-like, shape (n, s)
        States and their time derivatives.
    size : int
        The state size ``s``.

    Returns
    -------
    z : tensor (n s, 2 s)
    y : tensor (n s,)
    """
    size = check_int(size, "size")
    xt = as_numeric(x, "x")
    yt = as_numeric(dxdt, "dxdt", dtype=xt.dtype if xt.is_floating_point() else None, device=xt.device)
    if not xt.is_floating_point():
        xt = xt.to(yt.dtype if yt.is_floating_point() else _device.resolve_dtype(None, xt.device))
    yt = yt.to(xt.dtype)
    if xt.ndim != 2 or xt.shape[1] != size:
        raise ShapeError("x", f"states of shape (n, {size})", f"shape {tuple(xt.shape)}")
    if tuple(yt.shape) != tuple(xt.shape):
        raise ShapeError("dxdt", f"derivatives of the shape of x {tuple(xt.shape)}", f"shape {tuple(yt.shape)}")
    for name, t in (("x", xt), ("dxdt", yt)):
        if not bool(torch.isfinite(t).all()):
            raise InputError(name, "finite values", f"{int((~torch.isfinite(t)).sum())} NaN or infinite entries")
    n = xt.shape[0]
    eye = torch.eye(size, dtype=xt.dtype, device=xt.device)
    z = torch.cat([xt.repeat_interleave(size, 0), eye.repeat(n, 1)], dim=1)
    return z, yt.reshape(-1)


def fit_dynamics(net: nn.Module, x: Any, dxdt: Any, *, members: int = 5, noise_sd: float, seed: _device.Seed = None,
                 **kw: Any) -> Ensemble:
    """Train ``members`` copies of a dynamics network on ``(x, dx/dt)`` pairs with :func:`~daml.ensembles.fit`.

    Parameters
    ----------
    net : torch.nn.Module
        The architecture (its own parameter values are ignored): a network with ``dim`` whose
        ``forward(x)`` is ``dx/dt``.
    x, dxdt : array-like, shape (n, 2 dim)
        States ``(q, p)`` and their time derivatives.
    members : int
        Ensemble size.
    noise_sd : float
        Standard deviation of the error of every derivative component (the Gaussian likelihood).
    seed : int, SeedSequence, torch.Generator or None
    **kw
        Passed to :func:`~daml.ensembles.fit` (``epochs``, ``lr``, ``batch_size``, ``anchor``,
        ``perturb_targets``, ``prior_scale``, ...); ``normalise`` is always ``False`` (module docstring).

    Returns
    -------
    Ensemble
        Of :class:`ComponentRegression` modules; :func:`~daml.ensembles.weigh` takes it with
        ``dynamics_data(x, dxdt, s)`` as data, and :class:`EnsembleDynamics` turns it into a forecast model.
    """
    if "normalise" in kw:
        raise InputError("normalise", "not given (fit_dynamics never standardises the states: it would break "
                         "the structure of a Hamiltonian field)", repr(kw["normalise"]))
    module = ComponentRegression(net)
    z, y = dynamics_data(x, dxdt, module.size)
    return fit(module, z, y, members=members, noise_sd=noise_sd, seed=seed, normalise=False, **kw)


def _member_params(ens: Ensemble) -> dict[str, torch.Tensor]:
    """The stacked parameters of the wrapped network (``net.`` prefix removed)."""
    return {k[len("net."):]: v for k, v in ens.params.items() if k.startswith("net.")}


class _StackedField:
    """The member fields as one partitioned system on ``(M, ..., d)`` coordinates (member axis first)."""

    separable = False

    def __init__(self, net: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]):
        self.net, self.params, self.buffers = net, params, buffers
        self.dim = int(net.dim)
        self._field = vmap(lambda p, b, x: functional_call(net, (p, b), (x,)))

    def field(self, x: torch.Tensor) -> torch.Tensor:
        p = {k: v.to(x) for k, v in self.params.items()}
        b = {k: v.to(x.device) for k, v in self.buffers.items()}
        return self._field(p, b, x)

    def dq(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.field(torch.cat([q, p], -1))[..., :self.dim]

    def dp(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.field(torch.cat([q, p], -1))[..., self.dim:]

    def dqdp(self, q: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.field(torch.cat([q, p], -1))
        return f[..., :self.dim], f[..., self.dim:]


class EnsembleDynamics:
    """The mixture transition of a weighted ensemble of dynamics networks (module docstring): a daml model.

    Parameters
    ----------
    ens : Ensemble
        Trained by :func:`fit_dynamics` (weighted or not: ``ens.log_weight`` is used).
    dt : float
        The model step (time between two states).
    substeps : int
        Integrator steps per model step.
    method : str
        A fixed-step method of :data:`daml.models.mechanics.METHODS`.
    noise_cov : scalar, (s,) or (s, s), optional
        Covariance ``Q`` of additive Gaussian noise after each step (needed by filters that evaluate
        the transition density).

    Attributes
    ----------
    state_size, dt : the model protocol; ``noise_cov`` is ``None`` (the transition is drawn by
        ``sample_step``) and ``model_noise`` holds ``Q``.
    """

    name = "ensemble_dynamics"
    noise_cov = None

    def __init__(self, ens: Ensemble, dt: float, *, substeps: int = 1, method: str = "leapfrog", noise_cov: Any = None):
        from ..models.base import as_covariance
        from ..models.mechanics import METHODS

        ens = check_ensemble(ens)
        if not isinstance(ens.module, ComponentRegression):
            raise InputError("ens", "an ensemble trained by daml.ensembles.fit_dynamics",
                             f"an ensemble of {type(ens.module).__name__}")
        self.ens = ens
        self.dt = check_real(dt, "dt", positive=True, expected="a positive time step")
        self.substeps = check_int(substeps, "substeps")
        if not isinstance(method, str) or method not in METHODS:
            raise InputError("method", f"one of {METHODS}", repr(method))
        self.method = method
        net = ens.module.net
        self.state_size = 2 * int(net.dim)
        self.members = ens.members
        self.model_noise = None if noise_cov is None else as_covariance(noise_cov, self.state_size, "noise_cov")
        params = _member_params(ens)
        buffers = {k[len("net."):]: v for k, v in ens.buffers.items() if k.startswith("net.")}
        self._system = _StackedField(net, params, buffers)

    def _state(self, x: Any, name: str = "x") -> torch.Tensor:
        """``x`` as a real floating tensor with the state size as its last axis (the hot path of the
        filters passes such tensors through untouched)."""
        if isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float64) and x.ndim >= 1 \
                and x.shape[-1] == self.state_size:
            return x
        from ..errors import DtypeError
        from ..models.base import check_state

        t = check_state(self, x, name)
        if t.is_complex() or t.dtype not in (torch.float32, torch.float64):
            if t.is_floating_point() and not t.is_complex():
                raise DtypeError(name, "float32 or float64 states", f"dtype {t.dtype}")
            if t.is_complex():
                raise DtypeError(name, "real states", f"dtype {t.dtype}")
            t = t.to(self.ens.log_weight.dtype)
        return t

    # -- the members ------------------------------------------------------------------------------
    def weights(self, like: torch.Tensor) -> torch.Tensor:
        """The normalised member weights ``(M,)`` on ``like``'s device and dtype."""
        return torch.exp(self.ens.log_weight.to(like))

    def member_steps(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's step from every state: ``(M, ..., s)`` for ``x`` of shape ``(..., s)``."""
        from ..models.mechanics import step as mech_step

        x = self._state(x)
        d = self.state_size // 2
        xs = x.unsqueeze(0).expand(self.members, *x.shape)
        q, p = xs[..., :d], xs[..., d:]
        h = self.dt / self.substeps
        for _ in range(self.substeps):
            q, p = mech_step(self._system, q, p, h, self.method)
        return torch.cat([q, p], -1)

    # -- the model protocol -----------------------------------------------------------------------
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The transition's mean ``Σ_i w_i Φ_i(x)``."""
        x = self._state(x)
        out = self.member_steps(x)
        w = self.weights(out).reshape(-1, *([1] * x.ndim))
        return (w * out).sum(0)

    def sample_step(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw of the mixture transition per state: member ``i`` with probability ``w_i``, then
        ``N(0, Q)`` noise when ``noise_cov`` was given."""
        x = self._state(x)
        out = self.member_steps(x)                                   # (M, ..., s)
        batch = x.shape[:-1]
        count = int(math.prod(batch)) if batch else 1
        idx = torch.multinomial(self.weights(out).expand(count, -1), 1, replacement=True,
                                generator=generator).reshape(batch)
        flat = out.reshape(self.members, count, self.state_size)
        chosen = flat[idx.reshape(-1), torch.arange(count, device=x.device)].reshape(x.shape)
        if self.model_noise is not None:
            from ..models.base import covariance_root

            root = covariance_root(self.model_noise.to(x))
            chosen = chosen + torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) @ root.T
        return chosen

    def log_transition(self, x_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log Σ_i w_i N(x; Φ_i(x_prev), Q)``, broadcasting the leading dims of the two arguments.

        Raises
        ------
        InputError
            Naming ``noise_cov`` when the model was built without it: a mixture of point masses has
            no density.
        """
        if self.model_noise is None:
            raise InputError("noise_cov", "a model-noise covariance (the transition of an ensemble without "
                             "noise is a mixture of point masses and has no density)", None)
        mean = self.member_steps(x_prev)                            # (M, ..., s)
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=self.model_noise.to(mean))
        w = self.ens.log_weight.to(mean).reshape(-1, *([1] * (mean.ndim - 2)))   # over (M, ...)
        return torch.logsumexp(dist.log_prob(x.unsqueeze(0)) + w, dim=0)

    def forecast(self, x0: Any, steps: int) -> xr.Dataset:
        """Every member run on its own from ``x0`` for ``steps`` model steps: a posterior over the
        members (dims ``time, member, variable``, the ensemble's log-weights), the forecast with the
        model's own (persistent) uncertainty.

        Parameters
        ----------
        x0 : array-like, shape (s,)
        steps : int
        """
        from ..models.base import _check_finite_state
        from ..posterior import from_members

        steps = check_int(steps, "steps", 1)
        dev, dt = self.ens.log_weight.device, self.ens.log_weight.dtype
        x = _check_finite_state(as_numeric(x0, "x0", dtype=dt, device=dev), "x0", self)
        if x.ndim != 1:
            raise ShapeError("x0", f"one state of shape ({self.state_size},)", f"shape {tuple(x.shape)}")
        d = self.state_size // 2
        q = x[:d].expand(self.members, d).clone()
        p = x[d:].expand(self.members, d).clone()
        from ..models.mechanics import step as mech_step

        h = self.dt / self.substeps
        states = [torch.cat([q, p], -1)]
        with torch.no_grad():
            for _ in range(steps):
                for _ in range(self.substeps):
                    q, p = mech_step(self._system, q, p, h, self.method)
                states.append(torch.cat([q, p], -1))
        traj = torch.stack(states)                                   # (T, M, s)
        if not bool(torch.isfinite(traj).all()):
            from ..errors import DivergenceError

            bad = int((~torch.isfinite(traj).reshape(traj.shape[0], -1).all(1)).nonzero()[0])
            raise DivergenceError(f"EnsembleDynamics.forecast: a member's state is not finite at step {bad}",
                                  step=bad)
        return from_members(traj, self.ens.log_weight.expand(steps + 1, -1), dims=("time", "member", "variable"),
                            weight_dims=("time", "member"),
                            coords={"time": torch.arange(steps + 1, dtype=torch.float64).numpy() * self.dt},
                            method="ensemble_dynamics.forecast", config=self.config())

    def config(self) -> dict:
        """The configuration (recorded in posteriors' attrs)."""
        return {"members": self.members, "network": type(self.ens.module.net).__name__, "dt": self.dt,
                "substeps": self.substeps, "method": self.method,
                "noise_cov": None if self.model_noise is None else self.model_noise.tolist()}

    def __repr__(self) -> str:
        return (f"EnsembleDynamics(members={self.members}, network={type(self.ens.module.net).__name__}, "
                f"dt={self.dt}, method={self.method!r})")
