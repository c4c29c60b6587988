"""Physics priors (issue 30): Hamiltonian and Lagrangian networks and the (q, p) integrators, against the
published protocols of greydanus/hamiltonian-nn and MilesCranmer/lagrangian_nns.

Sections (``--only``, comma-separated):

* ``P1``: ideal mass-spring (``greydanus_spring``, seed 0, float32): HamiltonianNet and the plain
  DerivativeNet (200 x 2, tanh, orthogonal init), 2000 full-batch Adam steps (lr 1e-3, weight decay
  1e-4) on one intra-op thread; train / test derivative loss (+- std / sqrt(rows), as the peer prints it),
  energy MSE of the notebooks (:func:`daml.models.mechanics_data.energy_mse`: 15 starts, t in [0, 20], 100
  points, time stretch 1.09, bootstrap spread) and training seconds. Goal: HNN <= 1e-3, MLP >= 3e-2, HNN
  trained in under 60 s.
* ``P2``: ideal pendulum (``greydanus_pendulum``), the same.
* ``P3``: integrators with the true Hamiltonian: energy error of each method over 10^5 steps of the
  pendulum (bounded for the symplectic ones, drift for RK4), the implicit midpoint rule on the spring
  (H conserved to round-off) and the measured order of each method.
* ``P4``: the Euler-Lagrange solve (:func:`daml.models.hamiltonian.lagrangian_acceleration`) applied to the
  true double-pendulum Lagrangian against the analytic accelerations (float64, Cranmer's state ranges).
* ``P5``: the Lagrangian network (Cranmer's 600 x 3 softplus configuration) and a plain network on the
  double pendulum, trained for a fixed CPU budget on fresh batches of 512 (L1 loss on accelerations, Adam
  with a one-cycle schedule), scored by Cranmer's final energy error / 29.4 over 40 starts.
* ``P6``: P1's training step with 1 and with 2 intra-op threads.
* ``P7``: two-body (``greydanus_two_body``: 1000 orbits, batch 200, 10 000 steps, weight decay 0); about
  two minutes on one thread, so part of the default run.

Sizes: ``--quick`` (a smoke run, about a minute), the default (the published budgets where they fit a
CPU; about 15 minutes), ``--slow`` (Cranmer's full horizon t = 100 in P5).

Run: ``OMP_NUM_THREADS=1 python benchmarks/physics.py [--quick | --slow] [--only P1,P3]``; results go to
``benchmarks/results/physics.json`` (every section records its command and the git commit), the tables
to docs/benchmarks.md ("Physics priors (issue 30)") and docs/physics.md, the figures to docs/figures/.
``--report`` rewrites the tables and figures from the saved results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _report  # noqa: E402

from daml.errors import ConvergenceWarning  # noqa: E402
from daml.models import hamiltonian as H  # noqa: E402
from daml.models import mechanics as M  # noqa: E402
from daml.models import mechanics_data as MD  # noqa: E402

SECTIONS = ("P1", "P2", "P3", "P4", "P5", "P6", "P7")
FIGURES = _report.ROOT / "docs" / "figures"

# greydanus/hamiltonian-nn README "Numbers" (energy MSE and test loss, mean +- spread)
README = {
    "spring": {"mlp_test": (3.6656e-2, 1.87e-3), "hnn_test": (3.5928e-2, 1.83e-3),
               "mlp_energy": (1.7077e-1, 2.06e-2), "hnn_energy": (3.8416e-4, 6.53e-5)},
    "pendulum": {"mlp_test": (3.5273e-2, 1.80e-3), "hnn_test": (3.5586e-2, 1.82e-3),
                 "mlp_energy": (4.1519e-2, 9.62e-3), "hnn_energy": (2.4852e-2, 5.42e-3)},
    "two_body": {"mlp_test": (2.9575e-5, 8.89e-7), "hnn_test": (2.8218e-6, 4.20e-8),
                 "mlp_energy": (6.3276e-2, 3.36e-2), "hnn_energy": (3.8751e-5, 5.04e-6)},
}
CRANMER = {"lnn": 0.0043, "mlp": 0.074, "samples": 512 * 2000 * 300}


@dataclass(frozen=True)
class Sizes:
    steps: int = 2000                # P1 / P2 training steps (the peer's)
    trials: int = 15                 # energy-MSE starts
    p3_steps: int = 100_000          # integrator steps on the pendulum
    p5_budget_lnn: float = 150.0     # seconds of LNN training
    p5_budget_mlp: float = 60.0      # seconds of plain-network training
    p5_t_end: float = 10.0           # evaluation horizon (Cranmer: 100)
    p5_starts: int = 40
    p6_steps: int = 200              # timed steps per thread setting
    p7_trials: int = 1000
    p7_steps: int = 10_000


QUICK = Sizes(steps=100, trials=5, p3_steps=2_000, p5_budget_lnn=8.0, p5_budget_mlp=4.0, p5_t_end=1.0,
              p5_starts=5, p6_steps=20, p7_trials=20, p7_steps=100)
DEFAULT = Sizes()
SLOW = Sizes(p5_t_end=100.0)


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        out = fn(*args, **kw)
    return out, [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]


def _loss_pm(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean squared error and the peer's +- (std of the squared errors / sqrt(rows))."""
    with torch.no_grad():
        dist = (net(x) - y) ** 2
    return float(dist.mean()), float(dist.std() / math.sqrt(dist.shape[0]))


def _traj(r: MD.EnergyMSE, k: int = 0, keep: int = 400) -> dict[str, list]:
    idx = np.linspace(0, r.t.shape[1] - 1, min(keep, r.t.shape[1])).round().astype(int)
    return {"t": r.t[k, idx].tolist(), "true": r.true_states[k, idx].tolist(),
            "model": r.model_states[k, idx].tolist(), "true_energy": r.true_energy[k, idx].tolist(),
            "model_energy": r.model_energy[k, idx].tolist(), "stretch": r.stretch}


def greydanus_section(kind: str, sz: Sizes, seed: int = 0) -> dict[str, Any]:
    """P1 / P2: HNN and MLP on the spring or the pendulum, as the peer trains and scores them."""
    data = (MD.greydanus_spring if kind == "spring" else MD.greydanus_pendulum)(seed=seed, dtype=torch.float32)
    system = data.system
    out: dict[str, Any] = {"data": data.config, "steps": sz.steps, "trials": sz.trials, "readme": README[kind]}
    for label, cls in (("hnn", H.HamiltonianNet), ("mlp", H.DerivativeNet)):
        net = cls(1, seed=seed, dtype=torch.float32)
        res, warns = _quiet(H.fit_derivatives, net, data.x, data.dxdt, steps=sz.steps, lr=1e-3, weight_decay=1e-4,
                            threads=1)
        train = _loss_pm(net, data.x, data.dxdt)
        test = _loss_pm(net, data.test_x, data.test_dxdt)
        e0 = time.perf_counter()
        em = MD.energy_mse(net, system, trials=sz.trials, splits=5, seed=seed)
        eval_s = time.perf_counter() - e0
        # the notebooks' loop as their code runs it: the horizon grows by 1.09 per start (in-place stretch)
        emc = MD.energy_mse(net, system, trials=sz.trials, splits=5, seed=seed, compound_stretch=True)
        sqc = (((emc.true_states ** 2).sum(-1) - (emc.model_states ** 2).sum(-1)) ** 2).mean(1)
        # the notebooks' figure: one start (1, 0) (pendulum: (2.1, 0)) over [0, 20] at 2000 points
        start = [[1.0, 0.0]] if kind == "spring" else [[2.1, 0.0]]
        fig = MD.energy_mse(net, system, trials=1, splits=1, x0=start, points=2000)
        # the spring notebook's energy_loss is sum(x^2) = q^2 + p^2 (the spring's H); were it copied unchanged into
        # the pendulum notebook (which we could not read), its pendulum score would be this one:
        sq = ((em.true_states ** 2).sum(-1) - (em.model_states ** 2).sum(-1)) ** 2
        sq_trial = sq.mean(1)
        out[label] = {"train_loss": train, "test_loss": test, "energy_mse": em.mse, "energy_spread": em.spread,
                      "sq_norm_mse": float(sq_trial.mean()), "sq_norm_spread": MD.bootstrap_spread(sq_trial, 5),
                      "compound_mse": emc.mse, "compound_spread": emc.spread, "compound_sq_norm_mse": float(sqc.mean()),
                      "compound_sq_norm_spread": MD.bootstrap_spread(sqc, 5), "compound_failed": emc.failed,
                      "per_trial": em.per_trial.tolist(), "failed": em.failed, "train_seconds": res.seconds,
                      "eval_seconds": eval_s, "converged": res.converged, "warnings": warns,
                      "final_history": float(res.history[-1]), "figure": _traj(fig)}
        print(f"{kind} {label}: energy MSE {em.mse:.3e} +- {em.spread:.1e}, test {test[0]:.4e}, "
              f"{res.seconds:.1f} s", file=sys.stderr, flush=True)
    true = MD.energy_mse(MD.system_field(system), system, trials=1, splits=1, x0=start, points=2000, noise_std=0.0)
    out["true_figure"] = _traj(true)
    out["ratio_mlp_over_hnn"] = out["mlp"]["energy_mse"] / out["hnn"]["energy_mse"]
    out["readme_ratio"] = README[kind]["mlp_energy"][0] / README[kind]["hnn_energy"][0]
    return out


def integrators_section(sz: Sizes) -> dict[str, Any]:
    """P3: energy error of each method with the true Hamiltonian; orders of convergence."""
    pend = M.Pendulum()                             # m = l = 1, g = 9.81
    amplitudes = torch.tensor([[0.5], [1.0], [2.0], [3.0]], dtype=torch.float64)
    q0, p0 = amplitudes, torch.zeros_like(amplitudes)
    dt = 0.05
    every = max(1, sz.p3_steps // 1000)
    out: dict[str, Any] = {"system": "Pendulum(m=1, l=1, g=9.81)", "q0": amplitudes.flatten().tolist(), "dt": dt,
                           "steps": sz.p3_steps, "t_end": dt * sz.p3_steps, "methods": {}}
    e0 = M.energy(pend, q0, p0)
    for method in M.METHODS:
        s0 = time.perf_counter()
        tr, warns = _quiet(M.integrate, pend, q0, p0, dt=dt, steps=sz.p3_steps, method=method, every=every)
        secs = time.perf_counter() - s0
        err = (M.energy(pend, tr.q, tr.p) - e0).abs() / e0.abs()          # (T, 4, ) relative
        err = err.reshape(err.shape[0], -1)
        n = err.shape[0]
        first, last = err[: max(1, n // 10)], err[-max(1, n // 10):]
        t = tr.t.numpy()
        slope = [float(np.polyfit(t, (M.energy(pend, tr.q, tr.p) - e0).reshape(n, -1)[:, j].numpy()
                                  / float(e0.reshape(-1)[j]), 1)[0]) for j in range(err.shape[1])]
        out["methods"][method] = {"max_rel_error_first_tenth": first.max(0).values.tolist(),
                                  "max_rel_error_last_tenth": last.max(0).values.tolist(),
                                  "drift_per_unit_time": slope, "seconds": secs, "warnings": warns[:3],
                                  "curve_t": t[:: max(1, n // 200)].tolist(),
                                  "curve_error": err[:: max(1, n // 200), -1].tolist()}
    # the implicit midpoint rule conserves quadratic invariants: the spring's H to round-off
    spring = M.MassSpring(mass=0.5, stiffness=2.0)
    qs, ps = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[0.0]], dtype=torch.float64)
    n_spring = min(sz.p3_steps, 10_000)
    tr = M.integrate(spring, qs, ps, dt=0.1, steps=n_spring, method="implicit_midpoint", every=10)
    hs = M.energy(spring, tr.q, tr.p)
    out["spring_midpoint"] = {"steps": n_spring, "dt": 0.1, "max_abs_error": float((hs - 1.0).abs().max())}
    # orders: error at t = 1 against step size (float64)
    dts = [0.04, 0.02, 0.01, 0.005]
    out["orders"] = {m: M.convergence_order(pend, torch.tensor([1.0], dtype=torch.float64),
                                            torch.tensor([0.0], dtype=torch.float64), method=m, t_end=1.0, dts=dts)
                     for m in M.METHODS}
    out["order_dts"] = dts
    return out


def oracle_section(seed: int) -> dict[str, Any]:
    """P4: Euler-Lagrange solve of the true double-pendulum Lagrangian against the analytic accelerations."""
    sysd = M.DoublePendulum()
    x, dxdt = MD.cranmer_double_pendulum(10_000, seed=seed)
    q, v = x[:, :2], x[:, 2:]
    s0 = time.perf_counter()
    acc = H.lagrangian_acceleration(sysd.lagrangian, q, v)
    secs = time.perf_counter() - s0
    return {"states": int(x.shape[0]), "dtype": "float64",
            "max_abs_error_vs_daml_analytic": float((acc - sysd.acceleration(q, v)).abs().max()),
            "max_abs_error_vs_cranmer_closed_form": float((acc - dxdt[:, 2:]).abs().max()),
            "max_abs_acceleration": float(acc.abs().max()), "seconds": secs, "target": 1e-10}


def _train_budget(net: torch.nn.Module, field, budget: float, seed: int, batch: int = 512) -> dict[str, Any]:
    """Adam + one-cycle (max lr 1e-3) on fresh batches for ``budget`` seconds; L1 loss on accelerations."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    # time a few steps to size the one-cycle schedule to the budget
    t0 = time.perf_counter()
    probe = 3
    for _ in range(probe):
        x, y = MD.cranmer_double_pendulum(batch, seed=g, dtype=torch.float32)
        loss = (field(x)[:, 2:] - y[:, 2:]).abs().mean()
        opt.zero_grad(), loss.backward(), opt.step()
    per = (time.perf_counter() - t0) / probe
    total = max(10, int(budget / per))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total)
    hist = []
    for _ in range(total):
        x, y = MD.cranmer_double_pendulum(batch, seed=g, dtype=torch.float32)
        loss = (field(x)[:, 2:] - y[:, 2:]).abs().mean()
        opt.zero_grad(), loss.backward(), opt.step(), sched.step()
        hist.append(loss.item())
        if not math.isfinite(hist[-1]):
            break
    secs = time.perf_counter() - t0
    steps = total + probe
    return {"steps": steps, "samples": steps * batch, "seconds": secs, "final_l1": float(np.mean(hist[-50:])),
            "first_l1": float(np.mean(hist[:20]))}


def lnn_section(sz: Sizes, seed: int) -> dict[str, Any]:
    """P5: Cranmer's double pendulum at a CPU budget."""
    out: dict[str, Any] = {"budget_lnn_s": sz.p5_budget_lnn, "budget_mlp_s": sz.p5_budget_mlp, "t_end": sz.p5_t_end,
                           "starts": sz.p5_starts, "paper": CRANMER}
    lnn = H.LagrangianNet(2, periodic=True, seed=seed, dtype=torch.float32)
    lnn.checks = False
    out["lnn_config"] = lnn.config()
    out["lnn"] = _train_budget(lnn, lnn, sz.p5_budget_lnn, seed)
    mlp = H.DerivativeNet(2, hidden=600, layers=3, activation="softplus", seed=seed, dtype=torch.float32)

    def mlp_field(x: torch.Tensor) -> torch.Tensor:   # the baseline predicts accelerations; dq/dt = v exactly
        return torch.cat([x[..., 2:], mlp(x)[..., 2:]], dim=-1)

    out["mlp_config"] = {**mlp.config(), "field": "(v, net(x)[2:])"}
    out["mlp"] = _train_budget(mlp, mlp_field, sz.p5_budget_mlp, seed)
    lnn.checks = False         # a trajectory that blows up is frozen and counted, not a reason to stop the run
    for label, f in (("lnn", lnn), ("mlp", mlp_field)):
        s0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", H.IllConditionedWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            r = MD.cranmer_energy_error(f, starts=sz.p5_starts, t_end=sz.p5_t_end, seed=seed, dt=0.01,
                                        dtype=torch.float32)
        out[label].update({"energy_error_mean": r.mean, "energy_error_median": float(np.median(r.per_start)),
                           "diverged": r.diverged, "eval_seconds": time.perf_counter() - s0})
        print(f"P5 {label}: {out[label]['steps']} steps, L1 {out[label]['final_l1']:.3g}, energy error "
              f"{r.mean:.3g}", file=sys.stderr, flush=True)
    return out


def threads_section(sz: Sizes, seed: int) -> dict[str, Any]:
    """P6: P1's training with 1 and 2 intra-op threads (``sz.p6_steps`` steps each, seconds per step)."""
    data = MD.greydanus_spring(seed=seed, dtype=torch.float32)
    out: dict[str, Any] = {"steps": sz.p6_steps}
    for label, cls in (("hnn", H.HamiltonianNet), ("mlp", H.DerivativeNet)):
        for th in (1, 2):
            net = cls(1, seed=seed, dtype=torch.float32)
            res, _ = _quiet(H.fit_derivatives, net, data.x, data.dxdt, steps=sz.p6_steps, threads=th)
            out[f"{label}_{th}"] = {"seconds": res.seconds, "ms_per_step": 1e3 * res.seconds / sz.p6_steps,
                                    "seconds_for_2000": res.seconds / sz.p6_steps * 2000}
        out[f"{label}_ratio_2_over_1"] = out[f"{label}_2"]["seconds"] / out[f"{label}_1"]["seconds"]
    return out


def two_body_section(sz: Sizes, seed: int) -> dict[str, Any]:
    """P7: greydanus' two-body task (batch 200, 10 000 steps, weight decay 0 as experiment-2body/train.py)."""
    s0 = time.perf_counter()
    data = MD.greydanus_two_body(seed=seed, trials=sz.p7_trials, dtype=torch.float32)
    out: dict[str, Any] = {"data": data.config, "data_seconds": time.perf_counter() - s0, "steps": sz.p7_steps,
                           "readme": README["two_body"]}
    for label, cls in (("hnn", H.HamiltonianNet), ("mlp", H.DerivativeNet)):
        net = cls(4, seed=seed, dtype=torch.float32)
        res, warns = _quiet(H.fit_derivatives, net, data.x, data.dxdt, steps=sz.p7_steps, lr=1e-3, weight_decay=0.0,
                            batch_size=200, threads=1, seed=seed)
        e0 = time.perf_counter()
        em = MD.energy_mse(net, data.system, trials=15, splits=5, seed=seed)
        out[label] = {"train_loss": _loss_pm(net, data.x, data.dxdt), "test_loss": _loss_pm(net, data.test_x,
                                                                                           data.test_dxdt),
                      "energy_mse": em.mse, "energy_spread": em.spread, "failed": em.failed,
                      "train_seconds": res.seconds, "eval_seconds": time.perf_counter() - e0, "warnings": warns}
        print(f"P7 {label}: energy MSE {em.mse:.3e}", file=sys.stderr, flush=True)
    out["ratio_mlp_over_hnn"] = out["mlp"]["energy_mse"] / out["hnn"]["energy_mse"]
    return out


# ----------------------------------------------------------------------------------------------------------
# report


def _e(x: float, d: int = 2) -> str:
    return f"{x:.{d}e}"


def _pm(v: Any, d: int = 2) -> str:
    return f"{v[0]:.{d + 2}e} ± {v[1]:.{d}e}"


def markdown(res: dict[str, Any]) -> str:
    lines = ["## Physics priors (issue 30)", "",
             "Hamiltonian / Lagrangian networks and the (q, p) integrators against the published protocols "
             "(greydanus/hamiltonian-nn README \"Numbers\", MilesCranmer/lagrangian_nns notebooks). "
             f"{_report.machine_line(res['machine'])} One torch intra-op thread unless stated; the machine's 2 cores "
             "were shared with other jobs while these ran, so the seconds are noisy (indicative, up to about 2x). "
             "Single seed (0).", ""]
    for key, title in (("P1", "P1: ideal mass-spring"), ("P2", "P2: ideal pendulum"), ("P7", "P7: two-body")):
        r = res.get(key)
        if not isinstance(r, dict) or "hnn" not in r:
            continue
        lines += [f"### {title}", "", f"Command: `{r.get('command')}` (commit {r.get('daml_commit')}); "
                  f"{r['steps']} training steps, energy MSE over {r.get('trials', 15)} starts.", "",
                  "| model | train loss | test loss | energy MSE (ours) | energy MSE (README) | train s (1 thread) |",
                  "|---|---|---|---|---|---|"]
        for label, name in (("hnn", "Hamiltonian net"), ("mlp", "plain net (baseline)")):
            m = r[label]
            lines.append(f"| {name} | {_pm(m['train_loss'])} | {_pm(m['test_loss'])} | "
                         f"{_e(m['energy_mse'])} ± {_e(m['energy_spread'], 1)} | "
                         f"{_pm(r['readme'][label + '_energy'])} | {m['train_seconds']:.1f} |")
        ratio_readme = r["readme"]["mlp_energy"][0] / r["readme"]["hnn_energy"][0]
        lines += ["", f"Energy MSE ratio plain / Hamiltonian: ours {r['ratio_mlp_over_hnn']:.3g}, README "
                  f"{ratio_readme:.3g}. README test losses: Hamiltonian {_pm(r['readme']['hnn_test'])}, plain "
                  f"{_pm(r['readme']['mlp_test'])}.", ""]
        if "compound_mse" in r["hnn"]:
            lines += [f"With the notebooks' in-place stretch (the horizon grows by 1.09 from one start to the next, up "
                      f"to t = {20 * 1.09 ** (r.get('trials', 15) - 1):.0f}; `compound_stretch=True`): Hamiltonian "
                      f"{_e(r['hnn']['compound_mse'])} ± {_e(r['hnn']['compound_spread'], 1)}, plain "
                      f"{_e(r['mlp']['compound_mse'])} ± {_e(r['mlp']['compound_spread'], 1)}"
                      + (f"; scored with `q^2 + p^2`: Hamiltonian {_e(r['hnn']['compound_sq_norm_mse'])} ± "
                         f"{_e(r['hnn']['compound_sq_norm_spread'], 1)}, plain {_e(r['mlp']['compound_sq_norm_mse'])} ± "
                         f"{_e(r['mlp']['compound_sq_norm_spread'], 1)}" if key == "P2" else "") + ".", ""]
        if key == "P2" and "sq_norm_mse" in r["hnn"]:
            lines += [f"Scored instead with `q^2 + p^2` (the spring notebook's energy function, in case the pendulum "
                      f"notebook reused it): Hamiltonian {_e(r['hnn']['sq_norm_mse'])} ± "
                      f"{_e(r['hnn']['sq_norm_spread'], 1)}, plain {_e(r['mlp']['sq_norm_mse'])} ± "
                      f"{_e(r['mlp']['sq_norm_spread'], 1)}.", ""]
    r = res.get("P3")
    if isinstance(r, dict) and "methods" in r:
        lines += ["### P3: integrators with the true Hamiltonian", "",
                  f"Command: `{r.get('command')}` (commit {r.get('daml_commit')}). {r['system']}, dt = {r['dt']}, "
                  f"{r['steps']} steps (t = {r['t_end']:g}), amplitudes {r['q0']} rad; relative energy error "
                  "|H - H0| / H0, largest over the first and the last tenth of the run (amplitude 3.0 rad), and the "
                  "least-squares drift of H - H0 per unit time.", "",
                  "| method | max error, first tenth | max error, last tenth | drift / unit time | order (measured) | seconds |",
                  "|---|---|---|---|---|---|"]
        for m, v in r["methods"].items():
            lines.append(f"| {m} | {_e(v['max_rel_error_first_tenth'][-1])} | {_e(v['max_rel_error_last_tenth'][-1])}"
                         f" | {_e(v['drift_per_unit_time'][-1])} | {r['orders'][m]:.2f} | {v['seconds']:.1f} |")
        sm = r["spring_midpoint"]
        lines += ["", f"Implicit midpoint on the spring H = q^2 + p^2 (dt {sm['dt']}, {sm['steps']} steps): "
                  f"max |H - H0| = {_e(sm['max_abs_error'])} (round-off). Orders from the error at t = 1 with "
                  f"dt in {r['order_dts']}.", ""]
    r = res.get("P4")
    if isinstance(r, dict) and "states" in r:
        lines += ["### P4: Euler-Lagrange oracle", "",
                  f"Command: `{r.get('command')}` (commit {r.get('daml_commit')}). `lagrangian_acceleration` of "
                  f"the true double-pendulum Lagrangian (m = l = 1, g = 9.8) at {r['states']} states (theta ~ "
                  "U(0, 2 pi)^2, omega ~ U(-10, 10)^2, float64): max |error| "
                  f"{_e(r['max_abs_error_vs_daml_analytic'])} against daml's analytic accelerations and "
                  f"{_e(r['max_abs_error_vs_cranmer_closed_form'])} against Cranmer's closed form (accelerations "
                  f"up to {r['max_abs_acceleration']:.0f}); target 1e-10; {r['seconds']:.2f} s.", ""]
    r = res.get("P5")
    if isinstance(r, dict) and "lnn" in r:
        lines += ["### P5: Lagrangian network, double pendulum at a CPU budget", "",
                  f"Command: `{r.get('command')}` (commit {r.get('daml_commit')}). Fresh batches of 512 states, "
                  "L1 loss on accelerations, Adam with a one-cycle schedule (max lr 1e-3) sized to the budget; "
                  f"final energy error / 29.4 over {r['starts']} starts at t = {r['t_end']:g} "
                  "(Cranmer: t = 100; model by fixed-step RK4, dt 0.01).", "",
                  "| model | training s | steps | samples | L1 first 20 steps | final L1 (rad/s^2) | mean energy error | median | diverged | paper |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, name, paper in (("lnn", "Lagrangian net 600 x 3", CRANMER["lnn"]),
                                   ("mlp", "plain net 600 x 3", CRANMER["mlp"])):
            m = r[label]
            lines.append(f"| {name} | {m['seconds']:.0f} | {m['steps']} | {m['samples']:.2e} | {m['first_l1']:.3g} | "
                         f"{m['final_l1']:.3g} | "
                         f"{m['energy_error_mean']:.3g} | {m['energy_error_median']:.3g} | {m.get('diverged', 0)} of "
                         f"{r['starts']} | {paper} (t = 100) |")
        lines += ["", "A diverged start (state non-finite or beyond 1e6) counts as an infinite error; the mean is over "
                  "the others.", f"The paper's numbers need about {CRANMER['samples']:.1e} samples "
                  f"({CRANMER['samples'] / max(r['lnn']['samples'], 1):.0f}x this budget); a CPU budget of minutes "
                  "does not reach them, as expected.", ""]
    r = res.get("P6")
    if isinstance(r, dict) and "hnn_1" in r:
        lines += ["### P6: one against two intra-op threads", "",
                  f"Command: `{r.get('command')}` (commit {r.get('daml_commit')}); P1's full-batch training, "
                  f"{r['steps']} steps per setting (seconds for 2000 extrapolated).", "",
                  "| model | ms / step, 1 thread | ms / step, 2 threads | 2 / 1 | s per 2000 steps, 1 / 2 threads |",
                  "|---|---|---|---|---|"]
        for label, name in (("hnn", "Hamiltonian net"), ("mlp", "plain net")):
            a, b = r[f"{label}_1"], r[f"{label}_2"]
            lines.append(f"| {name} | {a['ms_per_step']:.1f} | {b['ms_per_step']:.1f} | "
                         f"{r[f'{label}_ratio_2_over_1']:.2f} | {a['seconds_for_2000']:.0f} / {b['seconds_for_2000']:.0f} |")
        lines.append("")
    for sec in SECTIONS:
        if isinstance(res.get(sec), dict) and "error" in res[sec]:
            lines += [f"{sec} failed in this run: {res[sec]['error'][:300]}", ""]
    return "\n".join(lines)


def figures(res: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    FIGURES.mkdir(parents=True, exist_ok=True)
    for key, kind in (("P1", "spring"), ("P2", "pendulum")):
        r = res.get(key)
        if not isinstance(r, dict) or "hnn" not in r:
            continue
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        tf = r["true_figure"]
        ax[0].plot(*np.asarray(tf["true"]).T, "k-", lw=2, label="truth")
        ax[1].plot(tf["t"], tf["true_energy"], "k-", lw=2, label="truth")
        for label, color, name in (("mlp", "tab:red", "plain net"), ("hnn", "tab:blue", "Hamiltonian net")):
            f = r[label]["figure"]
            ax[0].plot(*np.asarray(f["model"]).T, "-", color=color, lw=1.2, label=name)
            ax[1].plot(f["t"], f["model_energy"], "-", color=color, lw=1.2, label=name)
        ax[0].set_xlabel("q"), ax[0].set_ylabel("p"), ax[0].set_title(f"{kind}: phase portrait, t in [0, 20]")
        ax[1].set_xlabel("t (true time; the model is read at 1.09 t)"), ax[1].set_ylabel("true energy H")
        ax[1].set_title(f"{kind}: energy along the trajectory")
        ax[0].legend(fontsize=8), ax[1].legend(fontsize=8)
        fig.tight_layout()
        path = FIGURES / f"physics_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path.relative_to(_report.ROOT)))
    r = res.get("P3")
    if isinstance(r, dict) and "methods" in r:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, v in r["methods"].items():
            ax.semilogy(v["curve_t"], np.maximum(v["curve_error"], 1e-17), label=m)
        ax.set_xlabel("t"), ax.set_ylabel("|H - H0| / H0 (amplitude 3 rad)")
        ax.set_title(f"pendulum, dt = {r['dt']}, {r['steps']} steps"), ax.legend(fontsize=8)
        fig.tight_layout()
        path = FIGURES / "physics_integrators.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path.relative_to(_report.ROOT)))
    return paths


def carry_over(res: dict[str, Any], sections: tuple[str, ...], name: str) -> None:
    """Keep the sections of the last run that this run did not redo (``--only``)."""
    _report.carry_over(res, sections, SECTIONS, name, stamp=False)


def write_report(res: dict[str, Any]) -> None:
    text = markdown(res)
    print(text)
    res["figures"] = figures(res)
    _report.write_section("physics", text)
    body = text.replace("## Physics priors (issue 30)", "### Measured (benchmarks/physics.py)", 1)
    body = body.replace("\n### ", "\n#### ")
    _report.write_section("physics_results", body, path="docs/physics.md")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run); writes results/physics-quick.json")
    g.add_argument("--slow", action="store_true", help="Cranmer's full horizon t = 100 in P5")
    ap.add_argument("--only", default=None, help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true", help="only rewrite the tables and figures from results/physics.json")
    args = ap.parse_args(argv)
    if args.report:
        res = json.loads((_report.RESULTS / "physics.json").read_text())
        write_report(res)
        return res
    if args.only is None:
        sections = SECTIONS
    else:
        sections = tuple(s.strip().upper() for s in args.only.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown section(s) {unknown}; choose from {SECTIONS}")
    sz = QUICK if args.quick else SLOW if args.slow else DEFAULT
    torch.set_num_threads(1)
    res: dict[str, Any] = {"command": _report.command_line(), "daml_commit": _report.git_commit(),
                           "machine": _report.machine_info(), "quick": args.quick, "slow": args.slow,
                           "sizes": asdict(sz), "sections": list(sections)}
    t0 = time.perf_counter()
    name = "physics-quick" if args.quick else "physics"
    for sec in sections:
        s0 = time.perf_counter()
        try:
            res[sec] = _run_section(sec, sz, args.seed)
        except Exception as exc:  # record and go on: one failing section must not lose the others
            import traceback

            res[sec] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            print(f"section {sec} FAILED: {res[sec]['error']}", file=sys.stderr, flush=True)
        torch.set_num_threads(1)
        res[sec]["section_seconds"] = time.perf_counter() - s0
        res[sec]["command"], res[sec]["daml_commit"] = res["command"], res["daml_commit"]
        print(f"section {sec} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        partial = dict(res)
        carry_over(partial, tuple(s for s in sections if s in res), name)
        _report.write_json(name, partial)               # saved after every section
    res["total_seconds"] = time.perf_counter() - t0
    carry_over(res, sections, name)
    _report.write_json(name, res)
    if not args.quick:
        write_report(res)
    else:
        print(markdown(res))
    return res


def _run_section(sec: str, sz: Sizes, seed: int) -> dict[str, Any]:
    if sec == "P1":
        return greydanus_section("spring", sz, seed)
    if sec == "P2":
        return greydanus_section("pendulum", sz, seed)
    if sec == "P3":
        return integrators_section(sz)
    if sec == "P4":
        return oracle_section(seed)
    if sec == "P5":
        return lnn_section(sz, seed)
    if sec == "P6":
        return threads_section(sz, seed)
    return two_body_section(sz, seed)


if __name__ == "__main__":
    main()
