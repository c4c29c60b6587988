"""Optimal transport of a weighted ensemble: the ETPF step at three values of epsilon, and how the
Sinkhorn loop converges.

    python examples/transport.py [--out DIR]        (writes DIR/transport.png)

Left: a 2-D prior ensemble (grey, 200 members) weighted by a Gaussian likelihood of its first
coordinate; the exact transform (POT's ``ot.emd``) and entropic transforms at epsilon = 0.01, 0.1 and
0.5 of the mean cost move it to equally weighted members. Larger epsilon contracts the members toward
the weighted mean; the second-order correction restores the weighted covariance. Right: the L1
marginal error against the iteration count, for the same epsilons, plain and over-relaxed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from daml.io import save_figure
from daml.transport import ensemble_transform, sinkhorn
from daml.transport.transform import squared_distances


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="daml-output", help="directory for transport.png")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=gen, dtype=torch.float64) @ torch.tensor([[1.0, 0.6], [0.0, 0.8]],
                                                                                dtype=torch.float64)
    log_w = -0.5 * (x[:, 0] - 1.2) ** 2 / 0.3
    w = torch.softmax(log_w, 0)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    ax = axes[0]
    ax.scatter(x[:, 0], x[:, 1], s=6 + 600 * w, c="0.75", label="prior (size: weight)")
    styles = [("exact (ot.emd)", dict(solver="emd"), "k"), ("epsilon 0.01", dict(epsilon=0.01), "tab:blue"),
              ("epsilon 0.1", dict(epsilon=0.1), "tab:orange"), ("epsilon 0.5", dict(epsilon=0.5), "tab:red"),
              ("epsilon 0.5, second order", dict(epsilon=0.5, second_order=True), "tab:green")]
    for label, kw, colour in styles:
        res = ensemble_transform(x, log_w, tol=1e-9, max_iter=50000, **kw)
        ax.scatter(res.x[:, 0], res.x[:, 1], s=7, color=colour, label=label, alpha=0.8)
    mean = (w.unsqueeze(-1) * x).sum(0)
    ax.plot(*mean.tolist(), marker="x", color="k", markersize=12, mew=2, linestyle="none", label="weighted mean")
    ax.set_title("ETPF step: members after the transform")
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[1]
    cost = squared_distances(x)
    checkpoints = np.unique(np.geomspace(1, 3000, 40).astype(int))
    for (eps, colour) in ((0.01, "tab:blue"), (0.1, "tab:orange"), (0.5, "tab:red")):
        for relaxation, style in ((1.0, "-"), ("auto", "--")):
            errs = [float(sinkhorn(cost, log_a=torch.log_softmax(log_w, 0), epsilon=eps, relative=True, tol=0.0,
                                   max_iter=int(k), relaxation=relaxation, check_every=min(10, int(k)),
                                   warn=False).error) for k in checkpoints]
            ax.loglog(checkpoints, np.maximum(errs, 1e-16), style, color=colour,
                      label=f"epsilon {eps}, relaxation {relaxation}")
    ax.axhline(1e-6, color="0.5", lw=0.8)
    ax.set_xlabel("iterations")
    ax.set_ylabel("L1 marginal error")
    ax.set_title("Convergence of the Sinkhorn loop")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, Path(args.out) / "transport.png", dpi=110)


if __name__ == "__main__":
    print(main())
