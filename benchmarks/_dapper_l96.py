"""DAPPER side of the Lorenz-96 benchmark: run with DAPPER's own interpreter, print JSON.

Not part of daml and never imported by it: ``benchmarks/lorenz96.py`` runs this file as a
subprocess with the Python of a separate environment where DAPPER (1.7.1) is installed, so that
DAPPER stays out of daml's dependencies.

Threads: the caller sets ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS``
before this process starts, but DAPPER itself, on importing ``dapper.da_methods`` (through
``dapper/tools/multiproc.py``), calls ``threadpoolctl.threadpool_limits(1)``: as shipped it runs
numpy's BLAS on one thread whatever the environment says. ``--blas-threads N`` re-applies
``threadpool_limits(N)`` after the import (``0``: leave DAPPER's own limit). The BLAS pools actually
in use during the runs are reported with the results.

The configuration is DAPPER's ``mods/Lorenz96/sakov2008.py`` (40 variables, F = 8, dt = 0.05, all
variables observed every step with R = I, X0 ~ N(x0, 0.001 I), burn-in 20 time units) with
``HMM.tseq.Ko`` set from the command line (``Ko + 1`` analyses). For each seed and method, as
DAPPER's own ``seed_and_simulate`` does: ``set_seed(seed)``, ``xx, yy = HMM.simulate()``, then
``xp.assimilate(HMM, xx, yy)``, timed with ``time.perf_counter`` (wall) and ``time.process_time``
(CPU of this process); so every method sees the same truth for a given seed. An untimed 20-cycle
run of each method comes first (warm-up).

``--stats full`` keeps DAPPER's default statistics, computed inside ``assimilate`` at every cycle
(mean, spread, error, CRPS, skewness, kurtosis, SVD spectrum, rank histogram, ...); ``--stats
minimal`` sets DAPPER's own switches ``rc.comps["error_only"] = True`` and
``rc.comps["max_spectral"] = 0`` and keeps only the ``rms`` field summary, so that only the mean
and its error are computed per cycle (rmse.a is unchanged; rmv.a is then not available). The
progress bar is disabled in both (``dapper.tools.progressbar.disable_progbar``) and liveplotting is
off (``liveplots=False``).

Usage::

    /path/to/dapper-venv/bin/python benchmarks/_dapper_l96.py --cycles 1000 --seeds 3000 3001 3002 \
        --methods etkf letkf --stats full

The last line of standard output is one JSON object (DAPPER may print warnings before it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time

METHODS = {
    "etkf": "EnKF('Sqrt', N=24, infl=1.02, rot=True)",
    "letkf": "LETKF(N=7, infl=1.04, rot=True, loc_rad=4)",
    "pf": "PartFilt(N=1000, NER=0.5, reg=0.7)",
}


def _make(name: str, da):
    if name == "etkf":
        return da.EnKF("Sqrt", N=24, infl=1.02, rot=True)
    if name == "letkf":
        return da.LETKF(N=7, infl=1.04, rot=True, loc_rad=4)
    if name == "pf":
        return da.PartFilt(N=1000, NER=0.5, reg=0.7)
    raise SystemExit(f"unknown method {name!r}; expected one of {sorted(METHODS)}")


def _blas_pools() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version")}
            for p in threadpool_info()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000, help="HMM.tseq.Ko")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3000, 3001, 3002])
    parser.add_argument("--methods", nargs="+", default=["etkf", "letkf"], choices=sorted(METHODS))
    parser.add_argument("--stats", choices=("full", "minimal"), default="full")
    parser.add_argument("--blas-threads", type=int, default=0,
                        help="BLAS threads after DAPPER's import (0: DAPPER's own limit, 1)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the untimed 20-cycle run of each method")
    args = parser.parse_args(argv)

    # DAPPER prints a liveplotting warning on import under a non-interactive backend: keep it off
    # the JSON channel.
    noise = io.StringIO()
    with contextlib.redirect_stdout(noise):
        import numpy as np

        import dapper
        import dapper.da_methods as da
        import dapper.tools.progressbar as progressbar
        from dapper.dpr_config import rc
        from dapper.mods.Lorenz96.sakov2008 import HMM
        from dapper.tools.seeding import set_seed

    if args.blas_threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads)
    progressbar.disable_progbar = True
    rc.liveplotting = False
    if args.stats == "minimal":
        rc.comps["error_only"] = True
        rc.comps["max_spectral"] = 0
        rc.field_summaries = ["rms"]

    HMM = HMM.copy()
    with contextlib.redirect_stdout(noise):   # a short run warns that BurnIn is reduced
        HMM.tseq.Ko = args.cycles
    tseq = HMM.tseq

    # Warm-up (untimed): one short run of each method, so that first-call costs (lazy imports,
    # BLAS initialisation) do not land on the first timed seed.
    if args.warmup:
        short = HMM.copy()
        with contextlib.redirect_stdout(noise):
            short.tseq.Ko = 20
        for name in args.methods:
            set_seed(1)
            xx, yy = short.simulate()
            _make(name, da).assimilate(short, xx, yy, liveplots=False)

    runs = []
    for seed in args.seeds:
        for name in args.methods:
            # As DAPPER's own seed_and_simulate: seed, simulate the truth and observations, assimilate.
            set_seed(seed)
            t0 = time.perf_counter()
            xx, yy = HMM.simulate()
            simulate_s = time.perf_counter() - t0
            xp = _make(name, da)
            w0, c0 = time.perf_counter(), time.process_time()
            xp.assimilate(HMM, xx, yy, liveplots=False)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            xp.stats.average_in_time()
            avrgs = xp.avrgs
            rmse = float(avrgs.rmse.a.val)
            try:
                rmv = float(avrgs.rmv.a.val)
            except (AttributeError, KeyError):
                rmv = None
            runs.append({
                "method": name,
                "call": METHODS[name],
                "seed": seed,
                "wall_s": wall,
                "cpu_s": cpu,
                "rmse_a": rmse,
                "rmv_a": rmv if rmv is None or np.isfinite(rmv) else None,
                "simulate_s": simulate_s,
            })
            print(f"dapper {name} seed {seed} ({args.stats} stats, BLAS threads {args.blas_threads or 1}): "
                  f"{wall:.2f} s wall, {cpu:.2f} s CPU, rmse.a {rmse:.4f}", file=sys.stderr, flush=True)

    out = {
        "dapper_version": dapper.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "stats": args.stats,
        "cycles": int(tseq.Ko + 1),          # analyses at ko = 0..Ko
        "model_steps": int(tseq.K),
        "Ko": int(tseq.Ko),
        "dt": float(tseq.dt),
        "dko": int(tseq.dko),
        "burn_in": float(tseq.BurnIn),
        "cycles_after_burn_in": int(np.count_nonzero(tseq.masko)),
        "thread_env": {k: os.environ.get(k) for k in
                       ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "blas_threads_arg": args.blas_threads,
        "warmup": args.warmup,
        "blas_pools": _blas_pools(),
        "runs": runs,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
