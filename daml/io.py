"""Reading and writing posteriors: netCDF (atomic, lossless) and the ArviZ boundary.

netCDF files are written through h5netcdf to a temporary file in the target folder and then renamed
over the target (:func:`os.replace`), so an interrupted write never leaves a half-written result and
an existing file is only replaced by a complete one. No packing or compression is applied: float64
stays float64 and a round trip through :func:`to_netcdf` and :func:`open_posterior` gives back an
identical Dataset (values bit for bit, dtypes, coordinates and attributes).

ArviZ has no field for sample weights (arviz-devs/arviz#2035). :func:`to_arviz` follows the
maintainers' suggestion: members become draws of a single chain, and the log-weights go to
``sample_stats.log_weight``. ArviZ's own diagnostics (``ess``, ``rhat``, ``summary``) ignore that
variable and treat draws as equally weighted, so pass ``resample=True`` before using them on a
weighted posterior.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import _device
from .errors import InputError
from .posterior import LOG_WEIGHT, MEMBER, member_vars, validate

__all__ = ["to_netcdf", "open_posterior", "to_arviz", "atomic_write_path", "save_figure"]

_ATTR_TYPES = (str, int, float, np.integer, np.floating, np.ndarray)


class atomic_write_path:
    """Context manager giving a temporary path next to ``path``; renamed to ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike, suffix: str = ".tmp"):
        self.path = Path(path)
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
    """Write a matplotlib figure as PNG atomically (its folder is created), close it, return the path."""
    path = Path(path)
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
    with atomic_write_path(path, suffix=".nc.tmp") as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")


def open_posterior(path: str | os.PathLike) -> xr.Dataset:
    """Read a posterior written by :func:`to_netcdf` into memory and validate it.

    The file is closed on return (the data are loaded), so it can be overwritten afterwards.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: expected an existing netCDF file, got {str(p)!r}")
    ds = xr.load_dataset(p, engine="h5netcdf")
    for var in ds.variables.values():
        var.encoding.clear()
    return validate(ds)


def to_arviz(ds: xr.Dataset, resample: bool = False, seed: _device.Seed = None, method: str = "systematic"):
    """Convert a posterior to ArviZ's container.

    Parameters
    ----------
    ds : xarray.Dataset
        A posterior.
    resample : bool
        ``False`` (default): every member becomes a draw, and the weights travel as
        ``sample_stats.log_weight`` with dims ``(chain, draw, *batch)``. ``True``: first draw an
        equal-weight posterior with :meth:`PosteriorAccessor.resample` (``seed``, ``method``), so that
        ArviZ's unweighted diagnostics apply; ``sample_stats.log_weight`` is then ``-log N``.
    seed, method
        Passed to the resampling when ``resample`` is true.

    Returns
    -------
    arviz.InferenceData (ArviZ < 1) or xarray.DataTree (ArviZ >= 1)
        Groups ``posterior`` (member variables, ``member`` renamed ``draw``, one ``chain``) and
        ``sample_stats`` (``log_weight``).
    """
    import arviz as az

    validate(ds)
    if resample:
        ds = ds.daml.resample(seed=seed, method=method)
    drop = [c for c in ds.coords if c != MEMBER and MEMBER in ds[c].dims]

    def group(names):
        sub = ds[names].drop_vars(drop).rename({MEMBER: "draw"}).expand_dims(chain=[0])
        return sub.transpose("chain", "draw", ...)

    posterior = group(member_vars(ds))
    sample_stats = group([LOG_WEIGHT])
    posterior.attrs = dict(ds.attrs)
    if hasattr(az, "InferenceData"):
        return az.InferenceData(posterior=posterior, sample_stats=sample_stats)
    return xr.DataTree.from_dict({"posterior": posterior, "sample_stats": sample_stats})
