"""Reading and writing posteriors: netCDF (atomic, lossless) and the ArviZ boundary.

netCDF files are written through h5netcdf to a temporary file in the target folder and then renamed
over the target (:func:`os.replace`), so an interrupted write never leaves a half-written result and
an existing file is only replaced by a complete one. No packing or compression is applied: float64
stays float64 and a round trip through :func:`to_netcdf` and :func:`open_posterior` gives back an
identical Dataset (values bit for bit, dtypes, coordinates and attributes).

ArviZ has no field for sample weights (arviz-devs/arviz#2035): its diagnostics and plots treat
every draw as equally weighted. :func:`to_arviz` therefore hands ArviZ equal-weight draws by default
(a weighted posterior is resampled, to a number of draws for which ArviZ cannot report a larger ESS
than the weights hold); ``resample=False`` passes the members with the log-weights in
``sample_stats.log_weight``, for tools that read them.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import _device
from .errors import DamlError, InputError, check_real
from .posterior import LOG_WEIGHT, MEMBER, member_vars, validate

__all__ = ["to_netcdf", "open_posterior", "to_arviz", "arviz_draws", "atomic_write_path", "save_figure"]

_ATTR_TYPES = (str, int, float, np.integer, np.floating, np.ndarray)


class atomic_write_path:
    """Context manager giving a temporary path next to ``path``; renamed to ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike, suffix: str = ".tmp"):
        self.path = _as_path(path)
        self.suffix = suffix
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise InputError("path", "a file in an existing folder", str(self.path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.", suffix=self.suffix)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def _check_attrs(attrs: dict[str, Any], where: str) -> None:
    for key, value in attrs.items():
        ok = isinstance(value, _ATTR_TYPES) and not isinstance(value, (bool, np.bool_))
        if isinstance(value, np.ndarray):
            ok = value.ndim == 1 and value.dtype.kind in "iuf"
        if not ok:
            raise InputError(f"{where}[{key!r}]", "a netCDF-storable attribute (str, int, float, 1-d numeric array)",
                             f"{type(value).__name__} {value!r}", hint="encode it as a JSON string")


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically (its folder is created), close it, return the path.

    Raises
    ------
    InputError
        Naming ``path`` when it is not a str or path-like, ``dpi`` when it is not a positive finite
        number, ``fig`` when it has no ``savefig``.
    """
    path = _as_path(path)
    dpi = check_real(dpi, "dpi", positive=True, expected="a positive number of dots per inch")
    if not callable(getattr(fig, "savefig", None)):
        raise InputError("fig", "a matplotlib Figure", type(fig).__name__)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def to_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> None:
    """Write a posterior to ``path`` (netCDF4/HDF5 through h5netcdf), atomically.

    Parameters
    ----------
    ds : xarray.Dataset
        A posterior (checked with :func:`daml.posterior.validate`).
    path : str or path-like
        Target file; its folder must exist. An existing file is replaced only once the new one is
        complete.
    """
    validate(ds)
    _check_attrs(ds.attrs, "ds.attrs")
    for name, var in ds.variables.items():
        _check_attrs(var.attrs, f"ds[{name!r}].attrs")
    with atomic_write_path(_as_path(path), suffix=".nc.tmp") as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")


def open_posterior(path: str | os.PathLike) -> xr.Dataset:
    """Read a posterior written by :func:`to_netcdf` into memory and validate it.

    The file is closed on return (the data are loaded), so it can be overwritten afterwards.
    """
    p = _as_path(path)
    if p.is_dir():
        raise InputError("path", "an existing netCDF file", f"the folder {str(p)!r}")
    if not p.is_file():
        raise FileNotFoundError(f"path: expected an existing netCDF file, got {str(p)!r}")
    try:
        ds = xr.load_dataset(p, engine="h5netcdf")
    except Exception as exc:  # h5py / h5netcdf / xarray decoding: their message, with the file named
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise InputError("path", "a readable netCDF4/HDF5 posterior file", repr(p.name),
                         hint=f"{str(p)!r} cannot be read: {type(exc).__name__}: {reason}") from exc
    for var in ds.variables.values():
        var.encoding.clear()
    try:
        return validate(ds)
    except DamlError as exc:  # the same error type, with the file named in the argument
        raise type(exc)(f"{exc.argument} in {str(p)!r}", exc.expected, exc.got, exc.hint) from exc


def _as_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError("path", "a str or os.PathLike file name", type(path).__name__)
    return Path(path)


def arviz_draws(kish_ess: float) -> int:
    """The number of equal-weight draws :func:`to_arviz` gives ArviZ for weights of Kish ESS ``kish_ess``.

    The largest ``n >= 1`` with ``n * max(1, log10 n) <= kish_ess``. ArviZ's ESS of ``n`` draws in
    one chain is at most ``n * log10 n`` (it bounds the autocorrelation time below by
    ``1 / log10 n``), and at most ``n`` for ``n <= 10``, so with this many draws ArviZ can never
    report more effective draws than the weights hold, whatever the noise of its estimate. For
    example 10 -> 10, 200 -> 100, 1000 -> 386.
    """
    from .errors import check_real

    e = check_real(kish_ess, "kish_ess", expected="a finite effective sample size >= 1")
    if not e >= 1.0:
        raise InputError("kish_ess", "a finite effective sample size >= 1", repr(kish_ess))
    def bound(k: int) -> float:
        return k * max(1.0, math.log10(k))

    n = int(math.floor(e))
    if n > 10:  # start near the root of n log10 n = e, then step to the exact answer
        n = max(10, int(e / math.log10(e / math.log10(e))))
        while bound(n + 1) <= e:
            n += 1
    while n > 1 and bound(n) > e:
        n -= 1
    return n


def to_arviz(ds: xr.Dataset, resample: bool = True, seed: _device.Seed = None, method: str = "systematic",
             n: int | None = None):
    """Convert a posterior to ArviZ's container, as draws that ArviZ reads correctly.

    ArviZ has no sample weights: ``az.summary``, ``az.plot_posterior``, ``az.ess`` and the rest treat
    every draw as equally weighted, so a weighted posterior handed over member for member would show
    the *proposal* (often the prior). By default the draws ArviZ gets are therefore equal-weight:

    * equal weights (``log_weight == -log N`` at every batch index, as the EnKF or a resampled
      posterior store): the members as they are, one draw each;
    * unequal weights: an equal-weight resample (:meth:`PosteriorAccessor.resample`, ``method``,
      from ``seed``) of ``n`` draws per batch index, in a random order (so that ArviZ's split-chain
      diagnostics see no artificial trend from the member order). By default
      ``n = arviz_draws(min ESS)``, the largest ``n`` with ``n * max(1, log10 n) <= `` the smallest Kish
      ESS over the batch indices: ArviZ's ESS of ``n`` draws is at most ``n * log10 n``, so its ESS
      (hence its Monte Carlo standard errors) can never claim more than the weights hold. The means
      and quantiles ArviZ then shows are those of the weighted posterior, within Monte Carlo error of
      about ``sd / sqrt(n)``.

    Parameters
    ----------
    ds : xarray.Dataset
        A posterior.
    resample : bool
        ``True`` (default): equal-weight draws as above. ``False``: every member becomes a draw and
        the weights travel only as ``sample_stats.log_weight`` (for tools that read them); ArviZ's
        own summaries then ignore the weights, and a :class:`UserWarning` says so when they are
        unequal.
    seed : int, SeedSequence, torch.Generator or None
        Random stream of the resampling and of the draw order (recorded in ``attrs["daml_arviz"]``).
    method : {"systematic", "stratified", "residual", "multinomial"}
        Resampling scheme.
    n : int, optional
        Number of draws of a resample, overriding the default above; given, the posterior is
        resampled even when its weights are equal. More than ``arviz_draws(ESS)`` draws can make ArviZ
        report an ESS above the Kish ESS of the weights.

    Returns
    -------
    arviz.InferenceData (ArviZ < 1) or xarray.DataTree (ArviZ >= 1)
        Groups ``posterior`` (member variables, ``member`` renamed ``draw``, one ``chain``) and
        ``sample_stats`` (``log_weight``, and ``ancestor``, the parent member of each draw, when
        resampled). ``posterior.attrs["daml_arviz"]`` (JSON) records whether and how the posterior
        was resampled, the Kish ESS and the number of draws.
    """
    import json
    import warnings

    import arviz as az

    from .diagnostics import ess as kish_ess

    validate(ds)
    if not isinstance(resample, (bool, np.bool_)):
        raise InputError("resample", "True or False", repr(resample))
    lw = ds[LOG_WEIGHT]
    n_members = ds.sizes[MEMBER]
    equal = bool(np.all(np.abs(lw.values + math.log(n_members)) <= 1e-9))
    ess_min = float(kish_ess(ds).min())
    record: dict[str, Any] = {"resampled": False, "kish_ess_min": ess_min, "members": n_members}
    if resample and (n is not None or not equal):
        if n is None:
            n = arviz_draws(ess_min)
        else:
            from .resampling import _check_n

            n = _check_n(n, n_members)
        resample_seed, order_seed = _device.seed_sequence(seed).spawn(2)
        ds = ds.daml.resample(seed=resample_seed, method=method, n=n)
        import torch

        perm = torch.randperm(n, generator=_device.generator(order_seed)).numpy()
        ds = ds.isel({MEMBER: perm}).assign_coords({MEMBER: np.arange(n)})
        record.update(resampled=True, method=method, seed=_device.seed_to_attr(seed), draws=n)
    elif not resample and not equal:
        warnings.warn("to_arviz(resample=False): the members go to ArviZ with unequal weights, which ArviZ "
                      "ignores (az.summary, az.plot_posterior and az.ess describe the unweighted members); "
                      "the weights are only in sample_stats.log_weight", UserWarning, stacklevel=2)
    drop = [c for c in ds.coords if c != MEMBER and MEMBER in ds[c].dims]

    def group(names, extra=None):
        sub = ds[names].drop_vars(drop)
        if extra is not None:
            sub = sub.assign(extra)
        sub = sub.rename({MEMBER: "draw"}).expand_dims(chain=[0])
        return sub.transpose("chain", "draw", ...)

    posterior = group(member_vars(ds))
    extra = {"ancestor": ds["ancestor"].variable} if "ancestor" in drop else None
    sample_stats = group([LOG_WEIGHT], extra)
    posterior.attrs = dict(ds.attrs)
    posterior.attrs["daml_arviz"] = json.dumps(record)
    if hasattr(az, "InferenceData"):
        return az.InferenceData(posterior=posterior, sample_stats=sample_stats)
    return xr.DataTree.from_dict({"posterior": posterior, "sample_stats": sample_stats})
