"""Benchmark: Q10 by double machine learning against the end-to-end hybrid, and against DoubleML.

Set-up (issue 8, after Cohrs et al. 2024): the synthetic site of :func:`daml.causal.synthetic_site`
(five years, half-hourly, AT-Neu latitude, true Q10 = 1.5, Tref = 15 C, multiplicative noise 0.2,
one noise draw as in the original study); ``--reps`` repetitions, each a random subsample of
n = 3200 half-hours.

* DML (partialling out, 5 folds, one split) with the forest learner (100 trees, min leaf 5) and with
  the network learner (16-16 tanh, 2000 full-batch Adam steps). The network's 5 folds x 2 nuisances x
  ``reps`` fits run as one batched ``MLPRegressor.fit_many`` pass over all repetitions (the results
  enter ``daml.causal.plr`` as external predictions; same numbers as one ``q10`` call per
  repetition, up to rounding).
* The end-to-end hybrid (softplus(NN) * Q10^d, free Q10 initialised at 1.5 + 0.1 N(0,1), 4000 Adam
  steps, batch 256, early stopping on 800 validation points), one member per repetition on its own
  3200 training points, with and without temperature among the network's inputs, dropout 0 and 0.2.
* The naive regression of log RECO on temperature alone.
* Flux partitioning (``--partition K``, its own section): GPP and RECO against the truth on K one-year
  sites (n = 8000 rows, day and night), with the final-stage and the full bootstrap.
* Speed: one DML fit (n = 3200) by daml and by ``doubleml.DoubleMLPLR`` with the same learners and
  the same splits (best of ``--repeats``).

Run: ``python benchmarks/q10.py [--reps 100] [--repeats 3]``; writes ``benchmarks/results/q10.json``
and its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from daml import causal  # noqa: E402

TRUE_Q10 = 1.5


def stats(q: np.ndarray, lo: np.ndarray | None = None, hi: np.ndarray | None = None) -> dict:
    out = {"mean": float(q.mean()), "sd": float(q.std(ddof=1)), "bias": float(q.mean() - TRUE_Q10),
           "rmse": float(np.sqrt(np.mean((q - TRUE_Q10) ** 2))), "n": int(q.size)}
    if lo is not None:
        out["coverage"] = float(np.mean((lo <= TRUE_Q10) & (TRUE_Q10 <= hi)))
        out["width"] = float(np.mean(hi - lo))
    return out


def subsamples(site, reps: int, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(site.sizes["time"], n, replace=False)) for _ in range(reps)]


def dml_forest(site, idxs, seed):
    qs, lo, hi, ses = [], [], [], []
    for r, idx in enumerate(idxs):
        ds = causal.q10(site.isel(time=idx), learner="forest", seed=seed + r)
        qs.append(float(ds["q10"]))
        lo.append(float(ds["q10_ci"][0]))
        hi.append(float(ds["q10_ci"][1]))
        ses.append(float(ds["se"]))
    return np.array(qs), np.array(lo), np.array(hi), np.array(ses)


def dml_network(site, idxs, seed, dropout: float = 0.0, iterations: int = 2000):
    """All repetitions' cross-fitting fits in one batched pass per nuisance."""
    n = idxs[0].size
    xs, ys, ds_, problems, splits_all = [], [], [], [], []
    for r, idx in enumerate(idxs):
        sub = site.isel(time=idx)
        xs.append(np.stack([sub["SW_POT_sm"].values, sub["SW_POT_sm_diff"].values], 1))
        ys.append(np.log(sub["RECO_obs"].values))
        ds_.append((sub["TA"].values - 15.0) / 10.0)
        splits = causal.sample_splits(n, 5, 1, seed=seed + r)
        splits_all.append(splits)
        problems += [(tr + r * n, te + r * n) for tr, te in splits[0]]
    X = np.concatenate(xs)
    preds = {}
    for key, target in (("ml_l", np.concatenate(ys)), ("ml_m", np.concatenate(ds_))):
        net = causal.MLPRegressor(hidden=(16, 16), dropout=dropout, iterations=iterations, random_state=seed)
        out = np.empty(X.shape[0])
        for (tr, te), p in zip(problems, net.fit_many(X, target, problems)):
            out[te] = p
        preds[key] = out.reshape(len(idxs), n)
    qs, lo, hi = [], [], []
    for r in range(len(idxs)):
        res = causal.plr(ys[r], ds_[r], xs[r], ml_l=None, ml_m=None, splits=splits_all[r],
                         predictions={"ml_l": preds["ml_l"][r], "ml_m": preds["ml_m"][r]}, n_boot=1, seed=r)
        qs.append(np.exp(float(res["theta"])))
        lo.append(np.exp(float(res["ci"][0])))
        hi.append(np.exp(float(res["ci"][1])))
    return np.array(qs), np.array(lo), np.array(hi)


def end_to_end(site, reps, seed, include_ta, dropout, iterations):
    pool = site.isel(time=np.sort(np.random.default_rng(seed).choice(site.sizes["time"], 20_000, replace=False)))
    ds = causal.q10_end_to_end(pool, include_ta=include_ta, dropout=dropout, members=reps, subsample=3200,
                               validation=0.04, iterations=iterations, seed=seed)
    return ds["q10_draw"].values


def naive(site, idxs):
    out = []
    for idx in idxs:
        sub = site.isel(time=idx)
        out.append(np.exp(np.polyfit((sub["TA"].values - 15.0) / 10.0, np.log(sub["RECO_obs"].values), 1)[0]))
    return np.array(out)


def partition_scores(seed, bootstrap="full", members=20):
    """GPP and RECO against the truth on one year (8000 rows): point estimates, the members' mean, and
    the pointwise coverage and mean half-width of the 95 % member intervals."""
    site = causal.synthetic_site(years=1, seed=seed)
    idx = np.sort(np.random.default_rng(seed).choice(site.sizes["time"], 8000, replace=False))
    sub = site.isel(time=idx)
    t0 = time.perf_counter()
    p = causal.partition(sub, members=members, bootstrap=bootstrap, seed=seed)
    elapsed = time.perf_counter() - t0

    def r2(a, b):
        return float(1.0 - np.mean((a - b) ** 2) / np.var(b))

    def rmse(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2)))

    day = sub["SW_IN"].values > 0
    out = {"n": 8000, "seed": seed, "bootstrap": bootstrap, "members": members, "seconds": elapsed,
           "lue_corr_day": float(np.corrcoef(p["lue_hat"].values[day], sub["LUE"].values[day])[0, 1])}
    for flux, truth in (("gpp", sub["GPP"].values), ("reco", sub["RECO"].values)):
        lo, hi = p[f"{flux}_ci"].values
        out.update({f"{flux}_rmse": rmse(p[f"{flux}_hat"].values, truth), f"{flux}_r2": r2(p[f"{flux}_hat"].values, truth),
                    f"{flux}_member_mean_rmse": rmse(p[flux].values.mean(0), truth),
                    f"{flux}_coverage": float(np.mean((lo <= truth) & (truth <= hi))),
                    f"{flux}_half_width": float(np.mean(hi - lo) / 2), f"{flux}_mean": float(truth.mean())})
    return out


def partition_section(seeds: list[int], members: int) -> str:
    rows = [partition_scores(s, b, members) for s in seeds for b in ("final", "full")]
    for r in rows:
        print("partition", r, flush=True)
    out = {"rows": rows, "machine": _report.machine_info(), "command": _report.command_line()}
    _report.write_json("q10_partition", out)

    def cell(b, key, d=2):
        v = np.array([r[key] for r in rows if r["bootstrap"] == b])
        return f"{v.mean():.{d}f} ({v.min():.{d}f}–{v.max():.{d}f})" if v.size > 1 else f"{v[0]:.{d}f}"

    lines = [
        "### Flux partitioning: what the bootstrap members carry",
        "",
        f"Synthetic site, one year per seed (seeds {', '.join(map(str, seeds))}), 8000 half-hours drawn at random, "
        f"`causal.partition` with its default learners and {members} members, once with `bootstrap=\"final\"` (the "
        "final stage refitted on resampled rows, nuisances fixed) and once with `bootstrap=\"full\"` (nuisances "
        "cross-fitted again on every resample). Coverage: fraction of half-hours whose true flux lies in the "
        "pointwise 95 % member interval. Cells: mean over seeds (range).",
        "",
        "| bootstrap | flux | RMSE of the point estimate | RMSE of the members' mean | 95 % coverage | mean half-width | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in ("final", "full"):
        for flux in ("gpp", "reco"):
            lines.append(f"| {b} | {flux.upper()} | {cell(b, flux + '_rmse', 3)} | {cell(b, flux + '_member_mean_rmse', 3)} | "
                         f"{cell(b, flux + '_coverage')} | {cell(b, flux + '_half_width', 3)} | {cell(b, 'seconds', 0)} |")
    lines += ["", _report.machine_line(out["machine"]), "", f"Command: `{out['command']}`"]
    text = "\n".join(lines)
    _report.write_section("q10_partition", text)
    return text


def speed(site, repeats, seed):
    import doubleml as dml
    from sklearn.ensemble import RandomForestRegressor

    idx = subsamples(site, 1, 3200, seed)[0]
    sub = site.isel(time=idx)
    x = np.stack([sub["SW_POT_sm"].values, sub["SW_POT_sm_diff"].values], 1)
    y = np.log(sub["RECO_obs"].values)
    d = (sub["TA"].values - 15.0) / 10.0
    splits = causal.sample_splits(y.size, 5, 1, seed=seed)
    rows = []
    learners = {
        "forest (100 trees, leaf 5)": RandomForestRegressor(n_estimators=100, min_samples_leaf=5, random_state=1),
        "network (16-16 tanh, 2000 steps)": causal.MLPRegressor(iterations=2000, random_state=1),
    }
    for name, learner in learners.items():
        def ours():
            return causal.plr(y, d, x, ml_l=learner, ml_m=learner, splits=splits, seed=0)

        def theirs():
            m = dml.DoubleMLPLR(dml.DoubleMLData.from_arrays(x, y, d), learner, learner, n_folds=5,
                                draw_sample_splitting=False)
            m.set_sample_splitting(splits)
            m.fit()
            return m

        t_ours = min(_time(ours) for _ in range(repeats))
        t_theirs = min(_time(theirs) for _ in range(repeats))
        diff = abs(float(ours()["theta"]) - theirs().coef[0])
        rows.append({"learner": name, "daml_s": t_ours, "doubleml_s": t_theirs, "ratio": t_theirs / t_ours,
                     "theta_difference": diff})
    return rows


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def split_spread(site, idxs, splits: int, seed: int) -> dict:
    """How much the forest DML estimate moves with the sample split alone: for each subsample, theta
    (log Q10) from ``splits`` different split/forest seeds; the root-mean-square between-split sd
    against the mean standard error the single-split interval uses, and the implied coverage of a
    95 % interval whose standard error ignores that spread, if the split were the only thing missing."""
    rows = []
    for r, idx in enumerate(idxs):
        sub = site.isel(time=idx)
        th, se = [], []
        for k in range(splits):
            ds = causal.q10(sub, learner="forest", seed=seed + r + 1000 * k)
            th.append(float(np.log(ds["q10"])))
            se.append(float(ds["se"]))
        rows.append({"between_split_sd": float(np.std(th, ddof=1)), "mean_se": float(np.mean(se))})
    sd = float(np.sqrt(np.mean([r["between_split_sd"] ** 2 for r in rows])))
    se = float(np.mean([r["mean_se"] for r in rows]))
    from scipy.stats import norm
    return {"subsamples": len(idxs), "splits": splits, "rms_between_split_sd": sd, "mean_se": se,
            "ratio": sd / se, "coverage_if_only_split_missing": float(2 * norm.cdf(1.959964 / np.sqrt(1 + (sd / se) ** 2)) - 1),
            "rows": rows}


def repeated_splits(site, idxs, repetitions: int, seed: int) -> dict:
    """Forest DML with ``repetitions`` sample splits per subsample (one fit each), aggregated both
    ways from the same per-split estimates: DoubleML's median of intervals and the median-variance
    rule of Chernozhukov et al. (2018), against one split (the first of the R)."""
    z = 1.959963984540054
    true = np.log(TRUE_Q10)
    one, interval, variance = [], [], []
    t0 = time.perf_counter()
    for r, idx in enumerate(idxs):
        ds = causal.q10(site.isel(time=idx), learner="forest", seed=seed + r, repetitions=repetitions)
        th, se = ds["theta_rep"].values, ds["se_rep"].values
        one.append((th[0], se[0]))
        interval.append(causal.aggregate_repetitions(th, se, "interval"))
        variance.append(causal.aggregate_repetitions(th, se, "variance"))
    out = {"subsamples": len(idxs), "repetitions": repetitions, "seconds": time.perf_counter() - t0}
    for key, rows in (("one_split", one), ("interval", interval), ("variance", variance)):
        th, se = np.array(rows).T
        q = np.exp(th)
        out[key] = {**stats(q, np.exp(th - z * se), np.exp(th + z * se)), "mean_se_theta": float(se.mean()),
                    "sd_theta": float(th.std(ddof=1)), "coverage_theta": float(np.mean(np.abs(th - true) <= z * se))}
    return out


def repeated_section(out: dict) -> str:
    names = {"one_split": "one split (the first of each subsample's R)",
             "interval": f"median of {out['repetitions']} splits, median of intervals (DoubleML, `aggregation=\"interval\"`)",
             "variance": f"median of {out['repetitions']} splits, median of se² + (θ_r - θ)² (`aggregation=\"variance\"`)"}
    lines = ["### Q10 by DML with forest learners: repeated sample splits", "",
             f"{out['subsamples']} subsamples (n = 3200) of the synthetic site (true Q10 = 1.5, noise 0.2), forest learners "
             f"(100 trees, min leaf 5), 5 folds, {out['repetitions']} sample splits per subsample; the three rows aggregate "
             "the same fits. sd and mean se are of theta = log Q10; coverage of the nominal 95 % interval (binomial "
             f"standard error about {np.sqrt(0.95 * 0.05 / out['subsamples']):.3f} at nominal).", "",
             "| aggregation | mean Q10 | bias | sd of theta | mean se of theta | sd / se | 95 % coverage |",
             "|---|---|---|---|---|---|---|"]
    for key in ("one_split", "interval", "variance"):
        s = out[key]
        lines.append(f"| {names[key]} | {s['mean']:.4f} | {s['bias']:+.4f} | {s['sd_theta']:.4f} | {s['mean_se_theta']:.4f} "
                     f"| {s['sd_theta'] / s['mean_se_theta']:.2f} | {s['coverage']:.2f} |")
    lines += ["", f"{out['seconds']:.0f} s in all. " + _report.machine_line(out["machine"]), "",
              f"Command: `{out['command']}`"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--network-reps", type=int, default=None,
                    help="repetitions of DML with network learners (default: --reps; each costs ~15 s on one core)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=4000, help="end-to-end training steps")
    ap.add_argument("--split-spread", type=int, default=0, metavar="K",
                    help="only measure how the forest DML estimate moves with the sample split: K split seeds "
                         "on each of the first --reps subsamples (writes q10_split_spread.json and its section)")
    ap.add_argument("--partition", type=int, default=0, metavar="K",
                    help="only the flux partitioning, with both bootstrap modes, on K one-year sites (writes "
                         "q10_partition.json and its section)")
    ap.add_argument("--members", type=int, default=20, help="bootstrap members of the partitioning")
    ap.add_argument("--repeated-splits", type=int, default=0, metavar="R",
                    help="only forest DML with R sample splits on each of --reps subsamples, both aggregations "
                         "(writes q10_repeated.json and its section)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.partition:
        print(partition_section([args.seed + 40 + k for k in range(args.partition)], args.members))
        return 0
    if args.repeated_splits:
        site = causal.synthetic_site(years=5, q10=TRUE_Q10, noise=0.2, seed=args.seed)
        out = repeated_splits(site, subsamples(site, args.reps, 3200, args.seed + 1), args.repeated_splits,
                              args.seed + 10)
        out["machine"], out["command"] = _report.machine_info(), _report.command_line()
        _report.write_json("q10_repeated", out)
        _report.write_section("q10_repeated", repeated_section(out))
        print({k: v for k, v in out.items() if k not in ("machine",)})
        return 0
    if args.split_spread:
        site = causal.synthetic_site(years=5, q10=TRUE_Q10, noise=0.2, seed=args.seed)
        out = split_spread(site, subsamples(site, args.reps, 3200, args.seed + 1), args.split_spread, args.seed + 10)
        out["machine"], out["command"] = _report.machine_info(), _report.command_line()
        _report.write_json("q10_split_spread", out)
        _report.write_section("q10_split_spread", "\n".join([
            "### Q10 by DML with forest learners: spread over sample splits", "",
            f"{out['subsamples']} subsamples (n = 3200) of the synthetic site, each estimated with {out['splits']} "
            "split/forest seeds (5 folds, one split per fit). Root-mean-square between-split sd of theta = log Q10: "
            f"{out['rms_between_split_sd']:.5f}; mean standard error of one fit: {out['mean_se']:.5f}; ratio "
            f"{out['ratio']:.2f}. If the split were all the single-split interval missed, its coverage would be "
            f"{out['coverage_if_only_split_missing']:.3f} instead of 0.95.", "",
            f"Command: `{out['command']}`"]))
        print({k: v for k, v in out.items() if k != "rows"})
        return 0
    t_start = time.perf_counter()
    site = causal.synthetic_site(years=5, q10=TRUE_Q10, noise=0.2, seed=args.seed)
    idxs = subsamples(site, args.reps, 3200, args.seed + 1)
    res: dict = {"reps": args.reps, "n": 3200, "noise": 0.2, "true_q10": TRUE_Q10}
    t0 = time.perf_counter()
    qf, lf, hf, sef = dml_forest(site, idxs, args.seed + 10)
    res["dml_forest"] = {**stats(qf, lf, hf), "seconds": time.perf_counter() - t0,
                         "bias_over_mean_se_q10": float((qf.mean() - TRUE_Q10) / np.mean(sef * qf))}
    print("dml forest", res["dml_forest"], flush=True)
    t0 = time.perf_counter()
    qn, ln, hn = dml_network(site, idxs[: args.network_reps or args.reps], args.seed + 20)
    res["dml_network"] = {**stats(qn, ln, hn), "seconds": time.perf_counter() - t0}
    print("dml network", res["dml_network"], flush=True)
    res["naive_ols"] = stats(naive(site, idxs))
    for include_ta in (False, True):
        for dropout in (0.0, 0.2):
            t0 = time.perf_counter()
            q = end_to_end(site, args.reps, args.seed + 30, include_ta, dropout, args.iterations)
            key = f"end_to_end_{'with' if include_ta else 'without'}_ta_dropout_{dropout:g}"
            res[key] = {**stats(q), "seconds": time.perf_counter() - t0}
            print(key, res[key], flush=True)
    res["speed"] = speed(site, args.repeats, args.seed + 50)
    print("speed", res["speed"], flush=True)
    res["machine"] = _report.machine_info()
    res["command"] = _report.command_line()
    _report.write_json("q10", res)

    def row(name, s, cov=True):
        c = f"{s['coverage']:.2f}" if cov and "coverage" in s else "n/a"
        return f"| {name} | {s['mean']:.4f} | {s['sd']:.4f} | {s['bias']:+.4f} | {s['rmse']:.4f} | {c} |"

    e2e = {k: v for k, v in res.items() if k.startswith("end_to_end")}
    reg_bias = abs(res["end_to_end_with_ta_dropout_0.2"]["bias"])
    lines = [
        f"Synthetic site (5 years half-hourly, AT-Neu latitude), true Q10 = {TRUE_Q10}, noise 0.2, "
        f"{args.reps} repetitions of n = 3200 ({res['dml_network']['n']} for DML with network learners). Mean, sd, "
        "bias and RMSE of Q10 over repetitions; coverage of the nominal 95 % interval (DML only: a single "
        "end-to-end network has no interval). End-to-end: one member per repetition, each on its own 3200 "
        "training and 800 validation points.",
        "",
        "| estimator | mean | sd | bias | RMSE | 95 % coverage |",
        "|---|---|---|---|---|---|",
        row("DML, forest learners (100 trees, min leaf 5)", res["dml_forest"]),
        row("DML, network learners (16-16 tanh)", res["dml_network"]),
    ]
    for k, v in e2e.items():
        label = k.replace("end_to_end_", "end-to-end, ").replace("_ta_", " TA in the net, ").replace("_", " ")
        lines.append(row(label, v, cov=False))
    lines.append(row("naive regression of log RECO on temperature", res["naive_ols"], cov=False))
    lines += [
        "",
        f"Bias ratio, regularised end-to-end (TA in the net, dropout 0.2) over DML: forest "
        f"{reg_bias / abs(res['dml_forest']['bias']):.0f}x, network {reg_bias / abs(res['dml_network']['bias']):.0f}x.",
        "",
        "Flux partitioning: `python benchmarks/q10.py --partition 3` (its own section).",
        "",
        "Time per DML fit (n = 3200, 5 folds, same learners and splits; best of "
        f"{args.repeats}; ratio = DoubleML / daml, above 1 means daml is faster):",
        "",
        "| learners | daml (s) | DoubleML (s) | ratio | abs. difference of theta |",
        "|---|---|---|---|---|",
    ]
    for s in res["speed"]:
        lines.append(f"| {s['learner']} | {s['daml_s']:.2f} | {s['doubleml_s']:.2f} | {s['ratio']:.2f} | "
                     f"{s['theta_difference']:.1e} |")
    lines += ["", _report.machine_line(res["machine"]) + f", torch threads {args.threads}; total "
              f"{time.perf_counter() - t_start:.0f} s.", "", f"Command: `{res['command']}`"]
    _report.write_section("q10", "## Q10 and flux partitioning by DML (issue 8)\n\n" + "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
