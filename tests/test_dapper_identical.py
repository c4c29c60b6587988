"""The daml side of benchmarks/dapper_identical.py: the truths and observations handed to DAPPER.

DAPPER is not a dependency: the one test that runs DAPPER's side is marked slow (``-m slow``) and
skipped where its separate environment (/tmp/dapper-venv, or $DAPPER_PYTHON) is missing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import dapper_identical as bench
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def _l96_rk4(x: np.ndarray, dt: float, forcing: float = 8.0) -> np.ndarray:
    """An independent Lorenz-96 RK4 step in numpy (the textbook scheme, as DAPPER's mods/Lorenz96)."""
    def f(z):
        return (np.roll(z, -1, -1) - np.roll(z, 2, -1)) * np.roll(z, 1, -1) - z + forcing
    k1 = f(x)
    k2 = f(x + dt / 2 * k1)
    k3 = f(x + dt / 2 * k2)
    k4 = f(x + dt * k3)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


@pytest.fixture(scope="module")
def short():
    exp = bench.load("l96-10", cycles=40)
    model, op, data = bench.experiment.build_data(exp)
    return exp, data, bench.dapper_arrays(data, float(exp.model["dt"]), float(exp.burn_in), "l96-10")


def test_npz_has_dappers_layout_and_setup(short, tmp_path):
    exp, data, arrays = short
    # DAPPER's rule: a 2-time-unit run is shorter than BurnIn = 20, so the burn-in is halved to T/2
    assert exp.steps == 40 and exp.burn_in == pytest.approx(1.0)
    path = bench.write_npz(tmp_path / "twin.npz", arrays)
    got = np.load(path)
    assert str(got["config"]) == "bocquet2010"
    assert got["xx"].shape == (3, 41, 10)          # (E, K + 1, Nx): steps 0..K
    assert got["yy"].shape == (3, 40, 5)           # (E, Ko + 1, p): yy[:, ko] at step ko + 1
    np.testing.assert_array_equal(got["obs_idx"], [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(got["R"], 1.5 * np.eye(5))          # DAPPER's noise = 1.5 is a variance
    np.testing.assert_array_equal(got["x0_mean"], np.zeros(10))
    np.testing.assert_array_equal(got["x0_cov"], 0.001 * np.eye(10))
    assert float(got["dt"]) == 0.05 and int(got["dko"]) == 1 and float(got["burn_in"]) == 1.0
    # yy[:, ko] is the observation daml made at step ko + 1 (none at step 0)
    y = data["y"].transpose("experiment", "time", "obs").values
    assert np.isnan(y[:, 0]).all()
    np.testing.assert_array_equal(got["yy"], y[:, 1:])


def test_truth_follows_an_independent_rk4_and_observations_have_variance_R(short):
    _, _, arrays = short
    xx, yy = arrays["xx"], arrays["yy"]
    # each truth state, one numpy RK4 step on, is the next one (perfect model, as DAPPER's file)
    np.testing.assert_allclose(_l96_rk4(xx[:, :-1], 0.05), xx[:, 1:], rtol=0, atol=1e-12)
    # the truth starts from N(0, 0.001 I): every component within 6 sd of 0
    assert np.abs(xx[:, 0]).max() < 6 * math.sqrt(0.001)
    # residuals y - H x at the observed steps: 3 x 40 x 5 = 600 draws of N(0, 1.5); the sample variance
    # has relative sd sqrt(2 / 600) = 5.8 %: within 4 sd of 1.5 (and far from 1.5^2 = 2.25)
    resid = yy - xx[:, 1:][..., arrays["obs_idx"]]
    assert abs(resid.var() / 1.5 - 1) < 4 * math.sqrt(2 / resid.size)
    assert abs(resid.mean()) < 4 * math.sqrt(1.5 / resid.size)


def test_benchmark_uses_the_toml_parameters():
    # the particle-filter pairs are the example TOMLs' own bootstrap settings (DAPPER's NER and reg)
    assert bench.toml_params(bench.load("l96-10"), "pf100") == bench.PAIRS["pf100"]["daml"][1]
    assert bench.toml_params(bench.load("l96-10"), "pf800") == bench.PAIRS["pf800"]["daml"][1]
    assert bench.toml_params(bench.load("l96-40"), "pf3000") == bench.PAIRS["pf3000"]["daml"][1]
    assert bench.toml_params(bench.load("l96-40"), "enkf24") == bench.PAIRS["enkf24"]["daml"][1]


def test_compare_difference_and_standard_error():
    daml_runs = [{"method": "m", "truth": 0, "rmse_a": v, "rmv_a": 0.2} for v in (1.0, 2.0, 3.0)]
    dapper_runs = [{"method": "m", "truth": 0, "rmse_a": v, "rmv_a": None} for v in (0.0, 0.0, 3.0)]
    out = bench.compare(daml_runs, dapper_runs, "m", [0])
    r = out["rows"][0]
    # means 2 and 1, sample variances 1 and 3: s.e. = sqrt(1/3 + 3/3)
    assert r["diff"] == pytest.approx(1.0)
    assert r["se"] == pytest.approx(math.sqrt(4 / 3))
    assert r["z"] == pytest.approx(1.0 / math.sqrt(4 / 3))
    assert out["within_noise"] and r["dapper_rmv"] is None


def _dapper_python():
    return bench.dapper_python(None)


@pytest.mark.slow                   # two DAPPER imports: about 10 s on a quiet machine, 25 s on a busy one
@pytest.mark.skipif(_dapper_python() is None, reason="DAPPER's environment (/tmp/dapper-venv) is not installed")
def test_dapper_side_accepts_the_npz_and_refuses_a_wrong_setup(short, tmp_path):
    _, _, arrays = short
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    good = bench.write_npz(tmp_path / "good.npz", {**arrays, "xx": arrays["xx"][:1], "yy": arrays["yy"][:1],
                                                   "truth_label": arrays["truth_label"][:1]})
    proc = subprocess.run([_dapper_python(), str(bench.SIDE), str(good), "--methods", "enkf24", "--seeds", "3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert out["config"] == "bocquet2010" and out["K"] == 40 and out["burn_in"] == 1.0
    assert out["truth_vs_dapper_model_max_abs"] < 1e-12          # DAPPER's own model reproduces the truth
    (run,) = out["runs"]
    assert 0 < run["rmse_a"] < 1.5                                # climatology is about 3.6
    # the R of the old, wrong reading of DAPPER's file (noise as an sd: 1.5^2) is refused by name
    bad = bench.write_npz(tmp_path / "bad.npz", {**arrays, "R": 2.25 * np.eye(5)})
    proc = subprocess.run([_dapper_python(), str(bench.SIDE), str(bad), "--methods", "enkf24", "--seeds", "3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "R:" in proc.stderr


@pytest.mark.parametrize("k1, n1, k2, n2", [(7, 16, 3, 16), (2, 6, 0, 6), (5, 10, 3, 10), (0, 5, 0, 5), (9, 10, 1, 12)])
def test_fisher_exact_matches_scipy(k1, n1, k2, n2):
    from scipy.stats import fisher_exact

    expected = fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue
    assert bench.fisher_exact_p(k1, n1, k2, n2) == pytest.approx(expected, rel=1e-12)


def test_compare_keeps_lost_runs_apart_and_merge_replaces_repeated_seeds():
    daml_runs = [{"method": "m", "truth": 0, "seed": s, "rmse_a": v, "rmv_a": 0.3, "wall_s": 1.0}
                 for s, v in ((1, 0.30), (2, 0.32), (3, 2.5))]
    dapper_runs = [{"method": "m", "truth": 0, "seed": s, "rmse_a": v, "rmv_a": 0.3, "wall_s": 2.0, "cpu_s": 2.0}
                   for s, v in ((1, 0.31), (2, 0.29), (3, 0.30))]
    out = bench.compare(daml_runs, dapper_runs, "m", [0])
    row = out["rows"][0]
    assert (row["daml_lost"], row["dapper_lost"]) == (1, 0)
    assert row["kept"]["n"] == [2, 3] and row["kept"]["diff"] == pytest.approx(0.31 - 0.30)
    assert out["lost"]["fisher_p"] == pytest.approx(1.0)          # 1 of 3 against 0 of 3
    old = {"method": "m", "cycles": 10, "truth_seed": 3000, "command": "a", "daml_commit": "x",
           "daml_runs": daml_runs, "dapper_runs": dapper_runs}
    new = {**old, "command": "b", "daml_commit": "y",
           "daml_runs": [dict(daml_runs[2], rmse_a=0.33), dict(daml_runs[0], seed=4)],
           "dapper_runs": [dict(dapper_runs[0], seed=4)]}
    merged = bench.merge(old, new)
    assert sorted((r["seed"], r["rmse_a"]) for r in merged["daml_runs"]) == [(1, 0.30), (2, 0.32), (3, 0.33), (4, 0.30)]
    assert len(merged["dapper_runs"]) == 4 and merged["filter_seeds"] == [1, 2, 3, 4]
    assert merged["command"] == "a; b" and merged["rows"][0]["daml_lost"] == 0
