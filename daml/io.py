"""Reading and writing posteriors and their summaries: netCDF, strict JSON, PNG, and the ArviZ boundary.

Every file is written into a temporary file beside its target and renamed over the target
(:func:`os.replace`) only when complete (:class:`atomic_write_path`), so an interrupted write never
leaves a half-written result and an existing file is only replaced by a complete one:

* files get the mode ``0o666`` less the process's umask, like any file a program creates (so
  ``umask 022`` gives ``rw-r--r--``);
* Ctrl-C (SIGINT) during a write removes the temporary file and raises :class:`KeyboardInterrupt`
  once the library call returns. (Without this guard, a SIGINT that arrives while h5py writes a large
  array is delivered as the first Python code runs again, which is often a weakref callback of
  xarray's lock registry, ``xarray.backends.locks``; Python prints "Exception ignored" there and the
  program goes on as if nothing happened.) Another handler a program installed is called as usual;
* a failed rename removes the temporary file;
* a temporary file is named ``.<target>.daml-tmp.<host>.<pid>.<random><suffix>``; one that a killed
  process left behind (SIGKILL, power loss) is removed by the next write to the same target on the
  same host once no process of that id is alive.

netCDF files are written through h5netcdf, losslessly compressed by default (zlib level
:data:`DEFAULT_COMPRESSION` with the byte shuffle): a round trip through :func:`to_netcdf` and
:func:`open_posterior` gives back an identical Dataset (values bit for bit, dtypes, coordinates and
attributes). ``dtype="float32"`` halves the floating data at about 7 significant digits.

ArviZ has no field for sample weights (arviz-devs/arviz#2035): its diagnostics and plots treat
every draw as equally weighted. :func:`to_arviz` therefore hands ArviZ equal-weight draws by default
(a weighted posterior is resampled, to a number of draws for which ArviZ cannot report a larger ESS
than the weights hold); ``resample=False`` passes the members with the log-weights in
``sample_stats.log_weight``, for tools that read them.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import _device
from .errors import DamlError, DtypeError, InputError, PosteriorError, check_int, check_real
from .posterior import LOG_WEIGHT, MEMBER, REQUIRED_ATTRS, _validate, member_vars, validate

__all__ = ["to_netcdf", "open_posterior", "open_dataset", "write_json", "to_arviz", "arviz_draws",
           "atomic_write_path", "save_figure", "save_network", "load_network", "NETWORKS"]

_ATTR_TYPES = (str, int, float, np.integer, np.floating, np.ndarray)

DEFAULT_COMPRESSION = 1
"""zlib level :func:`to_netcdf` uses by default (lossless; see docs/posterior.md for the sizes and times
that chose it)."""

SUMMARY_KIND = "summary"
"""``attrs["daml_kind"]`` of a summary Dataset (weighted statistics without members)."""

_TMP_TAG = ".daml-tmp."


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _pid_alive(pid: int) -> bool:
    """Whether a process of id ``pid`` exists (on POSIX; elsewhere every pid counts as alive)."""
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_stale_temps(folder: Path, name: str) -> list[Path]:
    """Remove the temporary files of target ``name`` in ``folder`` left by dead processes of this host."""
    pattern = re.compile(re.escape(f".{name}{_TMP_TAG}{_host_tag()}.") + r"(\d+)\.[0-9a-f]{16}")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


class atomic_write_path:
    """Context manager giving a temporary path next to ``path``; renamed to ``path`` on success.

    The temporary file is created with mode ``0o666`` less the umask (the mode the target keeps), as
    ``.<name>.daml-tmp.<host>.<pid>.<random><suffix>``; temporary files of the same target that dead
    processes of this host left behind are removed first. On an exception, or when SIGINT arrives
    during the block (a :class:`KeyboardInterrupt` that a library swallowed included), the temporary
    file is removed, ``path`` is left as it was and the exception is raised. A failed rename removes
    the temporary file too.
    """

    def __init__(self, path: str | os.PathLike, suffix: str = ".tmp"):
        self.path = _as_path(path)
        if not isinstance(suffix, str) or "/" in suffix or os.sep in suffix:
            raise InputError("suffix", "a file-name suffix (str without a path separator)", repr(suffix))
        self.suffix = suffix
        self.tmp: Path | None = None
        self._previous: Any = None
        self._pending: BaseException | None = None

    def __enter__(self) -> Path:
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise InputError("path", "a file in an existing folder", str(self.path))
        _remove_stale_temps(folder, self.path.name)
        prefix = f".{self.path.name}{_TMP_TAG}{_host_tag()}.{os.getpid()}."
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        while True:
            tmp = folder / f"{prefix}{secrets.token_hex(8)}{self.suffix}"
            try:
                fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask (and default ACLs)
            except FileExistsError:
                continue
            break
        os.close(fd)
        self.tmp = tmp
        self._guard_sigint()
        return tmp

    def _guard_sigint(self) -> None:
        self._pending = None
        self._previous = None
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):  # SIG_IGN, SIG_DFL or a handler set outside Python: left alone
            return

        def handler(signum, frame):
            try:
                previous(signum, frame)
            except BaseException as exc:
                if self._pending is None:
                    self._pending = exc
                raise

        try:
            signal.signal(signal.SIGINT, handler)
        except (ValueError, OSError):  # not the main interpreter
            return
        self._previous = previous

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        pending, self._pending = self._pending, None
        if exc_type is None and pending is None:
            try:
                os.replace(self.tmp, self.path)
            except BaseException:
                self.tmp.unlink(missing_ok=True)
                raise
            return False
        self.tmp.unlink(missing_ok=True)
        if pending is not None and not isinstance(exc, type(pending)):
            raise pending.with_traceback(None) from exc
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


def _float32_request(dtype: Any) -> bool:
    """``True`` for a float32 request, ``False`` for ``None`` (keep every dtype); anything else is refused."""
    if dtype is None:
        return False
    if str(dtype) in ("float32", "torch.float32"):
        return True
    try:
        ok = not isinstance(dtype, (bool, np.bool_)) and np.dtype(dtype) == np.float32
    except Exception:  # noqa: BLE001 - numpy's refusal of a non-dtype (TypeError, ValueError, ...)
        ok = False
    if not ok:
        raise DtypeError("dtype", "None (keep every dtype) or 'float32' (store floating data as float32)",
                         repr(dtype))
    return True


def _check_summary(ds: xr.Dataset, where: str = "ds") -> xr.Dataset:
    """Check a summary Dataset (``attrs["daml_kind"] == "summary"``): no ``member`` dimension, at least
    one data variable, the attributes a posterior records."""
    if MEMBER in ds.dims:
        raise PosteriorError(where, f"a summary (daml_kind {SUMMARY_KIND!r}) without a {MEMBER!r} dimension",
                             f"dims {dict(ds.sizes)}")
    if not ds.data_vars:
        raise PosteriorError(where, "a summary with at least one data variable", "no data variables")
    for key in REQUIRED_ATTRS:
        if not isinstance(ds.attrs.get(key), str):
            raise PosteriorError(f"{where}.attrs", f"a string attribute {key!r}", repr(ds.attrs.get(key)))
    try:
        json.loads(ds.attrs["config"])
    except ValueError as exc:
        raise PosteriorError(f"{where}.attrs['config']", "a JSON string", repr(ds.attrs["config"])) from exc
    return ds


def _is_summary(ds: xr.Dataset) -> bool:
    """Whether ``ds`` declares itself a summary (``attrs["daml_kind"] == "summary"``)."""
    return isinstance(ds, xr.Dataset) and ds.attrs.get("daml_kind") == SUMMARY_KIND


def to_netcdf(ds: xr.Dataset, path: str | os.PathLike, *, compression: int | None = DEFAULT_COMPRESSION,
              dtype: Any = None) -> None:
    """Write a posterior or a summary to ``path`` (netCDF4/HDF5 through h5netcdf), atomically.

    Parameters
    ----------
    ds : xarray.Dataset
        A posterior (checked with :func:`daml.posterior.validate`) or a summary (``attrs["daml_kind"]
        == "summary"``: no ``member`` dimension, the attributes ``method``, ``config``, ``seed`` and
        ``daml_version``).
    path : str or path-like
        Target file; its folder must exist. An existing file is replaced only once the new one is
        complete. The file gets mode ``0o666`` less the umask (see :class:`atomic_write_path`).
    compression : int or None
        zlib level 1-9 (lossless, with the HDF5 byte shuffle) of every numeric variable of at least one
        dimension; ``0`` or ``None``: none. Default :data:`DEFAULT_COMPRESSION`. The values read back are
        the same at every level; higher levels only trade writing time for size.
    dtype : None or "float32"
        ``None`` (default): every variable keeps its dtype, so the round trip is bit for bit.
        ``"float32"``: the floating data variables other than ``log_weight`` are stored as float32
        (half the bytes; a relative rounding error of at most ``2**-24``, about 6e-8, and values below
        about 1.2e-38 in magnitude lose digits or become 0). ``log_weight`` keeps its dtype, so the
        weights stay normalised to their own precision and ESS and k-hat are those of the original
        weights; coordinates keep their dtypes. ``attrs["daml_storage"]`` records the conversion.

    Raises
    ------
    InputError
        Naming ``compression``, ``dtype`` (a value too large for float32), ``path`` or an attribute
        that netCDF cannot store.
    DtypeError
        Naming ``dtype`` when it is neither ``None`` nor float32.
    PosteriorError, NonFiniteError
        From :func:`daml.posterior.validate` (or the summary check).
    """
    if compression is None:
        level = 0
    else:
        level = check_int(compression, "compression", minimum=0,
                          expected="a zlib level 0-9 (int) or None (no compression)")
        if level > 9:
            raise InputError("compression", "a zlib level 0-9 (int) or None (no compression)", repr(compression))
    to_float32 = _float32_request(dtype)
    if not isinstance(ds, xr.Dataset):
        raise PosteriorError("ds", "an xarray.Dataset", type(ds).__name__)
    if _is_summary(ds):
        _check_summary(ds)
    else:
        validate(ds)
    _check_attrs(ds.attrs, "ds.attrs")
    for name, var in ds.variables.items():
        _check_attrs(var.attrs, f"ds[{name!r}].attrs")
    out = ds.copy(deep=False)
    for var in out.variables.values():  # settings a lazily opened file carried would override ours
        var.encoding = {}
    if to_float32:
        limit = float(np.finfo(np.float32).max)
        converted = []
        for name, var in out.data_vars.items():
            if name == LOG_WEIGHT or var.dtype != np.float64:
                continue
            values = var.values
            big = max(abs(float(np.nanmax(values))), abs(float(np.nanmin(values)))) if values.size \
                and not np.isnan(values).all() else 0.0
            if math.isfinite(big) and big > limit:
                raise InputError("dtype", f"float32 storage of values within +-{limit:.3e}",
                                 f"{name!r} holds values up to {big:.3e} in magnitude",
                                 hint="store this Dataset with dtype=None")
            out[name] = var.astype(np.float32)
            converted.append(str(name))
        if converted:
            out.attrs["daml_storage"] = ("float32: " + ", ".join(converted) + " rounded from float64 by "
                                         "daml.io.to_netcdf (relative error <= 2**-24)")
    encoding = {}
    if level:
        for name, var in out.variables.items():
            if var.ndim >= 1 and var.size > 0 and var.dtype.kind in "fiu" and name not in out.indexes:
                encoding[name] = {"zlib": True, "complevel": level, "shuffle": True}
    with atomic_write_path(_as_path(path), suffix=".nc.tmp") as tmp:
        out.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)


def _check_file(path: Any) -> Path:
    p = _as_path(path)
    if p.is_dir():
        raise InputError("path", "an existing netCDF file", f"the folder {str(p)!r}")
    if not p.is_file():
        raise FileNotFoundError(f"path: expected an existing netCDF file, got {str(p)!r}")
    return p


def open_dataset(path: str | os.PathLike, lazy: bool = False) -> xr.Dataset:
    """Open a file written by :func:`to_netcdf`: a posterior (validated) or a summary (checked).

    Parameters
    ----------
    path : str or path-like
        The netCDF file.
    lazy : bool
        ``False`` (default): load every variable and close the file (it can then be overwritten); a
        posterior is validated as by :func:`open_posterior`. ``True``: open without reading the data
        (xarray reads a variable when it is first used); the structure, dtypes, attributes and
        ``log_weight`` are checked, reading only ``log_weight``, so NaN in the member values are found
        only by :func:`daml.posterior.validate` on the loaded data. The file stays open until
        ``ds.close()`` (or the end of a ``with`` block).

    Returns
    -------
    xarray.Dataset
        With ``attrs["daml_kind"] == "summary"`` for a summary.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    InputError
        Naming the file when it is a folder, or not a readable netCDF4/HDF5 file (the reader's error is
        chained as the cause).
    PosteriorError, NonFiniteError, DtypeError
        From :func:`daml.posterior.validate` or the summary check, with the file named.
    """
    if not isinstance(lazy, (bool, np.bool_)):
        raise InputError("lazy", "True or False", repr(lazy))
    return _open(path, bool(lazy), "a readable netCDF4/HDF5 posterior or summary file")


def _open(path: Any, lazy: bool, expected: str) -> xr.Dataset:
    p = _check_file(path)
    try:
        ds = xr.open_dataset(p, engine="h5netcdf") if lazy else xr.load_dataset(p, engine="h5netcdf")
    except Exception as exc:  # h5py / h5netcdf / xarray decoding: their message, with the file named
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise InputError("path", expected, repr(p.name),
                         hint=f"{str(p)!r} cannot be read: {type(exc).__name__}: {reason}") from exc
    for var in ds.variables.values():
        var.encoding.clear()
    try:
        if _is_summary(ds):
            return _check_summary(ds)
        return _validate(ds, members=not lazy)
    except DamlError as exc:  # the same error type, with the file named in the argument
        ds.close()
        raise type(exc)(f"{exc.argument} in {str(p)!r}", exc.expected, exc.got, exc.hint) from exc
    except BaseException:
        ds.close()
        raise


def open_posterior(path: str | os.PathLike) -> xr.Dataset:
    """Read a posterior written by :func:`to_netcdf` into memory and validate it.

    The file is closed on return (the data are loaded), so it can be overwritten afterwards. A summary
    file (no members) is refused with a :class:`~daml.errors.PosteriorError`; :func:`open_dataset`
    opens both.
    """
    ds = _open(path, False, "a readable netCDF4/HDF5 posterior file")
    if _is_summary(ds):
        raise PosteriorError("path", "a posterior file (members and log_weight)",
                             f"the summary file {str(_as_path(path))!r} (daml_kind {SUMMARY_KIND!r})",
                             hint="open it with daml.io.open_dataset")
    return ds


def _strict_json(obj: Any, where: str, seen: set[int]) -> Any:
    """A copy of ``obj`` that :func:`json.dumps` writes as strict JSON: NaN and infinities become None,
    numpy scalars and arrays Python numbers and lists; anything else is refused naming its place."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise InputError(where, "JSON-serialisable data (a numeric or boolean array)",
                             f"an array of dtype {obj.dtype}")
        return _strict_json(obj.tolist(), where, seen)
    if isinstance(obj, (dict, list, tuple)):
        if id(obj) in seen:
            raise InputError(where, "JSON-serialisable data without cycles", "a container that holds itself")
        seen.add(id(obj))
        try:
            if isinstance(obj, dict):
                out = {}
                for key, value in obj.items():
                    if isinstance(key, (np.integer, np.bool_)) or isinstance(key, (int, bool)):
                        key = str(int(key)) if not isinstance(key, (bool, np.bool_)) else str(bool(key)).lower()
                    if not isinstance(key, str):
                        raise InputError(where, "a dict with str (or int) keys", f"the key {key!r}")
                    out[key] = _strict_json(value, f"{where}[{key!r}]", seen)
                return out
            return [_strict_json(v, f"{where}[{i}]", seen) for i, v in enumerate(obj)]
        finally:
            seen.discard(id(obj))
    raise InputError(where, "JSON-serialisable data (dict, list, str, int, float, bool, None, numpy numbers "
                            "and arrays)", f"{type(obj).__name__} {repr(obj)[:60]}")


def write_json(obj: Any, path: str | os.PathLike, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (RFC 8259), atomically, and return the path.

    NaN and infinities (Python or numpy, at any depth) become ``null``, numpy scalars and arrays become
    numbers and lists, tuples lists, int dict keys strings, so every JSON reader accepts the file (Python's
    :func:`json.dumps` would write the non-standard tokens ``NaN`` and ``Infinity``). The file is written
    as UTF-8 through :class:`atomic_write_path` (mode ``0o666`` less the umask).

    Parameters
    ----------
    obj : dict, list, str, number, bool or None
        The data; containers may nest.
    path : str or path-like
        Target file; its folder must exist.
    indent : int or None
        Indentation, 0 to 16 spaces (``None``: one line).

    Raises
    ------
    InputError
        Naming the place in ``obj`` (for example ``obj['scores'][2]``) of a value JSON cannot hold, or
        ``path`` / ``indent``.
    """
    target = _as_path(path)
    if indent is not None:
        indent = check_int(indent, "indent", minimum=0, expected="an int from 0 to 16 or None")
        if indent > 16:
            raise InputError("indent", "an int from 0 to 16 or None", repr(indent))
    text = json.dumps(_strict_json(obj, "obj", set()), indent=indent, allow_nan=False, ensure_ascii=False)
    with atomic_write_path(target, suffix=".json.tmp") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return target


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


# -- learned networks (mixture transitions and proposals, dynamics networks) ---------------------------------------------------

NETWORKS = {
    "MixtureTransition": ("daml.models.mixture", "MixtureTransition"),
    "MixtureProposal": ("daml.filters.proposals", "MixtureProposal"),
    "HamiltonianNet": ("daml.models.hamiltonian", "HamiltonianNet"),
    "LagrangianNet": ("daml.models.hamiltonian", "LagrangianNet"),
    "DerivativeNet": ("daml.models.hamiltonian", "DerivativeNet"),
}
"""The learned networks :func:`save_network` writes and :func:`load_network` reads, by class name. Only
these classes are rebuilt from a file (nothing else is imported or unpickled)."""


def _network_class(name: str) -> Any:
    import importlib

    module, attr = NETWORKS[name]
    return getattr(importlib.import_module(module), attr)


def save_network(network: Any, path: str | os.PathLike) -> Path:
    """Write a learned network (one of :data:`NETWORKS`: a trained :class:`~daml.models.MixtureTransition`,
    :class:`~daml.filters.MixtureProposal`, :class:`~daml.models.HamiltonianNet`,
    :class:`~daml.models.LagrangianNet` or :class:`~daml.models.DerivativeNet`) to ``path``, atomically.

    The file (``torch.save``) holds the class name, the constructor arguments (``config()``), the
    trained parameters (``state_dict()``, moved to the CPU) and the daml version: everything
    :func:`load_network` needs to rebuild the same network, and nothing that needs unpickling code.

    Raises
    ------
    InputError
        Naming ``network`` for anything but one of :data:`NETWORKS`, or one with non-finite parameters
        (a diverged training run is not saved as if it were a model); naming ``path`` for a file in a
        folder that does not exist.
    """
    import torch

    name = type(network).__name__
    if name not in NETWORKS or not isinstance(network, _network_class(name)):
        raise InputError("network", f"one of daml's learned networks {sorted(NETWORKS)}", type(network).__name__)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError("network", "finite parameters", f"NaN or infinite values in {bad[:3]}")
    from ._version import __version__

    payload = {"daml_network": name, "config": network.config(), "state_dict": state, "daml_version": __version__}
    target = _as_path(path)
    with atomic_write_path(target, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return target


def load_network(path: str | os.PathLike, kind: str | None = None, *, dtype: Any = None, device: Any = None) -> Any:
    """Read a network written by :func:`save_network` (with ``torch.load(weights_only=True)``: tensors and
    plain values only, no code is run).

    Parameters
    ----------
    path : str or path
        The file.
    kind : str, optional
        The class the caller needs (a key of :data:`NETWORKS`); another one in the file is refused.
    dtype, device : optional
        Where to put the network (default: float64 on the CPU, see :mod:`daml._device`).

    Raises
    ------
    InputError
        Naming ``path`` for a missing or unreadable file, or one that does not hold a daml network; naming
        ``kind`` for an unknown kind or a file holding another class.
    """
    import torch

    if kind is not None and (not isinstance(kind, str) or kind not in NETWORKS):
        raise InputError("kind", f"None or one of {sorted(NETWORKS)}", repr(kind)[:80])
    target = _as_path(path)
    if not target.is_file():
        raise InputError("path", "an existing file written by daml.io.save_network", str(target))
    try:
        payload = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputError("path", "a file written by daml.io.save_network", f"{target} ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("daml_network") not in NETWORKS \
            or not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise InputError("path", "a file written by daml.io.save_network", f"{target} (no daml network in it)")
    name = payload["daml_network"]
    if kind is not None and name != kind:
        raise InputError("kind", f"a file holding a {kind}", f"{target} holds a {name}")
    config = dict(payload["config"])
    config.pop("seed", None)            # the parameters come from the file, not from a seeded draw
    dev = _device.resolve_device(device)
    network = _network_class(name)(**config, seed=0, dtype=_device.resolve_dtype(dtype, dev), device=dev)
    try:
        network.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise InputError("path", f"parameters matching the {name} it describes", f"{target} ({exc})") from None
    network.source = str(target)
    return network
