"""The weighted posterior: one xarray Dataset type for every method in daml.

A posterior is an :class:`xarray.Dataset` holding a sample of ``N`` members (particles, ensemble
members, trained networks, bootstrap draws) along the dimension ``member``, and their importance
weights as the variable ``log_weight``. Everything else carries named dimensions and coordinates::

    <xarray.Dataset>
    Dimensions:     (time: 100, member: 24, variable: 40)
    Data variables:
        x           (time, member, variable) float64
        log_weight  (time, member) float64
    Attributes:
        method:        etkf
        config:        {"inflation": 1.02, "members": 24}
        seed:          1
        daml_version:  0.1.0

The invariants, checked by :func:`validate`:

* ``log_weight`` has the ``member`` dimension, is finite and is normalised,
  ``logsumexp(log_weight, "member") == 0`` for every other index; equal-weight methods store
  ``-log N``. Its other dimensions (``time`` above) are batch dimensions: every member variable
  carries them too, so a weight always refers to one member at one batch index.
* every data variable with a ``member`` dimension is real-valued and finite;
* ``attrs`` record the ``method``, its ``config`` as a JSON string, the ``seed`` and the
  ``daml_version``.

Weighted moments and quantiles go through xarray's own :meth:`xarray.Dataset.weighted`; the
``.daml`` accessor (:class:`PosteriorAccessor`) gathers them with resampling, diagnostics and
export.

Examples
--------
>>> import numpy as np, daml
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(500, 2))                      # 500 members of a 2-vector
>>> lw = -0.5 * ((x - 1.0) ** 2).sum(-1)               # importance weights for a shifted target
>>> post = daml.posterior.from_members(x, lw, method="importance")
>>> post.daml.ess().item() < 500
True
"""

from __future__ import annotations

import json
import math
from types import MappingProxyType
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from . import _device
from ._version import __version__
from .errors import DtypeError, InputError, NonFiniteError, PosteriorError, ShapeError

__all__ = [
    "MEMBER",
    "LOG_WEIGHT",
    "REQUIRED_ATTRS",
    "from_members",
    "validate",
    "member_vars",
    "normalise_log_weight",
    "weighted_var",
    "PosteriorAccessor",
]

MEMBER = "member"
LOG_WEIGHT = "log_weight"
REQUIRED_ATTRS = ("method", "config", "seed", "daml_version")

_DEFAULT_DIMS = {1: (MEMBER,), 2: (MEMBER, "variable")}

LOG_WEIGHT_ATTRS = MappingProxyType({
    "long_name": "natural logarithm of the normalised weight of each member",
    "units": "1",
    "description": "log_weight = log(w): the weights w = exp(log_weight) are >= 0 and sum to 1 over the "
                   "'member' dimension at every other index (equal weights store -log N). The members are a "
                   "weighted sample: means, variances and quantiles must use w.",
    "how_to_weight": "ds.weighted(np.exp(ds.log_weight)).mean('member'); never ds.weighted(ds.log_weight) "
                     "(log-weights are negative: xarray would give wrong answers without an error)",
})
"""Attributes of every ``log_weight`` daml builds, for users of plain xarray (who would otherwise pass the
log-weights themselves to :meth:`xarray.Dataset.weighted`). :func:`validate` does not require them."""


def normalise_log_weight(log_weight: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Subtract ``logsumexp`` along ``dim`` so that the weights sum to one.

    ``log_weight`` is a floating tensor (arrays are converted); a row of log-weights that are all
    ``-inf`` or hold NaN has no normalisation and is refused (:class:`~daml.errors.NonFiniteError`).
    """
    if not isinstance(log_weight, torch.Tensor) or not log_weight.is_floating_point():
        log_weight = _device.as_tensor(log_weight, "log_weight")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) \
            or not -max(log_weight.ndim, 1) <= dim < max(log_weight.ndim, 1):
        raise InputError("dim", f"an int axis of the {log_weight.ndim}-d log-weights", repr(dim))
    total = torch.logsumexp(log_weight, dim=int(dim), keepdim=True)
    if not _all_finite(total):
        raise NonFiniteError("log_weight", "log-weights with a finite logsumexp along dim",
                             f"{int((~torch.isfinite(total)).sum())} rows with NaN, +inf or only -inf")
    # subtract the row's maximum first: the differences between log-weights of large magnitude (1e17)
    # would otherwise be lost to the rounding of max + log(sum exp)
    shifted = log_weight - log_weight.amax(dim=int(dim), keepdim=True)
    return shifted - torch.logsumexp(shifted, dim=int(dim), keepdim=True)


def from_members(
    members: Any,
    log_weight: Any = None,
    *,
    dims: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    weight_dims: Sequence[str] | None = None,
    coords: Mapping[Hashable, Any] | None = None,
    name: str = "x",
    method: str = "unspecified",
    config: Mapping[str, Any] | None = None,
    seed: _device.Seed = None,
    attrs: Mapping[str, Any] | None = None,
    dtype: Any = None,
) -> xr.Dataset:
    """Build a posterior Dataset from members and (optional) log-weights.

    Parameters
    ----------
    members : array-like or mapping of str to array-like
        Torch tensors or numpy arrays. One array becomes the variable ``name``; a mapping gives one
        variable per key. Every array has a member axis of the same length ``N >= 1``.
    log_weight : array-like, optional
        Unnormalised log-weights, shape ``(*batch, N)`` matching ``weight_dims``; they are normalised
        here. ``None`` gives equal weights ``-log N``.
    dims : sequence of str, or mapping from variable name to sequence of str, optional
        Dimension names of each array; one of them must be ``"member"``. Defaults: ``("member",)``
        for 1-d arrays and ``("member", "variable")`` for 2-d ones; required otherwise.
    weight_dims : sequence of str, optional
        Dimension names of ``log_weight``. Default: ``("member",)`` for a 1-d ``log_weight``, else
        the first ``log_weight.ndim`` dims of the first variable (for example ``("time", "member")``
        with members of dims ``("time", "member", "variable")``).
    coords : mapping, optional
        Coordinates passed to the Dataset. ``member`` defaults to ``0, ..., N-1``.
    name : str
        Variable name when ``members`` is a single array.
    method : str
        The method that produced the sample (recorded in ``attrs``).
    config : mapping, optional
        The method's configuration; stored as a JSON string, so it must be JSON-serialisable.
    seed : int, SeedSequence, torch.Generator or None
        The seed that produced the sample, recorded as text (see :func:`daml._device.seed_to_attr`).
    attrs : mapping, optional
        More attributes. They must be storable in netCDF (str, numbers, 1-d numeric arrays).
    dtype : optional
        Cast members and log-weights to this floating dtype. Without it every array keeps its own
        floating dtype, and arrays of different floating dtypes are refused.

    Returns
    -------
    xarray.Dataset
        A posterior that passes :func:`validate`.

    Raises
    ------
    ShapeError, NonFiniteError, DtypeError, InputError
        Naming the argument at fault.
    """
    if not isinstance(name, str) or not name or name == LOG_WEIGHT:
        raise InputError("name", f"a non-empty variable name other than {LOG_WEIGHT!r}", repr(name))
    for arg, value in (("coords", coords), ("attrs", attrs), ("config", config)):
        if value is not None and not isinstance(value, Mapping):
            raise InputError(arg, "a mapping (dict) or None", type(value).__name__)
    for arg, value in (("dims", dims), ("weight_dims", weight_dims)):
        if value is not None and not isinstance(value, (str, Mapping)) and not (
                isinstance(value, (list, tuple)) and all(isinstance(d, str) for d in value)):
            raise InputError(arg, "a sequence of dimension names (str)", repr(value)[:80])
    if isinstance(members, Mapping) and not all(isinstance(k, str) and k for k in members):
        raise InputError("members", "a mapping with non-empty str keys (the variable names)",
                         [k for k in members][:5])
    arrays = dict(members) if isinstance(members, Mapping) else {name: members}
    if not arrays:
        raise ShapeError("members", "at least one array", "an empty mapping")
    if LOG_WEIGHT in arrays:
        raise InputError("members", f"no variable named {LOG_WEIGHT!r}", "one",
                         hint="pass the log-weights as log_weight=")

    tensors: dict[str, torch.Tensor] = {}
    var_dims: dict[str, tuple[str, ...]] = {}
    for key, value in arrays.items():
        arg = "members" if len(arrays) == 1 and not isinstance(members, Mapping) else f"members[{key!r}]"
        t = _half_to_single(_device.as_tensor(value, arg, dtype=dtype), arg, dtype)
        tensors[key] = t
        var_dims[key] = _dims_for(key, t, dims, arg)

    n_members = {t.shape[var_dims[k].index(MEMBER)] for k, t in tensors.items()}
    if len(n_members) != 1:
        raise ShapeError("members", "the same number of members in every variable",
                         {k: t.shape[var_dims[k].index(MEMBER)] for k, t in tensors.items()})
    n = n_members.pop()
    if n == 0:
        raise ShapeError("members", "a non-empty 'member' dimension", "0 members")
    sizes: dict[str, int] = {}
    for key, t in tensors.items():
        for d, s in zip(var_dims[key], t.shape):
            if sizes.setdefault(d, s) != s:
                raise ShapeError("members", f"dimension {d!r} of one size across variables",
                                 f"sizes {sizes[d]} and {s}")
        if not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"members[{key!r}]" if len(tensors) > 1 else "members",
                                 "finite values", f"{bad} NaN or infinite entries")

    float_dtypes = {t.dtype for t in tensors.values()}
    if dtype is None and len(float_dtypes) > 1:
        raise DtypeError("members", "one floating dtype for every variable",
                         sorted(str(d) for d in float_dtypes), hint="pass dtype= to cast them")
    data_dtype = next(iter(float_dtypes))

    first = next(iter(var_dims))
    if log_weight is None:
        lw = torch.full((n,), -math.log(n), dtype=data_dtype)
        w_dims: tuple[str, ...] = (MEMBER,)
    else:
        lw = _half_to_single(_device.as_tensor(log_weight, "log_weight", dtype=dtype), "log_weight", dtype).cpu()
        if dtype is None and lw.dtype != data_dtype:
            raise DtypeError("log_weight", f"dtype {data_dtype} like the members", f"dtype {lw.dtype}",
                             hint="pass dtype= to cast both")
        if weight_dims is not None:
            w_dims = tuple(weight_dims)
        elif lw.ndim == 1:
            w_dims = (MEMBER,)
        else:
            w_dims = var_dims[first][: lw.ndim]
        if len(w_dims) != lw.ndim or MEMBER not in w_dims:
            raise ShapeError("weight_dims", f"{lw.ndim} names including 'member'", w_dims)
        expected = tuple(sizes.get(d, -1) for d in w_dims)
        if tuple(lw.shape) != expected:
            raise ShapeError("log_weight", f"shape {expected} for dims {w_dims}", f"shape {tuple(lw.shape)}",
                             hint="one log-weight per member (and per batch index)")
        if not _all_finite(lw):
            bad = int((~torch.isfinite(lw)).sum())
            raise NonFiniteError("log_weight", "finite log-weights", f"{bad} NaN or infinite entries",
                                 hint="give a zero-weight member a large negative finite log-weight")
        lw = normalise_log_weight(lw, dim=w_dims.index(MEMBER))
    for key in var_dims:
        missing = [d for d in w_dims if d not in var_dims[key]]
        if missing:
            raise ShapeError("weight_dims", f"dims that every member variable has (variable {key!r})",
                             w_dims, hint=f"{key!r} lacks {missing}")

    data_vars = {k: (var_dims[k], _device.to_numpy(t)) for k, t in tensors.items()}
    data_vars[LOG_WEIGHT] = (w_dims, _device.to_numpy(lw), dict(LOG_WEIGHT_ATTRS))
    all_coords = {MEMBER: np.arange(n)}
    all_coords.update(coords or {})
    ds = xr.Dataset(data_vars, coords=all_coords)
    ds.attrs.update(dict(attrs or {}))
    ds.attrs.update(_method_attrs(method, config, seed))
    return validate(ds)


_HALF = (torch.float16, torch.bfloat16)


def _half_to_single(t: torch.Tensor, arg: str, dtype: Any) -> torch.Tensor:
    """Half-precision input widened (losslessly) to float32: weighted sums and the normalisation
    check need more than float16's 3 digits; asking for a half ``dtype=`` is refused."""
    if t.dtype in _HALF:
        if dtype is not None:
            raise DtypeError("dtype", "float32 or float64 (half precision is too coarse for weighted sums)",
                             repr(dtype))
        return t.float()
    return t


def _dims_for(key: str, t: torch.Tensor, dims: Any, arg: str) -> tuple[str, ...]:
    d = dims.get(key) if isinstance(dims, Mapping) else dims
    if d is None:
        if t.ndim not in _DEFAULT_DIMS:
            raise ShapeError("dims", f"dimension names for the {t.ndim}-d array {key!r}", None)
        d = _DEFAULT_DIMS[t.ndim]
    d = (d,) if isinstance(d, str) else tuple(d)
    if len(d) != t.ndim:
        raise ShapeError("dims", f"{t.ndim} names for {arg} of shape {tuple(t.shape)}", d)
    if MEMBER not in d:
        raise ShapeError("dims", "a 'member' dimension", d)
    if len(set(d)) != len(d):
        raise ShapeError("dims", "distinct names", d)
    return d


def _method_attrs(method: str, config: Mapping[str, Any] | None, seed: _device.Seed) -> dict[str, str]:
    if not isinstance(method, str) or not method:
        raise InputError("method", "a non-empty string", repr(method))
    try:
        config_json = json.dumps(dict(config or {}), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InputError("config", "a JSON-serialisable mapping", repr(config)) from exc
    return {
        "method": method,
        "config": config_json,
        "seed": _device.seed_to_attr(seed),
        "daml_version": __version__,
    }


def weighted_var(x: xr.DataArray | xr.Dataset, weights: xr.DataArray, ddof: int = 0,
                 argument: str = "ddof") -> xr.DataArray | xr.Dataset:
    """Weighted variance over ``member`` through xarray's ``weighted``.

    ``ddof=0``: ``sum_i w_i (x_i - mean)^2``. ``ddof=1``: divided by ``1 - sum_i w_i^2``, unbiased for
    reliability weights (the ``N - 1`` denominator for equal weights); undefined, and refused naming
    ``argument``, when one member holds all the weight.
    """
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof not in (0, 1):
        raise InputError("ddof", "0 or 1", repr(ddof))
    for arg, value in (("x", x), ("weights", weights)):
        if not isinstance(value, (xr.DataArray, xr.Dataset) if arg == "x" else xr.DataArray) \
                or MEMBER not in value.dims:
            raise InputError(arg, f"an xarray {'DataArray or Dataset' if arg == 'x' else 'DataArray'} with a "
                             f"{MEMBER!r} dimension", type(value).__name__)
    v = x.weighted(weights).var(MEMBER)
    if ddof == 1:
        w2 = (weights**2).sum(MEMBER)
        if float(w2.max()) >= 1.0 - 1e-12:
            raise InputError(argument, "weights spread over at least two members for an unbiased variance",
                             "all weight on one member (ESS = 1)")
        v = v / (1.0 - w2)
    return v


def member_vars(ds: xr.Dataset) -> list[str]:
    """Names of the data variables that have a ``member`` dimension (``log_weight`` excluded)."""
    if not isinstance(ds, xr.Dataset):
        raise PosteriorError("ds", "an xarray.Dataset", type(ds).__name__)
    return [str(k) for k, v in ds.data_vars.items() if MEMBER in v.dims and k != LOG_WEIGHT]


def _all_finite(values: Any) -> bool:
    """Whether every entry of a floating array or tensor is finite, decided from its sum where that
    is finite (a NaN or infinite entry makes the sum NaN or infinite), entry by entry only where it is
    not (a NaN or infinity, or finite values whose sum overflows). The common case is one reduction,
    with no mask the size of the input: a posterior of many members and times is checked in a few
    milliseconds. Written once for numpy arrays and torch tensors (``xp``, their shared names)."""
    xp: Any = torch if isinstance(values, torch.Tensor) else np
    values = values if xp is torch else np.asarray(values)
    if not (values.is_floating_point() if xp is torch else values.dtype.kind == "f"):
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(xp.isfinite(values.sum())) or bool(xp.isfinite(values).all())


def validate(ds: Any) -> xr.Dataset:
    """Check that ``ds`` is a posterior; return it unchanged.

    Every value is read, so a lazily opened file (``daml.io.open_dataset(path, lazy=True)``) is loaded
    by it; that function checks such a file without reading its member variables.

    Raises
    ------
    PosteriorError
        When ``ds`` is not a Dataset, lacks the ``member`` dimension, ``log_weight`` or the required
        attrs, or when a member variable lacks a weight dimension.
    NonFiniteError
        When log-weights or members hold NaN or infinities.
    DtypeError
        When log-weights or members are not real floating numbers.
    """
    return _validate(ds)


def _validate(ds: Any, members: bool = True) -> xr.Dataset:
    """:func:`validate`; with ``members=False`` every check but the finiteness of the member values
    (their dims and dtypes are still checked), so that only ``log_weight`` is read: the check of a
    lazily opened file."""
    if not isinstance(ds, xr.Dataset):
        raise PosteriorError("ds", "an xarray.Dataset", type(ds).__name__)
    if MEMBER not in ds.dims:
        raise PosteriorError("ds", "a 'member' dimension", f"dims {tuple(ds.dims)}")
    if ds.sizes[MEMBER] < 1:
        raise PosteriorError("ds", "a non-empty 'member' dimension", "0 members")
    if LOG_WEIGHT not in ds.data_vars:
        raise PosteriorError("ds", f"a {LOG_WEIGHT!r} variable", f"variables {list(ds.data_vars)}")
    empty = [str(d) for d in ds.dims if ds.sizes[d] == 0
             and any(d in ds[k].dims for k in (LOG_WEIGHT, *member_vars(ds)))]
    if empty:
        raise PosteriorError("ds", "non-empty dimensions (an empty posterior has nothing to summarise or trust)",
                             ", ".join(f"dimension {d!r} of size 0" for d in empty),
                             hint="select at least one index, e.g. a burn-in shorter than the run")
    lw = ds[LOG_WEIGHT]
    if MEMBER not in lw.dims:
        raise PosteriorError(LOG_WEIGHT, "the 'member' dimension", f"dims {lw.dims}")
    if lw.dtype.kind != "f" or lw.dtype.itemsize < 4:
        raise DtypeError(LOG_WEIGHT, "float32 or float64 values", f"dtype {lw.dtype}",
                         hint="half precision is too coarse for normalised weights" if lw.dtype.kind == "f" else None)
    values = lw.values
    if not _all_finite(values):
        raise NonFiniteError(LOG_WEIGHT, "finite log-weights",
                             f"{int((~np.isfinite(values)).sum())} NaN or infinite entries")
    total = torch.logsumexp(torch.from_numpy(np.ascontiguousarray(values)), dim=lw.dims.index(MEMBER))
    tol = math.sqrt(float(np.finfo(lw.dtype).eps))
    worst = float(total.abs().max())
    if worst > tol:
        raise PosteriorError(LOG_WEIGHT, f"weights normalised over 'member' (|logsumexp| <= {tol:.1e})",
                             f"|logsumexp| up to {worst:.3e}",
                             hint="build posteriors with daml.posterior.from_members")
    names = member_vars(ds)
    if not names:
        raise PosteriorError("ds", "at least one data variable with a 'member' dimension",
                             f"variables {list(ds.data_vars)}")
    for key in names:
        var = ds[key]
        missing = [d for d in lw.dims if d not in var.dims]
        if missing:
            raise PosteriorError(key, f"the weight dimensions {lw.dims}", f"dims {var.dims}")
        if var.dtype.kind not in "fiu" or (var.dtype.kind == "f" and var.dtype.itemsize < 4):
            raise DtypeError(key, "real numeric members (float32, float64 or integers)", f"dtype {var.dtype}",
                             hint="cast half precision with .astype('float32')" if var.dtype.kind == "f" else None)
        if members and var.dtype.kind == "f" and not _all_finite(var.values):
            raise NonFiniteError(key, "finite members",
                                 f"{int((~np.isfinite(var.values)).sum())} NaN or infinite entries")
    for key in REQUIRED_ATTRS:
        if not isinstance(ds.attrs.get(key), str):
            raise PosteriorError("ds.attrs", f"a string attribute {key!r}", repr(ds.attrs.get(key)))
    try:
        json.loads(ds.attrs["config"])
    except ValueError as exc:
        raise PosteriorError("ds.attrs['config']", "a JSON string", repr(ds.attrs["config"])) from exc
    return ds


@xr.register_dataset_accessor("daml")
class PosteriorAccessor:
    """``ds.daml``: weighted statistics, resampling, diagnostics and export of a posterior.

    Moments and quantiles reduce the ``member`` dimension only, weighting through
    :meth:`xarray.Dataset.weighted`, and return a Dataset of the member variables.
    """

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    # -- structure -----------------------------------------------------------------------------------
    def validate(self) -> xr.Dataset:
        """Run :func:`validate` and return the Dataset."""
        return validate(self._ds)

    @property
    def log_weight(self) -> xr.DataArray:
        """Normalised log-weights, dims ``(*batch, member)`` (the Dataset is validated first)."""
        return validate(self._ds)[LOG_WEIGHT]

    @property
    def weights(self) -> xr.DataArray:
        """Normalised weights ``exp(log_weight)``; they sum to one over ``member``.

        The Dataset is validated first: unnormalised log-weights, NaN or infinite members and
        empty dimensions are refused (xarray's ``weighted`` would otherwise skip NaN members and
        rescale unnormalised weights without a word).
        """
        return np.exp(validate(self._ds)[LOG_WEIGHT]).rename("weight")

    @property
    def n_members(self) -> int:
        """Number of members ``N``."""
        return int(self._ds.sizes[MEMBER])

    @property
    def members(self) -> xr.Dataset:
        """The member variables (without ``log_weight``)."""
        return self._ds[member_vars(self._ds)]

    # -- weighted statistics -------------------------------------------------------------------------
    def _weighted(self):
        ds = validate(self._ds)
        return ds[member_vars(ds)].weighted(np.exp(ds[LOG_WEIGHT]))

    def mean(self) -> xr.Dataset:
        """Weighted mean over ``member``.

        Like every statistic of the accessor it validates the Dataset first, so a NaN member or
        unnormalised weights raise (:class:`~daml.errors.NonFiniteError`,
        :class:`~daml.errors.PosteriorError`) instead of being skipped or rescaled.
        """
        return self._weighted().mean(MEMBER)

    def var(self, ddof: int = 0) -> xr.Dataset:
        """Weighted variance over ``member``.

        Parameters
        ----------
        ddof : {0, 1}
            0: the plug-in variance ``sum_i w_i (x_i - mean)^2``. 1: the unbiased variance for
            reliability weights, divided by ``1 - sum_i w_i^2``; with equal weights this is the
            usual ``N - 1`` denominator.
        """
        ds = validate(self._ds)
        return weighted_var(ds[member_vars(ds)], np.exp(ds[LOG_WEIGHT]), ddof)

    def std(self, ddof: int = 0) -> xr.Dataset:
        """Weighted standard deviation over ``member`` (see :meth:`var` for ``ddof``)."""
        return np.sqrt(self.var(ddof=ddof))

    def quantile(self, q: float | Sequence[float]) -> xr.Dataset:
        """Weighted quantiles over ``member`` (xarray's weighted quantile, linear interpolation)."""
        try:
            ok = not isinstance(q, (str, bytes, bool, np.bool_)) and np.asarray(q).dtype.kind in "iuf"
            qs = np.atleast_1d(np.asarray(q, dtype=float)) if ok else None
        except (TypeError, ValueError):
            qs = None
        if qs is None or qs.ndim != 1 or qs.size == 0 or not np.all((qs >= 0) & (qs <= 1)):
            raise InputError("q", "probabilities in [0, 1] (a number or a 1-d list)", repr(q)[:80])
        return self._weighted().quantile(q, dim=MEMBER)

    # -- diagnostics ---------------------------------------------------------------------------------
    def ess(self) -> xr.DataArray:
        """Kish effective sample size ``1 / sum_i w_i^2`` (see :func:`daml.diagnostics.ess`)."""
        from .diagnostics import ess

        return ess(self._ds)

    def psis(self, r_eff: float = 1.0):
        """Pareto-smoothed log-weights and k-hat (see :func:`daml.diagnostics.psis`)."""
        from .diagnostics import psis

        return psis(self._ds, r_eff=r_eff)

    def describe(self) -> str:
        """A short human-readable summary (used by ``daml info``)."""
        from .diagnostics import describe

        return describe(self._ds)

    # -- transformations -----------------------------------------------------------------------------
    def resample(self, seed: _device.Seed = None, method: str = "systematic", n: int | None = None) -> xr.Dataset:
        """An equal-weight posterior drawn from this one.

        Parameters
        ----------
        seed : int, SeedSequence, torch.Generator or None
            Random stream of the resampling.
        method : {"systematic", "stratified", "residual", "multinomial"}
            Scheme of :mod:`daml.resampling`.
        n : int, optional
            Number of members of the result (default: the same ``N``).

        Returns
        -------
        xarray.Dataset
            A posterior with ``log_weight = -log n``. The coordinate ``ancestor`` (dims of
            ``log_weight``) holds the index of the parent member of each new member. Member variables
            are gathered independently at each batch index (for example each time). Other coordinates
            along ``member`` are dropped; ``attrs`` gain ``resampling`` (JSON: scheme and seed).
        """
        from . import resampling

        ds = validate(self._ds)
        lw = ds[LOG_WEIGHT]
        batch = [d for d in lw.dims if d != MEMBER]
        order = (*batch, MEMBER)
        weights = torch.from_numpy(np.ascontiguousarray(np.exp(lw.transpose(*order).values)))
        ancestors = resampling.resample(weights, method=method, n=n, seed=seed)
        n_out = ancestors.shape[-1]
        out = {}
        for key, var in ds.data_vars.items():
            if key == LOG_WEIGHT or MEMBER not in var.dims:
                out[key] = var.variable
                continue
            rest = [d for d in var.dims if d not in order]
            values = torch.from_numpy(np.ascontiguousarray(var.transpose(*order, *rest).values))
            index = ancestors.reshape(*ancestors.shape, *([1] * len(rest)))
            gathered = torch.take_along_dim(values, index, dim=len(batch))
            out[key] = xr.Variable((*order, *rest), gathered.numpy()).transpose(*var.dims)
        out[LOG_WEIGHT] = xr.Variable(order, np.full(ancestors.shape, -math.log(n_out), dtype=lw.dtype),
                                      attrs=dict(LOG_WEIGHT_ATTRS)).transpose(*lw.dims)
        coords = {k: c for k, c in ds.coords.items() if MEMBER not in c.dims}
        coords[MEMBER] = np.arange(n_out)
        coords["ancestor"] = xr.Variable(order, ancestors.numpy()).transpose(*lw.dims)
        res = xr.Dataset(out, coords=coords, attrs=dict(ds.attrs))
        res.attrs["resampling"] = json.dumps({"method": method, "seed": _device.seed_to_attr(seed)})
        return validate(res)

    # -- export --------------------------------------------------------------------------------------
    def to_netcdf(self, path, **options: Any) -> None:
        """Write atomically to netCDF4/HDF5, losslessly compressed by default; ``options`` (``compression=``,
        ``dtype=``) are those of :func:`daml.io.to_netcdf`."""
        from .io import to_netcdf

        to_netcdf(self._ds, path, **options)

    def to_arviz(self, resample: bool = True, seed: _device.Seed = None, method: str = "systematic",
                 n: int | None = None):
        """Convert to ArviZ as equal-weight draws by default (see :func:`daml.io.to_arviz`)."""
        from .io import to_arviz

        return to_arviz(self._ds, resample=resample, seed=seed, method=method, n=n)
