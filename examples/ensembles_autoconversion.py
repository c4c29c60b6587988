"""The five sources of uncertainty of a trained network, on the seed's cloud-physics application.

    python examples/ensembles_autoconversion.py [--out DIR]   (writes DIR/ensembles_autoconversion.png)

The autoconversion rate of cloud drops into rain in stratocumulus follows the power law of
Khairoutdinov & Kogan (2000), A = 1350 q_c^2.47 N_c^-1.79 (kg kg⁻¹ s⁻¹; cloud water q_c in kg kg⁻¹,
droplet number N_c in cm⁻³). A network learns log10 A from q_c (g kg⁻¹) and N_c (cm⁻³), both measured
with 5 % error, from 300 noisy pairs (0.1 in log10 A). For four input vectors the figure shows the
predictive pdf from each source alone (new input, testing data, training data, weights, model error
from held-out residuals) and from all together, with the power law's value as a line (seed 001,
"Examples of autoconversion rate pdf for 4 different input vectors").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import daml.ensembles as E
from daml.io import save_figure

NOISE = 0.1          # sd of the training and testing data, in log10 A
INPUT_ERR = 0.05     # relative error of measured q_c and N_c
POINTS = np.array([[0.2, 50.0], [0.5, 100.0], [0.8, 200.0], [0.3, 250.0]])     # (q_c g/kg, N_c cm^-3)


def log10_rate(qc_g_per_kg: np.ndarray, nc: np.ndarray) -> np.ndarray:
    return np.log10(1350.0 * (qc_g_per_kg * 1e-3) ** 2.47 * nc ** -1.79)


def data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    qc = rng.uniform(0.05, 1.0, n)
    nc = rng.uniform(20.0, 300.0, n)
    y = log10_rate(qc, nc) + NOISE * rng.normal(size=n)
    x = np.column_stack([qc * (1 + INPUT_ERR * rng.normal(size=n)), nc * (1 + INPUT_ERR * rng.normal(size=n))])
    return x, y


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="daml-output", help="directory for ensembles_autoconversion.png")
    parser.add_argument("--members", type=int, default=20)
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = data(300, seed=0)
    x_val, y_val = data(100, seed=1)
    # fit's defaults: every member trained to its tolerance (a smooth tanh network, mlp's default activation)
    # the model error of f: held-out residuals beyond the testing noise and the member spread
    probe = E.fit(E.mlp(2, 32), x, y, members=args.members, noise_sd=NOISE, seed=2)
    model_sd = E.model_error(probe, x_val, y_val, test_noise_sd=NOISE)
    out = E.uncertainty_sources(E.mlp(2, 32), x, y, POINTS, noise_sd=NOISE, input_sd=INPUT_ERR * POINTS.mean(0),
                                test_noise_sd=NOISE, model_sd=model_sd, members=args.members, samples=4000,
                                seed=3)
    colours = {"input": "tab:blue", "testing": "tab:orange", "training": "tab:green", "weights": "tab:red",
               "model": "tab:purple", "total": "black"}
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    truth = log10_rate(POINTS[:, 0], POINTS[:, 1])
    for i, ax in enumerate(axes):
        for source in out.source.values:
            draws = out["y"].sel(source=source, point=i).values
            lo, hi = np.percentile(out["y"].sel(point=i).values, [0.2, 99.8])
            grid = np.linspace(lo, hi, 200)
            sd = draws.std()
            if sd < 1e-9:
                ax.axvline(draws[0], color=colours[source], lw=1)
                continue
            # the training and weights sources are mixtures over the members alone: smooth with their count
            n_eff = args.members if source in ("training", "weights") else draws.size
            bw = 1.06 * sd * n_eff ** (-0.2)
            dens = np.exp(-0.5 * ((grid[:, None] - draws[None, :]) / bw) ** 2).mean(1) / (bw * np.sqrt(2 * np.pi))
            ax.plot(grid, dens, color=colours[source], lw=2.0 if source == "total" else 1.2,
                    label=f"{source} (sd {sd:.3f})")
        ax.axvline(truth[i], color="grey", ls="--", lw=1)
        ax.set_title(f"q_c = {POINTS[i, 0]} g/kg, N_c = {POINTS[i, 1]:.0f} cm⁻³", fontsize=9)
        ax.set_xlabel("log10 autoconversion rate")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("predictive pdf")
    fig.suptitle(f"Five sources of uncertainty, {args.members} members; model error sd {model_sd:.3f} "
                 "(from held-out residuals)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(args.out) / "ensembles_autoconversion.png", dpi=100)


if __name__ == "__main__":
    print(main())
