"""The one time loop: run any :class:`~daml.filters.Filter` over a twin experiment or real data.

:func:`run` starts the filter from the prior recorded in the data (or given), steps the model
forward, and at every observation time calls the filter's analysis with the observed entries (NaN
entries are masked out; a time whose entries are all NaN still gets an analysis, which then changes
nothing). It returns the analysis posterior at every observation time, in the posterior type of
:mod:`daml.posterior`, and the forecast posterior just before each analysis when asked.

Divergence is caught as it happens: non-finite states, or an ensemble spread beyond ``max_spread``,
raise :class:`daml.errors.DivergenceError` with the model step; its ``partial`` attribute holds the
posterior up to the last good analysis, so nothing computed is lost.
"""

from __future__ import annotations

import json
import math
import time as _time
from typing import Any, NamedTuple

import numpy as np
import torch
import xarray as xr

from .. import _device
from ..errors import DivergenceError, InputError, ShapeError
from ..models.base import Model, model_config
from ..models.observations import Observation, observe_linear
from ..posterior import from_members
from .base import Filter, Upcoming

__all__ = ["run", "RunResult", "operator_from_data", "prepare_data", "PreparedData"]


class RunResult(NamedTuple):
    """What :func:`run` returns."""

    analysis: xr.Dataset
    """Posterior after each analysis, dims ``(time, *batch, member, variable)``."""
    forecast: xr.Dataset | None
    """Posterior just before each analysis (``None`` unless ``forecast=True``)."""
    seconds: float
    """Wall time of the loop (model steps and analyses, without building the Datasets)."""


def operator_from_data(data: xr.Dataset) -> Observation:
    """The linear observation operator stored in a twin Dataset (variables ``H`` and ``R``)."""
    if "H" not in data or "R" not in data:
        raise InputError("operator", "an Observation (the data hold no linear operator H, R)", None)
    return observe_linear(data["H"].values, cov=data["R"].values)


class PreparedData(NamedTuple):
    """Observations and prior of a twin Dataset as tensors (see :func:`prepare_data`)."""

    operator: Observation
    y_da: xr.DataArray
    """``y`` transposed to ``(*batch, time, obs)``."""
    y: torch.Tensor
    observed: np.ndarray
    """Bool per time: an observation time."""
    batch_dims: list
    mean: torch.Tensor
    """Prior mean broadcast to ``(*batch, n)``."""
    cov: torch.Tensor
    dtype: torch.dtype
    device: torch.device


def prepare_data(model: Model, data: xr.Dataset, operator: Observation | None, prior: tuple[Any, Any] | None,
                 dtype: Any = None, device: Any = None) -> PreparedData:
    """Check a twin Dataset against a model and operator; return its observations and prior as tensors.

    Shared by :func:`run` and :func:`daml.filters.kalman_smoother`.
    """
    if not isinstance(data, xr.Dataset) or "y" not in data or "time" not in data["y"].dims \
            or "obs" not in data["y"].dims:
        raise InputError("data", "a Dataset with observations y(..., time, obs)", type(data).__name__)
    dev = _device.resolve_device(device)
    dt = _device.resolve_dtype(dtype, dev)
    op = operator if operator is not None else operator_from_data(data)
    n = model.state_size
    if op.state_size != n:
        raise ShapeError("operator", f"an operator on states of size {n}", f"size {op.state_size}")
    y_da = data["y"]
    batch_dims = [str(d) for d in y_da.dims if d not in ("time", "obs")]
    y_da = y_da.transpose(*batch_dims, "time", "obs")
    if y_da.sizes["obs"] != op.size:
        raise ShapeError("data", f"observations of size {op.size} (the operator's)", f"size {y_da.sizes['obs']}")
    y_all = torch.as_tensor(y_da.values, dtype=dt, device=dev)
    observed = data["observed"].values if "observed" in data.coords else np.isfinite(y_da.values).any(
        axis=tuple(range(len(batch_dims))) + (-1,))
    if prior is None:
        if "prior_mean" not in data or "prior_cov" not in data:
            raise InputError("prior", "(mean, cov) (the data hold no prior_mean/prior_cov)", None)
        prior = (data["prior_mean"].values, data["prior_cov"].values)
    mean = torch.as_tensor(np.asarray(prior[0]), dtype=dt, device=dev)
    cov = torch.as_tensor(np.asarray(prior[1]), dtype=dt, device=dev)
    if mean.ndim == 0 or mean.shape[-1] != n or tuple(cov.shape) != (n, n):
        raise ShapeError("prior", f"mean (..., {n}) and cov ({n}, {n})",
                         f"shapes {tuple(mean.shape)}, {tuple(cov.shape)}")
    batch_shape = tuple(y_da.sizes[d] for d in batch_dims)
    return PreparedData(op, y_da, y_all, observed, batch_dims, mean.expand(*batch_shape, n), cov, dt, dev)


def run(
    filt: Filter,
    model: Model,
    data: xr.Dataset,
    *,
    operator: Observation | None = None,
    seed: _device.Seed = None,
    prior: tuple[Any, Any] | None = None,
    forecast: bool = False,
    progress: bool | None = None,
    max_spread: float | None = None,
    dtype: Any = None,
    device: Any = None,
) -> RunResult:
    """Run ``filt`` through the observations in ``data``.

    Parameters
    ----------
    filt : Filter
        Any registered or hand-made filter.
    model : Model
        The forecast model.
    data : xarray.Dataset
        As made by :func:`daml.simulate`: ``y`` ``(*batch, time, obs)`` with NaN where nothing is
        observed, the coordinates ``time`` and ``observed``, and (by default) ``prior_mean``,
        ``prior_cov``, ``H`` and ``R``.
    operator : Observation, optional
        The observation operator; default: the linear ``H``, ``R`` stored in ``data``.
    seed : int, SeedSequence, torch.Generator or None
        The filter's random stream (initial ensemble, model noise, perturbed observations).
    prior : (mean, cov), optional
        Initial distribution instead of ``data.prior_mean``, ``data.prior_cov``.
    forecast : bool
        Also return the forecast posterior at each analysis time.
    progress : bool, optional
        Show a progress bar (default: only on a terminal).
    max_spread : float, optional
        Ensemble spread (root-mean variance) beyond which the run counts as diverged. Default:
        ``1000`` times the standard deviation of the observations.
    dtype, device : optional
        Where to compute (see :mod:`daml._device`).

    Returns
    -------
    RunResult
        ``analysis`` (and ``forecast``) posteriors; ``info`` entries of the filter become variables
        ``(time, *batch)`` of the analysis Dataset.
    """
    if not isinstance(filt, Filter):
        raise InputError("filt", "a daml.filters.Filter", type(filt).__name__)
    p = prepare_data(model, data, operator, prior, dtype, device)
    op, y_da, y_all, observed, batch_dims = p.operator, p.y_da, p.y, p.observed, p.batch_dims
    mean, cov, dt, dev, n_times = p.mean.clone(), p.cov, p.dtype, p.device, p.y_da.sizes["time"]
    if max_spread is None:
        finite = y_da.values[np.isfinite(y_da.values)]
        max_spread = 1000.0 * float(finite.std()) if finite.size > 1 else math.inf

    g_init, g_run = _device.spawn_generators(seed, 2, device=dev)
    state = filt.init(model, mean, cov, g_init)
    n_analyses = int(np.count_nonzero(np.asarray(observed[1:n_times], dtype=bool)))
    rec_a, rec_f = _Records(n_analyses), _Records(n_analyses)
    infos: list[dict] = []
    times: list[int] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=n_times - 1, desc=filt.name, disable=(None if progress is None else not progress), leave=False)
    t0 = _time.perf_counter()
    try:
        # inference mode where the filter declares it never differentiates: a few microseconds less
        # per operation, which adds up over the hundreds of small operations of a cycle
        with (torch.inference_mode() if filt.inference else torch.no_grad()):
            upcoming, k_next, k_prev = None, -1, 0
            for k in range(1, n_times):
                if filt.lookahead:
                    if k > k_next:                     # find the next observation time
                        k_next = next((j for j in range(k, n_times) if observed[j]), n_times)
                        upcoming = None if k_next == n_times else _upcoming(y_all, k_next, op, dt, dev, k_next - k_prev)
                    if upcoming is not None:
                        upcoming = upcoming._replace(steps=k_next - k + 1)
                    state = filt.forecast(state, model, g_run, upcoming)
                else:
                    state = filt.forecast(state, model, g_run)
                if observed[k]:
                    k_prev = k
                    if forecast:
                        rec_f.append(*_detach(filt.members(state)))
                    y = y_all[..., k, :]
                    mask = torch.isfinite(y)
                    y = torch.where(mask, y, torch.zeros((), dtype=dt, device=dev))
                    try:
                        state, info = filt.analysis(state, y, op, mask, g_run)
                    except DivergenceError as err:
                        if err.step is not None:
                            raise
                        raise DivergenceError(str(err), step=k) from err
                    x, lw = _detach(filt.members(state))
                    _check_divergence(x, lw, max_spread, k, filt.name)
                    rec_a.append(x, lw)
                    infos.append({key: v.detach().cpu() for key, v in info.items()})
                    times.append(k)
                bar.update(1)
    except DivergenceError as err:
        err.partial = _build(rec_a, infos, times, data, y_da, batch_dims, filt, model, op, seed) if rec_a else None
        raise
    finally:
        bar.close()
    seconds = _time.perf_counter() - t0
    if not rec_a:
        raise InputError("data", "at least one observation time after the initial time", "none")
    post_a = _build(rec_a, infos, times, data, y_da, batch_dims, filt, model, op, seed, seconds=seconds)
    post_f = _build(rec_f, [], times, data, y_da, batch_dims, filt, model, op, seed, stage="forecast") if forecast else None
    return RunResult(post_a, post_f, seconds)


def _upcoming(y_all, k, op, dt, dev, interval):
    y = y_all[..., k, :]
    mask = torch.isfinite(y)
    return Upcoming(torch.where(mask, y, torch.zeros((), dtype=dt, device=dev)), mask, op, 1, interval)


def _detach(pair):
    return tuple(t.detach() for t in pair)


def _check_divergence(x: torch.Tensor, lw: torch.Tensor, max_spread: float, step: int, name: str) -> None:
    """Raise where the members or weights are not finite or the ensemble spread exceeds ``max_spread``.

    The spread comes from two weighted moments (two mat-vecs instead of a pass over the centred
    members); a NaN or infinite member makes it non-finite, so the states need no separate check.
    """
    if not bool(torch.isfinite(lw).all()):
        raise DivergenceError(f"{name}: non-finite states or weights", step=step)
    w = torch.exp(lw).unsqueeze(-2)                                        # (*batch, 1, N)
    mean = (w @ x).squeeze(-2)
    second = (w @ (x * x)).squeeze(-2)
    spread = torch.sqrt((second - mean * mean).clamp_min(0.0).mean(-1))
    worst = float(spread.max())
    if not math.isfinite(worst):
        raise DivergenceError(f"{name}: non-finite states or weights", step=step)
    if worst > max_spread:
        raise DivergenceError(f"{name}: ensemble spread {worst:.3g} exceeds max_spread {max_spread:.3g}", step=step)


class _Records:
    """The members ``(*batch, N, n)`` and log-weights ``(*batch, N)`` of each analysis, copied into one
    buffer per array as they come (allocated at the first record, for ``capacity`` records, on the
    members' device). Stacking a list at the end would need the memory twice and a second copy of it
    all; a buffer needs it once. The members a filter returns are then free for it to reuse."""

    def __init__(self, capacity: int):
        self.capacity, self.count = capacity, 0
        self.x: torch.Tensor | None = None
        self.lw: torch.Tensor | None = None

    def append(self, x: torch.Tensor, lw: torch.Tensor) -> None:
        if self.x is None:
            self.x = torch.empty((self.capacity, *x.shape), dtype=x.dtype, device=x.device)
            self.lw = torch.empty((self.capacity, *lw.shape), dtype=lw.dtype, device=lw.device)
        if self.count >= self.capacity or x.shape != self.x.shape[1:] or lw.shape != self.lw.shape[1:]:
            raise ShapeError("filt", f"{self.capacity} analyses of members {tuple(self.x.shape[1:])} and log-weights "
                                     f"{tuple(self.lw.shape[1:])}",
                             f"analysis {self.count + 1} with shapes {tuple(x.shape)}, {tuple(lw.shape)}")
        self.x[self.count].copy_(x)
        self.lw[self.count].copy_(lw)
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, *batch, N, n)`` and ``(T, *batch, N)`` on the CPU; a copy only where the run ended
        early (a divergence), so that the partial result does not hold the whole buffer."""
        x, lw = self.x[: self.count], self.lw[: self.count]
        if self.count < self.capacity:
            x, lw = x.clone(), lw.clone()
        return x.cpu(), lw.cpu()


def _build(records, infos, times, data, y_da, batch_dims, filt, model, op, seed, seconds=None, stage="analysis"):
    x, lw = records.stacked()                               # (T, *batch, N, n), (T, *batch, N)
    tcoord = data["time"].values[times]
    coords = {"time": tcoord, "step": ("time", np.asarray(times))}
    if "variable" in data.coords and data.sizes.get("variable") == x.shape[-1]:
        coords["variable"] = data["variable"].values
    for d in batch_dims:
        if d in data.coords:
            coords[d] = data[d].values
    config = {"filter": filt.config, **model_config(model), **op.config(), "stage": stage}
    attrs = {"stage": stage}
    if seconds is not None:
        attrs["seconds"] = float(seconds)
        attrs["cycles_per_second"] = float(len(times) / seconds) if seconds > 0 else math.inf
    post = from_members({"x": x}, lw, dims=("time", *batch_dims, "member", "variable"), coords=coords,
                        method=filt.name, config=json.loads(json.dumps(config, default=str)), seed=seed, attrs=attrs)
    if infos:
        for key in infos[0]:
            vals = torch.stack([i[key] for i in infos]).numpy()
            post[key] = (("time", *batch_dims)[: vals.ndim], vals)
    return post
