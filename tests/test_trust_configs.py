"""Configurations exactly as the peers define them, particle-filter scoring before or after the
resampling, and experiment files refused before anything is computed (issue 26, items 1 and 3)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import daml
from daml import experiment, filters, models
from daml.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


# -- DAPPER's bocquet2010 and bocquet2010_m40, as its files define them ----------------------------------

@pytest.mark.parametrize("name, nx", [("lorenz96_bocquet2010.toml", 10), ("lorenz96_bocquet2010_m40.toml", 40)])
def test_bocquet2010_configurations_are_dappers(name, nx):
    # dapper/mods/Lorenz96/bocquet2010.py (and _m40): Chronology(0.05, dko=1, T=4**3, BurnIn=20),
    # Nx = 10 (40), perfect model, X0 = GaussRV(M=Nx, C=0.001) (mean 0), Obs = partial_Id_Obs(Nx,
    # arange(0, Nx, 2)) with noise = 1.5, which DAPPER turns into GaussRV(C=1.5): a variance, R = 1.5 I.
    exp = experiment.load_config(EXAMPLES / name)
    assert exp.steps == 1280 and exp.burn_in == 20.0 and exp.observations.get("every", 1) == 1
    short = experiment.Experiment(**{**exp.__dict__, "steps": 5, "burn_in": 0.0})
    model, op, data = experiment.build_data(short)
    assert isinstance(model, models.Lorenz96) and model.n == nx and model.dt == 0.05 and model.forcing == 8.0
    assert getattr(model, "noise_cov", None) is None
    picked = op.matrix.argmax(-1).tolist()
    assert picked == list(range(0, nx, 2))
    np.testing.assert_array_equal(op.matrix.sum(-1).numpy(), np.ones(nx // 2))
    np.testing.assert_array_equal(op.noise_cov.numpy(), 1.5 * np.eye(nx // 2))       # not 2.25 = 1.5**2
    np.testing.assert_array_equal(data["prior_mean"].values, np.zeros(nx))           # not e_1
    np.testing.assert_array_equal(data["prior_cov"].values, 0.001 * np.eye(nx))
    # the truth starts from the same N(0, 0.001 I): every component within 6 sd of zero
    assert np.abs(data["truth"].isel(time=0).values).max() < 6 * np.sqrt(0.001)
    for m in exp.methods:          # the bootstrap PFs are scored as DAPPER scores them
        if m["name"] == "bootstrap":
            assert m["record"] == "before_resampling"


def test_benchmark_part_a_uses_dappers_m40_setup(monkeypatch):
    # the benchmark builds its own data: it must be the same setup as the m40 TOML
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import particle_filters as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    seen = {}

    def fake_simulate(model, steps, op, **kw):
        seen.update(model=model, op=op, **kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(bench.daml, "simulate", fake_simulate)
    with pytest.raises(RuntimeError, match="stop"):
        bench.part_a(10, quick=True)
    np.testing.assert_array_equal(seen["op"].noise_cov.numpy(), 1.5 * np.eye(20))
    np.testing.assert_array_equal(np.asarray(seen["x0"]), np.zeros(40))
    assert seen["x0_cov"] == 0.001 and seen["model"].n == 40
    # every particle-filter row names its scoring
    for name, params in bench.accuracy_methods(quick=False):
        assert bench.scoring(name, params) != "-" or name == "etkf"


# -- scoring before or after the resampling ------------------------------------------------------------

def _l96_twin(experiments=2, steps=25):
    model = models.Lorenz96(n=10, dt=0.05)
    op = models.observe_every(10, 2, cov=1.5)
    data = daml.simulate(model, steps, op, x0=np.zeros(10), x0_cov=0.001, experiments=experiments, seed=11)
    return model, op, data


def _both(make, model, data, seed=5):
    return {rec: filters.run(make(rec), model, data, seed=seed, forecast=True, progress=False)
            for rec in ("before_resampling", "after_resampling")}


@pytest.mark.parametrize("threshold, jitter", [(0.5, 1.0), (1.0, 0.0)])
def test_bootstrap_before_resampling_records_the_reweighted_forecast(threshold, jitter):
    model, op, data = _l96_twin()
    res = _both(lambda rec: filters.bootstrap(members=40, threshold=threshold, jitter=jitter, record=rec), model, data)
    before, after = res["before_resampling"], res["after_resampling"]
    assert float(after.analysis["resampled"].sum()) > 0          # the two scorings differ somewhere
    # the trajectory does not depend on what is recorded: identical forecasts at every time
    np.testing.assert_array_equal(before.forecast["x"].values, after.forecast["x"].values)
    np.testing.assert_array_equal(before.forecast["log_weight"].values, after.forecast["log_weight"].values)
    np.testing.assert_array_equal(before.analysis["ess"].values, after.analysis["ess"].values)
    # before: the forecast members, with weights = forecast weights x likelihood, renormalised
    f = before.forecast
    np.testing.assert_array_equal(before.analysis["x"].values, f["x"].values)
    y = data["y"].sel(time=f["time"]).values                      # (experiment, time, obs)
    hx = f["x"].values[..., 0::2]                                  # (time, experiment, member, obs)
    y = np.moveaxis(y, 0, 1)[:, :, None, :]
    lw = f["log_weight"].values - 0.5 * ((y - hx) ** 2).sum(-1) / 1.5
    lw -= np.logaddexp.reduce(lw, axis=-1, keepdims=True)
    np.testing.assert_allclose(before.analysis["log_weight"].values, lw, atol=1e-10)
    # so the recorded mean is the importance-weighted forecast mean
    w = np.exp(lw)[..., None]
    mean_before = (np.exp(before.analysis["log_weight"].values)[..., None] * before.analysis["x"].values).sum(-2)
    np.testing.assert_allclose(mean_before, (w * f["x"].values).sum(-2), rtol=0, atol=1e-12)
    # after: where it resampled, equal weights; where it did not, the same ensemble as before
    res_t = after.analysis["resampled"].values.astype(bool)
    lwa = after.analysis["log_weight"].values
    np.testing.assert_allclose(lwa[res_t], -np.log(40), rtol=0, atol=1e-14)
    np.testing.assert_array_equal(after.analysis["x"].values[~res_t], before.analysis["x"].values[~res_t])
    assert not np.array_equal(after.analysis["x"].values[res_t], before.analysis["x"].values[res_t])


def test_optimal_and_ewpf_record_before_resampling_without_changing_the_trajectory():
    model, op, data = _l96_twin()
    q = {"variance": 0.3, "length": 1.0}
    cases = [(0.8, lambda rec: filters.optimal(members=30, threshold=0.8, jitter=0.5, model_noise=q, record=rec)),
             (0.9, lambda rec: filters.ewpf(members=20, keep=0.7, uniform=0.5, threshold=0.9, model_noise=q,
                                            record=rec))]
    for threshold, make in cases:
        res = _both(make, model, data)
        before, after = res["before_resampling"], res["after_resampling"]
        np.testing.assert_array_equal(before.forecast["x"].values, after.forecast["x"].values)
        np.testing.assert_array_equal(before.analysis["ess"].values, after.analysis["ess"].values)
        # the recorded weights are the pre-resampling ones: their Kish ESS is the reported ESS
        lw = before.analysis["log_weight"].values
        np.testing.assert_allclose(1.0 / np.exp(2 * lw).sum(-1), before.analysis["ess"].values, rtol=1e-10)
        # where the ESS triggered the (late) resampling the records differ, elsewhere they are identical
        late = before.analysis["ess"].values <= threshold * lw.shape[-1]
        assert late.any() and (~late).any()
        assert not np.array_equal(before.analysis["x"].values[late], after.analysis["x"].values[late])
        np.testing.assert_array_equal(before.analysis["x"].values[~late], after.analysis["x"].values[~late])
        np.testing.assert_allclose(after.analysis["log_weight"].values[late], -np.log(lw.shape[-1]), atol=1e-14)


def test_record_is_checked_and_kept_in_the_config():
    with pytest.raises(InputError, match="record"):
        filters.bootstrap(members=10, record="before")
    with pytest.raises(InputError, match="record"):
        filters.ewpf(members=10, model_noise=1.0, record=1)
    filt = filters.make_filter("bootstrap", members=10, record="before_resampling")
    assert filt.config["record"] == "before_resampling"
    model, op, data = _l96_twin(experiments=1, steps=3)
    post = filters.run(filt, model, data, seed=0, progress=False).analysis
    assert json.loads(post.attrs["config"])["filter"]["record"] == "before_resampling"


# -- experiment files: refused before computing, naming the key ----------------------------------------

BASE = """
[experiment]
name = "t"
steps = {steps}
burn_in = {burn_in}
experiments = {experiments}
[model]
name = "lorenz96"
n = 8
[observations]
kind = "all"
every = {every}
[prior]
cov = 0.1
[[methods]]
name = "etkf"
members = 10
[[methods]]
name = "bootstrap"
members = {members}
"""


def _toml(**kw):
    values = {"steps": 20, "burn_in": 0.2, "experiments": 1, "every": 1, "members": 50, **kw}
    return BASE.format(**values)


@pytest.mark.parametrize("kw, key", [
    ({"experiments": "1e9"}, "experiment.experiments"),
    ({"experiments": -3}, "experiment.experiments"),
    ({"steps": "10.0"}, "experiment.steps"),
    ({"members": "50.0"}, "methods[1].members"),
    ({"members": -5}, "methods[1].members"),
    ({"every": "2.0"}, "observations.every"),
    ({"burn_in": "nan"}, "experiment.burn_in"),
    ({"burn_in": 1.0}, "experiment.burn_in"),            # the run ends at t = 1.0: nothing left to score
    ({"burn_in": 5.0}, "experiment.burn_in"),
    ({"experiments": 10**9}, "experiment.experiments"),   # an int, but 10^9 truths cannot fit
    ({"members": 10**10}, "methods[1].members"),
])
def test_bad_experiment_values_are_refused_naming_the_key(kw, key):
    with pytest.raises(InputError) as info:
        experiment.load_config(_toml(**kw))
    assert key in str(info.value)


def test_a_bad_model_parameter_is_named_under_model():
    with pytest.raises(InputError, match=r"model\.n"):
        experiment.load_config(_toml().replace("n = 8", "n = 8.5"))


def test_burn_in_at_the_end_refuses_an_experiment_built_in_python():
    exp = experiment.load_config(_toml())
    exp.burn_in = 100.0
    with pytest.raises(InputError, match="burn_in"):
        experiment.run_experiment(exp, progress=False)


@pytest.mark.parametrize("kw, key", [({"burn_in": 1.0}, "experiment.burn_in"),
                                     ({"experiments": 10**9}, "experiment.experiments")])
def test_daml_run_gives_one_line_errors(kw, key, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(_toml(**kw))
    proc = subprocess.run([sys.executable, "-m", "daml.cli", "run", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("daml run: ") and key in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()                  # nothing was computed or written


def test_zero_mean_prior_and_a_good_file_still_run():
    exp = experiment.load_config(_toml().replace("cov = 0.1", 'x0 = "zeros"\ncov = 0.1'))
    model, op, data = experiment.build_data(exp)
    np.testing.assert_array_equal(data["prior_mean"].values, np.zeros(8))
    _, scores = experiment.run_experiment(exp, progress=False)
    assert all(np.isfinite(s.rmse_a) for s in scores)
    with pytest.raises(InputError, match="prior.x0"):
        experiment.build_data(experiment.load_config(_toml().replace("cov = 0.1", 'x0 = "zero"\ncov = 0.1')))


def test_scores_of_large_ensembles_are_computed_in_blocks_of_times_with_the_same_values():
    # the CRPS of thousands of members over all times at once needs tens of GB (the m40 TOML with 3000
    # particles was killed for memory); in blocks of times it is the same array
    from daml import diagnostics
    from daml.filters.summary import blocked_crps

    model, op, data = _l96_twin(experiments=2, steps=30)
    post = filters.run(filters.bootstrap(members=30, jitter=1.0), model, data, seed=2, progress=False).analysis
    whole = diagnostics.crps(post, data["truth"])
    blocks = blocked_crps(post, data["truth"], cells=2 * 30 * 10 * 4)     # 4 times per block
    assert blocks.dims == whole.dims
    np.testing.assert_array_equal(blocks.values, whole.values)
