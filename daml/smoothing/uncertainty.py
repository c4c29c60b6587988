r"""Uncertainty for smoothed estimates: Gaussian and Gaussian-mixture posteriors, held-out weights of
an ensemble of smoothers, a variance scale fitted on held-out data, and calibration scores.

The hybrid smoother of Garcia Satorras et al. (2019) returns a point. Here it gets a distribution in
two ways:

* **The smoother's covariance around the estimate**: the marginal covariances of the chain
  linearised at the estimate (:func:`daml.smoothing.linearised_covariance`, the Laplace covariance of
  the physics model's posterior there). It is the uncertainty the physics model claims; the learned
  correction moves the mean but not this covariance.
* **An ensemble of trained smoothers** (different seeds or data), a Gaussian mixture whose
  component weights come from the held-out log predictive density of each member
  (:func:`held_out_weights`). In the notation of :mod:`daml.ensembles` the weight of member ``i`` is
  :math:`p(D \mid w_i)\, p(w_i) / q(w_i \mid D)`; for graph networks the prior-to-proposal ratio is not
  computed (its Laplace approximation needs the Hessian of every network parameter) and is taken to
  be equal across members, which leaves the likelihood of held-out data: pseudo-Bayesian model
  averaging (Yao et al. 2018). Such weights degenerate quickly on long held-out sets; the ESS says
  how much.

:func:`calibration` scores any of these against the truth: RMSE of the mean, NLL, CRPS (closed form
for Gaussian mixtures), coverage of the central interval, spread and spread over error.

References
----------
* Y. Yao, A. Vehtari, D. Simpson and A. Gelman (2018), Using stacking to average Bayesian predictive
  distributions. *Bayesian Analysis* 13, 917-1007.
* T. Gneiting and A. E. Raftery (2007), Strictly proper scoring rules, prediction, and estimation.
  *Journal of the American Statistical Association* 102, 359-378.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import xarray as xr

from .. import _device
from ..errors import DtypeError, InputError, NonFiniteError, ShapeError, check_int, check_real
from ..diagnostics import ess_kernel
from ..ensembles.predictive import mixture_scores_kernel
from ..models.base import as_real_tensor, check_memory

__all__ = ["mixture_posterior", "calibration", "held_out_weights", "HeldOutWeights", "variance_scale",
           "hybrid_covariance", "hybrid_posterior"]


def _components(means: Any, covs: Any, log_weight: Any = None, *, name: str = "means"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked components: means ``(C, *batch, T, n)``, covs ``(C, *batch, T, n, n)``, normalised log
    weights ``(C,)`` (a single component may be given without the leading ``C``)."""
    mu = as_real_tensor(means, name)
    cov = as_real_tensor(covs, "covs")
    for arg, t in ((name, mu), ("covs", cov)):
        if t.dtype in (torch.float16, torch.bfloat16):
            raise DtypeError(arg, "float32 or float64 values", f"dtype {t.dtype}")
    if not mu.is_floating_point():
        mu = mu.double()
    cov = cov.to(mu)
    if mu.ndim < 2:
        raise ShapeError(name, "means (C, *batch, T, n) or (T, n)", f"shape {tuple(mu.shape)}")
    if tuple(cov.shape) != (*mu.shape, mu.shape[-1]):
        raise ShapeError("covs", f"covariances of shape {(*mu.shape, mu.shape[-1])} (one n x n per mean)",
                         f"shape {tuple(cov.shape)}")
    for arg, t in ((name, mu), ("covs", cov)):
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(arg, "finite values", "NaN or infinite entries")
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    if not bool((diag > 0).all()):
        raise InputError("covs", "covariances with positive variances", f"min variance {float(diag.min()):.3g}")
    if log_weight is None:
        if mu.ndim == 2:
            mu, cov = mu.unsqueeze(0), cov.unsqueeze(0)
        lw = torch.full((mu.shape[0],), -math.log(mu.shape[0]), dtype=mu.dtype, device=mu.device)
    else:
        lw = as_real_tensor(log_weight, "log_weight").to(mu)
        if mu.ndim == 2 or lw.ndim != 1 or lw.shape[0] != mu.shape[0]:
            raise ShapeError("log_weight", f"one log weight per component ({mu.shape[0] if mu.ndim > 2 else 1}; "
                             "means (C, *batch, T, n))", f"shape {tuple(lw.shape)}")
        if bool(torch.isnan(lw).any()) or bool((lw == math.inf).any()) or bool((lw == -math.inf).all()):
            raise NonFiniteError("log_weight", "log weights in [-inf, inf) with at least one finite",
                                 "NaN, +inf or all -inf")
        lw = lw - torch.logsumexp(lw, 0)
    return mu, cov, lw


def _truth(truth: Any, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    x = as_real_tensor(truth, "truth").to(like)
    if tuple(x.shape) != shape:
        raise ShapeError("truth", f"true states of shape {shape} (the means' without the component axis)",
                         f"shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("truth", "finite true states", "NaN or infinite entries")
    return x


def _check_level(level: Any) -> float:
    level = check_real(level, "level", expected="a probability in (0, 1)")
    if not 0.0 < level < 1.0:
        raise InputError("level", "a probability in (0, 1)", repr(level))
    return level


def calibration(means: Any, covs: Any, truth: Any, log_weight: Any = None, *, level: float = 0.9,
                variables: Sequence[int] | None = None) -> dict[str, float]:
    """Scores of a Gaussian (mixture) smoothed posterior against the true states, per scalar.

    Every entry of every state is one forecast: the marginal of the mixture
    ``sum_c w_c N(means[c], covs[c])`` at that entry, scored against the true value and averaged.

    Parameters
    ----------
    means : array (C, *batch, T, n) or (T, n)
        Component means (``C = 1`` for one smoother; the leading axis may be left out then).
    covs : array (C, *batch, T, n, n) or (T, n, n)
        Component covariances.
    truth : array (*batch, T, n)
        The true states.
    log_weight : array (C,), optional
        Component log weights (normalised here); default equal.
    level : float
        The central interval whose coverage is reported (default 0.9).
    variables : sequence of int, optional
        Score only these state entries (for example positions); default all.

    Returns
    -------
    dict
        ``rmse`` (of the mixture mean), ``nll`` (mean negative log density), ``crps`` (mean, closed form
        for Gaussian mixtures, Grimit et al. 2006), ``coverage`` (fraction of true values inside the
        central ``level`` interval; ``level`` when calibrated), ``spread`` (root mean predictive
        variance) and ``spread_skill`` (spread over RMSE; one when calibrated).

    Raises
    ------
    ShapeError, NonFiniteError, InputError
        Naming ``means``, ``covs``, ``truth``, ``log_weight``, ``level`` or ``variables``.
    """
    level = _check_level(level)
    mu, cov, lw = _components(means, covs, log_weight)
    x = _truth(truth, tuple(mu.shape[1:]), mu)
    n = mu.shape[-1]
    if variables is not None:
        if isinstance(variables, (str, bytes)) or not isinstance(variables, Sequence) or len(variables) == 0 or \
                not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < n for v in variables):
            raise InputError("variables", f"a non-empty sequence of state indices in [0, {n})", repr(variables)[:80])
        idx = torch.as_tensor([int(v) for v in variables], device=mu.device)
    else:
        idx = torch.arange(n, device=mu.device)
    sd = torch.diagonal(cov, dim1=-2, dim2=-1).sqrt()
    loc = mu.index_select(-1, idx).movedim(0, -1).reshape(-1, mu.shape[0])      # (points, C)
    scale = sd.index_select(-1, idx).movedim(0, -1).reshape(-1, mu.shape[0])
    y = x.index_select(-1, idx).reshape(-1)
    out = mixture_scores_kernel(loc, scale, lw.exp(), y, level)
    out["level"] = level
    return out


class HeldOutWeights(NamedTuple):
    """The result of :func:`held_out_weights`: normalised ``log_weight`` ``(C,)``, the held-out
    ``log_density`` of each member ``(C,)`` and the ``ess`` of the weights (between 1 and ``C``)."""

    log_weight: torch.Tensor
    log_density: torch.Tensor
    ess: float


def held_out_weights(means: Any, covs: Any, truth: Any) -> HeldOutWeights:
    r"""Member weights from the log density of held-out true states (pseudo-BMA).

    ``log w_c = sum_{b, t} log N(truth[b, t]; means[c, b, t], covs[c, b, t])`` over held-out sequences
    (each time's state jointly, times treated as independent given the member), normalised. See the
    module docstring for how this relates to the importance weights of :mod:`daml.ensembles`.

    Parameters
    ----------
    means : array (C, *batch, T, n)
    covs : array (C, *batch, T, n, n)
    truth : array (*batch, T, n)

    Returns
    -------
    HeldOutWeights

    Raises
    ------
    ShapeError, NonFiniteError, InputError
        Naming the argument.
    """
    mu, cov, _ = _components(means, covs, None)
    x = _truth(truth, tuple(mu.shape[1:]), mu)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info.max()) != 0:
        raise InputError("covs", "positive-definite covariances", "a singular or indefinite one")
    logpdf = torch.distributions.MultivariateNormal(mu, scale_tril=chol, validate_args=False).log_prob(x)
    dens = logpdf.reshape(mu.shape[0], -1).sum(-1)
    lw = dens - torch.logsumexp(dens, 0)
    return HeldOutWeights(lw, dens, float(ess_kernel(lw)))


def variance_scale(means: Any, covs: Any, truth: Any, log_weight: Any = None) -> float:
    """The factor ``c`` that minimises the held-out NLL of the marginals when every covariance is
    multiplied by it (fit on validation data, then apply ``c * covs`` on test data).

    For one component it is the closed form ``mean(z^2)`` of the standardised errors; for a mixture
    a bounded scalar search over ``log c`` in ``[-12, 12]``.

    Returns
    -------
    float
        ``c > 0``: above one, the covariances were too small (over-confident).
    """
    mu, cov, lw = _components(means, covs, log_weight)
    x = _truth(truth, tuple(mu.shape[1:]), mu)
    sd = torch.diagonal(cov, dim1=-2, dim2=-1).sqrt()
    loc = mu.movedim(0, -1).reshape(-1, mu.shape[0])
    scale = sd.movedim(0, -1).reshape(-1, mu.shape[0])
    y = x.reshape(-1)
    if mu.shape[0] == 1:
        return float((((y - loc[:, 0]) / scale[:, 0]) ** 2).mean())
    from scipy.optimize import minimize_scalar

    w = lw.exp()

    def nll(log_c: float) -> float:
        s = scale * math.exp(0.5 * log_c)
        lp = -0.5 * ((y.unsqueeze(-1) - loc) / s) ** 2 - torch.log(s)
        return float(-torch.logsumexp(lp + torch.log(w), -1).mean())

    res = minimize_scalar(nll, bounds=(-12.0, 12.0), method="bounded", options={"xatol": 1e-8})
    if abs(res.x) > 11.9:
        import warnings

        from ..errors import ConvergenceWarning
        warnings.warn(f"variance_scale: the scale {math.exp(res.x):.3g} sits at the search bound e^(+-12): the "
                      "covariances are off by more than the search covers", ConvergenceWarning, stacklevel=2)
    return float(math.exp(res.x))


def mixture_posterior(means: Any, covs: Any, log_weight: Any = None, *, samples: int | None = None,
                      seed: _device.Seed = None, method: str = "smoother", batch_dims: Sequence[str] | None = None,
                      time: Any = None, config: dict | None = None) -> xr.Dataset:
    """A daml posterior (``x`` with members and log-weights) of a Gaussian or Gaussian-mixture smoother.

    Each component ``c`` contributes ``2 n`` sigma points (``samples=None``: mean plus and minus the
    columns of ``sqrt(n) L``, which match its mean and covariance exactly) or ``samples`` draws, with
    log weight ``log w_c - log(points)``. The dataset also holds the exact mixture moments ``mean``
    ``(time, *batch, variable)`` and ``cov`` ``(time, *batch, variable, variable_)``.

    Parameters
    ----------
    means, covs, log_weight
        As in :func:`calibration`.
    samples : int, optional
        Gaussian draws per component instead of sigma points.
    seed : int, SeedSequence or Generator, optional
        For ``samples``.
    method : str
        Recorded in the posterior's attributes.
    batch_dims : sequence of str, optional
        Names of the batch dims (default ``sequence`` for one, ``batch_0, ...`` for more).
    time : array (T,), optional
        The time coordinate.
    config : dict, optional
        Recorded configuration.

    Returns
    -------
    xarray.Dataset
        Dims ``(time, *batch, member, variable)``.
    """
    from ..models.base import covariance_root
    from ..posterior import from_members

    mu, cov, lw = _components(means, covs, log_weight)
    c, n, n_t = mu.shape[0], mu.shape[-1], mu.shape[-2]
    batch = tuple(mu.shape[1:-2])
    if batch_dims is None:
        batch_dims = ("sequence",) if len(batch) == 1 else tuple(f"batch_{i}" for i in range(len(batch)))
    if isinstance(batch_dims, str) or len(batch_dims) != len(batch) or not all(isinstance(d, str) for d in batch_dims):
        raise InputError("batch_dims", f"{len(batch)} dimension names (the means' batch dims)", repr(batch_dims))
    if samples is None:
        root = covariance_root(cov) * math.sqrt(n)
        pts = torch.cat([mu.unsqueeze(-2) + root.transpose(-1, -2), mu.unsqueeze(-2) - root.transpose(-1, -2)], -2)
        per = 2 * n
    else:
        per = check_int(samples, "samples", 1, "a positive number of draws per component")
        check_memory(3 * 8 * mu.numel() * per, "samples", f"{per} draws of {mu.shape[0]} components")
        g = _device.generator(seed, device=mu.device)
        chol = torch.linalg.cholesky(cov)
        eps = torch.randn((*mu.shape[:-1], per, n), dtype=mu.dtype, device=mu.device, generator=g)
        pts = mu.unsqueeze(-2) + eps @ chol.transpose(-1, -2)
    # (C, *batch, T, P, n) -> (T, *batch, C * P, n)
    pts = pts.movedim(-3, 1).movedim(0, -3).reshape(n_t, *batch, c * per, n)
    member_lw = (lw.unsqueeze(-1) - math.log(per)).expand(c, per).reshape(-1)
    w = lw.exp().reshape(c, *([1] * (mu.ndim - 1)))
    mix_mean = (w * mu).sum(0)
    dev = mu - mix_mean
    mix_cov = (w.unsqueeze(-1) * (cov + dev.unsqueeze(-1) * dev.unsqueeze(-2))).sum(0)
    coords: dict[str, Any] = {}
    if time is not None:
        t = np.asarray(time)
        if t.shape != (n_t,):
            raise ShapeError("time", f"{n_t} times", f"shape {t.shape}")
        coords["time"] = t
    post = from_members({"x": pts.detach().cpu()}, member_lw.detach().cpu(), dims=("time", *batch_dims, "member", "variable"),
                        weight_dims=("member",), coords=coords, method=method, config=config, seed=seed)
    vdims = ("time", *batch_dims, "variable")
    post["mean"] = (vdims, _device.to_numpy(mix_mean.movedim(-2, 0)))
    post["cov"] = ((*vdims, "variable_"), _device.to_numpy(mix_cov.movedim(-3, 0)))
    return post


def hybrid_covariance(smoother: Any, estimate: Any, y: Any, *, prior: Any = None) -> torch.Tensor:
    """The marginal covariances ``(*batch, T, n, n)`` of a hybrid smoother's physics chain linearised
    at ``estimate`` (its model, operator, ``Q``, Taylor order and linearisation; observed entries from
    ``y``'s NaN pattern): :func:`daml.smoothing.linearised_covariance` with the smoother's settings."""
    from .gaussian import linearised_covariance

    for attr in ("model", "operator"):
        if getattr(smoother, attr, None) is None:
            raise InputError("smoother", "a HybridSmoother (with model and operator)", type(smoother).__name__)
    yt = as_real_tensor(y, "y")
    mask = torch.isfinite(yt)
    n = getattr(smoother.model, "state_size", None)
    est = as_real_tensor(estimate, "estimate")
    if tuple(est.shape) != (*yt.shape[:-1], n):
        raise ShapeError("estimate", f"states of shape {(*yt.shape[:-1], n)} (y's batch and times, the state size)",
                         f"shape {tuple(est.shape)}")
    if not bool(torch.isfinite(est).all()):
        raise NonFiniteError("estimate", "finite states", "NaN or infinite entries")
    est = est.to(yt) if yt.is_floating_point() else est
    return linearised_covariance(smoother.model, est, operator=smoother.operator,
                                 prior=prior if prior is not None else getattr(smoother, "prior", None),
                                 order=getattr(smoother, "order", None),
                                 noise_cov=getattr(smoother, "noise_cov", None),
                                 linearisation=getattr(smoother, "linearisation", "jacobian"), mask=mask)


def hybrid_posterior(smoothers: Any, y: Any, *, log_weight: Any = None, scale: float = 1.0, samples: int | None = None,
                     seed: _device.Seed = None, time: Any = None) -> xr.Dataset:
    """A daml posterior from one trained hybrid smoother or an ensemble of them, in one call.

    Each smoother is run on ``y`` (evaluation mode, no gradient, the hidden-state draws from ``seed``),
    its estimate gets the smoother's covariance around it (:func:`hybrid_covariance`) times ``scale``
    (for example a :func:`variance_scale` fitted on validation sequences), and the components are
    combined by :func:`mixture_posterior` with ``log_weight`` (for example from
    :func:`held_out_weights`; default equal).

    Parameters
    ----------
    smoothers : HybridSmoother or sequence of HybridSmoother
    y : array (*batch, T, m)
        Observations, NaN where missing.
    log_weight : array (C,), optional
    scale : float
        Factor on every covariance (default 1).
    samples, seed, time
        As for :func:`mixture_posterior`; ``seed`` also seeds the smoothers' hidden states.

    Returns
    -------
    xarray.Dataset
        Method ``"hybrid"``; dims ``(time, *batch, member, variable)``, with ``mean`` and ``cov``.
    """
    from .hybrid import HybridSmoother

    members = [smoothers] if isinstance(smoothers, HybridSmoother) else smoothers
    if isinstance(members, (str, bytes)) or not isinstance(members, Sequence) or len(members) == 0 or \
            not all(isinstance(m, HybridSmoother) for m in members):
        raise InputError("smoothers", "a HybridSmoother or a non-empty sequence of them", type(smoothers).__name__)
    scale = check_real(scale, "scale", positive=True, expected="a positive factor on the covariances")
    streams = _device.seed_sequence(seed).spawn(2)
    means, covs = [], []
    for m in members:
        was_training = m.training
        m.eval()
        try:
            with torch.no_grad():
                est = m(y, seed=streams[0]).mean
        finally:
            m.train(was_training)
        means.append(est)
        covs.append(scale * hybrid_covariance(m, est, y))
    config = {"members": len(members), "scale": scale, "mode": members[0].mode, "iterations": members[0].iterations}
    return mixture_posterior(torch.stack(means), torch.stack(covs), log_weight, samples=samples, seed=streams[1],
                             method="hybrid", time=time, config=config)
