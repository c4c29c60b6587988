"""Benchmark: thread contention on small problems (issue 27 item 7).

The problem: 20 repeated single Lorenz-96 ETKF runs (DAPPER's ``sakov2008``: 40 variables, F = 8,
dt = 0.05, all observed with sd 1; ``make_filter("etkf", members=24, inflation=1.02, rotate=True)``;
300 cycles by default), each timed on its own (``time.perf_counter`` around ``daml.filters.run``),
in four configurations, run round-robin so that a change of the machine's load hits all of them:

* ``library``: torch's default intra-op thread count, with daml's choice
  (:func:`daml._device.auto_threads` around the run: one thread for a problem this small);
* ``default``: the default count forced (``DAML_THREADS`` = that count), i.e. without daml's choice;
* ``1`` and ``2``: one and two threads forced.

The check of the issue: in ``library``, the slowest run within 1.5 times the median. The same for
a small-network training case (``daml.ensembles.fit`` of 5 members of an MLP 1-20-1 on 256 points,
batch 32, 10 epochs, Adam only: a throughput case, whose members do not converge in 10 epochs;
``--fit-repeats`` runs). The load average before and after is recorded: the
outliers come from other jobs on the cores (torch's OpenMP threads spin while they wait for a
core), so a run on an idle machine shows little difference and a run beside other jobs a large one.

Run: ``python benchmarks/threads.py [--repeats 20] [--cycles 300] [--fit-repeats 5] [--no-write]``;
writes ``benchmarks/results/threads.json`` and its section of ``docs/benchmarks.md`` unless
``--no-write``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

import daml  # noqa: E402
from daml import _device  # noqa: E402
from daml.errors import ConvergenceWarning  # noqa: E402
from daml.models import Lorenz96, observe_all  # noqa: E402

MEMBERS, N_VARS = 24, 40


@contextlib.contextmanager
def configuration(name: str, default: int, work: int) -> Iterator[None]:
    """The thread setting of one configuration for a block (restored afterwards)."""
    saved = os.environ.get(_device.THREADS_ENV)
    try:
        if name == "library":
            os.environ.pop(_device.THREADS_ENV, None)
            with _device.auto_threads(work):
                yield
        else:
            count = default if name == "default" else int(name)
            os.environ[_device.THREADS_ENV] = str(count)        # wins over any choice inside daml
            with _device.threads(count):
                yield
    finally:
        if saved is None:
            os.environ.pop(_device.THREADS_ENV, None)
        else:
            os.environ[_device.THREADS_ENV] = saved


def summary(times: list[float]) -> dict[str, Any]:
    med = statistics.median(times)
    return {"median_s": med, "max_s": max(times), "min_s": min(times), "max_over_median": max(times) / med,
            "runs_s": times}


def measure(configs: list[str], repeats: int, default: int, work: int, call: Callable[[], Any]
            ) -> dict[str, dict[str, Any]]:
    """``repeats`` timed calls per configuration, round-robin, after one untimed call in each."""
    for name in configs:
        with configuration(name, default, work):
            call()
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(repeats):
        for name in configs:
            with configuration(name, default, work):
                c0, w0 = time.process_time(), time.perf_counter()
                call()
                times[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in configs)
              + f"; load {os.getloadavg()[0]:.2f}", flush=True)
    return {name: {**summary(times[name]), "cpu_median_s": statistics.median(cpu[name])} for name in configs}


def etkf_case(cycles: int) -> tuple[Callable[[], Any], int]:
    model, op = Lorenz96(n=N_VARS, forcing=8.0, dt=0.05), observe_all(N_VARS, sd=1.0)
    data = daml.simulate(model, cycles, op, every=1, x0=model.default_x0(), x0_cov=0.001, seed=0)
    filt = daml.filters.make_filter("etkf", members=MEMBERS, inflation=1.02, rotate=True)
    work = _device.ensemble_work((MEMBERS, N_VARS))
    return (lambda: daml.filters.run(filt, model, data, seed=1, progress=False)), work


def fit_case() -> tuple[Callable[[], Any], int]:
    import daml.ensembles as E

    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, generator=g, dtype=torch.float64) * 6 - 3
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(256, generator=g, dtype=torch.float64)
    members, batch = 5, 32
    work = _device.network_work(E.mlp(1, 20), members, batch)

    def call():
        with warnings.catch_warnings():          # 10 epochs: a throughput case, not a converged ensemble
            warnings.simplefilter("ignore", ConvergenceWarning)
            return E.fit(E.mlp(1, 20), x, y, members=members, noise_sd=0.1, epochs=10, batch_size=batch,
                         polish=False, seed=1, progress=False)
    return call, work


def table(title: str, results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"| {title} | median (s) | max (s) | max / median | CPU median (s) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        label = {"library": "default count, daml's choice", "default": "default count, no choice"}.get(
            name, f"{name} thread{'s' if name != '1' else ''} forced")
        lines.append(f"| {label} | {r['median_s']:.3f} | {r['max_s']:.3f} | {r['max_over_median']:.2f} | "
                     f"{r['cpu_median_s']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cycles", type=int, default=300)
    p.add_argument("--fit-repeats", type=int, default=5, help="0 skips the training case")
    p.add_argument("--configs", default="library,default,1,2")
    p.add_argument("--no-write", action="store_true", help="print only; write no JSON and no docs section")
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    default = torch.get_num_threads()
    info = _report.machine_info()
    load_before = os.getloadavg()
    call, work = etkf_case(args.cycles)
    etkf = measure(configs, args.repeats, default, work, call)
    fit = None
    if args.fit_repeats > 0:
        fcall, fwork = fit_case()
        fit = measure(configs, args.fit_repeats, default, fwork, fcall)
    load_after = os.getloadavg()
    out = {"machine": info, "command": _report.command_line(), "commit": _report.git_commit(),
           "default_threads": default, "small_work": _device.SMALL_WORK, "etkf_work": work,
           "cycles": args.cycles, "repeats": args.repeats, "load_before": load_before, "load_after": load_after,
           "etkf": etkf, "fit": fit}
    lines = ["## Threads: small problems and thread contention", "", _report.machine_line(info), "",
             f"`{out['command']}` at commit {out['commit']}; load average (1, 5, 15 min) "
             f"{tuple(round(v, 2) for v in load_before)} before, {tuple(round(v, 2) for v in load_after)} after. "
             f"{args.repeats} single L96-40 ETKF runs (N = 24, inflation 1.02, {args.cycles} cycles) per "
             f"configuration, round-robin; torch's default is {default} threads. daml's choice: one thread "
             f"below {_device.SMALL_WORK} elements per operation (this problem: {work}). Check: with daml's "
             "choice, the slowest run within 1.5 times the median.", "",
             *table("ETKF", etkf)]
    if fit is not None:
        lines += ["", f"Training: `daml.ensembles.fit`, 5 members of an MLP 1-20-1, 256 points, batch 32, "
                  f"10 epochs, {args.fit_repeats} runs per configuration.", "", *table("fit", fit)]
    print("\n".join(lines))
    if not args.no_write:
        _report.write_json("threads", out)
        _report.write_section("threads", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
