"""Experiments written as TOML: a twin experiment and a list of methods, compared on the same truths.

An experiment file has four tables and a list of methods::

    [experiment]
    name = "lorenz96_sakov2008"
    steps = 1000          # model steps
    burn_in = 20.0        # model time excluded from the time averages
    experiments = 3       # independent truths, run as one batch
    seed = 3000

    [model]
    name = "lorenz96"     # a key of daml.models.MODELS; other keys are its parameters
    n = 40
    forcing = 8.0
    dt = 0.05

    [observations]
    kind = "all"          # "all", "every" (with k, offset) or "indices" (with indices)
    sd = 1.0              # or cov = (a variance, a list of variances or a matrix)
    every = 1             # model steps between observations
    missing = 0.0         # fraction of entries hidden (NaN)
    transform = "identity"  # or "arctan": observe arctan(H x) (strongly nonlinear, as in EnSF)

    [prior]
    x0 = "default"        # the model's default_x0(), "zeros", or a list
    cov = 0.001
    spinup = 0            # model steps to integrate the prior mean before starting

    [[methods]]
    name = "etkf"         # a key of daml.filters.REGISTRY; other keys are its parameters
    members = 24
    inflation = 1.02

Scores (DAPPER's conventions, :mod:`daml.diagnostics`): ``rmse.a`` is the time average, over analysis
times after ``burn_in``, of the spatial RMS error of the weighted mean; ``rmv.a`` the same for the
spread; ``crps`` the mean CRPS over those times and all variables. Each is computed per experiment
and the median over experiments is reported with the number of experiments. Every method sees the
same truths and observations (common random numbers). Unknown keys are refused, naming the key.

Everything is checked before anything is computed, and a bad value is refused with the key path
that holds it (``experiment.experiments``, ``methods[2].members``, ``model.n``): wrong types (a float
where an int is expected, ``experiments = 1e9``), negative or zero sizes, a ``burn_in`` that leaves no
analysis time to score (it must be below the time of the last observation), and sizes whose arrays
cannot fit in the available memory (the truths and observations, and every method's recorded
analyses, ``experiments x analyses x members x variables`` float64 values, estimated up front).
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr

from . import _device, diagnostics, io
from .errors import DamlError, DivergenceError, InputError, check_fits, check_int, check_real
from .filters import REGISTRY, make_filter, run
from .filters.climatology import climatology_from_truth
from .models import MODELS, make_model, observe_all, observe_every, observe_indices, observe_transformed
from .models.observations import TRANSFORMS
from .twin import simulate

__all__ = ["DEFAULT_CONFIG", "Experiment", "load_config", "run_experiment", "Score"]

DEFAULT_CONFIG = """
# Lorenz-96, the Sakov & Oke (2008) twin experiment as in DAPPER's mods/Lorenz96/sakov2008.py:
# 40 variables, F = 8, dt = 0.05, every variable observed every step with R = I. 1000 cycles with a
# burn-in of 20 time units, three independent truths. Expected rmse.a (DAPPER): Climatology 3.6,
# EnKF (N=40, infl 1.06) 0.22, ETKF (N=24, infl 1.02) 0.18, LETKF (N=7, loc 4, infl 1.04) 0.22,
# bootstrap PF (N=3000, NER 0.5, reg 0.7) 0.26. The equivalent-weights PF (N=24) needs a model-noise
# covariance for its proposal: here 4 times the ensemble covariance tapered with radius 4, plus a
# periodic Gaussian-shaped Q of variance 0.1 and length 1 grid point (docs/particle_filters.md).
# The bootstrap PF uses a wider jitter (1.0) than DAPPER's 0.7: from the nearly collapsed start,
# 1000 particles with 0.7 lose the truth in about half the runs, in daml as in DAPPER
# (benchmarks/particle_filters.py, part C, records the rmse of 48 such runs).
# The ensemble transform PFs (exact transport for the global one, batched Sinkhorn for the local
# one, both with the second-order correction and rejuvenation) show the same contrast as the
# particle filters: the global ETPF degenerates in 40 dimensions, the local one tracks the truth.
[experiment]
name = "lorenz96_sakov2008"
steps = 1000
burn_in = 20.0
experiments = 3
seed = 3000

[model]
name = "lorenz96"
n = 40
forcing = 8.0
dt = 0.05

[observations]
kind = "all"
sd = 1.0
every = 1

[prior]
x0 = "default"
cov = 0.001
spinup = 0

[[methods]]
name = "climatology"

[[methods]]
name = "enkf"
members = 40
inflation = 1.06

[[methods]]
name = "etkf"
members = 24
inflation = 1.02
rotate = true

[[methods]]
name = "letkf"
members = 7
radius = 4.0
inflation = 1.04
rotate = true

[[methods]]
name = "bootstrap"
members = 1000
threshold = 0.5
jitter = 1.0

[[methods]]
name = "ewpf"
members = 24
keep = 1.0
uniform = 0.35
model_noise = {variance = 0.1, length = 1.0, ensemble = 4.0, radius = 4.0}

[[methods]]
name = "etpf"
members = 100
solver = "emd"
second_order = true
rejuvenation = 0.5

[[methods]]
name = "letpf"
members = 20
radius = 2.0
second_order = true
rejuvenation = 0.5
tol = 1e-3
"""

_SECTIONS = {
    "experiment": {"name", "steps", "burn_in", "experiments", "seed"},
    "model": None,          # free: the model's parameters
    "observations": {"kind", "sd", "cov", "every", "k", "offset", "indices", "missing", "transform"},
    "prior": {"x0", "cov", "spinup"},
    "methods": None,
}


@dataclass
class Experiment:
    """A parsed experiment (see the module docstring)."""

    name: str
    steps: int
    burn_in: float
    experiments: int
    seed: int
    model: dict
    observations: dict
    prior: dict
    methods: list[dict] = field(default_factory=list)


def load_config(source: str | Path | None = None) -> Experiment:
    """Parse and check an experiment: a path to a TOML file, TOML text, or ``None`` for the default."""
    if source is None:
        text, where = DEFAULT_CONFIG, "the default experiment"
    elif isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith(".toml")):
        p = Path(source)
        try:
            text, where = p.read_text(), str(p)
        except OSError as exc:            # missing, a folder, unreadable: daml's error, naming the path
            raise InputError("config", "an existing, readable TOML file", repr(str(p)),
                             hint=f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    else:
        text, where = str(source), "the given text"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError("config", "valid TOML", f"an error in {where}", hint=str(exc)) from exc
    for key, value in raw.items():
        if key not in _SECTIONS:
            raise InputError(f"config key {key!r}", f"one of {sorted(_SECTIONS)}", key)
        allowed = _SECTIONS[key]
        if allowed is not None:
            for sub in value:
                if sub not in allowed:
                    raise InputError(f"config key '{key}.{sub}'", f"one of {sorted(allowed)}", sub)
    exp = raw.get("experiment", {})
    model = dict(raw.get("model", {}))
    if "name" not in model:
        raise InputError("config key 'model.name'", f"one of {sorted(MODELS)}", None)
    if model["name"] not in MODELS:
        raise InputError("config key 'model.name'", f"one of {sorted(MODELS)}", repr(model["name"]))
    methods = raw.get("methods", [])
    if not methods:
        raise InputError("config key 'methods'", "at least one [[methods]] entry", "none")
    for i, m in enumerate(methods):
        if "name" not in m or m["name"] not in REGISTRY:
            raise InputError(f"config key 'methods[{i}].name'", f"one of {sorted(REGISTRY)}", repr(m.get("name")))
    transform = raw.get("observations", {}).get("transform", "identity")
    if transform != "identity" and transform not in TRANSFORMS:
        raise InputError("config key 'observations.transform'", f"'identity' or one of {sorted(TRANSFORMS)}",
                         repr(transform))
    out = Experiment(
        name=str(exp.get("name", "experiment")),
        steps=_int(exp.get("steps", 1000), "experiment.steps"),
        burn_in=float(exp.get("burn_in", 0.0)),
        experiments=_int(exp.get("experiments", 1), "experiment.experiments"),
        seed=_int(exp.get("seed", 0), "experiment.seed", minimum=0),
        model=model,
        observations=dict(raw.get("observations", {"kind": "all"})),
        prior=dict(raw.get("prior", {})),
        methods=[dict(m) for m in methods],
    )
    check_experiment(out)
    return out


def _int(value: Any, key: str, minimum: int = 1) -> int:
    return check_int(value, f"config key '{key}'", minimum)


def _under(key: str, exc: InputError) -> InputError:
    """``exc`` with its argument put under the config key ``key`` (``methods[2]`` + ``members``)."""
    arg = str(exc.argument)
    if arg.startswith("config key"):
        return exc
    new = type(exc)(f"config key '{key}.{arg}'", exc.expected, exc.got, exc.hint)
    new.__cause__ = exc
    return new


def check_experiment(exp: Experiment) -> None:
    """Check an experiment before computing anything (see the module docstring): the model, the
    observations and every method are built once (cheap: nothing is allocated by ensemble size), the
    burn-in must leave at least one analysis time to score, and the arrays the run will hold must fit
    in the available memory. Raises :class:`InputError` naming the key path."""
    _check_fields(exp)
    try:
        burn_in = check_real(exp.burn_in, "burn_in", expected="a finite non-negative time")
    except InputError:
        raise InputError("config key 'experiment.burn_in'", "a finite non-negative time", repr(exp.burn_in)) from None
    if burn_in < 0:
        raise InputError("config key 'experiment.burn_in'", "a finite non-negative time", repr(exp.burn_in))
    params = {k: v for k, v in exp.model.items() if k != "name"}
    try:
        model = make_model(exp.model["name"], **params)
    except InputError as exc:
        raise _under("model", exc) from None
    n = int(model.state_size)
    obs = exp.observations
    every = _int(obs.get("every", 1), "observations.every")
    _check_memory(exp, n, n, every, methods=False)     # before building (n, n) matrices
    try:
        op = _observation(obs, n)
    except InputError as exc:
        raise _under("observations", exc) from None
    m = int(getattr(op, "size", n))
    dt = float(getattr(model, "dt", 1.0))
    last = (exp.steps // every) * every * dt          # the time of the last observation
    if exp.steps < every:
        raise InputError("config key 'experiment.steps'", f"at least one observation time (observations.every "
                         f"= {every} model steps)", exp.steps)
    if not last > burn_in:
        raise InputError("config key 'experiment.burn_in'",
                         f"a time before the last observation ({last:g} = {exp.steps // every * every} model steps "
                         f"of dt {dt:g}), so that some analyses are scored", repr(exp.burn_in),
                         hint="lower burn_in or raise experiment.steps")
    for i, method in enumerate(exp.methods):
        if method["name"] == "climatology":           # its mean and covariance come from the truth
            mem = method.get("members", 100)
            if "members" in method:
                _int(mem, f"methods[{i}].members", minimum=2)
            continue
        try:
            make_filter(method["name"], **{k: v for k, v in method.items() if k != "name"})
        except InputError as exc:
            raise _under(f"methods[{i}]", exc) from None
    _check_memory(exp, n, m, every)


def _check_fields(exp: Any) -> None:
    """The types of an :class:`Experiment`'s fields (one built in Python skips :func:`load_config`)."""
    if not isinstance(exp, Experiment):
        raise InputError("exp", "an Experiment (see daml.experiment.load_config)", type(exp).__name__)
    _int(exp.steps, "experiment.steps")
    _int(exp.experiments, "experiment.experiments")
    _int(exp.seed, "experiment.seed", minimum=0)
    for key in ("model", "observations", "prior"):
        if not isinstance(getattr(exp, key), dict):
            raise InputError(f"config key '{key}'", "a table (dict)", type(getattr(exp, key)).__name__)
    if exp.model.get("name") not in MODELS:
        raise InputError("config key 'model.name'", f"one of {sorted(MODELS)}", repr(exp.model.get("name")))
    if not isinstance(exp.methods, list) or not exp.methods:
        raise InputError("config key 'methods'", "a non-empty list of [[methods]] tables",
                         repr(exp.methods)[:80] if not isinstance(exp.methods, list) else "none")
    for i, m in enumerate(exp.methods):
        if not isinstance(m, dict) or m.get("name") not in REGISTRY:
            raise InputError(f"config key 'methods[{i}].name'", f"one of {sorted(REGISTRY)}",
                             repr(m.get("name") if isinstance(m, dict) else m)[:80])


def _check_memory(exp: Experiment, n: int, m: int, every: int, methods: bool = True) -> None:
    """Refuse sizes whose arrays cannot fit: the truths and observations with the prior covariance,
    then, cumulatively, every method's recorded analyses (each method's posterior is kept for the
    scores and the outputs). A lower bound: working copies inside the filters come on top."""
    f64 = 8.0
    times = exp.steps + 1.0
    analyses = float(exp.steps // every)
    need = f64 * (exp.experiments * times * (n + m) + float(n) * n)
    check_fits("config keys 'experiment.experiments', 'experiment.steps'", need,
               what=f"experiments={exp.experiments}, steps={exp.steps} with {n} variables")
    for i, method in enumerate(exp.methods if methods else []):
        members = method.get("members", 100 if method["name"] == "climatology" else 2 * n)
        members = members if isinstance(members, int) else 2 * n
        need += f64 * exp.experiments * analyses * members * (n + 1.0)
        check_fits(f"config key 'methods[{i}].members'", need,
                   what=f"members={members} for {exp.experiments} experiment(s) x {int(analyses)} analyses x "
                        f"{n} variables, with the truths and the methods before it")


def _observation(cfg: dict, n: int):
    kind = cfg.get("kind", "all")
    noise = {"cov": cfg["cov"]} if "cov" in cfg else {"sd": cfg.get("sd", 1.0)}
    if kind == "all":
        op = observe_all(n, **noise)
    elif kind == "every":
        op = observe_every(n, cfg.get("k", 2), offset=cfg.get("offset", 0), **noise)
    elif kind == "indices":
        op = observe_indices(n, cfg.get("indices", []), **noise)
    else:
        raise InputError("config key 'observations.kind'", "'all', 'every' or 'indices'", repr(kind))
    transform = cfg.get("transform", "identity")
    return op if transform == "identity" else observe_transformed(op, transform)


def build_data(exp: Experiment):
    """The model, the observation operator and the twin Dataset of an experiment."""
    params = {k: v for k, v in exp.model.items() if k != "name"}
    model = make_model(exp.model["name"], **params)
    op = _observation(exp.observations, model.state_size)
    x0 = exp.prior.get("x0", "default")
    if isinstance(x0, str):
        if x0 not in ("default", "zeros"):
            raise InputError("config key 'prior.x0'", "'default', 'zeros' or a list of numbers", repr(x0))
        if x0 == "default" and hasattr(model, "default_x0"):
            x0 = model.default_x0()
        else:
            x0 = torch.zeros(model.state_size)
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    spinup = _int(exp.prior.get("spinup", 0), "prior.spinup", minimum=0)
    with torch.no_grad():
        for _ in range(spinup):
            x0 = model.step(x0)
    data = simulate(model, exp.steps, op, every=exp.observations.get("every", 1), x0=x0,
                    x0_cov=exp.prior.get("cov", 0.0), missing=exp.observations.get("missing", 0.0),
                    experiments=exp.experiments, seed=exp.seed)
    return model, op, data


@dataclass
class Score:
    """Scores of one method: medians over experiments (``nan`` where it diverged); ``rmse_a_each``
    holds the rmse.a of every experiment (truth), whose median is ``rmse_a``."""

    method: str
    label: str
    rmse_a: float
    rmv_a: float
    crps: float
    cycles_per_second: float
    diverged: str = ""
    posterior: xr.Dataset | None = None
    rmse_t: xr.DataArray | None = None
    rmse_a_each: tuple[float, ...] = ()
    index: int = -1
    """Position of the method in the experiment's list (its random stream and output name follow it)."""


def _label(m: dict) -> str:
    extras = ", ".join(f"{k}={v}" for k, v in m.items() if k != "name")
    return f"{m['name']}({extras})" if extras else m["name"]


def run_experiment(exp: Experiment, progress: bool | None = None,
                   only: Sequence[str] | None = None) -> tuple[xr.Dataset, list[Score]]:
    """Run every method of ``exp`` on the same twin data; return the data and the scores.

    ``only``: run just the methods of these names. Each method keeps the random stream of its place
    in the list, so its scores are those of the full run.
    """
    _check_fields(exp)
    names = [m["name"] for m in exp.methods]
    if only is not None:
        only = [only] if isinstance(only, str) else list(only)
        unknown = [o for o in only if o not in names]
        if unknown or not only:
            raise InputError("only", f"names of methods in the experiment ({', '.join(dict.fromkeys(names))})",
                             repr(unknown or only))
    check_experiment(exp)                           # also for an Experiment built in Python
    model, op, data = build_data(exp)
    scores = []
    clim = None
    seeds = _device.spawn(exp.seed, len(exp.methods))       # one independent stream per method
    for index, (m, method_seed) in enumerate(zip(exp.methods, seeds)):
        if only is not None and m["name"] not in only:
            continue
        params = {k: v for k, v in m.items() if k != "name"}
        if m["name"] == "climatology":
            clim = clim or climatology_from_truth(data["truth"].values)
            params = {"mean": clim[0], "cov": clim[1], **params}
        try:
            filt = make_filter(m["name"], **params)
            res = run(filt, model, data, operator=op, seed=method_seed, progress=progress)
        except DivergenceError as err:
            scores.append(Score(m["name"], _label(m), math.nan, math.nan, math.nan, math.nan,
                                diverged=f"step {err.step}", index=index))
            continue
        post = res.analysis
        keep = post.sel(time=post["time"] > exp.burn_in)       # not empty: check_experiment
        truth = data["truth"]
        r = diagnostics.rmse(keep, truth)           # (time, experiment)
        s = diagnostics.spread(keep)
        c = _chunked_crps(keep, truth)
        per_exp = [d for d in r.dims if d != "time"]
        per_truth = r.mean("time")
        scores.append(Score(
            m["name"], _label(m),
            rmse_a=float(per_truth.median() if per_exp else per_truth),
            rmv_a=float(s.mean("time").median() if per_exp else s.mean("time")),
            crps=float(c.mean([d for d in c.dims if d not in per_exp]).median()),
            cycles_per_second=float(post.attrs["cycles_per_second"]),
            posterior=post, rmse_t=diagnostics.rmse(post, truth),
            rmse_a_each=tuple(float(v) for v in np.ravel(per_truth.values)), index=index,
        ))
    return data, scores


def _chunked_crps(post: xr.Dataset, truth: xr.DataArray, cells: int = 2_000_000) -> xr.DataArray:
    """:func:`daml.diagnostics.crps` over blocks of times of at most about ``cells`` member values
    each (its sorting works on copies of the members: thousands of members over all times at once
    would need tens of GB), concatenated along time; the same values as in one call."""
    per_time = max(1, int(np.prod([n for d, n in post["x"].sizes.items() if d != "time"])))
    step = max(1, cells // per_time)
    if post.sizes["time"] <= step:
        return diagnostics.crps(post, truth)
    parts = [diagnostics.crps(post.isel(time=slice(i, i + step)), truth)
             for i in range(0, post.sizes["time"], step)]
    return xr.concat(parts, dim="time")


def format_table(exp: Experiment, scores: list[Score]) -> str:
    """The comparison as a text table."""
    width = max(len(s.label) for s in scores)
    lines = [f"{exp.name}: {exp.experiments} experiment(s), {exp.steps} model steps, burn-in {exp.burn_in} "
             f"(medians over experiments)",
             f"{'method':<{width}}  {'rmse.a':>7}  {'rmv.a':>7}  {'crps':>7}  {'cycles/s':>9}"]
    for s in scores:
        if s.diverged:
            lines.append(f"{s.label:<{width}}  diverged at {s.diverged}")
        else:
            lines.append(f"{s.label:<{width}}  {s.rmse_a:>7.3f}  {s.rmv_a:>7.3f}  {s.crps:>7.3f}  "
                         f"{s.cycles_per_second:>9.0f}")
    return "\n".join(lines)


def write_outputs(exp: Experiment, data: xr.Dataset, scores: list[Score], out: Path) -> list[Path]:
    """Posteriors (netCDF), the score table (JSON) and a figure (PNG, if matplotlib is installed)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    names = [m["name"] for m in exp.methods]
    for k, s in enumerate(scores):
        if s.posterior is not None:
            # a method listed more than once (with other parameters) gets its place among them in the
            # experiment's list as a suffix, so no posterior overwrites another: diffusion-1.nc,
            # diffusion-2.nc (the same names when only some methods were run)
            at = s.index if 0 <= s.index < len(names) else k
            place = names[:at + 1].count(s.method)
            tag = s.method if names.count(s.method) <= 1 else f"{s.method}-{place}"
            path = out / f"{exp.name}_{tag}.nc"
            io.to_netcdf(s.posterior, path)
            written.append(path)
    table = [{"method": s.label, "rmse_a": s.rmse_a, "rmv_a": s.rmv_a, "crps": s.crps,
              "cycles_per_second": s.cycles_per_second, "diverged": s.diverged,
              "rmse_a_per_experiment": list(s.rmse_a_each)} for s in scores]
    with io.atomic_write_path(out / f"{exp.name}_scores.json", suffix=".json") as tmp:
        tmp.write_text(json.dumps({"experiment": exp.name, "scores": table}, indent=2, allow_nan=True))
    written.append(out / f"{exp.name}_scores.json")
    fig_path = _figure(exp, data, scores, out)
    if fig_path is not None:
        written.append(fig_path)
    return written


def _figure(exp: Experiment, data: xr.Dataset, scores: list[Score], out: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in scores if s.posterior is not None]
    fig, axes = plt.subplots(1, 1 + len(ok), figsize=(4.5 + 3.2 * len(ok), 3.6), squeeze=False)
    ax = axes[0, 0]
    for s in ok:
        r = s.rmse_t
        r = r.median([d for d in r.dims if d != "time"]) if r.ndim > 1 else r
        ax.plot(r["time"], r, lw=0.8, label=s.method)
    ax.set(yscale="log", xlabel="time", ylabel="RMSE of the mean", title="analysis RMSE")
    ax.axvline(exp.burn_in, color="k", lw=0.6, ls=":")
    ax.legend(fontsize=7)
    for ax, s in zip(axes[0, 1:], ok):
        post = s.posterior.sel(time=s.posterior["time"] > exp.burn_in)
        post = post.isel(time=slice(None, None, 5))       # thin: consecutive analyses are correlated
        hist = diagnostics.rank_histogram(post, data["truth"])   # N + 1 bins: no aliasing of equal weights
        ax.bar(hist["rank"], hist / hist.sum() * hist.sizes["rank"], width=1.0, color="C0")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(title=f"{s.method}: rank histogram", xlabel="rank (weighted PIT bin)", ylabel="density")
    fig.tight_layout()
    return io.save_figure(fig, out / f"{exp.name}.png", dpi=110)
