"""Benchmark: what daml's results cost in memory, on disk and to read back (issue 27, items 3 and 4).

Three parts, each printing a table (nothing is written to the docs: the figures in docs/filters.md
and docs/posterior.md were copied from these tables, with the command):

``record``
    ``filters.run(..., keep="members" | "summary")`` on Lorenz-96 (40 variables, F = 8, all
    observed with sd 1, 3 experiments): the result's size, the peak resident memory the run adds,
    and the loop's seconds, for the ETKF (N = 24, inflation 1.02) over ``--etkf-analyses`` and the
    bootstrap PF (N = 3000, model noise 0.1) over ``--boot-analyses``. Each configuration runs in
    its own process (its ``VmHWM`` is the run's own high-water mark).
``netcdf``
    ``io.to_netcdf`` of an ETKF posterior (N = 24, 1000 analyses) and a bootstrap one (N = 1000,
    200 analyses) at zlib levels 0, 1, 4, 9 and with float32 storage: file size, write and read
    seconds.
``info``
    ``daml info``'s path (``io.open_dataset(lazy=True)`` and ``diagnostics.describe``) on a posterior
    of about 1 GB (1300 times, 1000 members, 100 variables, uncompressed, in a temporary folder that
    is removed afterwards) against loading it whole, each in its own process: seconds and peak
    resident memory.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/output_size.py record netcdf info
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def _peak_bytes() -> float:
    """This process's peak resident memory since it started (VmHWM: unlike ``ru_maxrss``, which Linux
    carries over from the parent through fork and exec, it restarts with the new program)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _l96_data(analyses: int):
    import daml
    from daml import models

    model = models.Lorenz96(n=40, forcing=8.0, dt=0.05)
    x0 = model.default_x0()
    for _ in range(200):                      # onto the attractor
        x0 = model.step(x0)
    data = daml.simulate(model, analyses, models.observe_all(40, sd=1.0), x0=x0, x0_cov=0.001,
                         experiments=3, seed=0)
    return model, data


def _record_one(name: str, members: int, keep: str, analyses: int) -> dict:
    """One configuration (run in a child process for its own peak memory)."""
    from daml import filters

    model, data = _l96_data(analyses)
    filt = (filters.inflate(filters.etkf(members=members), 1.02) if name == "etkf"
            else filters.bootstrap(members=members, model_noise=0.1))
    filters.run(filt, model, data.isel(time=slice(0, 3)), seed=1, progress=False, keep=keep)   # first-call costs
    before = _peak_bytes()
    res = filters.run(filt, model, data, seed=1, progress=False, keep=keep)
    after = _peak_bytes()
    return {"filter": name, "members": members, "keep": keep, "analyses": int(res.analysis.sizes["time"]),
            "result_MB": res.analysis.nbytes / 1e6, "added_MB": (after - before) / 1e6, "seconds": res.seconds}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_record(etkf_analyses: int, boot_analyses: int) -> None:
    print("| run | analyses | result | memory added | seconds |\n|---|---|---|---|---|")
    for name, members, analyses in (("etkf", 24, etkf_analyses), ("bootstrap", 3000, boot_analyses)):
        for keep in ("members", "summary"):
            r = _child(["record", name, str(members), keep, str(analyses)])
            print(f"| {name} N={members}, `keep=\"{keep}\"` | {r['analyses']} | {r['result_MB']:.2f} MB | "
                  f"{r['added_MB']:.0f} MB | {r['seconds']:.1f} |", flush=True)


def part_netcdf() -> None:
    from daml import filters, io

    model, data = _l96_data(1000)
    posts = {"ETKF N=24, 1000 analyses": filters.run(filters.inflate(filters.etkf(members=24, rotate=True), 1.02),
                                                     model, data, seed=1, progress=False).analysis}
    model, data = _l96_data(200)
    posts["bootstrap N=1000, 200 analyses"] = filters.run(filters.make_filter("bootstrap", members=1000), model,
                                                          data, seed=1, progress=False).analysis
    print("| posterior | options | MB | size ratio | write s | read s |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "p.nc")
        for label, post in posts.items():
            raw = None
            for opts in (dict(compression=0), dict(compression=1), dict(compression=4), dict(compression=9),
                         dict(compression=0, dtype="float32"), dict(compression=1, dtype="float32")):
                t = time.perf_counter()
                io.to_netcdf(post, path, **opts)
                write = time.perf_counter() - t
                size = os.path.getsize(path) / 1e6
                raw = raw or size
                t = time.perf_counter()
                io.open_posterior(path)
                read = time.perf_counter() - t
                text = ", ".join(f"{k}={v}" for k, v in opts.items())
                print(f"| {label} | {text} | {size:.1f} | {size / raw:.3f} | {write:.2f} | {read:.2f} |", flush=True)
                os.remove(path)


def _big_file(path: str) -> None:
    import daml

    times, members, n = 1300, 1000, 100                   # 1300 x 1000 x 100 x 8 bytes = 1.04 GB
    rng = np.random.default_rng(0)
    x = np.empty((times, members, n))
    for t in range(times):
        x[t] = rng.standard_normal((members, n))
    post = daml.from_members(x, rng.normal(size=(times, members)), dims=("time", "member", "variable"),
                             method="big", seed=0)
    del x
    daml.io.to_netcdf(post, path, compression=0)


def _describe(path: str, lazy: bool) -> dict:
    from daml import diagnostics, io

    t = time.perf_counter()
    if lazy:
        with io.open_dataset(path, lazy=True) as ds:
            diagnostics.describe(ds)
    else:
        diagnostics.describe(io.open_posterior(path))
    return {"seconds": time.perf_counter() - t,
            "peak_MB": _peak_bytes() / 1e6}


def part_info() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        path = os.path.join(folder, "big.nc")
        _child(["big", path])
        print(f"file: {os.path.getsize(path) / 1e9:.2f} GB")
        print("| reading | describe s | peak resident MB |\n|---|---|---|")
        for lazy in (True, False):
            r = _child(["info", path, "lazy" if lazy else "eager"])
            print(f"| {'lazy (daml info)' if lazy else 'whole file loaded'} | {r['seconds']:.2f} | {r['peak_MB']:.0f} |",
                  flush=True)
        base = _child(["import"])
        print(f"(the process with daml imported: {base['peak_MB']:.0f} MB)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "record":
            print(json.dumps(_record_one(rest[0], int(rest[1]), rest[2], int(rest[3]))))
        elif kind == "big":
            _big_file(rest[0])
            print("{}")
        elif kind == "info":
            print(json.dumps(_describe(rest[0], rest[1] == "lazy")))
        else:
            import daml  # noqa: F401

            print(json.dumps({"peak_MB": _peak_bytes() / 1e6}))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", choices=["record", "netcdf", "info"])
    parser.add_argument("--etkf-analyses", type=int, default=1000)
    parser.add_argument("--boot-analyses", type=int, default=100)
    args = parser.parse_args()
    print(f"daml output-size benchmark; load average {os.getloadavg()[0]:.2f}")
    for part in args.parts:
        print(f"\n## {part}")
        {"record": lambda: part_record(args.etkf_analyses, args.boot_analyses), "netcdf": part_netcdf,
         "info": part_info}[part]()


if __name__ == "__main__":
    main()
