"""Training M members of one torch module in a single vectorised pass.

Every member starts from its own draw of a Gaussian prior over the parameters, ``w0_i ~ N(0, Σ_p)``
with ``Σ_p`` diagonal (per tensor: ``prior_scale² / fan_in`` for weight matrices, ``bias_scale²`` for
vectors), and is trained by Adam on its own minibatch order. Three switches give the ensembles of the
literature:

* ``anchor=True`` adds ``½ (w - w0_i)ᵀ Σ_p⁻¹ (w - w0_i)`` to the loss (anchored ensembles, Pearce et
  al. 2020; the prior term of randomised maximum likelihood);
* ``perturb_targets=True`` trains member ``i`` on ``y + ε_i`` with ``ε_i ~ N(0, σ² I)``: together with
  the anchor this is randomised maximum likelihood (RML; Oliver et al. 1996), exact posterior sampling
  for a model linear in its parameters;
* ``likelihood="heteroscedastic"`` reads a mean and a variance from a two-column output and minimises
  the Gaussian negative log-likelihood (the deep ensembles of Lakshminarayanan et al. 2017).

The member loss, per datum, is ``mean_batch[½ (ỹ - f(x; w))² / σ²] + ½ (w - w0)ᵀ Σ_p⁻¹ (w - w0) / N``
with ``N`` the size of the training set, so that a full pass is the RML cost divided by ``N``.

All members are trained at once: their parameters are stacked along a leading axis and the module is
called through :func:`torch.func.functional_call` inside :func:`torch.func.vmap`, so one step costs a
few batched kernels instead of M small ones. Adam acts elementwise, so the stacked optimisation is the
same arithmetic as M separate ones; ``vectorize=False`` runs exactly that loop (the reference for the
equivalence test and for the speed benchmark).
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from .. import _device
from ..errors import InputError, ModuleError, NonFiniteError, ShapeError, check_int, check_real

LIKELIHOODS = ("gaussian", "heteroscedastic")


class Ensemble(NamedTuple):
    """A trained ensemble of one module (parameters stacked along a leading member axis).

    All tensors live in normalised units: inputs ``(x - x_mean) / x_sd``, targets ``(y - y_mean) / y_sd``.
    """

    module: nn.Module
    """The architecture; its own parameters are not used (the stacked ``params`` are)."""
    params: dict[str, torch.Tensor]
    """Trained parameters, each of shape ``(M, *shape)``."""
    buffers: dict[str, torch.Tensor]
    """Stacked buffers, ``(M, *shape)`` (empty for plain MLPs)."""
    prior_sd: dict[str, torch.Tensor]
    """Prior standard deviation of every parameter entry (same shapes as one member's parameters)."""
    prior_draw: dict[str, torch.Tensor]
    """The prior draws the members started from, ``(M, *shape)``."""
    log_weight: torch.Tensor
    """Normalised member log-weights ``(M,)`` (``-log M`` until :func:`~daml.ensembles.weigh`)."""
    noise_sd: float
    """Observation-noise standard deviation of the Gaussian likelihood, normalised units (``nan`` for
    the heteroscedastic likelihood, whose variance comes from the network)."""
    likelihood: str
    x_mean: torch.Tensor
    x_sd: torch.Tensor
    y_mean: torch.Tensor
    y_sd: torch.Tensor
    history: torch.Tensor
    """Mean training loss per member and epoch, ``(M, epochs)``."""
    config: dict[str, Any]
    """How the ensemble was built (JSON-serialisable)."""

    @property
    def members(self) -> int:
        return int(self.log_weight.shape[0])

    def normalise_x(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_sd

    def replace(self, **kw: Any) -> "Ensemble":
        return self._replace(**kw)


# ---------------------------------------------------------------------------------------------------
# input checks


def check_data(x: Any, y: Any, *, dtype: Any = None, device: Any = None, x_name: str = "x",
               y_name: str = "y") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs as ``(n, d)`` and targets as ``(n,)`` tensors, checked for shape and finiteness."""
    xt = _device.as_tensor(x, x_name, dtype=dtype, device=device)
    yt = _device.as_tensor(y, y_name, dtype=xt.dtype, device=xt.device)
    if xt.ndim == 1:
        xt = xt.unsqueeze(-1)
    if xt.ndim != 2:
        raise ShapeError(x_name, "inputs of shape (n, d) or (n,)", f"shape {tuple(xt.shape)}")
    if yt.ndim == 2 and yt.shape[1] == 1:
        yt = yt[:, 0]
    if yt.ndim != 1:
        raise ShapeError(y_name, "targets of shape (n,) or (n, 1)", f"shape {tuple(yt.shape)}")
    if yt.shape[0] != xt.shape[0]:
        raise ShapeError(y_name, f"{xt.shape[0]} targets, one per row of {x_name}", f"{yt.shape[0]} targets")
    if xt.shape[0] < 2:
        raise ShapeError(x_name, "at least 2 rows", f"{xt.shape[0]}")
    for name, t in ((x_name, xt), (y_name, yt)):
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(name, "finite values", f"{bad} NaN or infinite entries")
    return xt, yt


def _check_module(module: Any) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise ModuleError("module", "a torch.nn.Module", type(module).__name__)
    if not any(True for _ in module.parameters()):
        raise ModuleError("module", "a module with trainable parameters", "a module without parameters")
    return module


def _probe_vmap(module: nn.Module, params: dict, buffers: dict, x: torch.Tensor, members: int) -> None:
    """Fail early, with a named error, when the module cannot be called under ``vmap``."""
    def call(p, b, xb):
        return functional_call(module, (p, b), (xb,))
    xb = x[:2].unsqueeze(0).expand(members, *x[:2].shape)
    try:
        with torch.no_grad(), _device.scoped_global_stream(0, x.device):
            vmap(call, randomness="different")(params, buffers, xb)
    except Exception as exc:  # torch raises several types here (RuntimeError, ValueError)
        names = sorted(buffers)
        raise ModuleError("module", "a module that torch.func.vmap can batch (no in-place buffer updates "
                          "such as BatchNorm running statistics)",
                          f"{type(module).__name__} with buffers {names}" if names else type(module).__name__,
                          hint=f"vmap failed with: {str(exc).splitlines()[0][:200]}") from exc


def mlp(inputs: int, hidden: int | Sequence[int] = 50, outputs: int = 1, activation: str = "relu",
        dropout: float = 0.0) -> nn.Sequential:
    """A fully connected network ``inputs -> hidden... -> outputs`` (``hidden=()`` gives a linear model).

    ``dropout`` > 0 puts a dropout layer before every linear layer after the first (the MC-dropout
    architecture of Gal & Ghahramani 2016 on the UCI benchmark).
    """
    inputs = check_int(inputs, "inputs")
    outputs = check_int(outputs, "outputs")
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}
    if activation not in acts:
        raise InputError("activation", f"one of {sorted(acts)}", repr(activation))
    dropout = check_real(dropout, "dropout")
    if not 0.0 <= dropout < 1.0:
        raise InputError("dropout", "a probability in [0, 1)", dropout)
    layers: list[nn.Module] = []
    width = inputs
    for h in widths:
        h = check_int(h, "hidden")
        if dropout > 0 and layers:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(width, h), acts[activation]()]
        width = h
    if dropout > 0 and layers:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------
# priors


def prior_sd(module: nn.Module, prior_scale: float = 1.0, bias_scale: float = 1.0,
             dtype: torch.dtype = torch.float64, device: Any = None) -> dict[str, torch.Tensor]:
    """Prior standard deviations per parameter entry: ``prior_scale / sqrt(fan_in)`` for tensors with
    two or more axes (fan-in = product of all but the first axis), ``bias_scale`` for vectors."""
    out = {}
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = int(np.prod(p.shape[1:]))
            s = prior_scale / math.sqrt(fan_in)
        else:
            s = bias_scale
        out[name] = torch.full(p.shape, s, dtype=dtype, device=device)
    return out


def _draw_prior(sd: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s.shape, generator=g, dtype=s.dtype, device=s.device) * s for k, s in sd.items()}


# ---------------------------------------------------------------------------------------------------
# the loss of one member


def heteroscedastic_variance(raw: torch.Tensor) -> torch.Tensor:
    """The variance ``softplus(s) + 1e-6`` read from the raw second output ``s`` of a heteroscedastic
    member (its derivative in ``s`` is ``sigmoid(s)``)."""
    return torch.nn.functional.softplus(raw) + 1e-6


def member_output(module: nn.Module, params: dict, buffers: dict, x: torch.Tensor, likelihood: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean ``(n,)`` and (heteroscedastic only) variance ``(n,)`` of one member at inputs ``(n, d)``."""
    out = functional_call(module, (params, buffers), (x,))
    if likelihood == "heteroscedastic":
        return out[..., 0], heteroscedastic_variance(out[..., 1])
    return out.reshape(out.shape[:-1]) if out.ndim == x.ndim else out, None


def _member_loss(module, likelihood, noise_var, n_total, anchor, params, buffers, w0, prec, xb, yb):
    mean, var = member_output(module, params, buffers, xb, likelihood)
    if likelihood == "heteroscedastic":
        data = 0.5 * (torch.log(var) + (yb - mean) ** 2 / var).mean()
    else:
        data = 0.5 * ((yb - mean) ** 2).mean() / noise_var
    if anchor:
        reg = sum((0.5 * (params[k] - w0[k]) ** 2 * prec[k]).sum() for k in params)
        data = data + reg / n_total
    return data


# ---------------------------------------------------------------------------------------------------
# training


def _resolve_noise(noise_sd: Any, likelihood: str, y_sd: float) -> float:
    if likelihood == "heteroscedastic":
        return float("nan")
    if noise_sd is None:
        raise InputError("noise_sd", "the observation-noise standard deviation (in the units of y) for "
                         "likelihood='gaussian'", None)
    return check_real(noise_sd, "noise_sd", positive=True) / y_sd


def fit(
    module: nn.Module,
    x: Any,
    y: Any,
    *,
    members: int = 5,
    noise_sd: float | None = None,
    likelihood: str = "gaussian",
    anchor: bool = True,
    perturb_targets: bool = True,
    common_prior_draw: bool = False,
    prior_scale: float = 1.0,
    bias_scale: float = 1.0,
    epochs: int = 40,
    batch_size: int = 32,
    lr: float = 1e-2,
    normalise: bool = True,
    vectorize: bool = True,
    seed: _device.Seed = None,
    device: Any = None,
    dtype: Any = None,
    progress: bool | None = None,
) -> Ensemble:
    """Train ``members`` copies of ``module`` from prior draws, all at once.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture, mapping ``(n, d)`` inputs to ``(n, 1)`` outputs (``(n, 2)``: mean and raw
        variance, for ``likelihood="heteroscedastic"``). Its own parameter values are ignored.
    x : array-like, shape (n, d) or (n,)
        Training inputs.
    y : array-like, shape (n,) or (n, 1)
        Training targets.
    members : int
        Ensemble size ``M >= 1``.
    noise_sd : float
        Standard deviation of the Gaussian observation noise, in the units of ``y`` (required for the
        Gaussian likelihood; see :func:`~daml.ensembles.estimate_noise` to estimate it).
    likelihood : {"gaussian", "heteroscedastic"}
    anchor : bool
        Regularise each member towards its prior draw (the RML prior term).
    perturb_targets : bool
        Train member ``i`` on ``y + ε_i``, ``ε_i ~ N(0, noise_sd²)`` (RML; the training-data source of
        uncertainty). Needs the Gaussian likelihood.
    common_prior_draw : bool
        Start (and anchor) every member at the same prior draw, so that only the target perturbations
        differ: the ensemble then carries the training-data uncertainty alone.
    prior_scale, bias_scale : float
        Prior standard deviations (see :func:`prior_sd`), in normalised units.
    epochs, batch_size, lr : int, int, float
        Adam optimisation settings; every member sees every training pair once per epoch.
    normalise : bool
        Standardise inputs and targets with the training mean and standard deviation.
    vectorize : bool
        Train all members in one vmapped pass (default) or one after the other (same arithmetic).
    seed : int, SeedSequence, torch.Generator or None
        Member ``i`` draws its prior sample, its target perturbation and its minibatch order from the
        ``i``-th spawned stream, so a member does not depend on ``members`` or ``vectorize``.
    device, dtype : optional
        Resolved by :mod:`daml._device` (float64 on the CPU by default).
    progress : bool, optional
        Show a progress bar over epochs (default: only on a terminal).

    Returns
    -------
    Ensemble
        With equal log-weights; :func:`~daml.ensembles.weigh` gives the importance weights.
    """
    module = _check_module(module)
    members = check_int(members, "members")
    if likelihood not in LIKELIHOODS:
        raise InputError("likelihood", f"one of {LIKELIHOODS}", repr(likelihood))
    if perturb_targets and likelihood != "gaussian":
        raise InputError("perturb_targets", "False with the heteroscedastic likelihood (target "
                         "perturbations need a known noise level)", perturb_targets)
    epochs = check_int(epochs, "epochs")
    batch_size = check_int(batch_size, "batch_size")
    lr = check_real(lr, "lr", positive=True)
    prior_scale = check_real(prior_scale, "prior_scale", positive=True)
    bias_scale = check_real(bias_scale, "bias_scale", positive=True)
    dev = _device.resolve_device(device)
    dt = _device.resolve_dtype(dtype, dev)
    xt, yt = check_data(x, y, dtype=dt, device=dev)
    n = xt.shape[0]
    if normalise:
        x_mean, x_sd = xt.mean(0), xt.std(0)
        x_sd = torch.where(x_sd > 0, x_sd, torch.ones_like(x_sd))
        y_mean, y_sd = yt.mean(), yt.std()
        if not y_sd > 0:
            raise InputError("y", "targets that are not all equal", "constant targets")
    else:
        x_mean, x_sd = torch.zeros_like(xt[0]), torch.ones_like(xt[0])
        y_mean, y_sd = torch.zeros((), dtype=dt, device=dev), torch.ones((), dtype=dt, device=dev)
    xn, yn = (xt - x_mean) / x_sd, (yt - y_mean) / y_sd
    noise = _resolve_noise(noise_sd, likelihood, float(y_sd))

    template = copy.deepcopy(module).to(device=dev, dtype=dt)
    template.train()
    sd = prior_sd(template, prior_scale, bias_scale, dt, dev)
    prec = {k: 1.0 / s**2 for k, s in sd.items()}
    root = _device.seed_sequence(seed)
    gens = [_device.generator(child, dev) for child in root.spawn(members)]
    rng_seed = int(root.generate_state(1, dtype=np.uint32)[0])   # the stream of dropout layers
    draws, targets, orders = [], [], []
    for g in gens:
        w0 = _draw_prior(sd, g)
        if common_prior_draw and draws:
            w0 = draws[0]
        draws.append(w0)
        eps = torch.randn(n, generator=g, dtype=dt, device=dev) * noise if perturb_targets else None
        targets.append(yn + eps if eps is not None else yn)
        orders.append(torch.stack([torch.randperm(n, generator=g, device=dev) for _ in range(epochs)]))
    w0_stack = {k: torch.stack([d[k] for d in draws]) for k in sd}
    y_stack = torch.stack(targets)                                  # (M, n)
    order = torch.stack(orders)                                     # (M, epochs, n)
    buffers = {k: b.unsqueeze(0).expand(members, *b.shape).clone() for k, b in template.named_buffers()}
    _probe_vmap(template, {k: v.clone() for k, v in w0_stack.items()}, {k: v.clone() for k, v in buffers.items()},
                xn, members)

    config = dict(members=members, noise_sd=None if likelihood != "gaussian" else float(noise * y_sd),
                  likelihood=likelihood, anchor=bool(anchor), perturb_targets=bool(perturb_targets),
                  common_prior_draw=bool(common_prior_draw), prior_scale=prior_scale, bias_scale=bias_scale,
                  epochs=epochs, batch_size=batch_size, lr=lr, normalise=bool(normalise),
                  module=type(module).__name__, seed=_device.seed_to_attr(seed))
    loss_args = (template, likelihood, noise**2 if likelihood == "gaussian" else 1.0, float(n), bool(anchor))
    if vectorize:
        params, history = _train_vmapped(loss_args, w0_stack, buffers, prec, xn, y_stack, order, batch_size,
                                         lr, epochs, rng_seed, dev, progress)
    else:
        outs = []
        for i in range(members):
            p_i, h_i = _train_one(loss_args, {k: v[i] for k, v in w0_stack.items()},
                                  {k: v[i] for k, v in buffers.items()}, prec, xn, y_stack[i], order[i],
                                  batch_size, lr, epochs, rng_seed + i, i, dev, progress)
            outs.append((p_i, h_i))
        params = {k: torch.stack([o[0][k] for o in outs]) for k in w0_stack}
        history = torch.stack([o[1] for o in outs])
    if not all(torch.isfinite(v).all() for v in params.values()):
        raise NonFiniteError("lr", "a learning rate at which training stays finite", lr,
                             hint="training produced NaN or infinite parameters; lower lr")
    return Ensemble(module=template, params=params, buffers=buffers, prior_sd=sd, prior_draw=w0_stack,
                    log_weight=torch.full((members,), -math.log(members), dtype=dt, device=dev),
                    noise_sd=noise, likelihood=likelihood, x_mean=x_mean, x_sd=x_sd, y_mean=y_mean, y_sd=y_sd,
                    history=history, config=config)


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _train_vmapped(loss_args, w0, buffers, prec, x, y_stack, order, batch_size, lr, epochs, rng_seed, dev, progress):
    from tqdm.auto import tqdm

    members = y_stack.shape[0]
    params = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)

    def loss_one(p, b, w0_i, xb, yb):
        return _member_loss(*loss_args, p, b, w0_i, prec, xb, yb)

    batched = vmap(loss_one, randomness="different")
    history = torch.zeros(members, epochs, dtype=x.dtype, device=dev)
    n = x.shape[0]
    with _device.scoped_global_stream(rng_seed, dev):
        for e in tqdm(range(epochs), desc="ensemble", disable=(None if progress is None else not progress),
                      leave=False):
            for s, t in _batches(n, batch_size):
                idx = order[:, e, s:t]                                  # (M, B)
                xb = x[idx]                                             # (M, B, d)
                yb = torch.gather(y_stack, 1, idx)                      # (M, B)
                opt.zero_grad(set_to_none=True)
                losses = batched(params, buffers, w0, xb, yb)           # (M,)
                losses.sum().backward()
                opt.step()
                history[:, e] += losses.detach() * (t - s) / n
    return {k: v.detach() for k, v in params.items()}, history


def _train_one(loss_args, w0, buffers, prec, x, y, order, batch_size, lr, epochs, rng_seed, index, dev, progress):
    from tqdm.auto import tqdm

    params = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    history = torch.zeros(epochs, dtype=x.dtype, device=dev)
    n = x.shape[0]
    with _device.scoped_global_stream(rng_seed, dev):
        for e in tqdm(range(epochs), desc=f"member {index}", disable=(None if progress is None else not progress),
                      leave=False):
            for s, t in _batches(n, batch_size):
                idx = order[e, s:t]
                opt.zero_grad(set_to_none=True)
                loss = _member_loss(*loss_args, params, buffers, w0, prec, x[idx], y[idx])
                loss.backward()
                opt.step()
                history[e] += loss.detach() * (t - s) / n
    return {k: v.detach() for k, v in params.items()}, history


# ---------------------------------------------------------------------------------------------------
# evaluating members


def forward(ens: Ensemble, x: Any, *, normalised_input: bool = False, dropout: bool = False,
            seed: _device.Seed = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Member means ``(M, n)`` and (heteroscedastic) variances ``(M, n)`` in normalised target units.

    ``dropout=True`` keeps dropout layers active (one MC-dropout pass per call, seeded).
    """
    xt = _device.as_tensor(x, "x", dtype=ens.x_mean.dtype, device=ens.x_mean.device)
    if xt.ndim == 1:
        xt = xt.unsqueeze(-1)
    if xt.ndim != 2 or xt.shape[1] != ens.x_mean.shape[0]:
        raise ShapeError("x", f"inputs of shape (n, {ens.x_mean.shape[0]})", f"shape {tuple(xt.shape)}")
    if not torch.isfinite(xt).all():
        raise NonFiniteError("x", "finite inputs", f"{int((~torch.isfinite(xt)).sum())} NaN or infinite entries")
    xn = xt if normalised_input else ens.normalise_x(xt)
    module = ens.module
    module.train(dropout)

    def one(p, b):
        mean, var = member_output(module, p, b, xn, ens.likelihood)
        return mean, (var if var is not None else torch.zeros_like(mean))

    try:
        with torch.no_grad(), _device.scoped_global_stream(seed, xn.device):
            mean, var = vmap(one, randomness="different")(ens.params, ens.buffers)
    finally:
        module.train(True)
    return mean, (var if ens.likelihood == "heteroscedastic" else None)


def flat_params(ens: Ensemble) -> torch.Tensor:
    """Member parameters flattened to ``(M, P)`` in ``named_parameters`` order."""
    return torch.cat([v.reshape(v.shape[0], -1) for v in ens.params.values()], dim=1)


def unflatten(ens: Ensemble, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flat_params` for one member, ``(P,)`` -> parameter dict."""
    out, i = {}, 0
    for k, v in ens.params.items():
        size = int(np.prod(v.shape[1:]))
        out[k] = theta[..., i:i + size].reshape(*theta.shape[:-1], *v.shape[1:])
        i += size
    return out
