"""Benchmark: a batch of Sinkhorn problems in cache-sized pieces against one pass over the batch.

On the CPU :func:`daml.transport.sinkhorn` solves a batch in consecutive pieces whose kernels fit a
third of the last-level cache; the few slow problems each piece leaves are resumed together
(``daml.transport.sinkhorn._solve_in_pieces``). This script
times that loop against the same loop over the whole batch at once (``_solve``, what the solver did
before), on the problems of case (b) of ``benchmarks/sinkhorn.py``: B = 256 problems of 100 x 100,
cost |x_i - x_j|^2 over its mean for x ~ N(0, I_10), uniform a, ETPF-like Gaussian-likelihood b.

Both are called on the same tensors, one warm-up and the median of ``--repeats`` runs, alternating,
one thread. Fixed iterations (``tol = 0``, K iterations) give ms per iteration; time to tolerance
1e-6 (max_iter 5000) gives the wall time. The results must agree: the script checks the potentials
(plain Sinkhorn: equal to rounding) and reports the largest difference.

Run: ``python benchmarks/sinkhorn_pieces.py [--repeats 5]``; writes ``benchmarks/results/sinkhorn_pieces.json``
and its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from daml import _device  # noqa: E402
S = importlib.import_module("daml.transport.sinkhorn")   # the module (the package exports the function)


def problems(batch: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 10, generator=g, dtype=torch.float64)
    cost = torch.cdist(x, x) ** 2
    cost = cost / cost.mean((-2, -1), keepdim=True)
    lik = torch.randn(batch, n, generator=g, dtype=torch.float64)
    lb = torch.log_softmax(-(lik**2) / 0.2, -1)
    la = torch.full((batch, n), -torch.log(torch.tensor(float(n))).item(), dtype=torch.float64)
    return cost.to(dtype), la.to(dtype), lb.to(dtype)


def timed(fn, repeats: int) -> tuple[float, tuple]:
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rows = []
    for dtype in (torch.float64, torch.float32):
        cost, la, lb = problems(256, 100, dtype)
        for eps_value in (0.1, 0.05, 0.01):
            eps = torch.full((256,), eps_value, dtype=dtype)
            for mode, tol, max_iter in (("fixed", 0.0, args.iterations), ("tolerance", 1e-6, 5000)):
                for relaxation in ((1.0,) if mode == "fixed" else (1.0, "auto")):
                    call = (cost, la, lb, eps, tol, max_iter, 10, None, relaxation)
                    t_one, one = timed(lambda: S._solve(*call)[:6], args.repeats)
                    t_pieces, pieces = timed(lambda: S._solve_in_pieces(*call), args.repeats)
                    row = {"dtype": str(dtype).replace("torch.", ""), "eps": eps_value, "mode": mode,
                           "relaxation": relaxation, "one_pass_s": t_one, "pieces_s": t_pieces,
                           "speedup": t_one / t_pieces,
                           "max_iterations_one_pass": int(one[3].max()), "max_iterations_pieces": int(pieces[3].max()),
                           "potential_difference": float((one[1] - pieces[1]).abs().max()),
                           "largest_error_one_pass": float(one[2].max()), "largest_error_pieces": float(pieces[2].max())}
                    if mode == "fixed":
                        row["one_pass_ms_per_it"] = 1e3 * t_one / max_iter
                        row["pieces_ms_per_it"] = 1e3 * t_pieces / max_iter
                    rows.append(row)
                    print(row, flush=True)
    res = {"rows": rows, "repeats": args.repeats, "budget_bytes": _device.working_set_bytes("cpu"),
           "load_before": load, "machine": _report.machine_info(), "command": _report.command_line(),
           "daml_commit": _report.git_commit()}
    _report.write_json("sinkhorn_pieces", res)
    lines = [
        "## Sinkhorn: cache-sized pieces against one pass (issue 5)",
        "",
        f"B = 256 problems of 100 × 100 (case (b) of `benchmarks/sinkhorn.py`), one thread, median of "
        f"{args.repeats} after a warm-up, the two loops alternating on the same tensors. Piece budget "
        f"{res['budget_bytes'] / 2**20:.1f} MiB (a third of the last-level cache). Fixed: "
        f"{args.iterations} iterations, ms per iteration; tolerance: L1 error 1e-6, max_iter 5000, wall ms. "
        "Speed-up = one pass / pieces. Δg: largest difference of the potentials.",
        "",
        "| dtype | ε | mode | relaxation | one pass | pieces | speed-up | max iterations one pass / pieces | Δg |",
        "|---|---:|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        unit = (f"{r['one_pass_ms_per_it']:.3f} ms/it", f"{r['pieces_ms_per_it']:.3f} ms/it") if r["mode"] == "fixed" \
            else (f"{1e3 * r['one_pass_s']:.1f} ms", f"{1e3 * r['pieces_s']:.1f} ms")
        lines.append(f"| {r['dtype']} | {r['eps']:g} | {r['mode']} | {r['relaxation']} | {unit[0]} | {unit[1]} | "
                     f"{r['speedup']:.2f} | {r['max_iterations_one_pass']} / {r['max_iterations_pieces']} | "
                     f"{r['potential_difference']:.1e} |")
    lines += ["", _report.machine_line(res["machine"]) + f" Load average at start {load:.2f}; daml commit "
              f"{res['daml_commit']}.", "", f"Command: `{res['command']}`"]
    _report.write_section("sinkhorn_pieces", "\n".join(lines))
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
