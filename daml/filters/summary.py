r"""Summary statistics of a weighted ensemble: what :func:`daml.filters.run` keeps with ``keep="summary"``.

A filter's posterior holds every member at every analysis: ``T * N * n`` numbers (1000 analyses of
3000 particles of Lorenz-96-40 in three experiments: 2.9 GB in float64). Most uses need far less: the
weighted mean and spread, a few quantiles, the effective sample size, and against a truth the CRPS and
the PIT (whose histogram is the rank histogram). A *summary* is a plain :class:`xarray.Dataset` of
these, with no ``member`` dimension (it is not a posterior, and :func:`daml.posterior.validate`
refuses it)::

    mean      (time, *batch, variable)              weighted mean  sum_i w_i x_i
    sd        (time, *batch, variable)              unbiased weighted standard deviation
    quantiles (quantile, time, *batch, variable)    weighted quantiles (coordinate quantile: the probabilities)
    ess       (time, *batch)                        Kish's effective sample size 1 / sum_i w_i^2
    crps      (time, *batch, variable)              CRPS of the weighted ensemble (with a truth)
    pit       (time, *batch, variable)              weighted PIT of the truth (with a truth)

``attrs["daml_kind"] == "summary"`` marks it, with ``members`` (``N``), ``keep`` and ``thin``.

Each statistic equals the one of the full posterior, computed by the same torch kernels:

* ``mean``: :meth:`PosteriorAccessor.mean` (``.daml.mean()``);
* ``sd``: the square root of :func:`daml.posterior.weighted_var` with ``ddof=1``,
  ``sum_i w_i (x_i - mean)^2 / (1 - sum_i w_i^2)``, as :func:`daml.diagnostics.spread` defines it.
  Where all the weight sits on one member (``sum_i w_i^2 = 1``, ESS 1) it is undefined: ``sd`` is NaN
  there (the posterior's ``spread`` refuses such a posterior), and a warning says how many points;
* ``quantiles``: ``.daml.quantile(q)``, xarray's weighted quantile (Akinshin's weighted version of
  the type-7 estimator: the linear interpolation of the weighted empirical quantile function, with
  Kish's ESS in place of ``N``), written here as a batched torch kernel;
* ``ess``: :func:`daml.diagnostics.ess`;
* ``crps``: :func:`daml.diagnostics.crps` (the exact CRPS of the weighted empirical distribution);
* ``pit``: :func:`daml.diagnostics.pit` with ``seed=None`` (ties split at 1/2).

:func:`summarise` builds the summary of a full posterior (so the streaming path of :func:`run` and
the full path can be compared), and :func:`summary_scores` the scores RMSE, spread and CRPS from
either kind of result.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr

from ..errors import InputError, ShapeError
from ..posterior import LOG_WEIGHT, MEMBER, member_vars, validate

__all__ = ["summarise", "summary_scores"]

SUMMARY_KIND = "summary"
"""``attrs["daml_kind"]`` of a summary Dataset."""

DEFAULT_QUANTILES = (0.05, 0.5, 0.95)

_ONE_MEMBER = 1.0 - 1e-12       # sum_i w_i^2 at or above this: all weight on one member (as weighted_var)


def describe_value(value: Any) -> str:
    """A one-line description of a given value for an error message (arrays and Datasets by type and
    shape, never their multi-line repr)."""
    if isinstance(value, (np.ndarray, torch.Tensor, xr.DataArray, xr.Dataset)):
        shape = dict(value.sizes) if isinstance(value, xr.Dataset) else tuple(value.shape)
        return f"{type(value).__name__} of shape {shape}"
    return " ".join(repr(value).split())[:80]


def check_quantiles(quantiles: Any, name: str = "quantiles") -> tuple[float, ...]:
    """``quantiles`` as a tuple of distinct probabilities in ``[0, 1]`` (at least one), else an
    :class:`~daml.errors.InputError` naming ``name``."""
    expected = "a non-empty sequence of distinct probabilities in [0, 1], e.g. (0.05, 0.5, 0.95)"
    if isinstance(quantiles, (str, bytes, bool, np.bool_, xr.Dataset)) or isinstance(quantiles, numbers.Number):
        raise InputError(name, expected, describe_value(quantiles))
    if isinstance(quantiles, (np.ndarray, torch.Tensor, xr.DataArray)):
        arr = np.asarray(quantiles.detach().cpu() if isinstance(quantiles, torch.Tensor) else quantiles)
        if arr.ndim != 1 or arr.dtype.kind not in "iuf":
            raise InputError(name, expected, describe_value(quantiles))
        values = arr.tolist()
    else:
        try:
            values = list(quantiles)
        except TypeError:
            raise InputError(name, expected, type(quantiles).__name__) from None
    if not values or len(values) > 1000 or any(
            isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) <= 1.0
            for v in values):
        raise InputError(name, expected, describe_value(quantiles))
    out = tuple(float(v) for v in values)
    if len(set(out)) != len(out):
        raise InputError(name, expected, f"{out!r} (a probability given twice)"[:120])
    return out


# ================================================================================================
# torch kernels: member on the last axis, weights w (normalised, broadcastable to x) over it
# ================================================================================================

def weighted_quantile_kernel(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Weighted quantiles ``(Q, ...)`` of ``x`` ``(..., N)`` with weights ``w`` (broadcastable).

    The estimator of xarray's ``DataArrayWeighted.quantile`` (method ``"linear"``): with the members
    sorted, ``W_j`` the cumulative normalised weights (``W_0 = 0``), ``n_w = (sum w)^2 / sum w^2``
    Kish's ESS and ``h = (n_w - 1) q + 1`` (clipped to ``[1, n_w]``), the quantile is
    ``sum_j x_(j) (v_j - v_{j-1})`` with ``v_j = n_w clip(W_j, (h-1)/n_w, h/n_w) - h + 1``: linear
    interpolation of the weighted empirical quantile function. Equal weights give numpy's default
    (type 7) quantile. Members of zero weight contribute nothing (xarray drops them).
    """
    w = w.expand_as(x)
    xs, order = torch.sort(x, dim=-1)
    return _sorted_quantiles(xs, torch.gather(w, -1, order), q)


def _sort_last(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(x, dim=-1)``; on the CPU without autograd through numpy's argsort, about twice as
    fast as torch's CPU sort for ensembles of hundreds to thousands of members (7.3 vs 3.3 ms for
    3 x 40 ensembles of 1000 float64 members on one core)."""
    if x.device.type == "cpu" and not x.requires_grad and x.dtype in (torch.float32, torch.float64):
        order = torch.from_numpy(np.argsort(x.numpy(), axis=-1))
        return torch.gather(x, -1, order), order
    return torch.sort(x, dim=-1)


def _sorted_quantiles(xs: torch.Tensor, ws: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """:func:`weighted_quantile_kernel` of members already sorted along the last axis, ``ws`` their
    weights in the same order (the sort is the costly part: :func:`summary_kernel` shares it)."""
    x = xs
    nw = ws.sum(-1) ** 2 / (ws * ws).sum(-1)                              # (...)
    ws = ws / ws.sum(-1, keepdim=True)
    cum = torch.cat([torch.zeros_like(ws[..., :1]), torch.cumsum(ws, dim=-1)], dim=-1)   # (..., N+1)
    qq = q.to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))         # (Q, 1...)
    h = torch.minimum(torch.maximum((nw - 1.0) * qq + 1.0, torch.ones_like(nw)), nw)     # (Q, ...)
    lo, hi = ((h - 1.0) / nw).unsqueeze(-1), (h / nw).unsqueeze(-1)
    u = torch.clamp(cum, min=lo, max=hi)                                                # (Q, ..., N+1)
    # v_j - v_{j-1} = n_w (u_j - u_{j-1}): the affine map of v cancels in the differences
    return (xs * torch.diff(u, dim=-1)).sum(-1) * nw


def summary_kernel(x: torch.Tensor, log_weight: torch.Tensor, q: torch.Tensor,
                   y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The per-point statistics of a weighted ensemble: member on the last axis.

    Parameters
    ----------
    x : torch.Tensor, shape (..., N)
        Members.
    log_weight : torch.Tensor, shape broadcastable to x
        Normalised log-weights.
    q : torch.Tensor, shape (Q,)
        Probabilities of the quantiles.
    y : torch.Tensor, shape (...), optional
        The truth: adds ``crps`` and ``pit``.

    Returns
    -------
    dict
        ``mean``, ``sd`` ``(...)`` (NaN where all the weight is on one member), ``quantile``
        ``(Q, ...)`` and, with ``y``, ``crps`` and ``pit`` ``(...)``.
    """
    from ..diagnostics import _sum_w_abs_diff_sorted, pit_kernel

    w = torch.exp(log_weight)
    wsum = w.sum(-1)
    mean = (w * x).sum(-1) / wsum
    var = (w * (x - mean.unsqueeze(-1)) ** 2).sum(-1) / wsum
    w2 = (w * w).sum(-1)
    one = w2 >= _ONE_MEMBER
    var = torch.where(one, torch.full((), math.nan, dtype=var.dtype, device=var.device), var / (1.0 - w2))
    # one sort serves the quantiles and the CRPS's spread term (sorting is most of the cost: with
    # 1000 members it dominated the summary, twice over when each statistic sorted on its own)
    w = w.expand_as(x)
    xs, order = _sort_last(x)
    ws = torch.gather(w, -1, order)
    out = {"mean": mean, "sd": torch.sqrt(var), "quantile": _sorted_quantiles(xs, ws, q)}
    if y is not None:
        # crps_kernel's formula, sum_i w_i |x_i - y| - 1/2 sum_ij w_i w_j |x_i - x_j|, with the spread
        # term from the sorted members (a shift by y leaves the order and the differences unchanged)
        d = xs - y.unsqueeze(-1)
        out["crps"] = (ws * d.abs()).sum(-1) - 0.5 * _sum_w_abs_diff_sorted(d, ws)
        out["pit"] = pit_kernel(x, w, y)
    return out


def warn_undefined_sd(sd: np.ndarray, where: str) -> None:
    """Warn where ``sd`` is NaN: all the weight on one member."""
    bad = int(np.isnan(sd).sum())
    if bad:
        warnings.warn(f"{where}: all the weight sits on one member (ESS 1) at {bad} of {sd.size} points; the "
                      "unbiased weighted sd is undefined there and stored as NaN", UserWarning, stacklevel=3)


# ================================================================================================
# xarray layer
# ================================================================================================

def summary_attrs(base: dict, members: int, keep: str, thin: int) -> dict:
    """The attrs of a summary: those of the posterior it stands for, marked as a summary."""
    attrs = dict(base)
    attrs.update({"daml_kind": SUMMARY_KIND, "members": int(members), "keep": keep, "thin": int(thin)})
    return attrs


def summarise(post: xr.Dataset, truth: xr.DataArray | xr.Dataset | None = None,
              quantiles: Sequence[float] = DEFAULT_QUANTILES) -> xr.Dataset:
    """The summary Dataset of a full posterior (what ``run(..., keep="summary")`` records).

    Parameters
    ----------
    post : xarray.Dataset
        A posterior (see :mod:`daml.posterior`) with one member variable, for example the
        ``analysis`` of :func:`daml.filters.run`.
    truth : xarray.DataArray or Dataset, optional
        The true state, as for :func:`daml.diagnostics.crps` (for a filter: ``data.truth`` of the twin
        experiment; a truth at every model step is sampled at the posterior's times). Adds ``crps``
        and ``pit``.
    quantiles : sequence of float
        Probabilities of the weighted quantiles (distinct, in ``[0, 1]``).

    Returns
    -------
    xarray.Dataset
        ``mean``, ``sd`` (the member variable's dims without ``member``), ``quantiles`` (a leading
        ``quantile`` dim whose coordinate holds the probabilities), ``ess`` (the weights' dims without ``member``), with a truth ``crps`` and
        ``pit``; the posterior's variables without ``member`` (a filter's info) and coordinates; its
        attrs with ``daml_kind = "summary"``, ``members``, ``keep = "summary"`` and ``thin`` (the
        posterior's, else 1). See the module docstring for the definitions.

    Raises
    ------
    PosteriorError, InputError, ShapeError, NonFiniteError
        Naming ``post``, ``truth`` or ``quantiles``.
    """
    from .. import diagnostics

    qs = check_quantiles(quantiles)
    if not isinstance(post, xr.Dataset) or MEMBER not in post.dims:
        raise InputError("post", "a posterior Dataset (with a 'member' dim; see daml.posterior)",
                         type(post).__name__ if not isinstance(post, xr.Dataset) else f"dims {tuple(post.dims)}")
    validate(post)
    names = member_vars(post)
    if len(names) != 1:
        raise InputError("post", "a posterior with one member variable", f"member variables {names}")
    name = names[0]
    x = post[name]
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    lw = post[LOG_WEIGHT]
    y = None if truth is None else diagnostics._truth(truth, x, name)
    out_dims = [d for d in x.dims if d != MEMBER]
    order = [*out_dims, MEMBER]
    lw_b = lw.broadcast_like(x.isel({MEMBER: 0}, drop=True)).transpose(*order)
    xv = torch.from_numpy(np.ascontiguousarray(x.transpose(*order).values))
    lwv = torch.from_numpy(np.ascontiguousarray(lw_b.values)).to(xv.dtype)
    yv = None
    if y is not None:
        yv = torch.from_numpy(np.ascontiguousarray(y.broadcast_like(x.isel({MEMBER: 0}, drop=True))
                                                   .transpose(*out_dims).values)).to(xv.dtype)
    q = torch.tensor(qs, dtype=xv.dtype)
    # chunks along the first axis: the quantile kernel needs Q copies of the members at once
    per_index = max(1, xv[:1].numel() if xv.ndim > 1 else xv.numel()) * (len(qs) + 4) * xv.element_size()
    chunk = max(1, int(256 * 2**20 // per_index)) if xv.ndim > 1 else 1
    parts = []
    with torch.no_grad():
        if xv.ndim == 1:
            parts.append(summary_kernel(xv, lwv, q, yv))
        else:
            for start in range(0, xv.shape[0], chunk):
                sl = slice(start, start + chunk)
                parts.append(summary_kernel(xv[sl], lwv[sl], q, None if yv is None else yv[sl]))
    stats = {k: (torch.cat([p[k] for p in parts], dim=1 if k == "quantile" else 0) if xv.ndim > 1 else parts[0][k])
             for k in parts[0]}
    coords = {k: c for k, c in post.coords.items() if MEMBER not in c.dims}
    data = {k: (out_dims, stats[k].numpy()) for k in ("mean", "sd")}
    data["quantiles"] = (["quantile", *out_dims], stats["quantile"].numpy())
    e = diagnostics.ess(post)
    data["ess"] = (e.dims, e.values)
    if y is not None:
        data["crps"] = (out_dims, stats["crps"].numpy())
        data["pit"] = (out_dims, stats["pit"].numpy())
    for key, var in post.data_vars.items():
        if key != LOG_WEIGHT and MEMBER not in var.dims:
            data[key] = var.variable
    res = xr.Dataset(data, coords={**coords, "quantile": np.asarray(qs)})
    thin = post.attrs.get("thin", 1)
    thin = int(thin) if isinstance(thin, (int, np.integer)) and not isinstance(thin, bool) and thin >= 1 else 1
    base = {k: v for k, v in post.attrs.items() if k not in ("keep", "thin")}
    res.attrs = summary_attrs(base, post.sizes[MEMBER], "summary", thin)
    res.attrs["member_variable"] = name
    warn_undefined_sd(res["sd"].values, "summarise")
    return res


def is_summary(ds: Any) -> bool:
    """Whether ``ds`` is a summary Dataset (``attrs["daml_kind"] == "summary"``, no ``member`` dim)."""
    return isinstance(ds, xr.Dataset) and ds.attrs.get("daml_kind") == SUMMARY_KIND and MEMBER not in ds.dims


def blocked_crps(post: xr.Dataset, truth: Any, cells: int = 2_000_000) -> xr.DataArray:
    """:func:`daml.diagnostics.crps` of a one-variable posterior over blocks of times of at most about
    ``cells`` member values each (its sorting works on copies of the members: thousands of members
    over all times at once would need tens of GB), concatenated along time; the same values as in
    one call."""
    from .. import diagnostics

    x = post[member_vars(post)[0]]
    if "time" not in x.dims:
        return diagnostics.crps(post, truth)
    per_time = max(1, int(np.prod([n for d, n in x.sizes.items() if d != "time"])))
    step = max(1, cells // per_time)
    if post.sizes["time"] <= step:
        return diagnostics.crps(post, truth)
    parts = [diagnostics.crps(post.isel(time=slice(i, i + step)), truth)
             for i in range(0, post.sizes["time"], step)]
    return xr.concat(parts, dim="time")


def summary_scores(result: xr.Dataset, truth: xr.DataArray | xr.Dataset) -> xr.Dataset:
    """RMSE, spread and CRPS from a posterior or from a summary, the same either way.

    Parameters
    ----------
    result : xarray.Dataset
        A posterior with one member variable (for example ``run(...).analysis`` with
        ``keep="members"``) or a summary (``keep="summary"``, or :func:`summarise`). A summary's
        CRPS is the one it recorded, against the truth it was given then (``data.truth`` in
        :func:`run`); a summary without ``crps`` is refused.
    truth : xarray.DataArray or Dataset
        The true state (as for :func:`daml.diagnostics.rmse`).

    Returns
    -------
    xarray.Dataset
        ``rmse``, ``spread`` and ``crps``, each with dims ``(time, *batch)`` (every dim of the member
        variable except ``member`` and the state dims, which are averaged): ``rmse`` is
        :func:`daml.diagnostics.rmse`, ``spread`` :func:`daml.diagnostics.spread` and ``crps``
        :func:`daml.diagnostics.crps` averaged over the state dims (``variable``).

    Raises
    ------
    InputError, ShapeError, NonFiniteError
        Naming ``result`` or ``truth``; ``result`` where the spread is undefined (all the weight on
        one member), as :func:`daml.diagnostics.spread` refuses it.
    """
    from .. import diagnostics

    if is_summary(result):
        missing = [k for k in ("mean", "sd", "ess", "crps") if k not in result.data_vars]
        if missing:
            raise InputError("result", "a summary with mean, sd, ess and crps (run with data holding truth, or "
                             "summarise(post, truth=...))", f"a summary without {missing}")
        mean = result["mean"]
        name = str(result.attrs.get("member_variable", "x"))
        y = diagnostics._truth(truth, mean, name)
        keep = {"time", *result["ess"].dims}
        state = [d for d in mean.dims if d not in keep]
        if bool(np.isnan(result["sd"].values).any()):
            raise InputError("result", "weights spread over at least two members for an unbiased variance",
                             "all weight on one member (ESS = 1) somewhere (sd is NaN)")
        rmse = np.sqrt(((mean - y) ** 2).mean(state))
        spread = np.sqrt((result["sd"] ** 2).mean(state))
        crps = result["crps"].mean(state)
    elif isinstance(result, xr.Dataset) and MEMBER in result.dims:
        validate(result)
        names = member_vars(result)
        if len(names) != 1:
            raise InputError("result", "a posterior with one member variable", f"member variables {names}")
        x = result[names[0]]
        keep = {"time", *result[LOG_WEIGHT].dims} - {MEMBER}
        state = [d for d in x.dims if d not in keep and d != MEMBER]
        rmse = diagnostics.rmse(result, truth)
        spread = diagnostics.spread(result)
        crps = blocked_crps(result, truth).mean(state)
    else:
        raise InputError("result", "a posterior (with a 'member' dim) or a summary Dataset (attrs daml_kind="
                         "'summary')", type(result).__name__ if not isinstance(result, xr.Dataset)
                         else f"a Dataset with dims {tuple(result.dims)} and attrs daml_kind="
                              f"{result.attrs.get('daml_kind')!r}")
    if set(crps.dims) != set(rmse.dims):
        raise ShapeError("truth", f"a truth on the dims {tuple(rmse.dims)}", f"scores on {tuple(crps.dims)}")
    out = xr.Dataset({"rmse": rmse.rename(None).variable, "spread": spread.transpose(*rmse.dims).variable,
                      "crps": crps.transpose(*rmse.dims).variable},
                     coords={k: c for k, c in rmse.coords.items()})
    out.attrs = {k: result.attrs[k] for k in ("method", "config", "seed", "daml_version", "stage")
                 if k in result.attrs}
    return out
