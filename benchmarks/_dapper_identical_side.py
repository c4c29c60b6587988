"""DAPPER side of ``benchmarks/dapper_identical.py``: DAPPER's filters on truths and observations made by daml.

Run with the Python of a separate environment where DAPPER (1.7.1) is installed; never imported by
daml. ``benchmarks/dapper_identical.py`` writes an ``.npz`` with the truths and observations of its
twin experiments and runs this file as a subprocess; the last line of standard output is one JSON
object.

The ``.npz`` holds (``E`` truths, ``K`` model steps, ``Ko + 1`` analyses, ``Nx`` variables, ``p``
observations):

* ``config``: ``"bocquet2010"`` or ``"bocquet2010_m40"``, the DAPPER file whose ``HMM`` is used;
* ``xx`` ``(E, K + 1, Nx)``: the truth at steps ``0..K`` (DAPPER's ``xx``);
* ``yy`` ``(E, Ko + 1, p)``: the observations, ``yy[:, ko]`` at step ``(ko + 1) * dko`` (DAPPER's ``yy``);
* ``dt``, ``dko``, ``burn_in``, ``obs_idx`` ``(p,)``, ``R`` ``(p, p)``, ``x0_mean`` ``(Nx,)``,
  ``x0_cov`` ``(Nx, Nx)``, ``truth_label`` ``(E,)``: what daml used, checked here against DAPPER's
  ``HMM`` (a mismatch stops the run).

Before filtering, the truth is checked against DAPPER's own model: the largest difference between
``HMM.Dyn(xx[k])`` and ``xx[k + 1]`` over all steps and truths is reported (round-off only when both
libraries integrate the same Lorenz-96 with the same RK4 step).

For every method, truth and filter seed: ``set_seed(seed)``, ``xp.assimilate(HMM, xx, yy)``,
``xp.stats.average_in_time()``; reported are ``rmse.a`` (its ``val`` and DAPPER's own
time-averaging confidence ``prec``) and ``rmv.a``, with DAPPER's burn-in (``tseq.masko``: analysis
times after ``BurnIn``). ``PartFilt`` scores its analysis ``"a"`` inside ``trigger_resampling``,
i.e. the reweighted forecast before the resampling and the jitter.

Usage::

    /tmp/dapper-venv/bin/python benchmarks/_dapper_identical_side.py data.npz \
        --methods pf100 pf800 enkf24 --seeds 11 12 13
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import time

# name: (DAPPER call as text, builder)
METHODS = {
    "pf100": "PartFilt(N=100, NER=0.2, reg=1.3)",
    "pf800": "PartFilt(N=800, NER=0.2, reg=0.8)",
    "pf3000": "PartFilt(N=3000, NER=0.2, reg=1.2)",
    "enkf24": "EnKF('Sqrt', N=24, infl=1.04, rot=True)",
}


def make(name: str, da):
    if name == "pf100":
        return da.PartFilt(N=100, NER=0.2, reg=1.3)
    if name == "pf800":
        return da.PartFilt(N=800, NER=0.2, reg=0.8)
    if name == "pf3000":
        return da.PartFilt(N=3000, NER=0.2, reg=1.2)
    if name == "enkf24":
        return da.EnKF("Sqrt", N=24, infl=1.04, rot=True)
    raise SystemExit(f"unknown method {name!r}; expected one of {sorted(METHODS)}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("npz")
    parser.add_argument("--methods", nargs="+", required=True, choices=sorted(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="filter seeds (set_seed), per truth")
    parser.add_argument("--truths", type=int, nargs="*", default=None, help="indices of the truths to run (default all)")
    args = parser.parse_args(argv)
    if any(s <= 0 for s in args.seeds):
        raise SystemExit("--seeds: positive ints (DAPPER refuses seed 0)")

    noise = io.StringIO()       # DAPPER prints warnings on import / short runs: keep them off stdout
    with contextlib.redirect_stdout(noise):
        import numpy as np

        import dapper
        import dapper.da_methods as da
        import dapper.tools.progressbar as progressbar
        from dapper.dpr_config import rc
        from dapper.tools.seeding import set_seed
    progressbar.disable_progbar = True
    rc.liveplotting = False

    data = np.load(args.npz)
    config = str(data["config"])
    with contextlib.redirect_stdout(noise):
        if config == "bocquet2010":
            from dapper.mods.Lorenz96.bocquet2010 import HMM
        elif config == "bocquet2010_m40":
            from dapper.mods.Lorenz96.bocquet2010_m40 import HMM
        else:
            raise SystemExit(f"config: 'bocquet2010' or 'bocquet2010_m40', got {config!r}")
    HMM = HMM.copy()
    xx_all, yy_all = data["xx"], data["yy"]
    if xx_all.ndim != 3 or yy_all.ndim != 3 or xx_all.shape[0] != yy_all.shape[0]:
        raise SystemExit(f"xx (E, K+1, Nx) and yy (E, Ko+1, p) expected, got {xx_all.shape} and {yy_all.shape}")
    K = xx_all.shape[1] - 1
    if K != HMM.tseq.K:                           # a shortened run (smoke test): DAPPER's own rule for BurnIn
        with contextlib.redirect_stdout(noise):
            HMM.tseq.K = K
    tseq = HMM.tseq
    Nx = HMM.Dyn.M
    obs_op = HMM.Obs(0) if callable(HMM.Obs) and not hasattr(HMM.Obs, "noise") else HMM.Obs
    p = int(obs_op.noise.C.full.shape[0])
    checks = {
        "dt": (float(data["dt"]), float(tseq.dt)),
        "dko": (int(data["dko"]), int(tseq.dko)),
        "burn_in": (float(data["burn_in"]), float(tseq.BurnIn)),
        "xx shape": (list(xx_all.shape[1:]), [tseq.K + 1, Nx]),
        "yy shape": (list(yy_all.shape[1:]), [tseq.Ko + 1, p]),
    }
    for key, (ours, theirs) in checks.items():
        if ours != theirs:
            raise SystemExit(f"{key}: daml's data has {ours}, DAPPER's {config} HMM has {theirs}")
    obs_idx = np.asarray(data["obs_idx"])
    picked = np.argmax(obs_op(np.eye(Nx)), axis=0)     # DAPPER's operator applied to the unit vectors
    if not np.array_equal(picked, obs_idx):
        raise SystemExit(f"obs_idx: daml observes {obs_idx.tolist()}, DAPPER {picked.tolist()}")
    for key, theirs in (("R", obs_op.noise.C.full), ("x0_mean", HMM.X0.mu), ("x0_cov", HMM.X0.C.full)):
        if not np.allclose(data[key], theirs, rtol=0, atol=1e-12):
            raise SystemExit(f"{key}: daml's differs from DAPPER's {config} HMM")

    # The truth against DAPPER's model, one step at a time (both: RK4 of the same tendency).
    model_dev = 0.0
    for xx in xx_all:
        nxt = HMM.Dyn(xx[:-1].copy(), np.nan, tseq.dt)
        model_dev = max(model_dev, float(np.max(np.abs(nxt - xx[1:]))))
    # The observations against the truth: yy[ko] - H xx[(ko+1) dko], standardised by R.
    kk_obs = (np.arange(tseq.Ko + 1) + 1) * tseq.dko
    resid = yy_all - xx_all[:, kk_obs][..., obs_idx]
    obs_var = float(resid.var())

    truths = range(xx_all.shape[0]) if args.truths is None else args.truths
    runs = []
    for name in args.methods:
        for e in truths:
            for seed in args.seeds:
                set_seed(seed)
                xp = make(name, da)
                w0, c0 = time.perf_counter(), time.process_time()
                with contextlib.redirect_stdout(noise):
                    xp.assimilate(HMM, xx_all[e], yy_all[e], liveplots=False)
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                xp.stats.average_in_time()
                av = xp.avrgs
                rmse = float(av.rmse.a.val)
                prec = float(av.rmse.a.prec)
                try:
                    rmv = float(av.rmv.a.val)
                except (AttributeError, KeyError):
                    rmv = None
                runs.append({"method": name, "call": METHODS[name], "truth": int(e),
                             "truth_label": int(data["truth_label"][e]), "seed": seed,
                             "rmse_a": rmse, "rmse_a_prec": prec if np.isfinite(prec) else None,
                             "rmv_a": rmv if rmv is None or np.isfinite(rmv) else None,
                             "wall_s": wall, "cpu_s": cpu})
                print(f"dapper {name} truth {e} seed {seed}: rmse.a {rmse:.4f} ({wall:.1f} s)",
                      file=sys.stderr, flush=True)

    out = {"dapper_version": dapper.__version__, "numpy": np.__version__, "python": platform.python_version(),
           "config": config, "K": int(tseq.K), "Ko": int(tseq.Ko), "burn_in": float(tseq.BurnIn),
           "analyses_after_burn_in": int(np.count_nonzero(tseq.masko)),
           "truth_vs_dapper_model_max_abs": model_dev, "obs_residual_variance": obs_var,
           "runs": runs}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
