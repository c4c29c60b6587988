"""The pieces of benchmarks/dpf.py (issue 28's experiments) at tiny sizes: its Kalman oracle, its data,
metrics, the read-out of a learned linear transition and the report's verdict on the 20 % goal. The
timings and the full experiments are the script's (``python benchmarks/dpf.py``), not the tests'."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import daml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_dpf", ROOT / "benchmarks" / "dpf.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["benchmark_dpf"] = bench          # dataclasses look the module up by name
try:
    _spec.loader.exec_module(bench)
finally:                                      # the script puts benchmarks/ on the path (for _report)
    while str(ROOT / "benchmarks") in sys.path:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def lg():
    problem = bench.lg_problem(2)
    return problem, bench.sequences(problem, 3, 8, seed=5)


def test_script_kalman_evidence_equals_daml_kalman_filter(lg):
    problem, seqs = lg
    mine = bench.kalman_log_evidence(*problem.matrices, seqs.prior_mean, problem.prior_cov, seqs.y)
    theirs = bench.daml_kalman_log_evidence(problem, seqs)
    assert mine.shape == (3,)
    np.testing.assert_allclose(mine.numpy(), theirs, rtol=0, atol=1e-9)


def test_script_kalman_gradient_matches_finite_differences(lg):
    """The exact gradient the resamplers are judged against: d log p / d theta for A -> theta A."""
    problem, seqs = lg
    a, q, r = problem.matrices
    y, m0 = seqs.y[0], seqs.prior_mean[0]
    theta = torch.ones((), dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(bench.kalman_log_evidence(theta * a, q, r, m0, problem.prior_cov, y), theta)
    h = 1e-6
    f = lambda t: float(bench.kalman_log_evidence(t * a, q, r, m0, problem.prior_cov, y))  # noqa: E731
    assert float(grad) == pytest.approx((f(1 + h) - f(1 - h)) / (2 * h), rel=1e-6, abs=1e-6)


def test_dpf_evidence_of_the_script_is_unbiased_for_its_kalman_filter(lg):
    """Section s1 (a) at a small size: the mean of p_hat / p over 200 runs is 1 within 4 standard errors."""
    problem, seqs = lg
    out = bench.lg_evidence_check(problem, seqs, members=64, runs=200, seed=11)
    exact = float(bench.kalman_log_evidence(*problem.matrices, seqs.prior_mean[0], problem.prior_cov, seqs.y[0]))
    assert out["kalman"] == pytest.approx(exact)
    rows = {r["resampler"]: r for r in out["rows"]}
    assert set(rows) == set(bench.RESAMPLERS)
    for name in ("stop_gradient", "soft"):                  # the unbiased ones
        r = rows[name]
        assert abs(r["ratio_mean"] - 1.0) <= 4 * r["ratio_se"], r
        # Jensen: E log p_hat <= log p (up to the Monte Carlo error of the mean)
        assert r["log_diff_mean"] < 3 * r["log_diff_sd"] / math.sqrt(200), r


def test_gradient_rows_compare_with_the_exact_gradient(lg):
    problem, seqs = lg
    out = bench.lg_gradients(problem, seqs, members=16, runs=6, seed=3, repeats=1, resamplers=("stop_gradient",))
    row = out["rows"][0]
    assert math.isfinite(row["mean"]) and row["sd"] > 0
    assert row["bias"] == pytest.approx(row["mean"] - out["exact"])
    assert math.isfinite(row["weighted_mean"]) and row["weighted_se"] > 0
    assert row["seconds_per_evaluation"] > 0


def test_sequences_are_reproducible_and_observe_the_truth():
    problem = bench.l96_problem(6)
    a = bench.sequences(problem, 2, 5, seed=1)
    b = bench.sequences(problem, 2, 5, seed=1)
    assert torch.equal(a.truth, b.truth) and torch.equal(a.y, b.y)
    assert a.truth.shape == (2, 6, 6) and a.y.shape == (2, 5, 6)
    # y = x + N(0, 1): the residuals are noise of the stated size, not a shifted copy
    resid = (a.y - a.truth[:, 1:]).numpy().ravel()
    assert abs(resid.mean()) < 0.6 and 0.4 < resid.std() < 1.8
    ds = bench.as_dataset(a, problem.model.dt)
    assert not bool(ds["observed"][0]) and np.isnan(ds["y"].values[:, 0]).all()
    np.testing.assert_array_equal(ds["y"].values[:, 1:], a.y.numpy())


def test_metrics():
    truth = np.ones((1, 2, 2))
    mean = truth + np.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert bench.relative_mse(mean, truth)[0] == pytest.approx(2.0 / 4.0)
    assert bench.state_rmse(mean, truth)[0] == pytest.approx(math.sqrt(0.5))
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    g = bench.paired_gain(0.7 * ref, ref)
    assert g["gain"] == pytest.approx(0.3) and g["se"] == pytest.approx(0.0, abs=1e-12)
    assert bench.mean_se([1.0, 3.0]) == {"mean": 2.0, "se": pytest.approx(1.0), "count": 2}


def test_linear_part_reads_the_affine_transition():
    trans = daml.models.mixture.MixtureTransition(3, components=1, hidden=(), covariance="constant",
                                                  residual=False, seed=4, dtype=torch.float64)
    with torch.no_grad():
        for p in trans.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    a, b, q = bench.linear_part(trans)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(trans.step(x), x @ a.T + b)
        # the log density of a draw is that of N(A x + b, Q)
        z = x + 0.1
        want = torch.distributions.MultivariateNormal(x @ a.T + b, covariance_matrix=q).log_prob(z)
        torch.testing.assert_close(trans.log_transition(x, z), want)


def _row(method, values):
    return {"method": method, "rel_mse": list(values), "rmse": list(np.sqrt(values))}


@pytest.mark.parametrize("factor, verdict", [(0.5, "met"), (0.9, "not met")])
def test_headline_table_states_whether_the_goal_is_met(factor, verdict):
    iapf = np.array([0.10, 0.12, 0.08, 0.11])
    res = {"config": {"n": 20}, "members": 100, "steps": 100, "train_sequences": 16, "train_steps": 50,
           "windows": [10, 25, 50], "iterations_per_window_and_group": 40, "test_sequences": 4, "seeds": 2,
           "rows": [_row("iapf", iapf), _row("learned proposal S=1", factor * iapf)]}
    res["rows"][1]["gain_vs_iapf"] = bench.paired_gain(factor * iapf, iapf)
    text = "\n".join(bench.headline_table(res, "t"))
    assert f"**{verdict}**" in text
    assert f"{100 * (1 - factor):.0f} %" in text
