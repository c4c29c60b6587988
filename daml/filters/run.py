r"""The one time loop: run any :class:`~daml.filters.Filter` over a twin experiment or real data.

:func:`run` starts the filter from the prior recorded in the data (or given), steps the model
forward, and at every observation time calls the filter's analysis with the observed entries (NaN
entries are masked out; a time whose entries are all NaN still gets an analysis, which then changes
nothing). It returns the analysis posterior at every observation time, in the posterior type of
:mod:`daml.posterior`, and the forecast posterior just before each analysis when asked.

Divergence is caught as it happens: non-finite states or weights, an ensemble spread beyond
``max_spread``, or a member larger in absolute value than ``max_magnitude`` raise
:class:`daml.errors.DivergenceError` with the model step; its ``partial`` attribute holds the
posterior up to the last good analysis, so nothing computed is lost.

**The default bounds** are relative to the problem's own scales. With

.. math::

    s = \max\big(\sqrt{\max_i P_{0,ii}},\ \sqrt{\max_k R_{kk}},\ \operatorname{sd}(y)\big)

(the largest prior standard deviation, the largest observation-noise standard deviation and the
standard deviation of all finite observations, which measures how much the observed system varies),
``max_spread = DIVERGENCE_FACTOR * s`` and ``max_magnitude = DIVERGENCE_FACTOR * (s + max|m_0| +
max|y|)`` with ``DIVERGENCE_FACTOR = 1000``. A filter that tracks the system keeps its spread near
the prior and noise scales and its members within the range of the prior mean and the
observations; three orders of magnitude beyond either is no longer an estimate of the system but a
blow-up (members of size 1e19, a spread that grows without bound), which the check then reports at the
first analysis where it happens instead of a result full of huge finite numbers. Both bounds can be
set; ``math.inf`` switches one off on purpose (NaN, zero or negative bounds are refused).
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
from ..errors import DivergenceError, DtypeError, InputError, NonFiniteError, ShapeError
from ..models.base import Model, as_covariance, as_real_tensor, check_memory, model_config
from ..models.observations import Observation, observe_linear
from ..posterior import from_members
from .base import Filter, Upcoming, unchecked

__all__ = ["run", "RunResult", "operator_from_data", "prepare_data", "PreparedData", "DIVERGENCE_FACTOR",
           "divergence_bounds"]

DIVERGENCE_FACTOR = 1000.0
"""How many times the problem's scales a spread or a member may reach before :func:`run` reports a
divergence by default (see the module docstring)."""


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
    if not isinstance(data, xr.Dataset):
        raise InputError("data", "an xarray Dataset holding the linear operator H and R", type(data).__name__)
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
    if not callable(getattr(model, "step", None)) or isinstance(getattr(model, "state_size", None), bool) \
            or not isinstance(getattr(model, "state_size", None), int):
        raise InputError("model", "a model with state_size and step(x) (see daml.models)", type(model).__name__)
    if operator is not None and not isinstance(operator, Observation):
        raise InputError("operator", "None or an Observation (see daml.models.observe_all)", type(operator).__name__)
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
    y_np = np.asarray(y_da.values)
    if y_np.dtype == object or not (np.issubdtype(y_np.dtype, np.floating) or np.issubdtype(y_np.dtype, np.integer)):
        raise DtypeError("data", "observations y of a real numeric dtype", f"dtype {y_np.dtype}")
    if np.isinf(y_np).any():
        where = np.argwhere(np.isinf(y_np))[0]
        raise NonFiniteError("data", "finite observations y, with NaN (only) marking a missing entry",
                             f"an infinite entry at index {tuple(int(i) for i in where)} of y{tuple(y_da.dims)}",
                             hint="an infinite observation is not a missing one: replace it by NaN if it is")
    y_all = torch.as_tensor(y_np, dtype=dt, device=dev)
    if "observed" in data.coords:
        observed = np.asarray(data["observed"].values)
        if observed.dtype != bool or observed.shape != (y_da.sizes["time"],):
            raise InputError("data", f"a bool coordinate observed(time) of length {y_da.sizes['time']}",
                             f"dtype {observed.dtype}, shape {observed.shape}")
    else:
        observed = np.isfinite(y_np).any(axis=tuple(range(len(batch_dims))) + (-1,))
    if prior is None:
        if "prior_mean" not in data or "prior_cov" not in data:
            raise InputError("prior", "(mean, cov) (the data hold no prior_mean/prior_cov)", None)
        prior = (data["prior_mean"].values, data["prior_cov"].values)
    elif not isinstance(prior, (tuple, list)) or len(prior) != 2:
        raise InputError("prior", "a pair (mean, cov)", type(prior).__name__)
    mean = as_real_tensor(prior[0], "prior mean", dtype=dt, device=dev)
    if mean.ndim == 0 or mean.shape[-1] != n:
        raise ShapeError("prior", f"a mean of shape (..., {n}) (the state size)", f"shape {tuple(mean.shape)}")
    if not bool(torch.isfinite(mean).all()):
        raise NonFiniteError("prior", "a finite mean", "NaN or infinite entries in the mean")
    cov_in = as_real_tensor(prior[1], "prior cov", dtype=dt, device=dev)
    if tuple(cov_in.shape) != (n, n):
        raise ShapeError("prior", f"a covariance of shape ({n}, {n})", f"shape {tuple(cov_in.shape)}")
    cov = as_covariance(cov_in, n, "prior")           # symmetric, positive semidefinite, finite
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
    max_magnitude: float | None = None,
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
        Ensemble spread (the square root of the mean over variables of the weighted variance) beyond
        which the run counts as diverged. Default: ``DIVERGENCE_FACTOR`` (1000) times the largest of
        the prior standard deviation, the observation-noise standard deviation and the standard
        deviation of the observations (see the module docstring and :func:`divergence_bounds`).
        ``math.inf`` switches the check off; NaN, zero and negative values are refused.
    max_magnitude : float, optional
        Largest absolute value any member may take before the run counts as diverged (a blow-up to
        huge finite values that keeps a small spread). Default: ``DIVERGENCE_FACTOR`` times the
        scale above plus the largest absolute prior mean and observation. ``math.inf``: off.
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
    if max_spread is not None:
        _check_bound(max_spread, "max_spread")
    if max_magnitude is not None:
        _check_bound(max_magnitude, "max_magnitude")
    if not isinstance(forecast, (bool, np.bool_)):
        raise InputError("forecast", "True or False", repr(forecast))
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise InputError("progress", "None, True or False", repr(progress))
    p = prepare_data(model, data, operator, prior, dtype, device)
    op, y_da, y_all, observed, batch_dims = p.operator, p.y_da, p.y, p.observed, p.batch_dims
    mean, cov, dt, dev, n_times = p.mean.clone(), p.cov, p.dtype, p.device, p.y_da.sizes["time"]
    default_spread, default_magnitude = divergence_bounds(p)
    max_spread = default_spread if max_spread is None else _check_bound(max_spread, "max_spread")
    max_magnitude = default_magnitude if max_magnitude is None else _check_bound(max_magnitude, "max_magnitude")

    g_init, g_run = _device.spawn_generators(seed, 2, device=dev)
    state = filt.init(model, mean, cov, g_init)
    n_analyses = int(np.count_nonzero(np.asarray(observed[1:n_times], dtype=bool)))
    x0, lw0 = filt.members(state)
    # the records (analysis, and forecast if asked) and the posterior built from them: twice each
    nbytes = 2 * (2 if forecast else 1) * n_analyses * (x0.numel() + lw0.numel()) * x0.element_size()
    check_memory(nbytes, "members" if "members" in filt.config else "data",
                 f"{n_analyses} analyses of members {tuple(x0.shape)} to record", x0.device)
    del x0, lw0
    rec_a, rec_f = _Records(n_analyses), _Records(n_analyses)
    infos: list[dict] = []
    times: list[int] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=n_times - 1, desc=filt.name, disable=(None if progress is None else not progress), leave=False)
    t0 = _time.perf_counter()
    try:
        # inference mode where the filter declares it never differentiates: a few microseconds less
        # per operation, which adds up over the hundreds of small operations of a cycle
        # the building blocks' input checks off (base.unchecked): the data and prior were checked
        # above, and the members and weights are checked for divergence after every analysis
        with (torch.inference_mode() if filt.inference else torch.no_grad()), unchecked():
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
                    _check_divergence(x, lw, max_spread, k, filt.name, max_magnitude)
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


def _check_bound(value: Any, name: str) -> float:
    """A divergence bound: a positive real number or ``math.inf`` (never NaN, zero or negative)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise InputError(name, "None (the default bound) or a positive number (math.inf: no check)", repr(value))
    return float(value)


def divergence_bounds(prepared: PreparedData) -> tuple[float, float]:
    """The default ``(max_spread, max_magnitude)`` of :func:`run` for prepared data (see the module
    docstring): ``DIVERGENCE_FACTOR`` times the scale ``s`` (the largest of the prior standard
    deviation, the observation-noise standard deviation and the standard deviation of the finite
    observations), and ``DIVERGENCE_FACTOR`` times ``s`` plus the largest absolute prior mean and
    observation."""
    y = np.asarray(prepared.y_da.values, dtype=np.float64)
    finite = y[np.isfinite(y)]
    obs_sd = float(finite.std()) if finite.size > 1 else 0.0
    obs_max = float(np.abs(finite).max()) if finite.size else 0.0
    prior_sd = math.sqrt(max(float(torch.diagonal(prepared.cov).max()), 0.0))
    noise_sd = math.sqrt(max(float(torch.diagonal(prepared.operator.noise_cov).max()), 0.0))
    scale = max(prior_sd, noise_sd, obs_sd)
    if not scale > 0:                      # nothing to measure against: no relative bound
        return math.inf, math.inf
    mean_max = float(prepared.mean.abs().max())
    return DIVERGENCE_FACTOR * scale, DIVERGENCE_FACTOR * (scale + mean_max + obs_max)


def _check_divergence(x: torch.Tensor, lw: torch.Tensor, max_spread: float, step: int, name: str,
                      max_magnitude: float = math.inf) -> None:
    """Raise where the members or weights are not finite, the ensemble spread exceeds ``max_spread``
    or a member's largest absolute entry exceeds ``max_magnitude`` (every member, whatever its weight).

    The spread comes from two weighted moments (two mat-vecs instead of a pass over the centred
    members); a NaN or infinite member makes it non-finite, so the states need no separate check.
    """
    if not bool(torch.isfinite(lw).all()):
        raise DivergenceError(f"{name}: non-finite states or weights", step=step)
    if math.isfinite(max_magnitude):       # first: the moments below lose all precision at huge values
        lo, hi = torch.aminmax(x)
        largest = max(-float(lo), float(hi))
        if not math.isfinite(largest):
            raise DivergenceError(f"{name}: non-finite states or weights", step=step)
        if largest > max_magnitude:
            raise DivergenceError(f"{name}: a member reaches {largest:.3g} in absolute value, beyond max_magnitude "
                                  f"{max_magnitude:.3g} (a blow-up)", step=step)
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
