"""Gaussian-mixture networks: learned transitions (and proposals) of a state-space model.

StateMixNN (Cox, Segarra and Elvira 2024) writes both the transition ``f(x_t | x_{t-1})`` and the
proposal ``pi(x_t | x_{t-1}, y_t)`` of a particle filter as a Gaussian mixture of ``S`` components
whose means and diagonal covariances are outputs of dense networks, with equal weights ``1/S``. The
network here, :class:`GaussianMixtureNet`, maps inputs ``(..., p)`` to such a mixture over
``(..., d)``:

* **means**: one ``d``-vector per component, optionally added to a ``base`` (the residual form
  ``mean = base + net(input)``, e.g. ``base = x_{t-1}``);
* **covariance** ``"diagonal"`` (default, as the paper): a standard deviation per coordinate and
  component, ``softplus(raw) + min_scale``; ``"full"``: a Cholesky factor whose diagonal is
  ``softplus(raw) + min_scale`` and whose strictly lower triangle is a free network output;
  ``"constant"``: a learned, input-free standard deviation per coordinate and component;
* **weights** ``"equal"`` (default, ``1/S`` as the paper) or ``"learned"`` (the network outputs logits).

``hidden=()`` makes every output an affine function of the input, so a linear-Gaussian transition
``x' = A x + N(0, Q)`` with diagonal ``Q`` is exactly :class:`MixtureTransition` with
``residual=False, covariance="constant", components=1, hidden=()``.

**Initialisation** (deterministic given ``seed``, drawn from a :func:`daml._device.generator` on the
CPU in float64 and then cast, so the same ``seed`` gives the same network on every device): hidden
layers Glorot-uniform weights (``U(-b, b)``, ``b = sqrt(6 / (fan_in + fan_out))``) and zero biases;
the output layer Glorot-uniform weights times ``0.01`` and biases chosen so that every mean starts at
``base`` (zero offset), every standard deviation at ``init_scale`` (default 1), every off-diagonal
Cholesky entry at 0 and every weight at ``1/S``. A residual transition therefore starts close to
``x' = x + N(0, init_scale^2 I)``.

**Draws** pick a component with the caller's generator, then return ``loc + L eps`` with
``eps ~ N(0, I)``: reparameterised, so gradients flow to the means and scales through a draw (not
to learned weights through the choice of component).

References
----------
* B. Cox, S. Segarra and V. Elvira (2024), Learning state-space models from observations with
  Gaussian-mixture networks (StateMixNN). arXiv:2411.15638.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from .. import _device
from ..errors import InputError, NonFiniteError, ShapeError, check_fits, check_int, check_real
from .base import check_network_input

__all__ = ["GaussianMixtureNet", "MixtureParams", "MixtureTransition", "COVARIANCES", "WEIGHTS", "ACTIVATIONS"]

COVARIANCES = ("diagonal", "full", "constant")
"""The covariance forms of :class:`GaussianMixtureNet`."""

WEIGHTS = ("equal", "learned")
"""The mixture-weight forms of :class:`GaussianMixtureNet`."""

ACTIVATIONS = {"tanh": nn.Tanh, "silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}
"""Hidden-layer activations by name (the names of :func:`daml.ensembles.mlp`)."""

_HEAD_GAIN = 0.01          # output-layer weights: Glorot bound times this (outputs start near the biases)
_LOG_2PI = math.log(2.0 * math.pi)


class MixtureParams(NamedTuple):
    """An ``S``-component Gaussian mixture over ``d`` coordinates, batched over leading dims.

    Attributes
    ----------
    log_mix : tensor (..., S)
        Log mixture weights (normalised: ``logsumexp`` over the last axis is 0).
    loc : tensor (..., S, d)
        Component means.
    scale_tril : tensor (..., S, d, d)
        Lower-triangular Cholesky factors ``L`` of the component covariances ``L L^T``.
    """

    log_mix: torch.Tensor
    loc: torch.Tensor
    scale_tril: torch.Tensor


class _Parts(NamedTuple):
    """The mixture in the cheapest form: ``diag`` (..., S, d) for a diagonal covariance, else ``tril``."""

    log_mix: torch.Tensor
    loc: torch.Tensor
    diag: torch.Tensor | None
    tril: torch.Tensor | None
    equal: bool


def _transformed() -> bool:
    from .base import _transformed as active
    return active()


def _softplus_inverse(y: float) -> float:
    """``x`` with ``softplus(x) = y`` (``y > 0``)."""
    return y + math.log(-math.expm1(-y))


def _choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(name, f"one of {list(choices)}", repr(value))
    return value


def _check_hidden(hidden: Any) -> tuple[int, ...]:
    expected = "a sequence of positive ints (layer widths; () for an affine map)"
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (Sequence, tuple, list)):
        raise InputError("hidden", expected, repr(hidden), hint="write hidden=(32,) for one layer of 32")
    out = []
    for h in hidden:
        if isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1:
            raise InputError("hidden", expected, repr(hidden))
        out.append(int(h))
    return tuple(out)


def _glorot(g: torch.Generator, fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand((fan_out, fan_in), generator=g, dtype=torch.float64) * 2.0 - 1.0) * bound


class GaussianMixtureNet(nn.Module):
    """A dense network from inputs ``(..., p)`` to an ``S``-component Gaussian mixture over ``(..., d)``.

    Parameters
    ----------
    in_features : int
        ``p``, the length of the input's last axis.
    out_features : int
        ``d``, the dimension of the mixture.
    components : int
        ``S``, the number of components (default 1).
    hidden : sequence of int
        Widths of the hidden layers (default ``(32, 32)``); ``()`` makes every output affine in the input.
    activation : {"tanh", "silu", "gelu", "relu"}
        Hidden-layer activation (default ``"tanh"``).
    covariance : {"diagonal", "full", "constant"}
        Component covariances (see the module docstring; default ``"diagonal"``).
    weights : {"equal", "learned"}
        Mixture weights: ``1/S`` (default) or network-output logits.
    min_scale : float
        Floor added to every standard deviation (Cholesky diagonal), default ``1e-3``.
    init_scale : float
        Every standard deviation at initialisation (default 1; must exceed ``min_scale``).
    seed : int, SeedSequence, torch.Generator or None
        Seed of the initial weights (``None``: fresh entropy, not reproducible).
    dtype, device : optional
        Resolved by :mod:`daml._device` (float64 on the CPU by default).
    name : str
        What errors call the network (``"transition"``, ``"proposal"``; default ``"network"``).

    Raises
    ------
    InputError
        Naming ``in_features``, ``out_features``, ``components`` (not a positive int), ``hidden``,
        ``activation``, ``covariance``, ``weights``, ``min_scale``, ``init_scale`` or ``name``.
    """

    def __init__(self, in_features: int, out_features: int, components: int = 1, hidden: Sequence[int] = (32, 32),
                 activation: str = "tanh", covariance: str = "diagonal", weights: str = "equal",
                 min_scale: float = 1e-3, init_scale: float = 1.0, seed: _device.Seed = None, dtype: Any = None,
                 device: Any = None, name: str = "network"):
        super().__init__()
        self.in_features = check_int(in_features, "in_features", expected="a positive int (input length)")
        self.out_features = check_int(out_features, "out_features", expected="a positive int (mixture dimension)")
        self.components = check_int(components, "components", expected="a positive int (mixture components)")
        self.hidden = _check_hidden(hidden)
        self.activation = _choice(activation, "activation", sorted(ACTIVATIONS))
        self.covariance = _choice(covariance, "covariance", COVARIANCES)
        self.weights = _choice(weights, "weights", WEIGHTS)
        self.min_scale = check_real(min_scale, "min_scale", positive=True, expected="a positive scale floor")
        self.init_scale = check_real(init_scale, "init_scale", positive=True, expected="a positive initial scale")
        if not self.init_scale > self.min_scale:
            raise InputError("init_scale", f"a scale above min_scale={self.min_scale}", repr(init_scale))
        if not isinstance(name, str) or not name:
            raise InputError("name", "a non-empty str", repr(name))
        self.name = name
        dev = _device.resolve_device(device)
        dt = _device.resolve_dtype(dtype, dev)
        self._check_size(dev)
        g = _device.generator(seed, "cpu")
        self.seed = int(seed) if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) else None

        s, d = self.components, self.out_features
        widths = (self.in_features,) + self.hidden
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            lin = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out, dtype=torch.float64)   # no global-RNG init
            with torch.no_grad():
                lin.weight.copy_(_glorot(g, fan_in, fan_out))
                lin.bias.zero_()
            layers += [lin, ACTIVATIONS[self.activation]()]
        self.trunk = nn.Sequential(*layers)
        # output layout: loc (S d) | raw diagonal scale (S d, not "constant") | lower (S d(d-1)/2, "full") | logits (S)
        self._n_loc = s * d
        self._n_diag = s * d if self.covariance != "constant" else 0
        self._n_low = s * d * (d - 1) // 2 if self.covariance == "full" else 0
        self._n_logit = s if self.weights == "learned" else 0
        n_out = self._n_loc + self._n_diag + self._n_low + self._n_logit
        fan_in = widths[-1]
        self.head = torch.nn.utils.skip_init(nn.Linear, fan_in, n_out, dtype=torch.float64)
        raw0 = _softplus_inverse(self.init_scale - self.min_scale)
        with torch.no_grad():
            self.head.weight.copy_(_glorot(g, fan_in, n_out, _HEAD_GAIN))
            bias = torch.zeros(n_out, dtype=torch.float64)
            bias[self._n_loc:self._n_loc + self._n_diag] = raw0
            self.head.bias.copy_(bias)
        if self.covariance == "constant":
            self.raw_scale = nn.Parameter(torch.full((s, d), raw0, dtype=torch.float64))
        self.to(device=dev, dtype=dt)

    def _check_size(self, device: torch.device) -> None:
        """Refuse, before allocating, a network whose parameters cannot fit in memory (naming the largest size)."""
        s, d = self.components, self.out_features
        widths = (self.in_features,) + self.hidden
        n_out = s * d + s * d * (d + 1) // 2 + s                 # an upper bound of the output layer's width
        count = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:])) + (widths[-1] + 1) * n_out
        sizes = {"in_features": self.in_features, "out_features": self.out_features, "components": s,
                 "hidden": max(self.hidden, default=0)}
        name = max(sizes, key=lambda k: sizes[k])
        what = (f"in_features={self.in_features}, out_features={d}, components={s}, hidden={self.hidden} "
                f"({count} parameters)")
        check_fits(name, 24.0 * count, what=what)                   # float64 init, its cast copy, a gradient
        if device.type != "cpu":
            check_fits(name, 8.0 * count, what=what, device=device)

    # -- properties ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.head.weight.dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self.head.weight.device

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, components={self.components}, "
                f"hidden={self.hidden}, covariance={self.covariance!r}, weights={self.weights!r}")

    # -- evaluation ----------------------------------------------------------------------------------
    def _check_input(self, t: Any, name: str, size: int | None) -> torch.Tensor:
        return check_network_input(t, name, size, self.dtype, self.device)

    def _parts(self, inp: Any, base: Any = None, *, inp_name: str = "inp", base_name: str = "base") -> _Parts:
        """The mixture at ``inp`` with means offset by ``base``, checked for finite outputs."""
        inp = self._check_input(inp, inp_name, self.in_features)
        if base is not None:
            base = self._check_input(base, base_name, self.out_features)
        s, d = self.components, self.out_features
        h = self.head(self.trunk(inp))
        if not _transformed():
            ok = torch.isfinite(h).all() & torch.isfinite(inp).all()
            if base is not None:
                ok = ok & torch.isfinite(base).all()
            if not bool(ok):
                self._diagnose(inp, h, base, inp_name, base_name)
        lead = h.shape[:-1]
        i = 0
        loc = h[..., i:i + self._n_loc].reshape(*lead, s, d)
        i += self._n_loc
        if base is not None:
            loc = base.unsqueeze(-2) + loc
        if self.covariance == "constant":
            diag = nn.functional.softplus(self.raw_scale) + self.min_scale           # (S, d), broadcasts
        else:
            diag = nn.functional.softplus(h[..., i:i + self._n_diag].reshape(*lead, s, d)) + self.min_scale
            i += self._n_diag
        tril = None
        if self.covariance == "full":
            low = h[..., i:i + self._n_low].reshape(*lead, s, self._n_low // s)
            i += self._n_low
            tril = torch.diag_embed(diag)
            if self._n_low:
                rows, cols = torch.tril_indices(d, d, offset=-1, device=h.device)
                lower = torch.zeros_like(tril)
                lower[..., rows, cols] = low
                tril = tril + lower
            diag = None
        if self._n_logit:
            log_mix = torch.log_softmax(h[..., i:i + self._n_logit], dim=-1)
        else:
            log_mix = torch.full((*lead, s), -math.log(s), dtype=h.dtype, device=h.device)
        return _Parts(log_mix, loc, diag, tril, not self._n_logit)

    def _diagnose(self, inp, h, base, inp_name, base_name) -> None:
        if not bool(torch.isfinite(inp).all()):
            raise NonFiniteError(inp_name, f"finite inputs of the {self.name} network",
                                 f"{int((~torch.isfinite(inp)).sum())} NaN or infinite entries")
        if base is not None and not bool(torch.isfinite(base).all()):
            raise NonFiniteError(base_name, f"finite mean offsets of the {self.name} network",
                                 f"{int((~torch.isfinite(base)).sum())} NaN or infinite entries")
        parts = [("means (loc)", self._n_loc), ("scales", self._n_diag), ("Cholesky lower triangle", self._n_low),
                 ("weight logits", self._n_logit)]
        bad, i = [], 0
        for label, k in parts:
            if k and not bool(torch.isfinite(h[..., i:i + k]).all()):
                bad.append(label)
            i += k
        raise NonFiniteError(self.name, f"finite outputs of the {self.name} network",
                             f"non-finite {', '.join(bad)} from finite inputs",
                             hint="the parameters may have diverged in training (lower the learning rate)")

    def forward(self, inp: torch.Tensor, base: torch.Tensor | None = None) -> MixtureParams:
        """The mixture at ``inp`` ``(..., p)``: :class:`MixtureParams` with ``log_mix (..., S)``,
        ``loc (..., S, d)`` and ``scale_tril (..., S, d, d)``; ``base`` ``(..., d)`` is added to every mean.

        Raises
        ------
        DtypeError, DeviceError, ShapeError
            Naming ``inp`` (or ``base``) for another dtype or device than the network's, or a wrong last axis.
        NonFiniteError
            Naming ``inp`` / ``base`` for NaN or infinite entries, or the network (its ``name``) for
            non-finite outputs from finite inputs, saying which output.
        """
        p = self._parts(inp, base)
        if p.tril is not None:
            tril = p.tril
        else:
            tril = torch.diag_embed(p.diag.expand(p.loc.shape))
        return MixtureParams(p.log_mix, p.loc, tril)

    def mean(self, inp: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The mixture's mean ``sum_k w_k loc_k``, shape ``(..., d)``."""
        return _mixture_mean(self._parts(inp, base))

    def sample(self, inp: torch.Tensor, generator: torch.Generator, base: torch.Tensor | None = None) -> torch.Tensor:
        """One draw from the mixture at each ``inp`` ``(..., p)`` (broadcast with ``base`` ``(..., d)``):
        a component with ``generator``, then ``loc + L eps`` (reparameterised). Shape ``(..., d)``."""
        return _sample(self._parts(inp, base), generator)

    def log_prob(self, inp: torch.Tensor, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(x | inp)`` over the last axis, the leading dims of ``inp``, ``base`` and ``x`` broadcast.

        Raises
        ------
        ShapeError, NonFiniteError
            Naming ``x`` for a last axis other than ``d`` or non-finite entries (and as :meth:`forward`).
        """
        x = self._check_input(x, "x", self.out_features)
        return _log_prob(self._parts(inp, base), x)


def _renamed(build, names: dict):
    """``build()``, with an :class:`InputError` about the network's sizes renamed to the wrapper's argument."""
    try:
        return build()
    except InputError as exc:
        if exc.argument in names:
            raise type(exc)(names[exc.argument], exc.expected, exc.got, exc.hint) from None
        raise


def _mixture_mean(p: _Parts) -> torch.Tensor:
    if p.loc.shape[-2] == 1:
        return p.loc.squeeze(-2)
    return (p.log_mix.exp().unsqueeze(-1) * p.loc).sum(-2)


def _sample(p: _Parts, generator: torch.Generator) -> torch.Tensor:
    loc = p.loc
    lead, (s, d) = loc.shape[:-2], loc.shape[-2:]
    eps = torch.randn((*lead, d), generator=generator, dtype=loc.dtype, device=loc.device)
    if s == 1:
        k = None
    elif p.equal:
        k = torch.randint(0, s, tuple(lead), generator=generator, device=loc.device)
    else:
        probs = p.log_mix.detach().exp().expand(*lead, s).reshape(-1, s)
        k = torch.multinomial(probs, 1, replacement=True, generator=generator).reshape(lead)

    def pick(t: torch.Tensor, extra: int) -> torch.Tensor:
        # t (..., S, *rest) -> the chosen component (..., *rest); extra = len(rest)
        t = t.expand(*lead, *t.shape[-1 - extra:])
        if k is None:
            return t.squeeze(-1 - extra)
        idx = k.reshape(*lead, 1, *([1] * extra)).expand(*lead, 1, *t.shape[-extra:])
        return t.gather(-1 - extra, idx).squeeze(-1 - extra)

    mu = pick(loc, 1)
    if p.diag is not None:
        return mu + pick(p.diag, 1) * eps
    return mu + (pick(p.tril, 2) @ eps.unsqueeze(-1)).squeeze(-1)


def _log_prob(p: _Parts, x: torch.Tensor) -> torch.Tensor:
    d = p.loc.shape[-1]
    diff = x.unsqueeze(-2) - p.loc                                        # (..., S, d)
    if p.diag is not None:
        z = diff / p.diag
        log_det = torch.log(p.diag).sum(-1)
    else:
        tril = p.tril
        shape = torch.broadcast_shapes(tril.shape[:-2], diff.shape[:-1])
        z = torch.linalg.solve_triangular(tril.expand(*shape, d, d), diff.expand(*shape, d).unsqueeze(-1),
                                          upper=False).squeeze(-1)
        log_det = torch.log(torch.diagonal(tril, dim1=-2, dim2=-1)).sum(-1)
    comp = -0.5 * (z * z).sum(-1) - log_det - 0.5 * d * _LOG_2PI        # (..., S)
    out = torch.logsumexp(p.log_mix + comp, dim=-1)
    if not _transformed() and not bool(torch.isfinite(x).all()):
        raise NonFiniteError("x", "finite states", f"{int((~torch.isfinite(x)).sum())} NaN or infinite entries")
    return out


class MixtureTransition(nn.Module):
    """A learned transition ``p(x_k | x_{k-1})``: a Gaussian mixture from a :class:`GaussianMixtureNet`.

    A daml model (:mod:`daml.models.base`) with a non-Gaussian transition: ``noise_cov`` is ``None``,
    ``step(x)`` is the mixture's mean, ``sample_step(x, g)`` a reparameterised draw and
    ``log_transition(x_prev, x)`` the log density, so every filter that samples the model runs it
    (:func:`daml.models.base.transition_sample`); Kalman-type filters refuse it.

    Parameters
    ----------
    state_size : int
        ``n``.
    components, hidden, activation, covariance, weights, min_scale, init_scale, seed, dtype, device
        As :class:`GaussianMixtureNet` (input and output size ``n``).
    residual : bool
        Means ``x_{k-1} + net(x_{k-1})`` (default; starts near the identity map) rather than ``net(x_{k-1})``.
    dt : float
        Time per step (default 1).

    Raises
    ------
    InputError
        Naming ``state_size``, ``residual``, ``dt`` or any argument of :class:`GaussianMixtureNet`.

    Examples
    --------
    >>> import daml
    >>> model = MixtureTransition(3, components=2, seed=0)
    >>> data = daml.simulate(model, 10, daml.models.observe_all(3, sd=1.0), seed=1)
    """

    name = "mixture_transition"

    def __init__(self, state_size: int, components: int = 1, hidden: Sequence[int] = (32, 32),
                 activation: str = "tanh", covariance: str = "diagonal", weights: str = "equal",
                 residual: bool = True, dt: float = 1.0, min_scale: float = 1e-3, init_scale: float = 1.0,
                 seed: _device.Seed = None, dtype: Any = None, device: Any = None):
        super().__init__()
        self.state_size = check_int(state_size, "state_size", expected="a positive int")
        if not isinstance(residual, bool):
            raise InputError("residual", "True or False", repr(residual))
        self.residual = residual
        self.dt = check_real(dt, "dt", positive=True, expected="a positive time step")
        self.noise_cov = None
        self.net = _renamed(lambda: GaussianMixtureNet(
            self.state_size, self.state_size, components, hidden, activation, covariance, weights, min_scale,
            init_scale, seed, dtype, device, name="transition"),
            {"in_features": "state_size", "out_features": "state_size"})

    def _parts(self, x: torch.Tensor, name: str) -> tuple[_Parts, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            from .base import as_real_tensor
            x = as_real_tensor(x, name, dtype=self.net.dtype, device=self.net.device)
        if x.ndim == 0 or x.shape[-1] != self.state_size:
            raise ShapeError(name, f"a last axis of length {self.state_size} (the state size)",
                             f"shape {tuple(x.shape)}")
        xin = x.to(device=self.net.device, dtype=self.net.dtype)
        return self.net._parts(xin, xin if self.residual else None, inp_name=name, base_name=name), x

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The transition's mean from every state of ``x`` ``(..., n)`` (in ``x``'s dtype)."""
        p, x = self._parts(x, "x")
        return _mixture_mean(p).to(x.dtype)

    def sample_step(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One reparameterised draw of ``p(. | x)`` from every state of ``x`` ``(..., n)``."""
        p, x = self._parts(x, "x")
        return _sample(p, generator).to(x.dtype)

    def log_transition(self, x_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log p(x | x_prev)``, the leading dims of ``x_prev`` and ``x`` broadcast against each other."""
        p, x_prev = self._parts(x_prev, "x_prev")
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[-1] != self.state_size:
            raise ShapeError("x", f"a tensor with a last axis of length {self.state_size} (the state size)",
                             f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        return _log_prob(p, x.to(device=self.net.device, dtype=self.net.dtype)).to(x_prev.dtype)

    def config(self) -> dict:
        """The constructor arguments (JSON-able; the trained weights are in ``state_dict()``, not here),
        and ``file`` for a network read with :meth:`from_file` (then ``make_model("mixture_transition",
        **config)`` reads the same file again)."""
        n = self.net
        cfg = {"state_size": self.state_size, "components": n.components, "hidden": list(n.hidden),
               "activation": n.activation, "covariance": n.covariance, "weights": n.weights,
               "residual": self.residual, "dt": self.dt, "min_scale": n.min_scale, "init_scale": n.init_scale,
               "seed": n.seed}
        source = getattr(self, "source", None)
        if source is not None:
            cfg["file"] = source
            cfg.pop("seed")
        return cfg

    @classmethod
    def from_file(cls, file: Any, **expected: Any) -> "MixtureTransition":
        """A trained transition written by :func:`daml.io.save_network`: ``make_model("mixture_transition",
        file="transition.pt")`` in Python or ``[model] name = "mixture_transition", file = "..."`` in an
        experiment file (a path relative to the working directory).

        ``expected`` may repeat constructor arguments (as ``config()`` does); each must equal the file's,
        else an :class:`~daml.errors.InputError` names it. ``dtype`` and ``device`` say where to put it.
        """
        from ..io import load_network

        dtype, device = expected.pop("dtype", None), expected.pop("device", None)
        expected.pop("seed", None)
        model = load_network(file, "MixtureTransition", dtype=dtype, device=device)
        cfg = model.config()
        for key, value in expected.items():
            if key not in cfg:
                raise InputError(key, f"one of the transition's arguments {sorted(cfg)}", repr(value))
            if (list(value) if isinstance(value, tuple) else value) != cfg[key]:
                raise InputError(key, f"{cfg[key]!r} (the value in {file})", repr(value))
        return model
