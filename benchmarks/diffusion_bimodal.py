"""Benchmark: the seed's bimodal test for diffusion DA (seed 001, "Diffusion-based data assimilation").

Prior: two equally weighted Gaussian modes at (3, 3) and (0.8, 0.8) with sd 0.1, represented by
100 members (50 per mode: equal weights). Observation: x1 = 4 with sd 0.1. The exact posterior puts
all but 5e-101 of the mass in the first mode, N((3.5, 3.0), diag(0.005, 0.01)): mean (3.5, 3.0), sd
(0.0707, 0.1). The first mode lies ten prior sd from the observation, so importance weights of the
members degenerate (ESS of 1-2).

For every daml variant, the bootstrap particle filter (importance weights of the members) and the
EnSF baseline, over several seeds (each seed draws a new prior ensemble and a new sampling stream):
the mean error in both components, the sd ratio to the exact sd, the fraction of particles (or of
weight, for the PF) left in the wrong mode (x2 < 1.9: the unobserved coordinate), and whether the issue's goal is met (mean
within 0.05 in both components, sd within 20 %, under 1 % in the wrong mode).

Run: ``python benchmarks/diffusion_bimodal.py [--seeds 32] [--steps 200]``; writes
``benchmarks/results/diffusion_bimodal.json`` and its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from daml import diffusion as dif  # noqa: E402
from daml.filters.base import EnsembleState  # noqa: E402
from daml.filters.letkf import ring_taper  # noqa: E402
from daml.models.observations import observe_indices  # noqa: E402

EXACT_MEAN = np.array([3.5, 3.0])
EXACT_SD = np.array([math.sqrt(0.005), 0.1])
WRONG = 1.9            # x2 below this: the second mode (x2 is unobserved and stays near 0.8 there)
ORACLE = "oracle: exact posterior of the members' per-mode Gaussian fit (not a sampler)"
ORACLE_DIAG = "oracle, diagonal: the same with per-mode variances only (no x₁-x₂ covariance)"
ORACLE_DRAWS = 20_000

VARIANTS = {
    "weighted, h = 0 (PF in disguise)": {"forcing": "weighted"},
    "weighted, h = 0.1": {"forcing": "weighted", "bandwidth": 0.1},
    "weighted, local kernels (k = 40, beta = 1)": {"forcing": "weighted", "neighbours": 40, "bandwidth": 1.0},
    "weighted, fitted mixture (2 components)": {"forcing": "weighted", "components": 2},
    "weighted, fitted mixture, localised (2 components, radius 0.25: diagonal)":
        {"forcing": "weighted", "components": 2, "radius": 0.25},
    "gaussian (ensemble mean and covariance)": {"forcing": "gaussian"},
    "ensemble (seed), h = 0": {"forcing": "ensemble"},
    "ensemble (seed), h = 0.1": {"forcing": "ensemble", "bandwidth": 0.1},
    "ensemble (seed), conditional weights, h = 0.1": {"forcing": "ensemble", "bandwidth": 0.1, "conditional": True},
    "ensemble (seed), fitted mixture prior (2)": {"forcing": "ensemble", "components": 2},
}


def prior(seed: int, n: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    centres = torch.tensor([[3.0, 3.0], [0.8, 0.8]], dtype=torch.float64)
    return centres[torch.arange(n) % 2] + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def fitted_posterior_mean(ens: torch.Tensor, components: int, radius: float | None = None) -> np.ndarray:
    """The closed-form posterior mean of the EM-fitted prior mixture (per-component Kalman updates
    and reweighting): what the sampler targets, so its distance to the exact (3.5, 3.0) is the prior
    ensemble's own sampling error."""
    taper = None if radius is None else ring_taper(ens.shape[-1], radius)
    mix = dif.fitted_mixture(ens, components=components, taper=taper)
    covs = (mix.vecs @ torch.diag_embed(mix.vals) @ mix.vecs.transpose(-1, -2)).numpy()
    mus, lw = mix.mean.numpy(), mix.log_weight.numpy().copy()
    post = []
    for k in range(len(mus)):
        s = covs[k][0, 0] + 0.01
        gain = covs[k][:, 0] / s
        post.append(mus[k] + gain * (4.0 - mus[k][0]))
        lw[k] += -0.5 * (4.0 - mus[k][0]) ** 2 / s - 0.5 * math.log(s)
    w = np.exp(lw - lw.max())
    return (w / w.sum()) @ np.array(post)


def mode_update(xs: np.ndarray, diagonal: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One mode's members ``xs`` ``(..., k, 2)`` replaced by a Gaussian with their sample mean and
    covariance (ddof 1; variances only with ``diagonal``), updated in closed form with y = x1 = 4,
    sd 0.1 (Kalman). Batched over leading dims; returns the posterior mean, covariance and the log
    evidence up to a constant."""
    mu = xs.mean(-2)
    a = xs - mu[..., None, :]
    c = np.einsum("...ki,...kj->...ij", a, a) / (xs.shape[-2] - 1)
    if diagonal:
        c = c * np.eye(2)
    s = c[..., 0, 0] + 0.01
    gain = c[..., :, 0] / s[..., None]
    innov = 4.0 - mu[..., 0]
    return mu + gain * innov[..., None], c - gain[..., :, None] * c[..., None, 0, :], -0.5 * innov**2 / s - 0.5 * np.log(s)


def oracle_moments(ens: np.ndarray, diagonal: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """The exact posterior of the prior *fitted to the members*: each mode (split by x2, which the
    oracle knows) updated by :func:`mode_update`, modes reweighted by their evidence. No method that
    sees only the 100 members can be expected to do better; returns mean, sd and the second mode's
    mass. ``diagonal``: the fitted covariances keep their variances only (the oracle also knows that
    x1 and x2 are uncorrelated within a mode)."""
    post_mean, post_cov, lw = [], [], []
    for sel in (ens[:, 1] >= WRONG, ens[:, 1] < WRONG):
        m, c, log_ev = mode_update(ens[sel], diagonal)
        post_mean.append(m)
        post_cov.append(c)
        lw.append(math.log(sel.mean()) + float(log_ev))
    w = np.exp(np.array(lw) - max(lw))
    w /= w.sum()
    mean = w @ np.array(post_mean)
    second = sum(wk * (ck + np.outer(mk, mk)) for wk, ck, mk in zip(w, post_cov, post_mean))
    return mean, np.sqrt(np.diag(second) - mean**2), float(w[1])


def goal_met(mean: np.ndarray, sd: np.ndarray, wrong: float) -> bool:
    return bool(np.all(np.abs(mean - EXACT_MEAN) <= 0.05) and np.all(np.abs(sd / EXACT_SD - 1) <= 0.2)
                and wrong < 0.01)


def oracle_rate(draws: int, seed: int = 0, diagonal: bool = False) -> float:
    """Fraction of prior draws (50 members per mode, as here) on which :func:`oracle_moments` meets
    the goal. The second mode's mass is below 1e-100 for every realistic draw, so only the first
    mode's update is evaluated (:func:`mode_update`, vectorised over draws)."""
    rng = np.random.default_rng(seed)
    mean, cov, _ = mode_update(3.0 + 0.1 * rng.standard_normal((draws, 50, 2)), diagonal)
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    ok = (np.abs(mean - EXACT_MEAN) <= 0.05).all(1) & (np.abs(sd / EXACT_SD - 1) <= 0.2).all(1)
    return float(ok.mean())


def metrics(x: np.ndarray, w: np.ndarray | None = None) -> dict:
    w = np.full(len(x), 1.0 / len(x)) if w is None else w
    mean = w @ x
    sd = np.sqrt(w @ (x - mean) ** 2)
    wrong = float(w[x[:, 1] < WRONG].sum())
    err = mean - EXACT_MEAN
    ratio = sd / EXACT_SD
    goal = goal_met(mean, sd, wrong)
    return {"mean": mean.tolist(), "sd": sd.tolist(), "mean_error": err.tolist(), "sd_ratio": ratio.tolist(),
            "wrong_mode": wrong, "goal": goal}


def run(seeds: int, steps: int, sampler: str) -> dict:
    op = observe_indices(2, [0], sd=0.1)
    y = torch.tensor([4.0], dtype=torch.float64)
    mask = torch.ones(1, dtype=torch.bool)
    rows: dict[str, list[dict]] = {}
    for s in range(seeds):
        ens = prior(s)
        ll = -0.5 * ((4.0 - ens[:, 0]) / 0.1) ** 2
        w = torch.softmax(ll, 0).numpy()
        rec = metrics(ens.numpy(), w)
        rec["ess"] = float(1.0 / (w**2).sum())
        rows.setdefault("bootstrap PF (importance weights)", []).append(rec)
        for name, diagonal in ((ORACLE, False), (ORACLE_DIAG, True)):
            mean, sd, wrong = oracle_moments(ens.numpy(), diagonal)
            rows.setdefault(name, []).append({"mean": mean.tolist(), "sd": sd.tolist(),
                                              "mean_error": (mean - EXACT_MEAN).tolist(),
                                              "sd_ratio": (sd / EXACT_SD).tolist(), "wrong_mode": wrong,
                                              "goal": goal_met(mean, sd, wrong)})
        for name, params in VARIANTS.items():
            t0 = time.perf_counter()
            x = dif.analysis(ens, y, op, steps=steps, sampler=sampler, seed=s, **params)
            rec = metrics(x.numpy())
            rec["seconds"] = time.perf_counter() - t0
            if params.get("forcing") == "weighted" and "components" in params:
                rec["own_exact_mean"] = fitted_posterior_mean(ens, params["components"], params.get("radius")).tolist()
            rows.setdefault(name, []).append(rec)
        ensf = dif.ensf(100, steps=100)
        t0 = time.perf_counter()
        state, _ = ensf.analysis(EnsembleState(ens, torch.full((100,), -math.log(100.0), dtype=torch.float64)),
                                 y, op, mask, torch.Generator().manual_seed(s))
        rec = metrics(state.x.numpy())
        rec["seconds"] = time.perf_counter() - t0
        rows.setdefault("EnSF baseline (paired score, (1 - t) damping, 100 steps)", []).append(rec)
        print(f"seed {s} done", flush=True)
    return rows


def table(rows: dict, seeds: int, steps: int, sampler: str, info: dict) -> str:
    out = [
        "## Diffusion DA: the seed's bimodal test",
        "",
        "Prior: modes (3, 3) and (0.8, 0.8), sd 0.1, 50 members each (equal weights); y = x₁ = 4, sd 0.1. "
        "Exact posterior: mean (3.5, 3.0), sd (0.0707, 0.1), all mass in the first mode. "
        f"{seeds} seeds (new prior ensemble and sampling stream each); daml variants sample 100 particles with "
        f"the `{sampler}` sampler, {steps} log-spaced reverse steps to t_min = 1e-4, VP-linear schedule. "
        "Cells: mean over seeds (range). Goal: mean within 0.05 in both components, sd within 20 %, "
        "under 1 % of particles in the wrong mode (x₂ < 1.9).",
        "",
        _report.machine_line(info),
        "",
        "| method | x₁ mean | x₂ mean | sd₁ / exact | sd₂ / exact | wrong mode | goal met (seeds) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, recs in rows.items():
        m = np.array([r["mean"] for r in recs])
        q = np.array([r["sd_ratio"] for r in recs])
        wr = np.array([r["wrong_mode"] for r in recs])
        cell = lambda v: f"{v.mean():.3f} ({v.min():.3f}–{v.max():.3f})"  # noqa: E731
        goal = sum(r["goal"] for r in recs)
        extra = ""
        if "ess" in recs[0]:
            extra = f" (ESS {min(r['ess'] for r in recs):.1f}–{max(r['ess'] for r in recs):.1f})"
        out.append(f"| {name}{extra} | {cell(m[:, 0])} | {cell(m[:, 1])} | {cell(q[:, 0])} | {cell(q[:, 1])} | "
                   f"{cell(wr)} | {goal}/{len(recs)} |")
    for name, recs in rows.items():
        if "own_exact_mean" in recs[0]:
            own = np.array([r["own_exact_mean"] for r in recs])
            got = np.array([r["mean"] for r in recs])
            out += ["", f"{name}: the closed-form posterior of the fitted prior mixture has x₁ mean "
                    f"{own[:, 0].mean():.3f} ({own[:, 0].min():.3f}–{own[:, 0].max():.3f}); the sampled means "
                    f"differ from it by at most {np.abs(got - own).max():.3f} (100 particles), so the remaining "
                    "distance to the exact 3.5 is the sampling error of the 100-member prior."]
    rate, rate_diag = info.get("oracle_rate"), info.get("oracle_rate_diagonal")
    if rate is not None:
        out += ["", f"Oracle rows: computed in closed form from each seed's prior members, not sampled. Over "
                f"{ORACLE_DRAWS:,} fresh prior draws of the same design, the full-covariance oracle meets the goal "
                f"on {100 * rate:.1f} % of them and the diagonal one on {100 * rate_diag:.1f} %. With 50 members "
                "in the first mode the sample correlation of x₁ and x₂ moves x₂'s posterior mean and sd (removed "
                "by the diagonal fit, which uses the knowledge that the modes are uncorrelated), and the sample "
                "variance of x₁ alone moves the posterior mean of x₁ by about 0.05 (one goal width) from draw to "
                "draw (left in both). No method that sees only the members can be expected to meet the goal more "
                "often than the matching oracle."]
    out += ["", f"Command: `{_report.command_line()}`", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sampler", default="sde", choices=dif.SAMPLERS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = _report.machine_info()
    rows = run(args.seeds, args.steps, args.sampler)
    info["oracle_rate"] = oracle_rate(ORACLE_DRAWS)
    info["oracle_rate_diagonal"] = oracle_rate(ORACLE_DRAWS, diagonal=True)
    text = table(rows, args.seeds, args.steps, args.sampler, info)
    print(text)
    _report.write_json("diffusion_bimodal", {"machine": info, "seeds": args.seeds, "steps": args.steps,
                                             "sampler": args.sampler, "rows": rows})
    _report.write_section("diffusion_bimodal", text)


if __name__ == "__main__":
    main()
