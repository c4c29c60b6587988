"""Benchmark: daml on Dask distributed against the same work in one process (issue 31).

Four measurements on local clusters of worker processes (one Dask thread each, ``daml.distributed.connect
("local:N")``) on this machine, each against the same computation in this process, in the same run:

* **overhead**: the round trip of one no-op task (median of 50, submitted one after the other) and the
  cost per task of 2000 no-op tasks submitted at once (total / 2000), on 2 workers;
* **sweep**: ``daml.experiment.run_experiments`` of four Lorenz-96 experiments (40 variables, 4 methods each,
  16 tasks of about a second or more), in one process (1 and 2 intra-op threads) and with ``client=`` on 1
  and 2 workers; the scores are checked bit for bit against the one-process run; the bytes a task's
  inputs and result take (pickled) are recorded for the scaling model;
* **member blocks**: ``daml.ensembles.fit`` of an ensemble of 1-50-1 tanh networks in one process and
  ``daml.distributed.fit`` on 1 worker (one block) and 2 workers (two blocks); the ensembles are checked
  bit for bit;
* **local analyses**: one LETKF analysis cycle (a Lorenz-96 forecast of one observation interval, in this
  process, then the analysis) of a 10^5-variable state, 40 members, every variable observed (sd 1),
  radius 4 (halo 14): the analysis in one process (:func:`daml.filters.local.letkf_local`) and in
  blocks on 1 and 2 workers (:func:`daml.distributed.local_analysis`), checked for equality.

Cluster start-up (a few seconds) and the first task of each worker (importing daml, seconds) are recorded
apart and left out of the timed runs: a warm-up task runs on every worker first. Timings are medians of
``--repeats``. The machine has 2 cores, so 2 workers is the most that can pay here; ``docs/benchmarks.md``
states a model of how the times scale on many nodes, from the measured overhead and transfer sizes.

Run: ``OMP_NUM_THREADS=1 python benchmarks/scale_out.py [--repeats 3] [--quick]``; writes
``benchmarks/results/scale_out.json`` and its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from daml import distributed, experiment  # noqa: E402

SWEEP = """
[experiment]
name = "sweep{k}"
steps = {steps}
burn_in = {burn}
experiments = 4
seed = {seed}

[model]
name = "lorenz96"
n = 40

[observations]
kind = "all"
sd = 1.0

[prior]
cov = 0.1

[[methods]]
name = "etkf"
members = 40
inflation = 1.02

[[methods]]
name = "letkf"
members = 20
radius = 4.0
inflation = 1.02

[[methods]]
name = "enkf"
members = 40
inflation = 1.02

[[methods]]
name = "bootstrap"
members = 500
"""


def _noop(x: Any = None) -> Any:
    return x


def _warm(client: Any) -> float:
    """Import daml on every worker (timed): the first task of a fresh worker."""
    t0 = time.perf_counter()
    client.run(lambda: __import__("daml.experiment") and None)
    return time.perf_counter() - t0


def _median_time(fn, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def overhead(client: Any, tasks: int = 2000) -> dict:
    lat = []
    for _ in range(50):
        t0 = time.perf_counter()
        client.submit(_noop, None, pure=False).result()
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    futs = client.map(_noop, range(tasks), pure=False)
    client.gather(futs)
    total = time.perf_counter() - t0
    del futs
    return {"round_trip_ms": 1e3 * statistics.median(lat), "per_task_ms": 1e3 * total / tasks, "tasks": tasks}


def _same_scores(a, b) -> bool:
    for (_, s1), (_, s2) in zip(a, b):
        for x, y in zip(s1, s2):
            if x.rmse_a_each != y.rmse_a_each or not (x.crps == y.crps or (math.isnan(x.crps) and math.isnan(y.crps))):
                return False
            for v in x.posterior.data_vars:
                if not np.array_equal(x.posterior[v].values, y.posterior[v].values, equal_nan=True):
                    return False
    return True


def sweep(clients: dict[int, Any], repeats: int, steps: int) -> dict:
    exps = [experiment.load_config(SWEEP.format(k=k, seed=100 + k, steps=steps, burn=0.25 * 0.05 * steps)) for k in range(4)]
    out: dict[str, Any] = {"experiments": len(exps), "tasks": sum(len(e.methods) for e in exps), "steps": steps}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t, ref = _median_time(lambda: experiment.run_experiments(exps, progress=False, threads=threads), repeats)
        out[f"one_process_{threads}_threads_s"] = t
        if threads == 1:
            first = ref
            out["method_seconds"] = {f"{exps[0].name}:{s.label}": s.seconds for s in ref[0][1]}
    torch.set_num_threads(1)
    for n, client in clients.items():
        t, got = _median_time(lambda: experiment.run_experiments(exps, progress=False, threads=1, client=client),
                              repeats)
        out[f"workers_{n}_s"] = t
        out[f"workers_{n}_bitwise"] = _same_scores(first, got)
    # what travels: one experiment's inputs (once) and one method's result
    model, op, data = experiment.build_data(exps[0])
    payload = {"exp": exps[0], "plan": experiment.output_plan(exps[0]), "model": model, "op": op, "data": data,
               "clim": None}
    out["input_bytes_per_experiment"] = len(pickle.dumps(payload))
    out["result_bytes_per_method"] = statistics.median(len(pickle.dumps(s)) for s in first[0][1])
    return out


def member_blocks(clients: dict[int, Any], repeats: int, members: int, epochs: int) -> dict:
    from daml import ensembles

    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, generator=g, dtype=torch.float64) * 6 - 3
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(400, generator=g, dtype=torch.float64)
    net = ensembles.mlp(1, 50, 1, activation="tanh")
    kw = dict(members=members, noise_sd=0.1, epochs=epochs, seed=5, progress=False)
    out: dict[str, Any] = {"members": members, "epochs": epochs, "network": "1-50-1 tanh", "data": 400}
    torch.set_num_threads(1)
    t, ref = _median_time(lambda: ensembles.fit(net, x, y, **kw), repeats)
    out["one_process_s"] = t
    for n, client in clients.items():
        t, got = _median_time(lambda: distributed.fit(net, x, y, client=client, **kw), repeats)
        out[f"workers_{n}_s"] = t
        out[f"workers_{n}_bitwise"] = all(torch.equal(ref.params[k], got.params[k]) for k in ref.params)
    return out


def local_analyses(clients: dict[int, Any], repeats: int, n: int, members: int, radius: float) -> dict:
    import xarray as xr

    from daml.filters import local
    from daml.models import make_model

    model = make_model("lorenz96", n=n)
    g = torch.Generator().manual_seed(1)
    truth = 8.0 + torch.randn(n, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(100):                           # onto the attractor
            truth = model.step(truth)
        ens = truth + torch.randn(members, n, generator=g, dtype=torch.float64)
        obs = truth + torch.randn(n, generator=g, dtype=torch.float64)
    out: dict[str, Any] = {"n": n, "members": members, "radius": radius, "halo": local.halo(radius)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            t, fc = _median_time(lambda: model.step(ens), repeats)
        out[f"forecast_{threads}_threads_s"] = t
    torch.set_num_threads(1)
    grid = {"variable": np.arange(n)}
    fx = xr.DataArray(fc.numpy(), dims=("member", "variable"), coords=grid, name="x")
    ya = xr.DataArray(obs.numpy(), dims=("variable",), coords=grid)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t, ref = _median_time(lambda: distributed.local_analysis(fx, ya, 1.0, radius), repeats)
        out[f"analysis_one_process_{threads}_threads_s"] = t
        if threads == 1:
            first = ref
    torch.set_num_threads(1)
    out["input_bytes"] = (members + 2) * n * 8
    for k, client in clients.items():
        t, got = _median_time(lambda: distributed.local_analysis(fx, ya, 1.0, radius, client=client), repeats)
        out[f"analysis_workers_{k}_s"] = t
        out[f"analysis_workers_{k}_blocks"] = int(got.attrs["blocks"])
        diff = float(np.abs(got["x"].values - first["x"].values).max())
        out[f"analysis_workers_{k}_max_abs_diff"] = diff
        out[f"analysis_workers_{k}_bitwise"] = bool(np.array_equal(got["x"].values, first["x"].values))
    err_f = float(np.sqrt(((fc.mean(0) - truth) ** 2).mean()))
    err_a = float(np.sqrt(((torch.from_numpy(first["x"].values).mean(0) - truth) ** 2).mean()))
    out["rmse_forecast"], out["rmse_analysis"] = err_f, err_a
    return out


def _table(res: dict) -> str:
    o, s, m, a = res["overhead"], res["sweep"], res["members"], res["letkf"]
    lines = [
        "## Dask distributed: sweeps, member blocks and blocked local analyses (issue 31)",
        "",
        f"{_report.machine_line(res['machine'])} Local clusters of worker processes with one Dask thread each "
        "(`daml.distributed.connect('local:N')`); cluster start and the workers' first import are left out "
        f"(measured: {res['startup_s']['2']:.1f} s to start 2 workers, daml imported on them included). "
        f"Medians of {res['repeats']} runs. Command: `{res['command']}`.",
        "",
        f"**Overhead** (2 workers): one no-op task's round trip {o['round_trip_ms']:.2f} ms; "
        f"{o['tasks']} no-op tasks at once: {o['per_task_ms']:.2f} ms per task.",
        "",
        "| workload | one process, 1 thread | one process, 2 threads | 1 worker | 2 workers | speed-up, 2 workers / best one-process | bit for bit |",
        "|---|---|---|---|---|---|---|",
    ]
    best = min(s["one_process_1_threads_s"], s["one_process_2_threads_s"])
    lines.append(f"| sweep: {s['experiments']} experiments x 4 methods ({s['tasks']} tasks) | "
                 f"{s['one_process_1_threads_s']:.2f} s | {s['one_process_2_threads_s']:.2f} s | {s['workers_1_s']:.2f} s | "
                 f"{s['workers_2_s']:.2f} s | {best / s['workers_2_s']:.2f} | "
                 f"{'yes' if s['workers_1_bitwise'] and s['workers_2_bitwise'] else 'NO'} |")
    lines.append(f"| member blocks: fit, {m['members']} members ({m['network']}, {m['data']} points, "
                 f"<= {m['epochs']} epochs) | {m['one_process_s']:.2f} s | - | {m['workers_1_s']:.2f} s | "
                 f"{m['workers_2_s']:.2f} s | {m['one_process_s'] / m['workers_2_s']:.2f} | "
                 f"{'yes' if m['workers_1_bitwise'] and m['workers_2_bitwise'] else 'NO'} |")
    best_a = min(a["analysis_one_process_1_threads_s"], a["analysis_one_process_2_threads_s"])
    lines.append(f"| LETKF analysis, n = {a['n']:,}, N = {a['members']}, radius {a['radius']:g} (halo {a['halo']}) | "
                 f"{a['analysis_one_process_1_threads_s']:.2f} s | {a['analysis_one_process_2_threads_s']:.2f} s | "
                 f"{a['analysis_workers_1_s']:.2f} s | {a['analysis_workers_2_s']:.2f} s | "
                 f"{best_a / a['analysis_workers_2_s']:.2f} | "
                 f"{'yes' if a['analysis_workers_1_bitwise'] and a['analysis_workers_2_bitwise'] else 'max diff %.1e' % a['analysis_workers_2_max_abs_diff']} |")
    cyc1 = a["forecast_1_threads_s"] + a["analysis_one_process_1_threads_s"]
    cyc2 = a["forecast_1_threads_s"] + a["analysis_workers_2_s"]
    lines += [
        "",
        f"LETKF cycle on {a['n']:,} variables (forecast of one observation interval in this process, "
        f"{a['forecast_1_threads_s']:.2f} s on 1 thread, {a['forecast_2_threads_s']:.2f} s on 2, then the analysis): "
        f"{cyc1:.2f} s per cycle in one process (1 thread), {cyc2:.2f} s with the analysis on 2 workers "
        f"({a['analysis_workers_2_blocks']} blocks). RMSE of the mean against the truth: forecast {a['rmse_forecast']:.3f}, "
        f"analysis {a['rmse_analysis']:.3f}.",
        "",
        f"Transfers: an experiment's inputs {s['input_bytes_per_experiment'] / 1e3:.0f} kB (sent once), a method's "
        f"result {s['result_bytes_per_method'] / 1e6:.2f} MB; the LETKF's state and observations "
        f"{a['input_bytes'] / 1e6:.1f} MB per analysis.",
        "",
        _model(res),
    ]
    return "\n".join(lines) + "\n"


def _model(res: dict) -> str:
    """How these numbers should extrapolate to many nodes: a model from the measured overhead, task times
    and transfer sizes, with the network bandwidth an assumption (stated), not a measurement."""
    o, s, m, a = res["overhead"], res["sweep"], res["members"], res["letkf"]
    c = o["per_task_ms"] / 1e3                           # s per task, many tasks in flight
    bw = 1.25e9                                          # assumed: 10 Gb/s between client and workers
    t_task = s["one_process_1_threads_s"] / s["tasks"]  # mean method time in this sweep
    out_b = s["result_bytes_per_method"]
    # a sweep of K methods on P workers: K t / P compute, K c scheduling, K out / bw results into the client
    k, p = 1000, 100
    sweep_compute, sweep_sched, sweep_io = k * t_task / p, k * c, k * out_b / bw
    # the LETKF: per grid point alpha = (one-process analysis time) / n; a block of B points with halo h
    alpha = a["analysis_one_process_1_threads_s"] / a["n"]
    n6, mem, h, workers = 1_000_000, a["members"], a["halo"], 800
    block = n6 // (2 * workers)
    letkf_compute = alpha * block * (block + 2 * h) / block * 2      # two blocks per worker
    letkf_io = (mem + 2) * n6 * 8 / bw + mem * n6 * 8 / bw           # state out and analysis back, via the client
    return "\n".join([
        "**Scaling model** (a model from the figures above, not a measurement; the network is assumed to carry "
        "10 Gb/s between the client and the workers). Let `c` = "
        f"{1e3 * c:.1f} ms be the cost of a task when many are in flight, `K` tasks of mean length `t` run on `P` workers:",
        "",
        "* *Sweep*: `T(P) ~ max(K t / P, t_max) + K c + K S_out / bandwidth + client writes`. With this sweep's mean "
        f"method ({t_task:.2f} s) and result size ({out_b / 1e6:.1f} MB), {k} methods on {p} workers: compute "
        f"{sweep_compute:.0f} s, scheduling {sweep_sched:.1f} s, results into the client {sweep_io:.1f} s. Every result "
        "comes back to the one client, so that term grows with the result size and not with the workers: record "
        "summaries (`[output] keep = \"summary\"`) for large sweeps. On a 1 Gb/s network it would be ten times "
        "larger than stated here.",
        "* *Member blocks*: a vmapped pass costs about `a + b M` (a fixed cost per step plus a cost per member), so "
        "`P` blocks take `a + b M / P`: blocks pay only when `b M / P` is large against `a`, that is for many or large "
        f"members. Here {m['members']} members of a {m['network']} network on 2 workers: "
        f"{m['one_process_s'] / m['workers_2_s']:.2f} x. On many nodes the same holds per node; the transfer (the data "
        "once per block, the parameters back) is small for such networks.",
        f"* *LETKF*: the analysis costs `alpha` = {1e6 * alpha:.0f} us per grid point here (N = {mem}, halo {h}). "
        f"For n = 10^6 on {workers} workers (two blocks each, halo overhead `2h / B`): compute about "
        f"{letkf_compute:.2f} s per cycle, while sending the state and observations out and the analysis back "
        f"through the client takes {letkf_io:.2f} s at the assumed bandwidth. At that scale the state should stay on "
        "the workers between cycles (forecast there too, a persisted Dask array); daml's `local_analysis` takes the "
        "state from the client, which pays while the state's transfer time is below its analysis time on one "
        f"worker (n x {(2 * mem + 2) * 8} bytes / bandwidth < n alpha: always here, "
        f"{(2 * mem + 2) * 8 / bw * 1e6:.2f} us against {1e6 * alpha:.0f} us per point) and up to about "
        f"P ~ alpha bandwidth / {(2 * mem + 2) * 8} B = {alpha * bw / ((2 * mem + 2) * 8):.0f} workers.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run; not written to the docs)")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the docs section from benchmarks/results/scale_out.json without measuring")
    args = parser.parse_args()
    if args.table_only:
        import json

        res = json.loads((_report.RESULTS / "scale_out.json").read_text())
        _report.write_section("scale_out", _table(res))
        print(_table(res))
        return
    torch.set_num_threads(1)
    res: dict[str, Any] = {"command": _report.command_line(), "daml_commit": _report.git_commit(),
                           "machine": _report.machine_info(), "repeats": args.repeats,
                           "startup_s": {}, "first_import_s": {}}
    clients = {}
    try:
        for n in (1, 2):
            t0 = time.perf_counter()
            clients[n] = distributed.connect(f"local:{n}")
            clients[n].wait_for_workers(n)
            res["startup_s"][str(n)] = time.perf_counter() - t0
            res["first_import_s"][str(n)] = _warm(clients[n])
        res["overhead"] = overhead(clients[2], 200 if args.quick else 2000)
        print("overhead", res["overhead"], flush=True)
        res["sweep"] = sweep(clients, args.repeats, 100 if args.quick else 500)
        print("sweep", res["sweep"], flush=True)
        res["members"] = member_blocks(clients, args.repeats, 8 if args.quick else 64, 50 if args.quick else 200)
        print("members", res["members"], flush=True)
        res["letkf"] = local_analyses(clients, args.repeats, 2_000 if args.quick else 100_000, 40, 4.0)
        print("letkf", res["letkf"], flush=True)
    finally:
        for c in clients.values():
            c.close()
    if args.quick:
        print(_table(res))
        return
    _report.write_json("scale_out", res)
    _report.write_section("scale_out", _table(res))
    print(_table(res))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
