"""Benchmark: the Lagrangian network's batched Euler-Lagrange solve against a per-sample loop (issue 30, point 5).

The accelerations ``q'' = (d2L/dv2)^-1 [dL/dq - (d2L/dv dq) v]`` of a :class:`daml.models.hamiltonian.LagrangianNet`
for a batch of 256 double-pendulum states (``d = 2``; theta ~ U(0, 2 pi)^2, omega ~ U(-10, 10)^2, Cranmer et al.'s
training distribution), computed two ways:

* **batched** (daml): :func:`daml.models.hamiltonian.lagrangian_acceleration`, one ``torch.func.vmap`` over the batch of
  a gradient and ``d + 1`` forward-mode directional derivatives, then one batched ``torch.linalg.solve``;
* **loop** (the common implementation, torchdyn's ``LNN.forward`` pattern): a Python loop over the states, each
  with ``torch.autograd.functional.jacobian`` and ``hessian`` of ``L`` over the full ``(q, v)`` vector (with
  ``create_graph=True`` when a backward pass follows, as torchdyn always does), the blocks cut out and solved.

Timed: ``forward`` (the accelerations alone: the batched solve under ``torch.no_grad``, the loop without
``create_graph``) and ``forward + backward`` (an L1 loss on the accelerations, as Cranmer et al. train, back-propagated to the parameters), with 1
and 2 intra-op threads, for two networks: 2 x 128 softplus (the CPU budget of docs/physics.md) and Cranmer et al.'s
3 x 600 softplus with their initialisation. float64 (daml's CPU default). The batched solve: median of ``--repeats``
after one warm-up call; the loop (plain autograd calls, nothing to warm up): median of ``--loop-repeats`` (default 1),
for the 3 x 600 network on the first 64 states and scaled by 4 (``LOOP_STATES``; the table marks it). The 1-minute
load average is recorded with each row: the 2-thread rows are only meaningful on an otherwise idle machine. The two methods' accelerations are compared (max abs difference, recorded).

Run: ``OMP_NUM_THREADS=1 python benchmarks/lnn_speed.py [--repeats 3] [--quick]``; writes
``benchmarks/results/lnn_speed.json`` and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from daml.models.hamiltonian import LagrangianNet, lagrangian_acceleration  # noqa: E402

BATCH = 256
NETWORKS = {"2 x 128": {"hidden": 128, "layers": 2}, "3 x 600 (Cranmer)": {"hidden": 600, "layers": 3}}
LOOP_STATES = {"2 x 128": BATCH, "3 x 600 (Cranmer)": 64}
"""States the per-sample loop is timed on; its time is scaled by BATCH / states (the loop's cost is that of
``states`` identical iterations; 64 keeps the 3 x 600 loop, about 70 ms per state, within the run's budget)."""


def states(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 * math.pi
    v = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 20
    return q, v


def loop_acceleration(net: LagrangianNet, q: torch.Tensor, v: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """The per-sample reference: autograd.functional jacobian and hessian of L(x), x = (q, v), state by state."""
    d = q.shape[-1]

    def lag(x: torch.Tensor) -> torch.Tensor:
        return net.lagrangian(x[:d], x[d:])

    rows = []
    for qi, vi in zip(q, v):
        x = torch.cat([qi, vi])
        jac = torch.autograd.functional.jacobian(lag, x, create_graph=create_graph)
        hess = torch.autograd.functional.hessian(lag, x, create_graph=create_graph)
        rhs = jac[:d] - hess[d:, :d] @ vi
        rows.append(torch.linalg.solve(hess[d:, d:], rhs))
    return torch.stack(rows)


def timed(fn, repeats: int, warm: bool = True) -> tuple[float, list[float]]:
    if warm:
        fn()                                               # warm-up (torch.func's first call)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run(name: str, kw: dict, threads: int, repeats: int, loop_repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    net = LagrangianNet(2, seed=0, **kw)
    q, v = states(BATCH)
    target = torch.zeros(BATCH, 2, dtype=torch.float64)

    def batched_fwd():
        with torch.no_grad():
            return lagrangian_acceleration(net.lagrangian, q, v, check=False)

    m = LOOP_STATES[name]

    def loop_fwd():
        return loop_acceleration(net, q[:m], v[:m], create_graph=False).detach()

    def batched_bwd():
        net.zero_grad(set_to_none=True)
        (lagrangian_acceleration(net.lagrangian, q, v, check=False) - target).abs().mean().backward()

    def loop_bwd():
        net.zero_grad(set_to_none=True)
        (loop_acceleration(net, q[:m], v[:m], create_graph=True) - target[:m]).abs().mean().backward()

    diff = float((batched_fwd()[:m] - loop_fwd()).abs().max())
    scale = float(batched_fwd().abs().max())
    rows = []
    for mode, fb, fl in (("forward", batched_fwd, loop_fwd), ("forward + backward", batched_bwd, loop_bwd)):
        tb, all_b = timed(fb, repeats)
        tl, all_l = timed(fl, loop_repeats, warm=False)       # a loop of plain autograd calls: no warm-up
        tl *= BATCH / m
        rows.append({"network": name, "threads": threads, "mode": mode, "batch": BATCH, "batched_s": tb,
                     "loop_s": tl, "loop_states_timed": m, "speedup": tl / tb, "batched_all": all_b,
                     "loop_all_raw": all_l, "max_abs_diff": diff, "max_abs_acceleration": scale,
                     "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None})
        print(f"  {name:18s} threads={threads} {mode:18s} batched {tb * 1e3:9.2f} ms  loop {tl * 1e3:9.1f} ms  "
              f"x{tl / tb:7.1f}  (|diff| {diff:.1e})", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| network | threads | pass | batched (ms) | per-sample loop (ms) | speed-up | load (1 min) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        star = "" if r["loop_states_timed"] == r["batch"] else " *"
        load = r["load_average_1min"]
        lines.append(f"| {r['network']} | {r['threads']} | {r['mode']} | {r['batched_s'] * 1e3:.1f} | "
                     f"{r['loop_s'] * 1e3:.0f}{star} | {r['speedup']:.0f}x | "
                     f"{'-' if load is None else f'{load:.1f}'} |")
    if any(r["loop_states_timed"] != r["batch"] for r in rows):
        lines.append("")
        lines.append("\\* loop timed on the first 64 of the 256 states and scaled by 4 (its iterations are identical).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of the batched solve (median)")
    ap.add_argument("--loop-repeats", type=int, default=1, help="timed calls of the per-sample loop (median)")
    ap.add_argument("--quick", action="store_true", help="only the 2 x 128 network")
    args = ap.parse_args()
    info = _report.machine_info()
    rows = []
    nets = {k: v for k, v in NETWORKS.items() if not args.quick or k == "2 x 128"}
    for threads in (1, 2):
        for name, kw in nets.items():
            rows.extend(run(name, kw, threads, args.repeats, args.loop_repeats))
    md = table(rows)
    worst = min(r["speedup"] for r in rows)
    summary = (f"Batched Euler-Lagrange solve vs per-sample loop, batch {BATCH}, double pendulum, float64; "
               f"smallest speed-up {worst:.0f}x (goal >= 10x); largest |batched - loop| "
               f"{max(r['max_abs_diff'] for r in rows):.1e}.")
    _report.write_json("lnn_speed", {"command": _report.command_line(), "commit": _report.git_commit(),
                                     "machine": info, "batch": BATCH, "rows": rows, "summary": summary})
    print()
    print(summary)
    print(_report.machine_line(info))
    print(f"Command: `OMP_NUM_THREADS=1 {_report.command_line()}`")
    print()
    print(md)


if __name__ == "__main__":
    main()
