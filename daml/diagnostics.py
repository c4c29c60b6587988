r"""Diagnostics of weighted ensembles: how far to trust a posterior.

Every function takes a posterior Dataset (see :mod:`daml.posterior`) and works along named
dimensions; the arithmetic runs once, in torch, over a trailing member axis (the ``*_kernel``
functions, usable directly on tensors of shape ``(..., N)``). Weights are always used: an equal-weight
ensemble is just the special case ``w_i = 1/N``.

Weight degeneracy
    :func:`ess` is Kish's effective sample size :math:`1/\sum_i w_i^2` (Kish 1965; Liu 1996), between 1
    (all weight on one member) and ``N``. :func:`psis` fits a generalised Pareto distribution to the
    largest importance ratios and replaces them by the fitted quantiles (Pareto-smoothed importance
    sampling, Vehtari, Simpson, Gelman, Yao & Gabry 2024, JMLR 25(72)); the fitted shape
    :math:`\hat k` says whether the weights can be trusted: below
    :func:`pareto_khat_threshold` (``min(1 - 1/log10 N, 0.7)``) the estimate converges at a useful
    rate, above it the weights are too heavy-tailed. The GPD fit is the empirical-Bayes estimate of
    Zhang & Stephens (2009) with the weakly informative prior of Vehtari et al., as in ArviZ and loo.

Accuracy against a truth
    :func:`rmse` is the root-mean-square error of the weighted mean, :func:`spread` the root-mean
    ensemble variance (DAPPER's ``rmse`` and ``rmv``). :func:`crps` is the continuous ranked
    probability score of the weighted empirical distribution,

    .. math:: \mathrm{CRPS} = \sum_i w_i |x_i - y| - \tfrac12 \sum_{i,j} w_i w_j |x_i - x_j|,

    computed in :math:`O(N \log N)` by sorting; ``estimator="fair"`` divides the second term by
    :math:`1 - \sum_i w_i^2` (Ferro 2014's fair CRPS for equal weights, :math:`N(N-1)` in place of
    :math:`N^2`; for fixed unequal weights and members drawn independently from the forecast
    distribution it is unbiased for that distribution's CRPS). :func:`energy_score` is the
    multivariate analogue with Euclidean norms (Gneiting & Raftery 2007).

Calibration
    :func:`pit` is the weighted probability integral transform :math:`\sum_i w_i 1[x_i < y]`, ties
    split at random when a seed is given. :func:`rank_histogram` bins it; with ``N + 1`` bins and equal
    weights the counts are exactly the Talagrand rank histogram (rank ``k`` of the truth among the
    members falls in bin ``k``). :func:`rank_histogram_flatness` tests flatness with a chi-square test.
    :func:`spread_skill` is the spread-skill ratio with the finite-ensemble correction of Fortin et al.
    (2014, MWR 142): for a reliable ensemble of ``N`` exchangeable members,
    :math:`E[(\bar x - y)^2] = (1 + 1/N)\,E[s^2]` with :math:`s^2` the unbiased ensemble variance, so
    :math:`\sqrt{(1 + 1/N) \overline{s^2}} / \mathrm{RMSE}` is 1 on average; with weights, Kish's ESS
    takes the place of ``N`` and :math:`s^2 = \sum_i w_i (x_i - \bar x)^2 / (1 - \sum_i w_i^2)`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import xarray as xr

from . import _device
from .errors import DtypeError, InputError, NonFiniteError, ShapeError, check_fits, check_int
from .posterior import LOG_WEIGHT, MEMBER, _all_finite, member_vars, validate, weighted_var

__all__ = [
    "TIME",
    "ess",
    "psis",
    "PSISResult",
    "pareto_khat_threshold",
    "rmse",
    "spread",
    "crps",
    "energy_score",
    "pit",
    "rank_histogram",
    "rank_histogram_flatness",
    "FlatnessResult",
    "spread_skill",
    "describe",
    "ess_kernel",
    "psis_kernel",
    "crps_kernel",
    "energy_score_kernel",
    "pit_kernel",
]

TIME = "time"


# ================================================================================================
# torch kernels: member on the last axis, leading dims batched, weights normalised over the last axis
# ================================================================================================

def _kernel_tensor(value: Any, name: str, min_ndim: int = 1, allow_neg_inf: bool = False) -> torch.Tensor:
    """Check a kernel input: a float32/float64 torch tensor of at least ``min_ndim`` dims, with a
    non-empty last axis, finite (``-inf`` allowed where ``allow_neg_inf``: a zero weight)."""
    if not isinstance(value, torch.Tensor):
        raise DtypeError(name, "a torch.Tensor (the kernels take tensors; the xarray functions take posteriors)",
                         type(value).__name__)
    if value.dtype not in (torch.float32, torch.float64):
        raise DtypeError(name, "float32 or float64 values", f"dtype {value.dtype}")
    if value.ndim < min_ndim or (min_ndim and value.shape[-1] == 0):
        raise ShapeError(name, f"at least {min_ndim} dims with a non-empty last axis", f"shape {tuple(value.shape)}")
    if not _all_finite(value):
        bad = torch.isnan(value) | (value == math.inf) if allow_neg_inf else ~torch.isfinite(value)
        if bool(bad.any()):
            raise NonFiniteError(name, "finite values" + (" (or -inf for a zero weight)" if allow_neg_inf else ""),
                                 f"{int(bad.sum())} NaN or infinite entries")
        if bool(torch.isneginf(value).all(-1).any()):
            raise NonFiniteError(name, "at least one finite log-weight per row", "a row of only -inf")
    return value


def _kernel_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(name, "True or False", repr(value)[:80])
    return bool(value)


def _kernel_batch(name: str, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError as exc:
        raise ShapeError(name, "shapes that broadcast against the ensemble's batch shape",
                         f"shapes {[tuple(s) for s in shapes]}") from exc


def ess_kernel(log_weight: torch.Tensor) -> torch.Tensor:
    """Kish ESS of (unnormalised) log-weights ``(..., N)`` -> ``(...)``."""
    log_weight = _kernel_tensor(log_weight, "log_weight", allow_neg_inf=True)
    # shifted by the row's maximum first: subtracting logsumexp from log-weights of large magnitude
    # (1e17) would cancel every digit of the differences between them
    shifted = log_weight - log_weight.amax(-1, keepdim=True)
    lw = shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)
    return torch.exp(-torch.logsumexp(2.0 * lw, dim=-1))


def _gpd_fit(z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhang-Stephens empirical-Bayes fit of a generalised Pareto distribution, batched.

    ``z`` (..., M) holds exceedances sorted ascending; ``mask`` marks the valid ones (a suffix of each
    row). Returns the shape ``k`` (with the weak prior of Vehtari et al.) and the scale ``sigma``.
    """
    dtype = z.dtype
    n = mask.sum(-1).to(dtype)                                      # (...)
    m_tail = z.shape[-1]
    first = m_tail - mask.sum(-1)                                   # index of the first valid entry
    zmax = z[..., -1]
    q_index = first + torch.floor(n / 4 + 0.5).long() - 1          # the lower quartile of the tail
    z_q = torch.gather(z, -1, q_index.clamp(0, m_tail - 1).unsqueeze(-1)).squeeze(-1)
    m_est = 30 + torch.floor(torch.sqrt(n)).long()                  # grid size, per row
    grid_max = 30 + int(math.isqrt(m_tail))
    j = torch.arange(1, grid_max + 1, dtype=dtype, device=z.device)
    grid_ok = j <= m_est.unsqueeze(-1).to(dtype)                    # (..., G)
    b = 1.0 - torch.sqrt(m_est.unsqueeze(-1).to(dtype) / (j - 0.5))
    b = b / (3.0 * z_q.unsqueeze(-1)) + 1.0 / zmax.unsqueeze(-1)    # prior_bs = 3
    # k(b) = mean over the tail of log(1 - b z); masked entries contribute 0
    terms = torch.log1p(-b.unsqueeze(-1) * z.unsqueeze(-2))         # (..., G, M)
    terms = torch.where(mask.unsqueeze(-2), terms, torch.zeros((), dtype=dtype, device=z.device))
    k_grid = terms.sum(-1) / n.unsqueeze(-1)
    profile = n.unsqueeze(-1) * (torch.log(-b / k_grid) - k_grid - 1.0)
    profile = torch.where(grid_ok, profile, torch.full((), -math.inf, dtype=dtype, device=z.device))
    w = torch.softmax(profile, dim=-1)
    w = torch.where(w >= 10 * torch.finfo(dtype).eps, w, torch.zeros((), dtype=dtype, device=z.device))
    w = w / w.sum(-1, keepdim=True)
    b_post = (b * w).sum(-1)
    k_terms = torch.log1p(-b_post.unsqueeze(-1) * z)
    k_post = torch.where(mask, k_terms, torch.zeros((), dtype=dtype, device=z.device)).sum(-1) / n
    sigma = -k_post / b_post
    k = (n * k_post + 10.0 * 0.5) / (n + 10.0)                      # prior_k = 10 pulls k towards 0.5
    return k, sigma


def psis_kernel(log_ratio: torch.Tensor, r_eff: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto-smoothed, normalised log-weights and k-hat of log importance ratios ``(..., S)``.

    The ``M = ceil(min(S / 5, 3 sqrt(S / r_eff)))`` largest ratios above the ``(M+1)``-th largest form
    the tail. With fewer than five of them k-hat is ``inf`` and the weights are only normalised; when
    the fit fails (non-finite k-hat or non-positive scale) the raw weights are kept.

    Returns
    -------
    log_weight : torch.Tensor, shape (..., S)
        Smoothed log-weights, normalised over the last axis.
    khat : torch.Tensor, shape (...)
        Estimated Pareto shape.
    """
    log_ratio = _kernel_tensor(log_ratio, "log_ratio", allow_neg_inf=True)
    if isinstance(r_eff, bool) or not (isinstance(r_eff, (int, float)) and 0 < r_eff <= 1e6):
        raise InputError("r_eff", "a positive number", repr(r_eff))
    s = log_ratio.shape[-1]
    dtype, dev = log_ratio.dtype, log_ratio.device
    x = log_ratio - log_ratio.max(dim=-1, keepdim=True).values
    inf = torch.full(x.shape[:-1], math.inf, dtype=dtype, device=dev)
    if s < 2:
        return x - torch.logsumexp(x, -1, keepdim=True), inf
    m = int(math.ceil(min(s / 5.0, 3.0 * math.sqrt(s / r_eff))))
    xs, order = torch.sort(x, dim=-1)
    cutoff = torch.clamp(xs[..., s - m - 1], min=math.log(torch.finfo(torch.float64).tiny))
    tail = xs[..., s - m:]
    mask = tail > cutoff.unsqueeze(-1)
    n_tail = mask.sum(-1)
    enough = n_tail > 4
    exp_cut = torch.exp(cutoff).unsqueeze(-1)
    z = torch.where(mask, torch.exp(tail) - exp_cut, torch.zeros((), dtype=dtype, device=dev))
    k, sigma = _gpd_fit(z, mask & enough.unsqueeze(-1))
    smooth = enough & torch.isfinite(k) & (sigma > 0)
    # ordered statistics of the fitted GPD at (r + 1/2) / n for tail ranks r = 0..n-1
    rank = torch.arange(m, device=dev, dtype=dtype) - (m - n_tail).unsqueeze(-1).to(dtype)
    p = (rank + 0.5) / n_tail.clamp(min=1).unsqueeze(-1).to(dtype)
    p = p.clamp(0.0, 1.0 - torch.finfo(dtype).eps)
    kk = k.unsqueeze(-1)
    small_k = kk.abs() < torch.finfo(dtype).eps
    safe_k = torch.where(small_k, torch.ones_like(kk), kk)
    quant = torch.where(small_k, -torch.log1p(-p), torch.expm1(-safe_k * torch.log1p(-p)) / safe_k)
    new_tail = torch.log(quant * sigma.unsqueeze(-1) + exp_cut)
    new_tail = torch.where(mask & smooth.unsqueeze(-1), new_tail.clamp(max=0.0), tail)
    xs = torch.cat([xs[..., : s - m], new_tail], dim=-1)
    out = torch.empty_like(x).scatter_(-1, order, xs)
    k = torch.where(enough, k, inf)
    return out - torch.logsumexp(out, dim=-1, keepdim=True), k


def _sum_w_abs_diff(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_{i,j} w_i w_j |x_i - x_j|`` over the last axis in O(N log N) (weights sum to one)."""
    xs, order = torch.sort(x, dim=-1)
    return _sum_w_abs_diff_sorted(xs, torch.gather(w, -1, order))


def _sum_w_abs_diff_sorted(xs: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """:func:`_sum_w_abs_diff` of members ``xs`` already sorted along the last axis, ``ws`` their
    weights in the same order."""
    cum = torch.cumsum(ws, dim=-1)
    total = cum[..., -1:]
    return 2.0 * (ws * xs * (2.0 * cum - ws - total)).sum(-1)


def crps_kernel(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, fair: bool = False) -> torch.Tensor:
    """CRPS of weighted ensembles ``x`` (..., N) with weights ``w`` (..., N) for outcomes ``y`` (...)."""
    x, w, y = _kernel_tensor(x, "x"), _kernel_tensor(w, "w"), _kernel_tensor(y, "y", 0)
    fair = _kernel_flag(fair, "fair")
    _kernel_batch("w", x.shape, w.shape)
    x, w = torch.broadcast_tensors(x, w)
    batch = _kernel_batch("y", x.shape[:-1], y.shape)
    if tuple(batch) != tuple(x.shape[:-1]):   # y has more (or longer) batch dims: every outcome its ensemble
        x, w = x.expand(*batch, x.shape[-1]), w.expand(*batch, w.shape[-1])
    d = x - y.unsqueeze(-1)                   # shift by the outcome: |x_i - x_j| is unchanged
    spread_term = _sum_w_abs_diff(d, w)
    if fair:
        spread_term = spread_term / (1.0 - (w * w).sum(-1))
    return (w * d.abs()).sum(-1) - 0.5 * spread_term


def energy_score_kernel(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, fair: bool = False) -> torch.Tensor:
    """Energy score of weighted ensembles ``x`` (..., N, D), weights (..., N), outcomes ``y`` (..., D)."""
    x, w, y = _kernel_tensor(x, "x", 2), _kernel_tensor(w, "w"), _kernel_tensor(y, "y")
    fair = _kernel_flag(fair, "fair")
    if w.shape[-1] != x.shape[-2] or y.shape[-1] != x.shape[-1]:
        raise ShapeError("w, y", f"w (..., {x.shape[-2]}) and y (..., {x.shape[-1]}) for x of shape {tuple(x.shape)}",
                         f"shapes {tuple(w.shape)}, {tuple(y.shape)}")
    batch = _kernel_batch("x, w, y", x.shape[:-2], w.shape[:-1], y.shape[:-1])
    n, d = x.shape[-2], x.shape[-1]
    x = x.expand(*batch, n, d).reshape(-1, n, d)
    w = w.expand(*batch, n).reshape(-1, n)
    y = y.expand(*batch, d).reshape(-1, 1, d)
    to_obs = torch.linalg.vector_norm(x - y, dim=-1)
    pair = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    spread_term = torch.einsum("bi,bij,bj->b", w, pair, w)
    if fair:
        spread_term = spread_term / (1.0 - (w * w).sum(-1))
    return ((w * to_obs).sum(-1) - 0.5 * spread_term).reshape(batch)


def pit_kernel(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted PIT ``sum_i w_i 1[x_i < y] + u sum_i w_i 1[x_i = y]`` (``u = 1/2`` when ``None``)."""
    x, w, y = _kernel_tensor(x, "x"), _kernel_tensor(w, "w"), _kernel_tensor(y, "y", 0)
    _kernel_batch("w", x.shape, w.shape)
    _kernel_batch("y", x.shape[:-1], y.shape)
    if u is not None:
        u = _kernel_tensor(u, "u", 0)
        _kernel_batch("u", x.shape[:-1], y.shape, u.shape)
        if bool(((u < 0) | (u > 1)).any()):
            raise InputError("u", "tie-breaking uniforms in [0, 1]", "values outside")
    x, w = torch.broadcast_tensors(x, w)
    yy = y.unsqueeze(-1)
    below = (w * (x < yy)).sum(-1)
    ties = (w * (x == yy)).sum(-1)
    frac = torch.full_like(below, 0.5) if u is None else u
    return (below + frac * ties).clamp(0.0, 1.0)


# ================================================================================================
# xarray layer
# ================================================================================================

def _apply(func: Callable, *arrays: xr.DataArray, core: Sequence[Sequence[str]],
           out_core: Sequence[str] = (), **kwargs) -> xr.DataArray:
    """Run a torch kernel on DataArrays: core dims moved last, other dims broadcast, exact alignment."""

    def wrapped(*values):
        tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in values]
        return func(*tensors, **kwargs).numpy()

    return xr.apply_ufunc(wrapped, *arrays, input_core_dims=[list(c) for c in core],
                          output_core_dims=[list(out_core)], join="exact")


def _pick(post: xr.Dataset, var: str | None) -> tuple[xr.DataArray, xr.DataArray]:
    """The member variable to score and the normalised weights."""
    validate(post)
    names = member_vars(post)
    if var is not None and not isinstance(var, str):
        raise InputError("var", f"None or one of {names}", repr(var)[:80])
    if var is None:
        if len(names) != 1:
            raise InputError("var", f"one of {names} (the posterior has several member variables)", None)
        var = names[0]
    if var not in names:
        raise InputError("var", f"one of {names}", repr(var))
    return post[var].astype(np.result_type(post[var].dtype, np.float32)), np.exp(post[LOG_WEIGHT])


def _truth(truth: Any, x: xr.DataArray, var: str | None) -> xr.DataArray:
    """The truth as a DataArray on the member variable's dims (minus ``member``), aligned exactly."""
    if isinstance(truth, xr.Dataset):
        name = var if var is not None else x.name
        if name not in truth:
            raise InputError("truth", f"a Dataset holding {name!r}", f"variables {list(truth.data_vars)}")
        truth = truth[name]
    if not isinstance(truth, xr.DataArray):
        raise InputError("truth", "an xarray DataArray or Dataset", type(truth).__name__)
    if MEMBER in truth.dims:
        raise ShapeError("truth", "no 'member' dimension", f"dims {truth.dims}")
    extra = [d for d in truth.dims if d not in x.dims]
    if extra:
        raise ShapeError("truth", f"dims among {tuple(d for d in x.dims if d != MEMBER)}", f"dims {truth.dims}")
    for d in truth.dims:  # a truth on a finer index (every model step) is sampled at the posterior's labels
        if d in truth.indexes and d in x.indexes and not truth.indexes[d].equals(x.indexes[d]):
            try:
                truth = truth.sel({d: x.indexes[d]})
            except KeyError as exc:
                raise ShapeError("truth", f"every {d!r} label of the posterior", "some missing",
                                 hint=str(exc)[:200]) from exc
    sizes = {d: (truth.sizes[d], x.sizes[d]) for d in truth.dims if truth.sizes[d] != x.sizes[d]}
    if sizes:
        raise ShapeError("truth", "the posterior's dimension sizes", f"(truth, posterior) sizes {sizes}")
    try:
        xr.align(x, truth, join="exact")
    except ValueError as exc:
        raise ShapeError("truth", "coordinates equal to the posterior's", "different coordinates",
                         hint=str(exc).splitlines()[0]) from exc
    if truth.dtype.kind not in "fiu":
        raise InputError("truth", "real numbers", f"dtype {truth.dtype}")
    if not np.isfinite(truth.values).all():
        raise NonFiniteError("truth", "finite values", f"{int((~np.isfinite(truth.values)).sum())} NaN or infinite entries")
    return truth.astype(x.dtype)


def _reduce_dims(da: xr.DataArray, dim: str | Sequence[str] | None, default_keep: Sequence[str] = ()) -> list[str]:
    if dim is None:
        return [d for d in da.dims if d not in default_keep]
    if not (isinstance(dim, str) or (isinstance(dim, (list, tuple)) and all(isinstance(d, str) for d in dim))):
        raise ShapeError("dim", f"a dimension name or a list of names among {da.dims}", repr(dim)[:80])
    dims = [dim] if isinstance(dim, str) else list(dim)
    unknown = [d for d in dims if d not in da.dims]
    if unknown:
        raise ShapeError("dim", f"names among {da.dims}", dims)
    return dims


def ess(post: xr.Dataset | xr.DataArray, dim: str = MEMBER) -> xr.DataArray:
    """Kish effective sample size ``1 / sum_i w_i^2``.

    Parameters
    ----------
    post : xarray.Dataset or xarray.DataArray
        A posterior (its ``log_weight`` is used) or log-weights, normalised or not.
    dim : str
        The sample dimension of a DataArray input.

    Returns
    -------
    xarray.DataArray
        ESS in ``[1, N]`` with the dims of the log-weights minus ``dim``. Invariant to adding a
        constant to the log-weights.
    """
    lw = _log_weights(post, dim)
    return _apply(ess_kernel, lw, core=[[dim]]).rename("ess")


class PSISResult(NamedTuple):
    """Result of :func:`psis`."""

    log_weight: xr.DataArray
    """Smoothed log-weights normalised over the sample dimension."""
    khat: xr.DataArray
    """Pareto shape estimate per batch index (``inf`` when the tail is too short to fit)."""


def pareto_khat_threshold(n: int) -> float:
    """The k-hat above which importance sampling with ``n`` draws is unreliable: ``min(1 - 1/log10 n, 0.7)``."""
    n = check_int(n, "n", minimum=2, expected="an int number of draws, at least 2")
    return min(1.0 - 1.0 / math.log10(n), 0.7)


def psis(post: xr.Dataset | xr.DataArray, dim: str = MEMBER, r_eff: float = 1.0) -> PSISResult:
    """Pareto-smoothed importance sampling (see the module docstring).

    Parameters
    ----------
    post : xarray.Dataset or xarray.DataArray
        A posterior (its ``log_weight`` are the log importance ratios, up to a constant) or the log
        ratios ``log p - log q`` themselves.
    dim : str
        Sample dimension of a DataArray input.
    r_eff : float
        Relative efficiency of the draws (1 for independent draws).

    Returns
    -------
    PSISResult
        ``log_weight`` (same dims as the input) and ``khat`` (without ``dim``). Equal to ArviZ's
        ``psislw(..., reff=r_eff)`` on the same input.
    """
    if isinstance(r_eff, bool) or not (isinstance(r_eff, (int, float)) and 0 < r_eff <= 1e6):
        raise InputError("r_eff", "a positive number", repr(r_eff))
    lw = _log_weights(post, dim)
    out = xr.apply_ufunc(
        lambda v: tuple(t.numpy() for t in psis_kernel(torch.from_numpy(np.ascontiguousarray(v)), r_eff)),
        lw, input_core_dims=[[dim]], output_core_dims=[[dim], []],
    )
    return PSISResult(out[0].transpose(*lw.dims).rename(LOG_WEIGHT), out[1].rename("khat"))


def _log_weights(post: Any, dim: str) -> xr.DataArray:
    if not isinstance(dim, str):
        raise ShapeError("dim", "the name (str) of the sample dimension", repr(dim)[:80])
    if isinstance(post, xr.Dataset):
        if dim != MEMBER:
            raise ShapeError("dim", f"{MEMBER!r} for a posterior Dataset", repr(dim))
        return validate(post)[LOG_WEIGHT]
    if not isinstance(post, xr.DataArray):
        raise InputError("post", "a posterior Dataset or a DataArray of log-weights", type(post).__name__)
    if dim not in post.dims or post.sizes[dim] < 1:
        raise ShapeError("post", f"a non-empty {dim!r} dimension", f"dims {dict(post.sizes)}")
    if post.dtype.kind != "f" or post.dtype.itemsize < 4:
        raise InputError("post", "float32 or float64 log-weights", f"dtype {post.dtype}")
    if not np.isfinite(post.values).all():
        raise NonFiniteError("post", "finite log-weights", f"{int((~np.isfinite(post.values)).sum())} NaN or infinite entries")
    return post


def rmse(post: xr.Dataset, truth: xr.DataArray | xr.Dataset, var: str | None = None,
         dim: str | Sequence[str] | None = None) -> xr.DataArray:
    """Root-mean-square error of the weighted mean against ``truth``.

    Parameters
    ----------
    post : xarray.Dataset
        A posterior.
    truth : xarray.DataArray or Dataset
        The true state, on the dims of the member variable without ``member`` (or a subset that
        broadcasts). Coordinates must match exactly, except that a truth indexed more finely (every
        model step, say) is sampled at the posterior's labels; a missing label raises.
    var : str, optional
        The member variable (needed when the posterior has several).
    dim : str or sequence of str, optional
        Dims averaged inside the root. Default: the state dims, i.e. every dim except ``time`` and
        the batch dims of the weights (such as ``experiment``), so a filter's posterior gives an RMSE
        time series per experiment (DAPPER's spatial RMS).

    Returns
    -------
    xarray.DataArray
        ``sqrt(mean_dim((sum_i w_i x_i - y)^2))``.
    """
    x, w = _pick(post, var)
    y = _truth(truth, x, var)
    err2 = (x.weighted(w).mean(MEMBER) - y) ** 2
    return np.sqrt(err2.mean(_reduce_dims(err2, dim, (TIME, *w.dims)))).rename("rmse")


def spread(post: xr.Dataset, var: str | None = None, dim: str | Sequence[str] | None = None) -> xr.DataArray:
    """Ensemble spread: ``sqrt(mean_dim(s^2))`` with ``s^2`` the unbiased weighted variance.

    ``s^2 = sum_i w_i (x_i - mean)^2 / (1 - sum_i w_i^2)``, which is the usual ``N - 1`` variance for
    equal weights (DAPPER's ``rmv``). ``dim`` as in :func:`rmse` (default: the state dims).
    """
    x, w = _pick(post, var)
    v = weighted_var(x, w, ddof=1, argument="post")
    return np.sqrt(v.mean(_reduce_dims(v, dim, (TIME, *w.dims)))).rename("spread")


def crps(post: xr.Dataset, truth: xr.DataArray | xr.Dataset, var: str | None = None,
         estimator: str = "exact") -> xr.DataArray:
    """Continuous ranked probability score of each marginal of a weighted ensemble.

    Parameters
    ----------
    post, truth, var
        As in :func:`rmse`.
    estimator : {"exact", "fair"}
        ``"exact"``: the CRPS of the weighted empirical distribution (equals properscoring's and
        scoringrules' weighted ensemble CRPS). ``"fair"``: the spread term divided by
        ``1 - sum_i w_i^2`` (Ferro's fair CRPS for equal weights); needs two members or more.

    Returns
    -------
    xarray.DataArray
        CRPS per point (only ``member`` is reduced; average it as you need). Lower is better.
    """
    fair = _estimator(estimator)
    x, w = _pick(post, var)
    y = _truth(truth, x, var)
    if fair and x.sizes[MEMBER] < 2:
        raise InputError("estimator", "'exact' for a single member", "'fair'")
    return _apply(crps_kernel, x, w, y, core=[[MEMBER], [MEMBER], []], fair=fair).rename("crps")


def energy_score(post: xr.Dataset, truth: xr.DataArray | xr.Dataset, var: str | None = None,
                 dim: str = "variable", estimator: str = "exact") -> xr.DataArray:
    """Energy score of the multivariate weighted ensemble along ``dim``.

    ``sum_i w_i ||x_i - y|| - 1/2 sum_{i,j} w_i w_j ||x_i - x_j||`` with Euclidean norms over ``dim``;
    ``estimator`` as in :func:`crps`. Reduces ``member`` and ``dim``. Memory grows as ``N^2`` per point.
    """
    fair = _estimator(estimator)
    x, w = _pick(post, var)
    y = _truth(truth, x, var)
    if not isinstance(dim, str) or dim not in x.dims or dim == MEMBER or dim in w.dims:
        raise ShapeError("dim", f"a state dimension of the member variable among {x.dims} (not a weight dim)", dim)
    if dim not in y.dims:
        raise ShapeError("truth", f"the dimension {dim!r}", f"dims {y.dims}")
    if fair and x.sizes[MEMBER] < 2:
        raise InputError("estimator", "'exact' for a single member", "'fair'")
    n_points = float(np.prod([s for d, s in xr.broadcast(x, y)[0].sizes.items() if d not in (MEMBER, dim)],
                             dtype=float))
    check_fits("post", n_points * float(x.sizes[MEMBER]) ** 2 * 8.0 * 2,
               what=f"{x.sizes[MEMBER]} members at {int(n_points)} points (pairwise distances)")
    return _apply(energy_score_kernel, x, w, y, core=[[MEMBER, dim], [MEMBER], [dim]], fair=fair
                  ).rename("energy_score")


def _estimator(estimator: str) -> bool:
    if not isinstance(estimator, str) or estimator not in ("exact", "fair"):
        raise InputError("estimator", "'exact' or 'fair'", repr(estimator))
    return estimator == "fair"


def pit(post: xr.Dataset, truth: xr.DataArray | xr.Dataset, var: str | None = None,
        seed: _device.Seed = None) -> xr.DataArray:
    """Weighted probability integral transform of the truth under the ensemble.

    ``u = sum_i w_i 1[x_i < y] + V sum_i w_i 1[x_i = y]``: the weighted empirical CDF at the truth,
    with ties split by ``V ~ U(0, 1)`` drawn from ``seed`` (``V = 1/2`` when ``seed`` is ``None``).
    For equal weights ``u = k / N`` with ``k`` the rank of the truth among the members.
    """
    x, w = _pick(post, var)
    y = _truth(truth, x, var)
    shape_da = xr.broadcast(x.isel({MEMBER: 0}, drop=True), y)[0]
    u = None
    if seed is not None:
        g = _device.generator(seed)
        u = xr.DataArray(torch.rand(shape_da.shape, generator=g, dtype=torch.float64).numpy(),
                         dims=shape_da.dims, coords=shape_da.coords).astype(x.dtype)
    if u is None:
        return _apply(pit_kernel, x, w, y, core=[[MEMBER], [MEMBER], []]).rename("pit")
    return _apply(pit_kernel, x, w, y, u, core=[[MEMBER], [MEMBER], [], []]).rename("pit")


def rank_histogram(post: xr.Dataset, truth: xr.DataArray | xr.Dataset, var: str | None = None,
                   bins: int | None = None, dim: str | Sequence[str] | None = None,
                   seed: _device.Seed = None) -> xr.DataArray:
    """Weighted rank histogram: counts of the :func:`pit` values in equal bins of ``[0, 1]``.

    Parameters
    ----------
    post, truth, var
        As in :func:`rmse`.
    bins : int, optional
        Number of bins; default ``N + 1``, which for equal weights gives the classical rank histogram
        (bin ``k`` counts the cases where ``k`` members lie below the truth).
    dim : str or sequence of str, optional
        Dims pooled into the histogram; default all. Dims not pooled are kept (a histogram per
        variable, say).
    seed
        Tie-breaking stream for :func:`pit`.

    Returns
    -------
    xarray.DataArray
        Integer counts with the new dim ``rank`` (coordinates ``0..bins-1`` and the bin bounds
        ``lower``, ``upper``). A flat histogram means calibrated; U-shaped, under-dispersed; dome-shaped,
        over-dispersed; sloped, biased.
    """
    u = pit(post, truth, var=var, seed=seed)
    n_bins = post.sizes[MEMBER] + 1 if bins is None else bins
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise InputError("bins", "a positive int", repr(bins))
    pooled = _reduce_dims(u, dim)
    keep = [d for d in u.dims if d not in pooled]
    check_fits("bins", float(np.prod([u.sizes[d] for d in keep], dtype=float)) * float(n_bins) * 8.0,
               what=f"bins={int(n_bins)}")

    def count(values: torch.Tensor) -> torch.Tensor:
        idx = torch.clamp((values * n_bins).floor().long(), 0, n_bins - 1)
        out = torch.zeros(*values.shape[:-1], n_bins, dtype=torch.int64)
        return out.scatter_add_(-1, idx, torch.ones_like(idx))

    u = u.drop_vars([c for c in u.coords if set(u[c].dims) & set(pooled)])
    stacked = u.stack(_pooled=pooled, create_index=False) if pooled else u.expand_dims(_pooled=1)
    hist = _apply(count, stacked, core=[["_pooled"]], out_core=["rank"])
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    hist = hist.assign_coords(rank=np.arange(n_bins), lower=("rank", edges[:-1]), upper=("rank", edges[1:]))
    return hist.transpose(*keep, "rank").rename("rank_histogram")


class FlatnessResult(NamedTuple):
    """Result of :func:`rank_histogram_flatness`."""

    statistic: xr.DataArray
    """Pearson's chi-square statistic against equal counts."""
    pvalue: xr.DataArray
    """Probability of a statistic at least this large under flatness."""
    dof: int
    """Degrees of freedom (bins - 1)."""


def rank_histogram_flatness(hist: xr.DataArray, dim: str = "rank") -> FlatnessResult:
    """Chi-square test that a rank histogram is flat.

    Assumes the pooled cases are independent; serially correlated cases (consecutive times of a
    filter) make the test over-reject, so thin them first.
    """
    from scipy import stats

    if not isinstance(dim, str):
        raise ShapeError("dim", "the name (str) of the bin dimension", repr(dim)[:80])
    if not isinstance(hist, xr.DataArray) or dim not in hist.dims or hist.sizes[dim] < 2:
        raise ShapeError("hist", f"a DataArray with a {dim!r} dimension of 2 or more bins", getattr(hist, "dims", type(hist)))
    if hist.dtype.kind not in "iuf" or (hist.dtype.kind == "f" and not np.isfinite(hist.values).all()) \
            or bool((hist < 0).any()):
        raise InputError("hist", "finite non-negative counts", f"dtype {hist.dtype}")
    if bool((hist.sum(dim) == 0).any()):
        raise InputError("hist", "at least one count per histogram", "an empty histogram (all counts 0)")
    total = hist.sum(dim)
    expected = total / hist.sizes[dim]
    stat = ((hist - expected) ** 2 / expected).sum(dim).rename("chi2")
    dof = hist.sizes[dim] - 1
    p = xr.apply_ufunc(lambda s: stats.chi2.sf(s, dof), stat).rename("pvalue")
    return FlatnessResult(stat, p, dof)


def spread_skill(post: xr.Dataset, truth: xr.DataArray | xr.Dataset, var: str | None = None,
                 dim: str | Sequence[str] | None = None) -> xr.DataArray:
    """Spread-skill ratio with the finite-ensemble correction (1 for a reliable ensemble).

    ``sqrt(mean_dim((1 + 1/ESS) s^2)) / sqrt(mean_dim((mean - y)^2))`` with ``s^2`` the unbiased
    weighted variance and ``ESS`` Kish's (``N`` for equal weights). Below 1: under-dispersed; above
    1: over-dispersed. ``dim`` defaults to every dim (a single number).
    """
    x, w = _pick(post, var)
    y = _truth(truth, x, var)
    s2 = weighted_var(x, w, ddof=1, argument="post")
    n_eff = 1.0 / (w * w).sum(MEMBER)
    err2 = (x.weighted(w).mean(MEMBER) - y) ** 2
    s2, err2 = xr.broadcast((1.0 + 1.0 / n_eff) * s2, err2)
    dims = _reduce_dims(err2, dim)
    s2m, e2m = s2.mean(dims), err2.mean(dims)
    perfect = e2m.values == 0
    if perfect.any():
        # a ratio x / 0: inf where the ensemble has spread (unboundedly over-dispersed for an error of
        # 0), 1 where it has none either (spread and error agree exactly); never a silent NaN
        import warnings

        warnings.warn(f"spread_skill: the RMSE is 0 at {int(perfect.sum())} of {perfect.size} points (the "
                      "weighted mean equals the truth exactly, e.g. a truth taken from the members); the "
                      "ratio is inf there where the spread is positive and 1 where the spread is 0 too",
                      UserWarning, stacklevel=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.sqrt(s2m / e2m)
        ratio = ratio.where(~xr.DataArray(perfect, dims=e2m.dims) | (s2m > 0), 1.0)
        return ratio.rename("spread_skill")
    return np.sqrt(s2m / e2m).rename("spread_skill")


def _members_in_memory(post: xr.Dataset) -> bool:
    """Whether every member variable's values are in memory (not waiting in a lazily opened file)."""
    return all(getattr(post[k].variable, "_in_memory", True) for k in member_vars(post))


def _describe_summary(summary: xr.Dataset) -> str:
    """The lines of :func:`describe` for a summary Dataset (weighted statistics, no members)."""
    from .io import _check_summary

    _check_summary(summary, "post")
    lines = [
        f"method: {summary.attrs['method']}   seed: {summary.attrs['seed']}   daml {summary.attrs['daml_version']}",
        f"config: {summary.attrs['config']}",
        "kind: summary (weighted statistics, no members)",
        "dims: " + ", ".join(f"{d}={s}" for d, s in summary.sizes.items()),
        "variables: " + ", ".join(f"{k}{tuple(v.dims)} {v.dtype}" for k, v in summary.data_vars.items()),
    ]
    if "ess" in summary.data_vars and summary["ess"].dtype.kind in "fiu" and summary["ess"].size:
        e = summary["ess"].values
        if np.isfinite(e).any():
            lines.append(f"ESS: min {float(np.nanmin(e)):.2f}, mean {float(np.nanmean(e)):.2f}, "
                         f"max {float(np.nanmax(e)):.2f}")
    extra = {k: v for k, v in summary.attrs.items()
             if k not in ("method", "config", "seed", "daml_version", "daml_kind")}
    for key, value in extra.items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def describe(post: xr.Dataset) -> str:
    """A few lines summarising a posterior: structure, method, weights and their degeneracy.

    A lazily opened file (``daml.io.open_dataset(path, lazy=True)``) is summarised without reading its
    member variables: only ``log_weight`` (for the ESS and k-hat) is read, and the member values are
    not checked for NaN. A summary Dataset (``attrs["daml_kind"] == "summary"``) gets its method,
    dims, variables and, when it has ``ess``, the ESS range.
    """
    from .io import _is_summary
    from .posterior import _validate

    if _is_summary(post):
        return _describe_summary(post)
    _validate(post, members=_members_in_memory(post) if isinstance(post, xr.Dataset) else True)
    n = post.sizes[MEMBER]
    lw = post[LOG_WEIGHT]
    e = ess(lw)
    lines = [
        f"method: {post.attrs['method']}   seed: {post.attrs['seed']}   daml {post.attrs['daml_version']}",
        f"config: {post.attrs['config']}",
        "dims: " + ", ".join(f"{d}={s}" for d, s in post.sizes.items()),
        "variables: " + ", ".join(f"{k}{tuple(post[k].dims)} {post[k].dtype}" for k in member_vars(post)),
        f"weights over {lw.dims}: ESS min {float(e.min()):.2f}, "
        f"mean {float(e.mean()):.2f}, max {float(e.max()):.2f} of N = {n}",
    ]
    if n >= 2:
        k = psis(lw).khat
        thr = pareto_khat_threshold(n)
        finite = np.isfinite(k.values)
        if finite.any():
            bad = int((k.values[finite] > thr).sum())
            lines.append(f"PSIS k-hat: max {float(k.values[finite].max()):.3f}; "
                         f"{bad} of {int(finite.sum())} above the threshold {thr:.2f}")
        else:
            lines.append("PSIS k-hat: tail too short to fit (fewer than 5 tail draws)")
    extra = {k: v for k, v in post.attrs.items() if k not in ("method", "config", "seed", "daml_version")}
    for key, value in extra.items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)
