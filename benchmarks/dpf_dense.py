"""Ablation for issue 28: dense proposal networks on Lorenz-96, with and without standardised inputs.

The headline of ``benchmarks/dpf.py`` learns affine proposals, because dense ``tanh`` networks fed the raw
L96 states (about 2 +- 4) did not learn within its budget. ``MixtureProposal.standardise`` feeds the
network standardised inputs (statistics of the training observations only: learning still uses the
observations alone). This script trains the headline's "learned proposal S=1" row with a dense
(32, 32) ``tanh`` network, raw and standardised, with the headline's data, seeds, sizes and budget, and
scores both on the same held-out sequences.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/dpf_dense.py [--seeds K]`` (about 2 min per fit on one
core); writes ``benchmarks/results/dpf_dense.json`` and the ``dpf_dense`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _report  # noqa: E402
import dpf as bench  # noqa: E402

from daml.errors import DivergenceError  # noqa: E402
from daml.filters import MixtureProposal  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.02, help="Adam's learning rate (the headline's: 0.02)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sz = bench.FULL
    seed = 2028 + 1000 * bench.SECTIONS.index("l96")          # the headline's seed (benchmarks/dpf.py)
    problem = bench.l96_problem(sz.l96_n)
    n, m = problem.model.state_size, problem.operator.size
    train = bench.sequences(problem, sz.train, sz.train_steps, seed)
    test = bench.sequences(problem, sz.test, sz.steps, seed + 1)
    windows = tuple(w for w in sz.windows if w <= sz.train_steps)
    rows = []
    for label, standardised in (("dense (32, 32) tanh, raw inputs", False),
                                ("dense (32, 32) tanh, standardised inputs", True)):
        per_seed, fits = [], []
        for k in range(args.seeds):
            s = seed + 100 * (k + 1)                            # the S=1 row's seeds
            prop = MixtureProposal(n, m, components=1, hidden=(32, 32), activation="tanh", base="model", seed=s,
                                   dtype=bench.DTYPE, init_scale=bench.noise_scale(problem.model))
            if standardised:
                obs = train.y.reshape(-1, m)
                prop.standardise(x=obs, y=obs)                  # H = I: the observations stand in for states
            try:
                rep = bench.fit(problem.model, prop, problem, train, learn=("proposal",), members=sz.members,
                                iterations=sz.iterations, windows=windows, lr=args.lr, seed=s + 2)
            except DivergenceError as err:                     # recorded: a row that blew up is a result
                fits.append({"diverged": str(err)[:300]})
                print(f"{label} seed {k}: diverged ({str(err)[:120]})", file=sys.stderr, flush=True)
                continue
            fits.append({k2: v for k2, v in rep.items() if k2 != "history"})
            per_seed.append(bench.evaluate_dpf(problem.model, prop, problem, test, sz.members, s + 3))
            print(f"{label} seed {k}: {bench.mean_se(per_seed[-1]['rel_mse'])} ({rep['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
        if not per_seed:
            rows.append({"method": label, "diverged": len(fits), "fits": fits, "seeds": args.seeds})
            continue
        rel = np.mean([r["rel_mse"] for r in per_seed], axis=0)
        rows.append({"method": label, "rel_mse": bench.mean_se(rel), "rmse": bench.mean_se(
            np.mean([r["rmse"] for r in per_seed], axis=0)), "fits": fits, "seeds": args.seeds,
            "diverged": len(fits) - len(per_seed)})
    info = _report.machine_info()
    res = {"command": _report.command_line(), "daml_commit": _report.git_commit(), "machine": info, "rows": rows}
    headline = bench.json.loads((HERE / "results" / "dpf.json").read_text()).get("l96", {}).get("rows", [])
    ref = {r["method"]: r for r in headline}
    command = "python benchmarks/dpf_dense.py" + ("" if args.lr == 0.02 else f" --lr {args.lr:g}")
    lines = [f"Ablation (`{command}`): the headline's \"learned proposal S=1\" row (same data, "
             f"seeds, sizes and budget; {args.seeds} training seed(s), lr {args.lr}) with a dense (32, 32) tanh proposal network, "
             "fed raw inputs or inputs standardised with the training observations' statistics "
             "(`MixtureProposal.standardise`). Held-out relative MSE (mean ± SE over sequences). "
             f"{_report.machine_line(info)}", "",
             "| proposal network | relative MSE | state RMSE |", "|---|---|---|"]
    for name in ("bootstrap", "iapf", "learned proposal S=1"):
        if name in ref:
            r = ref[name]
            lines.append(f"| {name} (headline: {'affine' if name.startswith('learned') else 'no network'}) | "
                         f"{np.mean(r['rel_mse']):.4f} | {np.mean(r['rmse']):.4f} |")
    for r in rows:
        if "rel_mse" not in r:
            where = r["fits"][0]["diverged"].split(" at ")[1].split(":")[0] if " at " in r["fits"][0]["diverged"] else ""
            lines.append(f"| {r['method']} | training diverged ({where}) | – |")
            continue
        extra = f" ({r['diverged']} of {r['seeds']} fits diverged)" if r["diverged"] else ""
        lines.append(f"| {r['method']}{extra} | {r['rel_mse']['mean']:.4f} ± {r['rel_mse']['se']:.4f} | "
                     f"{r['rmse']['mean']:.4f} ± {r['rmse']['se']:.4f} |")
    tag = "" if args.lr == 0.02 else f"_lr{args.lr:g}"
    _report.write_json(f"dpf_dense{tag}", res)
    _report.write_section(f"dpf_dense{tag}", "\n".join(lines))
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
