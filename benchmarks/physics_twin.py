"""Twin experiment: a pendulum observed with noise, filtered with the true model and with learned ones.

Issue 30, point 3. The truth is Greydanus' ideal pendulum ``H = 3 (1 - cos q) + p^2``
(``Pendulum(mass=2, length=0.5, gravity=3)``), integrated by Stormer-Verlet with 10 substeps per model step
``dt = 0.1``, from ``(q, p) = (1.5, 0.5) + N(0, 0.01 I)`` (an orbit inside the training radii 1.3-2.3).
Only the angle ``q`` is observed, with noise sd 0.1, every 5 model steps (0.5 time units, about a fifth of a
period), so the momentum comes from the model alone. ``experiments`` independent truths.

Forecast models, all trained on the Greydanus pendulum data (``greydanus_pendulum(seed=0)``: 25
trajectories, 1125 noisy (state, derivative) pairs):

* ``true``: the true Hamiltonian;
* ``hnn``: one Hamiltonian network (200 x 2, tanh, 2000 full-batch Adam steps: Greydanus' budget);
* ``mlp``: one plain network of the same size and budget (Greydanus' baseline);
* ``hnn-ensemble``: ``members`` small Hamiltonian networks (16 x 2) trained to their minima by
  :func:`daml.ensembles.fit_dynamics` (anchored, perturbed targets, Levenberg-Marquardt polish), weighted
  by :func:`daml.ensembles.weigh` and run as :class:`daml.ensembles.EnsembleDynamics` (a mixture
  transition: the forecast carries the networks' own spread);
* ``hnn-ensemble-1/M``: the same members with equal weights (the usual deep ensemble);
* ``hnn-ensemble-EW``: the weighted members made equal-weight by resample-move
  (:func:`daml.ensembles.equal_weight`, 100 MALA steps): the data-assimilation fix of the degeneracy.

Every learned model is integrated like the truth (Stormer-Verlet, implicit for the networks' non-separable
fields, with 2 substeps: the truth takes 10). Filters: the ETKF (20 members) and the bootstrap particle filter (300 particles,
resampling at ESS < N/2 with a jitter); same data for every model (common random numbers).

Scores per filter and model (medians over the truths): ``rmse.a`` of the analysis mean (both coordinates,
after a burn-in of 5 time units), ``rmv.a`` (spread), the CRPS, the 90 % coverage of the truth, and the
energy error of the analysis mean.

Run::

    OMP_NUM_THREADS=1 python benchmarks/physics_twin.py            # full (about 20 minutes)
    OMP_NUM_THREADS=1 python benchmarks/physics_twin.py --write-networks   # also the example's networks
    OMP_NUM_THREADS=1 python benchmarks/physics_twin.py --quick    # a smoke run
    python benchmarks/physics_twin.py --report                     # re-render the table from the JSON

Writes ``benchmarks/results/physics_twin.json`` and the table into docs/physics.md and docs/benchmarks.md
(between the ``physics_twin`` markers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daml import filters, simulate  # noqa: E402
from daml.ensembles import EnsembleDynamics, dynamics_data, equal_weight, fit_dynamics, weigh  # noqa: E402
from daml.errors import ConvergenceWarning  # noqa: E402
from daml.models import observe_indices  # noqa: E402
from daml.models.hamiltonian import DerivativeNet, HamiltonianNet, fit_derivatives  # noqa: E402
from daml.models.mechanics import Mechanical, Pendulum  # noqa: E402
from daml.models.mechanics_data import greydanus_pendulum  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "physics_twin.json"
SYSTEM = Pendulum(mass=2.0, length=0.5, gravity=3.0)
DT, SUBSTEPS, LEARNED_SUBSTEPS, EVERY, OBS_SD = 0.1, 10, 2, 5, 0.1
X0, X0_COV = [1.5, 0.5], 0.01
ENS_HIDDEN = 16


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train_models(quick: bool, members: int, seed: int = 0, write_networks: bool = False) -> tuple[dict, dict]:
    """The learned forecast models and what their training measured."""
    data = greydanus_pendulum(seed=0)
    info: dict = {"data": data.config}
    steps = 200 if quick else 2000
    out = {}
    for name, cls in (("hnn", HamiltonianNet), ("mlp", DerivativeNet)):
        net = cls(1, seed=seed)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = fit_derivatives(net, data.x, data.dxdt, steps=steps, x_val=data.test_x, dxdt_val=data.test_dxdt)
        info[name] = {"seconds": time.perf_counter() - t0, "train_loss": float(res.history[-1]),
                      "test_loss": float(res.val_history[-1]), "converged": bool(res.converged), "steps": steps}
        out[name] = Mechanical(net, DT, substeps=LEARNED_SUBSTEPS, method="leapfrog")
        if write_networks:                  # the networks of examples/pendulum_learned.toml
            from daml.io import save_network

            save_network(net, ROOT / "examples" / f"pendulum_{name}.pt")
    # the label noise of one component, from the single HNN's held-out residuals (includes its model error)
    with torch.no_grad():
        resid = out["hnn"].system(data.test_x) - data.test_dxdt
    noise_sd = float(resid.pow(2).mean().sqrt())
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        ens = fit_dynamics(HamiltonianNet(1, hidden=ENS_HIDDEN, seed=seed), data.x, data.dxdt, members=members,
                           noise_sd=noise_sd, seed=seed + 1, epochs=20 if quick else 300, lr=1e-2, batch_size=64,
                           polish=not quick)
    fit_s = time.perf_counter() - t0
    z, y = dynamics_data(data.x, data.dxdt, 2)
    t0 = time.perf_counter()
    weighted, mw = weigh(ens, z, y)
    weigh_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    corrected, cinfo = equal_weight(weighted, z, y, steps=20 if quick else 100, seed=seed + 2)
    info["ensemble"] = {"members": members, "hidden": ENS_HIDDEN, "noise_sd": noise_sd, "fit_seconds": fit_s,
                        "weigh_seconds": weigh_s, "ess": float(mw.ess),
                        "weights": [float(w) for w in weighted.log_weight.exp()],
                        "converged": [bool(c) for c in ens.convergence["converged"]],
                        "scaled_grad_norm": [float(c) for c in ens.convergence["scaled_grad_norm"]],
                        "equal_weight_seconds": time.perf_counter() - t0,
                        "equal_weight": {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, str) else str(v))
                                         for k, v in cinfo._asdict().items() if getattr(v, "ndim", 0) == 0},
                        "warnings": [str(w.message)[:200] for w in caught]}
    out["hnn-ensemble"] = EnsembleDynamics(weighted, DT, substeps=LEARNED_SUBSTEPS, method="leapfrog")
    out["hnn-ensemble-1/M"] = EnsembleDynamics(ens, DT, substeps=LEARNED_SUBSTEPS, method="leapfrog")
    out["hnn-ensemble-EW"] = EnsembleDynamics(corrected, DT, substeps=LEARNED_SUBSTEPS, method="leapfrog")
    return out, info


def scores(post, truth: torch.Tensor, burn: int) -> dict:
    """rmse.a, rmv.a, CRPS, 90 % coverage and the energy error of the mean, after ``burn`` analyses."""
    x = torch.as_tensor(post.x.transpose("experiment", "time", "member", "variable").values)
    w = torch.as_tensor(post.log_weight.transpose("experiment", "time", "member").values).exp()
    tr = truth                                               # (E, T, 2)
    mean = (w.unsqueeze(-1) * x).sum(-2)
    var = (w.unsqueeze(-1) * (x - mean.unsqueeze(-2)) ** 2).sum(-2)
    err = (mean - tr)[:, burn:]
    rmse = err.pow(2).mean(-1).sqrt().mean(-1)               # per experiment
    rmv = var[:, burn:].mean(-1).sqrt().mean(-1)
    # weighted CRPS per coordinate: E|X - y| - 1/2 E|X - X'|
    xs, ws, ys = x[:, burn:], w[:, burn:], tr[:, burn:]
    e1 = (ws.unsqueeze(-1) * (xs - ys.unsqueeze(-2)).abs()).sum(-2)
    e2 = (ws.unsqueeze(-1).unsqueeze(-2) * ws.unsqueeze(-2).unsqueeze(-1)
          * (xs.unsqueeze(-2) - xs.unsqueeze(-3)).abs()).sum((-2, -3))
    crps = (e1 - 0.5 * e2).mean((-1, -2))
    # 90 % coverage from weighted quantiles per coordinate
    order = xs.argsort(-2)
    xs_sorted = xs.gather(-2, order)
    cw = ws.unsqueeze(-1).expand_as(xs).gather(-2, order).cumsum(-2)
    lo = xs_sorted.gather(-2, (cw < 0.05).sum(-2, keepdim=True).clamp(max=xs.shape[-2] - 1)).squeeze(-2)
    hi = xs_sorted.gather(-2, (cw < 0.95).sum(-2, keepdim=True).clamp(max=xs.shape[-2] - 1)).squeeze(-2)
    cover = ((ys >= lo) & (ys <= hi)).double().mean((-1, -2))
    energy = (SYSTEM.hamiltonian(mean[..., :1], mean[..., 1:]) - SYSTEM.hamiltonian(tr[..., :1], tr[..., 1:]))
    energy_err = energy[:, burn:].abs().mean(-1)
    med = lambda t: float(t.median())                         # noqa: E731
    return {"rmse_a": med(rmse), "rmv_a": med(rmv), "crps": med(crps), "coverage90": med(cover),
            "energy_err": med(energy_err), "rmse_a_each": [float(v) for v in rmse]}


def run(quick: bool, write_networks: bool = False) -> dict:
    torch.set_num_threads(1)
    experiments = 2 if quick else 4
    steps = 100 if quick else 300
    members = 4 if quick else 8
    truth_model = Mechanical(SYSTEM, DT, substeps=SUBSTEPS, method="leapfrog")
    op = observe_indices(2, [0], sd=OBS_SD)
    data = simulate(truth_model, steps, op, every=EVERY, x0=X0, x0_cov=X0_COV, experiments=experiments, seed=2026)
    t0 = time.perf_counter()
    models, info = train_models(quick, members, write_networks=write_networks)
    info["train_seconds"] = time.perf_counter() - t0
    models = {"true": truth_model, **models}
    methods = {"etkf N=20": filters.etkf(members=20),
               "bootstrap N=300": filters.bootstrap(members=300, threshold=0.5, jitter=0.2)}
    rows = []
    for fname, filt in methods.items():
        for mname, model in models.items():
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    res = filters.run(filt, model, data, operator=op, seed=7)
            except Exception as exc:  # noqa: BLE001 - a failing model is a row of the table
                rows.append({"filter": fname, "model": mname, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            post = res.analysis
            tr = torch.as_tensor(data.truth.sel(time=post.time).transpose("experiment", "time", "variable").values)
            s = scores(post, tr, burn=int(np.searchsorted(post.time.values, 5.0)))
            s.update(filter=fname, model=mname, seconds=time.perf_counter() - t0)
            rows.append(s)
            print(f"{fname:16s} {mname:18s} rmse.a {s['rmse_a']:.4f} rmv.a {s['rmv_a']:.4f} crps {s['crps']:.4f} "
                  f"cover {s['coverage90']:.2f} |dE| {s['energy_err']:.4f} ({s['seconds']:.1f} s)", flush=True)
    return {"command": "python benchmarks/physics_twin.py" + (" --quick" if quick else ""), "commit": commit(),
            "threads": 1, "experiments": experiments, "steps": steps, "dt": DT, "every": EVERY, "obs_sd": OBS_SD,
            "observed": "q only", "x0": X0, "x0_cov": X0_COV, "training": info, "rows": rows}


def table(res: dict) -> str:
    lines = ["| filter | forecast model | rmse.a | rmv.a | CRPS | 90 % coverage | mean energy error | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['filter']} | {r['model']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['filter']} | {r['model']} | {r['rmse_a']:.4f} | {r['rmv_a']:.4f} | {r['crps']:.4f} | "
                     f"{r['coverage90']:.2f} | {r['energy_err']:.4f} | {r['seconds']:.1f} |")
    e = res["training"]["ensemble"]
    lines.append("")
    lines.append(f"Ensemble: {e['members']} Hamiltonian networks ({e['hidden']} x 2), label noise sd "
                 f"{e['noise_sd']:.3f}, trained in {e['fit_seconds']:.0f} s ({sum(e['converged'])} of {e['members']} "
                 f"converged); importance weights ESS {e['ess']:.2f} of {e['members']}; resample-move "
                 f"{e['equal_weight_seconds']:.0f} s.")
    lines.append(f"Truths: {res['experiments']}, {res['steps']} steps of dt {res['dt']}, q observed every "
                 f"{res['every']} steps (sd {res['obs_sd']}); medians over truths; commit {res['commit']}; "
                 f"`{res['command']}`.")
    return "\n".join(lines)


def write_docs(res: dict) -> None:
    """Put the table between the ``physics_twin`` markers of docs/physics.md and docs/benchmarks.md."""
    block = table(res)
    for page in (ROOT / "docs" / "physics.md", ROOT / "docs" / "benchmarks.md"):
        text = page.read_text()
        begin, end = "<!-- begin:physics_twin -->", "<!-- end:physics_twin -->"
        if begin not in text:
            text += ("\n### Pendulum twin with learned forecast models (issue 30, point 3)\n\n"
                     "Details and discussion: [physics.md](physics.md#the-pendulum-twin-benchmarksphysics_twinpy).\n\n"
                     f"{begin}\n{end}\n")
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        page.write_text(f"{head}{begin}\n{block}\n{end}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report", action="store_true", help="re-render the table from the JSON")
    ap.add_argument("--write-networks", action="store_true",
                    help="save the trained HNN and MLP as examples/pendulum_{hnn,mlp}.pt")
    args = ap.parse_args(argv)
    if args.report:
        res = json.loads(RESULTS.read_text())
        write_docs(res)
        print(table(res))
        return 0
    res = run(args.quick, args.write_networks and not args.quick)
    if not args.quick:
        from daml.io import write_json

        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        write_json(res, RESULTS)
        write_docs(res)
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
