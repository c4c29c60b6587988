"""Benchmark: the UCI regression sets with the standard splits (Hernández-Lobato & Adams 2015).

For each data set in ``../shared/data/uci`` (or ``--data``) and each of its train/test splits (20;
protein 5): inputs and targets normalised on the training split (inside :func:`daml.ensembles.fit`),
one hidden layer of 50 units (100 for protein), M = 5, Adam with batch size 32 and learning rate 0.01.
Since issue 26 the RML ensemble and the noise estimate use daml's defaults: the activation of
:func:`daml.ensembles.mlp` (``tanh``; ``--activation``) and :func:`daml.ensembles.fit`'s training to its
tolerance, with its cap (2000 epochs, ``--rml-epochs``) and its Levenberg-Marquardt polish. The two baselines
keep the published setting, ReLU (``--baseline-activation``) and 40 epochs (``--epochs``): the deep
ensemble's unanchored heteroscedastic members do not converge within any cap (docs/ensembles.md), 2000
epochs of them would multiply the run time by about 50, and tanh baselines at 40 epochs fit badly (yacht,
split 0: deep-ensemble RMSE 8.3 against 1.1 with ReLU). ``--activation relu --rml-epochs 40`` gives the runs
before issue 26 (ReLU members stall at kinks and are reported unconverged with a ``ConvergenceWarning``).
The number of unconverged members of each ensemble is stored per split (``weights.unconverged_*``).
Seven columns, all in daml's API:

* ``deep_ensemble``: mean and variance heads, Gaussian NLL, uniform Gaussian mixture;
* ``mc_dropout``: dropout 0.05, the Gaussian prior as weight decay, 50 passes, the noise level
  estimated on 10 % of the training split (:func:`daml.ensembles.estimate_noise`);
* ``weighted``: an RML ensemble (prior draws, anchored, perturbed targets, the same noise estimate)
  with importance weights from the RML Gauss-Newton estimator;
* ``equal_weight``: that ensemble after resample-move (MALA, 200 steps);
* ``weighted_hetero``: the deep ensemble's members taken as the proposal, weighted with the Laplace
  mixture and the heteroscedastic likelihood (:func:`daml.ensembles.fisher`);
* ``equal_weight_hetero``: that ensemble after resample-move (MALA, 200 steps, heteroscedastic posterior);
* ``equal_weight_hetero_loo``: the same predictive with its spread calibrated on the training split by
  one factor, the leave-one-out maximiser of :func:`daml.ensembles.loo_variance_scale` (no held-out data).

Reported per data set: test RMSE, NLL, CRPS and 90 % interval coverage (mean ± standard error over
splits, original units), with the published deep-ensemble and MC-dropout numbers (Lakshminarayanan
et al. 2017, Table 1) beside them, and the Kish ESS and PSIS k-hat of the raw weights.

Run: ``python benchmarks/uci.py [--sets boston,yacht] [--splits 20] [--threads 1] [--activation tanh]
[--epochs 40] [--rml-epochs CAP] [--baseline-activation relu]``; writes
``benchmarks/results/uci.json`` and the ``uci`` section of ``docs/benchmarks.md``. Results are kept per
data set, so a run over a subset adds to the earlier ones. ``--methods deep_ensemble,equal_weight_hetero``
(for example) computes only those methods (and what they need) and keeps the other methods' results of
the same splits from the stored run; every method's seeds depend only on the split, so a method that is
recomputed gives the same numbers as before unless its code changed (the script prints, per split, the
largest change of the recomputed methods' stored scores as a check).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

import daml.ensembles as E  # noqa: E402
from daml.ensembles.training import DEFAULT_ACTIVATION, DEFAULT_EPOCHS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "uci"
SETS = {  # name in the table: folder
    "boston": "bostonHousing", "concrete": "concrete", "energy": "energy", "kin8nm": "kin8nm",
    "naval": "naval-propulsion-plant", "power": "power-plant", "protein": "protein-tertiary-structure",
    "wine": "wine-quality-red", "yacht": "yacht",
}
# Lakshminarayanan et al. (2017), Table 1: (RMSE MC-dropout, RMSE deep ensemble, NLL MC-dropout, NLL deep ens.)
PUBLISHED = {
    "boston": ("2.97±0.85", "3.28±1.00", "2.46±0.25", "2.41±0.25"),
    "concrete": ("5.23±0.53", "6.03±0.58", "3.04±0.09", "3.06±0.18"),
    "energy": ("1.66±0.19", "2.09±0.29", "1.99±0.09", "1.38±0.22"),
    "kin8nm": ("0.10±0.00", "0.09±0.00", "-0.95±0.03", "-1.20±0.02"),
    "naval": ("0.01±0.00", "0.00±0.00", "-3.80±0.05", "-5.63±0.05"),
    "power": ("4.02±0.18", "4.11±0.17", "2.80±0.05", "2.79±0.04"),
    "protein": ("4.36±0.04", "4.71±0.06", "2.89±0.01", "2.83±0.02"),
    "wine": ("0.62±0.04", "0.64±0.04", "0.93±0.06", "0.94±0.12"),
    "yacht": ("1.11±0.38", "1.58±0.48", "1.55±0.12", "1.18±0.21"),
}
METHODS = ("deep_ensemble", "mc_dropout", "weighted", "equal_weight", "weighted_hetero", "equal_weight_hetero",
           "equal_weight_hetero_loo")
EQUAL_WEIGHT = ("equal_weight", "equal_weight_hetero", "equal_weight_hetero_loo")
HETERO = ("deep_ensemble", "weighted_hetero", "equal_weight_hetero", "equal_weight_hetero_loo")
METRICS = ("rmse", "nll", "crps", "coverage")
RESULTS = ROOT / "benchmarks" / "results" / "uci.json"


def load(folder: Path, split: int):
    d = folder / "data"
    data = np.loadtxt(d / "data.txt")
    feat = np.loadtxt(d / "index_features.txt", dtype=int)
    targ = int(np.loadtxt(d / "index_target.txt"))
    tr = np.loadtxt(d / f"index_train_{split}.txt", dtype=int)
    te = np.loadtxt(d / f"index_test_{split}.txt", dtype=int)
    x, y = data[:, feat], data[:, targ]
    return x[tr], y[tr], x[te], y[te]


def run_split(name: str, split: int, args) -> dict:
    x, y, xt, yt = load(args.data / SETS[name], split)
    hidden = 100 if name == "protein" else 50
    kw = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)          # the two baselines
    kw_rml = dict(kw, epochs=args.rml_epochs)                                        # RML and the noise estimate
    act = dict(activation=args.activation)                                          # RML and the noise estimate
    base_act = dict(activation=args.baseline_activation)                             # the two baselines
    seed = 1000 * split + 7
    wanted = set(args.methods)
    out: dict = {"weights": {}}
    t0 = time.perf_counter()
    if wanted & set(HETERO):
        de = E.deep_ensemble(x, y, members=args.members, hidden=hidden, seed=seed, **base_act, **kw)
        out["deep_ensemble"] = E.scores(E.predict(de, xt), yt)
        out["weights"]["unconverged_deep_ensemble"] = int((~de.convergence["converged"]).sum())
    if wanted & {"mc_dropout", "weighted", "equal_weight"}:
        noise = E.estimate_noise(E.mlp(x.shape[1], hidden, **act), x, y, seed=seed + 1, **kw_rml)
        md = E.mc_dropout(x, y, noise_sd=noise, hidden=hidden, seed=seed + 2, **base_act, **kw)
        out["mc_dropout"] = E.scores(E.predict(md, xt, dropout_passes=50, seed=seed + 3), yt)
        ens = E.fit(E.mlp(x.shape[1], hidden, **act), x, y, members=args.members, noise_sd=noise, seed=seed + 4,
                    **kw_rml)
        out["weights"]["unconverged_rml"] = int((~ens.convergence["converged"]).sum())
        ew, info = E.weigh(ens, x, y, estimator="rml")
        out["weighted"] = E.scores(E.predict(ew, xt), yt)
        eq, corr = E.equal_weight(ew, x, y, steps=args.mcmc_steps, seed=seed + 5)
        out["equal_weight"] = E.scores(E.predict(eq, xt), yt)
        out["uniform_rml"] = E.scores(E.predict(ens, xt), yt)
        out["weights"].update({"ess": info.ess, "khat": info.khat, "unique_after_resampling": corr.unique_before,
                               "acceptance": float(corr.acceptance.mean()), "noise_sd": noise})
    if wanted & set(HETERO[1:]):
        wde, info_h = E.weigh(de, x, y, estimator="laplace")
        out["weighted_hetero"] = E.scores(E.predict(wde, xt), yt)
        eqh, corr_h = E.equal_weight(wde, x, y, steps=args.mcmc_steps, seed=seed + 6)
        out["equal_weight_hetero"] = E.scores(E.predict(eqh, xt), yt)
        cal = E.loo_variance_scale(eqh, x, y)
        out["equal_weight_hetero_loo"] = E.scores(E.scale_variance(E.predict(eqh, xt), cal.scale), yt)
        out["weights"].update({"ess_hetero": info_h.ess, "khat_hetero": info_h.khat,
                               "acceptance_hetero": float(corr_h.acceptance.mean()), "loo_scale_hetero": cal.scale})
    out["seconds"] = time.perf_counter() - t0
    return out


def merge_row(new: dict, old: dict | None, methods: list[str]) -> dict:
    """The recomputed methods of ``new`` over the stored row ``old`` of the same split."""
    if old is None or set(methods) >= set(METHODS):
        return new
    row = {**old, **{k: v for k, v in new.items() if k in METHODS or k == "uniform_rml"}}
    row["weights"] = {**old.get("weights", {}), **new["weights"]}
    row["seconds_last_run"] = new["seconds"]
    return row


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for method in METHODS + ("uniform_rml",):
        if not all(method in r for r in rows):          # a method added after the stored run
            continue
        summary[method] = {}
        for metric in METRICS:
            vals = np.array([r[method][metric] for r in rows])
            summary[method][metric] = (float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(len(vals)))
                                       if len(vals) > 1 else float("nan"))
    for key in ("ess", "khat", "ess_hetero", "khat_hetero"):
        vals = np.array([r["weights"].get(key, np.nan) for r in rows], dtype=float)
        summary[key] = float(np.median(vals))
    return summary


def describe(settings: dict | None) -> str:
    """The training settings of a stored run, in words (runs before issue 26 stored neither the activation
    nor a separate budget for the RML members)."""
    settings = settings or {}
    act = settings.get("activation", "relu")
    epochs = settings.get("epochs", "40")
    rml = settings.get("rml_epochs")
    if rml is None:
        return f"{act} activation, {epochs} epochs"
    return (f"deep ensemble and MC dropout: {settings.get('baseline_activation', 'relu')} activation, {epochs} "
            f"epochs; RML members and the noise estimate: {act} activation, trained to fit's tolerance (cap {rml} "
            "epochs, then Levenberg-Marquardt)")


def render(results: dict, info: dict, command: str | None = None, settings: dict | None = None) -> str:
    def pm(v, digits=2):
        return "not run" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"

    def get(s, method, metric):          # older runs lack the methods added since
        return s[method][metric] if method in s else None

    lines = ["## UCI regression: weighted and equal-weight ensembles against deep ensembles and MC dropout", "",
             _report.machine_line(info), "",
             f"Standard splits (20; protein 5), one hidden layer (50 units, protein 100), {describe(settings)}, "
             "M = 5, Adam with batch size 32 and lr 0.01, inputs and targets normalised on the training split. Mean ± "
             "standard error over splits, original units; NLL per test point (lower is better); coverage of "
             "the central 90 % interval. Published: Lakshminarayanan et al. (2017), Table 1 (their ± is not "
             "homogeneous across columns, see the reference notes).", ""]
    for metric, digits in (("rmse", 3), ("nll", 2), ("crps", 3), ("coverage", 3)):
        head = "| data set | splits | " + " | ".join(METHODS) + (" | published MC-dropout | published deep ens. |"
                                                              if metric in ("rmse", "nll") else " |")
        lines += [f"**{metric.upper()}**", "", head, "|" + "---|" * (head.count("|") - 1)]
        for name, res in results.items():
            s = res["summary"]
            done = res["splits"] if res.get("planned_splits", res["splits"]) == res["splits"] else \
                f"{res['splits']} of {res['planned_splits']}"
            row = f"| {name} | {done} | " + " | ".join(pm(get(s, m, metric), digits) for m in METHODS)
            if metric == "rmse":
                row += f" | {PUBLISHED[name][0]} | {PUBLISHED[name][1]}"
            elif metric == "nll":
                row += f" | {PUBLISHED[name][2]} | {PUBLISHED[name][3]}"
            lines.append(row + " |")
        lines.append("")
    lines += ["**Degeneracy of the raw weights** (median over splits: RML members, and the deep ensemble's "
              "members with Laplace weights) and the goals, for the equal-weight ensembles", "",
              "| data set | ESS of 5 (RML / DE) | k-hat (RML / DE) | equal-weight NLL ≤ deep ensemble (RML / DE / DE, "
              "LOO-scaled) | equal-weight coverage within 3 points of 90 % (RML / DE / DE, LOO-scaled) | "
              "LOO factor c, median (range) |",
              "|---|---|---|---|---|---|"]
    wins = dict.fromkeys(EQUAL_WEIGHT, 0)
    for name, res in results.items():
        s = res["summary"]
        better, cov = [], []
        for m in EQUAL_WEIGHT:
            if m not in s:
                better.append("not run")
                cov.append("not run")
                continue
            b = s[m]["nll"][0] <= s["deep_ensemble"]["nll"][0]
            wins[m] += b
            better.append("yes" if b else "no")
            cov.append(f"{'yes' if abs(s[m]['coverage'][0] - 0.9) <= 0.03 else 'no'} ({s[m]['coverage'][0]:.3f})")
        c = [r["weights"]["loo_scale_hetero"] for r in res["rows"] if "loo_scale_hetero" in r.get("weights", {})]
        c_cell = f"{np.median(c):.2f} ({min(c):.2f}–{max(c):.2f})" if c else "not run"
        lines.append(f"| {name} | {s['ess']:.2f} / {s.get('ess_hetero', float('nan')):.2f} | {s['khat']:.2f} / "
                     f"{s.get('khat_hetero', float('nan')):.2f} | {' / '.join(better)} | {' / '.join(cov)} | {c_cell} |")
    covered = {m: sum(m in r["summary"] and abs(r["summary"][m]["coverage"][0] - 0.9) <= 0.03 for r in results.values())
               for m in EQUAL_WEIGHT}
    lines += ["", f"Equal-weight NLL at least as good as the deep ensemble's on {wins['equal_weight']} of {len(results)} "
              f"data sets with the RML proposal, on {wins['equal_weight_hetero']} with the deep ensemble's members "
              f"as the proposal and on {wins['equal_weight_hetero_loo']} with that ensemble's spread scaled by its "
              f"leave-one-out factor (goal: 6 of 9); coverage within 3 points on {covered['equal_weight']}, "
              f"{covered['equal_weight_hetero']} and {covered['equal_weight_hetero_loo']} (goal: all).", "",
              f"Command: `{command or _report.command_line()}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--splits", type=int, default=20)
    p.add_argument("--epochs", type=int, default=40, help="epochs of the deep ensemble and MC dropout (published: 40)")
    p.add_argument("--rml-epochs", type=int, default=DEFAULT_EPOCHS,
                   help="cap on the epochs of the RML members and the noise estimate (default: fit's); they stop at "
                        "fit's tolerance")
    p.add_argument("--activation", default=DEFAULT_ACTIVATION, choices=("tanh", "silu", "gelu", "relu"),
                   help="hidden-layer activation of the RML members and the noise estimate (default: mlp's)")
    p.add_argument("--baseline-activation", default="relu", choices=("tanh", "silu", "gelu", "relu"),
                   help="hidden-layer activation of the deep ensemble and MC dropout (published: relu)")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--mcmc-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of the methods to compute; the others are kept from the stored run")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--render", action="store_true",
                   help="only rewrite the docs section from the stored results (no runs)")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    info = _report.machine_info()
    results = json.loads(RESULTS.read_text())["sets"] if RESULTS.exists() else {}
    if args.render:
        stored = json.loads(RESULTS.read_text())
        order = {k: results[k] for k in SETS if k in results}
        last = stored.get("command", "the runs named in the summary above")
        _report.write_section("uci", render(order, stored["machine"],
                                            f"{last}`, section re-rendered by `{_report.command_line()}",
                                            stored.get("settings")))
        return 0
    for name in args.sets.split(","):
        folder = args.data / SETS[name]
        n_splits = min(args.splits, int(np.loadtxt(folder / "data" / "n_splits.txt")))
        if name == "protein":
            n_splits = min(n_splits, 5)
        stored = results.get(name, {}).get("rows", [])
        partial = not set(args.methods) >= set(METHODS)
        if partial and len(stored) < n_splits:
            raise SystemExit(f"--methods needs a stored run of all {n_splits} splits of {name}; it has {len(stored)}")
        rows = []
        for k in range(n_splits):
            new = run_split(name, k, args)
            old = stored[k] if partial else None
            again = [m for m in METHODS if m in new and old is not None and m in old]
            if again:
                change = max(abs(new[m][q] - old[m][q]) for m in again for q in METRICS)
                print(f"{name} split {k}: recomputed {', '.join(again)} differ from the stored scores by at most "
                      f"{change:.2e}")
            rows.append(merge_row(new, old, args.methods))
            r = rows[-1]
            print(f"{name} split {k}: " + ", ".join(f"{m} nll {r[m]['nll']:.3f} rmse {r[m]['rmse']:.3f}"
                                                   for m in METHODS if m in r)
                  + f" ({new['seconds']:.1f} s)", flush=True)
            # written after every split, so a run stopped early keeps (and labels) what it measured
            results[name] = {"splits": len(rows), "planned_splits": n_splits, "rows": rows,
                             "summary": summarise(rows)}
            if not args.no_write:
                # merge with what other runs (over other data sets) wrote meanwhile
                if RESULTS.exists():
                    results = {**json.loads(RESULTS.read_text())["sets"], name: results[name]}
                order = {k: results[k] for k in SETS if k in results}
                _report.write_json("uci", {"machine": info, "settings": {k: str(v) for k, v in vars(args).items()},
                                           "command": _report.command_line(), "sets": order})
                _report.write_section("uci", render(order, info, settings={k: str(v) for k, v in vars(args).items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
