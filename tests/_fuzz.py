"""Fuzz harness over every public name of daml (issue 26, item 5).

For each public callable a :class:`Spec` builds a small *valid* baseline call, then one argument at a
time is replaced by a bad value (NaN, inf, wrong shape, wrong dtype, empty, one member, non-PD
covariance, wrong Python type, a size that cannot fit, ...). Every call runs under a wall-clock guard
(``signal.setitimer``) and an address-space cap (``RLIMIT_AS``), and is classified:

``ok``           finished, and the result holds no more NaN/inf than the baseline's
``clear``        a :class:`daml.errors.DamlError` that names the mutated argument
``unnamed``      a :class:`daml.errors.DamlError` that does not name it (reported, tolerated)
``other``        any other exception (another library's internal error leaking out)     -> failure
``nonfinite``    finished, more NaN/inf than the baseline, and no daml warning           -> failure
``warned``       finished with NaN/inf but a daml warning said so (reported, tolerated)
``hang``         ran past the time guard, or MemoryError                                 -> failure
``baseline``     the valid baseline call itself failed (a harness or library bug)       -> failure

``KNOWN`` lists the (function, mutation) pairs that still fail, each with a reason; the test suite
fails on any failure outside it *and* on any pair in it that now passes (so the list only shrinks).
``NOT_CALLABLE`` lists the public names that are not callables to fuzz (constants, modules,
exceptions), with the reason; :func:`uncovered` checks that every name in every ``__all__`` is one or
the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import math
import os
import resource
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import xarray as xr

MODULES = ["daml", "daml.posterior", "daml.diagnostics", "daml.resampling", "daml.io", "daml.models",
           "daml.filters", "daml.transport", "daml.diffusion", "daml.ensembles", "daml.learning", "daml.smoothing", "daml.causal", "daml.twin",
           "daml.experiment", "daml.report", "daml.errors", "daml.models.mechanics", "daml.models.hamiltonian",
           "daml.models.mechanics_data", "daml.filters.local", "daml.distributed"]

FAILURES = ("other", "nonfinite", "hang", "baseline")
HUGE = 10 ** 12          # a size that cannot fit in memory on any machine


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that ``except Exception`` in the library cannot eat it."""


# --------------------------------------------------------------------------------------------------
# bad values
# --------------------------------------------------------------------------------------------------

def _float_copy(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone().to(torch.float64 if not v.is_floating_point() else v.dtype)
    return np.array(v, dtype=float, copy=True)


def _poke(v, value):
    out = _float_copy(v)
    if out.ndim == 0:
        return torch.tensor(value, dtype=out.dtype) if isinstance(out, torch.Tensor) else np.array(value)
    out.reshape(-1)[0] = value
    return out


def _cast(v, dtype):
    t = v.detach().clone() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
    return t.to(dtype)


def _np_or_torch(v, arr):
    return torch.as_tensor(arr) if isinstance(v, torch.Tensor) else arr


def _drop_last(v):
    a = v[..., :-1] if v.shape[-1] > 1 else v[..., :0]
    return a


def _non_pd(v):
    c = _float_copy(v)
    n = c.shape[-1]
    eye = torch.eye(n, dtype=c.dtype) if isinstance(c, torch.Tensor) else np.eye(n)
    bad = c - 3.0 * (abs(c).max() + 1.0) * eye
    return bad


def _complex(v):
    return _cast(v, torch.complex128)


def _str_array(v):
    return np.full(np.shape(v), "a", dtype=object).astype(str)


def _object_array(v):
    a = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=object)
    return a


ARRAY = {
    "nan": lambda v: _poke(v, math.nan),
    "inf": lambda v: _poke(v, math.inf),
    "empty": lambda v: v[:0],
    "wrong_shape": _drop_last,
    "extra_dim": lambda v: v[None, None],
    "scalar": lambda v: _np_or_torch(v, np.array(1.5)),
    "int": lambda v: _cast(v, torch.int64),
    "float16": lambda v: _cast(v, torch.float16),
    "bfloat16": lambda v: _cast(v, torch.bfloat16),
    "complex": _complex,
    "str": _str_array,
    "object": _object_array,
    "None": lambda v: None,
    "dict": lambda v: {"a": 1},
    "list_str": lambda v: ["a", "b"],
}
MEMBERS = {**ARRAY, "one_member": lambda v: v[:1]}
COV = {**{k: ARRAY[k] for k in ("nan", "inf", "wrong_shape", "complex", "str", "None", "dict")},
       "non_pd": _non_pd}
LOGW = {**{k: ARRAY[k] for k in ("nan", "empty", "wrong_shape", "int", "complex", "str", "dict", "list_str")},
        "posinf": lambda v: _poke(v, math.inf), "all_neginf": lambda v: _float_copy(v) * 0 - math.inf}
INT = {"zero": lambda v: 0, "one": lambda v: 1, "negative": lambda v: -1, "float": lambda v: 2.5, "nan": lambda v: math.nan,
       "str": lambda v: "3", "None": lambda v: None, "huge": lambda v: HUGE, "bool": lambda v: True}
REAL = {"nan": lambda v: math.nan, "inf": lambda v: math.inf, "negative": lambda v: -1.0,
        "str": lambda v: "x", "None": lambda v: None, "complex": lambda v: 1 + 1j}
PROB = {**REAL, "above_one": lambda v: 1.5}
CHOICE = {"unknown": lambda v: "no-such-choice", "None": lambda v: None, "int": lambda v: 3}
BOOL = {"str": lambda v: "yes", "None": lambda v: None, "int": lambda v: 2}
SEED = {"negative": lambda v: -1, "str": lambda v: "abc", "float": lambda v: 2.5, "dict": lambda v: {}}
OBJ = {"None": lambda v: None, "str": lambda v: "x", "dict": lambda v: {}, "int": lambda v: 3}
PATH = {"None": lambda v: None, "int": lambda v: 3, "dict": lambda v: {},
        "missing": lambda v: os.path.join(tempfile.gettempdir(), "daml-fuzz-no-such-dir", "f.nc")}
DTYPE = {"unknown": lambda v: "no-such-dtype", "int": lambda v: 3, "int_dtype": lambda v: torch.int64}
DEVICE = {"unknown": lambda v: "no-such-device", "int": lambda v: 3.5}


def _posterior_nan(p):
    q = p.copy(deep=True)
    q["x"].values[0, 0] = math.nan
    return q


def _posterior_inf(p):
    q = p.copy(deep=True)
    q["x"].values[0, 0] = math.inf
    return q


def _posterior_logw(p, value):
    q = p.copy(deep=True)
    q["log_weight"].values[0] = value
    return q


POST = {"nan_member": _posterior_nan, "inf_member": _posterior_inf,
        "nan_log_weight": lambda p: _posterior_logw(p, math.nan),
        "unnormalised": lambda p: p.assign(log_weight=p["log_weight"] + 3.0),
        "one_member": lambda p: p.isel(member=slice(0, 1)),
        "no_log_weight": lambda p: p.drop_vars("log_weight"),
        "None": lambda p: None, "str": lambda p: "x", "dict": lambda p: {"x": 1}}
DATA = {"nan_y": lambda d: d.assign(y=d["y"].where(d["y"] != d["y"][1, 0], math.nan)),
        "inf_y": lambda d: d.assign(y=d["y"].where(d["y"] != d["y"][1, 0], math.inf)),
        "no_time": lambda d: d.isel(time=slice(0, 0)),
        "None": lambda d: None, "str": lambda d: "x", "dict": lambda d: {"y": 1}}

KINDS = {"array": ARRAY, "members": MEMBERS, "cov": COV, "logw": LOGW, "int": INT, "real": REAL, "prob": PROB,
         "choice": CHOICE, "bool": BOOL, "seed": SEED, "obj": OBJ, "path": PATH, "post": POST, "data": DATA,
         "dtype": DTYPE, "device": DEVICE}


# --------------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------------

@dataclass
class Spec:
    """One fuzzed callable: ``call(**base())`` is valid; each name in ``args`` is mutated by its kind."""

    name: str
    call: Callable[..., Any]
    base: Callable[[], dict]
    args: dict = field(default_factory=dict)
    heavy: bool = False          # slow call: mutations only in the report and the slow test
    skip: tuple = ()             # (argument, mutation) pairs that make no sense here
    aliases: dict = field(default_factory=dict)   # argument -> other names an error may use for it


@dataclass
class Outcome:
    func: str
    mutation: str
    category: str
    detail: str = ""
    seconds: float = 0.0


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__module__}.{type(e).__name__}: {text[0][:200] if text else ''}"


def _nonfinite_count(obj, depth: int = 0) -> int:
    """NaN/inf entries in a result: tensors, arrays, xarray, floats, tuples, dicts, dataclasses."""
    if depth > 5 or obj is None or isinstance(obj, (str, bytes, bool, int)):
        return 0
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            return int((~torch.isfinite(obj.detach())).sum())
        return 0
    if isinstance(obj, np.ndarray) or isinstance(obj, np.generic):
        if np.issubdtype(np.asarray(obj).dtype, np.inexact):
            return int((~np.isfinite(obj)).sum())
        return 0
    if isinstance(obj, float):
        return 0 if math.isfinite(obj) else 1
    if isinstance(obj, complex):
        return 0 if math.isfinite(obj.real) and math.isfinite(obj.imag) else 1
    if isinstance(obj, xr.Dataset):
        return sum(_nonfinite_count(v.values, depth + 1) for v in obj.data_vars.values())
    if isinstance(obj, xr.DataArray):
        return _nonfinite_count(obj.values, depth + 1)
    if isinstance(obj, (tuple, list)):
        return sum(_nonfinite_count(v, depth + 1) for v in obj[:1000])
    if isinstance(obj, dict):
        return sum(_nonfinite_count(v, depth + 1) for v in list(obj.values())[:1000])
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_nonfinite_count(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj))
    if hasattr(obj, "to_numpy") and hasattr(obj, "columns"):   # pandas DataFrame
        try:
            return _nonfinite_count(obj.select_dtypes("number").to_numpy(dtype=float), depth + 1)
        except Exception:
            return 0
    return 0


def _is_daml_warning(w) -> bool:
    from daml.errors import ConvergenceWarning, DroppedRowsWarning
    return issubclass(w.category, (ConvergenceWarning, DroppedRowsWarning)) or (
        os.sep + "daml" + os.sep in str(w.filename) and issubclass(w.category, UserWarning))


@contextlib.contextmanager
def guard(seconds: float, headroom_gb: float = 3.0):
    """Wall-clock alarm and an address-space cap of (current size + headroom) for one call."""
    def on_alarm(signum, frame):
        raise _Timeout()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize"))
        cap = int(vm + headroom_gb * 2 ** 30)
        if hard == resource.RLIM_INFINITY or cap < hard:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (OSError, StopIteration, ValueError):
        pass
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _names(e: BaseException, argument) -> bool:
    """Does the error name ``argument`` (a name or a tuple of accepted names)?"""
    if argument is None:
        return True
    names = (argument,) if isinstance(argument, str) else tuple(argument)
    named = getattr(e, "argument", None)
    text = str(e)
    for a in names:
        if isinstance(named, str) and (named == a or a in named):
            return True
        if a in text:
            return True
    return False


# what else an error may name for a mutated argument of this kind: the variables inside a posterior or
# a twin dataset, a config key
KIND_ALIASES = {"post": ("ds", "x", "log_weight", "member"), "data": ("y", "time", "truth"),
                "members": ("member",)}


def classify(thunk: Callable[[], Any], argument: str | None, baseline_nonfinite: int = 0,
             seconds: float = 10.0) -> tuple[str, str, Any]:
    """Run ``thunk`` under the guard and classify it (see the module docstring)."""
    from daml.errors import DamlError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with guard(seconds):
                result = thunk()
        except _Timeout:
            return "hang", f"no answer within {seconds:g} s", None
        except MemoryError as e:
            return "hang", "MemoryError " + str(e)[:120], None
        except DamlError as e:
            return ("clear" if _names(e, argument) else "unnamed"), _first_line(e), None
        except FileNotFoundError as e:
            # daml's own "no such file" (io.open_posterior, open_dataset): Python's type, daml's message naming
            # the argument. Whether the fuzz's missing path exists depends on the order of the specs
            # (save_figure creates its folder), so this must not depend on it.
            return ("clear" if _names(e, argument) else "other"), _first_line(e), None
        except Exception as e:  # noqa: BLE001 - the point is to catch everything
            return "other", _first_line(e), None
    count = _nonfinite_count(result)
    if count > baseline_nonfinite:
        if any(_is_daml_warning(w) for w in caught):
            return "warned", f"{count} non-finite values (warned)", result
        return "nonfinite", f"{count} non-finite values in the result", result
    return "ok", "", result


def accepted_names(spec: Spec, arg: str) -> tuple:
    kind = spec.args.get(arg)
    return (arg, *(KIND_ALIASES.get(kind, ()) if isinstance(kind, str) else ()), *spec.aliases.get(arg, ()))


# Pure iteration counts: loops whose memory does not grow with the count (optimiser epochs, MCMC
# steps, model steps applied in place). A huge count is a long run that the user asked for, not a
# size that cannot fit, so only its type, sign and NaN are fuzzed; sizes that allocate in proportion
# (members, particles, samples, time grids) keep the "huge" mutation and must be refused up front.
ITERATION_COUNTS = {
    ("daml.causal.MLPRegressor", "iterations"),
    ("daml.causal.q10_end_to_end", "iterations"),
    ("daml.diffusion.analysis", "corrector_steps"),
    ("daml.filters.diffusion", "corrector_steps"),
    ("daml.ensembles.fit", "epochs"),
    ("daml.ensembles.equal_weight", "steps"),
    ("daml.models.propagate", "steps"),
    ("daml.smoothing.message_passing", "iterations"),
    ("daml.smoothing.fit_hybrid", "epochs"),
    ("daml.models.mechanics.step", "max_iter"),
    ("daml.models.mechanics.integrate", "max_iter"),
    ("daml.models.mechanics.Mechanical", "max_iter"),
    ("daml.models.mechanics.make_mechanical", "max_iter"),
    ("daml.ensembles.fit_dynamics", "epochs"),
    ("daml.models.mechanics.Mechanical", "substeps"),
    ("daml.ensembles.EnsembleDynamics", "substeps"),
}


def mutations(spec: Spec) -> list[tuple[str, str, Callable[[Any], Any]]]:
    """``(argument, label, transform)`` for every mutation of ``spec`` (label is ``arg=kind``)."""
    out = []
    for arg, kind in spec.args.items():
        table = KINDS[kind] if isinstance(kind, str) else kind
        for label, fn in table.items():
            if (arg, label) in spec.skip or (arg, "*") in spec.skip:
                continue
            if label == "huge" and (spec.name, arg) in ITERATION_COUNTS:
                continue
            out.append((arg, f"{arg}={label}", fn))
    return out


def _default(spec: Spec, arg: str):
    """The default of an argument the baseline leaves out (None when there is none)."""
    target = getattr(spec.call, "__wrapped_target__", spec.call)
    try:
        p = inspect.signature(target).parameters.get(arg)
    except (TypeError, ValueError):
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def sweep(specs: list[Spec], seconds: float = 10.0, include_heavy: bool = True,
          only: Callable[[str], bool] | None = None) -> list[Outcome]:
    """Baseline and every mutation of every spec, in a fixed order."""
    out = []
    specs = [s for s in specs if (only is None or only(s.name)) and (include_heavy or not s.heavy)]
    warm_up(heavy=any(s.heavy for s in specs))
    for spec in specs:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            kwargs = spec.base()
        except Exception as e:  # noqa: BLE001
            out.append(Outcome(spec.name, "baseline", "baseline", "building the baseline: " + _first_line(e)))
            continue
        # the baseline may pay first-use costs (torch.func, lazy imports): a generous guard
        cat, detail, result = classify(lambda: spec.call(**kwargs), None, 0, max(seconds, 60.0))
        base_nf = _nonfinite_count(result) if cat in ("ok", "nonfinite", "warned") else 0
        if cat in ("nonfinite", "warned"):
            cat, detail = "ok", ""   # NaN in a valid baseline (e.g. unobserved steps) is the reference
        if cat != "ok":
            out.append(Outcome(spec.name, "baseline", "baseline", detail, time.perf_counter() - t0))
            continue
        out.append(Outcome(spec.name, "baseline", "ok", "", time.perf_counter() - t0))
        for arg, label, fn in mutations(spec):
            try:
                kw = spec.base()
                kw[arg] = fn(kw[arg] if arg in kw else _default(spec, arg))
            except Exception as e:  # noqa: BLE001
                out.append(Outcome(spec.name, label, "skip", "mutation not applicable: " + _first_line(e)))
                continue
            t0 = time.perf_counter()
            # a pair already known to hang is given one second: enough to see that it is fixed
            limit = 1.0 if KNOWN.get((spec.name, label), "").startswith("hang") else seconds
            cat, detail, _ = classify(lambda: spec.call(**kw), accepted_names(spec, arg), base_nf, limit)
            out.append(Outcome(spec.name, label, cat, detail, time.perf_counter() - t0))
    return out


# --------------------------------------------------------------------------------------------------
# fixtures (small, seeded)
# --------------------------------------------------------------------------------------------------

def _rng(seed=0):
    return np.random.default_rng(seed)


def members(m=6, n=3, seed=0):
    return _rng(seed).normal(size=(m, n))


def logw(m=6, seed=1):
    w = _rng(seed).normal(size=m) * 0.3
    return w - np.log(np.exp(w).sum())


def post(m=6, n=3):
    import daml
    return daml.from_members(members(m, n), logw(m))


def truth(n=3):
    return xr.DataArray(_rng(2).normal(size=n), dims=("variable",))


def spd(n=3, seed=3):
    a = _rng(seed).normal(size=(n, n))
    return a @ a.T + n * np.eye(n)


def t64(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def l63_data(steps=6, sd=1.0):
    import daml
    from daml import models as M
    return daml.simulate(M.Lorenz63(), steps, M.observe_all(3, sd=sd), x0=np.array([1.0, 1.0, 1.0]),
                         x0_cov=1.0, seed=0)


def lin_data(steps=6):
    import daml
    from daml import models as M
    model = M.LinearModel(np.array([[0.9, 0.1], [0.0, 0.8]]), noise_cov=0.1 * np.eye(2))
    return model, daml.simulate(model, steps, M.observe_all(2, sd=0.5), x0=np.zeros(2), x0_cov=1.0, seed=0)


def regression(n=24, d=2, seed=4):
    r = _rng(seed)
    x = r.normal(size=(n, d))
    y = x @ np.arange(1, d + 1) * 0.5 + 0.1 * r.normal(size=n)
    return x, y[:, None]


_CACHE: dict = {}


def small_ensemble():
    """A two-member ensemble of a tiny MLP (trained a few epochs; cached, never mutated)."""
    if "ens" not in _CACHE:
        from daml import ensembles as E
        x, y = regression()
        _CACHE["ens"] = E.fit(E.mlp(2, 4), x, y, members=2, noise_sd=0.1, epochs=2, batch_size=8, seed=0)
    return _CACHE["ens"]


def site_frame():
    if "site" not in _CACHE:
        from daml import causal
        _CACHE["site"] = causal.synthetic_site(years=1, seed=0).to_dataframe()
    return _CACHE["site"]


def _auto(fn, given: dict, skip_names=()) -> dict:
    """Kinds for the defaulted scalar parameters of ``fn`` not listed in ``given``."""
    out = {}
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return out
    for p in params:
        if p.name in given or p.name in skip_names or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        d = p.default
        if p.name == "seed":
            out[p.name] = "seed"
        elif p.name == "dtype":
            out[p.name] = "dtype"
        elif p.name == "device":
            out[p.name] = "device"
        elif isinstance(d, bool):
            out[p.name] = "bool"
        elif isinstance(d, int):
            out[p.name] = "int"
        elif isinstance(d, float):
            out[p.name] = "real"
        elif isinstance(d, str):
            out[p.name] = "choice"
    return out


def S(name, call, base, args=None, auto=True, heavy=False, skip=(), auto_skip=(), aliases=None):
    args = dict(args or {})
    if auto:
        target = getattr(call, "__wrapped_target__", call)
        args.update(_auto(target, args, auto_skip))
    return Spec(name, call, base, args, heavy, tuple(skip), dict(aliases or {}))


def _target(fn, target):
    fn.__wrapped_target__ = target
    return fn


# --------------------------------------------------------------------------------------------------
# the specs of every public callable
# --------------------------------------------------------------------------------------------------

ACCESSOR_SKIP = (("ds", "None"), ("ds", "str"), ("ds", "dict"))


def build_specs() -> list[Spec]:  # noqa: C901 - a flat list, one entry per public name
    import daml
    from daml import causal, diagnostics as dg, diffusion as dif, ensembles as E, errors as er
    from daml import experiment as ex, filters as F, io, models as M, posterior as P, resampling as R
    from daml import transport as T, twin

    specs: list[Spec] = []
    add = specs.append

    # ---- daml / daml.posterior ---------------------------------------------------------------------
    add(S("daml.posterior.from_members", P.from_members,
          lambda: dict(members=members(), log_weight=logw()),
          {"members": "members", "log_weight": "logw", "name": "choice"},
          skip=[("name", "unknown")]))
    add(S("daml.posterior.validate", P.validate, lambda: dict(ds=post()), {"ds": "post"}))
    add(S("daml.posterior.member_vars", P.member_vars, lambda: dict(ds=post()), {"ds": "post"}))
    add(S("daml.posterior.normalise_log_weight", P.normalise_log_weight,
          lambda: dict(log_weight=t64(logw())), {"log_weight": "logw"}))
    add(S("daml.posterior.weighted_var", P.weighted_var,
          lambda: dict(x=post()["x"], weights=np.exp(post()["log_weight"])),
          {"x": "obj", "weights": "obj"}, auto_skip=("argument",)))
    for meth, extra, kinds in [("mean", {}, {}), ("var", {"ddof": 0}, {}), ("std", {"ddof": 0}, {}),
                               ("quantile", {"q": 0.3}, {"q": "prob"}), ("ess", {}, {}), ("psis", {}, {}),
                               ("describe", {}, {}), ("validate", {}, {}),
                               ("resample", {"seed": 0}, {}), ("to_arviz", {}, {})]:
        def call(ds, _m=meth, **kw):
            return getattr(ds.daml, _m)(**kw)
        target = getattr(P.PosteriorAccessor, meth)
        # ds=None/str/dict would test Python's attribute lookup (``None.daml``), not daml: left out
        add(S(f"daml.posterior.PosteriorAccessor.{meth}", _target(call, target),
              lambda extra=extra: dict(ds=post(), **extra), {"ds": "post", **kinds}, skip=ACCESSOR_SKIP))
    add(S("daml.posterior.PosteriorAccessor.properties",
          lambda ds: (ds.daml.log_weight, ds.daml.weights, ds.daml.n_members, ds.daml.members),
          lambda: dict(ds=post()), {"ds": "post"}, auto=False, skip=ACCESSOR_SKIP))

    def accessor_netcdf(ds, path):
        ds.daml.to_netcdf(path)
        return daml.open_posterior(path)
    add(S("daml.posterior.PosteriorAccessor.to_netcdf", accessor_netcdf,
          lambda: dict(ds=post(), path=os.path.join(_tmpdir(), "a.nc")), {"ds": "post", "path": "path"},
          skip=ACCESSOR_SKIP))

    # ---- daml.io ---------------------------------------------------------------------------------
    def to_nc_roundtrip(ds, path, compression=io.DEFAULT_COMPRESSION, dtype=None):
        io.to_netcdf(ds, path, compression=compression, dtype=dtype)
        return io.open_posterior(path)
    add(S("daml.io.to_netcdf", _target(to_nc_roundtrip, io.to_netcdf),
          lambda: dict(ds=post(), path=os.path.join(_tmpdir(), "b.nc")), {"ds": "post", "path": "path"}))
    add(S("daml.io.open_posterior", io.open_posterior, lambda: dict(path=_saved_posterior()),
          {"path": {**PATH, "corrupt": lambda v: _corrupt_file(), "text": lambda v: _text_file()}}))
    add(S("daml.io.to_arviz", io.to_arviz, lambda: dict(ds=post()), {"ds": "post"}))

    def open_ds(path, lazy=False):
        with io.open_dataset(path, lazy) as ds:
            return ds.load()
    add(S("daml.io.open_dataset", _target(open_ds, io.open_dataset), lambda: dict(path=_saved_posterior()),
          {"path": {**PATH, "corrupt": lambda v: _corrupt_file(), "text": lambda v: _text_file()}, "lazy": "bool"}))

    def write_json_back(obj, path, indent=2):
        import json
        with open(io.write_json(obj, path, indent=indent), encoding="utf-8") as fh:
            return json.load(fh)
    add(S("daml.io.write_json", _target(write_json_back, io.write_json),
          lambda: dict(obj={"a": [1.0, math.nan], "b": np.float32(2.5)}, path=os.path.join(_tmpdir(), "r.json")),
          {"obj": "obj", "path": "path"}))
    import daml.learning as LRN
    add(S("daml.learning.nested_windows", LRN.nested_windows, lambda: dict(length=20, count=3),
          {"length": "int", "count": "int"}))

    def fit_ssm(**kw):
        import warnings as _w
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            return LRN.fit_state_space(**kw).history
    add(S("daml.learning.fit_state_space", _target(fit_ssm, LRN.fit_state_space),
          lambda: dict(model=M.MixtureTransition(2, hidden=(3,), seed=0), proposal=None,
                       y=t64(np.ones((2, 4, 2))), operator=M.observe_all(2, sd=1.0),
                       prior=(t64(np.zeros(2)), t64(np.eye(2))), members=4, learn=("transition",), iterations=2,
                       seed=0),
          {"model": "obj", "proposal": "obj", "y": "array", "operator": "obj", "members": "int",
           "iterations": "int", "lr": "real", "seed": "seed", "windows": "obj", "learn": "obj", "tol": "real",
           "rounds": "int", "warmup": "int"},
          auto=False))

    import daml.smoothing as SM
    add(S("daml.smoothing.message_passing", SM.message_passing,
          lambda: dict(model=M.LinearDrag(dims=1), y=t64(np.ones((2, 4, 1))), operator=M.observe_indices(3, [0], sd=0.5),
                       prior=(t64(np.zeros(3)), t64(np.eye(3))), gamma=0.02, iterations=3, order=None,
                       noise_cov=t64(0.05 * np.eye(3)), init=t64(np.zeros((2, 4, 3))), tol=None),
          {"model": "obj", "y": "array", "operator": "obj", "prior": "obj", "gamma": "real", "iterations": "int",
           "order": "int", "noise_cov": "cov", "init": "array", "tol": "real", "history": "bool",
           "detach_messages": "bool"},
          auto=False, skip=[("order", "None"), ("noise_cov", "None"), ("init", "None"), ("tol", "None")]))
    add(S("daml.smoothing.taylor_transition", SM.taylor_transition,
          lambda: dict(model=M.Lorenz63(), x=t64(np.ones((2, 3))), order=2),
          {"model": "obj", "x": "array", "order": "int"}, auto=False))
    add(S("daml.smoothing.extended_kalman_smoother", lambda **kw: tuple(SM.extended_kalman_smoother(**kw)),
          lambda: dict(model=M.Lorenz63(), y=t64(np.ones((2, 4, 3))), operator=M.observe_all(3, sd=0.5),
                       prior=(t64(np.ones(3)), t64(3.0 * np.eye(3))), order=2, noise_cov=t64(0.01 * np.eye(3)),
                       linearisation="factorised", predict="taylor"),
          {"model": "obj", "y": "array", "operator": "obj", "prior": "obj", "order": "int", "noise_cov": "cov",
           "linearisation": "choice", "predict": "choice"}, auto=False))
    add(S("daml.smoothing.linearised_covariance", SM.linearised_covariance,
          lambda: dict(model=M.Lorenz63(), x=t64(np.ones((5, 3))), operator=M.observe_all(3, sd=0.5), prior=None,
                       order=2, noise_cov=t64(0.01 * np.eye(3)), linearisation="jacobian", mask=np.ones((5, 3), bool)),
          {"model": "obj", "x": "array", "operator": "obj", "prior": "obj", "order": "int", "noise_cov": "cov",
           "linearisation": "choice", "mask": "obj"}, auto=False, skip=[("prior", "None")]))

    def hybrid_smoother(**kw):
        y = kw.pop("y")
        sm = SM.HybridSmoother(**kw)
        return tuple(sm(y, seed=0))[0]
    add(S("daml.smoothing.HybridSmoother", _target(hybrid_smoother, SM.HybridSmoother),
          lambda: dict(model=M.LinearDrag(dims=1), operator=M.observe_indices(3, [0], sd=0.5), y=t64(np.ones((2, 5, 1))),
                       gamma=0.02, iterations=3, noise_cov=t64(0.05 * np.eye(3)), hidden=4, mode="hybrid", seed=0),
          {"model": "obj", "operator": "obj", "y": "array", "gamma": "real", "iterations": "int", "noise_cov": "cov",
           "hidden": "int", "mode": "choice", "seed": "seed"}, auto=False))

    def fit_hybrid(**kw):
        import warnings as _w
        sm = SM.HybridSmoother(M.LinearDrag(dims=1), M.observe_indices(3, [0], sd=0.5), gamma=0.02, iterations=2,
                               noise_cov=t64(0.05 * np.eye(3)), hidden=4, seed=0)
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            return SM.fit_hybrid(sm, **kw).val_mse
    add(S("daml.smoothing.fit_hybrid", _target(fit_hybrid, SM.fit_hybrid),
          lambda: dict(y=t64(np.ones((2, 5, 1))), x=t64(np.zeros((2, 5, 3))), y_val=t64(np.ones((1, 5, 1))),
                       x_val=t64(np.zeros((1, 5, 3))), epochs=1, lr=1e-3, batch_size=1, seed=0),
          {"y": "array", "x": "array", "y_val": "array", "x_val": "array", "epochs": "int", "lr": "real",
           "batch_size": "int", "weight": "choice", "metric": "choice", "seed": "seed", "tol": "real"},
          auto=False, skip=[("y_val", "None"), ("x_val", "None")]))

    MEANS_COVS = {"means": ("covs",), "covs": ("means",)}     # a shape mismatch between the two names either

    def _mix():
        g = np.random.default_rng(0)
        mu = g.normal(size=(2, 1, 4, 2))
        a = g.normal(size=(2, 1, 4, 2, 2))
        return t64(mu), t64(a @ np.swapaxes(a, -1, -2) + 0.5 * np.eye(2))
    add(S("daml.smoothing.calibration", SM.calibration,
          lambda: dict(means=_mix()[0], covs=_mix()[1], truth=t64(np.zeros((1, 4, 2))), log_weight=t64(np.zeros(2)),
                       level=0.9),
          {"means": "array", "covs": "array", "truth": "array", "log_weight": "logw", "level": "prob"}, auto=False,
          skip=[("log_weight", "None")], aliases=MEANS_COVS))
    add(S("daml.smoothing.held_out_weights", lambda **kw: tuple(SM.held_out_weights(**kw)),
          lambda: dict(means=_mix()[0], covs=_mix()[1], truth=t64(np.zeros((1, 4, 2)))),
          {"means": "array", "covs": "array", "truth": "array"}, auto=False, aliases=MEANS_COVS))
    add(S("daml.smoothing.variance_scale", SM.variance_scale,
          lambda: dict(means=_mix()[0], covs=_mix()[1], truth=t64(np.zeros((1, 4, 2))), log_weight=t64(np.zeros(2))),
          {"means": "array", "covs": "array", "truth": "array", "log_weight": "logw"}, auto=False,
          skip=[("log_weight", "None")], aliases=MEANS_COVS))
    add(S("daml.smoothing.mixture_posterior", SM.mixture_posterior,
          lambda: dict(means=_mix()[0], covs=_mix()[1], log_weight=t64(np.zeros(2)), samples=3, seed=0),
          {"means": "array", "covs": "array", "log_weight": "logw", "samples": "int", "seed": "seed"}, auto=False,
          skip=[("log_weight", "None"), ("samples", "None")], aliases=MEANS_COVS))

    def hybrid_cov(**kw):
        sm = SM.HybridSmoother(M.LinearDrag(dims=1), M.observe_indices(3, [0], sd=0.5), gamma=0.02, iterations=2,
                               noise_cov=t64(0.05 * np.eye(3)), hidden=4, seed=0)
        return SM.hybrid_covariance(sm, **kw)
    add(S("daml.smoothing.hybrid_covariance", _target(hybrid_cov, SM.hybrid_covariance),
          lambda: dict(estimate=t64(np.zeros((2, 5, 3))), y=t64(np.ones((2, 5, 1)))),
          {"estimate": "array", "y": "array"}, auto=False))
    # chunks cuts any series: NaN and infinite entries pass through (NaN marks missing observations) and a
    # series shorter than a whole number of chunks is NaN-padded (tail="pad"): not silent non-finite values
    def hybrid_post(**kw):
        sms = [SM.HybridSmoother(M.LinearDrag(dims=1), M.observe_indices(3, [0], sd=0.5), gamma=0.02, iterations=2,
                                 noise_cov=t64(0.05 * np.eye(3)), hidden=4, seed=s) for s in (0, 1)]
        return SM.hybrid_posterior(sms, **kw)
    add(S("daml.smoothing.hybrid_posterior", _target(hybrid_post, SM.hybrid_posterior),
          lambda: dict(y=t64(np.ones((2, 5, 1))), log_weight=t64(np.zeros(2)), scale=1.5, samples=2, seed=0),
          {"y": "array", "log_weight": "logw", "scale": "real", "samples": "int", "seed": "seed"}, auto=False,
          skip=[("log_weight", "None"), ("samples", "None")]))
    add(S("daml.smoothing.chunks", SM.chunks, lambda: dict(a=np.zeros((25, 3)), length=10, tail="pad"),
          {"a": "array", "length": "int", "tail": "choice"}, auto=False,
          skip=[("a", "nan"), ("a", "inf"), ("a", "extra_dim")]))
    add(S("daml.smoothing.drag_data", lambda **kw: tuple(SM.drag_data(**kw)), lambda: dict(steps=10, seed=0, burn_in=2),
          {"steps": "int", "seed": "seed", "burn_in": "int"}, auto=False))
    add(S("daml.smoothing.drag_models", lambda **kw: tuple(m.config() for m in SM.drag_models(**kw)[::2]),
          lambda: dict(sigma=0.4, observation_sd=0.5), {"sigma": "real", "observation_sd": "real"}, auto=False))
    add(S("daml.smoothing.lorenz_data", lambda **kw: tuple(SM.lorenz_data(**kw)),
          lambda: dict(samples=20, sample_dt=0.01, noise_sd=0.5, seed=0, rtol=1e-8),
          {"samples": "int", "sample_dt": "real", "noise_sd": "real", "seed": "seed", "rtol": "real",
           "spacing": "choice"}, auto=False))
    add(S("daml.smoothing.lorenz_splits", lambda **kw: tuple(SM.lorenz_splits(**kw)), lambda: dict(n=100, test=40),
          {"n": "int", "test": "int"}, auto=False))

    # ---- physics priors (issue 30): daml.models.mechanics / hamiltonian / mechanics_data --------------
    import daml.models.hamiltonian as HN
    import daml.models.mechanics as MC
    import daml.models.mechanics_data as MD

    def qp(n=3, d=1, v=0.3):
        return t64(np.full((n, d), v)), t64(np.full((n, d), -0.2))
    QP = {"q": ("p",), "p": ("q",), "q0": ("p0",), "p0": ("q0",)}
    add(S("daml.models.mechanics.step", lambda **kw: MC.step(**kw),
          lambda: dict(system=MC.Pendulum(), q=qp()[0], p=qp()[1], dt=0.01, method="leapfrog", tol=None, max_iter=20),
          {"system": "obj", "q": "array", "p": "array", "dt": "real", "method": "choice", "tol": "real",
           "max_iter": "int"}, auto=False, skip=[("tol", "None")], aliases=QP))
    add(S("daml.models.mechanics.integrate", lambda **kw: tuple(MC.integrate(**kw)),
          lambda: dict(system=MC.DoublePendulum(), q0=qp(2, 2)[0], p0=qp(2, 2)[1], dt=0.01, steps=4,
                       method="implicit_midpoint", every=2, tol=None, max_iter=20),
          {"system": "obj", "q0": "array", "p0": "array", "dt": "real", "steps": "int", "method": "choice",
           "every": "int", "tol": "real", "max_iter": "int"}, auto=False, skip=[("tol", "None")], aliases=QP))
    add(S("daml.models.mechanics.energy", MC.energy,
          lambda: dict(system=MC.TwoBody(), q=t64(np.array([[1.0, 0.0, -1.0, 0.0]])), p=t64(np.array([[0.0, 0.5, 0.0, -0.5]]))),
          {"system": "obj", "q": "array", "p": "array"}, auto=False, aliases=QP))
    add(S("daml.models.mechanics.convergence_order", MC.convergence_order,
          lambda: dict(system=MC.Pendulum(), q0=t64(np.array([1.0])), p0=t64(np.array([0.0])), method="leapfrog",
                       t_end=0.5, dts=[0.1, 0.05]),
          {"system": "obj", "q0": "array", "p0": "array", "method": "choice", "t_end": "real", "dts": "obj"},
          auto=False, aliases=QP))
    for cls, kw in ((MC.MassSpring, dict(mass=0.5, stiffness=2.0)), (MC.Pendulum, dict(mass=2.0, length=0.5, gravity=3.0)),
                    (MC.DoublePendulum, dict(m1=1.0, m2=1.0, l1=1.0, l2=1.0, gravity=9.8)),
                    (MC.TwoBody, dict(m1=1.0, m2=1.0, gravity=1.0))):
        add(S(f"daml.models.mechanics.{cls.__name__}",
              _target(lambda _c=cls, **k: _c(**k).hamiltonian(*(t64(np.full(_c(**k).dim, 0.3)),) * 2), cls),
              lambda _k=kw: dict(_k), {k: "real" for k in kw}, auto=False))

    def mechanical(**kw):
        x = kw.pop("x")
        return MC.Mechanical(**kw).step(x)
    add(S("daml.models.mechanics.Mechanical", _target(mechanical, MC.Mechanical),
          lambda: dict(system=MC.Pendulum(), dt=0.05, substeps=2, method="rk4", noise_cov=0.01, tol=None, max_iter=20,
                       x=t64(np.full((3, 2), 0.3))),
          {"system": "obj", "dt": "real", "substeps": "int", "method": "choice", "noise_cov": "cov", "tol": "real",
           "max_iter": "int", "x": "array"}, auto=False,
          skip=[("tol", "None"), ("noise_cov", "None"), ("x", "nan"), ("x", "inf")]))
    add(S("daml.models.mechanics.make_mechanical", lambda **kw: MC.make_mechanical(**kw).config(),
          lambda: dict(name="double_pendulum", dt=0.05, substeps=1, method="leapfrog", noise_cov=None, tol=None,
                       max_iter=20),
          {"name": "choice", "dt": "real", "substeps": "int", "method": "choice", "noise_cov": "cov", "tol": "real",
           "max_iter": "int"}, auto=False, skip=[("tol", "None"), ("noise_cov", "None")]))

    X4 = lambda: t64(np.full((4, 2), 0.3))                   # noqa: E731
    for cls, dim, x in ((HN.HamiltonianNet, 1, X4), (HN.DerivativeNet, 1, X4),
                        (HN.LagrangianNet, 2, lambda: t64(np.full((4, 4), 0.3)))):
        def net_call(_c=cls, **kw):
            xx = kw.pop("x")
            return _c(**kw)(xx)
        add(S(f"daml.models.hamiltonian.{cls.__name__}", _target(net_call, cls),
              lambda _d=dim, _x=x: dict(dim=_d, hidden=8, layers=2, activation="softplus", seed=0, x=_x()),
              {"dim": "int", "hidden": "int", "layers": "int", "activation": "choice", "seed": "seed", "x": "array"},
              auto=False, aliases={"dim": ("x",)},
              # one hidden softplus unit: L's velocity Hessian has rank one, a singular Euler-Lagrange
              # system that the solve refuses with DivergenceError (tested in test_mechanics_nets)
              skip=[("hidden", "one")] if cls is HN.LagrangianNet else []))
    add(S("daml.models.hamiltonian.lagrangian_acceleration", HN.lagrangian_acceleration,
          lambda: dict(L=MC.DoublePendulum().lagrangian, q=t64(np.full((4, 2), 0.3)), v=t64(np.full((4, 2), 0.1))),
          {"L": "obj", "q": "array", "v": "array"}, auto=False, aliases={"q": ("v",), "v": ("q",)}))

    def fit_deriv(**kw):
        import warnings as _w
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            return HN.fit_derivatives(HN.HamiltonianNet(1, hidden=8, seed=0), **kw).history
    X20 = lambda: t64(np.random.default_rng(0).normal(size=(20, 2)))   # noqa: E731
    add(S("daml.models.hamiltonian.fit_derivatives", _target(fit_deriv, HN.fit_derivatives),
          lambda: dict(x=X20(), dxdt=X20(), steps=3, lr=1e-3, weight_decay=1e-4, batch_size=8, loss="mse", seed=0,
                       tol=1e-2),
          {"x": "array", "dxdt": "array", "steps": "int", "lr": "real", "weight_decay": "real", "batch_size": "int",
           "loss": "choice", "seed": "seed", "tol": "real"}, auto=False, aliases={"x": ("dxdt",), "dxdt": ("x",)}))

    def fit_traj(**kw):
        import warnings as _w
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            return HN.fit_trajectories(HN.HamiltonianNet(1, hidden=8, seed=0), **kw).history
    add(S("daml.models.hamiltonian.fit_trajectories", _target(fit_traj, HN.fit_trajectories),
          lambda: dict(trajectory=t64(np.stack([np.cos(0.1 * np.arange(6)), -np.sin(0.1 * np.arange(6))], -1)[:, None]
                                      .repeat(3, 1)),
                       dt=0.1, horizon=2, method="rk4", steps=2, lr=1e-3, seed=0),
          {"trajectory": "array", "dt": "real", "horizon": "int", "method": "choice", "steps": "int", "lr": "real",
           "seed": "seed"}, auto=False))

    add(S("daml.models.mechanics_data.greydanus_spring", lambda **kw: tuple(MD.greydanus_spring(**kw))[:6],
          lambda: dict(seed=0, samples=4, test_split=0.5, noise_std=0.1, t_end=1.0, timescale=5.0),
          {"seed": "seed", "samples": "int", "test_split": "prob", "noise_std": "real", "t_end": "real",
           "timescale": "real"}, auto=False))
    add(S("daml.models.mechanics_data.greydanus_pendulum", lambda **kw: tuple(MD.greydanus_pendulum(**kw))[:6],
          lambda: dict(seed=0, samples=4, test_split=0.5, noise_std=0.1, t_end=1.0, timescale=5.0),
          {"seed": "seed", "samples": "int", "test_split": "prob", "noise_std": "real", "t_end": "real",
           "timescale": "real"}, auto=False))
    add(S("daml.models.mechanics_data.greydanus_two_body", lambda **kw: tuple(MD.greydanus_two_body(**kw))[:6],
          lambda: dict(seed=0, trials=5, timesteps=4, t_end=1.0, orbit_noise=0.05, test_split=0.2),
          {"seed": "seed", "trials": "int", "timesteps": "int", "t_end": "real", "orbit_noise": "real",
           "test_split": "prob"}, auto=False))
    add(S("daml.models.mechanics_data.greydanus_initial_states", MD.greydanus_initial_states,
          lambda: dict(trials=5, seed=0, dim=1), {"trials": "int", "seed": "seed", "dim": "int"}, auto=False))
    add(S("daml.models.mechanics_data.bootstrap_spread", MD.bootstrap_spread,
          lambda: dict(values=np.arange(10.0), splits=5), {"values": "array", "splits": "int"}, auto=False))
    add(S("daml.models.mechanics_data.system_field", lambda **kw: MD.system_field(**kw)(t64(np.full((2, 2), 0.3))),
          lambda: dict(system=MC.Pendulum()), {"system": "obj"}, auto=False))
    add(S("daml.models.mechanics_data.energy_mse", lambda **kw: tuple(MD.energy_mse(**kw))[:2],
          lambda: dict(field_fn=MD.system_field(MC.MassSpring(0.5, 2.0)), system=MC.MassSpring(0.5, 2.0), trials=5,
                       splits=5, t_end=1.0, points=5, noise_std=0.1, rtol=1e-8, seed=0),
          {"field_fn": "obj", "system": "obj", "trials": "int", "splits": "int", "t_end": "real", "points": "int",
           "noise_std": "real", "rtol": "real", "seed": "seed"}, auto=False,
          skip=[("t_end", "None"), ("points", "None"), ("noise_std", "None")]))
    add(S("daml.models.mechanics_data.cranmer_double_pendulum", lambda **kw: MD.cranmer_double_pendulum(**kw),
          lambda: dict(n=5, seed=0, omega_max=10.0), {"n": "int", "seed": "seed", "omega_max": "real"}, auto=False))
    add(S("daml.models.mechanics_data.cranmer_initial_states", MD.cranmer_initial_states,
          lambda: dict(starts=4, seed=0, omega_max=0.1), {"starts": "int", "seed": "seed", "omega_max": "real"},
          auto=False))
    add(S("daml.models.mechanics_data.double_pendulum_acceleration", MD.double_pendulum_acceleration,
          lambda: dict(x=t64(np.full((3, 4), 0.3))), {"x": "array"}, auto=False))
    add(S("daml.models.mechanics_data.double_pendulum_energy", MD.double_pendulum_energy,
          lambda: dict(x=t64(np.full((3, 4), 0.3))), {"x": "array"}, auto=False))
    add(S("daml.models.mechanics_data.cranmer_energy_error", lambda **kw: tuple(MD.cranmer_energy_error(**kw))[:2],
          lambda: dict(field_fn=lambda x: torch.cat([x[..., 2:], MD.double_pendulum_acceleration(x)], -1), starts=3,
                       t_end=0.5, fps=4, seed=0, dt=0.01),
          {"field_fn": "obj", "starts": "int", "t_end": "real", "fps": "int", "seed": "seed", "dt": "real"},
          auto=False, aliases={"fps": ("dt",)}))

    # ---- daml.ensembles.dynamics ---------------------------------------------------------------------
    def _dyn_data():
        x = t64(np.random.default_rng(1).uniform(-1, 1, size=(12, 2)))
        return x, torch.stack([2 * x[:, 1], -3 * torch.sin(x[:, 0])], -1)

    def _dyn_ens():
        import warnings as _w
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            x, dx = _dyn_data()
            return E.fit_dynamics(HN.HamiltonianNet(1, hidden=4, seed=0), x, dx, members=2, noise_sd=0.1, seed=0,
                                  epochs=1, polish=False)

    def fit_dyn(**kw):
        import warnings as _w
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            return E.fit_dynamics(**kw).params["net.mlp.linears.0.weight"]
    add(S("daml.ensembles.fit_dynamics", _target(fit_dyn, E.fit_dynamics),
          lambda: dict(net=HN.HamiltonianNet(1, hidden=4, seed=0), x=_dyn_data()[0], dxdt=_dyn_data()[1], members=2,
                       noise_sd=0.1, seed=0, epochs=1, polish=False),
          {"net": "obj", "x": "array", "dxdt": "array", "members": "int", "noise_sd": "real", "seed": "seed",
           "epochs": "int"}, auto=False, aliases={"x": ("dxdt",), "dxdt": ("x",)}))
    add(S("daml.ensembles.dynamics_data", E.dynamics_data,
          lambda: dict(x=_dyn_data()[0], dxdt=_dyn_data()[1], size=2), {"x": "array", "dxdt": "array", "size": "int"},
          auto=False, aliases={"x": ("dxdt",), "dxdt": ("x",), "size": ("x",)}))
    add(S("daml.ensembles.ComponentRegression", lambda **kw: E.ComponentRegression(**kw)(t64(np.full((3, 4), 0.2))),
          lambda: dict(net=HN.DerivativeNet(1, hidden=4, seed=0)), {"net": "obj"}, auto=False))

    def ens_dyn(**kw):
        x = kw.pop("x")
        return E.EnsembleDynamics(_dyn_ens(), **kw).sample_step(x, torch.Generator().manual_seed(0))
    add(S("daml.ensembles.EnsembleDynamics", _target(ens_dyn, E.EnsembleDynamics),
          lambda: dict(dt=0.1, substeps=1, method="rk4", noise_cov=0.01, x=t64(np.full((3, 2), 0.3))),
          {"dt": "real", "substeps": "int", "method": "choice", "noise_cov": "cov", "x": "array"}, auto=False,
          skip=[("noise_cov", "None"), ("x", "nan"), ("x", "inf")]))

    def network_round_trip(network, path):
        out = io.save_network(network, path)
        back = io.load_network(out)
        return [p.detach() for p in back.parameters()]
    add(S("daml.io.save_network", _target(network_round_trip, io.save_network),
          lambda: dict(network=M.MixtureTransition(2, hidden=(3,), seed=0), path=os.path.join(_tmpdir(), "n.pt")),
          {"network": "obj", "path": "path"}))

    def _saved_network():
        path = os.path.join(_tmpdir(), "saved.pt")
        io.save_network(M.MixtureTransition(2, hidden=(3,), seed=0), path)
        return path
    add(S("daml.io.load_network", lambda path, kind=None: [p.detach() for p in io.load_network(path, kind).parameters()],
          lambda: dict(path=_saved_network(), kind="MixtureTransition"),
          {"path": {**PATH, "corrupt": lambda v: _corrupt_file(), "text": lambda v: _text_file()}, "kind": "choice"}))
    if hasattr(io, "arviz_draws"):
        add(S("daml.io.arviz_draws", io.arviz_draws, lambda: dict(kish_ess=50.0), {"kish_ess": "real"}))

    def atomic(path, suffix=".tmp"):
        with io.atomic_write_path(path, suffix) as p:
            with open(p, "w") as fh:
                fh.write("x")
        return os.path.getsize(path)
    add(S("daml.io.atomic_write_path", _target(atomic, io.atomic_write_path),
          lambda: dict(path=os.path.join(_tmpdir(), "c.txt")), {"path": "path"}, auto=False))

    def save_fig(path, dpi=110, fig=None):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = plt.figure(figsize=(1, 1)) if fig is None else fig
        try:
            return str(io.save_figure(fig, path, dpi))
        finally:
            plt.close("all")
    add(S("daml.io.save_figure", _target(save_fig, io.save_figure),
          lambda: dict(path=os.path.join(_tmpdir(), "f.png"), dpi=20), {"path": "path", "dpi": "int"},
          auto=False, skip=[("dpi", "huge")]))

    # ---- daml.diagnostics ----------------------------------------------------------------------------
    add(S("daml.diagnostics.ess", dg.ess, lambda: dict(post=post()), {"post": "post"}, auto_skip=("dim",)))
    add(S("daml.diagnostics.psis", dg.psis, lambda: dict(post=post()), {"post": "post", "r_eff": "real"},
          auto_skip=("dim",)))
    add(S("daml.diagnostics.pareto_khat_threshold", dg.pareto_khat_threshold, lambda: dict(n=100),
          {"n": "int"}))
    for fname in ("rmse", "crps", "energy_score", "pit", "rank_histogram", "spread_skill"):
        fn = getattr(dg, fname)
        add(S(f"daml.diagnostics.{fname}", fn, lambda: dict(post=post(), truth=truth()),
              {"post": "post", "truth": {**{k: (lambda f: lambda v: xr.DataArray(f(v.values), dims=v.dims)
                                                if np.ndim(f(v.values)) == v.ndim else f(v.values))(ARRAY[k])
                                            for k in ("nan", "inf", "wrong_shape", "None", "str", "dict")}}},
              auto_skip=("dim", "var")))
    truth_kinds = {k: (lambda f: lambda v: xr.DataArray(f(v.values), dims=v.dims)
                       if np.ndim(f(v.values)) == v.ndim else f(v.values))(ARRAY[k])
                   for k in ("nan", "inf", "wrong_shape", "None", "str", "dict")}
    import daml.filters as _F
    add(S("daml.filters.summarise", _F.summarise, lambda: dict(post=post(), truth=truth()),
          {"post": "post", "truth": truth_kinds, "quantiles": "obj"}, auto=False))
    add(S("daml.filters.summary_scores", _F.summary_scores, lambda: dict(result=post(), truth=truth()),
          {"result": "post", "truth": truth_kinds}, auto=False))
    add(S("daml.diagnostics.spread", dg.spread, lambda: dict(post=post()), {"post": "post"},
          auto_skip=("dim", "var")))
    add(S("daml.diagnostics.describe", dg.describe, lambda: dict(post=post()), {"post": "post"}))

    def flat_hist():
        return xr.DataArray(np.array([3.0, 5.0, 4.0, 6.0]), dims=("rank",))
    add(S("daml.diagnostics.rank_histogram_flatness", dg.rank_histogram_flatness, lambda: dict(hist=flat_hist()),
          {"hist": {"negative": lambda h: h * -1, "nan": lambda h: h.where(h != 3.0, math.nan),
                    "zeros": lambda h: h * 0, "one_bin": lambda h: h[:1], "None": lambda h: None,
                    "str": lambda h: "x"}}, auto_skip=("dim",)))
    add(S("daml.diagnostics.ess_kernel", dg.ess_kernel, lambda: dict(log_weight=t64(logw())),
          {"log_weight": "logw"}))
    add(S("daml.diagnostics.psis_kernel", dg.psis_kernel, lambda: dict(log_ratio=t64(logw(30))),
          {"log_ratio": "logw", "r_eff": "real"}))
    for fname in ("crps_kernel", "pit_kernel"):
        add(S(f"daml.diagnostics.{fname}", getattr(dg, fname),
              lambda: dict(x=t64(members()[:, 0]), w=t64(np.exp(logw())), y=t64(0.3)),
              {"x": "members", "w": "logw", "y": "array"}))
    add(S("daml.diagnostics.energy_score_kernel", dg.energy_score_kernel,
          lambda: dict(x=t64(members()), w=t64(np.exp(logw())), y=t64(np.zeros(3))),
          {"x": "members", "w": "logw", "y": "array"}))

    # ---- daml.resampling ------------------------------------------------------------------------------
    for fname in ("multinomial", "systematic", "stratified", "residual", "resample"):
        add(S(f"daml.resampling.{fname}", getattr(R, fname), lambda: dict(weights=np.exp(logw()), seed=0),
              {"weights": {**ARRAY, "negative": lambda v: -v, "zeros": lambda v: v * 0},
               "n": "int"}))
    for fname, extra in (("stop_gradient", {"scheme": "choice"}),
                         ("soft", {"scheme": "choice", "alpha": "prob", "normalise": "bool"}),
                         ("optimal_transport", {"epsilon": "real", "tol": "real", "max_iter": "int"})):
        add(S(f"daml.resampling.{fname}", getattr(R, fname),
              (lambda: dict(x=t64(members()), log_weight=t64(logw()), max_iter=200)) if fname == "optimal_transport"
              else (lambda: dict(x=t64(members()), log_weight=t64(logw()), seed=0)),
              {"x": "members", "log_weight": "logw", **extra, **({} if fname == "optimal_transport" else {"seed": "seed"})}))
    add(S("daml.resampling.differentiable", R.differentiable,
          lambda: dict(name="soft", x=t64(members()), log_weight=t64(logw()), seed=0),
          {"name": "choice", "x": "members", "log_weight": "logw", "seed": "seed"}))
    add(S("daml.resampling.offspring_counts", R.offspring_counts,
          lambda: dict(ancestors=np.array([0, 0, 2, 3]), n_particles=4),
          {"ancestors": {**ARRAY, "out_of_range": lambda v: v + 10, "negative": lambda v: v - 5},
           "n_particles": "int"}))

    # ---- daml.models ----------------------------------------------------------------------------------
    def model_and_step(cls, params, stepper="step"):
        def call(**kw):
            m = cls(**kw)
            x = torch.ones(m.state_size, dtype=torch.float64) * 0.5
            return getattr(m, stepper)(x), M.model_config(m)
        return _target(call, cls)
    add(S("daml.models.Lorenz63", model_and_step(M.Lorenz63, {}), lambda: {}, {}))
    add(S("daml.models.Lorenz96", model_and_step(M.Lorenz96, {}), lambda: dict(n=6), {"n": "int"},
))
    add(S("daml.models.Kuramoto", model_and_step(M.Kuramoto, {}), lambda: dict(n=4, coupling=1.0, omega=np.linspace(0.5, 1.5, 4), seed=0),
          {"n": "int", "coupling": "real", "omega": "array"}, skip=[("omega", "None")]))
    add(S("daml.models.LinearDrag", model_and_step(M.LinearDrag, {}), lambda: {}, {}))
    add(S("daml.models.LinearModel", model_and_step(M.LinearModel, {}),
          lambda: dict(matrix=np.array([[0.9, 0.1], [0.0, 0.8]]), noise_cov=0.1 * np.eye(2)),
          {"matrix": "array", "noise_cov": "cov"}))
    add(S("daml.models.Identity", model_and_step(M.Identity, {}), lambda: dict(n=3, noise_cov=0.1 * np.eye(3)), {"n": "int",
                                                                                     "noise_cov": "cov"}))

    class _Osc(M.ODEModel):
        def tendency(self, x):
            return torch.stack([x[..., 1], -x[..., 0]], -1)

        def config(self):
            return {"model": "osc"}
    add(S("daml.models.ODEModel", model_and_step(_Osc, {}), lambda: dict(state_size=2, dt=0.1, noise_cov=0.1 * np.eye(2)),
          {"state_size": "int", "dt": "real", "noise_cov": "cov"}))
    add(S("daml.models.Model", lambda model: isinstance(model, M.Model), lambda: dict(model=M.Lorenz63()),
          {}, auto=False))
    add(S("daml.models.rk4_step", M.rk4_step, lambda: dict(f=lambda x: -x, x=t64(np.ones(3)), dt=0.1),
          {"f": "obj", "x": "array", "dt": "real"}))
    add(S("daml.models.propagate", M.propagate, lambda: dict(model=M.Lorenz63(), x=t64(np.ones(3)), steps=2),
          {"model": "obj", "x": "array", "steps": "int", "seed": "seed"}))
    add(S("daml.models.tangent_linear", M.tangent_linear, lambda: dict(model=M.Lorenz63(), x=t64(np.ones(3))),
          {"model": "obj", "x": "array"}))
    add(S("daml.models.model_config", M.model_config, lambda: dict(model=M.Lorenz63()), {"model": "obj"}))
    add(S("daml.models.periodic_covariance", M.periodic_covariance, lambda: dict(n=5, variance=1.0, length=1.0),
          {"n": "int", "variance": "real", "length": "real"}))

    # Gaussian-mixture networks (issue 28): build, draw, evaluate the density
    from daml.models import mixture as MX
    from daml.filters import proposals as PR
    hidden_bad = {"zero": lambda v: (0,), "negative": lambda v: (-3,), "float": lambda v: (2.5,),
                  "str": lambda v: "32", "None": lambda v: None, "int": lambda v: 4, "bool": lambda v: (True,)}

    def mixture_net(**kw):
        net = MX.GaussianMixtureNet(**kw)
        inp = torch.full((4, net.in_features), 0.3, dtype=net.dtype)
        x = net.sample(inp, torch.Generator().manual_seed(0))
        return x, net.log_prob(inp, x), tuple(net(inp))
    add(S("daml.models.GaussianMixtureNet", _target(mixture_net, MX.GaussianMixtureNet),
          lambda: dict(in_features=3, out_features=2, components=2, hidden=(4,), seed=0),
          {"in_features": "int", "out_features": "int", "components": "int", "hidden": hidden_bad}))

    def mixture_transition(**kw):
        m = MX.MixtureTransition(**kw)
        x = torch.full((5, m.state_size), 0.5, dtype=torch.float64)
        x1 = m.sample_step(x, torch.Generator().manual_seed(0))
        return m.step(x), x1, m.log_transition(x, x1), M.model_config(m)
    add(S("daml.models.MixtureTransition", _target(mixture_transition, MX.MixtureTransition),
          lambda: dict(state_size=3, components=2, hidden=(4,), seed=0),
          {"state_size": "int", "components": "int", "hidden": hidden_bad}))

    def mixture_proposal(**kw):
        q = PR.MixtureProposal(**kw)
        x_prev = torch.full((2, 5, q.state_size), 0.5, dtype=torch.float64)
        y, mask = torch.ones(2, q.obs_size, dtype=torch.float64), torch.ones(2, q.obs_size, dtype=torch.bool)
        x, log_q = q.sample(x_prev, y, mask, torch.Generator().manual_seed(0))
        return x, log_q, q.log_prob(x_prev, y, mask, x)
    add(S("daml.filters.MixtureProposal", _target(mixture_proposal, PR.MixtureProposal),
          lambda: dict(state_size=3, obs_size=2, components=2, hidden=(4,), seed=0),
          {"state_size": "int", "obs_size": "int", "components": "int", "hidden": hidden_bad}))
    add(S("daml.models.make_model", lambda name, **kw: model_and_step(lambda **k: M.make_model(name, **k), {})(**kw),
          lambda: dict(name="lorenz96", n=5), {"name": "choice", "n": "int"}, auto=False, aliases={"name": ("model",)}))

    def obs_call(factory):
        def call(**kw):
            op = factory(**kw)
            x = torch.ones(op.state_size, dtype=torch.float64)
            return op.apply(x), op.noise_cov, op.config()
        return _target(call, factory)
    add(S("daml.models.Observation", obs_call(M.Observation),
          lambda: dict(state_size=3, noise_cov=torch.eye(2, dtype=torch.float64),
                       matrix=torch.eye(3, dtype=torch.float64)[:2]),
          {"state_size": "int", "noise_cov": "cov", "matrix": "array", "func": "obj"},
          skip=[("func", "None"), ("matrix", "None")], auto_skip=("description",)))
    add(S("daml.models.observe_all", obs_call(M.observe_all), lambda: dict(state_size=3, sd=1.0),
          {"state_size": "int", "sd": "real", "cov": "cov"}, skip=[("cov", "None")]))
    add(S("daml.models.observe_all[cov]", obs_call(M.observe_all), lambda: dict(state_size=3, cov=spd(3)),
          {"cov": "cov"}, auto=False))
    add(S("daml.models.observe_linear[cov]", obs_call(M.observe_linear), lambda: dict(matrix=np.eye(3)[:2], cov=spd(2)),
          {"cov": "cov"}, auto=False))
    add(S("daml.models.observe_every", obs_call(M.observe_every), lambda: dict(state_size=6, k=2, sd=1.0),
          {"state_size": "int", "k": "int", "sd": "real", "offset": "int"}))
    add(S("daml.models.observe_indices", obs_call(M.observe_indices),
          lambda: dict(state_size=5, indices=[0, 2], sd=1.0),
          {"state_size": "int", "indices": {**ARRAY, "float": lambda v: [0.5, 2.0], "out_of_range": lambda v: [0, 9],
                                            "duplicate": lambda v: [2, 2]}, "sd": "real"}))
    add(S("daml.models.observe_linear", obs_call(M.observe_linear),
          lambda: dict(matrix=np.eye(3)[:2], sd=1.0), {"matrix": "array", "sd": "real", "cov": "cov"},
          skip=[("cov", "None")]))
    add(S("daml.models.observe_nonlinear", obs_call(M.observe_nonlinear),
          lambda: dict(func=lambda x: x[..., :2] ** 2, state_size=3, size=2, sd=1.0),
          {"func": "obj", "state_size": "int", "size": "int", "sd": "real", "cov": "cov"},
          skip=[("cov", "None")], auto_skip=("description",)))
    add(S("daml.models.observe_transformed", obs_call(M.observe_transformed),
          lambda: dict(base=M.observe_all(3, sd=1.0), transform=lambda x: torch.tanh(x)),
          {"base": "obj", "transform": {**CHOICE}}, auto_skip=("name",)))

    # ---- daml.twin --------------------------------------------------------------------------------------
    add(S("daml.twin.simulate", twin.simulate,
          lambda: dict(model=M.Lorenz63(), steps=5, observe=M.observe_all(3, sd=1.0), x0=np.ones(3), seed=0),
          {"model": "obj", "steps": "int", "observe": "obj", "every": "int", "x0": "array",
           "x0_cov": {**COV, "negative": lambda v: -1.0, "nan_scalar": lambda v: math.nan},
           "missing": "prob", "experiments": "int", "at": {"float": lambda v: [0.5, 1.5], "negative": lambda v: [-1],
                                                          "str": lambda v: "x", "out_of_range": lambda v: [99]}},
          skip=[("every", "None"), ("experiments", "None")]))
    add(S("daml.simulate", daml.simulate, lambda: dict(model=M.Identity(2), steps=3, observe=M.observe_all(2, sd=1.0),
                                                       x0=np.ones(2), seed=0), {"steps": "int"}, auto=False))
    add(S("daml.twin.observation_steps", twin.observation_steps, lambda: dict(steps=10, every=2),
          {"steps": "int", "every": "int", "at": {"float": lambda v: [0.5], "negative": lambda v: [-3],
                                                   "str": lambda v: "x"}}, skip=[("every", "None")]))

    # ---- daml.filters -----------------------------------------------------------------------------------
    filter_params = {"climatology": dict(mean=np.zeros(3), cov=np.eye(3) * 50, members=4),
                     "kf": {}, "ekf": {}, "enkf": dict(members=4), "etkf": dict(members=4),
                     "letkf": dict(members=4, radius=2.0), "bootstrap": dict(members=6),
                     "optimal": dict(members=6), "auxiliary": dict(members=6), "iapf": dict(members=6),
                     "dpf": dict(members=6), "ewpf": dict(members=6),
                     "iewpf": dict(members=6), "etpf": dict(members=6, max_iter=50),
                     "letpf": dict(members=6, radius=2.0, max_iter=50),
                     "diffusion": dict(members=4, steps=5), "ensf": dict(members=4, steps=5)}
    pf_noise = {"bootstrap", "optimal", "auxiliary", "iapf", "ewpf", "iewpf", "etpf", "letpf"}

    def run_filter(name):
        def call(**kw):
            data = kw.pop("__data")
            filt = F.make_filter(name, **kw)
            model = M.Identity(3, noise_cov=0.1 * np.eye(3)) if name == "kf" else M.Lorenz63()
            return F.run(filt, model, data, seed=0).analysis
        return _target(call, F.REGISTRY[name])
    for name, params in filter_params.items():
        def base(params=params, name=name):
            kw = dict(params)
            if name in pf_noise:
                kw["model_noise"] = 0.5 * np.eye(3)
            kw["__data"] = l63_data(4)
            return kw
        kinds = {"members": "int"} if "members" in params else {}
        if name in pf_noise:
            kinds["model_noise"] = "cov"
        if name == "climatology":
            kinds.update(mean="array", cov="cov")
        add(S(f"daml.filters.{name}", run_filter(name), base, kinds,
              auto_skip=("positions",)))
    for fname, fn in [("make_filter", F.make_filter)]:
        add(S("daml.filters.make_filter", fn, lambda: dict(name="etkf", members=4), {"name": "choice",
                                                                                      "members": "int"}, auto=False,
              aliases={"name": ("method",)}))
    for fname in ("kalman_filter", "extended_kalman_filter", "enkf", "etkf", "letkf", "bootstrap", "optimal",
                  "auxiliary", "iapf", "dpf", "ewpf", "iewpf", "etpf", "letpf", "climatology"):
        # the constructors behind the registry names; the runs above fuzz their parameters
        fn = getattr(F, fname)
        params = {"kalman_filter": {}, "extended_kalman_filter": {}, "enkf": dict(members=4),
                  "etkf": dict(members=4), "letkf": dict(members=4, radius=2.0), "bootstrap": dict(members=4),
                  "optimal": dict(members=4), "auxiliary": dict(members=4), "iapf": dict(members=4),
                  "dpf": dict(members=4), "ewpf": dict(members=4),
                  "iewpf": dict(members=4), "etpf": dict(members=4), "letpf": dict(members=4, radius=2.0),
                  "climatology": dict(mean=np.zeros(3), cov=np.eye(3))}[fname]
        add(S(f"daml.filters.{fname}", fn, lambda p=params: dict(p), {}, auto=False))

    add(S("daml.filters.run", lambda **kw: F.run(**kw).analysis,
          lambda: dict(filt=F.make_filter("etkf", members=4), model=M.Lorenz63(), data=l63_data(4), seed=0),
          {"filt": "obj", "model": "obj", "data": "data", "seed": "seed",
           "prior": {"non_psd": lambda v: (np.ones(3), -np.eye(3)), "nan_mean": lambda v: (np.array([np.nan, 0, 0]),
                                                                                        np.eye(3)),
                     "wrong_shape": lambda v: (np.ones(2), np.eye(2)), "str": lambda v: "x",
                     "one": lambda v: (np.ones(3),)},
           "max_spread": "real", "dtype": "dtype", "device": "device", "operator": "obj", "forecast": "bool",
           "progress": "bool", "keep": "choice", "thin": "int", "quantiles": "obj"}, auto=False,
          skip=[("operator", "None"), ("progress", "None")]))
    def dpf_evidence(**kw):
        out = F.log_evidence(**kw)
        return out.log_evidence, out.increments, out.mean
    add(S("daml.filters.log_evidence", dpf_evidence,
          lambda: dict(filt=F.dpf(members=6), model=M.Lorenz63(noise_cov=0.5), y=t64(np.ones((2, 4, 3))),
                       operator=M.observe_all(3, sd=1.0), mean=t64(np.ones(3)), cov=t64(np.eye(3)), seed=0),
          {"filt": "obj", "model": "obj", "y": "array", "operator": "obj", "mean": "array", "cov": "cov",
           "seed": "seed"}, auto=False))
    add(S("daml.filters.run[kf,linear]", lambda **kw: F.run(F.kalman_filter(), **kw).analysis,
          lambda: dict(zip(("model", "data"), lin_data())),
          {"data": "data"}, auto=False))
    add(S("daml.filters.kalman_smoother", F.kalman_smoother, lambda: dict(zip(("model", "data"), lin_data())),
          {"model": "obj", "data": "data",
           "prior": {"non_psd": lambda v: (np.ones(2), -np.eye(2)), "str": lambda v: "x"}},
          skip=[("dtype", "None"), ("device", "None")]))
    add(S("daml.filters.operator_from_data", F.operator_from_data, lambda: dict(data=l63_data(3)), {"data": "data"}))
    add(S("daml.filters.climatology_from_truth", F.climatology_from_truth,
          lambda: dict(truth=l63_data(5)["truth"].values), {"truth": "members"}))
    add(S("daml.filters.inflate", lambda filt, factor: F.run(F.inflate(filt, factor), M.Lorenz63(), l63_data(3),
                                                             seed=0).analysis,
          lambda: dict(filt=F.etkf(4), factor=1.05), {"filt": "obj", "factor": "real"}))
    add(S("daml.filters.gaspari_cohn", F.gaspari_cohn, lambda: dict(distance=t64([0.0, 0.5, 1.5, 3.0]), support=2.0),
          {"distance": "array", "support": "real"}))
    from daml.filters import local as LOC

    def ring(n=24, members=6):
        g = np.random.default_rng(3)
        return dict(x=t64(8.0 + g.standard_normal((members, n))), y=t64(8.0 + g.standard_normal(n)),
                    precision=t64(np.where(np.arange(n) % 2 == 0, 1.0, 0.0)))

    local_args = {"x": "members", "y": "array", "precision": "array", "radius": "real"}
    add(S("daml.filters.local.halo", LOC.halo, lambda: dict(radius=4.0), {"radius": "real"}, auto=False))
    add(S("daml.filters.local.letkf_local", LOC.letkf_local, lambda: dict(**ring(), radius=2.0),
          {**local_args, "block": "int"}, auto=False, skip=[("block", "None")]))
    add(S("daml.filters.local.letkf_window", LOC.letkf_window, lambda: dict(**ring(), radius=2.0, halo=7),
          {**local_args, "halo": "int"}, auto=False))
    add(S("daml.filters.local.letpf_local", LOC.letpf_local, lambda: dict(**ring(), radius=2.0),
          {**local_args, "epsilon": "real", "solver": "choice"}, auto=False))
    add(S("daml.filters.local.letpf_window", LOC.letpf_window, lambda: dict(**ring(), radius=2.0, halo=7),
          {**local_args, "halo": "int", "epsilon": "real"}, auto=False))
    add(S("daml.filters.gaussian_loglik", F.gaussian_loglik,
          lambda: dict(innovation=t64(members(4, 2)), noise_cov=t64(spd(2)), mask=torch.ones(2, dtype=torch.bool)),
          {"innovation": "array", "noise_cov": "cov", "mask": "array"}))
    add(S("daml.filters.masked_observation", F.masked_observation,
          lambda: dict(innovation=t64(np.ones(2)), obs_anomalies=t64(members(4, 2)), noise_cov=t64(spd(2)),
                       mask=torch.ones(2, dtype=torch.bool)),
          {"innovation": "array", "obs_anomalies": "members", "noise_cov": "cov", "mask": "array"}))

    def ens_state(m=4):
        return F.EnsembleState(t64(members(m, 3)), t64(logw(m)))
    add(S("daml.filters.EnsembleState", lambda x, log_weight: F.ensemble_members(F.EnsembleState(x, log_weight)),
          lambda: dict(x=t64(members(4, 3)), log_weight=t64(logw(4))), {"x": "members", "log_weight": "logw"}))
    add(S("daml.filters.ensemble_members", F.ensemble_members, lambda: dict(state=ens_state()), {"state": "obj"}))
    add(S("daml.filters.GaussianState", lambda mean, cov: F.gaussian_members(F.GaussianState(mean, cov)),
          lambda: dict(mean=t64(np.zeros(3)), cov=t64(spd(3))), {"mean": "array", "cov": "cov"}))
    add(S("daml.filters.gaussian_members", F.gaussian_members,
          lambda: dict(state=F.GaussianState(t64(np.zeros(3)), t64(spd(3)))), {"state": "obj"}))
    def init_call(members, mean, cov):
        init = F.ensemble_init(members)
        return init(M.Lorenz63(), mean, cov, torch.Generator().manual_seed(0))
    add(S("daml.filters.ensemble_init", _target(init_call, F.ensemble_init),
          lambda: dict(members=4, mean=t64(np.zeros(3)), cov=t64(spd(3))),
          {"members": "int", "mean": "array", "cov": "cov"}, auto=False))
    add(S("daml.filters.ensemble_forecast", F.ensemble_forecast,
          lambda: dict(state=ens_state(), model=M.Lorenz63(), g=torch.Generator().manual_seed(0)),
          {"state": "obj", "model": "obj", "g": "obj"}))

    def register_call(name):
        deco = F.register(name)
        try:
            return deco(lambda: F.etkf(4))
        finally:
            F.REGISTRY.pop(name, None) if name not in filter_params else None
    add(S("daml.filters.register", register_call, lambda: dict(name="fuzz-filter"), {"name": "obj"}, auto=False))
    add(S("daml.filters.Filter", lambda **kw: F.Filter(**kw),
          lambda: {k: getattr(F.etkf(4), k) for k in ("name", "config", "init", "forecast", "analysis", "members")},
          {"name": "obj", "init": "obj"}, auto=False))

    def ew_step(**kw):
        return F.equivalent_weights_step(**kw)
    add(S("daml.filters.equivalent_weights_step", F.equivalent_weights_step,
          lambda: dict(f=t64(members(4, 3)), log_weight=t64(logw(4)), y=t64(np.ones(3)),
                       operator=M.observe_all(3, sd=1.0), mask=torch.ones(3, dtype=torch.bool), q=t64(np.eye(3) * 0.5),
                       keep=0.8),
          {"f": "members", "log_weight": "logw", "y": "array", "operator": "obj", "q": "cov", "keep": "prob"}))
    add(S("daml.filters.Upcoming", F.Upcoming, lambda: dict(y=t64(np.ones(3)), mask=torch.ones(3, dtype=torch.bool),
                                                           operator=M.observe_all(3, sd=1.0), steps=1, interval=1),
          {}, auto=False))
    add(S("daml.filters.RunResult", lambda: F.run(F.etkf(4), M.Lorenz63(), l63_data(3), seed=0), lambda: {}, {},
          auto=False))

    # ---- daml.transport ----------------------------------------------------------------------------------
    def cost(m=5, seed=0):
        x = members(m, 2, seed)
        return t64(((x[:, None] - x[None]) ** 2).sum(-1))
    add(S("daml.transport.sinkhorn", lambda **kw: T.sinkhorn(**kw, warn=False),
          lambda: dict(cost=cost(), a=t64(np.full(5, 0.2)), b=t64(np.exp(logw(5))), max_iter=50),
          {"cost": {**ARRAY, "negative": lambda c: -c}, "a": {**ARRAY, "negative": lambda v: -v},
           "b": "array", "epsilon": "real", "tol": "real", "max_iter": "int", "check_every": "int",
           "anneal": "real", "relaxation": "real", "relative": "bool", "dtype": "dtype", "device": "device"},
          auto=False, skip=[("a", "None"), ("b", "None"), ("anneal", "None")]))
    add(S("daml.transport.sinkhorn[log]", lambda **kw: T.sinkhorn(**kw, warn=False),
          lambda: dict(cost=cost(), log_a=t64(np.log(np.full(5, 0.2))), log_b=t64(logw(5)), max_iter=50),
          {"log_a": "logw", "log_b": "logw"}, auto=False))
    add(S("daml.transport.softmin", T.softmin,
          lambda: dict(cost=cost(), h=t64(np.zeros(5)), epsilon=t64(0.1), dim=-1),
          {"cost": "array", "h": "array", "epsilon": {**REAL, "zero": lambda v: t64(0.0)}, "dim": "int"}))
    add(S("daml.transport.ensemble_transform", T.ensemble_transform,
          lambda: dict(x=t64(members(5, 2)), log_weight=t64(logw(5)), max_iter=50, cost=cost()),
          {"x": "members", "log_weight": "logw", "cost": "array"}, skip=[("cost", "None")]))
    add(S("daml.transport.second_order_correction", T.second_order_correction,
          lambda: dict(transform=T.ensemble_transform(t64(members(5, 2)), t64(logw(5)), max_iter=50).transform,
                       log_weight=t64(logw(5))), {"transform": "array", "log_weight": "logw"}))

    # ---- daml.diffusion -----------------------------------------------------------------------------------
    h = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    op = lambda: M.observe_linear(h, sd=0.5)  # noqa: E731
    add(S("daml.diffusion.analysis", dif.analysis,
          lambda: dict(members=t64(members(8, 3)), y=t64(np.array([0.5, -0.2])), operator=op(), steps=5, seed=0,
                       log_weight=t64(logw(8))),
          {"members": "members", "y": "array", "operator": "obj", "mask": "array", "log_weight": "logw",
           "particles": "int", "schedule": "choice"}, skip=[("mask", "None"), ("particles", "None"),
                                                             ("log_weight", "None")]))
    # the documented mask argument on its own: a boolean mask, the one it asks for
    add(S("daml.diffusion.analysis[mask]", dif.analysis,
          lambda: dict(members=t64(members(8, 3)), y=t64(np.array([0.5, -0.2])), operator=op(), steps=5, seed=0,
                       mask=torch.tensor([True, False])), {"mask": "array"}, auto=False))
    add(S("daml.diffusion.posterior_score",
          lambda **kw: dif.posterior_score(**kw)(t64(members(2, 3)), 0.5),
          lambda: dict(members=t64(members(8, 3)), y=t64(np.array([0.5, -0.2])), operator=op(), log_weight=t64(logw(8))),
          {"members": "members", "y": "array", "operator": "obj", "log_weight": "logw"},
          skip=[("log_weight", "None")], auto=False))
    add(S("daml.diffusion.check_sampler", dif.check_sampler, lambda: dict(steps=10),
          {"method": "choice", "steps": "int", "t_min": "prob", "noise": "real", "corrector_steps": "int",
           "corrector_size": "real", "clip": "real", "spacing": "choice"},
          skip=[("noise", "None"), ("clip", "None")]))
    add(S("daml.diffusion.time_grid", dif.time_grid, lambda: dict(steps=5, t_min=1e-3),
          {"steps": "int", "t_min": "prob", "spacing": "choice"}))
    for cname, kw in [("VPLinear", {}), ("VPCosine", {}), ("VE", {})]:
        cls = getattr(dif, cname)

        def sched_call(_cls=cls, t=0.5, **k):
            s = _cls(**k)
            return [s.alpha(t), s.sigma2(t), s.dalpha(t), s.dsigma2(t), s.drift(t), s.diffusion2(t), s.log_snr(t)]
        add(S(f"daml.diffusion.{cname}", _target(sched_call, cls), lambda: dict(t=0.5), {"t": "prob"}))
    if hasattr(dif, "ensf_growth"):
        add(S("daml.diffusion.ensf_growth", dif.ensf_growth, lambda: dict(curvature=4.0, steps=20),
              {"curvature": "real", "steps": "int"}))
    if hasattr(dif, "divergence_bound"):
        add(S("daml.diffusion.divergence_bound", dif.divergence_bound, lambda: dict(members=t64(members(6, 3)), log_weight=t64(logw(6))),
              {"members": "members", "log_weight": "logw", "factor": "real"}, skip=[("log_weight", "None")]))
        add(S("daml.diffusion.DivergenceBound", lambda: dif.divergence_bound(t64(members(6, 3))), lambda: {}, {},
              auto=False))
    add(S("daml.diffusion.Schedule", lambda: issubclass(dif.VE, dif.Schedule), lambda: {}, {}, auto=False))
    add(S("daml.diffusion.make_schedule", dif.make_schedule, lambda: dict(schedule="vp-linear"),
          {"schedule": {**CHOICE, "bad_dict": lambda v: {"name": "vp-linear", "eps_alpha": "x"}}}))

    def mix_fn(factory, **extra):
        def call(**kw):
            mix = factory(**kw)
            return dif.mixture_score(mix, t64(members(2, 3)), 0.8, 0.3), mix
        return _target(call, factory)
    add(S("daml.diffusion.kernel_mixture", mix_fn(dif.kernel_mixture), lambda: dict(members=t64(members(6, 3)), log_weight=t64(logw(6))),
          {"members": "members", "log_weight": "logw", "bandwidth": "real"}, skip=[("log_weight", "None")]))
    add(S("daml.diffusion.local_mixture", mix_fn(dif.local_mixture),
          lambda: dict(members=t64(members(8, 3)), neighbours=3, log_weight=t64(logw(8))), {"members": "members", "log_weight": "logw",
                                                                   "taper": "cov"},
          skip=[("log_weight", "None"), ("taper", "None")]))
    add(S("daml.diffusion.fitted_mixture", mix_fn(dif.fitted_mixture),
          lambda: dict(members=t64(members(12, 3)), iterations=20, log_weight=t64(logw(12))), {"members": "members", "log_weight": "logw",
                                                                     "taper": "cov"},
          skip=[("log_weight", "None"), ("taper", "None")]))
    add(S("daml.diffusion.gaussian_prior", mix_fn(dif.gaussian_prior), lambda: dict(members=t64(members(6, 3)), log_weight=t64(logw(6))),
          {"members": "members", "log_weight": "logw", "taper": "cov"},
          skip=[("log_weight", "None"), ("taper", "None")]))
    add(S("daml.diffusion.gaussian_mixture", mix_fn(dif.gaussian_mixture),
          lambda: dict(means=t64(members(2, 3)), covs=t64(np.stack([spd(3), spd(3, 4)])), log_weight=t64(logw(2))),
          {"means": "members", "covs": "cov", "log_weight": "logw"}, skip=[("log_weight", "None")]))
    add(S("daml.diffusion.Mixture", lambda mean, log_weight: dif.mixture_score(
        dif.Mixture(mean, log_weight), t64(members(2, 3)), 0.8, 0.3),
        lambda: dict(mean=t64(members(3, 3)), log_weight=t64(logw(3))), {"mean": "members", "log_weight": "logw"}))
    add(S("daml.diffusion.mixture_score", dif.mixture_score,
          lambda: dict(mix=dif.gaussian_prior(t64(members(6, 3))), x=t64(members(2, 3)), alpha=0.8, sigma2=0.3),
          {"mix": "obj", "x": "array", "alpha": "real", "sigma2": "real"}))

    def lin_base():
        mix = dif.gaussian_prior(t64(members(6, 3)))
        return dict(mix=mix, y=t64(np.array([0.5, -0.2])), operator=op(), mask=torch.ones(2, dtype=torch.bool))
    add(S("daml.diffusion.linearise", dif.linearise, lin_base,
          {"mix": "obj", "y": "array", "operator": "obj", "mask": "array"}, skip=[("mask", "None")]))
    add(S("daml.diffusion.Linearisation", lambda **kw: dif.Linearisation(**kw), lambda: dif.linearise(**lin_base())._asdict(),
          {}, auto=False))

    def forcing_base():
        b = lin_base()
        return dict(mix=b["mix"], lin=dif.linearise(**b), x=t64(members(2, 3)), alpha=0.8, sigma2=0.3)
    add(S("daml.diffusion.exact_forcing", dif.exact_forcing, forcing_base,
          {"mix": "obj", "lin": "obj", "x": "array", "alpha": "real", "sigma2": "real"}))
    add(S("daml.diffusion.ensemble_forcing", dif.ensemble_forcing,
          lambda: dict(gauss=dif.gaussian_prior(t64(members(6, 3))), members=t64(members(6, 3)),
                       loglik=t64(logw(6)), x=t64(members(2, 3)), alpha=0.8, sigma2=0.3),
          {"gauss": "obj", "members": "members", "loglik": "logw", "x": "array", "alpha": "real",
           "sigma2": "real"}))
    add(S("daml.diffusion.likelihood_score", dif.likelihood_score,
          lambda: dict(x=t64(members(2, 3)), y=t64(np.array([0.5, -0.2])), operator=op(),
                       mask=torch.ones(2, dtype=torch.bool)), {"x": "array", "y": "array", "operator": "obj",
                                                               "mask": "array"}))
    add(S("daml.diffusion.terminal_sample", dif.terminal_sample,
          lambda: dict(schedule=dif.VPLinear(), mean=t64(np.zeros(3)), var=t64(np.ones(3)), particles=4,
                       generator=torch.Generator().manual_seed(0)),
          {"schedule": "obj", "mean": "array", "var": {**ARRAY, "negative": lambda v: -v}, "particles": "int",
           "generator": "obj"}))
    add(S("daml.diffusion.reverse", dif.reverse,
          lambda: dict(score=lambda x, t: -x, x=t64(members(4, 3)), schedule=dif.VPLinear(),
                       settings=dif.check_sampler("sde", 5), generator=torch.Generator().manual_seed(0)),
          {"score": "obj", "x": "array", "schedule": "obj", "settings": "obj", "generator": "obj"}))
    add(S("daml.diffusion.diffusion", lambda **kw: F.run(dif.diffusion(**kw), M.Lorenz63(), l63_data(3),
                                                         seed=0).analysis,
          lambda: dict(members=4, steps=5), {}, heavy=False))
    add(S("daml.diffusion.ensf", lambda **kw: F.run(dif.ensf(**kw), M.Lorenz63(), l63_data(3), seed=0).analysis,
          lambda: dict(members=4, steps=5), {}))

    # ---- daml.ensembles --------------------------------------------------------------------------------------
    def fit_base():
        x, y = regression()
        return dict(module=E.mlp(2, 4), x=x, y=y, members=2, noise_sd=0.1, epochs=1, batch_size=8, seed=0)
    add(S("daml.ensembles.fit", lambda **kw: E.flat_params(E.fit(**kw)), fit_base,
          {"module": "obj", "x": "members", "y": "members", "members": "int", "noise_sd": "real",
           "epochs": "int", "batch_size": "int", "lr": "real"},
          skip=[("noise_sd", "None")], heavy=True, auto_skip=("progress",)))
    add(S("daml.ensembles.fit_block", lambda **kw: E.flat_params(E.fit_block(**kw)),
          lambda: dict(**fit_base(), first=1, count=1),
          {"module": "obj", "x": "members", "y": "members", "members": "int", "first": "int", "count": "int",
           "threads": "int", "seed": "seed"}, auto=False, heavy=True))

    def two_blocks():
        base = fit_base()
        return dict(blocks=[E.fit_block(**base, first=0, count=1), E.fit_block(**base, first=1, count=1)])

    add(S("daml.ensembles.gather", lambda **kw: E.flat_params(E.gather(**kw)), two_blocks,
          {"blocks": {**OBJ, "empty": lambda v: [], "one": lambda v: v[:1], "twice": lambda v: [v[0], v[0]]}},
          auto=False, heavy=True))
    add(S("daml.ensembles.fit_threads", E.fit_threads,
          lambda: dict(module=E.mlp(2, 4), x=regression()[0], members=3),
          {"module": "obj", "x": "members", "members": "int", "batch_size": "int", "vectorize": "bool"},
          auto=False, heavy=True))
    add(S("daml.ensembles.Ensemble", lambda: small_ensemble(), lambda: {}, {}, auto=False))
    add(S("daml.ensembles.mlp", lambda **kw: E.mlp(**kw)(torch.ones(3, kw.get("inputs", 2))),
          lambda: dict(inputs=2, hidden=4), {"inputs": "int", "hidden": "int", "outputs": "int",
                                             "activation": "choice", "dropout": "prob"},
          auto=False))
    add(S("daml.ensembles.forward", E.forward, lambda: dict(ens=small_ensemble(), x=regression()[0][:5]),
          {"ens": "obj", "x": "members"}))
    add(S("daml.ensembles.prior_sd", E.prior_sd, lambda: dict(module=E.mlp(2, 4)),
          {"module": "obj", "prior_scale": "real", "bias_scale": "real"}, auto_skip=("dtype", "device")))
    add(S("daml.ensembles.flat_params", E.flat_params, lambda: dict(ens=small_ensemble()), {"ens": "obj"}))
    for fname, extra in [("weigh", {}), ("gauss_newton", {}), ("fisher", {}), ("model_error", {}),
                         ("loo_variance_scale", {})]:
        add(S(f"daml.ensembles.{fname}", getattr(E, fname),
              lambda extra=extra: dict(ens=small_ensemble(), x=regression()[0], y=regression()[1], **extra),
              {"ens": "obj", "x": "members", "y": "members"}, auto_skip=("bounds",)))
    add(S("daml.ensembles.log_likelihood", E.log_likelihood,
          lambda: dict(ens=small_ensemble(), x=regression()[0], y=regression()[1]),
          {"ens": "obj", "x": "members", "y": "members"}, skip=[("x", "None"), ("y", "None")]))
    add(S("daml.ensembles.log_prior", E.log_prior, lambda: dict(ens=small_ensemble()), {"ens": "obj"}))
    add(S("daml.ensembles.MemberWeights", lambda: E.weigh(small_ensemble(), *regression())[1], lambda: {}, {},
          auto=False))
    add(S("daml.ensembles.equal_weight", E.equal_weight,
          lambda: dict(ens=small_ensemble(), x=regression()[0], y=regression()[1], steps=3, seed=0),
          {"ens": "obj", "x": "members", "y": "members", "steps": "int"}, heavy=True))

    def pred_base():
        return dict(ens=small_ensemble(), x=regression()[0][:4], seed=0)
    add(S("daml.ensembles.predict", E.predict, pred_base,
          {"ens": "obj", "x": "members", "input_sd": "array", "input_samples": "int", "test_noise_sd": "real",
           "model_sd": "real", "dropout_passes": "int"},
          skip=[("input_sd", "None"), ("test_noise_sd", "None"), ("model_sd", "None")]))

    def pred_post():
        return E.predict(small_ensemble(), regression()[0][:4], seed=0)
    add(S("daml.ensembles.scores", E.scores, lambda: dict(post=pred_post(), y=regression()[1][:4, 0]),
          {"post": "obj", "y": "array", "level": "prob"}))
    add(S("daml.ensembles.mixture_quantile", E.mixture_quantile, lambda: dict(post=pred_post(), q=0.3),
          {"post": "obj", "q": "prob"}))
    add(S("daml.ensembles.scale_variance", E.scale_variance, lambda: dict(post=pred_post(), factor=2.0),
          {"post": "obj", "factor": "real"}))
    add(S("daml.ensembles.estimate_noise", E.estimate_noise,
          lambda: dict(module=E.mlp(2, 4), x=regression()[0], y=regression()[1], holdout=0.25, epochs=1, seed=0),
          {"module": "obj", "x": "members", "y": "members", "holdout": "prob", "members": "int"}, heavy=True,
          auto=False))
    add(S("daml.ensembles.uncertainty_sources", E.uncertainty_sources,
          lambda: dict(module=E.mlp(2, 4), x=regression()[0], y=regression()[1], x_new=regression()[0][:3],
                       noise_sd=0.1, members=2, samples=20, correction_steps=2, epochs=1, seed=0),
          {"x_new": "members", "noise_sd": "real", "members": "int", "samples": "int"}, heavy=True, auto=False))
    add(S("daml.ensembles.deep_ensemble", lambda **kw: E.flat_params(E.deep_ensemble(**kw)),
          lambda: dict(x=regression()[0], y=regression()[1], members=2, hidden=4, epochs=1, seed=0),
          {"x": "members", "y": "members", "members": "int", "hidden": "int", "activation": "choice"},
          heavy=True, auto=False))
    add(S("daml.ensembles.mc_dropout", lambda **kw: E.flat_params(E.mc_dropout(**kw)),
          lambda: dict(x=regression()[0], y=regression()[1], noise_sd=0.1, hidden=4, epochs=1, seed=0),
          {"x": "members", "y": "members", "noise_sd": "real", "dropout": "prob"}, heavy=True, auto=False))
    for cname in ("GaussNewton", "Fisher", "CorrectionInfo", "VarianceScale"):
        producer = {"GaussNewton": lambda: E.gauss_newton(small_ensemble(), *regression()),
                    "Fisher": lambda: E.fisher(small_ensemble(), *regression()),
                    "CorrectionInfo": lambda: E.equal_weight(E.weigh(small_ensemble(), *regression())[0],
                                                             *regression(), steps=2, seed=0)[1],
                    "VarianceScale": lambda: E.loo_variance_scale(small_ensemble(), *regression())}[cname]
        add(S(f"daml.ensembles.{cname}", producer, lambda: {}, {}, auto=False))

    # ---- daml.causal -----------------------------------------------------------------------------------------
    def plr_base():
        from sklearn.linear_model import LinearRegression
        r = _rng(7)
        x = r.normal(size=(60, 2))
        d = x[:, 0] + r.normal(size=60)
        y = 0.5 * d + x[:, 1] + r.normal(size=60)
        return dict(y=y, d=d, x=x, ml_l=LinearRegression(), ml_m=LinearRegression(), folds=2, n_boot=20, seed=0)
    add(S("daml.causal.plr", causal.plr, plr_base,
          {"y": "array", "d": "array", "x": "members", "ml_l": {**OBJ, "class": lambda v: type(v)},
           "ml_m": "obj", "folds": "int", "repetitions": "int", "level": "prob", "n_boot": "int",
           "bootstrap": "choice", "aggregation": "choice", "score": "choice", "nan": "choice", "seed": "seed"},
          auto=False, skip=[("y", "one_member")]))
    add(S("daml.causal.summary", causal.summary, lambda: dict(ds=causal.plr(**plr_base())),
          {"ds": "obj", "name": "choice"}))
    add(S("daml.causal.sample_splits", lambda **kw: list(causal.sample_splits(**kw)) if False else
          causal.sample_splits(**kw), lambda: dict(n=10, folds=2, seed=0, groups=np.arange(10) % 5),
          {"n": "int", "folds": "int", "repetitions": "int", "seed": "seed", "groups": "array"},
          skip=[("groups", "None")]))

    def cross_fit_base():
        from sklearn.linear_model import LinearRegression
        b = plr_base()
        return dict(learner=LinearRegression(), x=b["x"], target=b["y"], splits=causal.sample_splits(60, 2, seed=0))
    add(S("daml.causal.cross_fit", causal.cross_fit, cross_fit_base,
          {"learner": {**OBJ, "class": lambda v: type(v)}, "x": "members", "target": "array", "splits": "obj"},
          auto_skip=("name",)))
    add(S("daml.causal.solve_linear_score", causal.solve_linear_score,
          lambda: dict(psi_a=-np.abs(members(10, 1)[:, 0]) - 0.5, psi_b=members(10, 1, 3)[:, 0]),
          {"psi_a": {**ARRAY, "zeros": lambda v: v * 0}, "psi_b": "array"}))
    add(S("daml.causal.multiplier_bootstrap", causal.multiplier_bootstrap,
          lambda: dict(score=causal.solve_linear_score(-np.abs(members(10, 1).T) - 0.5, members(10, 1, 3).T),
                       weights=_rng(5).normal(size=(1, 7, 10))),
          {"score": "obj", "weights": "array"}))
    add(S("daml.causal.aggregate_repetitions", causal.aggregate_repetitions,
          lambda: dict(theta_r=np.array([0.5, 0.6, 0.55]), se_r=np.array([0.1, 0.12, 0.11])),
          {"theta_r": "array", "se_r": {**ARRAY, "negative": lambda v: -v}, "aggregation": "choice"}))
    add(S("daml.causal.MLPRegressor", lambda **kw: causal.MLPRegressor(**kw).fit(*_mlp_xy()).predict(_mlp_xy()[0]),
          lambda: dict(hidden=(4,), iterations=20),
          {"hidden": {"negative": lambda v: (-1,), "str": lambda v: "x", "empty": lambda v: ()},
           "iterations": "int", "lr": "real", "dropout": "prob", "weight_decay": "real", "activation": "choice"},
          auto=False))
    add(S("daml.causal.MLPRegressor.fit", lambda x, y: causal.MLPRegressor(hidden=(4,), iterations=10).fit(x, y)
          .predict(np.zeros((2, 2))), lambda: dict(x=_mlp_xy()[0], y=_mlp_xy()[1]), {"x": "members", "y": "array"},
          auto=False))
    add(S("daml.causal.default_learner", causal.default_learner, lambda: dict(kind="forest",
                                                                               seed=0),
          {"kind": "choice", "seed": "seed"}, auto=False))
    add(S("daml.causal.default_boosting", causal.default_boosting, lambda: dict(seed=0), {"seed": "seed"}))
    add(S("daml.causal.default_final", causal.default_final, lambda: dict(seed=0), {"seed": "seed"}))
    add(S("daml.causal.synthetic_site", lambda **kw: causal.synthetic_site(**kw),
          lambda: dict(years=1, seed=0),
          {"years": "int", "latitude": {**REAL, "out_of_range": lambda v: 100.0}, "q10": "real", "noise": "real",
           "start": {"bad": lambda v: "not-a-date", "None": lambda v: None}}, auto=False, heavy=True))

    def q10_base():
        from sklearn.linear_model import LinearRegression
        return dict(data=site_frame().iloc[:2000], learner=LinearRegression(), folds=2, n_boot=10, seed=0)
    add(S("daml.causal.q10", causal.q10, q10_base,
          {"data": {"missing_column": lambda v: v.drop(columns=["TA"]), "None": lambda v: None,
                    "str": lambda v: "x", "empty": lambda v: v.iloc[:0],
                    "text_column": lambda v: v.assign(TA="warm")},
           "reco": "choice", "ta": "choice", "tref": "real", "folds": "int", "level": "prob"},
          auto=False, heavy=True))
    add(S("daml.causal.q10_end_to_end", causal.q10_end_to_end,
          lambda: dict(data=site_frame().iloc[:500], members=2, iterations=5, batch_size=64, check_every=5,
                       hidden=(4,), seed=0),
          {"data": {"missing_column": lambda v: v.drop(columns=["TA"]), "None": lambda v: None},
           "members": "int", "iterations": "int", "validation": "prob", "q10_init": "real"},
          auto=False, heavy=True))
    add(S("daml.causal.partition", causal.partition,
          lambda: dict(data=site_frame().iloc[:1500], folds=2, members=2, seed=0,
                       ml_l=_lin(), ml_m=_lin(), final=_lin()),
          {"data": {"missing_column": lambda v: v.drop(columns=["SW_IN"]), "None": lambda v: None},
           "members": "int", "folds": "int", "level": "prob", "bootstrap": "choice"},
          auto=False, heavy=True))

    def csv_roundtrip(site, path, nee="NEE_obs"):
        causal.to_fluxnet_csv(site, path, nee=nee)
        return causal.read_fluxnet_csv(path, min_night=1)
    add(S("daml.causal.to_fluxnet_csv", _target(csv_roundtrip, causal.to_fluxnet_csv),
          lambda: dict(site=causal.synthetic_site(years=1, seed=0).isel(time=slice(0, 48 * 20)),
                       path=os.path.join(_tmpdir(), "site.csv")), {"site": "obj", "path": "path"}, heavy=True))
    add(S("daml.causal.read_fluxnet_csv", causal.read_fluxnet_csv,
          lambda: dict(path=_site_csv(), min_night=1),
          {"path": {**PATH, "text": lambda v: _site_csv(text=True), "semicolon": lambda v: _site_csv(semicolon=True),
                    "corrupt": lambda v: _corrupt_file()},
           "max_qc": "int", "latitude": {**REAL, "out_of_range": lambda v: 100.0}, "min_night": "int"},
          auto=False, heavy=True, skip=[("latitude", "None")]))
    add(S("daml.causal.potential_radiation", causal.potential_radiation,
          lambda: dict(time=np.arange("2003-01-01", "2003-01-03", np.timedelta64(30, "m"), dtype="datetime64[m]"),
                       latitude=47.0),
          {"time": {"None": lambda v: None, "str": lambda v: "x", "float": lambda v: np.ones(3)},
           "latitude": {**REAL, "out_of_range": lambda v: 100.0}, "step_hours": "real"}))
    add(S("daml.causal.smoothed_potential_radiation", causal.smoothed_potential_radiation,
          lambda: dict(sw_in_pot=np.abs(np.sin(np.linspace(0, 20 * np.pi, 48 * 20))) * 800),
          {"sw_in_pot": "array", "steps_per_day": "int", "days": "real"}))
    add(S("daml.causal.saturation_vapour_pressure", causal.saturation_vapour_pressure,
          lambda: dict(ta=np.array([-5.0, 10.0, 25.0])),
          {"ta": {**ARRAY, "below_absolute_zero": lambda v: v * 0 - 300.0}}))
    add(S("daml.causal.DroppedRowsWarning", lambda: issubclass(causal.DroppedRowsWarning, UserWarning), lambda: {},
          {}, auto=False))

    # ---- daml.experiment -------------------------------------------------------------------------------------
    small_toml = _small_toml()
    add(S("daml.experiment.load_config", ex.load_config, lambda: dict(source=small_toml),
          {"source": {"None": lambda v: None, "int": lambda v: 3, "garbage": lambda v: "this is [not toml",
                      "huge_experiments": lambda v: v.replace("experiments = 1", "experiments = 1000000000"),
                      "negative_steps": lambda v: v.replace("steps = 20", "steps = -5"),
                      "nan_burn_in": lambda v: v.replace("burn_in = 0.05", "burn_in = nan"),
                      "unknown_method": lambda v: v.replace('"etkf"', '"no-such-filter"'),
                      "missing_file": lambda v: Path_missing()}}, aliases={"source": ("config",)}))
    add(S("daml.experiment.run_experiment", lambda exp: ex.run_experiment(exp, progress=False)[0],
          lambda: dict(exp=ex.load_config(small_toml)), {"exp": "obj"}, auto=False))
    add(S("daml.experiment.Experiment", lambda **kw: ex.run_experiment(ex.Experiment(**kw), progress=False)[0],
          lambda: {k: getattr(ex.load_config(small_toml), k) for k in
                   ("name", "steps", "burn_in", "experiments", "seed", "model", "observations", "prior", "methods")},
          {"steps": "int", "burn_in": "prob", "experiments": "int", "seed": "seed", "model": "obj",
           "methods": "obj"}, auto=False))
    add(S("daml.experiment.Score", lambda: ex.run_experiment(ex.load_config(small_toml), progress=False)[1],
          lambda: {}, {}, auto=False))

    add(S("daml.experiment.run_experiments", lambda experiments: ex.run_experiments(experiments, progress=False)[0][0],
          lambda: dict(experiments=[ex.load_config(small_toml)]), {"experiments": "obj"}, auto=False))

    # ---- daml.distributed (the calls that need a cluster use one in-process LocalCluster; heavy) ----------------
    import daml.distributed as DI

    def grid_da():
        r = ring(30, 6)
        return dict(forecast=xr.DataArray(r["x"].numpy(), dims=("member", "variable"), name="x"),
                    y=xr.DataArray(r["y"].numpy(), dims=("variable",)))

    add(S("daml.distributed.local_analysis", DI.local_analysis, lambda: dict(**grid_da(), variance=0.5, radius=2.0),
          {"forecast": "obj", "y": "obj", "variance": "real", "radius": "real", "method": "choice"}, auto=False))
    def dask_client():
        # one in-process cluster (threads, no worker processes) for the heavy specs that need a client
        if "dask_client" not in _CACHE:
            import atexit

            _CACHE["dask_client"] = DI.connect("local:1", processes=False)
            atexit.register(_CACHE["dask_client"].close)
        return _CACHE["dask_client"]

    def connect_and_close(scheduler):
        client = DI.connect(scheduler, processes=False)
        try:
            return DI.workers(client)
        finally:
            client.close()

    add(S("daml.distributed.connect", _target(connect_and_close, DI.connect), lambda: dict(scheduler="local:1"),
          {"scheduler": {"None": lambda v: None, "int": lambda v: 3, "empty": lambda v: "", "zero": lambda v: "local:0",
                         "not_a_count": lambda v: "local:x", "no_file": lambda v: "no-such-scheduler.json"}},
          auto=False, heavy=True))
    add(S("daml.distributed.check_client", lambda client: DI.check_client(client) is client,
          lambda: dict(client=dask_client()), {"client": "obj"}, auto=False, heavy=True))
    add(S("daml.distributed.workers", DI.workers, lambda: dict(client=dask_client()), {"client": "obj"},
          auto=False, heavy=True))

    def dfit_base():
        return dict(**fit_base(), client=dask_client())

    add(S("daml.distributed.fit", lambda **kw: E.flat_params(DI.fit(**kw)), dfit_base,
          {"client": "obj", "members": "int", "block": "int", "threads": "int"}, auto=False, heavy=True))
    add(S("daml.distributed.member_blocks", DI.member_blocks, lambda: dict(members=10, block=3),
          {"members": "int", "block": "int"}, auto=False))

    # ---- daml.report -----------------------------------------------------------------------------------------
    import daml.report as rp

    def small_scores():
        if "scores" not in _CACHE:
            exp = ex.load_config(small_toml)
            _CACHE["scores"] = (exp, ex.run_experiment(exp, progress=False)[1])
        return _CACHE["scores"]

    add(S("daml.report.labels", rp.labels,
          lambda: dict(methods=[{"name": "etkf", "inflation": 1.02}, {"name": "etkf", "inflation": 1.04}]),
          {"methods": {"None": lambda v: None, "str": lambda v: "x", "int": lambda v: 3, "empty": lambda v: [],
                       "no_name": lambda v: [{"inflation": 1.0}], "nested_str": lambda v: ["etkf"]}}, auto=False))
    add(S("daml.report.lost_truth", rp.lost_truth, lambda: dict(scores=small_scores()[1]),
          {"scores": "obj", "spread_factor": "real"}, auto=False))
    add(S("daml.report.format_table", rp.format_table,
          lambda: dict(exp=small_scores()[0], scores=small_scores()[1]), {"exp": "obj", "scores": "obj"},
          auto=False))
    add(S("daml.report.figure", lambda **kw: str(rp.figure(**kw)),
          lambda: dict(exp=small_scores()[0], scores=small_scores()[1], out=os.path.join(_tmpdir(), "report.png")),
          {"exp": "obj", "scores": "obj", "out": "path", "rank_bins": "int"}, auto=False, heavy=True))

    # ---- daml.errors -----------------------------------------------------------------------------------------
    add(S("daml.errors.check_int", er.check_int, lambda: dict(value=3, name="n"), {"value": "int"}, auto=False,
          aliases={"value": ("n",)}))
    add(S("daml.errors.check_real", er.check_real, lambda: dict(value=0.5, name="x"), {"value": "real"}, auto=False,
          aliases={"value": ("x",)}))
    for cname in ("InputError", "ShapeError", "NonFiniteError", "DtypeError", "DeviceError", "SeedError",
                  "PosteriorError", "ModuleError"):
        cls = getattr(er, cname)
        add(S(f"daml.errors.{cname}", lambda _c=cls, **kw: str(_c(**kw)),
              lambda: dict(argument="x", expected="a number", got="'a'"), {}, auto=False))
    add(S("daml.errors.DivergenceError", lambda **kw: str(er.DivergenceError(**kw)), lambda: dict(message="m", step=3),
          {}, auto=False))
    if hasattr(er, "check_fits"):
        add(S("daml.errors.check_fits", er.check_fits, lambda: dict(name="members", nbytes=1000.0),
              {"nbytes": {**REAL, "huge": lambda v: float(HUGE) ** 2}}, auto=False, aliases={"nbytes": ("members",)}))
    if hasattr(er, "available_memory"):
        add(S("daml.errors.available_memory", er.available_memory, lambda: {}, {}, auto=False))
    for spec in specs:
        if spec.name in HEAVY or (spec.name.startswith("daml.ensembles.") and spec.name not in
                                  ("daml.ensembles.mlp", "daml.ensembles.prior_sd")):
            spec.heavy = True
    return specs


# slow calls (training, first use of torch.func / arviz / dynamo, whole experiments): their mutations run in
# benchmarks/fuzz_report.py and in the slow test, not in the default suite
HEAVY = {"daml.posterior.PosteriorAccessor.to_arviz", "daml.io.to_arviz", "daml.models.tangent_linear",
         "daml.filters.ekf", "daml.filters.extended_kalman_filter", "daml.diagnostics.energy_score",
         "daml.causal.MLPRegressor", "daml.causal.MLPRegressor.fit", "daml.causal.plr", "daml.causal.summary",
         "daml.causal.cross_fit", "daml.experiment.run_experiment", "daml.experiment.run_experiments",
         "daml.experiment.Experiment",
         "daml.experiment.Score", "daml.filters.etpf", "daml.filters.letpf", "daml.filters.diffusion",
         "daml.filters.ensf", "daml.diffusion.diffusion", "daml.diffusion.ensf", "daml.diffusion.analysis",
         "daml.causal.default_learner", "daml.causal.default_boosting", "daml.causal.default_final"}


def warm_up(heavy: bool = True) -> None:
    """Import what the first calls would import and build the cached fixtures, outside any time guard
    (an alarm inside an import would leave a half-imported module behind)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    if heavy:
        import arviz  # noqa: F401
        import torch._dynamo  # noqa: F401
        small_ensemble()
        site_frame()


# --------------------------------------------------------------------------------------------------
# small files
# --------------------------------------------------------------------------------------------------

def _tmpdir() -> str:
    if "tmp" not in _CACHE:
        _CACHE["tmp"] = tempfile.mkdtemp(prefix="daml-fuzz-")
    return _CACHE["tmp"]


def _saved_posterior() -> str:
    import daml
    path = os.path.join(_tmpdir(), "saved.nc")
    if not os.path.exists(path):
        daml.to_netcdf(post(), path)
    return path


def _corrupt_file() -> str:
    path = os.path.join(_tmpdir(), "corrupt.nc")
    with open(path, "wb") as fh:
        fh.write(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


def _text_file() -> str:
    path = os.path.join(_tmpdir(), "text.nc")
    with open(path, "w") as fh:
        fh.write("hello, not a netCDF file\n")
    return path


def Path_missing() -> str:  # noqa: N802
    return os.path.join(_tmpdir(), "no-such-config.toml")


def _lin():
    from sklearn.linear_model import LinearRegression
    return LinearRegression()


def _mlp_xy():
    r = _rng(9)
    x = r.normal(size=(30, 2))
    return x, x[:, 0] - x[:, 1] + 0.1 * r.normal(size=30)


def _site_csv(text: bool = False, semicolon: bool = False) -> str:
    from daml import causal
    key = f"csv-{text}-{semicolon}"
    if key not in _CACHE:
        path = os.path.join(_tmpdir(), f"{key}.csv")
        site = causal.synthetic_site(years=1, seed=0).isel(time=slice(0, 48 * 20))
        causal.to_fluxnet_csv(site, path)
        if text or semicolon:
            import pandas as pd
            df = pd.read_csv(path)
            if text:
                df[df.columns[2]] = df[df.columns[2]].astype(object)
                df.iloc[3, 2] = "n/a-text"
                df.to_csv(path, index=False)
            else:
                df.to_csv(path, index=False, sep=";", decimal=",")
        _CACHE[key] = path
    return _CACHE[key]


def _small_toml() -> str:
    return """
[experiment]
name = "fuzz"
steps = 20
burn_in = 0.05
experiments = 1
seed = 0

[model]
name = "lorenz63"

[observations]
kind = "all"
every = 1
sd = 1.0

[prior]
cov = 1.0

[[methods]]
name = "etkf"
members = 4
"""


# --------------------------------------------------------------------------------------------------
# coverage of the __all__ lists
# --------------------------------------------------------------------------------------------------

_CONSTANTS = {
    "daml.posterior": ["MEMBER", "LOG_WEIGHT", "REQUIRED_ATTRS"], "daml.diagnostics": ["TIME"],
    "daml.diffusion": ["FORCINGS", "SAMPLERS", "ENSF_CLIP", "DIVERGENCE_FACTOR"], "daml.ensembles": ["LIKELIHOODS", "ESTIMATORS", "SOURCES",
                                                                     "VARIANCE_PARTS"],
    "daml.report": ["MAX_LABEL", "WIDTH", "SPREAD_FACTOR", "ABBREVIATIONS"],
    "daml.causal": ["AGGREGATIONS", "SCORES", "BOOTSTRAP_WEIGHTS", "LEARNERS", "DEFAULT_CONTROLS",
                    "DEFAULT_MODIFIERS", "FLUXNET_REQUIRED"],
}
NOT_CALLABLE = {
    "daml.__version__": "a version string",
    **{f"daml.{m}": "a module (its __all__ is covered name by name)"
       for m in ("errors", "posterior", "resampling", "diagnostics", "io", "models", "filters", "transport",
                 "diffusion", "ensembles", "learning", "smoothing")},
    **{f"{mod}.{n}": "a constant" for mod, names in _CONSTANTS.items() for n in names},
    "daml.resampling.METHODS": "a registry dict (its functions are covered by name)",
    "daml.resampling.DIFFERENTIABLE": "a tuple of names (covered through differentiable)",
    "daml.resampling.Resampled": "a result NamedTuple (built by the differentiable resamplers)",
    "daml.models.MODELS": "a registry dict (covered through make_model)",
    "daml.models.MixtureParams": "a result NamedTuple (built by GaussianMixtureNet.forward)",
    "daml.filters.Proposal": "a typing.Protocol (the interface MixtureProposal implements)",
    "daml.filters.Evidence": "a result NamedTuple (built by log_evidence)",
    "daml.learning.FitReport": "a result NamedTuple (built by fit_state_space)",
    "daml.learning.GROUPS": "a tuple of names (covered through fit_state_space's learn)",
    "daml.smoothing.Smoothed": "a result NamedTuple (built by message_passing)",
    "daml.smoothing.GaussianSmoothed": "a result NamedTuple (built by extended_kalman_smoother)",
    "daml.smoothing.HybridResult": "a result NamedTuple (built by HybridSmoother.forward)",
    "daml.smoothing.HybridFit": "a result NamedTuple (built by fit_hybrid)",
    "daml.smoothing.HeldOutWeights": "a result NamedTuple (built by held_out_weights)",
    "daml.io.NETWORKS": "a registry dict (covered through save_network / load_network)",
    "daml.models.mechanics.METHODS": "a tuple of names (covered through step's method)",
    "daml.models.mechanics.SYSTEMS": "a registry dict (covered through make_mechanical)",
    "daml.models.mechanics.Trajectory": "a result NamedTuple (built by integrate)",
    "daml.models.hamiltonian.FitResult": "a result NamedTuple (built by fit_derivatives / fit_trajectories)",
    "daml.models.hamiltonian.IllConditionedWarning": "a warning class",
    "daml.models.hamiltonian.ACTIVATIONS": "a registry dict (covered through the networks' activation)",
    "daml.models.hamiltonian.INITS": "a tuple of names (covered through the networks' init)",
    "daml.models.hamiltonian.SOLVERS": "a tuple of names (covered through LagrangianNet's solver)",
    "daml.models.hamiltonian.LOSSES": "a tuple of names (covered through fit_derivatives' loss)",
    "daml.models.mechanics_data.MechanicsData": "a result NamedTuple (built by the greydanus_* data sets)",
    "daml.models.mechanics_data.EnergyMSE": "a result NamedTuple (built by energy_mse)",
    "daml.models.mechanics_data.EnergyError": "a result NamedTuple (built by cranmer_energy_error)",
    "daml.models.mechanics_data.DOUBLE_PENDULUM_MAX_POTENTIAL": "a constant",
    "daml.filters.REGISTRY": "a registry dict (every entry is run as daml.filters.<entry name>)",
    "daml.diffusion.SCHEDULES": "a registry dict (covered through make_schedule and the classes)",
    "daml.experiment.DEFAULT_CONFIG": "a TOML string",
    "daml.distributed.LOCAL_METHODS": "a tuple of names (covered through local_analysis's method)",
    "daml.errors.DamlError": "an exception base class with no arguments of its own",
    "daml.errors.ConvergenceWarning": "a warning class",
    "daml.errors.DroppedRowsWarning": "a warning class",
    "daml.errors.PaddingWarning": "a warning class",
    "daml.diagnostics.PSISResult": "a result NamedTuple (built by psis)",
    "daml.diagnostics.FlatnessResult": "a result NamedTuple (built by rank_histogram_flatness)",
    "daml.transport.SinkhornResult": "a result NamedTuple (built by sinkhorn)",
    "daml.transport.TransformResult": "a result NamedTuple (built by ensemble_transform)",
    "daml.posterior.PosteriorAccessor": "the .daml accessor: every method is covered as PosteriorAccessor.<method>",
}


def public_names() -> list[tuple[str, str]]:
    out = []
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for n in getattr(mod, "__all__", []):
            out.append((modname, n))
    return out


def uncovered(specs: list[Spec]) -> list[str]:
    """``module.name`` of every public name with neither a spec nor a NOT_CALLABLE reason.

    A re-export (``daml.from_members`` is ``daml.posterior.from_members``) is covered by its original.
    """
    have = {s.name.split("[")[0] for s in specs}
    names = public_names()
    objects = {}
    for modname, n in names:
        objects.setdefault(id(getattr(importlib.import_module(modname), n)), set()).add(f"{modname}.{n}")
    missing = []
    for modname, n in names:
        full = f"{modname}.{n}"
        aliases = objects[id(getattr(importlib.import_module(modname), n))]
        if any(a in NOT_CALLABLE or a in have for a in aliases):
            continue
        missing.append(full)
    return missing


# --------------------------------------------------------------------------------------------------
# still failing when this list was last regenerated (benchmarks/fuzz_report.py --known)
# --------------------------------------------------------------------------------------------------

# Wrong finite answers found by the property tests (tests/test_properties.py), each with a check that is
# True once the answer is right; test_known_wrong_answers_are_still_wrong fails when one is fixed.
def _ess_equal_large():
    from daml.diagnostics import ess_kernel
    return abs(float(ess_kernel(torch.tensor([1e17, 1e17], dtype=torch.float64))) - 2.0) < 1e-9


def _normalise_large():
    from daml.posterior import normalise_log_weight
    lw = normalise_log_weight(torch.tensor([1e17, 1e17], dtype=torch.float64))
    return abs(float(torch.logsumexp(lw, -1))) < 1e-12


def _periodic_pd():
    from daml.models import periodic_covariance
    return float(torch.linalg.eigvalsh(periodic_covariance(4, 1.0, 1.0, dtype=torch.float64)).min()) > 0


def _refuses(thunk: Callable[[], Any]) -> bool:
    """True if ``thunk`` raises a daml error (the right answer to an invalid input)."""
    from daml.errors import DamlError
    try:
        thunk()
    except DamlError:
        return True
    except Exception:  # noqa: BLE001 - another library's error is not right either
        return False
    return False


def _f64(a):
    return torch.tensor(a, dtype=torch.float64)


def _non_pd_2():
    return _f64([[1.0, 2.0], [2.0, 1.0]])


# Wrong finite answers that the hunt found by hand (issue 26, item 5), each with an oracle check that is
# True when the answer is right. All are fixed; tests/test_properties.py keeps them fixed.
FIXED_WRONG: dict[tuple[str, str], tuple[str, Callable[[], bool]]] = {
    ("daml.filters.gaspari_cohn", "distance=nan"): (
        "gaspari_cohn([nan], 2.0) = [0.]: a NaN distance becomes a zero taper",
        lambda: _refuses(lambda: __import__("daml.filters").filters.gaspari_cohn(_f64([math.nan]), 2.0))),
    ("daml.filters.gaussian_members", "cov=non_pd"): (
        "gaussian_members(GaussianState(0, [[1, 2], [2, 1]])) returns sigma points of covariance [[2, 2], [2, 2]]",
        lambda: _refuses(lambda: __import__("daml.filters").filters.gaussian_members(
            __import__("daml.filters").filters.GaussianState(_f64([0.0, 0.0]), _non_pd_2())))),
    ("daml.filters.masked_observation", "noise_cov=non_pd"): (
        "masked_observation(..., noise_cov=[[1, 2], [2, 1]], ...) accepts a non-PD R",
        lambda: _refuses(lambda: __import__("daml.filters").filters.masked_observation(
            _f64([1.0, 1.0]), torch.ones(4, 2, dtype=torch.float64), _non_pd_2(), torch.ones(2, dtype=torch.bool)))),
    ("daml.filters.gaussian_loglik", "mask=nan"): (
        "gaussian_loglik(..., mask=tensor([nan, 0.5])) treats a float mask (NaN included) as all observed",
        lambda: _refuses(lambda: __import__("daml.filters").filters.gaussian_loglik(
            torch.ones(2, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), _f64([math.nan, 0.5])))),
    ("daml.twin.observation_steps", "steps=float"): (
        "observation_steps(5.5, 2) = [2, 4, 6]: a float step count is accepted and step 6 > 5.5 is returned",
        lambda: _refuses(lambda: __import__("daml.twin").twin.observation_steps(5.5, 2))),
    ("daml.diffusion.VPCosine", "t=negative"): (
        "VPCosine().alpha(-1.0) = 0.001, sigma2(-1.0) = 1.0: pseudo-times outside [0, 1] are accepted",
        lambda: _refuses(lambda: __import__("daml.diffusion").diffusion.VPCosine().alpha(-1.0))),
    ("daml.filters.ensemble_init", "members=negative"): (
        "ensemble_init(-1) returns an initialiser without a word (its call then fails in torch.randn)",
        lambda: _refuses(lambda: __import__("daml.filters").filters.ensemble_init(-1))),
    ("daml.models.periodic_covariance", "n=4,length=1"): (
        "periodic_covariance(4, 1.0, 1.0) has eigenvalue -0.078: exp(-d^2 / 2 l^2) of the ring's grid distance "
        "is not positive definite; the chordal distance (n/pi) sin(pi d/n) keeps it a covariance", _periodic_pd),
    ("daml.diagnostics.ess_kernel", "log_weight=large"): (
        "ess_kernel([1e17, 1e17]) = 0.5 (< 1) and ess_kernel([4.5e15] * 2) = 3.7 (> n = 2): log_weight - "
        "logsumexp(log_weight) cancels catastrophically; subtract the max first", _ess_equal_large),
    ("daml.posterior.normalise_log_weight", "log_weight=large"): (
        "normalise_log_weight([1e17, 1e17]) = [0, 0] (weights sum to 2): the same cancellation", _normalise_large),
}


# KNOWN-BEGIN (generated by benchmarks/fuzz_report.py --write-known)
KNOWN: dict[tuple[str, str], str] = {
}
# KNOWN-END
