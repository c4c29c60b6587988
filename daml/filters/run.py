r"""The one time loop: run any :class:`~daml.filters.Filter` over a twin experiment or real data.

:func:`run` starts the filter from the prior recorded in the data (or given), steps the model
forward, and at every observation time calls the filter's analysis with the observed entries (NaN
entries are masked out; a time whose entries are all NaN still gets an analysis, which then changes
nothing). It returns the analysis posterior at every observation time, in the posterior type of
:mod:`daml.posterior`, and the forecast posterior just before each analysis when asked.

**What is recorded** is the caller's choice: ``keep="members"`` (the posterior, every member),
``keep="summary"`` (only the statistics of :mod:`daml.filters.summary`, computed as the run goes, so
that memory no longer grows with members times analyses), and ``thin=k`` (only the analyses
numbered ``0, k, 2k, ...``). Every analysis is computed and checked for divergence either way; the
up-front memory check counts what the chosen mode keeps (:func:`record_bytes`).

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
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
import xarray as xr

from .. import _device
from ..errors import ConvergenceWarning, DivergenceError, DtypeError, InputError, NonFiniteError, ShapeError
from ..models.base import Model, as_covariance, as_real_tensor, check_memory, model_config
from ..models.observations import Observation, observe_linear
from ..posterior import _method_attrs, from_members, normalise_log_weight
from .base import Filter, Upcoming, unchecked
from .summary import DEFAULT_QUANTILES, check_quantiles, describe_value, summary_attrs, summary_kernel, warn_undefined_sd

__all__ = ["run", "RunResult", "operator_from_data", "prepare_data", "PreparedData", "DIVERGENCE_FACTOR",
           "divergence_bounds"]

DIVERGENCE_FACTOR = 1000.0
"""How many times the problem's scales a spread or a member may reach before :func:`run` reports a
divergence by default (see the module docstring)."""


class RunResult(NamedTuple):
    """What :func:`run` returns."""

    analysis: xr.Dataset
    """Posterior after each recorded analysis, dims ``(time, *batch, member, variable)``; with
    ``keep="summary"`` the summary Dataset instead (``attrs["daml_kind"] == "summary"``, no ``member``
    dim; see :mod:`daml.filters.summary`)."""
    forecast: xr.Dataset | None
    """The same just before each recorded analysis (``None`` unless ``forecast=True``)."""
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
    keep: str = "members",
    thin: int = 1,
    quantiles: Any = DEFAULT_QUANTILES,
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
    keep : {"members", "summary"}
        What is recorded at each recorded analysis. ``"members"`` (default): every member and its
        log-weight, the posterior. ``"summary"``: no members, only the summary statistics of
        :mod:`daml.filters.summary` (weighted ``mean``, ``sd``, ``quantiles``, ``ess``, and with
        ``truth`` in ``data`` the ``crps`` and ``pit`` against it), computed as the run goes: the
        memory no longer grows with members times analyses. Not to be confused with the particle
        filters' own ``record=`` (which stage of their analysis they report).
    thin : int
        Record every ``thin``-th analysis only: the analyses numbered ``0, thin, 2 thin, ...`` in the
        order they happen (the first analysis is always recorded). Every analysis is still computed
        and checked for divergence. The forecast record follows the same ``keep`` and ``thin``.
    quantiles : sequence of float
        Probabilities of the weighted quantiles of ``keep="summary"`` (distinct, in ``[0, 1]``).
    dtype, device : optional
        Where to compute (see :mod:`daml._device`). On the CPU the time loop runs on one intra-op
        thread when the ensemble is small (``_device.ensemble_work`` below ``_device.SMALL_WORK``
        elements per operation), where more threads only wait on each other, and on the caller's
        setting otherwise; ``DAML_THREADS=k`` forces ``k`` threads. The caller's setting is restored.

    Returns
    -------
    RunResult
        ``analysis`` (and ``forecast``) posteriors, or summaries with ``keep="summary"``; ``info``
        entries of the filter become variables ``(time, *batch)`` of the analysis Dataset. Its attrs
        record ``keep`` and ``thin`` (a summary also ``daml_kind = "summary"`` and ``members``).

    Raises
    ------
    DivergenceError
        At the first analysis that diverges; its ``partial`` holds the result up to the last good
        recorded analysis, in the chosen ``keep`` mode.
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
    if not isinstance(keep, str) or keep not in ("members", "summary"):
        raise InputError("keep", "'members' (the posterior) or 'summary' (statistics only)", describe_value(keep))
    if isinstance(thin, (bool, np.bool_)) or not isinstance(thin, (int, np.integer)) or thin < 1:
        raise InputError("thin", "an int >= 1 (record every thin-th analysis)", describe_value(thin))
    thin = int(thin)
    qs = check_quantiles(quantiles)
    p = prepare_data(model, data, operator, prior, dtype, device)
    op, y_da, y_all, observed, batch_dims = p.operator, p.y_da, p.y, p.observed, p.batch_dims
    mean, cov, dt, dev, n_times = p.mean.clone(), p.cov, p.dtype, p.device, p.y_da.sizes["time"]
    default_spread, default_magnitude = divergence_bounds(p)
    max_spread = default_spread if max_spread is None else _check_bound(max_spread, "max_spread")
    max_magnitude = default_magnitude if max_magnitude is None else _check_bound(max_magnitude, "max_magnitude")

    g_init, g_run = _device.spawn_generators(seed, 2, device=dev)
    state = filt.init(model, mean, cov, g_init)
    n_analyses = int(np.count_nonzero(np.asarray(observed[1:n_times], dtype=bool)))
    n_records = -(-n_analyses // thin)
    truth = _truth_tensor(data, batch_dims, n_times, model.state_size, dt, dev) if keep == "summary" else None
    x0, lw0 = filt.members(state)
    work = _device.ensemble_work(tuple(x0.shape))     # small problems run on one thread (_device.auto_threads)
    nbytes = record_bytes(keep, n_records, tuple(x0.shape), x0.element_size(), len(qs), truth is not None, forecast)
    check_memory(nbytes, "members" if "members" in filt.config else "data",
                 f"{n_records} analyses of members {tuple(x0.shape)} to record with keep={keep!r}"
                 + (" (keep='summary' or thin= records less)" if keep == "members" else ""), x0.device)
    del x0, lw0
    if keep == "members":
        rec_a, rec_f = _Records(n_records), _Records(n_records)
    else:
        q = torch.tensor(qs, dtype=dt, device=dev)
        rec_a, rec_f = _Summaries(n_records, q, qs), _Summaries(n_records, q, qs)
    n_done = 0
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
        with _device.auto_threads(work, device=dev), \
                (torch.inference_mode() if filt.inference else torch.no_grad()), unchecked():
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
                    recorded = n_done % thin == 0
                    y_true = None if truth is None else truth[..., k, :]
                    if forecast and recorded:
                        rec_f.append(*_detach(filt.members(state)), y_true)
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
                    n_done += 1
                    if recorded:
                        rec_a.append(x, lw, y_true)
                        infos.append({key: v.detach().cpu() for key, v in info.items()})
                        times.append(k)
                bar.update(1)
        if keep == "summary":          # the last block's statistics: inside the timed loop
            rec_a.flush()
            rec_f.flush()
    except DivergenceError as err:
        err.partial = _build(rec_a, infos, times, data, y_da, batch_dims, filt, model, op, seed,
                             keep=keep, thin=thin) if rec_a else None
        raise
    finally:
        bar.close()
    seconds = _time.perf_counter() - t0
    if not rec_a:
        raise InputError("data", "at least one observation time after the initial time", "none")
    _warn_unconverged(filt.name, infos)
    post_a = _build(rec_a, infos, times, data, y_da, batch_dims, filt, model, op, seed, seconds=seconds,
                    keep=keep, thin=thin, cycles=n_done)
    post_f = _build(rec_f, [], times, data, y_da, batch_dims, filt, model, op, seed, stage="forecast",
                    keep=keep, thin=thin) if forecast else None
    return RunResult(post_a, post_f, seconds)


def _warn_unconverged(name: str, infos: list[dict]) -> None:
    """A :class:`~daml.errors.ConvergenceWarning` when a filter's analyses report transport problems that
    missed their tolerance (the ``unconverged`` info of the ETPF and the LETPF): the posterior records
    them, but an analysis built on unconverged plans can look plausible and be wrong."""
    counts = [float(i["unconverged"].sum()) for i in infos if "unconverged" in i]
    total = sum(counts)
    if total > 0:
        hit = sum(c > 0 for c in counts)
        warnings.warn(f"{name}: {int(total)} transport problems did not reach their tolerance, in {hit} of "
                      f"{len(counts)} recorded analyses (see the posterior's 'unconverged' and 'transport_error'; "
                      "raise max_iter or epsilon)", ConvergenceWarning, stacklevel=3)


def record_bytes(keep: str, records: int, members_shape: tuple, itemsize: int, n_quantiles: int = 3,
                 truth: bool = False, forecast: bool = False) -> int:
    """Bytes :func:`run` needs to record ``records`` analyses of members ``(*batch, N, n)``.

    ``keep="members"``: the records and the posterior built from them, twice
    ``records * batch * N * (n + 1)`` numbers (members and log-weights). ``keep="summary"``: twice
    ``records * batch * (n * (Q + 2 + 2 truth) + 1)`` numbers (mean, sd, Q quantiles, crps and pit
    with a truth, ess), plus the block of members waiting to be summarised and the working memory of
    their statistics, about ``(2 Q + 11) * B * batch * N * n`` numbers with ``B``
    :func:`summary_block` (at most 256 KiB of members, or one analysis), which does not grow with the
    analyses. Both are doubled with ``forecast``. The filter's own ``info`` variables (a few numbers per analysis) are not counted.
    """
    *batch, n_members, n = members_shape
    b = math.prod(batch)
    stages = 2 if forecast else 1
    if keep == "members":
        return 2 * stages * records * b * n_members * (n + 1) * itemsize
    per_record = b * (n * (n_quantiles + 2 + (2 if truth else 0)) + 1)
    block = summary_block(tuple(members_shape), itemsize, max(records, 1))
    work = stages * (2 * n_quantiles + 11) * block * b * n_members * n
    return (2 * stages * records * per_record + work) * itemsize


def _truth_tensor(data: xr.Dataset, batch_dims: list, n_times: int, n: int, dt, dev) -> torch.Tensor | None:
    """``data.truth`` as a tensor ``(*batch, time, n)`` where the data hold one (a twin experiment of
    :func:`daml.simulate`: dims ``(*batch, time, variable)``), else ``None``."""
    if "truth" not in data.data_vars:
        return None
    tr = data["truth"]
    state_dims = [d for d in tr.dims if d not in batch_dims and d != "time"]
    want = {**{d: data["y"].sizes[d] for d in batch_dims}, "time": n_times}
    sizes_ok = all(tr.sizes.get(d) == s for d, s in want.items()) and len(state_dims) == 1 \
        and tr.sizes[state_dims[0]] == n
    if not sizes_ok or tr.ndim != len(batch_dims) + 2:
        raise ShapeError("data", f"a truth of dims {(*batch_dims, 'time', 'variable')} and sizes "
                         f"{(*want.values(), n)} (as daml.simulate makes it) for keep='summary'",
                         f"dims {tuple(tr.dims)} of sizes {tuple(tr.shape)}",
                         hint="drop the truth from the data to record a summary without crps and pit")
    values = tr.transpose(*batch_dims, "time", state_dims[0]).values
    if values.dtype.kind not in "fiu":
        raise DtypeError("data", "a real numeric truth", f"dtype {values.dtype}")
    if not np.isfinite(values).all():
        raise NonFiniteError("data", "a finite truth (for crps and pit with keep='summary')",
                             f"{int((~np.isfinite(values)).sum())} NaN or infinite entries")
    return torch.as_tensor(np.ascontiguousarray(values), dtype=dt, device=dev)


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

    def append(self, x: torch.Tensor, lw: torch.Tensor, truth: Any = None) -> None:
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


SUMMARY_BLOCK_BYTES = 2**18
"""With ``keep="summary"``, :func:`run` keeps the members of up to this many bytes of consecutive
recorded analyses (at most 64 analyses, at least one) and summarises them together: one call of the
statistics' kernels per block instead of per analysis, whose fixed cost per call would otherwise
dominate for small ensembles."""


def summary_block(members_shape: tuple, itemsize: int, capacity: int) -> int:
    """How many recorded analyses :func:`run` summarises at once (see :data:`SUMMARY_BLOCK_BYTES`)."""
    per = math.prod(members_shape) * itemsize
    return max(1, min(64, capacity, SUMMARY_BLOCK_BYTES // max(per, 1)))


class _Summaries:
    """The summary statistics (:func:`daml.filters.summary.summary_kernel`) of the recorded analyses.

    The members ``(*batch, N, n)``, log-weights ``(*batch, N)`` and truth ``(*batch, n)`` of up to
    :func:`summary_block` consecutive analyses wait in a small buffer; when it is full (and at the end)
    they are summarised together, the log-weights normalised first as
    :func:`daml.posterior.from_members` does, and the statistics copied into one buffer per statistic
    for ``capacity`` records. Only the statistics are kept."""

    def __init__(self, capacity: int, q: torch.Tensor, probabilities: tuple[float, ...]):
        self.capacity, self.count, self.q, self.probabilities = capacity, 0, q, probabilities
        self.buffers: dict[str, torch.Tensor] | None = None
        self.shape: tuple | None = None
        self.members = self.pending = self.block = 0
        self.px = self.plw = self.py = None

    def append(self, x: torch.Tensor, lw: torch.Tensor, truth: torch.Tensor | None = None) -> None:
        if self.px is None:
            self.shape, self.members = tuple(x.shape), int(x.shape[-2])
            self.block = summary_block(self.shape, x.element_size(), self.capacity)
            self.px = torch.empty((self.block, *x.shape), dtype=x.dtype, device=x.device)
            self.plw = torch.empty((self.block, *lw.shape), dtype=lw.dtype, device=lw.device)
            if truth is not None:
                self.py = torch.empty((self.block, *truth.shape), dtype=x.dtype, device=x.device)
        if len(self) >= self.capacity or tuple(x.shape) != self.shape or tuple(lw.shape) != self.shape[:-1]:
            raise ShapeError("filt", f"{self.capacity} analyses of members {self.shape} and log-weights "
                                     f"{self.shape[:-1]}",
                             f"analysis {len(self) + 1} with shapes {tuple(x.shape)}, {tuple(lw.shape)}")
        self.px[self.pending].copy_(x)
        self.plw[self.pending].copy_(lw)
        if self.py is not None:
            self.py[self.pending].copy_(truth)
        self.pending += 1
        if self.pending == self.block:
            self.flush()

    def flush(self) -> None:
        """Summarise the analyses waiting in the block buffer."""
        from ..diagnostics import ess_kernel

        b = self.pending
        if not b:
            return
        # the last block is summarised after the loop: in inference mode again where the buffers were
        # made in it (an inference tensor is updated in place only there)
        with torch.inference_mode(torch.is_inference(self.px)), torch.no_grad():
            lw = normalise_log_weight(self.plw[:b], dim=-1)
            # member last, contiguous: the kernels sort along it twice (quantiles, CRPS)
            stats = summary_kernel(self.px[:b].transpose(-1, -2).contiguous(), lw.unsqueeze(-2), self.q,
                                   None if self.py is None else self.py[:b])
            stats["quantile"] = stats["quantile"].movedim(0, 1)               # (b, Q, *batch, n)
            stats["ess"] = ess_kernel(lw)
            if self.buffers is None:
                self.buffers = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device)
                                for k, v in stats.items()}
            for k, v in stats.items():
                self.buffers[k][self.count: self.count + b].copy_(v)
        self.count += b
        self.pending = 0

    def __len__(self) -> int:
        return self.count + self.pending

    def stacked(self) -> dict[str, np.ndarray]:
        """Each statistic ``(T, ...)`` as a numpy array (``quantile``: ``(Q, T, ...)``)."""
        self.flush()
        out = {}
        for k, v in self.buffers.items():
            v = v[: self.count]
            out[k] = _device.to_numpy(v.clone() if self.count < self.capacity else v)
        out["quantile"] = np.moveaxis(out["quantile"], 1, 0)
        return out


def _build(records, infos, times, data, y_da, batch_dims, filt, model, op, seed, seconds=None, stage="analysis",
           keep="members", thin=1, cycles=None):
    cycles = len(times) if cycles is None else cycles
    tcoord = data["time"].values[times]
    n_state = model.state_size
    coords = {"time": tcoord, "step": ("time", np.asarray(times))}
    if "variable" in data.coords and data.sizes.get("variable") == n_state:
        coords["variable"] = data["variable"].values
    for d in batch_dims:
        if d in data.coords:
            coords[d] = data[d].values
    config = {"filter": filt.config, **model_config(model), **op.config(), "stage": stage}
    config = json.loads(json.dumps(config, default=str))
    attrs = {"stage": stage}
    if seconds is not None:
        attrs["seconds"] = float(seconds)
        attrs["cycles_per_second"] = float(cycles / seconds) if seconds > 0 else math.inf
    if keep == "summary":
        post = _build_summary(records, coords, batch_dims, attrs, filt.name, config, seed, thin)
    else:
        x, lw = records.stacked()                               # (T, *batch, N, n), (T, *batch, N)
        attrs.update({"keep": keep, "thin": int(thin)})
        post = from_members({"x": x}, lw, dims=("time", *batch_dims, "member", "variable"), coords=coords,
                            method=filt.name, config=config, seed=seed, attrs=attrs)
    if infos:
        for key in infos[0]:
            vals = torch.stack([i[key] for i in infos]).numpy()
            post[key] = (("time", *batch_dims)[: vals.ndim], vals)
    return post


def _build_summary(records: _Summaries, coords: dict, batch_dims: list, attrs: dict, method: str, config: dict,
                   seed: Any, thin: int) -> xr.Dataset:
    """The summary Dataset of :func:`run` (see :func:`daml.filters.summary.summarise` for its layout)."""
    stats = records.stacked()
    dims = ("time", *batch_dims, "variable")
    data = {k: (dims, stats[k]) for k in ("mean", "sd")}
    data["quantiles"] = (("quantile", *dims), stats["quantile"])
    data["ess"] = (dims[:-1], stats["ess"])
    for k in ("crps", "pit"):
        if k in stats:
            data[k] = (dims, stats[k])
    res = xr.Dataset(data, coords={**coords, "quantile": np.asarray(records.probabilities, dtype=np.float64)})
    base = dict(attrs)
    base.update(_method_attrs(method, config, seed))
    res.attrs = summary_attrs(base, records.members, "summary", thin)
    res.attrs["member_variable"] = "x"
    warn_undefined_sd(stats["sd"], f"run({method}, keep='summary')")
    return res
