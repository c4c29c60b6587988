"""Proposals of particle filters: where each particle moves before it is weighted.

A proposal draws ``x_k ~ q(. | x_{k-1}, y_k)`` for every particle and returns the log density of the
draw, which a particle filter needs to weight it by ``f(x_k | x_{k-1}) g(y_k | x_k) / q(x_k | x_{k-1}, y_k)``
(the differentiable particle filter ``dpf`` of :mod:`daml.filters.dpf`). The :class:`Proposal`
protocol states the interface; :class:`MixtureProposal` is the learned Gaussian-mixture proposal of
StateMixNN (Cox, Segarra and Elvira 2024), a :class:`daml.models.mixture.GaussianMixtureNet` whose
input is the previous state, the observation and its mask.

Shapes: ``x_prev`` ``(*batch, N, n)`` (``N`` particles), ``y`` and ``mask`` ``(*batch, m)``, shared by
the ``N`` particles; an unobserved entry (``mask`` False) is fed to the network as 0, whatever ``y``
holds there (NaN included).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from .. import _device
from ..errors import InputError, NonFiniteError, ShapeError, check_int
from ..models.mixture import GaussianMixtureNet, _log_prob, _Parts, _renamed, _sample

__all__ = ["Proposal", "MixtureProposal", "BASES"]

BASES = ("state", "model")
"""What a :class:`MixtureProposal`'s means are offsets from: the previous state or the model's step of it."""


@runtime_checkable
class Proposal(Protocol):
    """What a particle filter asks of a proposal ``q(x_k | x_{k-1}, y_k)``."""

    def sample(self, x_prev: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, *,
               model: Any, operator: Any) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - protocol
        """Draw ``x`` ``(*batch, N, n)`` from ``q(. | x_prev, y)`` (reparameterised where possible) and
        return ``(x, log q(x | x_prev, y))``, the log density ``(*batch, N)``. ``y`` ``(*batch, m)`` holds 0
        where ``mask`` ``(*batch, m)`` is False."""
        ...


class MixtureProposal(nn.Module):
    """The StateMixNN proposal: a Gaussian mixture whose means and covariances a dense network computes
    from ``concat(x_prev, y * mask, mask)``.

    Parameters
    ----------
    state_size : int
        ``n``.
    obs_size : int
        ``m``, the length of the observation vector.
    components, hidden, activation, covariance, weights, min_scale, init_scale, seed, dtype, device
        As :class:`daml.models.mixture.GaussianMixtureNet` (input size ``n + 2 m``, output size ``n``).
    base : {"state", "model"}
        Means are ``x_prev + net(...)`` (default) or ``model.step(x_prev) + net(...)`` (then ``model``
        must be passed to :meth:`sample` and :meth:`log_prob`).

    Raises
    ------
    InputError
        Naming ``state_size``, ``obs_size``, ``base`` or any argument of the network.
    """

    def __init__(self, state_size: int, obs_size: int, components: int = 1, hidden: Sequence[int] = (32, 32),
                 activation: str = "tanh", covariance: str = "diagonal", weights: str = "equal",
                 base: str = "state", min_scale: float = 1e-3, init_scale: float = 1.0, seed: _device.Seed = None,
                 dtype: Any = None, device: Any = None):
        super().__init__()
        self.state_size = check_int(state_size, "state_size", expected="a positive int")
        self.obs_size = check_int(obs_size, "obs_size", expected="a positive int (observation length)")
        if not isinstance(base, str) or base not in BASES:
            raise InputError("base", f"one of {list(BASES)}", repr(base))
        self.base = base
        widest = "obs_size" if 2 * self.obs_size > self.state_size else "state_size"
        self.net = _renamed(lambda: GaussianMixtureNet(
            self.state_size + 2 * self.obs_size, self.state_size, components, hidden, activation, covariance, weights,
            min_scale, init_scale, seed, dtype, device, name="proposal"),
            {"in_features": widest, "out_features": "state_size"})
        net = self.net                                  # the inputs' standardisation (see standardise)
        for name, size, fill in (("x_shift", self.state_size, 0.0), ("x_scale", self.state_size, 1.0),
                                 ("y_shift", self.obs_size, 0.0), ("y_scale", self.obs_size, 1.0)):
            self.register_buffer(name, torch.full((size,), fill, dtype=net.dtype, device=net.device))

    def config(self) -> dict:
        """The constructor arguments (JSON-able; the trained weights are in ``state_dict()``)."""
        n = self.net
        return {"state_size": self.state_size, "obs_size": self.obs_size, "components": n.components,
                "hidden": list(n.hidden), "activation": n.activation, "covariance": n.covariance,
                "weights": n.weights, "base": self.base, "min_scale": n.min_scale, "init_scale": n.init_scale,
                "seed": n.seed}

    def standardise(self, x: Any = None, y: Any = None) -> "MixtureProposal":
        """Feed the network standardised inputs: ``(x_prev - mean_x) / sd_x`` and ``(y - mean_y) / sd_y``,
        entry by entry, with the means and standard deviations of the samples ``x`` ``(..., n)`` (for
        example prior draws or a simulated trajectory) and ``y`` ``(..., m)`` (for example the training
        observations; NaN entries are left out). A dense ``tanh`` network saturates on raw states of
        size several units (Lorenz-96's are about 2 +- 4), which standardising avoids. Only the
        network's input changes: the means stay offsets from the raw ``x_prev`` or ``model.step(x_prev)``.

        Either sample may be omitted (that part stays as it is). The statistics are buffers, not
        parameters: training does not change them, and :func:`daml.io.save_network` stores them.
        Returns the proposal.

        Raises
        ------
        ShapeError, NonFiniteError
            Naming ``x`` or ``y`` for a wrong last axis, fewer than two values of an entry, or
            infinite values (NaN in ``x``).
        """
        from ..models.base import as_real_tensor

        for name, sample, size, shift, scale in (("x", x, self.state_size, "x_shift", "x_scale"),
                                                 ("y", y, self.obs_size, "y_shift", "y_scale")):
            if sample is None:
                continue
            t = as_real_tensor(sample, name, dtype=torch.float64, device="cpu")
            if t.ndim == 0 or t.shape[-1] != size:
                raise ShapeError(name, f"samples with a last axis of length {size}", f"shape {tuple(t.shape)}")
            t = t.reshape(-1, size)
            if bool(torch.isinf(t).any()) or (name == "x" and bool(torch.isnan(t).any())):
                raise NonFiniteError(name, "finite samples" + (" (NaN only for a missing observation)" if name == "y"
                                                               else ""), "NaN or infinite entries")
            ok = ~torch.isnan(t)
            count = ok.sum(0)
            if int(count.min()) < 2:
                raise ShapeError(name, "at least two values of every entry", f"{int(count.min())} for some entry")
            vals = torch.where(ok, t, torch.zeros((), dtype=t.dtype))
            mean = vals.sum(0) / count
            var = (torch.where(ok, t - mean, torch.zeros((), dtype=t.dtype)) ** 2).sum(0) / (count - 1)
            sd = var.sqrt()
            sd = torch.where(sd > 0, sd, torch.ones_like(sd))          # a constant entry: centred only
            getattr(self, shift).copy_(mean.to(getattr(self, shift)))
            getattr(self, scale).copy_(sd.to(getattr(self, scale)))
        return self

    def _parts(self, x_prev: Any, y: Any, mask: Any, model: Any) -> tuple[_Parts, torch.Tensor]:
        net = self.net
        n, m = self.state_size, self.obs_size
        for name, value, size in (("x_prev", x_prev, n), ("y", y, m), ("mask", mask, m)):
            if not isinstance(value, torch.Tensor):
                raise InputError(name, "a torch tensor", type(value).__name__)
            if value.ndim == 0 or value.shape[-1] != size:
                raise ShapeError(name, f"a last axis of length {size}", f"shape {tuple(value.shape)}")
        if x_prev.ndim < 2:
            raise ShapeError("x_prev", f"particles of shape (*batch, N, {n})", f"shape {tuple(x_prev.shape)}")
        if y.is_complex() or not y.is_floating_point():
            raise InputError("y", "real floating observations", f"dtype {y.dtype}")
        try:
            lead = torch.broadcast_shapes(x_prev.shape[:-2], y.shape[:-1], mask.shape[:-1])
        except RuntimeError as exc:
            raise ShapeError("y", f"a batch shape that broadcasts with x_prev's {tuple(x_prev.shape[:-2])}",
                             f"y {tuple(y.shape)}, mask {tuple(mask.shape)}") from exc
        dev, dt = net.device, net.dtype
        xin = x_prev.to(device=dev, dtype=dt)
        observed = mask.to(device=dev) != 0
        yin = torch.where(observed, y.to(device=dev, dtype=dt), torch.zeros((), dtype=dt, device=dev))
        shape = (*lead, x_prev.shape[-2])
        ynet = torch.where(observed, (yin - self.y_shift) / self.y_scale, yin)       # standardise(): identity by default
        obs = torch.cat([ynet, observed.to(dt)], dim=-1).unsqueeze(-2).expand(*lead, 1, 2 * m).expand(*shape, 2 * m)
        inp = torch.cat([((xin - self.x_shift) / self.x_scale).expand(*shape, n), obs], dim=-1)
        if self.base == "state":
            base = xin
        else:
            if model is None or not callable(getattr(model, "step", None)):
                raise InputError("model", "the model whose step(x_prev) is the proposal's base (base='model')",
                                 type(model).__name__)
            base = model.step(x_prev).to(device=dev, dtype=dt)
        try:
            parts = net._parts(inp, base, inp_name="x_prev", base_name="model.step(x_prev)")
        except NonFiniteError as exc:
            if exc.argument == "x_prev":                   # name the offender among the concatenated inputs
                if not bool(torch.isfinite(xin).all()):
                    raise NonFiniteError("x_prev", "finite particles", "NaN or infinite entries") from None
                raise NonFiniteError("y", "finite observations where mask is True",
                                     "NaN or infinite observed entries") from None
            raise
        return parts, x_prev

    def sample(self, x_prev: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, *,
               model: Any = None, operator: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw every particle from the mixture: ``(x, log_q)``, ``x`` ``(*batch, N, n)`` reparameterised
        (gradients reach the network's means and scales) and ``log_q`` ``(*batch, N)``. ``operator`` is
        not used (part of :class:`Proposal`).

        Raises
        ------
        InputError, ShapeError
            Naming ``x_prev``, ``y`` or ``mask`` (not tensors, wrong last axis, batch shapes that do not
            broadcast), ``model`` (missing with ``base="model"``).
        NonFiniteError
            Naming ``x_prev`` or ``y`` (observed entries) for NaN or infinite entries, ``proposal`` for
            non-finite network outputs.
        """
        parts, x_prev = self._parts(x_prev, y, mask, model)
        x = _sample(parts, generator)
        return x.to(x_prev.dtype), _log_prob(parts, x).to(x_prev.dtype)

    def log_prob(self, x_prev: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, *,
                 model: Any = None) -> torch.Tensor:
        """``log q(x | x_prev, y)`` ``(*batch, N)`` for particles ``x`` ``(*batch, N, n)``.

        Raises
        ------
        ShapeError, NonFiniteError
            Naming ``x`` for a wrong last axis or non-finite entries (and as :meth:`sample`).
        """
        parts, x_prev = self._parts(x_prev, y, mask, model)
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[-1] != self.state_size:
            raise ShapeError("x", f"a tensor with a last axis of length {self.state_size}",
                             f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        return _log_prob(parts, x.to(device=self.net.device, dtype=self.net.dtype)).to(x_prev.dtype)
