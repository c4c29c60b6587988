"""Benchmark: ETKF (N=24) and LETKF (N=7) on Lorenz-96 (40 variables), daml against DAPPER.

The configuration is DAPPER's ``mods/Lorenz96/sakov2008.py`` (Sakov & Oke 2008): 40 variables,
F = 8, RK4 with dt = 0.05, all 40 variables observed at every model step with R = I, the truth and
the filters starting from ``N(e_1, 0.001 I)``, ``Ko + 1`` analysis cycles (Ko = 1000 by default) and
a burn-in of 20 time units (DAPPER halves the burn-in when the run is shorter than that; so does this
script). The methods:

* ETKF: daml ``make_filter("etkf", members=24, inflation=1.02, rotate=True)``, DAPPER
  ``EnKF('Sqrt', N=24, infl=1.02, rot=True)``;
* LETKF: daml ``make_filter("letkf", members=7, radius=4.0, inflation=1.04, rotate=True)``, DAPPER
  ``LETKF(N=7, infl=1.04, rot=True, loc_rad=4)``.

What is measured, in one invocation:

* DAPPER (the peer), in a subprocess with the Python of a separate environment where DAPPER is
  installed (``--dapper-python``; see ``benchmarks/_dapper_l96.py``): for each seed the wall time of
  ``xp.assimilate`` (``time.perf_counter``) and its CPU time, and ``rmse.a`` / ``rmv.a`` from
  ``xp.stats.average_in_time()``. Three variants: DAPPER's default statistics with numpy's BLAS on
  ``T`` threads (torch's thread count), its statistics reduced to the error alone (DAPPER's own
  ``rc.comps["error_only"]`` switch, the closest it comes to timing the filter alone), and default
  statistics on one BLAS thread (as DAPPER ships: it limits BLAS to one thread on import).
* daml, on ``T`` torch threads and on one: (i) a single experiment per seed, the wall time of the
  loop of :func:`daml.filters.run` (``RunResult.seconds``, without building the output Datasets) and
  of the whole call; (ii) ``E`` independent experiments (``daml.simulate(..., experiments=E)``)
  filtered in ONE batched call; (iii) the same ``E`` experiments as ``E`` sequential single-experiment
  calls. Throughput is experiment-cycles per second (cycles x experiments / seconds).

Every timing of a given configuration takes the median over seeds (3 by default). Accuracy: rmse.a
(time average over analysis times after the burn-in of the spatial RMS error of the ensemble mean)
and rmv.a (same for the spread, ddof 1), DAPPER's definitions, computed by
:mod:`daml.diagnostics` per experiment; the median over seeds or experiments is reported and a row is
flagged when daml's median rmse.a differs from DAPPER's by more than 0.03. Experiments with
rmse.a > 1 (the filter lost the truth) are counted. daml and DAPPER draw different truths (different
random number generators), so their rmse.a agree only statistically.

Usage (from the repository root)::

    python benchmarks/lorenz96.py --dapper-python /tmp/dapper-venv/bin/python
        # full run (Ko = 1000, 64 experiments): writes results/lorenz96.json and the "lorenz96"
        # section of docs/benchmarks.md
    python benchmarks/lorenz96.py --quick      # 100 cycles, 8 experiments: a smoke test; writes
                                               # only results/lorenz96-quick.json

Without a DAPPER interpreter (``--dapper-python`` missing and ``$DAPPER_PYTHON`` unset or absent) the
DAPPER rows are left out and said to be.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

import daml  # noqa: E402
from daml.models import Lorenz96, observe_all  # noqa: E402

HERE = Path(__file__).resolve().parent
DAPPER_SCRIPT = HERE / "_dapper_l96.py"
DEFAULT_DAPPER_PYTHON = "/tmp/dapper-venv/bin/python"

METHODS: dict[str, dict[str, Any]] = {
    "etkf": {
        "label": "ETKF (N=24, infl 1.02, rot)",
        "daml": {"members": 24, "inflation": 1.02, "rotate": True},
        "daml_call": 'make_filter("etkf", members=24, inflation=1.02, rotate=True)',
        "dapper_call": "EnKF('Sqrt', N=24, infl=1.02, rot=True)",
    },
    "letkf": {
        "label": "LETKF (N=7, loc_rad 4, infl 1.04, rot)",
        "daml": {"members": 7, "radius": 4.0, "inflation": 1.04, "rotate": True},
        "daml_call": 'make_filter("letkf", members=7, radius=4.0, inflation=1.04, rotate=True)',
        "dapper_call": "LETKF(N=7, infl=1.04, rot=True, loc_rad=4)",
    },
}

LOST = 1.0          # rmse.a above this: the filter lost the truth (typical values are 0.15-0.25)
RMSE_TOLERANCE = 0.03


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def burn_in_for(cycles: int, dt: float) -> float:
    """DAPPER's rule (``Chronology``): 20 time units, halved to T/2 when the run is not longer."""
    total = cycles * dt
    return 20.0 if total > 20.0 else total / 2


# --------------------------------------------------------------------------------------------------
# DAPPER (subprocess)


def dapper_python(arg: str | None) -> str | None:
    for candidate in (arg, os.environ.get("DAPPER_PYTHON"), DEFAULT_DAPPER_PYTHON):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def run_dapper(python: str, ko: int, seeds: list[int], stats: str, threads: int) -> dict[str, Any]:
    """Run ``_dapper_l96.py``; the environment's thread variables are set to ``threads`` and DAPPER's
    own one-thread BLAS limit is re-set to ``threads`` after its import."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    env.setdefault("MPLBACKEND", "Agg")
    cmd = [python, str(DAPPER_SCRIPT.relative_to(_report.ROOT)), "--cycles", str(ko), "--stats", stats,
           "--blas-threads", str(threads), "--seeds", *map(str, seeds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(_report.ROOT))
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"DAPPER run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    out = json.loads(last)
    out["command"] = " ".join(["OMP_NUM_THREADS=%d" % threads, "OPENBLAS_NUM_THREADS=%d" % threads,
                               "MKL_NUM_THREADS=%d" % threads, *cmd])
    return out


def summarise_dapper(raw: dict[str, Any], method: str) -> dict[str, Any]:
    runs = [r for r in raw["runs"] if r["method"] == method]
    rmv = [r["rmv_a"] for r in runs if r["rmv_a"] is not None]
    wall = median([r["wall_s"] for r in runs])
    return {
        "seeds": [r["seed"] for r in runs],
        "wall_s": wall,
        "cpu_s": median([r["cpu_s"] for r in runs]),
        "cycles_per_s": raw["cycles"] / wall,
        "rmse_a": median([r["rmse_a"] for r in runs]),
        "rmv_a": median(rmv) if rmv else None,
        "rmse_a_per_seed": [r["rmse_a"] for r in runs],
        "lost": sum(r["rmse_a"] > LOST for r in runs),
        "runs": len(runs),
    }


# --------------------------------------------------------------------------------------------------
# daml


def model_and_operator():
    return Lorenz96(n=40, forcing=8.0, dt=0.05), observe_all(40, sd=1.0)


def twin(model, op, cycles: int, seed: int, experiments: int | None = None):
    return daml.simulate(model, cycles, op, every=1, x0=model.default_x0(), x0_cov=0.001,
                         experiments=experiments, seed=seed)


def scores(post, truth, burn_in: float) -> tuple[np.ndarray, np.ndarray]:
    """rmse.a and rmv.a per experiment (arrays of shape (E,) or ())."""
    keep = post.sel(time=post["time"] > burn_in)
    rmse = daml.diagnostics.rmse(keep, truth, dim="variable").mean("time")
    rmv = daml.diagnostics.spread(keep, dim="variable").mean("time")
    return np.asarray(rmse.values, dtype=float), np.asarray(rmv.values, dtype=float)


def timed_run(filt, model, data, seed) -> tuple[Any, float, float, float]:
    """(result, loop seconds, whole-call seconds, CPU seconds of the call)."""
    c0, w0 = time.process_time(), time.perf_counter()
    res = daml.filters.run(filt, model, data, seed=seed, progress=False)
    return res, res.seconds, time.perf_counter() - w0, time.process_time() - c0


def run_daml(method: str, cycles: int, seeds: list[int], experiments: int, burn_in: float,
             threads: int) -> dict[str, Any]:
    """Single experiments (one per seed), then E experiments batched and sequential, on ``threads``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, op = model_and_operator()
        filt = daml.filters.make_filter(method, **METHODS[method]["daml"])
        # warm-up (untimed): first-call costs of torch kernels and of the filter's caches
        daml.filters.run(filt, model, twin(model, op, 20, 1), seed=1, progress=False)
        daml.filters.run(filt, model, twin(model, op, 20, 1, experiments=2), seed=1, progress=False)

        single = []
        for seed in seeds:
            data = twin(model, op, cycles, seed)
            res, loop_s, call_s, cpu_s = timed_run(filt, model, data, seed)
            rmse, rmv = scores(res.analysis, data["truth"], burn_in)
            single.append({"seed": seed, "loop_s": loop_s, "call_s": call_s, "cpu_s": cpu_s,
                           "rmse_a": float(rmse), "rmv_a": float(rmv)})
            print(f"daml {method} {threads} thread(s) seed {seed}: {loop_s:.2f} s loop, {call_s:.2f} s call, "
                  f"rmse.a {float(rmse):.4f}", flush=True)

        data = twin(model, op, cycles, seeds[0], experiments=experiments)
        res, loop_s, call_s, cpu_s = timed_run(filt, model, data, seeds[0])
        rmse_b, rmv_b = scores(res.analysis, data["truth"], burn_in)
        batched = {"loop_s": loop_s, "call_s": call_s, "cpu_s": cpu_s, "rmse_a": rmse_b.tolist(),
                   "rmv_a": rmv_b.tolist()}
        print(f"daml {method} {threads} thread(s) {experiments} batched: {loop_s:.2f} s loop, "
              f"median rmse.a {np.median(rmse_b):.4f}", flush=True)
        del res

        seq = {"loop_s": 0.0, "call_s": 0.0, "cpu_s": 0.0, "rmse_a": [], "rmv_a": []}
        for e in range(experiments):
            one = data.isel(experiment=e)
            res, loop_s, call_s, cpu_s = timed_run(filt, model, one, seeds[0] * 1000 + e)
            rmse, rmv = scores(res.analysis, one["truth"], burn_in)
            seq["loop_s"] += loop_s
            seq["call_s"] += call_s
            seq["cpu_s"] += cpu_s
            seq["rmse_a"].append(float(rmse))
            seq["rmv_a"].append(float(rmv))
        print(f"daml {method} {threads} thread(s) {experiments} sequential: {seq['loop_s']:.2f} s loop, "
              f"median rmse.a {np.median(seq['rmse_a']):.4f}", flush=True)
    finally:
        torch.set_num_threads(previous)

    def summary(d: dict[str, Any], n_exp: int) -> dict[str, Any]:
        return {**d, "experiments": n_exp, "exp_cycles_per_s": cycles * n_exp / d["loop_s"],
                "exp_cycles_per_s_call": cycles * n_exp / d["call_s"],
                "rmse_a_median": median(d["rmse_a"]), "rmv_a_median": median(d["rmv_a"]),
                "lost": int(sum(r > LOST for r in d["rmse_a"]))}

    loop = median([s["loop_s"] for s in single])
    return {
        "threads": threads,
        "single": {
            "runs": single,
            "loop_s": loop,
            "call_s": median([s["call_s"] for s in single]),
            "cpu_s": median([s["cpu_s"] for s in single]),
            "cycles_per_s": cycles / loop,
            "rmse_a": median([s["rmse_a"] for s in single]),
            "rmv_a": median([s["rmv_a"] for s in single]),
            "lost": int(sum(s["rmse_a"] > LOST for s in single)),
        },
        "batched": summary(batched, experiments),
        "sequential": summary(seq, experiments),
    }


# --------------------------------------------------------------------------------------------------
# report


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _rate(x: float) -> str:
    return f"{x:,.0f}"


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}×"


def _x(v: float) -> str:
    return f"{v:.2g}×" if v < 1 else f"{v:.1f}×"


def markdown(results: dict[str, Any]) -> str:
    cycles, exps, seeds = results["cycles"], results["experiments"], results["seeds"]
    threads = results["threads"]
    d = results.get("dapper")
    lines = [
        "## Lorenz-96: ETKF and LETKF against DAPPER",
        "",
        "DAPPER's `mods/Lorenz96/sakov2008.py` configuration (Sakov & Oke 2008): 40 variables, F = 8, "
        "RK4 with dt = 0.05, every variable observed at every step with R = I, start from N(e₁, 0.001 I), "
        f"{cycles} analysis cycles (Ko = {cycles - 1}), burn-in {results['burn_in']:g} time units. ETKF: daml "
        f"`{METHODS['etkf']['daml_call']}` vs DAPPER `{METHODS['etkf']['dapper_call']}`; LETKF: daml "
        f"`{METHODS['letkf']['daml_call']}` vs DAPPER `{METHODS['letkf']['dapper_call']}`. float64 on the CPU.",
        "",
        f"Single-experiment rows: median over seeds {', '.join(map(str, seeds))} (one run each, after an "
        "untimed warm-up), wall time of DAPPER's `xp.assimilate` and of the loop of `daml.filters.run` "
        "(`RunResult.seconds`, without building the output Datasets; \"call s\" is the whole call). "
        f"Batched: {exps} independent experiments (`daml.simulate(..., experiments={exps})`) in one call; "
        f"sequential: the same {exps} experiments as {exps} single-experiment calls (summed times). "
        "Throughput is cycles/s, or experiment-cycles/s for several experiments. rmse.a / rmv.a: "
        "DAPPER's definitions, median over seeds or experiments; \"lost\" counts runs with rmse.a > 1. "
        f"Ratio: throughput / DAPPER's (default statistics, same thread count, same method). ⚠ marks an "
        f"rmse.a more than {RMSE_TOLERANCE} from DAPPER's.",
        "",
        "| method | implementation | threads | cycles | experiments | wall s | call s | CPU s "
        "| cycles/s | rmse.a | rmv.a | lost | ratio vs DAPPER |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        label = METHODS[method]["label"]
        base: dict[int, float] = {}
        dapper_rmse = None
        if d is not None:
            for key, name, th in (("full", "DAPPER 1.7.1, default stats", threads),
                                  ("minimal", "DAPPER 1.7.1, error-only stats", threads),
                                  ("full_1thread", "DAPPER 1.7.1, default stats", 1)):
                if key not in d:
                    continue
                s = d[key]["summary"][method]
                if key != "minimal":
                    base.setdefault(th, s["cycles_per_s"])
                if key == "full":
                    dapper_rmse = s["rmse_a"]
                ratio = s["cycles_per_s"] / base[th] if th in base else None
                lines.append(
                    f"| {label} | {name} | {th} | {cycles} | 1 | {_f(s['wall_s'], 2)} | | {_f(s['cpu_s'], 2)} "
                    f"| {_rate(s['cycles_per_s'])} | {_f(s['rmse_a'])} | {_f(s['rmv_a'])} "
                    f"| {s['lost']}/{s['runs']} | {_ratio(ratio)} |")
        for r in results["daml"][method]:
            th = r["threads"]
            for kind, name, n_exp in (("single", "daml, single", 1),
                                      ("sequential", f"daml, {exps} sequential calls", exps),
                                      ("batched", f"daml, {exps} batched in one call", exps)):
                s = r[kind]
                rate = s["cycles_per_s"] if kind == "single" else s["exp_cycles_per_s"]
                rmse = s["rmse_a"] if kind == "single" else s["rmse_a_median"]
                rmv = s["rmv_a"] if kind == "single" else s["rmv_a_median"]
                lost = f"{s['lost']}/{len(seeds) if kind == 'single' else n_exp}"
                flag = " ⚠" if dapper_rmse is not None and abs(rmse - dapper_rmse) > RMSE_TOLERANCE else ""
                ratio = rate / base[th] if th in base else None
                lines.append(
                    f"| {label} | {name} | {th} | {cycles} | {n_exp} | {_f(s['loop_s'], 2)} "
                    f"| {_f(s['call_s'], 2)} | {_f(s['cpu_s'], 2)} | {_rate(rate)} | {_f(rmse)}{flag} | {_f(rmv)} | {lost} "
                    f"| {_ratio(ratio)} |")
    lines.append("")
    lines += notes(results)
    lines += [
        "",
        _report.machine_line(results["machine"]) + f" Load average before / after the run: "
        f"{results['load_before']} / {results['load_after']}.",
        "",
        f"Command: `{results['command']}`",
    ]
    if d is not None:
        lines += ["", "DAPPER was run by the script as:", ""]
        lines += [f"    {d[key]['raw']['command']}" for key in ("full", "minimal", "full_1thread") if key in d]
    return "\n".join(lines)


def notes(results: dict[str, Any]) -> list[str]:
    d = results.get("dapper")
    threads = results["threads"]
    exps = results["experiments"]
    out = ["Notes:", ""]
    if d is None:
        out.append(f"* DAPPER was not run ({results.get('dapper_missing', 'no interpreter')}).")
        return out
    raw = d["full"]["raw"]
    pools = ", ".join(f"{p['internal_api']} {p['version']}: {p['num_threads']}" for p in raw["blas_pools"])
    out.append(
        f"* DAPPER {raw['dapper_version']} ran with numpy {raw['numpy']} in its own environment. Its time "
        "includes the statistics DAPPER computes inside `assimilate` at every cycle (mean, spread, error, "
        "CRPS, skewness, kurtosis, SVD spectrum, rank histogram, ...), so the default-statistics rows "
        "overstate the cost of the filter itself; the error-only rows switch most of that off "
        "(`rc.comps[\"error_only\"] = True`, no spectral statistics; rmv.a is then not computed) and are "
        "the closer measure of the filter alone. daml's loop time includes its own per-cycle divergence "
        "check and the copy of the analysis ensemble it records.")
    out.append(
        f"* Threads: DAPPER limits numpy's BLAS to one thread when `dapper.da_methods` is imported "
        f"(`threadpoolctl.threadpool_limits(1)` in `dapper/tools/multiproc.py`); for the {threads}-thread "
        f"rows the script set OMP/OPENBLAS/MKL_NUM_THREADS={threads} and re-applied the limit at {threads} "
        f"after the import (BLAS pools during the run: {pools}). The 1-thread rows compare DAPPER as "
        "shipped with `torch.set_num_threads(1)`.")
    if threads > 1:
        text = (f"* daml's {threads}-thread rows for single experiments are fragile on this kind of machine: "
                "a cycle is about 200 torch operations on tensors of a few hundred numbers, and the multi-threaded ones "
                "(matrix products, `triu`, ...) synchronise torch's OpenMP threads. Now and then, for whole runs "
                "at a time, each such operation was seen (torch.profiler) to take ~2.7 ms instead of ~5 µs, "
                "making the run 20-100× slower; one thread never showed this, and the batched runs, whose "
                "operations are large, gain from the second thread.")
        stalls = []
        for method in METHODS:
            r_t = next((r for r in results["daml"][method] if r["threads"] == threads), None)
            if r_t is None:
                continue
            times = {s["seed"]: s["loop_s"] for s in r_t["single"]["runs"]}
            fast = min(times.values())
            stalls += [f"{METHODS[method]['label'].split(' ')[0]} seed {seed} took {t:.2f} s against {fast:.2f} s"
                       for seed, t in times.items() if t > 3 * fast]
            per_call = r_t["sequential"]["loop_s"] / r_t["sequential"]["experiments"]
            if per_call > 3 * r_t["single"]["loop_s"]:
                stalls.append(f"{METHODS[method]['label'].split(' ')[0]}'s sequential calls averaged "
                              f"{per_call:.2f} s against a single-run median of {r_t['single']['loop_s']:.2f} s")
        text += (" In this run: " + "; ".join(stalls) + "." if stalls else
                 " It did not happen noticeably in this run.")
        out.append(text)
    for method in METHODS:
        full = d["full"]["summary"][method]
        mini = d["minimal"]["summary"][method] if "minimal" in d else None
        one = d.get("full_1thread", {}).get("summary", {}).get(method)
        ref = {threads: full["cycles_per_s"]}
        if one is not None:
            ref[1] = one["cycles_per_s"]
        rows = [r for r in results["daml"][method] if r["threads"] in ref]
        single = {r["threads"]: r["single"]["cycles_per_s"] / ref[r["threads"]] for r in rows}
        batched = {r["threads"]: r["batched"]["exp_cycles_per_s"] / ref[r["threads"]] for r in rows}
        speedup = {r["threads"]: r["batched"]["exp_cycles_per_s"] / r["sequential"]["exp_cycles_per_s"]
                   for r in rows}

        def per_thread(values: dict[int, float]) -> str:
            return ", ".join(f"{_x(v)} ({t} thread{'s' if t > 1 else ''})" for t, v in values.items())

        r_t = next(r for r in rows if r["threads"] == threads)
        text = (f"* {METHODS[method]['label']}: daml single run / DAPPER, cycles/s: {per_thread(single)}")
        if mini is not None:
            text += (f"; against DAPPER with error-only statistics "
                     f"{_x(r_t['single']['cycles_per_s'] / mini['cycles_per_s'])} ({threads} threads)")
        text += f". daml {exps} experiments batched in one call / DAPPER single run: {per_thread(batched)}"
        if mini is not None:
            text += (f"; against error-only DAPPER "
                     f"{_x(r_t['batched']['exp_cycles_per_s'] / mini['cycles_per_s'])} ({threads} threads)")
        text += f". daml batched / {exps} sequential calls: {per_thread(speedup)}. "
        best_single, best_batched = max(single.values()), max(batched.values())
        text += (f"**≥10× goal** (against DAPPER with its default statistics, at equal rmse.a): "
                 f"{'met' if best_single >= 10 else 'not met'} for single runs (best {_x(best_single)}), "
                 f"{'met' if best_batched >= 10 else 'not met'} for batched runs (best {_x(best_batched)})")
        if mini is not None:
            m_single = max(r["single"]["cycles_per_s"] for r in rows) / mini["cycles_per_s"]
            m_batched = max(r["batched"]["exp_cycles_per_s"] for r in rows) / mini["cycles_per_s"]
            text += (f"; against DAPPER's filter alone (error-only statistics) the best daml rows reach "
                     f"{_x(m_single)} single and {_x(m_batched)} batched")
        rm = [r_t["single"]["rmse_a"], r_t["batched"]["rmse_a_median"], r_t["sequential"]["rmse_a_median"]]
        equal = all(abs(x - full["rmse_a"]) <= RMSE_TOLERANCE for x in rm)
        text += (f". rmse.a: DAPPER {full['rmse_a']:.3f} (per seed "
                 f"{', '.join(f'{x:.3f}' for x in full['rmse_a_per_seed'])}), daml single {rm[0]:.3f}, "
                 f"batched median {rm[1]:.3f}, sequential median {rm[2]:.3f}: "
                 f"{'within' if equal else 'NOT within'} {RMSE_TOLERANCE} of DAPPER's.")
        out.append(text)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 cycles and 8 experiments (smoke test)")
    parser.add_argument("--cycles", type=int, default=None,
                        help="DAPPER's Ko (analysis cycles - 1); default 1000, 100 with --quick")
    parser.add_argument("--experiments", type=int, default=None, help="batched experiments (default 64, 8 quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3000, 3001, 3002])
    parser.add_argument("--dapper-python", default=None,
                        help=f"Python with DAPPER installed (default $DAPPER_PYTHON or {DEFAULT_DAPPER_PYTHON})")
    parser.add_argument("--no-single-thread", action="store_true", help="skip the one-thread rows")
    args = parser.parse_args(argv)
    ko = args.cycles if args.cycles is not None else (100 if args.quick else 1000)
    experiments = args.experiments if args.experiments is not None else (8 if args.quick else 64)
    cycles = ko + 1                     # DAPPER: analyses at ko = 0..Ko, the first one step after t = 0
    model, _ = model_and_operator()
    burn_in = burn_in_for(cycles, model.dt)
    threads = torch.get_num_threads()
    thread_list = [threads] if args.no_single_thread or threads == 1 else [threads, 1]

    results: dict[str, Any] = {
        "benchmark": "lorenz96",
        "quick": args.quick,
        "cycles": cycles,
        "Ko": ko,
        "experiments": experiments,
        "seeds": args.seeds,
        "burn_in": burn_in,
        "threads": threads,
        "methods": METHODS,
        "command": _report.command_line(),
        "machine": _report.machine_info(),
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    t_start = time.perf_counter()

    python = dapper_python(args.dapper_python)
    if python is None:
        results["dapper"] = None
        results["dapper_missing"] = "no DAPPER interpreter: pass --dapper-python or set $DAPPER_PYTHON"
        print(results["dapper_missing"], file=sys.stderr)
    else:
        results["dapper"] = {}
        variants = [("full", "full", threads), ("minimal", "minimal", threads)]
        if len(thread_list) > 1:
            variants.append(("full_1thread", "full", 1))
        for key, stats, th in variants:
            raw = run_dapper(python, ko, args.seeds, stats, th)
            if raw["cycles"] != cycles or abs(raw["burn_in"] - burn_in) > 1e-9:
                raise RuntimeError(f"DAPPER ran {raw['cycles']} cycles with burn-in {raw['burn_in']}, "
                                   f"expected {cycles} and {burn_in}")
            results["dapper"][key] = {"raw": raw, "summary": {m: summarise_dapper(raw, m) for m in METHODS}}

    results["daml"] = {m: [] for m in METHODS}
    for th in thread_list:
        for method in METHODS:
            results["daml"][method].append(run_daml(method, cycles, args.seeds, experiments, burn_in, th))

    results["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results["total_s"] = time.perf_counter() - t_start
    name = "lorenz96-quick" if args.quick else "lorenz96"
    print("wrote", _report.write_json(name, results))
    text = markdown(results)
    if not args.quick:
        print("wrote", _report.write_section("lorenz96", text))
    print(text)
    return results


if __name__ == "__main__":
    main()
