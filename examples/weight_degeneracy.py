"""Importance weights collapse as the dimension grows, and the diagnostics see it coming.

Prior members x ~ N(0, I_d), one observation y = x_true + e with e ~ N(0, 0.5^2 I_d); the members are
reweighted by the likelihood. As d grows, Kish's ESS falls exponentially and PSIS k-hat rises past its
threshold, the degeneracy that motivates equal-weight particle filters (van Leeuwen). After
resampling, the weighted PIT of one coordinate shows what degenerate weights do to calibration.

Run:  python examples/weight_degeneracy.py [--out DIR]     (writes DIR/weight_degeneracy.png)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import xarray as xr

import daml
from daml import _device
from daml import diagnostics as dg


def experiment(d: int, n: int, cases: int, seed: int) -> tuple[xr.Dataset, xr.DataArray]:
    """``cases`` independent importance-sampling problems of dimension ``d`` with ``n`` members each."""
    g = _device.generator(seed)
    truth = torch.randn(cases, d, generator=g, dtype=torch.float64)
    y = truth + 0.5 * torch.randn(cases, d, generator=g, dtype=torch.float64)
    x = torch.randn(cases, n, d, generator=g, dtype=torch.float64)
    log_lik = -0.5 * ((x - y[:, None]) ** 2).sum(-1) / 0.25
    post = daml.from_members(x, log_lik, dims=("case", "member", "variable"), method="importance",
                             config={"d": d, "obs_sd": 0.5}, seed=seed)
    return post, xr.DataArray(truth.numpy(), dims=("case", "variable"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="daml-output")
    parser.add_argument("--members", type=int, default=1000)
    args = parser.parse_args()

    dims = [1, 2, 4, 8, 16, 32]
    rows = []
    for i, d in enumerate(dims):
        post, truth = experiment(d, args.members, cases=200, seed=i)
        rows.append((d, float(dg.ess(post).mean()) / args.members, float(dg.psis(post).khat.median()),
                     float(dg.crps(post, truth).mean())))
    thr = dg.pareto_khat_threshold(args.members)
    print(f"{'d':>4} {'ESS/N':>8} {'k-hat':>7} {'CRPS':>7}")
    for d, e, k, c in rows:
        print(f"{d:>4} {e:>8.4f} {k:>7.3f} {c:>7.3f}" + ("   <- k-hat above threshold" if k > thr else ""))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].semilogy([r[0] for r in rows], [r[1] for r in rows], "o-")
    axes[0].set(xscale="log", xlabel="dimension d", ylabel="mean ESS / N", title="Kish ESS")
    axes[1].plot([r[0] for r in rows], [r[2] for r in rows], "o-")
    axes[1].axhline(thr, color="k", ls="--", lw=1, label=f"threshold {thr:.2f}")
    axes[1].set(xscale="log", xlabel="dimension d", ylabel="median k-hat", title="PSIS k-hat")
    axes[1].legend()
    for d, colour in [(1, "C0"), (16, "C3")]:
        post, truth = experiment(d, args.members, cases=2000, seed=100 + d)
        hist = dg.rank_histogram(post.isel(variable=[0]), truth.isel(variable=[0]), bins=10)
        edges = np.append(hist["lower"].values, 1.0)
        axes[2].stairs(hist.values / hist.values.sum() * hist.sizes["rank"], edges, color=colour, label=f"d = {d}")
    axes[2].axhline(1.0, color="k", lw=1)
    axes[2].set(xlabel="weighted PIT", ylabel="density", title="weighted rank histogram, coordinate 1")
    axes[2].legend()
    fig.tight_layout()
    out = Path(args.out)
    daml.io.save_figure(fig, out / "weight_degeneracy.png", dpi=120)
    print(f"figure: {out / 'weight_degeneracy.png'}  (ESS/N falls by {rows[0][1] / rows[-1][1]:.0f}x "
          f"from d={dims[0]} to d={dims[-1]}; log10 = {math.log10(rows[0][1] / rows[-1][1]):.1f})")


if __name__ == "__main__":
    main()
