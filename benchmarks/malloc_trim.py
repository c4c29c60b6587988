"""Benchmark: glibc's malloc settings that Dask's nanny gives its workers, against daml's training (issue 31).

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``. This script trains the same small
ensemble (``daml.ensembles.fit``: 8 members of a 1-50-1 tanh network, 400 points, 50 epochs, one thread) in a
fresh Python process for each environment below, and reports the fit's time (median of ``--repeats``
processes):

* nothing set (glibc's defaults, with its dynamic mmap threshold);
* ``MALLOC_TRIM_THRESHOLD_=65536`` (the nanny's setting);
* ``MALLOC_TRIM_THRESHOLD_=67108864`` (a large value: setting the variable at all freezes the mmap threshold);
* ``MALLOC_TRIM_THRESHOLD_=65536`` with ``MALLOC_MMAP_THRESHOLD_=33554432`` (the fix docs/distributed.md gives
  for clusters that daml does not start).

Run: ``python benchmarks/malloc_trim.py [--repeats 3]``; writes ``benchmarks/results/malloc_trim.json`` and its
section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

JOB = """
import time, torch
from daml import ensembles
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.rand(400, 1, generator=g, dtype=torch.float64) * 6 - 3
y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(400, generator=g, dtype=torch.float64)
t = time.perf_counter()
ensembles.fit(ensembles.mlp(1, 50, 1, activation="tanh"), x, y, members=8, noise_sd=0.1, epochs=50, seed=5,
              progress=False)
print(time.perf_counter() - t)
"""

SETTINGS = {
    "nothing set": {},
    "MALLOC_TRIM_THRESHOLD_=65536 (Dask's nanny)": {"MALLOC_TRIM_THRESHOLD_": "65536"},
    "MALLOC_TRIM_THRESHOLD_=67108864": {"MALLOC_TRIM_THRESHOLD_": "67108864"},
    "MALLOC_TRIM_THRESHOLD_=65536, MALLOC_MMAP_THRESHOLD_=33554432": {"MALLOC_TRIM_THRESHOLD_": "65536",
                                                                     "MALLOC_MMAP_THRESHOLD_": "33554432"},
}


def _time(extra: dict) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra})
    out = subprocess.run([sys.executable, "-c", JOB], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    res = {"command": _report.command_line(), "daml_commit": _report.git_commit(), "machine": _report.machine_info(),
           "repeats": args.repeats, "seconds": {}}
    for label, extra in SETTINGS.items():
        res["seconds"][label] = statistics.median(_time(extra) for _ in range(args.repeats))
        print(label, res["seconds"][label], flush=True)
    base = res["seconds"]["nothing set"]
    lines = ["## malloc settings of Dask workers against daml's training (issue 31)", "",
             f"{_report.machine_line(res['machine'])} One `ensembles.fit` (8 members, 1-50-1 tanh, 400 points, 50 epochs, "
             f"one thread) in a fresh process per setting, median of {args.repeats}. Command: `{res['command']}`.", "",
             "| environment | fit | against nothing set |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} s | {v / base:.2f} x |" for k, v in res["seconds"].items()]
    _report.write_json("malloc_trim", res)
    _report.write_section("malloc_trim", "\n".join(lines) + "\n")
    print(json.dumps(res["seconds"], indent=1))


if __name__ == "__main__":
    main()
