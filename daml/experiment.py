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

    [output]              # optional: what the result files hold (docs/cli.md)
    keep = "auto"         # "members", "summary", or "auto": members when they fit in MEMBERS_BUDGET
    thin = 1              # record every thin-th analysis
    dtype = "float64"     # or "float32" (storage only; the scores use the computed values)
    compression = 1       # zlib level 0-9 of the netCDF files (0: none)

    [[methods]]
    name = "etkf"         # a key of daml.filters.REGISTRY; other keys are its parameters
    members = 24
    inflation = 1.02
    note = "..."          # optional: why this row is there (for example to show a failure)
    model = {name = "lorenz96", n = 40, forcing = 7.5, dt = 0.05}   # optional: a forecast model of
                          # its own (a mis-specified or learned one); the truth keeps [model]

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

import math
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import xarray as xr

from . import _device, diagnostics, io, report
from .errors import DivergenceError, InputError, check_fits, check_int, check_real
from .filters import REGISTRY, make_filter, run, summary_scores
from .filters.climatology import climatology_from_truth
from .models import MODELS, make_model, observe_all, observe_every, observe_indices, observe_transformed
from .models.observations import TRANSFORMS
from .posterior import MEMBER
from .twin import simulate

__all__ = ["DEFAULT_CONFIG", "Experiment", "load_config", "run_experiment", "run_experiments", "Score"]

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
note = "shown as a failure: one global transport of 100 particles degenerates in 40 dimensions (rmse.a above climatology's); letpf below is the working, local version"
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
    "output": {"keep", "thin", "dtype", "compression"},
    "methods": None,
}

RESERVED_METHOD_KEYS = ("name", "note", "model")
"""Keys of a ``[[methods]]`` table that are not the method's parameters: ``name`` picks the method,
``note`` (a string) explains why the row is there (for example to show a failure), ``model`` (a table
like ``[model]``) gives the method a forecast model of its own (see :func:`method_model`)."""

MEMBERS_BUDGET = 16 * 2**20
"""``keep = "auto"`` records a method's members when their values (``experiments x recorded analyses
x members x (variables + 1)`` at the storage dtype) take at most this many bytes (16 MiB), and
summary statistics otherwise (docs/cli.md)."""

OUTPUT_DEFAULTS = {"keep": "auto", "thin": 1, "dtype": "float64", "compression": 1}
"""The ``[output]`` table's defaults."""

QUANTILES = (0.05, 0.5, 0.95)
"""Quantiles recorded in a summary."""


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
    output: dict = field(default_factory=dict)


def load_config(source: str | Path | None = None) -> Experiment:
    """Parse and check an experiment: a path to a TOML file, TOML text, or ``None`` for the default.

    Raises
    ------
    InputError
        Naming the config key path (``methods[2].members``, ``output.keep``) of the first bad value,
        or ``config`` for a missing or unreadable file and for invalid TOML.
    """
    if source is None:
        text, where = DEFAULT_CONFIG, "the default experiment"
    elif isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith(".toml")):
        p = Path(source)
        try:
            text, where = p.read_text(), str(p)
        except (OSError, UnicodeDecodeError) as exc:   # missing, a folder, unreadable: naming the path
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise InputError("config", "an existing, readable TOML file", repr(str(p)),
                             hint=f"{type(exc).__name__}: {why}") from exc
    else:
        text, where = str(source), "the given text"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError("config", "valid TOML", f"an error in {where}", hint=str(exc)) from exc
    for key, value in raw.items():
        if key not in _SECTIONS:
            raise InputError(f"config key {key!r}", f"one of {sorted(_SECTIONS)}", key)
        if key == "methods":
            if not isinstance(value, list):
                raise InputError("config key 'methods'", "a list of [[methods]] tables", type(value).__name__)
            continue
        if not isinstance(value, dict):
            raise InputError(f"config key '{key}'", f"a table [{key}]", f"{type(value).__name__} {value!r}"[:80])
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
        if not isinstance(m, dict):
            raise InputError(f"config key 'methods[{i}]'", "a [[methods]] table", repr(m)[:80])
        if "name" not in m or m["name"] not in REGISTRY:
            raise InputError(f"config key 'methods[{i}].name'", f"one of {sorted(REGISTRY)}", repr(m.get("name")))
    transform = raw.get("observations", {}).get("transform", "identity")
    if transform != "identity" and transform not in TRANSFORMS:
        raise InputError("config key 'observations.transform'", f"'identity' or one of {sorted(TRANSFORMS)}",
                         repr(transform))
    name = exp.get("name", "experiment")
    if not isinstance(name, str):
        raise InputError("config key 'experiment.name'", "a string (the output files' prefix)", repr(name)[:80])
    burn_in = exp.get("burn_in", 0.0)
    try:
        burn_in = check_real(burn_in, "burn_in", expected="a finite non-negative time")
    except InputError:
        raise InputError("config key 'experiment.burn_in'", "a finite non-negative time", repr(burn_in)) from None
    out = Experiment(
        name=name,
        steps=_int(exp.get("steps", 1000), "experiment.steps"),
        burn_in=burn_in,
        experiments=_int(exp.get("experiments", 1), "experiment.experiments"),
        seed=_int(exp.get("seed", 0), "experiment.seed", minimum=0),
        model=model,
        observations=dict(raw.get("observations", {"kind": "all"})),
        prior=dict(raw.get("prior", {})),
        methods=[dict(m) for m in methods],
        output=dict(raw.get("output", {})),
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


def output_settings(exp: Experiment) -> dict:
    """The ``[output]`` table of ``exp`` checked and completed with :data:`OUTPUT_DEFAULTS`.

    Raises
    ------
    InputError
        Naming ``output.<key>``: ``keep`` not one of ``"auto"``, ``"members"``, ``"summary"``; ``thin``
        not an int >= 1; ``dtype`` not ``"float64"`` or ``"float32"``; ``compression`` not an int in
        0..9; an unknown key.
    """
    _check_fields(exp)
    given = exp.output
    for key in given:
        if key not in OUTPUT_DEFAULTS:
            raise InputError(f"config key 'output.{key}'", f"one of {sorted(OUTPUT_DEFAULTS)}", key)
    cfg = {**OUTPUT_DEFAULTS, **given}
    if cfg["keep"] not in ("auto", "members", "summary"):
        raise InputError("config key 'output.keep'", "'auto', 'members' or 'summary'", repr(cfg["keep"])[:80])
    cfg["thin"] = _int(cfg["thin"], "output.thin")
    if cfg["dtype"] not in ("float64", "float32"):
        raise InputError("config key 'output.dtype'", "'float64' or 'float32'", repr(cfg["dtype"])[:80])
    level = cfg["compression"]
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise InputError("config key 'output.compression'", "an int from 0 (none) to 9 (zlib level)",
                         repr(level)[:80])
    return cfg


def _params(method: dict) -> dict:
    """A method table's parameters: every key but the reserved ones (``name``, ``note``)."""
    return {k: v for k, v in method.items() if k not in RESERVED_METHOD_KEYS}


def check_experiment(exp: Experiment) -> None:
    """Check an experiment before computing anything (see the module docstring): the model, the
    observations, the prior (one cheap simulated step) and every method are built once (nothing is
    allocated by ensemble size), the burn-in must leave at least one analysis time to score, the
    ``[output]`` table and the methods' ``note`` are checked, and the arrays the run will hold must fit
    in the available memory. Raises :class:`InputError` naming the key path."""
    _check_fields(exp)
    try:
        burn_in = check_real(exp.burn_in, "burn_in", expected="a finite non-negative time")
    except InputError:
        raise InputError("config key 'experiment.burn_in'", "a finite non-negative time", repr(exp.burn_in)) from None
    if burn_in < 0:
        raise InputError("config key 'experiment.burn_in'", "a finite non-negative time", repr(exp.burn_in))
    if not isinstance(exp.name, str) or not exp.name or "/" in exp.name or "\\" in exp.name or exp.name.startswith("."):
        raise InputError("config key 'experiment.name'", "a non-empty string without '/' (the output files' prefix)",
                         repr(exp.name)[:80])
    output_settings(exp)
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
    _check_prior(exp, model, op, every)
    for i, method in enumerate(exp.methods):
        note = method.get("note", "")
        if not isinstance(note, str):
            raise InputError(f"config key 'methods[{i}].note'", "a string (why this row is there)", repr(note)[:80])
        if method["name"] == "climatology":           # its mean and covariance come from the truth
            mem = method.get("members", 100)
            if "members" in method:
                _int(mem, f"methods[{i}].members", minimum=2)
            unknown = sorted(set(_params(method)) - {"members", "inflation"})
            if unknown:
                raise InputError(f"config key 'methods[{i}].{unknown[0]}'", "members or inflation (climatology "
                                 "takes its mean and covariance from the truth)", unknown[0])
            if "inflation" in method:
                try:
                    make_filter("climatology", mean=torch.zeros(n, dtype=torch.float64),
                                cov=torch.eye(n, dtype=torch.float64), **_params(method))
                except InputError as exc:
                    raise _under(f"methods[{i}]", exc) from None
            continue
        try:
            make_filter(method["name"], **_params(method))
        except InputError as exc:
            raise _under(f"methods[{i}]", exc) from None
        method_model(exp, i, model)
    _check_memory(exp, n, m, every)


def method_model(exp: Experiment, index: int, model: Any) -> Any:
    """The forecast model of method ``index``: ``model`` (the truth's, built from ``[model]``) unless the
    method's table has a ``model`` table of its own (same keys as ``[model]``), for example a learned
    network run against the true dynamics::

        [model]
        name = "pendulum"
        dt = 0.1

        [[methods]]
        name = "etkf"
        members = 20
        model = {name = "hamiltonian_net", file = "pendulum_hnn.pt", dt = 0.1}

    The method's model must have the truth's state size and time step (the filter cycles on the
    truth's observation times).

    Raises
    ------
    InputError
        Naming ``methods[i].model`` (not a table, no or an unknown ``name``, another state size or time
        step) or ``methods[i].model.<key>`` for a parameter the model refuses.
    """
    spec = exp.methods[index].get("model")
    if spec is None:
        return model
    key = f"methods[{index}].model"
    if not isinstance(spec, dict):
        raise InputError(f"config key '{key}'", "a table like [model] (name and parameters)",
                         f"{type(spec).__name__} {spec!r}"[:80])
    if spec.get("name") not in MODELS:
        raise InputError(f"config key '{key}.name'", f"one of {sorted(MODELS)}", repr(spec.get("name"))[:80])
    try:
        own = make_model(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    except InputError as exc:
        raise _under(key, exc) from None
    if int(own.state_size) != int(model.state_size):
        raise InputError(f"config key '{key}'", f"a model with the truth's state size {model.state_size}",
                         f"state size {own.state_size}")
    dt, own_dt = float(getattr(model, "dt", 1.0)), float(getattr(own, "dt", 1.0))
    if not math.isclose(dt, own_dt, rel_tol=1e-12):
        raise InputError(f"config key '{key}.dt'", f"the truth's time step {dt:g}", f"{own_dt:g}")
    return own


def _check_prior(exp: Experiment, model: Any, op: Any, every: int) -> None:
    """The prior and the observation options through one simulated observation of one truth (cheap),
    their errors named by config key."""
    names = {"x0": "prior.x0", "x0_cov": "prior.cov", "missing": "observations.missing",
             "every": "observations.every", "spinup": "prior.spinup"}
    try:
        x0 = _prior_x0(exp, model)
        simulate(model, every, op, every=every, x0=x0, x0_cov=exp.prior.get("cov", 0.0),
                 missing=exp.observations.get("missing", 0.0), experiments=1, seed=0)
    except InputError as exc:
        arg = str(exc.argument)
        if arg.startswith("config key"):
            raise
        key = names.get(arg.split("[")[0].split(" ")[0], f"prior ({arg})")
        new = type(exc)(f"config key '{key}'", exc.expected, exc.got, exc.hint)
        raise new from None


def _check_fields(exp: Any) -> None:
    """The types of an :class:`Experiment`'s fields (one built in Python skips :func:`load_config`)."""
    if not isinstance(exp, Experiment):
        raise InputError("exp", "an Experiment (see daml.experiment.load_config)", type(exp).__name__)
    _int(exp.steps, "experiment.steps")
    _int(exp.experiments, "experiment.experiments")
    _int(exp.seed, "experiment.seed", minimum=0)
    for key in ("model", "observations", "prior", "output"):
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


def _members_of(method: dict, n: int) -> int:
    members = method.get("members", 100 if method["name"] == "climatology" else 2 * n)
    return members if isinstance(members, int) and not isinstance(members, bool) else 2 * n


def output_plan(exp: Experiment) -> list[dict]:
    """What each method's file will hold: a list (one per method, in order) of dicts with ``keep``
    (``"members"`` or ``"summary"``, ``"auto"`` resolved with :data:`MEMBERS_BUDGET`), ``thin``,
    ``members``, ``analyses`` (recorded), ``members_bytes`` and ``summary_bytes`` (the recorded values at
    the storage dtype, before compression) and ``bytes`` (those of the chosen ``keep``).

    Raises
    ------
    InputError
        As :func:`check_experiment`.
    """
    check_experiment(exp)
    model = make_model(exp.model["name"], **{k: v for k, v in exp.model.items() if k != "name"})
    return _plan(exp, int(model.state_size), output_settings(exp))


def _plan(exp: Experiment, n: int, cfg: dict, item: int | None = None) -> list[dict]:
    """:func:`output_plan` for state size ``n`` and output settings ``cfg`` (``item``: bytes per value,
    default that of the storage dtype)."""
    every = exp.observations.get("every", 1)
    every = every if isinstance(every, int) and every >= 1 else 1
    analyses = exp.steps // every
    recorded = -(-analyses // cfg["thin"])
    store = 4 if cfg["dtype"] == "float32" else 8
    cells = float(exp.experiments) * recorded
    # a summary: mean, sd, the quantiles, crps and pit per variable, and the ESS per time
    summary = cells * (n * (2 + len(QUANTILES) + 2) + 1)
    plan = []
    for method in exp.methods:
        members = _members_of(method, n)
        full = cells * members * (n + 1.0)
        keep = cfg["keep"]
        if keep == "auto":
            keep = "members" if store * full <= MEMBERS_BUDGET else "summary"
        size = item or store
        plan.append({"keep": keep, "thin": cfg["thin"], "members": members, "analyses": recorded,
                     "members_bytes": size * full, "summary_bytes": size * summary,
                     "bytes": size * (full if keep == "members" else summary)})
    return plan


def _check_memory(exp: Experiment, n: int, m: int, every: int, methods: bool = True) -> None:
    """Refuse sizes whose arrays cannot fit: the truths and observations with the prior covariance,
    then, cumulatively, every method's recorded analyses (members or summary, as :func:`output_plan`
    decides; from Python, without ``out``, each method's result is kept for the scores and the
    outputs) in float64. A lower bound: working copies inside the filters come on top."""
    f64 = 8.0
    times = exp.steps + 1.0
    need = f64 * (exp.experiments * times * (n + m) + float(n) * n)
    check_fits("config keys 'experiment.experiments', 'experiment.steps'", need,
               what=f"experiments={exp.experiments}, steps={exp.steps} with {n} variables")
    if not methods:
        return
    plan = _plan(exp, n, output_settings(exp), item=8)
    for i, p in enumerate(plan):
        need += p["bytes"]
        # while it runs: the ensemble and one working copy of it (one method runs at a time)
        working = 2 * f64 * exp.experiments * p["members"] * (n + 1.0)
        check_fits(f"config key 'methods[{i}].members'", need + working,
                   what=f"members={p['members']} for {exp.experiments} experiment(s) x {p['analyses']} recorded "
                        f"analyses x {n} variables as {p['keep']}, with the truths and the methods before it")


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


def _prior_x0(exp: Experiment, model: Any) -> torch.Tensor:
    x0 = exp.prior.get("x0", "default")
    if isinstance(x0, str):
        if x0 not in ("default", "zeros"):
            raise InputError("config key 'prior.x0'", "'default', 'zeros' or a list of numbers", repr(x0))
        if x0 == "default" and hasattr(model, "default_x0"):
            x0 = model.default_x0()
        else:
            x0 = torch.zeros(model.state_size)
    if not isinstance(x0, (list, tuple, torch.Tensor, np.ndarray)) or (
            isinstance(x0, (list, tuple)) and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in x0)):
        raise InputError("config key 'prior.x0'", "'default', 'zeros' or a list of numbers", repr(x0)[:80])
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    spinup = _int(exp.prior.get("spinup", 0), "prior.spinup", minimum=0)
    with torch.no_grad():
        for _ in range(spinup):
            x0 = model.step(x0)
    return x0


def build_data(exp: Experiment):
    """The model, the observation operator and the twin Dataset of an experiment."""
    params = {k: v for k, v in exp.model.items() if k != "name"}
    model = make_model(exp.model["name"], **params)
    op = _observation(exp.observations, model.state_size)
    x0 = _prior_x0(exp, model)
    data = simulate(model, exp.steps, op, every=exp.observations.get("every", 1), x0=x0,
                    x0_cov=exp.prior.get("cov", 0.0), missing=exp.observations.get("missing", 0.0),
                    experiments=exp.experiments, seed=exp.seed)
    return model, op, data


@dataclass
class Score:
    """Scores of one method: medians over experiments (``nan`` where it diverged); ``rmse_a_each``
    holds the rmse.a of every experiment (truth), whose median is ``rmse_a``.

    ``label`` is a short label, distinct among the experiment's methods; ``config_label`` the full
    ``name(key=value, ...)``; ``note`` the method's ``note`` from the TOML; ``flag`` why the row lost
    the truth ("" if it did not; see :mod:`daml.report`); ``status`` ``"done"`` or ``"diverged"``;
    ``keep`` what was recorded (``"members"`` or ``"summary"``); ``rmse_t`` the RMSE of the mean at every
    analysis time ``(time[, experiment])``; ``rank_counts`` the rank-histogram counts over dim ``rank``
    (the PIT of the truth after the burn-in, every 5th analysis, ``min(20, N + 1)`` bins, pooled over
    experiments and variables) and ``rank_pvalue`` its chi-square flatness p-value
    (:func:`daml.diagnostics.rank_histogram_flatness`); ``path`` the file written (``posterior`` is then
    ``None``: it is not kept in memory once on disk)."""

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
    config_label: str = ""
    note: str = ""
    flag: str = ""
    status: str = "done"
    keep: str = "members"
    rank_counts: xr.DataArray | None = None
    rank_pvalue: float = math.nan
    path: Path | None = None
    seconds: float = math.nan


def _label(m: dict) -> str:
    extras = ", ".join(f"{k}={v}" for k, v in _params(m).items())
    return f"{m['name']}({extras})" if extras else m["name"]


def _labels(methods: list[dict]) -> list[str]:
    """Short distinct labels (:func:`daml.report.labels` when present; else the full configuration)."""
    def entry(m: dict) -> dict:             # a method's own forecast model shows as its name
        e = {k: v for k, v in m.items() if k != "note"}
        if isinstance(e.get("model"), dict):
            e["model"] = str(e["model"].get("name"))
        return e

    return list(report.labels([entry(m) for m in methods]))


def _tag(exp: Experiment, index: int) -> str:
    """The method's part of its file name: a method listed more than once gets its place among them
    in the experiment's list as a suffix (``diffusion-1``, ``diffusion-2``), also when only some run."""
    names = [m["name"] for m in exp.methods]
    name = names[index]
    return name if names.count(name) <= 1 else f"{name}-{names[:index + 1].count(name)}"


def run_experiment(exp: Experiment, progress: bool | None = None,
                   only: Sequence[str] | None = None, *, out: str | Path | None = None,
                   log: Callable[[str], None] | None = None,
                   threads: int | None = None, client: Any = None) -> tuple[xr.Dataset, list[Score]]:
    """Run every method of ``exp`` on the same twin data; return the data and the scores.

    Parameters
    ----------
    exp : Experiment
        As made by :func:`load_config`; checked again (:func:`check_experiment`) before anything runs.
    progress : bool, optional
        Progress bars: one over the methods (method k of M, time left) and one per run. Default:
        only when stderr is a terminal.
    only : sequence of str, optional
        Run just the methods of these names. Each method keeps the random stream of its place in
        the list, so its scores are those of the full run.
    out : str or path-like, optional
        Output folder (created). Each method's file is written as soon as it finishes
        (``<name>_<tag>.nc``; a diverged method's partial result ``<name>_<tag>_partial.nc``) and the
        scores JSON is rewritten with a status per method; the posterior is then dropped from memory
        (``Score.posterior`` is ``None``, ``Score.path`` names the file). Without ``out`` nothing is
        written and every posterior stays in its :class:`Score`.
    log : callable, optional
        Called with one line per method started and finished (its time and rmse.a).
    threads : int, optional
        Intra-op threads for every method. Default: chosen per method for its size
        (:func:`daml._device.auto_threads`: one thread for small ensembles, where more threads only
        add synchronisation, the caller's setting for large ones; ``DAML_THREADS`` forces a count);
        the caller's setting is restored afterwards.
    client : dask.distributed.Client, optional
        Run the methods as tasks on this client's workers (:mod:`daml.distributed`, the ``distributed``
        extra): each method is one task, run with the thread count it would get here, and the
        Datasets, scores and files are bit for bit those of the run in this process (only the
        timings differ). Files are written here, by the caller, as the results arrive.
    """
    return run_experiments([exp], progress, only, out=out, log=log, threads=threads, client=client)[0]


def run_experiments(experiments: Sequence[Experiment], progress: bool | None = None,
                    only: Sequence[str] | None = None, *, out: str | Path | None = None,
                    log: Callable[[str], None] | None = None, threads: int | None = None,
                    client: Any = None) -> list[tuple[xr.Dataset, list[Score]]]:
    """Run several experiments (a sweep): :func:`run_experiment` for each, returning one
    ``(data, scores)`` per experiment in order.

    In this process the methods run one after the other. With a ``client`` every method of every
    experiment is one task on its workers, all submitted at once, so the methods of different
    experiments run side by side; the results are bit for bit those of the run in this process.
    The experiments must have distinct names (their files share ``out``); ``only`` applies to each
    experiment and must name methods that each of them has.
    """
    if isinstance(experiments, Experiment) or not isinstance(experiments, (list, tuple)) or not experiments:
        raise InputError("experiments", "a non-empty list of Experiment (load_config)",
                         type(experiments).__name__)
    for exp in experiments:
        _check_fields(exp)
    seen: dict[str, int] = {}
    for i, exp in enumerate(experiments):
        if exp.name in seen:
            raise InputError(f"experiments[{i}].name", "names distinct among the experiments of a sweep (their "
                             "files share the output folder)", repr(exp.name),
                             hint=f"experiments[{seen[exp.name]}] has the same name")
        seen[exp.name] = i
    if only is not None:
        only = [only] if isinstance(only, str) else list(only)
        for exp in experiments:
            names = [m["name"] for m in exp.methods]
            unknown = [o for o in only if o not in names]
            if unknown or not only:
                raise InputError("only", f"names of methods in the experiment ({', '.join(dict.fromkeys(names))})",
                                 repr(unknown or only))
    if log is not None and not callable(log):
        raise InputError("log", "None or a callable taking one line (str)", type(log).__name__)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise InputError("progress", "None, True or False", repr(progress))
    if threads is not None:
        threads = check_int(threads, "threads", 1)
    plans = []
    for exp in experiments:
        check_experiment(exp)                       # also for an Experiment built in Python
        plans.append(output_plan(exp))
    if client is not None:
        from . import distributed                   # the only module that imports dask

        distributed.check_client(client)
    folder = None
    if out is not None:
        if not isinstance(out, (str, Path)):
            raise InputError("out", "None or an output folder (str or Path)", type(out).__name__)
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
    runs, jobs = [], []
    for e, (exp, plan) in enumerate(zip(experiments, plans)):
        model, op, data = build_data(exp)
        seeds = _device.spawn(exp.seed, len(exp.methods))       # one independent stream per method
        clim = None
        chosen = [i for i, m in enumerate(exp.methods) if only is None or m["name"] in only]
        if any(exp.methods[i]["name"] == "climatology" for i in chosen):
            clim = climatology_from_truth(data["truth"].values)
        runs.append({"exp": exp, "plan": plan, "model": model, "op": op, "data": data, "clim": clim,
                     "cfg": output_settings(exp), "labels": _labels(exp.methods), "scores": []})
        for index in chosen:
            with _threads_for(exp, plan[index], model.state_size, threads) as count:
                pass                                # the count this method runs with, here or on a worker
            jobs.append(_Job(e, index, seeds[index], count))
    show = bool(progress) if progress is not None else sys.stderr.isatty()
    from tqdm.auto import tqdm

    what = experiments[0].name if len(experiments) == 1 else f"{len(experiments)} experiments"
    bar = tqdm(total=len(jobs), desc=what, unit="method", disable=not show, leave=True)

    def name(job: _Job) -> str:
        r = runs[job.run]
        prefix = "" if len(experiments) == 1 else f"{r['exp'].name}: "
        return prefix + r["labels"][job.index]

    def started(k: int, job: _Job) -> None:
        bar.set_description(f"{what}: method {k + 1}/{len(jobs)} {name(job)}")
        if log is not None:
            log(f"[{k + 1}/{len(jobs)}] {name(job)}: started")

    if client is None:
        results = _in_process(runs, jobs, show, started)
    else:
        results = distributed.run_methods(client, runs, jobs, started)
    done = 0
    try:
        for k, score in results:
            job = jobs[k]
            r = runs[job.run]
            exp = r["exp"]
            score.label = r["labels"][job.index]
            if folder is not None:
                _write_method(exp, score, folder, r["cfg"])
            r["scores"].append(score)
            if folder is not None:
                write_scores(exp, r["scores"], folder / f"{exp.name}_scores.json")
            done += 1
            bar.update(1)
            if log is not None:
                what_ = (f"diverged at {score.diverged}" if score.diverged else f"rmse.a {score.rmse_a:.3f}")
                log(f"[{done}/{len(jobs)}] {name(job)}: {what_}, {score.seconds:.1f} s")
    finally:
        bar.close()
        close = getattr(results, "close", None)
        if close is not None:
            close()                                 # cancels what is still queued on the workers
    out_runs = []
    for r in runs:
        scores = sorted(r["scores"], key=lambda s: s.index)     # in the experiment's order, as in one process
        _flag(scores)
        if folder is not None:
            write_scores(r["exp"], scores, folder / f"{r['exp'].name}_scores.json")
        out_runs.append((r["data"], scores))
    return out_runs


@dataclass(frozen=True)
class _Job:
    """One method of one experiment of a run: where it is, its random stream and its thread count."""

    run: int
    index: int
    seed: Any
    threads: int


def method_task(run: dict, job: _Job, show: bool = False) -> Score:
    """Run one job (a method of an experiment, as set up by :func:`run_experiments`) on the thread count
    it was given; the same call in this process or as a task on a Dask worker."""
    exp, plan = run["exp"], run["plan"]
    m = exp.methods[job.index]
    t0 = time.perf_counter()
    with _device.threads(job.threads):
        score = _run_method(exp, job.index, m, job.seed, run["model"], run["op"], run["data"], run["clim"],
                            plan[job.index], show)
    score.seconds = time.perf_counter() - t0
    return score


def _in_process(runs: list[dict], jobs: list[_Job], show: bool, started: Callable[[int, _Job], None]):
    for k, job in enumerate(jobs):
        started(k, job)
        yield k, method_task(runs[job.run], job, show)


def _threads_for(exp: Experiment, plan: dict, n: int, threads: int | None):
    """The thread block of one method: :func:`daml._device.auto_threads` for its ensemble's size (or
    ``threads`` when given)."""
    work = _device.ensemble_work((exp.experiments, plan["members"], n))
    return _device.auto_threads(work, threads=threads)


def _run_method(exp: Experiment, index: int, m: dict, seed: Any, model: Any, op: Any, data: xr.Dataset,
                clim: Any, plan: dict, show: bool) -> Score:
    """Run one method and score it (the posterior stays in the Score until it is written)."""
    params = _params(m)
    if m["name"] == "climatology":
        params = {"mean": clim[0], "cov": clim[1], **params}
    kw = {"keep": plan["keep"], "thin": plan["thin"], "quantiles": QUANTILES}
    base = dict(method=m["name"], label=_label(m), config_label=_label(m), note=str(m.get("note", "")),
                index=index, keep=plan["keep"])
    try:
        filt = make_filter(m["name"], **params)
        res = run(filt, method_model(exp, index, model), data, operator=op, seed=seed, progress=show, **kw)
    except DivergenceError as err:
        partial = getattr(err, "partial", None)
        if partial is not None:
            partial = partial.assign_attrs(daml_partial=f"diverged at model step {err.step}; the analyses up to "
                                                        "the last good one", diverged_at_step=int(err.step or -1))
        return Score(rmse_a=math.nan, rmv_a=math.nan, crps=math.nan, cycles_per_second=math.nan,
                     diverged=f"step {err.step}", status="diverged", posterior=partial, **base)
    post = res.analysis
    s = _scores_of(post, data["truth"], exp.burn_in, plan["members"])
    return Score(rmse_a=s["rmse_a"], rmv_a=s["rmv_a"], crps=s["crps"],
                 cycles_per_second=float(post.attrs.get("cycles_per_second", math.nan)), posterior=post,
                 rmse_t=s["rmse_t"], rmse_a_each=s["rmse_a_each"], rank_counts=s["rank_counts"],
                 rank_pvalue=s["rank_pvalue"], **base)


def _scores_of(post: xr.Dataset, truth: xr.DataArray, burn_in: float, members: int) -> dict:
    """rmse.a, rmv.a, crps (medians over experiments), rmse per truth and per time, and the rank
    histogram of a posterior with members or of a summary (its mean, sd, crps and pit)."""
    after = post["time"] > burn_in                         # not empty: check_experiment
    if MEMBER in post.dims:                                 # the scores only of the analyses scored
        sc = summary_scores(post.sel(time=after), truth)
        r_all = diagnostics.rmse(post, truth)              # (time, experiment): the figure's curve
        thinned = post.sel(time=after).isel(time=slice(None, None, 5))   # consecutive analyses are correlated
        u = diagnostics.pit(thinned, truth)
        n_members = post.sizes[MEMBER]
    else:
        sc = summary_scores(post, truth)
        r_all = sc["rmse"]
        sc = sc.sel(time=after)
        u = post["pit"].sel(time=after).isel(time=slice(None, None, 5)) if "pit" in post else None
        n_members = int(post.attrs.get("members", members))
    s, c = sc["spread"], sc["crps"]
    r = r_all.sel(time=after)
    per_exp = [d for d in r.dims if d != "time"]
    per_truth = r.mean("time")
    out = {
        "rmse_a": float(per_truth.median() if per_exp else per_truth),
        "rmv_a": float(s.mean("time").median() if per_exp else s.mean("time")),
        "crps": float(c.mean("time").median() if per_exp else c.mean("time")),
        "rmse_t": r_all,
        "rmse_a_each": tuple(float(v) for v in np.ravel(per_truth.values)),
        "rank_counts": None,
        "rank_pvalue": math.nan,
    }
    if u is not None:
        counts = rank_counts(u, min(20, n_members + 1))
        out["rank_counts"] = counts
        if int(counts.sum()) > 0:
            out["rank_pvalue"] = float(diagnostics.rank_histogram_flatness(counts).pvalue)
    return out


def rank_counts(pit: xr.DataArray, bins: int) -> xr.DataArray:
    """Counts of PIT values in ``bins`` equal bins of [0, 1], pooled over every dim (as
    :func:`daml.diagnostics.rank_histogram` bins them): a DataArray over dim ``rank``.

    Raises
    ------
    InputError
        Naming ``pit`` (not a DataArray of finite values in [0, 1]) or ``bins`` (not an int >= 2).
    """
    if not isinstance(pit, xr.DataArray) or pit.dtype.kind != "f":
        raise InputError("pit", "a DataArray of PIT values in [0, 1]", type(pit).__name__)
    bins = check_int(bins, "bins", 2)
    u = np.asarray(pit.values, dtype=np.float64).ravel()
    u = u[np.isfinite(u)]
    if u.size and (u.min() < 0 or u.max() > 1):
        raise InputError("pit", "PIT values in [0, 1]", f"values in [{u.min():g}, {u.max():g}]")
    idx = np.clip(np.floor(u * bins).astype(np.int64), 0, bins - 1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return xr.DataArray(np.bincount(idx, minlength=bins), dims="rank",
                        coords={"rank": np.arange(bins), "lower": ("rank", edges[:-1]),
                                "upper": ("rank", edges[1:])}, name="rank_histogram")


def _flag(scores: list[Score]) -> None:
    """Set each score's ``flag`` from :func:`daml.report.lost_truth`."""
    if not scores:
        return
    for s, reason in zip(scores, report.lost_truth(scores)):
        s.flag = reason or ""


def format_table(exp: Experiment, scores: list[Score]) -> str:
    """The comparison as a text table (:func:`daml.report.format_table`)."""
    return report.format_table(exp, scores)


def _write_method(exp: Experiment, score: Score, folder: Path, cfg: dict) -> None:
    """Write a method's posterior (or a diverged one's partial result) and drop it from memory."""
    if score.posterior is None:
        return
    suffix = "_partial" if score.status == "diverged" else ""
    path = folder / f"{exp.name}_{_tag(exp, score.index)}{suffix}.nc"
    kw = {"compression": cfg["compression"], "dtype": None if cfg["dtype"] == "float64" else cfg["dtype"]}
    post = score.posterior.assign_attrs(label=score.label, config_label=score.config_label,
                                        **({"note": score.note} if score.note else {}))
    io.to_netcdf(post, path, **kw)
    score.path, score.posterior = path, None


def write_scores(exp: Experiment, scores: list[Score], path: str | Path) -> Path:
    """Write the scores as strict JSON (``null`` for a missing number), atomically: one entry per
    method of the experiment with its ``status``: ``"done"``, ``"diverged"`` or ``"not run"`` (not
    yet, or left out by ``only``)."""
    _check_fields(exp)
    path = Path(path)
    by_index = {s.index: s for s in scores}
    labels = _labels(exp.methods)
    table = []
    for i, m in enumerate(exp.methods):
        s = by_index.get(i)
        row = {"method": m["name"], "label": labels[i], "config": _label(m), "note": str(m.get("note", "")),
               "status": "not run"}
        if s is not None:
            row.update({"label": s.label, "status": s.status, "rmse_a": s.rmse_a, "rmv_a": s.rmv_a,
                        "crps": s.crps, "cycles_per_second": s.cycles_per_second, "diverged": s.diverged,
                        "flag": s.flag, "keep": s.keep, "rank_pvalue": s.rank_pvalue,
                        "seconds": s.seconds, "rmse_a_per_experiment": list(s.rmse_a_each),
                        "file": None if s.path is None else s.path.name})
        table.append(row)
    io.write_json({"experiment": exp.name, "scores": table}, path)     # strict JSON: NaN as null
    return path


def write_outputs(exp: Experiment, data: xr.Dataset, scores: list[Score], out: Path) -> list[Path]:
    """Posteriors still in memory (netCDF), the score table (JSON) and a figure (PNG, if matplotlib
    is installed); returns the paths written, with the files written earlier by
    :func:`run_experiment` (``out=``) first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = output_settings(exp)
    for s in scores:
        if s.posterior is not None:
            _write_method(exp, s, out, cfg)
    written = [s.path for s in scores if s.path is not None]
    written.append(write_scores(exp, scores, out / f"{exp.name}_scores.json"))
    fig_path = _figure(exp, data, scores, out)
    if fig_path is not None:
        written.append(fig_path)
    return written


def _figure(exp: Experiment, data: xr.Dataset, scores: list[Score], out: Path) -> Path | None:
    if not any(s.rmse_t is not None for s in scores):     # every method diverged: nothing to draw
        return None
    return report.figure(exp, scores, out)
