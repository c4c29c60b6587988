"""Benchmark: one diffusion analysis of a large Lorenz-96 state (issue 6, speed).

N = 20 members of an L96 state with n = 10^4 and 10^5 variables (members: a climatological draw,
mean 2.3, sd 3.6), every k-th variable observed with sd 1, 20 posterior particles, 100 reverse SDE
steps. Reported: wall seconds of :func:`daml.diffusion.analysis` (median of ``--repeats`` after one
warm-up) and the peak resident memory of the process that ran it (each configuration runs in its
own process). Variants whose cost is linear in n: the zero-bandwidth weighted forcing and the seed's
ensemble forcing (plain and with conditional weights). Kernel bandwidths, the Gaussian forcing and
localisation need ``d x d`` or ``p x d`` matrices and are not run at these sizes.

Run: ``python benchmarks/diffusion_speed.py [--device cuda]``; writes
``benchmarks/results/diffusion_speed.json`` and its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

SIZES = ((10_000, 4), (100_000, 10))          # (n, observe every k-th variable)
VARIANTS = {"weighted, h = 0": {"forcing": "weighted"},
            "ensemble (seed)": {"forcing": "ensemble"},
            "ensemble (seed), conditional": {"forcing": "ensemble", "conditional": True}}


def worker(n: int, every: int, variant: str, repeats: int, device: str) -> dict:
    import daml
    from daml import diffusion as dif

    torch.set_num_threads(1) if device == "cpu" else None
    g = torch.Generator().manual_seed(0)
    members = (2.3 + 3.6 * torch.randn(20, n, generator=g, dtype=torch.float64)).to(device)
    # a selection function, not observe_every: its dense H would be p x n (8 GB at n = 10^5)
    op = daml.models.observe_nonlinear(lambda x: x[..., ::every], n, len(range(0, n, every)), sd=1.0)
    y = (2.3 + 3.6 * torch.randn(op.size, generator=g, dtype=torch.float64)).to(device)
    op.noise_cov = op.noise_cov.to(device)
    times = []
    for r in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = dif.analysis(members, y, op, steps=100, seed=r, **VARIANTS[variant])
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert bool(torch.isfinite(x).all())
    out = {"n": n, "every": every, "variant": variant, "device": device, "seconds": float(np.median(times[1:])),
           "seconds_all": times[1:], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", nargs=3, metavar=("N", "EVERY", "VARIANT"))
    args = ap.parse_args()
    if args.worker:
        n, every, variant = int(args.worker[0]), int(args.worker[1]), args.worker[2]
        print(json.dumps(worker(n, every, variant, args.repeats, args.device)))
        return
    info = _report.machine_info()
    rows = []
    for n, every in SIZES:
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--worker", str(n), str(every), variant, "--repeats", str(args.repeats),
                   "--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rec = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(rec)
            print(rec, flush=True)
    lines = ["## Diffusion DA: one analysis of a large Lorenz-96 state", "",
             "20 members, 20 particles, 100 reverse SDE steps (log-spaced to t_min = 1e-4), observations of every "
             "k-th variable with sd 1. Seconds: median of the timed analyses after a warm-up; memory: peak "
             "resident set of the process (it includes the dense observation-noise matrix R of the "
             "`Observation` type, p² × 8 bytes: 50 MB at n = 10⁴, 800 MB at n = 10⁵).", "",
             _report.machine_line(info) + f" Device: {args.device}.", "",
             "| n | observed | variant | seconds | peak RSS (MB) |" + (" peak CUDA (MB) |" if args.device == "cuda" else ""),
             "|---:|---:|---|---:|---:|" + ("---:|" if args.device == "cuda" else "")]
    for r in rows:
        cuda = f" {r['peak_cuda_mb']:.0f} |" if "peak_cuda_mb" in r else ""
        lines.append(f"| {r['n']:,} | every {r['every']} | {r['variant']} | {r['seconds']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |{cuda}")
    lines += ["", f"Command: `{_report.command_line()}`", ""]
    text = "\n".join(lines)
    print(text)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    _report.write_json("diffusion_speed" + suffix, {"machine": info, "rows": rows})
    _report.write_section("diffusion_speed" + suffix, text)


if __name__ == "__main__":
    main()
