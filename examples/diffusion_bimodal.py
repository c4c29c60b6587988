"""The seed's bimodal test of diffusion DA, drawn: where each variant puts its 100 particles.

    python examples/diffusion_bimodal.py [--out DIR]        (writes DIR/diffusion_bimodal.png)

Prior: modes (3, 3) and (0.8, 0.8) with sd 0.1, 50 members each; observation x1 = 4 with sd 0.1.
The exact posterior is N((3.5, 3.0), diag(0.005, 0.01)) (the second mode carries 5e-101 of the mass).
Numbers over 32 seeds: ``python benchmarks/diffusion_bimodal.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from daml import diffusion as dif
from daml.filters.base import EnsembleState
from daml.io import save_figure
from daml.models.observations import observe_indices


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="daml-output", help="directory for diffusion_bimodal.png")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(10_000)
    centres = torch.tensor([[3.0, 3.0], [0.8, 0.8]], dtype=torch.float64)
    ens = centres[torch.arange(100) % 2] + 0.1 * torch.randn(100, 2, generator=g, dtype=torch.float64)
    op = observe_indices(2, [0], sd=0.1)
    y = torch.tensor([4.0], dtype=torch.float64)
    w = torch.softmax(-0.5 * ((4.0 - ens[:, 0]) / 0.1) ** 2, 0)
    exact = torch.tensor([3.5, 3.0]) + torch.randn(2000, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [math.sqrt(0.005), 0.1], dtype=torch.float64)

    panels = [("weighted, h = 0: the PF in disguise", {"forcing": "weighted"}),
              ("weighted, h = 0.1: KDE prior (too wide)", {"forcing": "weighted", "bandwidth": 0.1}),
              ("weighted, fitted 2-Gaussian prior", {"forcing": "weighted", "components": 2}),
              ("the same, localised (radius 0.25: diagonal)", {"forcing": "weighted", "components": 2, "radius": 0.25}),
              ("ensemble forcing (seed), h = 0.1", {"forcing": "ensemble", "bandwidth": 0.1}),
              ("gaussian forcing (one Gaussian prior)", {"forcing": "gaussian"}),
              ("EnSF baseline", None)]
    fig, axes = plt.subplots(2, 4, figsize=(17, 8), sharex=True, sharey=True)
    for ax, (title, kw) in zip(axes.flat, panels):
        if kw is None:
            state, _ = dif.ensf(100).analysis(EnsembleState(ens, torch.full((100,), -math.log(100.0),
                                                                            dtype=torch.float64)),
                                              y, op, torch.ones(1, dtype=torch.bool), torch.Generator().manual_seed(1))
            x = state.x
        else:
            x = dif.analysis(ens, y, op, steps=200, seed=1, **kw)
        ax.scatter(exact[:, 0], exact[:, 1], s=2, c="0.8", label="exact posterior")
        ax.scatter(ens[:, 0], ens[:, 1], s=6 + 300 * w, c="tab:blue", alpha=0.5, label="prior (size: PF weight)")
        ax.scatter(x[:, 0], x[:, 1], s=8, c="tab:red", label="particles")
        ax.axvline(4.0, color="k", lw=0.6, ls=":")
        m = x.mean(0)
        ax.set_title(f"{title}\nmean ({m[0]:.2f}, {m[1]:.2f}), wrong mode {float((x[:, 1] < 1.9).double().mean()):.0%}",
                     fontsize=9)
        ax.set_xlim(0.3, 4.6)
        ax.set_ylim(0.3, 4.6)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, Path(args.out) / "diffusion_bimodal.png", dpi=100)


if __name__ == "__main__":
    print(main())
