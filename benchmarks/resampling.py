"""Benchmark: batched systematic resampling, daml (torch) against a vectorised numpy reference.

The problem: ``B`` independent particle systems of ``N`` particles each (float64, random positive
weights), each resampled to ``n = N`` ancestors with systematic resampling.

* daml: :func:`daml.resampling.systematic` on the ``(B, N)`` tensor (offspring counts computed
  directly, no binary search).
* numpy, the peer: per-row normalised cumulative weights, shifted by the row index so that the
  flattened ``(B N,)`` array is monotone, and ONE ``np.searchsorted`` of the flattened systematic
  points ``(j + U_b) / n + b``; the row offsets ``b N`` are then subtracted.

Both run in the same process on the same weights: one warm-up call, then the median of several
timed repeats (``time.perf_counter``); the ratio is numpy time / daml time (> 1: daml is faster).
For context the script also times daml on one torch thread (numpy's search is single-threaded), a
torch ``searchsorted`` formulation of the same scheme, and daml's other three schemes at the large
size. Peak extra resident memory of one call is read from ``/proc/self/status`` (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) where Linux allows it, and left out otherwise.

Correctness check: on the large problem daml (through its private entry point that takes the
uniforms) and numpy are given the *same* ``U_b`` and their offspring counts are compared particle
by particle; any difference is reported, together with a per-row numpy search without row offsets
that tells whether it comes from the offsets' rounding.

Usage (from the repository root)::

    python benchmarks/resampling.py            # full run: writes results/resampling.json and the
                                               # "resampling" section of docs/benchmarks.md
    python benchmarks/resampling.py --quick    # small sizes, seconds: a smoke test; writes only
                                               # results/resampling-quick.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from daml import resampling as rs  # noqa: E402
from daml._device import generator  # noqa: E402

FULL_SIZES = [(100, 10**6), (100, 10**4)]
QUICK_SIZES = [(10, 10**5), (10, 10**3)]


# --------------------------------------------------------------------------------------------------
# the implementations compared


def numpy_systematic(w: np.ndarray, u: np.ndarray, n: int | None = None) -> np.ndarray:
    """Vectorised numpy systematic resampling of the rows of ``w`` (B, N) with offsets ``u`` (B,)."""
    rows, n_particles = w.shape
    n = n_particles if n is None else n
    cdf = np.cumsum(w, axis=1)
    cdf /= cdf[:, -1:]
    offsets = np.arange(rows, dtype=w.dtype)[:, None]
    cdf += offsets                                  # row b now spans [b, b + 1]: monotone overall
    points = (np.arange(n, dtype=w.dtype) + u[:, None]) / n
    points += offsets
    flat = np.searchsorted(cdf.ravel(), points.ravel(), side="right").reshape(rows, n)
    flat -= np.arange(rows)[:, None] * n_particles
    return flat


def numpy_systematic_seeded(w: np.ndarray, seed: int) -> np.ndarray:
    u = np.random.default_rng(seed).random(w.shape[0])
    return numpy_systematic(w, u)


def torch_searchsorted_systematic(w: torch.Tensor, seed: int) -> torch.Tensor:
    """The same scheme in torch with a binary search of the points (the variant daml did not keep)."""
    wv, batch_shape, n = rs._validate(w, None)
    g = generator(seed, device=wv.device)
    u = torch.rand((wv.shape[0], 1), generator=g, dtype=wv.dtype, device=wv.device)
    cdf = rs._cdf(wv)
    points = (torch.arange(n, dtype=wv.dtype, device=wv.device) + u).div_(n)
    return torch.searchsorted(cdf, rs._below_one(points), right=True).reshape(*batch_shape, n)


def numpy_counts(ancestors: np.ndarray, n_particles: int) -> np.ndarray:
    """Offspring counts per row; an out-of-row index is counted where it points in the flat array."""
    rows = ancestors.shape[0]
    flat = (ancestors + np.arange(rows)[:, None] * n_particles).ravel()
    flat = np.clip(flat, 0, rows * n_particles - 1)
    return np.bincount(flat, minlength=rows * n_particles).reshape(rows, n_particles)


# --------------------------------------------------------------------------------------------------
# measurement


def timed(fn: Callable[[int], Any], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls ``fn(seed)`` after one warm-up call."""
    fn(0)
    times = []
    for k in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn(k + 1)
        times.append(time.perf_counter() - t0)
        del out
    return times


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def peak_extra_mib(fn: Callable[[int], Any]) -> float | None:
    """Peak resident memory of one call ``fn(0)`` above the resident memory before it, in MiB.

    Linux only: writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark ``VmHWM``.
    Returns None where that is not possible.
    """
    gc.collect()
    base = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return None
    out = fn(0)
    peak = _status_kib("VmHWM")
    del out
    if base is None or peak is None:
        return None
    return max(0.0, (peak - base) / 1024)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def make_weights(rows: int, n_particles: int) -> torch.Tensor:
    g = generator(20240601)
    w = torch.rand(rows, n_particles, generator=g, dtype=torch.float64)
    return w.neg_().add_(1.0)  # in (0, 1]: strictly positive


def compare(rows: int, n_particles: int, repeats: int) -> dict[str, Any]:
    w = make_weights(rows, n_particles)
    w_np = w.numpy()
    result: dict[str, Any] = {"batches": rows, "particles": n_particles}

    result["daml_times"] = timed(lambda s: rs.systematic(w, seed=s), repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result["daml_1thread_times"] = timed(lambda s: rs.systematic(w, seed=s), repeats)
    finally:
        torch.set_num_threads(threads)
    result["daml_searchsorted_times"] = timed(lambda s: torch_searchsorted_systematic(w, s), repeats)
    result["numpy_times"] = timed(lambda s: numpy_systematic_seeded(w_np, s), repeats)
    for key in ("daml", "daml_1thread", "daml_searchsorted", "numpy"):
        result[f"{key}_s"] = median(result[f"{key}_times"])
    result["ratio"] = result["numpy_s"] / result["daml_s"]
    result["daml_peak_extra_mib"] = peak_extra_mib(lambda s: rs.systematic(w, seed=s))
    result["numpy_peak_extra_mib"] = peak_extra_mib(lambda s: numpy_systematic_seeded(w_np, s))
    return result


def check_same_uniforms(rows: int, n_particles: int) -> dict[str, Any]:
    """Offspring counts of daml and numpy given the same uniforms, particle by particle."""
    w = make_weights(rows, n_particles)
    w_np = w.numpy()
    u = np.random.default_rng(7).random(rows)
    daml_c = rs.offspring_counts(rs._with_uniforms("systematic", w, torch.from_numpy(u)[:, None]),
                                 n_particles).numpy()
    peer_c = numpy_counts(numpy_systematic(w_np, u), n_particles)
    diff = daml_c - peer_c

    # The same search row by row (no offsets), points clipped below 1 as daml does.
    top = np.nextafter(1.0, 0.0)
    per_row_mismatch = 0
    for b in range(rows):
        cdf = np.cumsum(w_np[b])
        cdf /= cdf[-1]
        points = np.minimum((np.arange(n_particles) + u[b]) / n_particles, top)
        idx = np.searchsorted(cdf, points, side="right")
        per_row_mismatch += int(np.count_nonzero(np.bincount(idx, minlength=n_particles) != daml_c[b]))
    return {
        "batches": rows,
        "particles": n_particles,
        "identical": bool(not diff.any()),
        "particles_differing": int(np.count_nonzero(diff)),
        "rows_differing": int(np.count_nonzero(diff.any(axis=1))),
        "max_abs_difference": int(np.abs(diff).max()),
        "particles_differing_from_per_row_numpy": per_row_mismatch,
        "daml_counts_sum_to_n": bool(np.all(daml_c.sum(axis=1) == n_particles)),
    }


def other_schemes(rows: int, n_particles: int, repeats: int) -> list[dict[str, Any]]:
    w = make_weights(rows, n_particles)
    out = []
    for name in ("multinomial", "stratified", "residual"):
        fn = rs.METHODS[name]
        times = timed(lambda s: fn(w, seed=s), repeats)
        out.append({"scheme": name, "daml_s": median(times), "daml_times": times})
    return out


# --------------------------------------------------------------------------------------------------
# report


def _size(rows: int, n_particles: int) -> str:
    exp = int(round(np.log10(n_particles)))
    particles = f"10^{exp}" if 10**exp == n_particles else str(n_particles)
    return f"{rows} × {particles}"


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def markdown(results: dict[str, Any]) -> str:
    reps = results["repeats"]
    lines = [
        "## Systematic resampling",
        "",
        "`daml.resampling.systematic` against a vectorised numpy reference (per-row normalised "
        "cumulative weights shifted by the row index, one `np.searchsorted` of all systematic points, "
        "row offsets subtracted). B batches × N particles, float64, random positive weights, n = N "
        f"ancestors per batch. Median of {reps} runs after a warm-up; ratio = numpy / daml (> 1: daml "
        "is faster). Peak memory is the resident memory one call adds at its peak.",
        "",
        "| size (B × N) | daml s | numpy s | ratio | daml, 1 thread s | torch searchsorted variant s "
        "| peak extra MiB, daml / numpy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["comparison"]:
        lines.append(
            f"| {_size(r['batches'], r['particles'])} | {r['daml_s']:.4f} | {r['numpy_s']:.4f} "
            f"| {r['ratio']:.1f} | {r['daml_1thread_s']:.4f} | {r['daml_searchsorted_s']:.4f} "
            f"| {_mib(r['daml_peak_extra_mib'])} / {_mib(r['numpy_peak_extra_mib'])} |"
        )
    big = results["comparison"][0]
    lines += [
        "",
        f"Other daml schemes at {_size(big['batches'], big['particles'])} (median of "
        f"{results['other_repeats']}): "
        + ", ".join(f"{o['scheme']} {o['daml_s']:.2f} s" for o in results["other_schemes"]) + ".",
        "",
    ]
    c = results["check"]
    where = _size(c["batches"], c["particles"])
    if c["identical"]:
        lines.append(f"Check: with the same uniforms, daml and numpy give identical offspring counts "
                     f"for all particles of the {where} problem.")
    else:
        lines.append(
            f"Check: with the same uniforms, daml and numpy offspring counts differ for "
            f"{c['particles_differing']} particles in {c['rows_differing']} batches of the {where} "
            f"problem (at most by {c['max_abs_difference']}); against numpy searching row by row "
            f"without offsets, {c['particles_differing_from_per_row_numpy']} differ, so the rest come "
            f"from rounding of the row offsets in the peer.")
    lines += [
        "",
        _report.machine_line(results["machine"]),
        "",
        f"Command: `{results['command']}`",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds), smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (at least 5)")
    args = parser.parse_args(argv)
    repeats = max(5, args.repeats if args.repeats is not None else (5 if args.quick else 7))
    sizes = QUICK_SIZES if args.quick else FULL_SIZES

    results: dict[str, Any] = {
        "benchmark": "resampling",
        "quick": args.quick,
        "repeats": repeats,
        "command": _report.command_line(),
        "machine": _report.machine_info(),
    }
    results["comparison"] = []
    for rows, n_particles in sizes:
        r = compare(rows, n_particles, repeats)
        print(f"{_size(rows, n_particles):>12}: daml {r['daml_s']:.4f} s, numpy {r['numpy_s']:.4f} s, "
              f"ratio {r['ratio']:.2f} (1 thread {r['daml_1thread_s']:.4f} s, "
              f"searchsorted {r['daml_searchsorted_s']:.4f} s)", flush=True)
        results["comparison"].append(r)
    results["other_repeats"] = 5
    results["other_schemes"] = other_schemes(*sizes[0], results["other_repeats"])
    for o in results["other_schemes"]:
        print(f"{o['scheme']:>12}: {o['daml_s']:.3f} s", flush=True)
    results["check"] = check_same_uniforms(*sizes[0])
    print("check:", results["check"], flush=True)

    name = "resampling-quick" if args.quick else "resampling"
    print("wrote", _report.write_json(name, results))
    if not args.quick:
        print("wrote", _report.write_section("resampling", markdown(results)))
    else:
        print(markdown(results))

    check = results["check"]
    assert check["daml_counts_sum_to_n"], "daml offspring counts do not sum to n"
    # Same uniforms, same scheme: only floating-point ties may differ, by one copy, in a handful of
    # particles (the peer's row offsets cost it bits of precision).
    assert check["max_abs_difference"] <= 1, check
    assert check["particles_differing"] <= 1e-6 * check["batches"] * check["particles"] + 10, check
    return results


if __name__ == "__main__":
    main()
