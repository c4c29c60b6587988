"""Benchmark: daml's Sinkhorn solver (:func:`daml.transport.sinkhorn`) against POT, on the CPU.

Protocol
--------
Problems. One seeded numpy generator per problem size draws points ``x ~ N(0, I_10)``; the cost is
the squared distance ``C_ij = |x_i - x_j|^2`` divided by its mean, so ``epsilon`` is relative to the
mean cost and is passed unchanged to every solver (POT's ``reg``, daml's ``epsilon``). Source masses
are uniform, ``a = 1/n``; target masses are ETPF-like Gaussian likelihood weights
``b_i ∝ exp(-(x_i0 - 1)^2 / (2 s2))`` with ``s2 = 0.1`` (degenerate: effective sample size about a
quarter of n), normalised in float64 by log-sum-exp. Every solver gets the same ``C, a, b`` cast to
the dtype under test (float64 and float32 separately, ``a`` and ``b`` renormalised in that dtype).

* Case (a): one ``n x n`` problem, ``n`` in 1000, 2000, 5000.
* Case (b): ``B = 256`` independent ``100 x 100`` problems (ETPF-like), solved as one batch where the
  solver allows it.

Epsilon in 0.1, 0.05, 0.01 (``--eps``).

Two modes.

(i) Fixed iterations ``K``: POT with ``stopThr=0`` and daml with ``tol=0, max_iter=K`` both do exactly
``K`` iterations (one iteration = one update of each potential), so the time per iteration and the
time per matrix entry per half-iteration, ``t / (2 K n m B)``, compare the loops themselves (set-up,
e.g. forming the kernel, is included and amortised over ``K``). POT's log-domain solver is slow; in
case (a) it runs only at n <= 2000 with fewer iterations (20) and its time is given per iteration; in
case (b) the loop of ``ot.sinkhorn(method="sinkhorn_log")`` runs on a subset of 16 problems and is
scaled to B. The plans are compared entry by entry: with POT as called (which starts from a different
point and updates the potentials in the other order, so the plans differ by about the marginal
error) and with the *same iterates*: POT's exp-domain loop in float64 on the transposed problem,
warm-started at daml's initial point (``v = b``), which reproduces daml's ``K`` iterations exactly
(where daml re-anchors right after its last column update, its plan is the ``K + 1/2`` iterate, one
more row update; the difference is taken against the closer of the two and such problems counted).

(ii) Time to tolerance: daml with ``tol=1e-6`` (its own stopping rule is the L1 marginal error);
POT's rules use other norms (``ot.sinkhorn``: L2 norm of the column-marginal error; ``ot.batch``: max
over the batch of the L2 norm of the row-marginal error), so POT runs with ``1e-7`` (one tenth) and the
error it actually reached is reported. Every solver is capped at the same ``max_iter`` (2000 in case
(a), run at n = 1000 only; 5000 in case (b)). daml runs plain (``relaxation=1.0``), ``"auto"`` and
``1.5``; the peers are ``ot.sinkhorn`` (one call, or a loop over the batch), ``ot.batch.solve_batch``
(exp domain) and the exact solver ``ot.emd`` (network simplex, float64 only, independent of epsilon),
the natural competitor in case (b).

``ot.batch.solve_batch`` runs with both of POT's backends, as the reference protocol asks: on numpy
arrays, and on the same memory as CPU torch tensors (POT's torch backend). They differ: with numpy
float32 input the exp solver computes in float64, while the torch backend keeps float32, and the
torch backend's log solver avoids scipy's ``logsumexp``. Every goal against ``ot.batch`` is read
against the faster of the two.

Everything reported as an error or a cost is measured *outside* the solvers, in float64, on the
returned plans: the L1 marginal error ``||P 1 - a||_1 + ||P^T 1 - b||_1`` (against the masses the
solver was given) and ``<C, P>`` relative to the exact optimal cost (``ot.emd2``, n <= 2000 only).

Timing. Thread counts are set before numpy/torch/POT are imported (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``torch.set_num_threads`` all equal ``--threads``,
default 1). Every measurement is one untimed warm-up call (whose output is used for the accuracy
checks) and then ``--repeats`` timed calls (at least 5; 2 with ``--quick``); the minimum and median
wall time (``time.perf_counter``) and CPU time (``time.process_time``) are recorded. Tensors and
arrays are built before timing (``torch.from_numpy`` is not timed). Ratios are peer time / daml time
of the medians (> 1: daml is faster). The load average before and after the run is recorded and a
load above 0.5 at the start is flagged.

Usage (from the repository root)::

    python benchmarks/sinkhorn.py                 # full run: writes results/sinkhorn.json and the
                                                  # "sinkhorn" section of docs/benchmarks.md
    python benchmarks/sinkhorn.py --quick         # smoke test (about a minute), prints only
    python benchmarks/sinkhorn.py --cases b --dtypes float64 --threads 2
"""

from __future__ import annotations

import os
import sys


def _threads_from_argv(argv: list[str]) -> int:
    """``--threads`` from the command line, read before numpy and torch are imported (default 1)."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--threads" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--threads="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                return max(1, int(value))
            except ValueError:
                return 1          # argparse reports the bad value later
    return 1


THREADS = _threads_from_argv(sys.argv[1:])
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import ot  # noqa: E402
import ot.batch  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

import daml.transport as tr  # noqa: E402

SEED = 20250607
DIM = 10                     # dimension of the points
LIKELIHOOD_VARIANCE = 0.1    # s2 of the ETPF-like target weights
TOL = 1e-6                   # L1 marginal tolerance (daml's rule, and the target for everybody)
POT_TOL = 0.1 * TOL          # POT's own (L2-type) stopping threshold
EPSILONS = (0.1, 0.05, 0.01)
RELAXATIONS = (("plain", 1.0), ("auto", "auto"), ("ω=1.5", 1.5))
EMD_MAX_ITER = 10**7


@dataclass(frozen=True)
class Config:
    sizes_a: tuple[int, ...]          # case (a) problem sizes
    iters_a: int                      # case (a) fixed iterations
    log_sizes_a: tuple[int, ...]      # sizes where POT's log-domain solver runs in case (a)
    log_iters_a: int                  # its (smaller) iteration count
    tol_size_a: int                   # case (a) time-to-tolerance size
    tol_max_iter_a: int               # iteration cap of every solver there
    emd_max_n: int                    # largest n for the exact reference cost
    batch_b: int                      # case (b) number of problems
    n_b: int                          # case (b) problem size
    iters_b: tuple[int, ...]          # case (b) fixed iterations
    log_subset_b: int                 # problems of the timed loop of POT's log solver
    tol_max_iter_b: int               # case (b) iteration cap in time-to-tolerance mode


FULL = Config(sizes_a=(1000, 2000, 5000), iters_a=100, log_sizes_a=(1000, 2000), log_iters_a=20,
              tol_size_a=1000, tol_max_iter_a=2000, emd_max_n=2000,
              batch_b=256, n_b=100, iters_b=(50, 100), log_subset_b=16, tol_max_iter_b=5000)
QUICK = Config(sizes_a=(1000,), iters_a=10, log_sizes_a=(1000,), log_iters_a=3,
               tol_size_a=1000, tol_max_iter_a=200, emd_max_n=2000,
               batch_b=32, n_b=100, iters_b=(10, 20), log_subset_b=4, tol_max_iter_b=500)


# --------------------------------------------------------------------------------------------------
# problems


@dataclass
class Problem:
    """One problem, or a batch of them, in one dtype: numpy arrays for POT, torch views for daml."""

    cost: np.ndarray      # (..., n, m)
    a: np.ndarray         # (..., n)
    b: np.ndarray         # (..., m)
    cost_t: torch.Tensor  # the same memory as torch tensors
    a_t: torch.Tensor
    b_t: torch.Tensor

    @property
    def dtype(self) -> str:
        return self.cost.dtype.name


def make_problems(batch: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``batch`` problems of size ``n x n`` in float64: normalised squared-distance cost, uniform ``a``,
    Gaussian-likelihood ``b`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n, DIM))
    sq = np.einsum("bnd,bnd->bn", x, x)
    cost = sq[:, :, None] + sq[:, None, :] - 2.0 * np.matmul(x, x.transpose(0, 2, 1))
    np.maximum(cost, 0.0, out=cost)                  # rounding of the expansion
    diag = np.arange(n)
    cost[:, diag, diag] = 0.0
    cost /= cost.mean(axis=(1, 2), keepdims=True)    # epsilon is now relative to the mean cost
    a = np.full((batch, n), 1.0 / n)
    logw = -0.5 * (x[:, :, 0] - 1.0) ** 2 / LIKELIHOOD_VARIANCE
    top = logw.max(axis=1, keepdims=True)
    logw -= top + np.log(np.exp(logw - top).sum(axis=1, keepdims=True))
    return cost, a, np.exp(logw)


def in_dtype(cost: np.ndarray, a: np.ndarray, b: np.ndarray, dtype: str) -> Problem:
    """The problem cast to ``dtype``, masses renormalised in that dtype."""
    c = np.ascontiguousarray(cost, dtype=dtype)
    a = a.astype(dtype)
    a /= a.sum(axis=-1, keepdims=True)
    b = b.astype(dtype)
    b /= b.sum(axis=-1, keepdims=True)
    return Problem(c, a, b, torch.from_numpy(c), torch.from_numpy(a), torch.from_numpy(b))


# --------------------------------------------------------------------------------------------------
# measurement helpers


def measure(fn: Callable[[], Any], repeats: int) -> tuple[Any, dict[str, Any], list[str]]:
    """Warm-up call (its output and warnings are returned), then ``repeats`` timed calls."""
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fn()
    messages = sorted({re.sub(r"\d+", "N", str(w.message).splitlines()[0][:200]) for w in caught})
    walls, cpus = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            w1, c1 = time.perf_counter(), time.process_time()
            del out
            walls.append(w1 - w0)
            cpus.append(c1 - c0)
    timing = {"wall_min_s": min(walls), "wall_median_s": statistics.median(walls),
              "cpu_min_s": min(cpus), "cpu_median_s": statistics.median(cpus),
              "wall_s": walls, "cpu_s": cpus}
    return first, timing, messages


def l1_error(plan: Any, p: Problem) -> np.ndarray:
    """L1 marginal error per problem, in float64, against the masses the solver was given."""
    plan = np.asarray(plan, dtype=np.float64)
    a, b = p.a.astype(np.float64), p.b.astype(np.float64)
    return np.abs(plan.sum(axis=-1) - a).sum(axis=-1) + np.abs(plan.sum(axis=-2) - b).sum(axis=-1)


def linear_cost(plan: Any, p: Problem) -> np.ndarray:
    """``<C, P>`` per problem, in float64."""
    return np.einsum("...ij,...ij->...", np.asarray(plan, dtype=np.float64), p.cost.astype(np.float64))


def max_abs(x: np.ndarray) -> float:
    return float(np.max(np.abs(x))) if np.all(np.isfinite(x)) else math.nan


def iteration_stats(iters: Any) -> dict[str, float]:
    arr = np.asarray(iters, dtype=np.float64).ravel()
    return {"median": float(np.median(arr)), "max": float(arr.max())}


def per_iteration(timing: dict[str, Any], iters: float, entries: int, scale: float = 1.0) -> dict[str, float]:
    """Per-iteration figures from a fixed-iteration timing (``scale`` extrapolates a subset)."""
    wall, cpu = timing["wall_median_s"] * scale, timing["cpu_median_s"] * scale
    return {"ms_per_iter": 1e3 * wall / iters, "cpu_ms_per_iter": 1e3 * cpu / iters,
            "ns_per_entry_half_iter": 1e9 * wall / (2.0 * iters * entries)}


def error_summary(err: np.ndarray) -> dict[str, Any]:
    err = np.asarray(err, dtype=np.float64).ravel()
    finite = bool(np.all(np.isfinite(err)))
    return {"l1_error_max": float(err.max()) if finite else math.nan,
            "l1_error_median": float(np.median(err)) if finite else math.nan,
            "nonfinite": int((~np.isfinite(err)).sum()),
            "above_tol": int((~(err <= TOL)).sum())}


# --------------------------------------------------------------------------------------------------
# the solvers, as timed calls and the summaries of their outputs


def daml_call(p: Problem, eps: float, tol: float, max_iter: int, relaxation: Any) -> Callable[[], Any]:
    return lambda: tr.sinkhorn(p.cost_t, p.a_t, p.b_t, epsilon=eps, tol=tol, max_iter=max_iter,
                               relaxation=relaxation, warn=False)


def daml_output(res: Any) -> tuple[np.ndarray, np.ndarray]:
    return res.plan().double().numpy(), res.iterations.reshape(-1).numpy()


def pot_call(p: Problem, eps: float, method: str, max_iter: int, stop: float) -> Callable[[], Any]:
    return lambda: ot.sinkhorn(p.a, p.b, p.cost, eps, method=method, numItermax=max_iter, stopThr=stop,
                               log=True, warn=False)


def pot_output(out: Any, messages: list[str]) -> tuple[np.ndarray, int]:
    """Plan and iterations of one ``ot.sinkhorn`` call: ``niter`` is the last loop index, except after
    POT's "numerical errors" exit, which returns the iterate before it."""
    plan, log = out
    broke = any("numerical errors" in m for m in messages)
    return plan, int(log["niter"]) + (0 if broke else 1)


def pot_loop_call(p: Problem, eps: float, method: str, max_iter: int, stop: float,
                  rows: range) -> Callable[[], Any]:
    def run() -> list[Any]:
        return [ot.sinkhorn(p.a[i], p.b[i], p.cost[i], eps, method=method, numItermax=max_iter,
                            stopThr=stop, log=True, warn=False) for i in rows]
    return run


def pot_loop_output(outs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([plan for plan, _ in outs]), np.array([int(log["niter"]) + 1 for _, log in outs])


def batch_call(p: Problem, eps: float, method: str, max_iter: int, tol: float,
               torch_backend: bool = False) -> Callable[[], Any]:
    """``ot.batch.solve_batch`` on numpy arrays, or with ``torch_backend`` on the same memory as torch
    tensors (POT's torch backend, on the CPU here)."""
    cost, a, b = (p.cost_t, p.a_t, p.b_t) if torch_backend else (p.cost, p.a, p.b)
    return lambda: ot.batch.solve_batch(M=cost, reg=eps, a=a, b=b, max_iter=max_iter, tol=tol, method=method)


def batch_output(res: Any) -> tuple[np.ndarray, int]:
    plan = res.plan.numpy() if isinstance(res.plan, torch.Tensor) else np.asarray(res.plan)
    return plan, int(res.log["n_iter"]) + 1


def emd_loop_call(p64: Problem) -> Callable[[], Any]:
    if p64.cost.ndim == 2:
        return lambda: ot.emd(p64.a, p64.b, p64.cost, numItermax=EMD_MAX_ITER)
    return lambda: np.stack([ot.emd(p64.a[i], p64.b[i], p64.cost[i], numItermax=EMD_MAX_ITER)
                             for i in range(p64.cost.shape[0])])


def pot_same_iterates(p: Problem, eps: float, iters: int) -> tuple[np.ndarray, bool]:
    """daml's first ``iters`` iterates, computed by POT's exp-domain loop in float64.

    daml starts from ``g = 0`` (column scaling ``v = b``) and updates the row potential first; POT
    updates its column scaling first. On the transposed problem, warm-started at ``(u, v) = (b, 1)``,
    POT does the same updates in the same order. Returns the plan and whether POT hit its
    "numerical errors" exit (zero masses can make its ``1 / b`` infinite).
    """
    cost, a, b = (np.asarray(x, dtype=np.float64) for x in (p.cost, p.a, p.b))
    single = cost.ndim == 2
    if single:
        cost, a, b = cost[None], a[None], b[None]
    plans = []
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        for c, ai, bi in zip(cost, a, b):
            pt = ot.sinkhorn(bi, ai, c.T, eps, method="sinkhorn", numItermax=iters, stopThr=0,
                             warn=False, warmstart=(np.log(bi), np.zeros_like(ai)))
            plans.append(pt.T)
    broke = any("numerical errors" in str(w.message) for w in caught)
    plan = np.stack(plans)
    return (plan[0] if single else plan), broke


def same_iterates_diff(plan: np.ndarray, ref: np.ndarray, broke: bool, p: Problem, scale: float) -> dict[str, Any]:
    """Largest ``|P_daml - P_ref| / max P`` over the problems, with the reference after ``K``
    iterations or after ``K`` iterations plus one row update, whichever is closer per problem.

    daml re-anchors (one exact row soft-min) whenever a scaling leaves its range; when that happens
    right after the last column update, the plan it returns is half an iteration ahead (rows exact).
    ``half_step_ahead`` counts the problems that match the ``K + 1/2`` iterate clearly better.
    """
    if broke:
        return {"plan_diff_same_iterates": math.nan, "half_step_ahead": 0}
    plan, ref = np.asarray(plan, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if plan.ndim == 2:
        plan, ref = plan[None], ref[None]
    a = p.a.astype(np.float64).reshape(plan.shape[:-1])
    with np.errstate(all="ignore"):
        ahead = ref * np.nan_to_num(a / ref.sum(axis=-1))[..., None]     # one more row update
    d_k = np.abs(plan - ref).max(axis=(-2, -1))
    d_h = np.abs(plan - ahead).max(axis=(-2, -1))
    if not (np.all(np.isfinite(d_k)) and np.all(np.isfinite(d_h))):
        return {"plan_diff_same_iterates": math.nan, "half_step_ahead": 0}
    return {"plan_diff_same_iterates": float(np.minimum(d_k, d_h).max()) / scale,
            "plan_diff_same_iterates_strict": float(d_k.max()) / scale,
            "half_step_ahead": int((d_h < 0.5 * d_k).sum())}


def record(timing: dict[str, Any], messages: list[str], plan: np.ndarray, p: Problem,
           emd_cost: np.ndarray | None) -> dict[str, Any]:
    rec: dict[str, Any] = {**timing, "warnings": messages, "plan_dtype": np.asarray(plan).dtype.name}
    rec.update(error_summary(l1_error(plan, p)))
    if emd_cost is not None:
        rec["value_linear_over_emd"] = float(np.median(linear_cost(plan, p) / emd_cost))
    return rec


# --------------------------------------------------------------------------------------------------
# case (a): one n x n problem


def case_a_fixed(cfg: Config, dtypes: list[str], epsilons: list[float], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for n in cfg.sizes_a:
        cost64, a64, b64 = (x[0] for x in make_problems(1, n, SEED + n))
        emd_cost, emd_s = None, None
        if n <= cfg.emd_max_n:
            t0 = time.perf_counter()
            emd_cost = np.array(ot.emd2(a64, b64, cost64, numItermax=EMD_MAX_ITER))
            emd_s = time.perf_counter() - t0
        for dtype in dtypes:
            p = in_dtype(cost64, a64, b64, dtype)
            entries = n * n
            for eps in epsilons:
                k = cfg.iters_a
                row: dict[str, Any] = {"n": n, "dtype": dtype, "eps": eps, "iterations": k,
                                       "emd_cost": None if emd_cost is None else float(emd_cost),
                                       "emd_single_run_s": emd_s, "solvers": {}}
                res, t, msg = measure(daml_call(p, eps, 0.0, k, 1.0), repeats)
                plan_d, its = daml_output(res)
                del res
                rec = record(t, msg, plan_d, p, emd_cost)
                rec.update(per_iteration(t, k, entries), iterations=iteration_stats(its))
                row["solvers"]["daml"] = rec

                out, t, msg = measure(pot_call(p, eps, "sinkhorn", k, 0.0), repeats)
                plan_e, its_e = pot_output(out, msg)
                del out
                rec = record(t, msg, plan_e, p, emd_cost)
                rec.update(per_iteration(t, max(its_e, 1), entries), iterations=its_e)
                row["solvers"]["pot_exp"] = rec

                if n in cfg.log_sizes_a:
                    kl = cfg.log_iters_a
                    out, t, msg = measure(pot_call(p, eps, "sinkhorn_log", kl, 0.0), repeats)
                    plan_l, its_l = pot_output(out, msg)
                    del out
                    rec = record(t, msg, plan_l, p, emd_cost)
                    rec.update(per_iteration(t, max(its_l, 1), entries), iterations=its_l,
                               note=f"{kl} iterations instead of {k}, time per iteration")
                    row["solvers"]["pot_log"] = rec
                    del plan_l

                scale = float(np.max(plan_d))
                row["max_plan_entry"] = scale
                row["plan_diff_vs_pot_exp"] = max_abs(plan_d - plan_e) / scale
                ref, broke = pot_same_iterates(p, eps, k)
                row.update(same_iterates_diff(plan_d, ref, broke, p, scale))
                del plan_d, plan_e, ref
                add_ratios(row["solvers"], "ms_per_iter")
                rows.append(row)
                print_fixed_row(f"(a) n={n}", row)
            del p
            gc.collect()
    return rows


def case_a_tolerance(cfg: Config, dtypes: list[str], epsilons: list[float], repeats: int) -> list[dict[str, Any]]:
    n = cfg.tol_size_a
    cost64, a64, b64 = (x[0] for x in make_problems(1, n, SEED + n))
    p64 = in_dtype(cost64, a64, b64, "float64")
    emd_plan, emd_t, emd_msg = measure(emd_loop_call(p64), repeats)
    emd_cost = linear_cost(emd_plan, p64)
    emd_rec = record(emd_t, emd_msg, emd_plan, p64, emd_cost)
    del emd_plan
    rows = []
    for dtype in dtypes:
        p = in_dtype(cost64, a64, b64, dtype)
        for eps in epsilons:
            row: dict[str, Any] = {"n": n, "dtype": dtype, "eps": eps, "max_iter": cfg.tol_max_iter_a,
                                   "solvers": {}}
            for label, relaxation in RELAXATIONS:
                res, t, msg = measure(daml_call(p, eps, TOL, cfg.tol_max_iter_a, relaxation), repeats)
                plan, its = daml_output(res)
                del res
                rec = record(t, msg, plan, p, emd_cost)
                rec["iterations"] = iteration_stats(its)
                row["solvers"][f"daml {label}"] = rec
            out, t, msg = measure(pot_call(p, eps, "sinkhorn", cfg.tol_max_iter_a, POT_TOL), repeats)
            plan, its = pot_output(out, msg)
            del out
            rec = record(t, msg, plan, p, emd_cost)
            rec["iterations"] = iteration_stats(its)
            row["solvers"]["pot_exp"] = rec
            row["solvers"]["emd"] = dict(emd_rec)     # a copy: the ratios are per row
            add_ratios(row["solvers"], "wall_median_s")
            rows.append(row)
            print_tolerance_row(f"(a) n={n}", row)
    return rows


# --------------------------------------------------------------------------------------------------
# case (b): B problems of 100 x 100


def case_b_fixed(cfg: Config, dtypes: list[str], epsilons: list[float], repeats: int) -> list[dict[str, Any]]:
    batch, n = cfg.batch_b, cfg.n_b
    cost64, a64, b64 = make_problems(batch, n, SEED + 1)
    subset = range(min(cfg.log_subset_b, batch))
    rows = []
    for dtype in dtypes:
        p = in_dtype(cost64, a64, b64, dtype)
        entries = batch * n * n
        for eps in epsilons:
            for k in cfg.iters_b:
                row: dict[str, Any] = {"batch": batch, "n": n, "dtype": dtype, "eps": eps, "iterations": k,
                                       "solvers": {}}
                res, t, msg = measure(daml_call(p, eps, 0.0, k, 1.0), repeats)
                plan_d, its = daml_output(res)
                rec = record(t, msg, plan_d, p, None)
                rec.update(per_iteration(t, k, entries), iterations=iteration_stats(its))
                row["solvers"]["daml"] = rec

                for name, method, backend in (("batch_exp", "sinkhorn", False), ("batch_log", "log_sinkhorn", False),
                                              ("batch_exp_torch", "sinkhorn", True),
                                              ("batch_log_torch", "log_sinkhorn", True)):
                    out, t, msg = measure(batch_call(p, eps, method, k, 0.0, backend), repeats)
                    plan, its_b = batch_output(out)
                    rec = record(t, msg, plan, p, None)
                    rec.update(per_iteration(t, its_b, entries), iterations=its_b)
                    row["solvers"][name] = rec

                out, t, msg = measure(pot_loop_call(p, eps, "sinkhorn", k, 0.0, range(batch)), repeats)
                plan_e, its_e = pot_loop_output(out)
                rec = record(t, msg, plan_e, p, None)
                rec.update(per_iteration(t, k, entries), iterations=iteration_stats(its_e))
                row["solvers"]["loop_exp"] = rec

                out, t, msg = measure(pot_loop_call(p, eps, "sinkhorn_log", k, 0.0, subset), repeats)
                plan_l, its_l = pot_loop_output(out)
                s = len(subset)
                sub = Problem(p.cost[:s], p.a[:s], p.b[:s], p.cost_t[:s], p.a_t[:s], p.b_t[:s])
                rec = record(t, msg, plan_l, sub, None)
                rec.update(per_iteration(t, k, entries, scale=batch / len(subset)),
                           iterations=iteration_stats(its_l),
                           note=f"timed on {len(subset)} of {batch} problems, scaled to {batch}")
                row["solvers"]["loop_log"] = rec

                scale = float(np.max(plan_d))
                row["max_plan_entry"] = scale
                row["plan_diff_vs_pot_exp"] = max_abs(plan_d - plan_e) / scale
                ref, broke = pot_same_iterates(p, eps, k)
                row.update(same_iterates_diff(plan_d, ref, broke, p, scale))
                add_ratios(row["solvers"], "ms_per_iter")
                rows.append(row)
                print_fixed_row(f"(b) B={batch}", row)
    return rows


def case_b_tolerance(cfg: Config, dtypes: list[str], epsilons: list[float], repeats: int) -> list[dict[str, Any]]:
    batch, n, cap = cfg.batch_b, cfg.n_b, cfg.tol_max_iter_b
    cost64, a64, b64 = make_problems(batch, n, SEED + 1)
    p64 = in_dtype(cost64, a64, b64, "float64")
    emd_plan, emd_t, emd_msg = measure(emd_loop_call(p64), repeats)     # ot.emd: float64 only
    emd_cost = linear_cost(emd_plan, p64)
    emd_rec = record(emd_t, emd_msg, emd_plan, p64, emd_cost)
    emd_rec["note"] = "float64 (ot.emd's only dtype), independent of epsilon: timed once"
    rows = []
    for dtype in dtypes:
        p = in_dtype(cost64, a64, b64, dtype)
        for eps in epsilons:
            row: dict[str, Any] = {"batch": batch, "n": n, "dtype": dtype, "eps": eps, "max_iter": cap,
                                   "solvers": {}}
            for label, relaxation in RELAXATIONS:
                res, t, msg = measure(daml_call(p, eps, TOL, cap, relaxation), repeats)
                plan, its = daml_output(res)
                rec = record(t, msg, plan, p, emd_cost)
                rec["iterations"] = iteration_stats(its)
                row["solvers"][f"daml {label}"] = rec
            row["solvers"]["emd"] = dict(emd_rec)     # a copy: the ratios are per row
            out, t, msg = measure(pot_loop_call(p, eps, "sinkhorn", cap, POT_TOL, range(batch)), repeats)
            plan, its = pot_loop_output(out)
            rec = record(t, msg, plan, p, emd_cost)
            rec["iterations"] = iteration_stats(its)
            row["solvers"]["loop_exp"] = rec
            for name, backend in (("batch_exp", False), ("batch_exp_torch", True)):
                out, t, msg = measure(batch_call(p, eps, "sinkhorn", cap, POT_TOL, backend), repeats)
                plan, its_b = batch_output(out)
                rec = record(t, msg, plan, p, emd_cost)
                rec["iterations"] = iteration_stats([its_b])
                row["solvers"][name] = rec
            add_ratios(row["solvers"], "wall_median_s")
            rows.append(row)
            print_tolerance_row(f"(b) B={batch}", row)
    return rows


def add_ratios(solvers: dict[str, dict[str, Any]], key: str) -> None:
    """``ratio_vs_daml`` (peer / daml) for every peer; in time-to-tolerance rows, against each daml variant."""
    dvariants = {k: v for k, v in solvers.items() if k.startswith("daml")}
    for name, rec in solvers.items():
        if name.startswith("daml"):
            continue
        rec_ratios = {}
        for dname, drec in dvariants.items():
            rec_ratios[dname] = rec[key] / drec[key] if drec[key] > 0 else math.nan
        rec["ratio_vs_daml"] = rec_ratios if len(rec_ratios) > 1 else next(iter(rec_ratios.values()))


# --------------------------------------------------------------------------------------------------
# printing and markdown


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–" if x is None else "nan"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _err(x: Any) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.1e}"


def _its(s: Any) -> str:
    if isinstance(s, dict):
        return f"{s['median']:.0f}/{s['max']:.0f}"
    return str(s)


def _ratio(x: Any) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}"


def print_fixed_row(label: str, row: dict[str, Any]) -> None:
    parts = [f"{label} {row['dtype']} eps={row['eps']} K={row['iterations']}:"]
    for name, rec in row["solvers"].items():
        parts.append(f"{name} {rec['ms_per_iter']:.3g} ms/it ({rec['ns_per_entry_half_iter']:.3g} ns/e.p, "
                     f"err {_err(rec['l1_error_max'])})")
    parts.append(f"dP/maxP vs pot {_err(row['plan_diff_vs_pot_exp'])}, same iterates "
                 f"{_err(row['plan_diff_same_iterates'])}")
    print("  ".join(parts), flush=True)


def print_tolerance_row(label: str, row: dict[str, Any]) -> None:
    parts = [f"{label} {row['dtype']} eps={row['eps']}:"]
    for name, rec in row["solvers"].items():
        its = rec.get("iterations")
        parts.append(f"{name} {1e3 * rec['wall_median_s']:.4g} ms (it {_its(its) if its else '-'}, "
                     f"err {_err(rec['l1_error_max'])})")
    print("  ".join(parts), flush=True)


def _same(row: dict[str, Any]) -> str:
    ahead = row.get("half_step_ahead", 0)
    return _err(row["plan_diff_same_iterates"]) + (f" ²({ahead})" if ahead else "")


HALF_STEP_NOTE = ("² (k): in k problems daml's plan matched the K + ½ iterate (one more row update) "
                  "instead of the K-th: a re-anchoring (one exact row soft-min) right after the last "
                  "column update leaves the returned plan half an iteration ahead; ΔP is against the "
                  "closer of the two.")


def _ms_pair(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "–"
    return f"{_num(rec['ms_per_iter'])} ({_num(rec['cpu_ms_per_iter'])})"


def _ns(rec: dict[str, Any] | None) -> str:
    return "–" if rec is None else _num(rec["ns_per_entry_half_iter"])


def _flag(rec: dict[str, Any] | None, wanted: int) -> str:
    """A ⚠ where a solver stopped before the iterations it was asked for."""
    if rec is None:
        return ""
    its = rec["iterations"]
    done = its["max"] if isinstance(its, dict) else its
    return "" if done >= wanted else f" ⚠{done:.0f} it"


def markdown_a_fixed(rows: list[dict[str, Any]], cfg: Config) -> list[str]:
    out = [
        f"### Case (a): one n × n problem, fixed iterations (K = {cfg.iters_a})",
        "",
        f"ms/it: median wall time / K, CPU time in brackets. POT log ran only at n ∈ "
        f"{{{', '.join(map(str, cfg.log_sizes_a))}}} with K = {cfg.log_iters_a} iterations "
        f"(time per iteration given). ns/e·p: ns per matrix entry per half-iteration. Ratio: peer / daml "
        f"(> 1: daml faster). L1 err: marginal error of the returned plan. ⟨C,P⟩/EMD: transport cost of "
        f"the plan over the exact optimum (n ≤ {cfg.emd_max_n}). ΔP: max |P_daml − P_POT| / max P, against "
        "POT exp as called (another starting point), and against the same iterates (POT exp, float64, "
        "transposed problem warm-started at daml's start).",
        "",
        "| n | dtype | ε | POT exp ms/it | POT log ms/it | daml ms/it | ns/e·p exp / log / daml "
        "| ratio exp / log | L1 err exp / log / daml | ⟨C,P⟩/EMD exp / daml | ΔP as called / same iterates |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["solvers"]
        d, e, lg = s["daml"], s["pot_exp"], s.get("pot_log")
        ce = "–" if "value_linear_over_emd" not in d else (
            f"{e['value_linear_over_emd']:.4f} / {d['value_linear_over_emd']:.4f}")
        out.append(
            f"| {r['n']} | {r['dtype']} | {r['eps']:g} | {_ms_pair(e)}{_flag(e, r['iterations'])} "
            f"| {_ms_pair(lg)}{_flag(lg, cfg.log_iters_a)} | {_ms_pair(d)} "
            f"| {_ns(e)} / {_ns(lg)} / {_ns(d)} "
            f"| {_ratio(e['ratio_vs_daml'])} / {_ratio(lg['ratio_vs_daml']) if lg else '–'} "
            f"| {_err(e['l1_error_max'])} / {_err(lg['l1_error_max']) if lg else '–'} / {_err(d['l1_error_max'])} "
            f"| {ce} | {_err(r['plan_diff_vs_pot_exp'])} / {_same(r)} |")
    if any(r.get("half_step_ahead") for r in rows):
        out += ["", HALF_STEP_NOTE]
    emd = [(r["n"], r["emd_single_run_s"]) for r in rows if r.get("emd_single_run_s") is not None]
    if emd:
        seen = dict(emd)
        out += ["", "Exact EMD reference (`ot.emd2`, float64, a single run): "
                + ", ".join(f"n = {n}: {s:.2f} s" for n, s in seen.items()) + "."]
    return out


def _tol_cell(rec: dict[str, Any]) -> str:
    its = rec.get("iterations")
    parts = [f"{_num(1e3 * rec['wall_median_s'])}"]
    if its is not None:
        parts.append(f"it {_its(its)}")
    parts.append(f"err {_err(rec['l1_error_max'])}")
    if rec.get("above_tol"):
        parts.append(f"{rec['above_tol']} > tol")
    return " · ".join(parts)


def markdown_tolerance(rows: list[dict[str, Any]], title: str, peers: list[tuple[str, str]]) -> list[str]:
    daml_names = [f"daml {label}" for label, _ in RELAXATIONS]
    peers = [(k, label) for k, label in peers if all(k in r["solvers"] for r in rows)]   # older JSON may lack some
    head = "| dtype | ε | " + " | ".join(daml_names) + " | " + " | ".join(label for _, label in peers)
    head += " | " + " | ".join(f"ratio {label} / daml plain, auto, ω=1.5" for _, label in peers)
    head += " | ⟨C,P⟩/EMD daml auto |"
    ncol = 2 + len(daml_names) + 2 * len(peers) + 1
    out = [title, "", head, "|" + "---|" * 2 + "---:|" * (ncol - 2)]
    for r in rows:
        s = r["solvers"]
        cells = [r["dtype"], f"{r['eps']:g}"]
        cells += [_tol_cell(s[k]) for k in daml_names]
        cells += [_tol_cell(s[k]) for k, _ in peers]
        for k, _ in peers:
            rat = s[k]["ratio_vs_daml"]
            cells.append(" / ".join(_ratio(rat[d]) for d in daml_names))
        cells.append(f"{s['daml auto'].get('value_linear_over_emd', math.nan):.4f}")
        out.append("| " + " | ".join(cells) + " |")
    return out


def markdown_b_fixed(rows: list[dict[str, Any]], cfg: Config) -> list[str]:
    out = [
        f"### Case (b): B = {cfg.batch_b} problems of {cfg.n_b} × {cfg.n_b}, fixed iterations",
        "",
        "ms/it for the whole batch (CPU time in brackets); ns/e·p per matrix entry of the batch per "
        f"half-iteration. The loop of `ot.sinkhorn(method=\"sinkhorn_log\")` is timed on {cfg.log_subset_b} "
        f"problems and scaled to {cfg.batch_b}. Ratio: peer / daml.",
        "",
        "| dtype | ε | K | daml ms/it | ot.batch exp ms/it | ot.batch log ms/it | loop ot.sinkhorn ms/it "
        "| loop sinkhorn_log ms/it | ns/e·p daml / batch exp / batch log / loop | ratio batch exp / batch log / "
        "loop / loop log | L1 err max daml / batch exp / loop | ΔP as called / same iterates |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["solvers"]
        d, be, bl, le, ll = s["daml"], s["batch_exp"], s["batch_log"], s["loop_exp"], s["loop_log"]
        promoted = " ¹" if be["plan_dtype"] != r["dtype"] else ""
        out.append(
            f"| {r['dtype']} | {r['eps']:g} | {r['iterations']} | {_ms_pair(d)} | {_ms_pair(be)}{promoted} "
            f"| {_ms_pair(bl)} | {_ms_pair(le)}{_flag(le, r['iterations'])} | {_ms_pair(ll)} "
            f"| {_ns(d)} / {_ns(be)} / {_ns(bl)} / {_ns(le)} "
            f"| {_ratio(be['ratio_vs_daml'])} / {_ratio(bl['ratio_vs_daml'])} / {_ratio(le['ratio_vs_daml'])} "
            f"/ {_ratio(ll['ratio_vs_daml'])} "
            f"| {_err(d['l1_error_max'])} / {_err(be['l1_error_max'])} / {_err(le['l1_error_max'])} "
            f"| {_err(r['plan_diff_vs_pot_exp'])} / {_same(r)} |")
    if any(r["solvers"]["batch_exp"]["plan_dtype"] != r["dtype"] for r in rows):
        out += ["", "¹ `ot.batch` exp with numpy float32 input computes in float64 (its initial scalings "
                "are float64 arrays), so its float32 rows are float64 arithmetic."]
    if any(r.get("half_step_ahead") for r in rows):
        out += ["", HALF_STEP_NOTE]
    torch_rows = [r for r in rows if "batch_exp_torch" in r["solvers"]]
    if torch_rows:
        out += ["", "`ot.batch` with POT's torch backend (the same problems as CPU torch tensors, one torch "
                "thread): it computes in the input's dtype, float32 included.", "",
                "| dtype | ε | K | daml ms/it | ot.batch exp (torch) ms/it | ot.batch log (torch) ms/it "
                "| ns/e·p exp / log | ratio exp / log | L1 err max exp / log |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in torch_rows:
            s = r["solvers"]
            d, te, tl = s["daml"], s["batch_exp_torch"], s["batch_log_torch"]
            out.append(f"| {r['dtype']} | {r['eps']:g} | {r['iterations']} | {_ms_pair(d)} | {_ms_pair(te)} "
                       f"| {_ms_pair(tl)} | {_ns(te)} / {_ns(tl)} "
                       f"| {_ratio(te['ratio_vs_daml'])} / {_ratio(tl['ratio_vs_daml'])} "
                       f"| {_err(te['l1_error_max'])} / {_err(tl['l1_error_max'])} |")
    return out


def markdown(results: dict[str, Any]) -> str:
    cfg = Config(**results["config"])
    m = results["machine"]
    load_b, load_a = results["load_before"], results["load_after"]
    lines = [
        "## Sinkhorn: daml against POT",
        "",
        "Protocol: the same problems for every solver — points x ~ N(0, I₁₀), cost |xᵢ − xⱼ|² divided by "
        "its mean (so ε is relative to the mean cost and passed as is: POT `reg=ε`, daml `epsilon=ε`), "
        f"uniform a, ETPF-like Gaussian-likelihood b (s² = {LIKELIHOOD_VARIANCE}), cast to each dtype with "
        "the masses renormalised in it. Fixed-iteration mode runs exactly K iterations everywhere (POT "
        "`stopThr=0`, daml `tol=0, max_iter=K`); time-to-tolerance mode asks daml for an L1 marginal "
        f"error ≤ {TOL:g} and POT (whose stopping norms differ) for {POT_TOL:g} on its own norm, every "
        "solver capped at the same max_iter, and reports the error each actually reached. Errors, "
        "transport costs and plan differences are measured outside the solvers in float64 on the returned "
        f"plans. One warm-up, then min and median of {results['repeats']} runs (median shown) of wall "
        "(`perf_counter`) and CPU (`process_time`) time; ratios are peer / daml (> 1: daml faster).",
        "",
        f"{_report.machine_line(m)} CPU: {results['cpu']}; {results['threads']} thread(s) "
        "(OMP/MKL/OpenBLAS/torch); "
        f"POT {results['versions']['pot']}; load average before {load_b[0]:.2f} / after {load_a[0]:.2f}.",
    ]
    for case, origin in sorted(results.get("carried_over", {}).items()):
        lines += ["", f"Case ({case}) was not re-run: its tables are carried over from an earlier run "
                  f"(`{origin.get('command')}`, daml commit {origin.get('daml_commit') or 'not recorded'}, "
                  f"load before {(origin.get('load_before') or [math.nan])[0]:.2f})."]
    if results["load_flag"]:
        lines += ["", f"⚠ The load average was {load_b[0]:.2f} (> 0.5) when the run started: "
                  "timings may be perturbed by other processes."]
    if "case_a_fixed" in results:
        lines += [""] + markdown_a_fixed(results["case_a_fixed"], cfg)
    if "case_a_tolerance" in results:
        lines += [""] + markdown_tolerance(
            results["case_a_tolerance"],
            f"### Case (a): time to tolerance, n = {cfg.tol_size_a} (max_iter {cfg.tol_max_iter_a})\n\n"
            "Cells: median wall ms · iterations · L1 error reached (· problems above 1e-6). "
            "`ot.emd` is float64 whatever the row's dtype.",
            [("pot_exp", "POT exp"), ("emd", "ot.emd")])
    if "case_b_fixed" in results:
        lines += [""] + markdown_b_fixed(results["case_b_fixed"], cfg)
    if "case_b_tolerance" in results:
        lines += [""] + markdown_tolerance(
            results["case_b_tolerance"],
            f"### Case (b): time to tolerance, B = {cfg.batch_b} × {cfg.n_b} × {cfg.n_b} "
            f"(max_iter {cfg.tol_max_iter_b})\n\n"
            "Cells: median wall ms for the whole batch · iterations median/max over the problems · "
            "largest L1 error reached (· problems above 1e-6). The loop of `ot.emd` (exact, float64 "
            "whatever the row's dtype, independent of ε) is timed once.",
            [("emd", "loop ot.emd"), ("loop_exp", "loop ot.sinkhorn"), ("batch_exp", "ot.batch exp"),
             ("batch_exp_torch", "ot.batch exp (torch)")])
    notes = solver_warnings(results)
    if notes:
        lines += ["", "Warnings raised by the solvers (warm-up calls): " + "; ".join(notes) + "."]
    lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines)


def solver_warnings(results: dict[str, Any]) -> list[str]:
    seen: dict[str, set[str]] = {}
    for key in ("case_a_fixed", "case_a_tolerance", "case_b_fixed", "case_b_tolerance"):
        for r in results.get(key, []):
            for name, rec in r["solvers"].items():
                for msg in rec.get("warnings", []):
                    where = f"{key[:6].replace('_', ' ')} {r['dtype']} ε={r['eps']:g}"
                    seen.setdefault(f"{name}: {msg}", set()).add(where)
    return [f"{msg} ({', '.join(sorted(w))})" for msg, w in seen.items()]


# --------------------------------------------------------------------------------------------------


def carry_over(results: dict[str, Any], cases: list[str], dtypes: list[str], epsilons: list[float]) -> None:
    """Keep the tables of the cases this run left out from the previous full run's JSON, marked as such,
    so that ``--cases b`` re-measures case (b) without deleting case (a) from the report. Only a run of
    the same protocol (same dtypes, epsilons and repeats) is carried over."""
    path = _report.RESULTS / "sinkhorn.json"
    if set(cases) == {"a", "b"} or not path.exists():
        return
    old = json.loads(path.read_text())
    same = (old.get("dtypes") == dtypes and old.get("epsilons") == epsilons and old.get("repeats") == results["repeats"]
            and not old.get("quick"))
    if not same:
        return
    results["carried_over"] = dict(old.get("carried_over", {}))
    for case in {"a", "b"} - set(cases):
        for key in (f"case_{case}_fixed", f"case_{case}_tolerance"):
            if key in old:
                results[key] = old[key]
        origin = old.get("carried_over", {}).get(case) or {
            "command": old.get("command"), "load_before": old.get("load_before"), "elapsed_s": old.get("elapsed_s"),
            "daml_commit": old.get("daml_commit")}
        results["carried_over"][case] = origin
    for case in cases:
        results["carried_over"].pop(case, None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, smoke test; prints, writes nothing")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL/OpenBLAS/torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 5; quick 2)")
    parser.add_argument("--cases", default="a,b", help="comma-separated subset of a,b")
    parser.add_argument("--dtypes", default="float64,float32", help="comma-separated subset of float64,float32")
    parser.add_argument("--eps", default=",".join(map(str, EPSILONS)), help="comma-separated epsilons")
    args = parser.parse_args(argv)

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    epsilons = [float(e) for e in args.eps.split(",") if e.strip()]
    if not set(cases) <= {"a", "b"} or not cases:
        parser.error(f"--cases: expected a subset of a,b, got {args.cases!r}")
    if not set(dtypes) <= {"float64", "float32"} or not dtypes:
        parser.error(f"--dtypes: expected a subset of float64,float32, got {args.dtypes!r}")
    if args.threads != THREADS:   # the environment was set from sys.argv, not from argv
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if not args.quick and repeats < 5:
        print(f"--repeats {repeats} raised to 5 (the protocol's minimum outside --quick)")
        repeats = 5
    cfg = QUICK if args.quick else FULL

    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"WARNING: load average {load_before[0]:.2f} > 0.5 before starting; timings may be perturbed",
              flush=True)
    results: dict[str, Any] = {
        "benchmark": "sinkhorn",
        "quick": args.quick,
        "repeats": repeats,
        "threads": args.threads,
        "cases": cases,
        "dtypes": dtypes,
        "epsilons": epsilons,
        "tol": TOL,
        "pot_tol": POT_TOL,
        "config": cfg.__dict__,
        "command": _report.command_line(),
        "machine": _report.machine_info(),
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "pot": ot.__version__},
        "load_before": list(load_before),
        "daml_commit": _report.git_commit(),
        "load_flag": load_before[0] > 0.5,
    }
    results["cpu"] = results["machine"]["device"]       # /proc/cpuinfo "model name", else platform
    print(f"threads {args.threads}, repeats {repeats}, torch {torch.__version__}, numpy {np.__version__}, "
          f"POT {ot.__version__}, CPU {results['cpu']}, load {load_before[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    if "a" in cases:
        results["case_a_fixed"] = case_a_fixed(cfg, dtypes, epsilons, repeats)
        results["case_a_tolerance"] = case_a_tolerance(cfg, dtypes, epsilons, repeats)
    if "b" in cases:
        results["case_b_fixed"] = case_b_fixed(cfg, dtypes, epsilons, repeats)
        results["case_b_tolerance"] = case_b_tolerance(cfg, dtypes, epsilons, repeats)
    results["load_after"] = list(os.getloadavg())
    results["elapsed_s"] = time.perf_counter() - t0
    if not args.quick:
        carry_over(results, cases, dtypes, epsilons)

    text = markdown(results)
    if args.quick:
        print("\n" + text)
        print(f"\n(--quick: nothing written; {results['elapsed_s']:.0f} s)")
    else:
        print("wrote", _report.write_json("sinkhorn", results))
        print("wrote", _report.write_section("sinkhorn", text))
    return results


if __name__ == "__main__":
    main()
