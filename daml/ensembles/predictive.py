"""Predictive distributions with the five sources of uncertainty (seed 001's fundamental equation).

    p(x | z, θ_tr, θ_te) = ∫∫∫∫∫ p(x | w, zᵗ, θ_teᵗ) p(w | θ_trᵗ) p(θ_trᵗ | θ_tr) p(θ_teᵗ | θ_te) p(zᵗ | z)
                           (5)        (4)            (3)              (2)              (1)

with (1) the new input, (2) the testing data (the noise on the value the prediction is compared with),
(3) the training data, (4) the weights and (5) the model function itself, estimated from held-out
residuals. Sources (3) and (4) live in the members: an RML ensemble (perturbed targets, prior draws)
carries both; :func:`uncertainty_sources` trains one ensemble per source to separate them. Sources
(1), (2) and (5) are added at prediction time: inputs are perturbed by ``input_sd``, and each member's
predictive is Gaussian with variance ``test_noise_sd² + model_sd²`` (plus the network's own variance for
a heteroscedastic member).

:func:`predict` returns the predictive as a Gaussian mixture over components ``(member, input draw,
dropout pass)`` held on the ``member`` dimension of a daml posterior (``loc``, ``scale``, one draw
``y`` per component, ``log_weight``), with ``variance(source, point)``: the part of the total variance
due to each source (``members``, ``input``, ``testing``, ``model``) and the exact ``total`` by the law
of total variance. :func:`scores` gives RMSE, NLL, CRPS and interval coverage of the mixture in closed
form.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
import xarray as xr

from .. import _device
from ..errors import ConvergenceWarning, InputError, NonFiniteError, ShapeError, check_fits, check_int, check_real
from ..posterior import from_members
from .training import Ensemble, _check_module, as_numeric, check_data, check_ensemble, fit, forward

SOURCES = ("input", "testing", "training", "weights", "model")
VARIANCE_PARTS = ("members", "input", "testing", "model", "total")


def _opt_sd(value: Any, name: str) -> float:
    return 0.0 if value is None else check_real(value, name, expected="a standard deviation >= 0")


def _new_inputs(x: Any, ens_or_d: Any, name: str) -> torch.Tensor:
    """New inputs ``(n, d)`` (``n >= 1``, finite) for an ensemble (or ``d`` columns), checked under ``name``."""
    if isinstance(ens_or_d, Ensemble):
        d, dtype, device = ens_or_d.x_mean.shape[0], ens_or_d.x_mean.dtype, ens_or_d.x_mean.device
    else:
        d, dtype, device = int(ens_or_d), None, None
    xt = as_numeric(x, name, dtype=dtype, device=device)
    if xt.ndim == 1:
        xt = xt.unsqueeze(-1) if d == 1 else xt.unsqueeze(0)
    if xt.ndim != 2 or xt.shape[1] != d:
        raise ShapeError(name, f"inputs of shape (n, {d})", f"shape {tuple(xt.shape)}")
    if xt.shape[0] < 1:
        raise ShapeError(name, "at least one input row", "0 rows")
    if not bool(torch.isfinite(xt).all()):
        raise NonFiniteError(name, "finite inputs", f"{int((~torch.isfinite(xt)).sum())} NaN or infinite entries")
    return xt


def predict(ens: Ensemble, x: Any, *, input_sd: Any = None, input_samples: int = 20,
            test_noise_sd: float | None = None, model_sd: float | None = None, dropout_passes: int = 0,
            weights: bool = True, seed: _device.Seed = None) -> xr.Dataset:
    """The predictive distribution of the ensemble at new inputs ``x`` (original units).

    Parameters
    ----------
    ens : Ensemble
    x : array-like, shape (n, d)
        New inputs.
    input_sd : float or array of shape (d,), optional
        Standard deviation of the error in the new inputs (source 1); ``None`` switches it off.
    input_samples : int
        Input draws per member when ``input_sd`` is given.
    test_noise_sd : float, optional
        Noise on the testing data (source 2), in the units of y. Default: the ensemble's training noise
        level for a Gaussian ensemble, ``0`` for a heteroscedastic one (its variance head holds it).
    model_sd : float, optional
        Model error of ``f`` (source 5), for example from :func:`model_error`; ``None`` switches it off.
    dropout_passes : int
        MC-dropout passes per member (``0``: dropout off).
    weights : bool
        Use the member weights (source 4 with training-data source 3 when the members carry it);
        ``False`` keeps only the highest-weight member.
    seed : int, SeedSequence, torch.Generator or None

    Returns
    -------
    xarray.Dataset
        A posterior with dims ``(point, member)``: ``loc``, ``scale``, ``y`` (one draw per component),
        ``log_weight(member)``, and ``variance(source, point)``; with the training diagnostics of the
        member behind each component (``grad_norm``, ``scaled_grad_norm``, ``rel_improvement``,
        ``converged`` over ``member``) and ``attrs["convergence"]``, ``attrs["weights_trusted"]``.
    """
    ens = check_ensemble(ens)
    xt = _new_inputs(x, ens, "x")
    d = ens.x_mean.shape[0]
    n = xt.shape[0]
    dropout_passes = check_int(dropout_passes, "dropout_passes", minimum=0)
    s_req = 1 if input_sd is None else check_int(input_samples, "input_samples")
    # the components (member, dropout pass, input draw) at every point: loc, scale, draws, variances
    item = xt.element_size()
    m_req = ens.members if weights else 1
    check_fits("input_samples", 2.0 * m_req * s_req * n * max(d, 1) * item, what=f"input_samples={s_req}",
               device=xt.device)
    check_fits("dropout_passes", 8.0 * m_req * max(dropout_passes, 1) * s_req * n * item,
               what=f"dropout_passes={dropout_passes} with {m_req} members, {s_req} input draws and {n} points",
               device=xt.device)
    root = _device.seed_sequence(seed)
    s_in, s_drop, s_y = root.spawn(3)
    g_in = _device.generator(s_in, xt.device)
    y_sd = ens.y_sd
    hetero = ens.likelihood == "heteroscedastic"
    test = (0.0 if hetero else float(ens.noise_sd * y_sd)) if test_noise_sd is None else \
        _opt_sd(test_noise_sd, "test_noise_sd")
    model = _opt_sd(model_sd, "model_sd")
    lw_members = ens.log_weight
    keep = torch.arange(ens.members, device=xt.device)
    if not weights:
        keep = torch.argmax(lw_members).reshape(1)
    sub = ens.replace(params={k: v[keep] for k, v in ens.params.items()},
                      buffers={k: v[keep] for k, v in ens.buffers.items()},
                      log_weight=lw_members[keep] - torch.logsumexp(lw_members[keep], 0))
    m = sub.members

    if input_sd is not None:
        isd = as_numeric(input_sd, "input_sd", dtype=xt.dtype, device=xt.device).reshape(-1)
        if isd.numel() not in (1, d) or (isd < 0).any() or not torch.isfinite(isd).all():
            raise InputError("input_sd", f"a standard deviation >= 0, scalar or of length {d}", input_sd)
        s = check_int(input_samples, "input_samples")
        xs = xt.unsqueeze(0) + isd * torch.randn((s, n, d), generator=g_in, dtype=xt.dtype, device=xt.device)
    else:
        s = 1
        xs = xt.unsqueeze(0)
    passes = max(dropout_passes, 1)
    drop_seeds = s_drop.spawn(passes)
    loc = torch.empty(m, passes, s, n, dtype=xt.dtype, device=xt.device)
    var = torch.zeros_like(loc)
    for j in range(passes):
        mean, v = forward(sub, xs.reshape(s * n, d), dropout=dropout_passes > 0, seed=drop_seeds[j])
        loc[:, j] = (mean * y_sd + ens.y_mean).reshape(m, s, n)
        if v is not None:
            var[:, j] = (v * y_sd**2).reshape(m, s, n)
    # the member's predictive at the noise-free input, for the "members" share of the variance
    if input_sd is not None:
        mean0, _ = forward(sub, xt, dropout=False)
        loc0 = mean0 * y_sd + ens.y_mean                                     # (m, n)
    else:
        loc0 = loc[:, :, 0].mean(1)
    var = var + test**2 + model**2
    k = m * passes * s
    comp_lw = (sub.log_weight[:, None, None] - math.log(passes * s)).expand(m, passes, s).reshape(k)
    loc_k = loc.reshape(k, n).T                                              # (n, K)
    scale_k = var.reshape(k, n).T.sqrt()
    g_y = _device.generator(s_y, xt.device)
    y_k = loc_k + scale_k * torch.randn(loc_k.shape, generator=g_y, dtype=xt.dtype, device=xt.device)

    w = torch.exp(comp_lw)
    w_m = torch.exp(sub.log_weight)
    total_mean = (loc_k * w).sum(1)
    total = ((loc_k - total_mean[:, None]) ** 2 * w).sum(1) + (scale_k**2 * w).sum(1)
    mbar = (loc0 * w_m[:, None]).sum(0)
    v_members = ((loc0 - mbar) ** 2 * w_m[:, None]).sum(0)
    v_input = ((loc - loc.mean(2, keepdim=True)) ** 2).mean(2).mean(1)       # (m, n) within-member
    if input_sd is not None:
        v_input = (v_input * w_m[:, None]).sum(0)
    else:
        v_input = torch.zeros(n, dtype=xt.dtype, device=xt.device)
    hetero_var = (var.reshape(k, n).T - test**2 - model**2)
    v_test = test**2 + (hetero_var * w).sum(1)
    v_model = torch.full((n,), model**2, dtype=xt.dtype, device=xt.device)
    variance = torch.stack([v_members.cpu(), v_input.cpu(), v_test.cpu(), v_model.cpu(), total.cpu()])

    carries = []
    if ens.config.get("perturb_targets"):
        carries.append("training")
    if not ens.config.get("common_prior_draw"):
        carries.append("weights")
    if dropout_passes:
        carries.append("dropout")
    conv = ens.convergence
    member_vars: dict[str, Any] = {}
    unconverged = 0
    if conv is not None:
        owner = torch.repeat_interleave(keep.to(conv["converged"].device), passes * s)        # member of each component
        for name in ("grad_norm", "scaled_grad_norm", "rel_improvement"):
            member_vars[name] = conv[name][owner].to(xt.dtype)
        member_vars["converged"] = conv["converged"][owner].to(torch.int8)
        unconverged = int((~conv["converged"][keep.to(conv["converged"].device)]).sum())
    post = from_members({"loc": loc_k, "scale": scale_k, "y": y_k, **member_vars}, comp_lw,
                        dims={"loc": ("point", "member"), "scale": ("point", "member"), "y": ("point", "member"),
                              **{k: ("member",) for k in member_vars}},
                        weight_dims=("member",), coords={"point": np.arange(n)}, method="ensemble_predictive",
                        config={**ens.config, "input_sd": None if input_sd is None else _device.to_numpy(isd).tolist(),
                                "input_samples": s, "test_noise_sd": test, "model_sd": model,
                                "dropout_passes": dropout_passes, "weights": bool(weights)},
                        seed=seed, attrs={"members_carry": "+".join(carries) or "none",
                                          "convergence": ("unknown" if conv is None else
                                                          "all members converged" if unconverged == 0 else
                                                          f"{unconverged} of {m} members did not converge"),
                                          "weights_trusted": ("unknown" if conv is None else
                                                              "no" if unconverged else "yes")})
    post["variance"] = xr.DataArray(_device.to_numpy(variance), dims=("source", "point"),
                                    coords={"source": list(VARIANCE_PARTS)})
    post["variance"].attrs["description"] = (
        "share of the predictive variance by source: members (weights, and training data when the members "
        "were trained on perturbed targets), input, testing (noise of the data compared with, with the "
        "network's own variance for heteroscedastic members), model error; total is exact")
    return post


# ---------------------------------------------------------------------------------------------------
# scores of a Gaussian-mixture predictive


def _check_predictive(post: Any, name: str = "post", positive_scale: bool = True) -> None:
    expected = "a predictive from daml.ensembles.predict (an xarray.Dataset with loc, scale, log_weight)"
    if not isinstance(post, xr.Dataset):
        raise InputError(name, expected, type(post).__name__)
    missing = [v for v in ("loc", "scale", "log_weight") if v not in post]
    if missing:
        raise InputError(name, expected, f"a dataset without {missing}")
    if set(post["loc"].dims) != {"point", "member"} or post.sizes["member"] < 1:
        raise ShapeError(name, "loc with dims (point, member) and at least one member", f"dims {post['loc'].dims}")
    for v in ("loc", "scale", "log_weight"):
        if not np.isfinite(post[v].values).all():
            raise NonFiniteError(f"{name}[{v!r}]", "finite values", "NaN or infinite entries")
    if positive_scale and not (post["scale"].values > 0).all():
        raise InputError(f"{name}['scale']", "positive component scales (give test_noise_sd > 0 or model_sd > 0 to "
                         "predict)", "zero scales")


def _mixture(post: xr.Dataset, positive_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_predictive(post, positive_scale=positive_scale)
    loc = torch.as_tensor(post["loc"].transpose("point", "member").values)
    scale = torch.as_tensor(post["scale"].transpose("point", "member").values)
    w = torch.exp(torch.as_tensor(post["log_weight"].values))
    return loc, scale, w


def _ncdf(z):
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def _abs_moment(mu, s):
    """E|N(mu, s²)|."""
    z = mu / s
    return mu * (2 * _ncdf(z) - 1) + 2 * s * torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)


def mixture_quantile_kernel(loc: torch.Tensor, scale: torch.Tensor, w: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile ``q`` of the scalar Gaussian mixtures ``sum_c w_c N(loc[p, c], scale[p, c]^2)``, ``(P,)``
    (bisection on the CDF; no checks: the tensor kernel behind :func:`mixture_quantile`)."""
    lo = (loc - 10 * scale).min(-1).values
    hi = (loc + 10 * scale).max(-1).values
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        cdf = (w * _ncdf((mid.unsqueeze(-1) - loc) / scale)).sum(-1)
        lo = torch.where(cdf < q, mid, lo)
        hi = torch.where(cdf < q, hi, mid)
    return 0.5 * (lo + hi)


def mixture_quantile(post: xr.Dataset, q: float) -> torch.Tensor:
    """Quantile ``q`` of the Gaussian-mixture predictive per point (bisection on the CDF), ``0 < q < 1``."""
    q = check_real(q, "q", expected="a probability in (0, 1)")
    if not 0.0 < q < 1.0:
        raise InputError("q", "a probability in (0, 1)", q)
    loc, scale, w = _mixture(post)
    return mixture_quantile_kernel(loc, scale, w, q)


def mixture_scores_kernel(loc: torch.Tensor, scale: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                          level: float) -> dict[str, float]:
    """Scores of the scalar Gaussian mixtures ``sum_c w_c N(loc[p, c], scale[p, c]^2)`` (``loc``, ``scale``
    ``(P, C)``, ``w`` ``(C,)``) at ``y`` ``(P,)``, averaged over the points: RMSE of the mixture mean, NLL,
    CRPS (closed form, Grimit et al. 2006), coverage of the central ``level`` interval, ``spread`` (root
    mean predictive variance) and ``spread_skill`` (spread over RMSE). No checks: the tensor kernel
    behind :func:`scores` and :func:`daml.smoothing.calibration`."""
    mean = (loc * w).sum(-1)
    var = (w * (scale**2 + loc**2)).sum(-1) - mean**2
    rmse = float(((mean - y) ** 2).mean().sqrt())
    logpdf = -0.5 * ((y.unsqueeze(-1) - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)
    nll = float(-torch.logsumexp(logpdf + torch.log(w), -1).mean())
    term1 = (w * _abs_moment(y.unsqueeze(-1) - loc, scale)).sum(-1)
    pair_s = torch.sqrt(scale.unsqueeze(-1) ** 2 + scale.unsqueeze(-2) ** 2)
    term2 = (w.unsqueeze(-1) * w.unsqueeze(-2) * _abs_moment(loc.unsqueeze(-1) - loc.unsqueeze(-2), pair_s)
             ).sum((-2, -1))
    crps = float((term1 - 0.5 * term2).mean())
    lo = mixture_quantile_kernel(loc, scale, w, (1 - level) / 2)
    hi = mixture_quantile_kernel(loc, scale, w, (1 + level) / 2)
    cover = float(((y >= lo) & (y <= hi)).to(loc.dtype).mean())
    spread = float(var.clamp_min(0).mean().sqrt())
    return {"rmse": rmse, "nll": nll, "crps": crps, "coverage": cover, "spread": spread,
            "spread_skill": spread / rmse if rmse > 0 else math.inf}


def scores(post: xr.Dataset, y: Any, *, level: float = 0.9) -> dict[str, float]:
    """RMSE of the mixture mean, mean NLL, mean CRPS (closed form for Gaussian mixtures, Grimit et al.
    2006) and the coverage of the central ``level`` interval (``0 < level < 1``), for observed values
    ``y`` (n,). A NaN or infinite ``y`` is refused (:class:`~daml.errors.NonFiniteError`): drop the
    points without an observation from both ``post`` and ``y`` first."""
    level = check_real(level, "level", expected="a probability in (0, 1)")
    if not 0.0 < level < 1.0:
        raise InputError("level", "a probability in (0, 1)", level)
    loc, scale, w = _mixture(post)
    yt = as_numeric(y, "y", dtype=loc.dtype, device="cpu").reshape(-1)
    if yt.shape[0] != loc.shape[0]:
        raise ShapeError("y", f"{loc.shape[0]} values, one per point", yt.shape[0])
    if not bool(torch.isfinite(yt).all()):
        raise NonFiniteError("y", "finite observed values", f"{int((~torch.isfinite(yt)).sum())} NaN or infinite "
                             "entries", hint="select the observed points in both post and y")
    out = mixture_scores_kernel(loc, scale, w, yt, level)
    return {k: out[k] for k in ("rmse", "nll", "crps", "coverage")}


# ---------------------------------------------------------------------------------------------------
# the noise level and the model error from held-out data


def estimate_noise(module: torch.nn.Module, x: Any, y: Any, *, holdout: float = 0.1, members: int = 2,
                   seed: _device.Seed = None, **fit_kw: Any) -> float:
    """Observation-noise level for the Gaussian likelihood: the RMS residual on a random ``holdout``
    share of ``(x, y)`` of a small ensemble trained on the rest (the initial guess of its own noise
    level is the target standard deviation / 10). Returns it in the units of ``y``."""
    xt, yt = check_data(x, y)
    holdout = check_real(holdout, "holdout")
    if not 0 < holdout < 1:
        raise InputError("holdout", "a share in (0, 1)", holdout)
    n = xt.shape[0]
    g = _device.generator(seed)
    perm = torch.randperm(n, generator=g)
    k = max(1, int(round(holdout * n)))
    val, tr = perm[:k], perm[k:]
    kw = dict(fit_kw)
    kw.setdefault("noise_sd", float(yt[tr].std()) / 10)
    kw["perturb_targets"] = False
    ens = fit(module, xt[tr], yt[tr], members=members, seed=g, **kw)
    mean, _ = forward(ens, xt[val])
    pred = (mean * ens.y_sd + ens.y_mean).mean(0)
    return float(((pred - yt[val]) ** 2).mean().sqrt())


def model_error(ens: Ensemble, x: Any, y: Any, *, test_noise_sd: float | None = None) -> float:
    """Model-error standard deviation of ``f`` (source 5) from held-out data ``(x, y)``: the part of the
    mean squared residual of the weighted mean not explained by the member spread and the testing noise,
    ``sqrt(max(0, mean r² - mean var_members - test_noise_sd²))``."""
    ens = check_ensemble(ens)
    xt, yt = check_data(x, y, dtype=ens.x_mean.dtype, device=ens.x_mean.device)
    post = predict(ens, xt, test_noise_sd=0.0 if test_noise_sd is None else test_noise_sd)
    loc, scale, w = _mixture(post, positive_scale=False)
    mean = (loc * w).sum(1)
    resid = float(((mean - yt.cpu()) ** 2).mean())
    spread = float(post["variance"].sel(source="members").mean())
    test = 0.0 if test_noise_sd is None else test_noise_sd
    return math.sqrt(max(0.0, resid - spread - test**2))


def scale_variance(post: xr.Dataset, factor: float) -> xr.Dataset:
    """The predictive ``post`` (from :func:`predict`) widened (``factor > 1``) or narrowed about its mean.

    Every deviation from the weighted mixture mean is multiplied by ``sqrt(factor)``: the component
    means ``loc`` and the draws ``y`` are moved towards or away from it and the component ``scale``
    multiplied, so the mean stays the same and every entry of ``variance``, the total included, is
    multiplied by ``factor`` exactly. The factor is recorded in the configuration attribute
    (multiplied into any earlier one). Use it with :func:`loo_variance_scale`.
    """
    c = check_real(factor, "factor", positive=True, expected="a variance factor > 0")
    _check_predictive(post, positive_scale=False)
    missing = [v for v in ("loc", "scale", "y", "variance", "log_weight") if v not in post]
    if missing:
        raise InputError("post", "a predictive from daml.ensembles.predict", f"a dataset without {missing}")
    root = math.sqrt(c)
    mean = post["loc"].weighted(np.exp(post["log_weight"])).mean("member")
    out = post.copy()
    for name in ("loc", "y"):
        out[name] = (mean + root * (post[name] - mean)).transpose(*post[name].dims)
    out["scale"] = root * post["scale"]
    out["variance"] = c * post["variance"]
    for name in ("loc", "y", "scale", "variance"):
        out[name].attrs = post[name].attrs
    config = json.loads(post.attrs["config"])
    config["variance_scale"] = c * config.get("variance_scale", 1.0)
    out.attrs["config"] = json.dumps(config)
    return out


class VarianceScale(NamedTuple):
    """Result of :func:`loo_variance_scale`."""

    scale: float            # the factor c (pass it to scale_variance)
    elpd: float             # leave-one-out log predictive density per point at c (units of y)
    elpd_unscaled: float    # the same at c = 1
    at_bound: bool          # c is at an end of the search interval


def _loo_elpd(loc: torch.Tensor, scale: torch.Tensor, log_w: torch.Tensor, y: torch.Tensor,
              c: float) -> float:
    """Mean importance-sampling leave-one-out log density of ``y`` under the mixture widened by ``c``
    about its mean: ``log p(y_i | D_-i) = -log sum_k w_k / N(y_i; loc'_ik, c scale_ik²)``."""
    mean = (loc * torch.exp(log_w)).sum(1, keepdim=True)
    root_c = math.sqrt(c)
    loc_c, scale_c = mean + root_c * (loc - mean), root_c * scale
    lp = -0.5 * ((y[:, None] - loc_c) / scale_c) ** 2 - torch.log(scale_c) - 0.5 * math.log(2 * math.pi)
    return float(-torch.logsumexp(log_w[None, :] - lp, 1).mean())


def loo_variance_scale(ens: Ensemble, x: Any, y: Any, *, test_noise_sd: float | None = None,
                       model_sd: float | None = None, bounds: tuple[float, float] = (1e-3, 1e3)) -> VarianceScale:
    """Calibrate the spread of the predictive on the training data itself, by leave-one-out.

    The factor ``c`` that maximises the leave-one-out log score of the training points ``(x, y)``
    under the predictive widened (or narrowed) by ``c`` as in :func:`scale_variance`. The
    leave-one-out densities come from the members by importance sampling, with no refitting (Gelfand,
    Dey & Chang 1992): when the members are draws from the weight posterior of the full data,
    ``p(y_i | D_-i) ≈ 1 / sum_m w_m / p(y_i | θ_m)``, since leaving point ``i`` out multiplies the
    posterior by ``1 / p(y_i | θ)``. A point that one member fits much better than the others thus
    gets the low density of the others, which an in-sample fit of ``c`` would ignore. Use it on an
    equal-weight ensemble (:func:`~daml.ensembles.equal_weight`), whose members are such draws.

    The search is a grid in ``log c`` over ``bounds`` refined by SciPy's bounded scalar minimiser.
    With identical members the estimate reduces to the in-sample maximum-likelihood factor, the mean
    of ``(y_i - mean_i)² / var_i``. With a handful of members the importance weights are noisy and their
    tail (PSIS k-hat) cannot be checked, so treat ``c`` as one calibration constant, not as a
    posterior quantity; ``docs/ensembles.md`` gives its effect on the UCI benchmark.

    Parameters
    ----------
    ens : Ensemble
    x, y : array-like, shapes (n, d) and (n,)
        The training data (or any data the members were fitted to).
    test_noise_sd, model_sd : float, optional
        As in :func:`predict`; the factor then applies to the predictive built with them.
    bounds : (float, float)
        Search interval for ``c``, ``0 < low < high``.

    Returns
    -------
    VarianceScale
        ``scale`` (the factor), ``elpd`` and ``elpd_unscaled`` (mean leave-one-out log density per point
        at ``c`` and at 1), and ``at_bound`` (a :class:`~daml.errors.ConvergenceWarning` is also raised
        when the optimum is at an end of ``bounds``).
    """
    from scipy.optimize import minimize_scalar

    ens = check_ensemble(ens)
    expected = "(low, high) with 0 < low < high, both finite"
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
        raise InputError("bounds", expected, repr(bounds))
    lo_b, hi_b = (check_real(b, "bounds", positive=True, expected=expected) for b in bounds)
    if not lo_b < hi_b:
        raise InputError("bounds", expected, repr(bounds))
    xt, yt = check_data(x, y, dtype=ens.x_mean.dtype, device=ens.x_mean.device)
    post = predict(ens, xt, test_noise_sd=test_noise_sd, model_sd=model_sd)
    loc, scale, w = _mixture(post, positive_scale=False)
    if not bool((scale > 0).all()):
        raise InputError("test_noise_sd", "a predictive with a positive variance in every component (a Gaussian "
                         "ensemble needs test_noise_sd > 0 or model_sd > 0)", repr(test_noise_sd))
    log_w = torch.log(w)
    yc = yt.reshape(-1).cpu().to(loc.dtype)
    grid = np.linspace(math.log(lo_b), math.log(hi_b), 241)
    vals = np.array([_loo_elpd(loc, scale, log_w, yc, math.exp(t)) for t in grid])
    best = int(np.argmax(vals))
    lo_i, hi_i = max(best - 1, 0), min(best + 1, grid.size - 1)
    opt = minimize_scalar(lambda t: -_loo_elpd(loc, scale, log_w, yc, math.exp(t)),
                          bounds=(grid[lo_i], grid[hi_i]), method="bounded", options={"xatol": 1e-8})
    t_best = float(opt.x) if -opt.fun >= vals[best] else float(grid[best])
    at_bound = best in (0, grid.size - 1)
    if at_bound:
        warnings.warn(f"loo_variance_scale: the best factor {math.exp(t_best):.3g} is at an end of bounds={bounds}",
                      ConvergenceWarning, stacklevel=2)
    return VarianceScale(math.exp(t_best), _loo_elpd(loc, scale, log_w, yc, math.exp(t_best)),
                         _loo_elpd(loc, scale, log_w, yc, 1.0), at_bound)


# ---------------------------------------------------------------------------------------------------
# one source at a time


def uncertainty_sources(module: torch.nn.Module, x: Any, y: Any, x_new: Any, *, noise_sd: float,
                        input_sd: Any = None, test_noise_sd: float | None = None, model_sd: float | None = None,
                        members: int = 20, samples: int = 2000, correction_steps: int = 200,
                        seed: _device.Seed = None, **fit_kw: Any) -> xr.Dataset:
    """Predictive samples at ``x_new`` from each of the five sources alone, and from all together.

    Three ensembles are trained: prior draws on the given targets (source 4, weights), one common prior
    draw on perturbed targets (source 3, training data) and full RML (both). The full one is weighted
    (RML estimator) and corrected to equal weights (:func:`~daml.ensembles.equal_weight`); its best
    member is the "cost-function minimum" that sources 1, 2 and 5 perturb on their own.

    Returns
    -------
    xarray.Dataset
        ``y(source, point, sample)`` with sources ``input, testing, training, weights, model, total``,
        and ``variance(source, point)``.
    """
    from .correction import equal_weight
    from .weights import weigh

    # every argument is checked before the first of the three trainings
    _check_module(module)
    xt, _ = check_data(x, y)
    n_new = _new_inputs(x_new, xt.shape[1], "x_new").shape[0]
    noise_sd = check_real(noise_sd, "noise_sd", positive=True)
    members = check_int(members, "members", minimum=2, expected="an int >= 2 (the members are weighted and resampled)")
    samples = check_int(samples, "samples")
    correction_steps = check_int(correction_steps, "correction_steps", minimum=0)
    _opt_sd(test_noise_sd, "test_noise_sd")
    _opt_sd(model_sd, "model_sd")
    if input_sd is not None:
        isd = as_numeric(input_sd, "input_sd").reshape(-1)
        if isd.numel() not in (1, xt.shape[1]) or not bool(torch.isfinite(isd).all()) or bool((isd < 0).any()):
            raise InputError("input_sd", f"a standard deviation >= 0, scalar or of length {xt.shape[1]}", input_sd)
    check_fits("samples", 8.0 * 8 * n_new * samples, what=f"samples={samples} at {n_new} points")
    ss = _device.seed_sequence(seed).spawn(6)
    base = dict(noise_sd=noise_sd, **fit_kw)
    ens_w = fit(module, x, y, members=members, perturb_targets=False, seed=ss[0], **base)
    ens_t = fit(module, x, y, members=members, perturb_targets=True, common_prior_draw=True, seed=ss[1], **base)
    ens_all = fit(module, x, y, members=members, perturb_targets=True, seed=ss[2], **base)
    ens_all, _ = weigh(ens_all, x, y, estimator="rml")
    ens_eq, _ = equal_weight(ens_all, x, y, steps=correction_steps, seed=ss[3])
    zero = dict(test_noise_sd=0.0)
    runs = {
        "input": predict(ens_all, x_new, input_sd=input_sd, weights=False, **zero) if input_sd is not None else None,
        "testing": predict(ens_all, x_new, weights=False, test_noise_sd=test_noise_sd or 0.0),
        "training": predict(ens_t, x_new, **zero),
        "weights": predict(ens_w, x_new, **zero),
        "model": predict(ens_all, x_new, weights=False, test_noise_sd=0.0, model_sd=model_sd),
        "total": predict(ens_eq, x_new, input_sd=input_sd, test_noise_sd=test_noise_sd or 0.0, model_sd=model_sd),
    }
    g = _device.generator(ss[4])
    n = runs["total"].sizes["point"]
    out = np.empty((len(runs), n, samples))
    var = np.empty((len(runs), n))
    for i, (name, post) in enumerate(runs.items()):
        if post is None:
            out[i] = np.repeat(runs["testing"]["loc"].values[:, :1], samples, axis=1)
            var[i] = 0.0
            continue
        loc, scale, w = _mixture(post, positive_scale=False)
        idx = torch.multinomial(w, samples, replacement=True, generator=g)
        draw = loc[:, idx] + scale[:, idx] * torch.randn((n, samples), generator=g, dtype=loc.dtype)
        out[i] = draw.numpy()
        var[i] = post["variance"].sel(source="total").values
    return xr.Dataset({"y": (("source", "point", "sample"), out), "variance": (("source", "point"), var)},
                      coords={"source": list(runs), "point": np.arange(n)},
                      attrs={"method": "uncertainty_sources", "members": members})
