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

Each member is trained to its minimum, not for a fixed number of epochs: Adam with a step size of its
own (halved when the full-data objective stops decreasing), then Levenberg-Marquardt steps on the exact
full-data cost, until the scaled gradient norm is below ``tol`` or a cap is reached. The weights of
:mod:`~daml.ensembles.weights` assume minimised members, so the gradient norm, the last relative
improvement and a ``converged`` flag are kept per member (``Ensemble.convergence``), and members that
stopped short are named in a :class:`~daml.errors.ConvergenceWarning`. ``prior=`` replaces the diagonal
prior by a full-covariance Gaussian or any ``torch.distributions`` prior (docs/ensembles.md).

All members are trained at once: their parameters are stacked along a leading axis and the module is
called through :func:`torch.func.functional_call` inside :func:`torch.func.vmap`, so one step costs a
few batched kernels instead of M small ones. Adam acts elementwise, so the stacked optimisation is the
same arithmetic as M separate ones; ``vectorize=False`` runs exactly that loop (the reference for the
equivalence test and for the speed benchmark).

Member blocks (issue 31). :func:`fit_block` trains members ``first .. first+count-1`` of an ``M``-member
fit, for example on the workers of a Dask cluster, and :func:`gather` concatenates the blocks into the
ensemble of ``fit(..., members=M)``, bit for bit on the same CPU build. Three things made a member's
numbers depend on the other members of its pass, and are handled here: a dense prior precision was
applied by one matrix product over the member axis (MKL rounds a row with the number of rows; it is now
products over fixed groups of 8 members, aligned as below); torch computes a pass of a single member with
other kernels than a pass of several; and MKL's kernels round a member differently at another memory
alignment (member ``i`` of a stacked tensor starts ``i * K`` elements in). A block therefore trains
behind ``first % 8`` (float64; 64 bytes) copies of its first member, plus one beside a lone member,
whose numbers are dropped: blocks that start at multiples of 8 members and hold two or more cost nothing
extra. Every member keeps its own Adam step size, stopping rule and Levenberg-Marquardt damping, the
minibatch orders come from the members' own streams, and the data chunks of the polish are sized by
``M``. Dropout layers draw a vmapped pass's masks from one stream, so a partial block of a dropout
module needs ``vectorize=False`` (member ``i`` then has the stream ``rng_seed + i``). Intra-op threads:
on one thread blocks equal the fit for every network tried (up to 67 000 parameters); on several, MKL
and torch split a product or a sum by its shape, so a block of a large network (67 000 parameters, 4
threads) came out different from the fit even at aligned offsets, while small networks (385
parameters, 2 threads) still agreed. The thread count also changes the fit itself (the polish of that
small network differed between one and two threads). For bitwise blocks, run them and the reference
fit on one thread (``threads=1``; :func:`fit` already picks one thread for small networks,
:func:`fit_threads`). Different CPUs (instruction sets, MKL builds) round differently: blocks equal
the fit when they run on the same kind of machine.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .. import _device
from ..errors import (ConvergenceWarning, DtypeError, InputError, ModuleError, NonFiniteError, SeedError, ShapeError,
                      check_fits, check_int, check_real)

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
    """Mean training loss per member and epoch, ``(M, epochs run)``; ``nan`` after a member stopped."""
    config: dict[str, Any]
    """How the ensemble was built (JSON-serialisable)."""
    convergence: dict[str, torch.Tensor] | None = None
    """Per-member convergence of the training, each ``(M,)``: ``grad_norm`` (norm of the gradient of the
    member's own full-data objective per datum, normalised units, at the end), ``scaled_grad_norm``
    (the same times ``sd_noise · sqrt(N)``: the distance to the minimum in posterior standard deviations
    for a well-determined model; the quantity ``tol`` bounds), ``rel_improvement`` (relative decrease of
    that objective over the last epoch), ``epochs`` (epochs run) and ``converged`` (bool). ``None`` for
    ensembles not built by :func:`fit`."""
    prior: "Prior | None" = None
    """The prior over the flat parameters (normalised units) when one was given to :func:`fit`;
    ``None``: the diagonal Gaussian of ``prior_sd``."""

    @property
    def members(self) -> int:
        return int(self.log_weight.shape[0])

    def normalise_x(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_sd

    def replace(self, **kw: Any) -> "Ensemble":
        return self._replace(**kw)


# ---------------------------------------------------------------------------------------------------
# input checks


def as_numeric(x: Any, name: str, *, dtype: Any = None, device: Any = None) -> torch.Tensor:
    """:func:`daml._device.as_tensor` with the inputs that numpy or torch would refuse with their own
    errors (strings, dates, ragged nested lists, None) turned into daml errors naming ``name``."""
    if x is None:
        raise DtypeError(name, "a numeric array", "None")
    if not isinstance(x, torch.Tensor) and not (hasattr(x, "variable") and hasattr(x, "dims")):
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise ShapeError(name, "a rectangular numeric array", f"{type(x).__name__} that numpy cannot stack "
                             f"({str(exc).splitlines()[0][:120]})") from None
        if arr.dtype.kind not in "biufc" and arr.dtype != object:
            raise DtypeError(name, "a numeric array", f"an array of dtype {arr.dtype}")
    return _device.as_tensor(x, name, dtype=dtype, device=device)


def check_data(x: Any, y: Any, *, dtype: Any = None, device: Any = None, x_name: str = "x",
               y_name: str = "y") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs as ``(n, d)`` and targets as ``(n,)`` tensors, checked for shape and finiteness."""
    xt = as_numeric(x, x_name, dtype=dtype, device=device)
    yt = as_numeric(y, y_name, dtype=xt.dtype, device=xt.device)
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


def _check_module(module: Any, name: str = "module") -> nn.Module:
    if isinstance(module, type):
        raise ModuleError(name, "a torch.nn.Module instance", f"the class {module.__name__}",
                          hint=f"pass an instance, e.g. {module.__name__}(...) or daml.ensembles.mlp(...)")
    if not isinstance(module, nn.Module):
        raise ModuleError(name, "a torch.nn.Module", type(module).__name__)
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


def check_ensemble(ens: Any, name: str = "ens") -> "Ensemble":
    """``ens`` if it is an :class:`Ensemble`, else an :class:`~daml.errors.InputError` naming ``name``."""
    if not isinstance(ens, Ensemble):
        raise InputError(name, "a daml.ensembles.Ensemble (from fit, deep_ensemble or mc_dropout)",
                         f"the class {ens.__name__}" if isinstance(ens, type) else type(ens).__name__)
    return ens


DEFAULT_ACTIVATION = "tanh"
"""Default activation of :func:`mlp`, :func:`~daml.ensembles.deep_ensemble` and
:func:`~daml.ensembles.mc_dropout`: smooth, so that a member's cost has a stationary point that
:func:`fit` can reach to its tolerance (``"relu"`` until issue 26; ReLU members stall at kinks)."""


def mlp(inputs: int, hidden: int | Sequence[int] = 50, outputs: int = 1, activation: str = DEFAULT_ACTIVATION,
        dropout: float = 0.0) -> nn.Sequential:
    """A fully connected network ``inputs -> hidden... -> outputs`` (``hidden=()`` gives a linear model).

    Parameters
    ----------
    inputs, outputs : int
        Input and output widths.
    hidden : int or sequence of int
        Hidden layer widths (``()``: no hidden layer, a model linear in its parameters).
    activation : {"tanh", "silu", "gelu", "relu"}
        Hidden-layer activation. The default ``"tanh"`` is smooth: :func:`fit` trains each member to a
        stationary point of its cost, which the member weights assume. ``"relu"`` stays available, but a
        ReLU member whose minimum lies on a kink (a data point on a unit's boundary) keeps a gradient
        that does not vanish, so :func:`fit` reports it unconverged with a
        :class:`~daml.errors.ConvergenceWarning` (docs/ensembles.md).
    dropout : float
        A rate > 0 puts a dropout layer before every linear layer after the first (the MC-dropout
        architecture of Gal & Ghahramani 2016 on the UCI benchmark).
    """
    import numbers

    inputs = check_int(inputs, "inputs")
    outputs = check_int(outputs, "outputs")
    hidden_expected = "an int >= 1 or a sequence of ints >= 1 (layer widths; () for a linear model)"
    if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
        widths = [hidden]
    elif isinstance(hidden, (str, bytes)) or not isinstance(hidden, (Sequence, np.ndarray, torch.Tensor)):
        raise InputError("hidden", hidden_expected, repr(hidden))
    else:
        widths = list(hidden)
    widths = [check_int(h, "hidden", expected=hidden_expected) for h in widths]
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}
    if activation not in acts:
        raise InputError("activation", f"one of {sorted(acts)}", repr(activation))
    dropout = check_real(dropout, "dropout")
    if not 0.0 <= dropout < 1.0:
        raise InputError("dropout", "a probability in [0, 1)", dropout)
    # refuse up front widths whose weight matrices cannot fit (each layer blamed on its wider side)
    names = ["inputs", *(["hidden"] * len(widths)), "outputs"]
    sizes = [inputs, *widths, outputs]
    item = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    for (a, wa), (b, wb) in zip(zip(names, sizes), zip(names[1:], sizes[1:])):
        check_fits(a if wa >= wb else b, 1.0 * (wa + 1) * wb * item,
                   what=f"{a}={wa}, {b}={wb} (a {wa} x {wb} weight matrix)")
    check_fits("hidden" if widths else "inputs", 1.0 * item * sum((wa + 1) * wb for wa, wb in zip(sizes, sizes[1:])),
               what=f"layer widths {sizes}")
    layers: list[nn.Module] = []
    width = inputs
    for h in widths:
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
    module = _check_module(module)
    prior_scale = check_real(prior_scale, "prior_scale", positive=True)
    bias_scale = check_real(bias_scale, "bias_scale", positive=True)
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


class Prior(NamedTuple):
    """A prior over the flat parameter vector ``(P,)`` of one member (normalised units).

    ``kind`` is ``"gaussian"`` (``N(mean, cov)`` exactly: a ``MultivariateNormal``, a
    ``LowRankMultivariateNormal`` or independent ``Normal`` entries) or ``"distribution"`` (any other
    ``torch.distributions`` prior; ``mean`` and ``cov`` are then those of its Gaussian surrogate, used
    for the anchor and the curvature, while ``dist.log_prob`` is the prior density of the weights).
    """

    kind: str
    mean: torch.Tensor           # (P,)
    cov: torch.Tensor            # (P, P)
    chol: torch.Tensor           # (P, P) lower Cholesky factor of cov
    precision: torch.Tensor      # (P, P)
    dist: Any = None             # the torch distribution (kind "distribution"), else None
    dist_dtype: Any = None       # the dtype its log_prob expects

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """Prior log-density of flat parameters ``(..., P)``; works under ``vmap`` and ``grad``."""
        if self.dist is None:
            d = theta - self.mean
            z = torch.linalg.solve_triangular(self.chol, d.unsqueeze(-1), upper=False).squeeze(-1)
            logdet = 2 * torch.log(torch.diagonal(self.chol)).sum()
            return -0.5 * (z**2).sum(-1) - 0.5 * logdet - 0.5 * d.shape[-1] * math.log(2 * math.pi)
        return self.dist.log_prob(theta.to(self.dist_dtype)).to(self.mean.dtype)


def _as_prior(prior: Any, n_params: int, dtype: torch.dtype, device: torch.device, seed: Any) -> Prior:
    """Check ``prior`` (a ``torch.distributions.Distribution`` over ``P`` parameters) and build a :class:`Prior`."""
    from torch.distributions import (Distribution, Independent, LowRankMultivariateNormal, MultivariateNormal,
                                     Normal, constraints)

    expected = (f"a torch.distributions.Distribution over the {n_params} flat parameters of the module "
                f"(event shape ({n_params},), or batch shape ({n_params},) of scalar distributions), with "
                "log_prob and rsample, on the real line")
    if isinstance(prior, type):
        raise InputError("prior", expected, f"the class {prior.__name__} (pass an instance)")
    if not isinstance(prior, Distribution):
        raise InputError("prior", expected, type(prior).__name__)
    shape = tuple(prior.batch_shape) + tuple(prior.event_shape)
    if shape != (n_params,):
        raise ShapeError("prior", expected, f"batch shape {tuple(prior.batch_shape)}, event shape "
                         f"{tuple(prior.event_shape)}")
    support = prior.support
    base = support.base_constraint if isinstance(support, constraints.independent) else support
    if not isinstance(base, type(constraints.real)):
        raise InputError("prior", expected, f"support {support}")
    if len(prior.event_shape) == 0:
        prior = Independent(prior, 1)
    try:
        mean = prior.mean.detach().to(device=device, dtype=dtype).reshape(-1)
    except NotImplementedError:
        mean = None
    if isinstance(prior, (MultivariateNormal, LowRankMultivariateNormal)) or (
            isinstance(prior, Independent) and isinstance(prior.base_dist, Normal)):
        cov = (prior.covariance_matrix if not isinstance(prior, Independent)
               else torch.diag(prior.base_dist.scale.reshape(-1) ** 2)).detach().to(device=device, dtype=dtype)
        kind, dist = "gaussian", None
    else:
        kind, dist = "distribution", copy.copy(prior)
        dist._validate_args = False                        # data-dependent checks cannot run under vmap
        try:
            cov = getattr(prior, "covariance_matrix", None)
            cov = torch.diag(prior.variance.reshape(-1)) if cov is None else cov
            cov = cov.detach().to(device=device, dtype=dtype)
        except NotImplementedError:
            cov = None
        if mean is None or cov is None or not bool(torch.isfinite(mean).all() & torch.isfinite(cov).all()):
            with _device.scoped_global_stream(seed, "cpu"):
                draws = prior.sample((4096,)).detach().to(device=device, dtype=dtype)
            mean, cov = draws.mean(0), torch.cov(draws.T).reshape(n_params, n_params)
    if not bool(torch.isfinite(mean).all() & torch.isfinite(cov).all()):
        raise InputError("prior", "a prior with a finite mean and covariance", "non-finite moments")
    cov = 0.5 * (cov + cov.T)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise InputError("prior", "a prior with a positive-definite covariance", "a singular or indefinite one")
    dist_dtype = None
    if dist is not None:
        with _device.scoped_global_stream(seed, "cpu"):
            dist_dtype = prior.sample().dtype
    return Prior(kind=kind, mean=mean, cov=cov, chol=chol, precision=torch.cholesky_inverse(chol), dist=dist,
                 dist_dtype=dist_dtype)


def _draw_flat_prior(prior: Prior, g: torch.Generator, seed: np.random.SeedSequence) -> torch.Tensor:
    """One draw ``(P,)`` of the prior from member stream ``g`` (Gaussian) or ``seed`` (other distributions,
    whose samplers read torch's global stream, here forked and fixed)."""
    if prior.dist is None:
        z = torch.randn(prior.mean.shape, generator=g, dtype=prior.mean.dtype, device=prior.mean.device)
        return prior.mean + prior.chol @ z
    with _device.scoped_global_stream(seed, "cpu"):
        draw = prior.dist.sample()
    return draw.detach().to(dtype=prior.mean.dtype, device=prior.mean.device).reshape(-1)


def prior_moments(ens: "Ensemble") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ``(P,)``, lower Cholesky factor ``(P, P)`` of the covariance and precision ``(P, P)`` of the
    (Gaussian or surrogate) prior of ``ens`` over its flat parameters."""
    if ens.prior is not None:
        return ens.prior.mean, ens.prior.chol, ens.prior.precision
    sd = torch.cat([s.reshape(-1) for s in ens.prior_sd.values()])
    return torch.zeros_like(sd), torch.diag(sd), torch.diag(1.0 / sd**2)


def prior_log_prob(ens: "Ensemble", theta: torch.Tensor) -> torch.Tensor:
    """Prior log-density of flat parameters ``(..., P)`` of ``ens`` (vmap- and grad-safe)."""
    if ens.prior is not None:
        return ens.prior.log_prob(theta)
    var = torch.cat([s.reshape(-1) for s in ens.prior_sd.values()]).to(theta) ** 2
    return -0.5 * (theta**2 / var).sum(-1) - 0.5 * torch.log(2 * math.pi * var).sum()


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


def _members_per_alignment(dtype: torch.dtype) -> int:
    """Members per :data:`_ALIGN_BYTES` of one element: the period, in members, of the memory alignment
    of the members of a stacked tensor (8 for float64, 16 for float32)."""
    return max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())


def _rows_times(d: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """``d @ mat`` for ``d`` ``(M, P)``, computed in groups of a fixed number of rows (the last group
    padded with zeros), one matrix product per group (``torch.bmm``): MKL rounds a row of one product
    over all ``M`` rows differently with ``M``, and the groups start at the same members in a block as
    in the whole fit (a block is padded to that alignment), so a member's row does not depend on the
    others."""
    group = _members_per_alignment(d.dtype)
    m, p = d.shape
    pad = (-m) % group
    if pad:
        d = torch.cat([d, d.new_zeros(pad, p)])
    out = torch.bmm(d.reshape(-1, group, p), mat.expand(d.shape[0] // group, *mat.shape))
    return out.reshape(-1, mat.shape[1])[:m]


def _dense_anchor(params: dict, w0: dict, prec: torch.Tensor) -> torch.Tensor:
    """``½ (w_i - w0_i)ᵀ P (w_i - w0_i)`` per member ``(M,)`` for stacked ``(M, *shape)`` parameters and a
    dense (symmetric) precision ``P`` ``(P, P)``, in products whose rounding does not depend on how
    many members are stacked (:func:`_rows_times`)."""
    members = next(iter(params.values())).shape[0]
    d = torch.cat([(params[k] - w0[k]).reshape(members, -1) for k in params], 1)
    return 0.5 * (d * _rows_times(d, prec)).sum(1)


def _member_loss(module, likelihood, noise_var, n_total, anchor, params, buffers, w0, prec, xb, yb):
    mean, var = member_output(module, params, buffers, xb, likelihood)
    if likelihood == "heteroscedastic":
        data = 0.5 * (torch.log(var) + (yb - mean) ** 2 / var).mean()
    else:
        data = 0.5 * ((yb - mean) ** 2).mean() / noise_var
    if anchor:
        if isinstance(prec, dict):                      # the diagonal prior of prior_sd
            reg = sum((0.5 * (params[k] - w0[k]) ** 2 * prec[k]).sum() for k in params)
        else:                                           # a dense prior precision over the flat parameters
            d = torch.cat([(params[k] - w0[k]).reshape(-1) for k in params])
            reg = 0.5 * d @ (prec @ d)
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


DEFAULT_EPOCHS = 2000
"""Default cap on the epochs of :func:`fit` (training stops earlier once every member has converged)."""
DEFAULT_TOL = 1e-2
"""Default convergence tolerance of :func:`fit` on the scaled gradient norm."""
_PATIENCE = 2          # epochs whose full-data objective did not decrease before a member's step is halved
_STOCHASTIC_HALVINGS = 8
_POLISH_AFTER = 3      # step halvings after which a member of a deterministic Gaussian model goes to the polish
# polish caps: 2000 steps, and a member stops unconverged once its gradient norm has not reached a new low
# (0.9 times its best) for 500 steps. On the autoconversion example (2-32-1 tanh, 20 members) 500 and 200
# stopped 2 of 20 members at scaled gradient norms of 0.04 and 0.12; they converge within 576 steps.
_POLISH_ITERATIONS = 2000
_POLISH_PATIENCE = 500
_POLISH_MAX_PARAMS = 4000
_ALIGN_BYTES = 64      # a block of a fit pads its start so that its members keep their alignment to this many bytes


def _has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


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
    prior: Any = None,
    epochs: int = DEFAULT_EPOCHS,
    tol: float = DEFAULT_TOL,
    polish: bool | None = None,
    batch_size: int = 32,
    lr: float = 1e-2,
    normalise: bool = True,
    vectorize: bool = True,
    seed: _device.Seed = None,
    device: Any = None,
    dtype: Any = None,
    progress: bool | None = None,
    client: Any = None,
    block: int | None = None,
) -> Ensemble:
    """Train ``members`` copies of ``module`` from prior draws, all at once, each to its minimum.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture (an instance), mapping ``(n, d)`` inputs to ``(n, 1)`` outputs (``(n, 2)``: mean
        and raw variance, for ``likelihood="heteroscedastic"``). Its own parameter values are ignored.
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
        Prior standard deviations of the default diagonal prior (see :func:`prior_sd`), normalised units.
    prior : torch.distributions.Distribution, optional
        A prior over the flat parameter vector (``P`` entries in ``named_parameters`` order, normalised
        units), replacing the diagonal one: a ``MultivariateNormal`` (full covariance) or any distribution
        with ``log_prob`` and ``sample`` on the real line. Members start from (and are anchored to) its
        draws; the anchor is ``½ (w - w0)ᵀ C⁻¹ (w - w0)`` with ``C`` its covariance (docs/ensembles.md).
    epochs : int
        Cap on the number of epochs. A member stops as soon as it has converged (``tol``).
    tol : float
        Convergence tolerance on the scaled gradient norm ``‖∇J_i‖ · sd_noise · sqrt(N)`` of the member's
        full-data objective per datum ``J_i`` (normalised units; ``sd_noise = 1`` for the heteroscedastic
        likelihood): roughly the distance to the minimum in posterior standard deviations. The step size of
        a member is halved whenever its full-data objective has failed to decrease twice. Members with
        dropout layers (a stochastic objective) count as converged once their step size has been halved
        8 times.
    polish : bool, optional
        Finish each member with Levenberg-Marquardt steps on its exact full-data cost (Gauss-Newton matrix
        ``GᵀG/σ² + P``, ``O(P²)`` memory and an ``O(P³)`` solve per member and step) once Adam stalls
        (its step halved three times) or reaches ``epochs``; at most 2000 steps, and a member whose
        gradient norm has not reached a new low for 500 steps stops unconverged. Default: on for
        the Gaussian likelihood, modules without dropout or buffers, and ``P <= 4000`` parameters.
    batch_size, lr : int, float
        Adam minibatch size and initial step size; every member sees every training pair once per epoch.
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
    client : dask.distributed.Client, optional
        Train blocks of members on its workers and gather them (:func:`daml.distributed.fit`, the
        ``distributed`` extra): the same ensemble bit for bit (one thread; see :func:`fit_block`).
    block : int, optional
        Members per Dask task (with ``client``; default one block per worker).

    Returns
    -------
    Ensemble
        With equal log-weights (:func:`~daml.ensembles.weigh` gives the importance weights) and the
        per-member ``convergence`` diagnostics. A :class:`~daml.errors.ConvergenceWarning` names the
        members that reached the cap ``epochs`` before ``tol``.

    See Also
    --------
    fit_block, gather : the same ensemble trained in blocks of members (for example on Dask workers).
    """
    if client is not None:                              # member blocks on Dask workers (daml.distributed)
        from .. import distributed

        return distributed.fit(module, x, y, client=client, block=block, members=members, noise_sd=noise_sd,
                               likelihood=likelihood, anchor=anchor, perturb_targets=perturb_targets,
                               common_prior_draw=common_prior_draw, prior_scale=prior_scale,
                               bias_scale=bias_scale, prior=prior, epochs=epochs, tol=tol, polish=polish,
                               batch_size=batch_size, lr=lr, normalise=normalise, vectorize=vectorize, seed=seed,
                               device=device, dtype=dtype, progress=False if progress is None else progress)
    if block is not None:
        raise InputError("block", "None without a client (blocks of members are Dask tasks)", repr(block))
    ens = _fit(module, x, y, block=None, threads=None, members=members, noise_sd=noise_sd, likelihood=likelihood,
               anchor=anchor, perturb_targets=perturb_targets, common_prior_draw=common_prior_draw,
               prior_scale=prior_scale, bias_scale=bias_scale, prior=prior, epochs=epochs, tol=tol, polish=polish,
               batch_size=batch_size, lr=lr, normalise=normalise, vectorize=vectorize, seed=seed, device=device,
               dtype=dtype, progress=progress)
    warn_unconverged(ens, "fit", stacklevel=2)
    return ens


def fit_block(module: nn.Module, x: Any, y: Any, *, first: int, count: int, members: int, threads: int | None = None,
              **fit_kwargs: Any) -> Ensemble:
    """Train members ``first .. first+count-1`` of the ``members``-member :func:`fit`, in one pass.

    The blocks of one fit, trained anywhere (for example on the workers of a Dask cluster) and given
    to :func:`gather`, make the ensemble of ``fit(module, x, y, members=members, **fit_kwargs)`` bit
    for bit: member ``i`` reads only the ``i``-th stream spawned from ``seed`` (its prior draw, target
    perturbation and minibatch order), and the training of a member (Adam with its own step size and
    stopping rule, then the Levenberg-Marquardt polish) involves no other member's numbers.

    Parameters
    ----------
    module, x, y
        As for :func:`fit`.
    first : int
        Index of the block's first member, ``0 <= first < members``.
    count : int
        Number of members in the block, ``1 <= count <= members - first``.
    members : int
        Size ``M`` of the whole ensemble (not of the block).
    threads : int, optional
        Intra-op threads for the training. Default: the count :func:`fit` picks for the whole ensemble in
        this process (:func:`fit_threads`: one thread for small networks, else the process's setting).
        The blocks equal the fit bit for bit on one thread; on several, a large network's blocks can
        round differently from the fit (products and sums are split by their shapes; see the module
        docstring), so pass ``threads=1`` (and run a reference fit on one thread) where bitwise
        agreement matters.
    **fit_kwargs
        The other keyword arguments of :func:`fit`, the same for every block. ``seed`` must be an int or
        a :class:`numpy.random.SeedSequence` (not ``None`` or a ``torch.Generator``, which would give every
        block streams of its own); a SeedSequence is copied, never advanced, so the blocks equal
        ``fit(seed=s)`` for a ``s`` that has not spawned before.

    Returns
    -------
    Ensemble
        The block's ``count`` members, with log-weights ``-log count`` and its convergence diagnostics
        (unconverged members are not warned about here but by :func:`gather`). ``config`` is
        :func:`fit`'s (with ``members=M``) plus ``config["block"]``: ``first``, ``count`` and digests of the
        seed, data and architecture that :func:`gather` compares.

    Raises
    ------
    InputError
        Naming ``first``, ``count`` or ``members`` out of range, ``seed`` (``None`` or a generator), or
        ``module`` for a dropout module with ``vectorize=True`` and a block smaller than the ensemble
        (``vmap`` draws the dropout masks of a pass from one stream; ``vectorize=False`` gives every member
        a stream of its own, and its blocks gather into ``fit(..., vectorize=False)``).

    Examples
    --------
    >>> kw = dict(members=5, noise_sd=0.1, seed=0, epochs=50)
    >>> blocks = [fit_block(mlp(2, 8), x, y, first=0, count=2, **kw),
    ...           fit_block(mlp(2, 8), x, y, first=2, count=3, **kw)]
    >>> ens = gather(blocks)                                    # == fit(mlp(2, 8), x, y, **kw)
    """
    members = check_int(members, "members")
    first = check_int(first, "first", 0, expected=f"a member index in 0 .. members - 1 = {members - 1}")
    if first >= members:
        raise InputError("first", f"a member index in 0 .. members - 1 = {members - 1}", first)
    count = check_int(count, "count", 1, expected=f"a number of members in 1 .. members - first = {members - first}")
    if first + count > members:
        raise InputError("count", f"a number of members in 1 .. members - first = {members - first} (the block "
                         f"starts at member {first} of {members})", count)
    if threads is not None:
        threads = check_int(threads, "threads", 1)
        if threads > 4096:
            raise InputError("threads", "an intra-op thread count of at most 4096", threads)
    unknown = sorted(set(fit_kwargs) - set(_FIT_DEFAULTS))
    if unknown:
        raise InputError("fit_kwargs", f"keyword arguments of fit ({', '.join(sorted(_FIT_DEFAULTS))})",
                         ", ".join(unknown))
    kw = {**_FIT_DEFAULTS, **fit_kwargs}
    kw["seed"] = _block_seed(kw["seed"])
    return _fit(module, x, y, block=(first, count), threads=threads, members=members, **kw)


def _block_seed(seed: Any) -> Any:
    """The seed of a block: an int as it is, a SeedSequence copied (spawning advances it); ``None`` and
    generators refused (every block would read streams of its own)."""
    expected = ("an int or a numpy SeedSequence, the same for every block (None draws fresh entropy and a "
                "torch.Generator is advanced by each call, so the blocks would not share the fit's streams)")
    if seed is None:
        raise SeedError("seed", expected, "None")
    if isinstance(seed, torch.Generator):
        raise SeedError("seed", expected, "a torch.Generator")
    if isinstance(seed, np.random.SeedSequence):
        return np.random.SeedSequence(entropy=seed.entropy, spawn_key=seed.spawn_key, pool_size=seed.pool_size,
                                      n_children_spawned=seed.n_children_spawned)
    _device.seed_sequence(seed)              # the same checks (and errors) as fit's
    return seed


def gather(blocks: Sequence[Ensemble]) -> Ensemble:
    """One ensemble from the blocks of :func:`fit_block`: the ensemble of the whole :func:`fit`.

    The blocks may come in any order (they are sorted by their first member); together they must cover
    members ``0 .. M-1`` once each, and all come from the same fit: the same arguments, seed, data and
    architecture (``config`` and the digests in ``config["block"]``) and the same normalisation and
    prior tensors. Parameters, buffers, prior draws and convergence diagnostics are concatenated along
    the member axis in member order; the loss histories are padded with ``nan`` to the longest (a
    member's history is ``nan`` after it stopped); the log-weights are ``-log M`` and ``config`` is
    :func:`fit`'s. Like :func:`fit`, warns (:class:`~daml.errors.ConvergenceWarning`) once about members
    that did not converge.

    Parameters
    ----------
    blocks : sequence of Ensemble
        The blocks of one fit, from :func:`fit_block`.

    Returns
    -------
    Ensemble
        Equal (``torch.equal`` on every tensor) to the ensemble of ``fit(..., members=M)`` with the same
        arguments on the same device and dtype.

    Raises
    ------
    InputError
        Naming ``blocks``: not a non-empty sequence of blocks of :func:`fit_block`, blocks of different
        fits, or blocks that leave a gap or overlap.

    Examples
    --------
    >>> ens = gather([b0, b1])               # b0: members 0..1, b1: members 2..4 of a 5-member fit
    >>> ens = gather([b1, b0])               # the same ensemble
    >>> ens = gather([fit_block(net, x, y, first=0, count=5, members=5, noise_sd=0.1, seed=0)])
    """
    expected = "a non-empty sequence of ensembles from fit_block (one fit's blocks, covering its members once each)"
    if isinstance(blocks, (Ensemble, str, bytes)) or not isinstance(blocks, Sequence):
        raise InputError("blocks", expected, type(blocks).__name__)
    blocks = list(blocks)
    if not blocks:
        raise InputError("blocks", expected, "an empty sequence")
    for j, b in enumerate(blocks):
        if not isinstance(b, Ensemble):
            raise InputError("blocks", expected, f"blocks[{j}] of type {type(b).__name__}")
        record = b.config.get("block") if isinstance(b.config, dict) else None
        if not isinstance(record, dict) or b.convergence is None:
            raise InputError("blocks", expected, f"blocks[{j}] without a block record (an ensemble of fit, "
                             "deep_ensemble or mc_dropout rather than of fit_block)")
        if b.members != record["count"] or any(v.shape[0] != record["count"] for v in b.params.values()):
            raise InputError("blocks", expected, f"blocks[{j}] with {b.members} members but a record of "
                             f"{record['count']}")

    def base(b):
        return {k: v for k, v in b.config.items() if k != "block"}

    def origin(b):
        return {k: v for k, v in b.config["block"].items() if k not in ("first", "count")}

    same = "blocks of one fit (the same arguments, seed, data and architecture)"
    ref = blocks[0]
    for j, b in enumerate(blocks[1:], 1):
        a0, a1 = {**base(ref), **origin(ref)}, {**base(b), **origin(b)}
        differ = sorted(k for k in set(a0) | set(a1) if a0.get(k, None) != a1.get(k, None))
        if not differ:
            differ = [name for name in ("x_mean", "x_sd", "y_mean", "y_sd")
                      if not _same_tensor(getattr(ref, name), getattr(b, name))]
            if ref.noise_sd != b.noise_sd and not (math.isnan(ref.noise_sd) and math.isnan(b.noise_sd)):
                differ.append("noise_sd")
            if ref.likelihood != b.likelihood:
                differ.append("likelihood")
            for name in ("prior_sd", "params", "buffers"):
                d0, d1 = getattr(ref, name), getattr(b, name)
                if list(d0) != list(d1) or any(d0[k].shape[1 if name != "prior_sd" else 0:]
                                               != d1[k].shape[1 if name != "prior_sd" else 0:] for k in d0):
                    differ.append(name)
            if not differ and not all(_same_tensor(ref.prior_sd[k], b.prior_sd[k]) for k in ref.prior_sd):
                differ.append("prior_sd")
            if (ref.prior is None) != (b.prior is None) or (ref.prior is not None and not (
                    _same_tensor(ref.prior.mean, b.prior.mean) and _same_tensor(ref.prior.cov, b.prior.cov))):
                differ.append("prior")
        if differ:
            raise InputError("blocks", same, f"blocks[0] and blocks[{j}] that differ in {', '.join(differ)}")
    order = sorted(range(len(blocks)), key=lambda j: (blocks[j].config["block"]["first"], j))
    members = int(ref.config["members"])
    covered, previous = 0, None
    for j in order:
        first, count = blocks[j].config["block"]["first"], blocks[j].config["block"]["count"]
        if first > covered:
            raise InputError("blocks", f"blocks that cover members 0 .. {members - 1} once each",
                             f"a gap: members {covered} .. {first - 1} are in no block")
        if first < covered:
            raise InputError("blocks", f"blocks that cover members 0 .. {members - 1} once each",
                             f"an overlap: members {first} .. {min(covered, first + count) - 1} are in "
                             f"blocks[{previous}] and blocks[{j}]")
        covered, previous = first + count, j
    if covered != members:
        raise InputError("blocks", f"blocks that cover members 0 .. {members - 1} once each",
                         f"a gap: members {covered} .. {members - 1} are in no block")
    parts = [blocks[j] for j in order]

    def cat(name):
        dicts = [getattr(b, name) for b in parts]
        return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}

    width = max(b.history.shape[1] for b in parts)
    history = torch.full((members, width), math.nan, dtype=ref.history.dtype, device=ref.history.device)
    row = 0
    for b in parts:
        history[row:row + b.members, :b.history.shape[1]] = b.history
        row += b.members
    conv = {k: torch.cat([b.convergence[k] for b in parts]) for k in ref.convergence}
    ens = Ensemble(module=ref.module, params=cat("params"), buffers=cat("buffers"), prior_sd=dict(ref.prior_sd),
                   prior_draw=cat("prior_draw"),
                   log_weight=torch.full((members,), -math.log(members), dtype=ref.log_weight.dtype,
                                         device=ref.log_weight.device),
                   noise_sd=ref.noise_sd, likelihood=ref.likelihood, x_mean=ref.x_mean, x_sd=ref.x_sd,
                   y_mean=ref.y_mean, y_sd=ref.y_sd, history=history, config=base(ref), convergence=conv,
                   prior=ref.prior)
    warn_unconverged(ens, "gather", stacklevel=2)
    return ens


def fit_threads(module: nn.Module, x: Any, members: int, batch_size: int = 32, vectorize: bool = True) -> int:
    """The intra-op thread count :func:`fit` trains ``members`` members of ``module`` on here (CPU).

    One thread for small networks (:func:`daml._device.auto_threads`), else the process's setting
    (``torch.get_num_threads()``); ``DAML_THREADS`` forces a count. A distributed fit can compute it
    once on the client and pass it to every :func:`fit_block` as ``threads=``.

    Parameters
    ----------
    module : torch.nn.Module
    x : array-like, shape (n, d) or (n,)
        The training inputs (only their number of rows counts).
    members : int
        The size of the whole ensemble.
    batch_size : int
    vectorize : bool
        As for :func:`fit` (``False``: the work of one member).

    Examples
    --------
    >>> fit_threads(mlp(2, 8), x, members=5)                  # 1: a small network
    >>> fit_threads(mlp(20, 512), x, members=200)             # torch.get_num_threads()
    """
    module = _check_module(module)
    members = check_int(members, "members")
    batch_size = check_int(batch_size, "batch_size")
    if not isinstance(vectorize, (bool, np.bool_)):
        raise InputError("vectorize", "True or False", repr(vectorize))
    xt = x if isinstance(x, torch.Tensor) else as_numeric(x, "x")
    if xt.ndim not in (1, 2) or xt.shape[0] == 0:
        raise ShapeError("x", "training inputs of shape (n, d) or (n,) with n >= 1", f"shape {tuple(xt.shape)}")
    rows = xt.shape[0]
    work = _device.network_work(module, members if vectorize else 1, min(int(batch_size), int(rows)))
    chosen = _device.choose_threads(work)
    return int(chosen) if chosen is not None else torch.get_num_threads()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` that also holds for tensors on different devices or of different dtypes (False)."""
    return a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and torch.equal(a, b)


def _digest(*items: Any) -> str:
    """A short hex digest of tensors (dtype, shape and bytes) and strings: how :func:`gather` tells the
    data and architectures of blocks apart without keeping them."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for item in items:
        if isinstance(item, torch.Tensor):
            t = item.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(str(item).encode())
    return h.hexdigest()


_FIT_DEFAULTS = dict(noise_sd=None, likelihood="gaussian", anchor=True, perturb_targets=True, common_prior_draw=False,
                     prior_scale=1.0, bias_scale=1.0, prior=None, epochs=DEFAULT_EPOCHS, tol=DEFAULT_TOL, polish=None,
                     batch_size=32, lr=1e-2, normalise=True, vectorize=True, seed=None, device=None, dtype=None,
                     progress=None)
"""fit's keyword arguments other than ``members`` and their defaults (a test checks them against fit's
signature)."""


def _fit(module, x, y, *, block, threads, members, noise_sd, likelihood, anchor, perturb_targets, common_prior_draw,
         prior_scale, bias_scale, prior, epochs, tol, polish, batch_size, lr, normalise, vectorize, seed, device, dtype,
         progress) -> Ensemble:
    """The one implementation of :func:`fit` (``block=None``: all ``members``) and :func:`fit_block`
    (``block=(first, count)``: members ``first .. first+count-1`` of the ``members``-member fit)."""
    module = _check_module(module)
    members = check_int(members, "members")
    first, count = (0, members) if block is None else block
    stop = first + count
    if not isinstance(likelihood, str) or likelihood not in LIKELIHOODS:
        raise InputError("likelihood", f"one of {LIKELIHOODS}", repr(likelihood))
    for name, flag in (("anchor", anchor), ("perturb_targets", perturb_targets),
                       ("common_prior_draw", common_prior_draw), ("normalise", normalise), ("vectorize", vectorize)):
        if not isinstance(flag, (bool, np.bool_)):
            raise InputError(name, "True or False", repr(flag))
    if perturb_targets and likelihood != "gaussian":
        raise InputError("perturb_targets", "False with the heteroscedastic likelihood (target "
                         "perturbations need a known noise level)", perturb_targets)
    epochs = check_int(epochs, "epochs")
    tol = check_real(tol, "tol", positive=True, expected="a tolerance > 0")
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
    shapes = {k: p.shape for k, p in template.named_parameters()}
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    stochastic = _has_dropout(template)
    can_polish = likelihood == "gaussian" and not stochastic and not any(True for _ in template.buffers())
    if polish is None:
        polish = can_polish and n_params <= _POLISH_MAX_PARAMS
    elif not isinstance(polish, (bool, np.bool_)):
        raise InputError("polish", "True, False or None", repr(polish))
    elif polish and not can_polish:
        raise InputError("polish", "False or None for this ensemble (the polish needs the Gaussian likelihood and "
                         "a module without dropout or buffers)", polish)
    if stochastic and vectorize and count < members:
        raise ModuleError("module", "a module without dropout layers for a block of a vectorised fit (vmap draws "
                          "the dropout masks of all the members in the pass from one stream, so a member's masks "
                          "depend on which other members share its pass)", f"{type(module).__name__} with dropout",
                          hint="pass vectorize=False: every member then has a dropout stream of its own and the "
                          "blocks gather into fit(..., vectorize=False)")
    # memory per member, refused before any stream is spawned: parameters, prior draw, Adam moments and
    # gradients (about 8 copies of P), perturbed targets and minibatch order (3 n), a random generator
    # (about 5 kB), and the P x P Gauss-Newton matrices of the polish (3 P²)
    item = torch.empty((), dtype=dt).element_size()
    per_member = item * (8.0 * n_params + 3.0 * n + (3.0 * n_params**2 if polish else 0.0)) + 5000.0
    if block is None:
        check_fits("members", members * per_member, what=f"members={members} ({n_params} parameters each)", device=dev)
    else:
        check_fits("count", count * per_member, what=f"count={count} members ({n_params} parameters each)", device=dev)
    root = _device.seed_sequence(seed)
    root_attr = (f"entropy={root.entropy}, spawn_key={tuple(root.spawn_key)}, "
                 f"children_spawned_before={root.n_children_spawned}")
    # all M (then sliced), so that what the root spawns next is the same; spawn() refuses M streams that cannot fit
    children = _device.spawn(root, members, name="members")
    # the members whose streams this block reads: its own, and member 0's when every member starts at its draw
    drawn = ([0] if common_prior_draw and first > 0 else []) + list(range(first, stop))
    gens = {i: _device.generator(children[i], dev) for i in drawn}
    rng_seed = int(root.generate_state(1, dtype=np.uint32)[0])   # the stream of dropout layers
    pri = None
    if prior is not None:
        pri = _as_prior(prior, n_params, dt, dev, root.spawn(1)[0])
        sd_flat = torch.diagonal(pri.cov).sqrt()
        sd, i = {}, 0
        for k, s in shapes.items():
            size = int(np.prod(s))
            sd[k] = sd_flat[i:i + size].reshape(s)
            i += size
        prec: Any = pri.precision
    else:
        sd = prior_sd(template, prior_scale, bias_scale, dt, dev)
        prec = {k: 1.0 / s**2 for k, s in sd.items()}
    draws, targets = [], []
    first_draw = None
    for i in drawn:
        g = gens[i]
        if pri is None:
            w0 = _draw_prior(sd, g)
        else:
            w0 = _unflatten_shapes(_draw_flat_prior(pri, g, children[i].spawn(1)[0]), shapes)
        if common_prior_draw:               # member 0's draw (always the first drawn) for every member
            first_draw = w0 if first_draw is None else first_draw
            w0 = first_draw
        if i < first:                       # member 0 of an earlier block: only its prior draw was needed
            continue
        draws.append(w0)
        eps = torch.randn(n, generator=g, dtype=dt, device=dev) * noise if perturb_targets else None
        targets.append(yn + eps if eps is not None else yn)
    w0_stack = {k: torch.stack([d[k] for d in draws]) for k in sd}
    y_stack = torch.stack(targets)                                  # (M, n)
    buffers = {k: b.unsqueeze(0).expand(count, *b.shape).clone() for k, b in template.named_buffers()}
    _probe_vmap(template, {k: v.clone() for k, v in w0_stack.items()}, {k: v.clone() for k, v in buffers.items()},
                xn, count)

    config = dict(members=members, noise_sd=None if likelihood != "gaussian" else float(noise * y_sd),
                  likelihood=likelihood, anchor=bool(anchor), perturb_targets=bool(perturb_targets),
                  common_prior_draw=bool(common_prior_draw), prior_scale=prior_scale, bias_scale=bias_scale,
                  prior="diagonal" if pri is None else f"{pri.kind}: {type(prior).__name__}",
                  epochs=epochs, tol=tol, batch_size=batch_size, lr=lr, normalise=bool(normalise),
                  module=type(module).__name__, seed=_device.seed_to_attr(seed))
    loss_args = (template, likelihood, noise**2 if likelihood == "gaussian" else 1.0, float(n), bool(anchor))
    scale = math.sqrt(n) * (noise if likelihood == "gaussian" else 1.0)
    config["polish"] = bool(polish)
    if block is not None:       # what gather needs to tell blocks of one fit from blocks of different fits
        config["block"] = dict(first=first, count=count, root=root_attr, data=_digest(xt, yt),
                               module=_digest(repr(template)))
    train_kw = dict(batch_size=batch_size, lr=lr, epochs=epochs, tol=tol, grad_scale=scale, stochastic=stochastic,
                    polish=bool(polish), dev=dev, progress=progress)
    # small networks train on one intra-op thread (_device.auto_threads; DAML_THREADS forces a count):
    # with two threads on a busy 2-core machine they ran up to 10 times slower
    work = _device.network_work(module, members if vectorize else 1, min(int(batch_size), int(n)))
    # (from the ensemble size M, also for a block, so that a block runs on the count the whole fit would use)
    with torch.enable_grad(), _device.auto_threads(work, threads, device=dev):   # autograd, also under no_grad()
        params, history, conv, buffers = _train_members(vectorize, members, first, count, loss_args, w0_stack,
                                                        buffers, prec, xn, y_stack,
                                                        [gens[i] for i in range(first, stop)], rng_seed, dt, dev,
                                                        train_kw)
    if not all(torch.isfinite(v).all() for v in params.values()):
        raise NonFiniteError("lr", "a learning rate at which training stays finite", lr,
                             hint="training produced NaN or infinite parameters; lower lr")
    ens = Ensemble(module=template, params=params, buffers=buffers, prior_sd=sd, prior_draw=w0_stack,
                   log_weight=torch.full((count,), -math.log(count), dtype=dt, device=dev),
                   noise_sd=noise, likelihood=likelihood, x_mean=x_mean, x_sd=x_sd, y_mean=y_mean, y_sd=y_sd,
                   history=history, config=config, convergence=conv, prior=pri)
    return ens


def _train_members(vectorize, members, first, count, loss_args, w0_stack, buffers, prec, xn, y_stack, gens, rng_seed,
                   dt, dev, train_kw):
    """Members ``first .. first+count-1`` of ``members`` (their stacked draws, targets and generators) in
    one vmapped pass (``vectorize``) or one after the other (the reference loop, where member ``i`` has
    the dropout stream ``rng_seed + i``)."""
    align = _members_per_alignment(dt)
    if vectorize and (first % align or count == 1) and members > 1:
        # a block whose members would sit at other memory alignments than in the whole fit, or alone in its
        # pass, trains behind `lead` copies of its first member (and beside one, when alone): MKL's kernels
        # round a member differently at another alignment (member i of a stacked tensor starts i * K
        # elements in: the same modulo 64 bytes as in the whole fit when lead = first % align), and torch
        # computes a pass of one member with other kernels than a pass of several.
        # The copies (draws, targets and a clone of the generator) only pad; their numbers are dropped.
        lead = first % align
        trail = 1 if count == 1 and lead == 0 else 0
        idx = [0] * lead + list(range(count)) + [0] * trail
        pick = torch.tensor(idx, device=y_stack.device)
        clones = []
        for _ in range(lead + trail):
            g = torch.Generator(device=gens[0].device)
            g.set_state(gens[0].get_state())
            clones.append(g)
        params, history, conv, buffers = _train(loss_args, {k: v[pick] for k, v in w0_stack.items()},
                                                {k: v[pick] for k, v in buffers.items()}, prec, xn, y_stack[pick],
                                                clones[:lead] + list(gens) + clones[lead:], rng_seed=rng_seed,
                                                desc=f"members {first}..{first + count - 1}", size_members=members,
                                                **train_kw)
        keep = slice(lead, lead + count)
        params = {k: v[keep].clone() for k, v in params.items()}
        buffers = {k: v[keep].clone() for k, v in buffers.items()}
        conv = {k: v[keep].clone() for k, v in conv.items()}
        history = history[keep, :int(conv["epochs"].max())].clone()   # the copies may have run longer
    elif vectorize:
        params, history, conv, buffers = _train(loss_args, w0_stack, buffers, prec, xn, y_stack, gens,
                                                rng_seed=rng_seed, desc="ensemble", size_members=members, **train_kw)
    else:
        outs = []
        for j in range(count):
            outs.append(_train(loss_args, {k: v[j:j + 1] for k, v in w0_stack.items()},
                               {k: v[j:j + 1] for k, v in buffers.items()}, prec, xn, y_stack[j:j + 1], [gens[j]],
                               rng_seed=rng_seed + first + j, desc=f"member {first + j}", size_members=1,
                               **train_kw))
        params = {k: torch.cat([o[0][k] for o in outs]) for k in w0_stack}
        buffers = {k: torch.cat([o[3][k] for o in outs]) for k in buffers}
        width = max(o[1].shape[1] for o in outs)
        history = torch.full((count, width), math.nan, dtype=dt, device=dev)
        for i, o in enumerate(outs):
            history[i, :o[1].shape[1]] = o[1][0]
        conv = {k: torch.cat([o[2][k] for o in outs]) for k in outs[0][2]}
    return params, history, conv, buffers


def warn_unconverged(ens: Ensemble, who: str, stacklevel: int = 2) -> int:
    """Issue a :class:`~daml.errors.ConvergenceWarning` when members of ``ens`` did not converge;
    return their number (0 when all did, or when ``ens`` carries no diagnostics)."""
    conv = ens.convergence
    if conv is None:
        return 0
    bad = (~conv["converged"]).nonzero().reshape(-1).tolist()
    if bad:
        worst = float(conv["scaled_grad_norm"].max())
        more = " ..." if len(bad) > 10 else ""
        warnings.warn(f"{who}: {len(bad)} of {ens.members} members did not converge within epochs="
                      f"{ens.config.get('epochs')} (scaled gradient norm up to {worst:.3g} > "
                      f"tol={ens.config.get('tol')}; members {bad[:10]}{more}): their importance weights assume "
                      "minimised members and cannot be trusted (raise epochs; ReLU networks stall at their kinks: "
                      "use a smooth activation)", ConvergenceWarning, stacklevel=stacklevel + 1)
    return len(bad)


def _unflatten_shapes(theta: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, s in shapes.items():
        size = int(np.prod(s))
        out[k] = theta[i:i + size].reshape(s)
        i += size
    return out


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _train(loss_args, w0, buffers, prec, x, y_stack, gens, *, batch_size, lr, epochs, tol, grad_scale, stochastic,
           polish, rng_seed, dev, progress, desc, size_members=None):
    """Adam on ``M`` stacked members (one vmapped loss), each to its own convergence.

    Adam is written out with a step size per member, so that a member's arithmetic does not depend on the
    others (``M = 1`` gives the sequential reference). After every epoch the full-data objective and its
    gradient are evaluated per member: a member whose scaled gradient norm is below ``tol`` stops (its
    parameters are frozen); one whose objective has not improved for ``_PATIENCE`` epochs has its step
    halved. Returns the parameters, the loss history ``(M, epochs run)`` and the diagnostics.
    ``size_members`` (default ``M``) is the ensemble size that sizes the data chunks of the polish: the
    size of the whole fit when these members are a block of it, so that a block sums in the same chunks.
    """
    from tqdm.auto import tqdm

    members, n = y_stack.shape
    dt = x.dtype
    params = {k: v.clone() for k, v in w0.items()}
    m1 = {k: torch.zeros_like(v) for k, v in params.items()}
    m2 = {k: torch.zeros_like(v) for k, v in params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    step_size = torch.full((members,), lr, dtype=dt, device=dev)

    # a dense prior precision enters outside vmap, in products over fixed groups of members (_rows_times):
    # under vmap it became one matrix product over the member axis, whose rows MKL rounds differently
    # with the number of rows, so that a member depended on how many others shared its pass
    dense = bool(loss_args[4]) and not isinstance(prec, dict)
    member_args = (*loss_args[:4], bool(loss_args[4]) and not dense)
    n_total = loss_args[3]

    def loss_one(p, b, w0_i, xb, yb):
        return _member_loss(*member_args, p, b, w0_i, prec, xb, yb)

    vmapped = vmap(loss_one, randomness="different")

    def batched(p, b, w0_, xb, yb):
        out = vmapped(p, b, w0_, xb, yb)
        return out + _dense_anchor(p, w0_, prec) / n_total if dense else out

    x_all = x.unsqueeze(0).expand(members, *x.shape)

    def check(p):
        """Full-data objective and gradient norm per member (buffers copied: BatchNorm updates them)."""
        req = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
        with _device.scoped_global_stream(rng_seed + 1, dev):
            obj = batched(req, {k: v.clone() for k, v in buffers.items()}, w0, x_all, y_stack)
        grads = torch.autograd.grad(obj.sum(), list(req.values()))
        gn = torch.sqrt(sum((g.reshape(members, -1) ** 2).sum(1) for g in grads))
        return obj.detach(), gn.detach()

    def bcast(v, like):
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    obj_prev, gn = check(params)
    bad = torch.zeros(members, dtype=torch.long, device=dev)
    halvings = torch.zeros(members, dtype=torch.long, device=dev)
    active = torch.ones(members, dtype=torch.bool, device=dev)
    converged = gn * grad_scale <= tol
    active &= ~converged
    rel = torch.zeros(members, dtype=dt, device=dev)
    epochs_run = torch.zeros(members, dtype=torch.long, device=dev)
    history: list[torch.Tensor] = []
    t = 0
    with _device.scoped_global_stream(rng_seed, dev):
        for e in tqdm(range(epochs), desc=desc, disable=(None if progress is None else not progress), leave=False):
            if not bool(active.any()):
                break
            order = torch.stack([torch.randperm(n, generator=g, device=dev) for g in gens])     # (M, n)
            h = torch.zeros(members, dtype=dt, device=dev)
            for s, u in _batches(n, batch_size):
                idx = order[:, s:u]                                     # (M, B)
                req = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                losses = batched(req, buffers, w0, x[idx], torch.gather(y_stack, 1, idx))
                grads = torch.autograd.grad(losses.sum(), list(req.values()))
                t += 1
                c1, c2 = 1 - b1**t, 1 - b2**t
                for (k, p), g in zip(params.items(), grads):
                    a = bcast(active, p)
                    m1[k] = torch.where(a, b1 * m1[k] + (1 - b1) * g, m1[k])
                    m2[k] = torch.where(a, b2 * m2[k] + (1 - b2) * g * g, m2[k])
                    upd = bcast(step_size, p) * (m1[k] / c1) / ((m2[k] / c2).sqrt() + eps)
                    params[k] = torch.where(a, p - upd, p)
                h += losses.detach() * (u - s) / n
            history.append(torch.where(active, h, torch.full_like(h, math.nan)))
            obj, gn_new = check(params)
            upd_rel = (obj_prev - obj) / obj_prev.abs().clamp(min=1e-300)
            rel = torch.where(active, upd_rel, rel)
            gn = torch.where(active, gn_new, gn)
            epochs_run += active.long()
            bad = torch.where(active & (obj >= obj_prev), bad + 1, bad)
            decay = active & (bad >= _PATIENCE)
            step_size = torch.where(decay, step_size / 2, step_size)
            halvings += decay.long()
            bad = torch.where(decay, torch.zeros_like(bad), bad)
            done = active & (gn * grad_scale <= tol)
            if stochastic:
                done |= active & (halvings >= _STOCHASTIC_HALVINGS)
            converged |= done
            active &= ~done
            if polish:                 # Levenberg-Marquardt finishes the job once Adam stalls or slows down
                active &= halvings < _POLISH_AFTER
            obj_prev = torch.where(active | done, obj, obj_prev)
    hist = torch.stack(history, 1) if history else torch.zeros(members, 0, dtype=dt, device=dev)
    lm_steps = torch.zeros(members, dtype=torch.long, device=dev)
    if polish and not bool(converged.all()):
        p_new, gn_lm, rel_lm, lm_steps, conv_lm = _polish(loss_args, params, buffers, w0, prec, x, y_stack, ~converged,
                                                          tol=tol, grad_scale=grad_scale, iterations=_POLISH_ITERATIONS,
                                                          size_members=size_members)
        todo = ~converged
        params = {k: torch.where(bcast(todo, v), p_new[k], v) for k, v in params.items()}
        gn = torch.where(todo, gn_lm, gn)
        rel = torch.where(todo & (lm_steps > 0), rel_lm, rel)
        converged |= conv_lm
    conv = {"grad_norm": gn, "scaled_grad_norm": gn * grad_scale, "rel_improvement": rel, "epochs": epochs_run,
            "polish_steps": lm_steps, "converged": converged}
    return {k: v.detach() for k, v in params.items()}, hist, conv, buffers


def _polish(loss_args, params, buffers, w0, prec, x, y_stack, todo, *, tol, grad_scale, iterations, size_members=None):
    """Levenberg-Marquardt on the exact RML cost of every member in ``todo`` (Gaussian likelihood).

    In flat parameters ``θ`` the total cost of member ``i`` is ``½‖ỹ_i - f(θ)‖²/σ² + ½ (θ - θ0_i)ᵀ P
    (θ - θ0_i)``; its gradient ``-Gᵀr/σ² + P (θ - θ0_i)`` is exact and its Gauss-Newton matrix is
    ``GᵀG/σ² + P``. A step ``(H + λ diag H)⁻¹ g`` is kept when it lowers the cost (then ``λ /= 3``, else
    ``λ *= 5``); a member stops once its scaled gradient norm is below ``tol``. For a model linear in
    its parameters the first step lands on the minimum. Returns the parameters, the per-datum gradient
    norms, the last relative improvements, the iterations used and the converged flags. The data are
    summed in chunks sized by ``size_members`` (default: the members here), so that a block of a fit
    given the fit's size adds its sums in the same order as the whole fit.
    """
    module, _, noise_var, n_total, anchor = loss_args
    shapes = {k: v.shape[1:] for k, v in params.items()}
    members = y_stack.shape[0]
    n = x.shape[0]

    def flat(d):
        return torch.cat([d[k].reshape(members, -1) for k in shapes], 1)

    def unflat(th):
        out, i = {}, 0
        for k, s in shapes.items():
            size = int(np.prod(s))
            out[k] = th[..., i:i + size].reshape(*th.shape[:-1], *s)
            i += size
        return out

    theta, theta0 = flat(params), flat(w0)
    dense = anchor and not isinstance(prec, dict)
    p_mat = torch.diag(torch.cat([prec[k].reshape(-1) for k in shapes])) if isinstance(prec, dict) else prec
    if not anchor:
        p_mat = torch.zeros_like(p_mat)
    eye = torch.eye(theta.shape[1], dtype=theta.dtype, device=theta.device)

    def f(th, b, xc):
        return functional_call(module, (unflat(th), b), (xc,)).reshape(xc.shape[0])

    def f1(th, b, x1):
        return f(th, b, x1.unsqueeze(0))[0]

    jac = vmap(vmap(grad(f1), in_dims=(None, None, 0)), in_dims=(0, 0, None))
    fwd = vmap(f, in_dims=(0, 0, None))
    step = max(1, int(2e7 // max(1, (size_members or members) * theta.shape[1])))

    def prior_part(th):
        d = th - theta0
        # in fixed groups of members (a product over the member axis rounds a member's row differently
        # with the number of members; the diagonal prior's sums are exact either way)
        pd = _rows_times(d, p_mat) if dense else d @ p_mat
        return 0.5 * (pd * d).sum(1), pd

    def cost(th):
        rtr = torch.zeros(members, dtype=th.dtype, device=th.device)
        with torch.no_grad():
            for s in range(0, n, step):
                rtr += ((y_stack[:, s:s + step] - fwd(th, buffers, x[s:s + step])) ** 2).sum(1)
        return 0.5 * rtr / noise_var + prior_part(th)[0]

    def stats(th):
        p = th.shape[1]
        gtg = torch.zeros(members, p, p, dtype=th.dtype, device=th.device)
        gtr = torch.zeros(members, p, dtype=th.dtype, device=th.device)
        rtr = torch.zeros(members, dtype=th.dtype, device=th.device)
        for s in range(0, n, step):
            xc = x[s:s + step]
            with torch.no_grad():
                r = y_stack[:, s:s + step] - fwd(th, buffers, xc)
            g = jac(th, buffers, xc).detach()
            gtg += g.transpose(1, 2) @ g
            gtr += torch.einsum("mcp,mc->mp", g, r)
            rtr += (r**2).sum(1)
        reg, pd = prior_part(th)
        gn = gtg / noise_var + p_mat
        return gn, gn, -gtr / noise_var + pd, 0.5 * rtr / noise_var + reg

    active = todo.clone()
    converged = torch.zeros_like(todo)
    lam = torch.full((members,), 1e-3, dtype=theta.dtype, device=theta.device)
    rel = torch.zeros(members, dtype=theta.dtype, device=theta.device)
    used = torch.zeros(members, dtype=torch.long, device=theta.device)
    nu = torch.full((members,), 2.0, dtype=theta.dtype, device=theta.device)
    best = torch.full((members,), math.inf, dtype=theta.dtype, device=theta.device)
    since = torch.zeros(members, dtype=torch.long, device=theta.device)
    h, gnm, g, c = stats(theta)
    for _ in range(iterations + 1):
        scaled = g.norm(dim=1) / n * grad_scale
        done = active & (scaled <= tol)
        converged |= done
        active &= ~done
        # a member whose gradient has not reached a new low for _POLISH_PATIENCE steps has stalled (for
        # example at a kink of a ReLU network, where the gradient does not vanish): it stops, unconverged
        better = scaled < 0.9 * best
        best = torch.where(better, scaled, best)
        since = torch.where(better, torch.zeros_like(since), since + 1)
        active &= since < _POLISH_PATIENCE
        if not bool(active.any()):
            break
        if int(used.max()) >= iterations:
            break
        hd = h + lam[:, None, None] * torch.diag_embed(torch.diagonal(gnm, dim1=-2, dim2=-1)) + 1e-12 * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        pos = info == 0                     # (a failed factorisation counts as a rejected step)
        chol = torch.where(pos[:, None, None], chol, eye.expand_as(chol))
        delta = torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
        delta = torch.where(pos[:, None], delta, torch.zeros_like(delta))
        trial = theta - delta
        c_trial = torch.where(pos, cost(trial), torch.full_like(c, math.inf))
        # gain ratio of the actual to the decrease the Gauss-Newton model predicts (Nielsen's damping rule)
        predicted = (delta * g).sum(1) - 0.5 * (delta * torch.einsum("mpq,mq->mp", h, delta)).sum(1)
        ratio = (c - c_trial) / predicted.clamp(min=1e-300)
        ok = active & torch.isfinite(c_trial) & (c_trial <= c)
        used += active.long()
        if bool(ok.any()):
            theta = torch.where(ok[:, None], trial, theta)
            rel = torch.where(ok, (c - c_trial) / c.abs().clamp(min=1e-300), rel)
            h_new, gnm_new, g_new, c_new = stats(theta)
            h = torch.where(ok[:, None, None], h_new, h)
            gnm = torch.where(ok[:, None, None], gnm_new, gnm)
            g = torch.where(ok[:, None], g_new, g)
            c = torch.where(ok, c_new, c)
        shrink = torch.clamp(1 - (2 * ratio.clamp(max=1.0) - 1) ** 3, min=1 / 3)
        lam = torch.where(ok, lam * shrink, torch.where(active, lam * nu, lam))
        nu = torch.where(ok, torch.full_like(nu, 2.0), torch.where(active, nu * 2, nu))
    return unflat(theta), g.norm(dim=1) / n, rel, used, converged


# ---------------------------------------------------------------------------------------------------
# evaluating members


def forward(ens: Ensemble, x: Any, *, normalised_input: bool = False, dropout: bool = False,
            seed: _device.Seed = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Member means ``(M, n)`` and (heteroscedastic) variances ``(M, n)`` in normalised target units.

    ``dropout=True`` keeps dropout layers active (one MC-dropout pass per call, seeded).
    """
    ens = check_ensemble(ens)
    for name, flag in (("dropout", dropout), ("normalised_input", normalised_input)):
        if not isinstance(flag, (bool, np.bool_)):
            raise InputError(name, "True or False", repr(flag))
    dropout = bool(dropout)
    xt = as_numeric(x, "x", dtype=ens.x_mean.dtype, device=ens.x_mean.device)
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
    ens = check_ensemble(ens)
    return torch.cat([v.reshape(v.shape[0], -1) for v in ens.params.values()], dim=1)


def unflatten(ens: Ensemble, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flat_params` for one member, ``(P,)`` -> parameter dict."""
    out, i = {}, 0
    for k, v in ens.params.items():
        size = int(np.prod(v.shape[1:]))
        out[k] = theta[..., i:i + size].reshape(*theta.shape[:-1], *v.shape[1:])
        i += size
    return out
