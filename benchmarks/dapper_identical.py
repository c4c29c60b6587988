"""Benchmark: daml's and DAPPER's filters on identical truths and observations (bocquet2010, _m40).

The other DAPPER comparisons (``lorenz96.py``, ``particle_filters.py``) let each library draw its own
truths, so their rmse.a agree only statistically, over truths. Here both libraries filter *the same*
truths and observations, and the question is per truth: is daml's rmse.a within the Monte Carlo
noise of DAPPER's (the noise of the filter's own random stream: initial ensemble, resampling,
jitter, rotations)?

How:

1. daml makes the twin experiments exactly as the example TOMLs do
   (``examples/lorenz96_bocquet2010.toml``, ``examples/lorenz96_bocquet2010_m40.toml``: DAPPER's
   ``mods/Lorenz96/bocquet2010.py`` and ``bocquet2010_m40.py``; 3 truths, seed 3000, 1280 analyses,
   burn-in 20 time units), through :func:`daml.experiment.build_data`.
2. They are written to an ``.npz`` (:func:`write_npz`: the truths ``xx (E, K + 1, Nx)`` and
   observations ``yy (E, Ko + 1, p)`` in DAPPER's layout, and the setup, which the DAPPER side checks
   against its own ``HMM``) and ``benchmarks/_dapper_identical_side.py`` is run on it with DAPPER's
   interpreter (a separate environment: DAPPER is never a dependency of daml). DAPPER filters each
   truth with ``xp.assimilate(HMM, xx, yy)`` and scores it with its own statistics and burn-in
   (default statistics, numpy's BLAS on one thread as DAPPER ships; it runs while daml filters, so
   the table reports CPU seconds per run, not wall time).
3. daml filters the same Dataset with :func:`daml.filters.run` and scores it as DAPPER does: rmse.a
   is the mean over analysis times after the burn-in of the spatial RMS error of the weighted
   ensemble mean (:func:`daml.diagnostics.rmse`).
4. Each filter runs with several filter seeds per truth in both libraries. A run whose rmse.a
   passes 1 has lost the truth (climatology is about 3.6): a rare event of the filter's random
   stream that would dominate any mean, so such runs are counted apart, and the counts of the two
   libraries (over all truths) compared by Fisher's exact test. For the runs that kept the truth the
   table gives per truth and method the mean rmse.a over the seeds in each library, their difference
   and its standard error ``sqrt(s_daml^2 / R_daml + s_dapper^2 / R_dapper)`` (``s``: the standard
   deviation over seeds, ``R``: the number of seeds), and ``z`` = difference / standard error.
   ``|z| < 2`` is "within Monte Carlo noise"; with a few seeds the standard error is itself rough (a
   Student t with about ``R_daml + R_dapper - 2`` degrees of freedom would be the exact reference),
   so one ``|z|`` near 3 among many truths and methods is a hint, not a verdict.

Pairs (daml parameters from the example TOMLs where they list the method):

* ``pf100``: daml ``bootstrap(members=100, threshold=0.2, jitter=1.3, record="before_resampling")``,
  DAPPER ``PartFilt(N=100, NER=0.2, reg=1.3)``; ``pf800``: the same with N = 800 and 0.8;
  ``pf3000`` (L96-40): N = 3000, 1.2. Both scored before the resampling and jitter (DAPPER's
  ``PartFilt`` assesses its analysis in ``trigger_resampling``, before ``resample``).
* ``enkf24``: daml ``etkf(members=24, inflation=1.04, rotate=True)``, DAPPER
  ``EnKF('Sqrt', N=24, infl=1.04, rot=True)``.

Usage (from the repository root; OMP_NUM_THREADS=1 on a shared machine)::

    python benchmarks/dapper_identical.py --config l96-10 --methods pf100 pf800 enkf24 --seeds 11 12 13
    python benchmarks/dapper_identical.py --config l96-40 --methods enkf24 --seeds 11 12 13
    python benchmarks/dapper_identical.py --config l96-40 --methods pf3000 --seeds 11 12
    python benchmarks/dapper_identical.py --config l96-40 --methods pf3000 --seeds 13 14 --append
    python benchmarks/dapper_identical.py --quick     # 100 cycles: a smoke test, writes only -quick.json
    python benchmarks/dapper_identical.py --render    # the table again, from the stored runs

Each invocation merges its (config, method) entries into ``benchmarks/results/dapper_identical.json``
and prints the markdown table of everything in it. It does not edit ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _report  # noqa: E402

from daml import diagnostics, experiment, filters  # noqa: E402

SIDE = HERE / "_dapper_identical_side.py"
DEFAULT_DAPPER_PYTHON = "/tmp/dapper-venv/bin/python"

CONFIGS = {
    "l96-10": {"toml": "examples/lorenz96_bocquet2010.toml", "dapper": "bocquet2010", "label": "L96-10 bocquet2010"},
    "l96-40": {"toml": "examples/lorenz96_bocquet2010_m40.toml", "dapper": "bocquet2010_m40",
               "label": "L96-40 bocquet2010_m40"},
}

BEFORE = "before_resampling"
PAIRS: dict[str, dict[str, Any]] = {
    "pf100": {"daml": ("bootstrap", {"members": 100, "threshold": 0.2, "jitter": 1.3, "record": BEFORE}),
              "dapper": "PartFilt(N=100, NER=0.2, reg=1.3)", "scored": "before resampling"},
    "pf800": {"daml": ("bootstrap", {"members": 800, "threshold": 0.2, "jitter": 0.8, "record": BEFORE}),
              "dapper": "PartFilt(N=800, NER=0.2, reg=0.8)", "scored": "before resampling"},
    "pf3000": {"daml": ("bootstrap", {"members": 3000, "threshold": 0.2, "jitter": 1.2, "record": BEFORE}),
               "dapper": "PartFilt(N=3000, NER=0.2, reg=1.2)", "scored": "before resampling"},
    "enkf24": {"daml": ("etkf", {"members": 24, "inflation": 1.04, "rotate": True}),
               "dapper": "EnKF('Sqrt', N=24, infl=1.04, rot=True)", "scored": "analysis"},
}

Z_NOISE = 2.0
LOST = 1.0          # rmse.a above this: the run lost the truth (climatology is about 3.6)


def burn_in_for(steps: int, dt: float, burn_in: float = 20.0) -> float:
    """DAPPER's rule (``Chronology``): the burn-in, halved to T/2 when the run is not longer."""
    total = steps * dt
    return burn_in if total > burn_in else total / 2


def load(config: str, cycles: int | None = None):
    """The example TOML's experiment (``cycles`` overrides its steps, with DAPPER's burn-in rule)."""
    exp = experiment.load_config(_report.ROOT / CONFIGS[config]["toml"])
    if cycles is not None and cycles != exp.steps:
        exp = experiment.Experiment(**{**exp.__dict__, "steps": cycles,
                                       "burn_in": burn_in_for(cycles, exp.model["dt"], exp.burn_in)})
    return exp


def toml_params(exp, key: str) -> dict[str, Any] | None:
    """The TOML's own parameters for the daml side of ``key`` (None where the TOML does not list it),
    checked against :data:`PAIRS`."""
    name, params = PAIRS[key]["daml"]
    for m in exp.methods:
        if m["name"] == name and m["members"] == params["members"]:
            listed = {k: v for k, v in m.items() if k != "name"}
            if listed != params:
                raise SystemExit(f"{key}: the TOML lists {listed}, this benchmark {params}")
            return listed
    return None


def dapper_arrays(data, dt: float, burn_in: float, config: str) -> dict[str, np.ndarray]:
    """The twin Dataset in DAPPER's layout: ``xx (E, K + 1, Nx)`` (truth at steps 0..K) and ``yy
    (E, Ko + 1, p)`` (``yy[:, ko]`` at step ``ko + 1``: every step observed, none at step 0), with the
    setup the DAPPER side checks against its ``HMM``."""
    observed = np.asarray(data["observed"].values, dtype=bool)
    if observed[0] or not observed[1:].all():
        raise ValueError("DAPPER's bocquet2010 observes every step after the first: the data must too")
    truth = data["truth"].transpose("experiment", "time", "variable").values
    y = data["y"].transpose("experiment", "time", "obs").values[:, 1:, :]
    if not np.isfinite(y).all():
        raise ValueError("observations with missing entries cannot be handed to DAPPER")
    H = data["H"].values
    return {
        "config": np.array(CONFIGS[config]["dapper"]),
        "xx": np.ascontiguousarray(truth, dtype=np.float64),
        "yy": np.ascontiguousarray(y, dtype=np.float64),
        "dt": np.array(dt), "dko": np.array(1), "burn_in": np.array(burn_in),
        "obs_idx": H.argmax(axis=1).astype(np.int64), "R": data["R"].values,
        "x0_mean": data["prior_mean"].values, "x0_cov": data["prior_cov"].values,
        "truth_label": np.asarray(data["experiment"].values, dtype=np.int64),
    }


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    np.savez(path, **arrays)
    return path


def dapper_python(arg: str | None) -> str | None:
    for candidate in (arg, os.environ.get("DAPPER_PYTHON"), DEFAULT_DAPPER_PYTHON):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def start_dapper(python: str, npz: Path, methods: list[str], seeds: list[int], truths: list[int]):
    """Start the DAPPER side (one BLAS thread, as DAPPER ships); :func:`finish_dapper` collects it."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    cmd = [python, str(SIDE), str(npz), "--methods", *methods, "--seeds", *map(str, seeds),
           "--truths", *map(str, truths)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(_report.ROOT))
    return proc, cmd


def finish_dapper(proc, cmd) -> dict[str, Any]:
    stdout, stderr = proc.communicate()
    sys.stderr.write(stderr[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"DAPPER side failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def run_daml(key: str, model, data, seeds: list[int], truths: list[int], burn_in: float) -> list[dict[str, Any]]:
    """rmse.a and rmv.a of the daml side of ``key`` per truth and filter seed. All truths in one
    batched call, or one truth at a time where the kept posterior would pass 1.5 GB."""
    name, params = PAIRS[key]["daml"]
    filt = filters.make_filter(name, **params)
    sizes = data["truth"].sizes
    per_truth = params["members"] * sizes["variable"] * sizes["time"] * len(truths) * 8 > 1.5e9
    groups = [[e] for e in truths] if per_truth else [list(truths)]
    out = []
    for seed in seeds:
        for group in groups:
            part = data.isel(experiment=group)
            t0, c0 = time.perf_counter(), time.process_time()
            res = filters.run(filt, model, part, seed=seed, progress=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            post = res.analysis
            keep = post.sel(time=post["time"] > burn_in)
            rmse = diagnostics.rmse(keep, part["truth"], dim="variable").mean("time")
            rmv = diagnostics.spread(keep, dim="variable").mean("time")
            for i, e in enumerate(group):
                out.append({"method": key, "truth": int(e), "seed": seed, "rmse_a": float(rmse.values[i]),
                            "rmv_a": float(rmv.values[i]), "wall_s": wall / len(group), "cpu_s": cpu / len(group),
                            "loop_s": res.seconds / len(group)})
                print(f"daml {key} truth {e} seed {seed}: rmse.a {out[-1]['rmse_a']:.4f} ({wall / len(group):.1f} s)",
                      file=sys.stderr, flush=True)
            del res, post, keep
    return out


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return float(statistics.fmean(xs)), (float(statistics.stdev(xs)) if len(xs) > 1 else math.nan)


def compare(daml_runs: list[dict], dapper_runs: list[dict], key: str, truths: list[int]) -> dict[str, Any]:
    """Per truth: mean and sd over filter seeds in each library, difference, its s.e. and z; and the
    mean over truths of the differences with its s.e."""
    rows = []
    for e in truths:
        a = [r["rmse_a"] for r in daml_runs if r["method"] == key and r["truth"] == e]
        b = [r["rmse_a"] for r in dapper_runs if r["method"] == key and r["truth"] == e]
        ma, sa = _mean_sd(a)
        mb, sb = _mean_sd(b)
        se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b)) if len(a) > 1 and len(b) > 1 else math.nan
        diff = ma - mb
        rows.append({"truth": e, "daml": a, "dapper": b, "daml_lost": sum(v > LOST for v in a),
                     "dapper_lost": sum(v > LOST for v in b), "daml_mean": ma, "daml_sd": sa, "dapper_mean": mb,
                     "dapper_sd": sb, "diff": diff, "se": se, "z": diff / se if se and se > 0 else math.nan,
                     "dapper_prec": [r.get("rmse_a_prec") for r in dapper_runs
                                     if r["method"] == key and r["truth"] == e],
                     "daml_rmv": statistics.fmean(r["rmv_a"] for r in daml_runs if r["method"] == key and r["truth"] == e),
                     "dapper_rmv": _maybe_mean([r.get("rmv_a") for r in dapper_runs
                                                if r["method"] == key and r["truth"] == e])})
    for r in rows:                          # the runs that kept the truth (rmse.a <= LOST)
        ka, kb = [v for v in r["daml"] if v <= LOST], [v for v in r["dapper"] if v <= LOST]
        r["kept"] = _difference(ka, kb)
    diffs = [r["diff"] for r in rows]
    ses = [r["se"] for r in rows]
    mean_diff = statistics.fmean(diffs)
    se_mean = math.sqrt(sum(s ** 2 for s in ses)) / len(ses) if all(np.isfinite(ses)) else math.nan
    lost_a, lost_b = sum(r["daml_lost"] for r in rows), sum(r["dapper_lost"] for r in rows)
    n_a, n_b = sum(len(r["daml"]) for r in rows), sum(len(r["dapper"]) for r in rows)
    return {"rows": rows, "mean_diff": mean_diff, "se_mean_diff": se_mean,
            "lost": {"daml": lost_a, "daml_runs": n_a, "dapper": lost_b, "dapper_runs": n_b,
                     "fisher_p": fisher_exact_p(lost_a, n_a, lost_b, n_b)},
            "z_mean_diff": mean_diff / se_mean if se_mean and se_mean > 0 else math.nan,
            "within_noise": bool(all(abs(r["z"]) < Z_NOISE for r in rows if np.isfinite(r["z"]))
                                 and (not np.isfinite(se_mean) or abs(mean_diff / se_mean) < Z_NOISE))}


def _difference(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of ``a`` minus mean of ``b``, its standard error and z (NaN where a side has < 2 values)."""
    if len(a) < 2 or len(b) < 2:
        return {"daml_mean": _mean_sd(a)[0] if a else math.nan, "dapper_mean": _mean_sd(b)[0] if b else math.nan,
                "n": [len(a), len(b)], "diff": math.nan, "se": math.nan, "z": math.nan}
    (ma, sa), (mb, sb) = _mean_sd(a), _mean_sd(b)
    se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    return {"daml_mean": ma, "dapper_mean": mb, "daml_sd": sa, "dapper_sd": sb, "n": [len(a), len(b)],
            "diff": ma - mb, "se": se, "z": (ma - mb) / se if se > 0 else math.nan}


def fisher_exact_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact test p-value of ``k1`` of ``n1`` against ``k2`` of ``n2`` (equal rates):
    the sum of the hypergeometric probabilities of the tables no more likely than the one seen."""
    total, k = n1 + n2, k1 + k2

    def prob(x: int) -> float:
        return math.comb(n1, x) * math.comb(n2, k - x) / math.comb(total, k)

    seen = prob(k1)
    return float(min(1.0, sum(prob(x) for x in range(max(0, k - n2), min(k, n1) + 1)
                             if prob(x) <= seen * (1 + 1e-9))))


def _maybe_mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(statistics.fmean(xs)) if xs else None


def run(config: str, methods: list[str], seeds: list[int], truths: list[int] | None, cycles: int | None,
        python: str | None, keep_npz: str | None = None) -> dict[str, Any]:
    exp = load(config, cycles)
    model, op, data = experiment.build_data(exp)
    truths = list(range(data.sizes["experiment"])) if truths is None else truths
    arrays = dapper_arrays(data, float(exp.model["dt"]), float(exp.burn_in), config)
    entries = {}
    with tempfile.TemporaryDirectory() as tmp:
        npz = write_npz(keep_npz or Path(tmp) / "twin.npz", arrays)
        # DAPPER runs in its own process while daml filters here (each on one thread)
        started = start_dapper(python, npz, methods, seeds, truths) if python is not None else None
        try:
            daml_runs_all = {key: run_daml(key, model, data, seeds, truths, float(exp.burn_in)) for key in methods}
        except BaseException:
            if started is not None:
                started[0].kill()
            raise
        dapper = finish_dapper(*started) if started is not None else None
    if dapper is not None:
        print(f"truth vs DAPPER's model, max |diff| {dapper['truth_vs_dapper_model_max_abs']:.2e}",
              file=sys.stderr, flush=True)
    for key in methods:
        daml_runs = daml_runs_all[key]
        name, params = PAIRS[key]["daml"]
        entry = {"config": config, "label": CONFIGS[config]["label"], "method": key,
                 "daml_call": f"filters.make_filter({name!r}, " + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")",
                 "daml_params_from_toml": toml_params(exp, key) is not None,
                 "dapper_call": PAIRS[key]["dapper"], "scored": PAIRS[key]["scored"],
                 "cycles": exp.steps, "burn_in": exp.burn_in, "truth_seed": exp.seed, "truths": truths,
                 "filter_seeds": seeds, "daml_runs": daml_runs,
                 "daml_wall_s_per_run": statistics.median(r["wall_s"] for r in daml_runs),
                 "daml_cpu_s_per_run": statistics.median(r["cpu_s"] for r in daml_runs)}
        if dapper is not None:
            dr = [r for r in dapper["runs"] if r["method"] == key]
            entry.update({"dapper_runs": dr, "dapper_version": dapper["dapper_version"],
                          "dapper_wall_s_per_run": statistics.median(r["wall_s"] for r in dr),
                          "dapper_cpu_s_per_run": statistics.median(r["cpu_s"] for r in dr),
                          "truth_vs_dapper_model_max_abs": dapper["truth_vs_dapper_model_max_abs"],
                          "obs_residual_variance": dapper["obs_residual_variance"],
                          "dapper_analyses_after_burn_in": dapper["analyses_after_burn_in"],
                          **compare(daml_runs, dr, key, truths)})
        entries[key] = entry
    return entries


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s runs added to ``old``'s (a (truth, seed) in both: ``new``'s), the comparison recomputed;
    the commands and commits of both kept."""
    if (old["cycles"], old["truth_seed"]) != (new["cycles"], new["truth_seed"]):
        raise SystemExit("--append: the stored entry has other cycles or truths; run without --append")
    out = dict(new)
    for side in ("daml_runs", "dapper_runs"):
        fresh = {(r["truth"], r["seed"]) for r in new[side]}
        out[side] = [r for r in old[side] if (r["truth"], r["seed"]) not in fresh] + new[side]
    out["truths"] = sorted({r["truth"] for r in out["daml_runs"]})
    out["filter_seeds"] = sorted({r["seed"] for r in out["daml_runs"]})
    out["command"] = "; ".join(dict.fromkeys(old["command"].split("; ") + [new["command"]]))
    out["daml_commit"] = ", ".join(dict.fromkeys(str(old["daml_commit"]).split(", ") + [str(new["daml_commit"])]))
    for side, key in (("daml_runs", "daml"), ("dapper_runs", "dapper")):
        out[f"{key}_wall_s_per_run"] = statistics.median(r["wall_s"] for r in out[side])
        cpu = [r["cpu_s"] for r in out[side] if "cpu_s" in r]
        if cpu:
            out[f"{key}_cpu_s_per_run"] = statistics.median(cpu)
    out.update(compare(out["daml_runs"], out["dapper_runs"], out["method"], out["truths"]))
    return out


def _f(x: Any, d: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{d}f}"


def _sign(x: Any) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:+.3f}"


def _timing(e: dict[str, Any]) -> str:
    """Median CPU seconds per filter run (one truth, one seed), daml / DAPPER; wall seconds, marked,
    for runs recorded without their CPU time."""
    def one(runs: list[dict]) -> str:
        cpu = [r["cpu_s"] for r in runs if "cpu_s" in r]
        if len(cpu) == len(runs) and runs:
            return f"{statistics.median(cpu):.1f}"
        return f"{statistics.median(r['wall_s'] for r in runs):.1f} (wall)" if runs else "–"
    return f"{one(e.get('daml_runs', []))} / {one(e.get('dapper_runs', []))}"


def markdown(res: dict[str, Any]) -> str:
    lines = ["### daml and DAPPER on identical truths (bocquet2010, bocquet2010_m40)", "",
             _report.machine_line(res["machine"]), "",
             "Both libraries filter the *same* truths and observations: daml makes them as the example "
             "TOMLs do (3 truths, seed 3000, 1280 analyses, burn-in 20), DAPPER "
             f"{res.get('dapper_version', '')} runs `xp.assimilate(HMM, xx, yy)` on them with its own "
             "`HMM` of the same file and scores with its own statistics. Each filter runs with several "
             "filter seeds per truth in each library. Per truth: the mean rmse.a over the seeds (sd in "
             "brackets) of the runs that kept the truth, the difference daml - DAPPER, its standard error "
             "sqrt(s_daml^2/R_daml + s_DAPPER^2/R_DAPPER) and z = difference / s.e. (|z| < 2: within Monte "
             "Carlo noise; with a few seeds the s.e. is itself rough). Lost: runs with rmse.a > 1, where the filter "
             "lost the truth (a rare event that would dominate a mean: counted apart, and the counts of the "
             "two libraries compared by Fisher's exact test over all truths). Particle filters are scored before the resampling and "
             "jitter in both. CPU s: median per run (one truth, one filter seed).", ""]
    lines += ["Commands (each row's runs):", ""]
    for key in sorted(res["entries"]):
        for c in res["entries"][key]["command"].split("; "):
            lines.append(f"- {res['entries'][key]['label']}, {res['entries'][key]['method']}: `{c}`")
    lines.append("")
    lines += ["| config | daml | DAPPER | scored | truth | runs daml / DAPPER | lost (rmse.a > 1) daml / DAPPER "
              "| daml rmse.a, kept runs | DAPPER rmse.a, kept runs | diff | s.e. | z | CPU s per run, daml / DAPPER |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(res["entries"]):
        e = res["entries"][key]
        if "rows" not in e:
            continue
        for i, r in enumerate(e["rows"]):
            head = (f"{e['label']} | `{e['daml_call'].replace('filters.make_filter', 'make_filter')}` | "
                    f"`{e['dapper_call']}` | {e['scored']}") if i == 0 else " | | | "
            timing = _timing(e) if i == 0 else ""
            k = r["kept"]
            lines.append(f"| {head} | {r['truth']} | {len(r['daml'])} / {len(r['dapper'])} | "
                         f"{r['daml_lost']} / {r['dapper_lost']} | "
                         f"{_f(k['daml_mean'])} ({_f(k.get('daml_sd'))}) | {_f(k['dapper_mean'])} ({_f(k.get('dapper_sd'))}) | "
                         f"{_sign(k['diff'])} | {_f(k['se'])} | {_f(k['z'], 1)} | {timing} |")
        kept = [r["kept"] for r in e["rows"] if np.isfinite(r["kept"]["se"])]
        if kept:
            d = statistics.fmean(k["diff"] for k in kept)
            se = math.sqrt(sum(k["se"] ** 2 for k in kept)) / len(kept)
            lost = e["lost"]
            lines.append(f"| | | | | all | {lost['daml_runs']} / {lost['dapper_runs']} | {lost['daml']} / {lost['dapper']} "
                         f"(Fisher p {lost['fisher_p']:.2f}) | | | {d:+.3f} (mean) | {se:.3f} | {d / se:.1f} | |")
    spreads = []
    for key in sorted(res["entries"]):
        e = res["entries"][key]
        a = [r["rmv_a"] for r in e.get("daml_runs", []) if r.get("rmv_a") is not None]
        b = [r["rmv_a"] for r in e.get("dapper_runs", []) if r.get("rmv_a") is not None]
        if a and b:
            spreads.append(f"{e['label']} {e['method']} {statistics.median(a):.3f} / {statistics.median(b):.3f}")
    if spreads:
        lines += ["", "rmv.a (spread), median over all runs, daml / DAPPER: " + "; ".join(spreads) + "."]
    checks = [e for e in res["entries"].values() if "truth_vs_dapper_model_max_abs" in e]
    if checks:
        dev = max(e["truth_vs_dapper_model_max_abs"] for e in checks)
        lines += ["", f"Check of the shared data: one step of DAPPER's own Lorenz-96 from each daml truth state "
                  f"reproduces the next within {dev:.1e} (largest absolute difference over all steps and truths)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="l96-10")
    parser.add_argument("--methods", nargs="+", choices=sorted(PAIRS), default=None,
                        help="default: pf100 pf800 enkf24 (l96-10), enkf24 (l96-40)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13], help="filter seeds (positive)")
    parser.add_argument("--truths", type=int, nargs="+", default=None, help="indices of the TOML's truths (default all)")
    parser.add_argument("--cycles", type=int, default=None, help="shorten the run (default: the TOML's 1280)")
    parser.add_argument("--dapper-python", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep-npz", default=None, help="also keep the .npz handed to DAPPER at this path")
    parser.add_argument("--quick", action="store_true", help="100 cycles, pf100 and enkf24 on L96-10, 2 seeds")
    parser.add_argument("--append", action="store_true",
                        help="add these runs to the stored ones of the same config and method (same truths and "
                             "cycles; a (truth, seed) already stored is replaced) instead of replacing the entry")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: recompute the comparison from the stored runs, store it, print the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render:
        path = _report.RESULTS / "dapper_identical.json"
        res = json.loads(path.read_text())
        for entry in res["entries"].values():
            if "dapper_runs" in entry:
                entry.update(compare(entry["daml_runs"], entry["dapper_runs"], entry["method"], entry["truths"]))
        with _report._locked(path):
            _report.write_json("dapper_identical", res)
        print(markdown(res))
        return res
    if args.quick:
        args.config, args.cycles, args.methods, args.seeds = "l96-10", 100, ["pf100", "enkf24"], [11, 12]
    methods = args.methods or (["pf100", "pf800", "enkf24"] if args.config == "l96-10" else ["enkf24"])
    if any(s <= 0 for s in args.seeds):
        raise SystemExit("--seeds: positive ints (DAPPER refuses seed 0)")
    python = dapper_python(args.dapper_python)
    if python is None:
        print("DAPPER's interpreter not found (--dapper-python, $DAPPER_PYTHON, /tmp/dapper-venv): daml side only",
              file=sys.stderr)
    entries = run(args.config, methods, args.seeds, args.truths, args.cycles, python, args.keep_npz)
    command = _report.command_line()
    name = "dapper_identical-quick" if args.quick else "dapper_identical"
    path = _report.RESULTS / f"{name}.json"
    with _report._locked(path):           # several invocations may merge into the same file
        res = json.loads(path.read_text()) if path.exists() else {"entries": {}}
        res["machine"] = _report.machine_info()
        res["daml_commit"] = _report.git_commit()
        for key, entry in entries.items():
            entry["command"] = command
            entry["daml_commit"] = res["daml_commit"]
            entry["machine"] = res["machine"]
            old = res["entries"].get(f"{args.config}/{key}")
            if args.append and old is not None and "dapper_runs" in old and "dapper_runs" in entry:
                entry = merge(old, entry)
            res["entries"][f"{args.config}/{key}"] = entry
            if "dapper_version" in entry:
                res["dapper_version"] = entry["dapper_version"]
        _report.write_json(name, res)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
