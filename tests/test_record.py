"""What ``daml.filters.run`` records (issue 27, item 3): all members, every k-th analysis, or summary
statistics only; the summary equals the statistics of the full posterior, and its scores equal the
diagnostics of the full posterior."""

import math

import numpy as np
import pytest
import xarray as xr

import daml
from daml import diagnostics, errors, filters, models
from daml.errors import DivergenceError, InputError, PosteriorError
from daml.filters.run import record_bytes

QS = (0.05, 0.5, 0.95)
TOL = dict(rtol=1e-12, atol=1e-12)


def _l96(steps=24, every=2, experiments=2, seed=1):
    model = models.Lorenz96(n=8)
    x0 = np.full(8, 8.0)
    x0[0] += 1.0
    data = daml.simulate(model, steps, models.observe_all(8, sd=1.0), every=every, x0=x0, x0_cov=0.5,
                         seed=seed, experiments=experiments)
    return model, data


def _l63(steps=30, every=2, experiments=None, seed=2):
    model = models.Lorenz63()
    data = daml.simulate(model, steps, models.observe_all(3, sd=2.0), every=every, x0=np.array([1.0, 1.0, 20.0]),
                         x0_cov=1.0, seed=seed, experiments=experiments)
    return model, data


CASES = {
    "etkf-l96": (lambda: filters.etkf(members=6), _l96),
    "enkf-l63": (lambda: filters.enkf(members=10), lambda: _l63(experiments=2)),
    "bootstrap-before-l63": (lambda: filters.bootstrap(members=40, record="before_resampling"), _l63),
}

SUMMARY_ATTRS = ("method", "config", "seed", "daml_version", "stage", "daml_kind", "members", "keep", "thin")


def _assert_same_summary(a, b):
    """Two summaries hold the same variables, coordinates and identifying attrs (values to 1e-12)."""
    assert set(a.data_vars) == set(b.data_vars)
    for k in a.data_vars:
        assert a[k].dims == b[k].dims, k
        np.testing.assert_allclose(a[k].values, b[k].values, err_msg=k, **TOL)
    assert set(a.coords) == set(b.coords)
    for k in a.coords:
        np.testing.assert_array_equal(a[k].values, b[k].values, err_msg=k)
    for k in SUMMARY_ATTRS:
        assert a.attrs[k] == b.attrs[k], k


@pytest.mark.parametrize("case", list(CASES))
def test_summary_recorded_by_run_equals_summary_of_the_full_posterior(case):
    make, twin = CASES[case]
    model, data = twin()
    full = filters.run(make(), model, data, seed=3, progress=False, forecast=True)
    summ = filters.run(make(), model, data, seed=3, progress=False, forecast=True, keep="summary", quantiles=QS)
    a = summ.analysis
    assert "member" not in a.dims and a.attrs["daml_kind"] == "summary" and a.attrs["keep"] == "summary"
    assert a.attrs["members"] == full.analysis.sizes["member"] and a.attrs["thin"] == 1
    assert {"seconds", "cycles_per_second"} <= set(a.attrs)
    with pytest.raises(PosteriorError):
        daml.validate(a)                                  # a summary is not a posterior
    batch = [d for d in full.analysis["log_weight"].dims if d not in ("time", "member")]
    assert a["mean"].dims == ("time", *batch, "variable")
    assert a["quantiles"].dims == ("quantile", "time", *batch, "variable")
    assert a["ess"].dims == ("time", *batch)
    assert {"crps", "pit"} <= set(a.data_vars)
    _assert_same_summary(a, filters.summarise(full.analysis, truth=data.truth, quantiles=QS))
    _assert_same_summary(summ.forecast, filters.summarise(full.forecast, truth=data.truth, quantiles=QS))
    assert summ.forecast.attrs["stage"] == "forecast"
    if case.startswith("bootstrap"):                      # the weights really are unequal
        assert float(a["ess"].min()) < 0.9 * a.attrs["members"]


def test_summarise_equals_the_posterior_statistics_and_diagnostics():
    # the oracles: xarray's weighted mean, variance and quantile (through .daml), and daml.diagnostics
    model, data = _l63(experiments=2)
    post = filters.run(filters.bootstrap(members=40, record="before_resampling"), model, data, seed=5,
                       progress=False).analysis
    s = filters.summarise(post, truth=data.truth, quantiles=QS)
    np.testing.assert_allclose(s["mean"].values, post.daml.mean()["x"].values, **TOL)
    np.testing.assert_allclose(s["sd"].values, post.daml.std(ddof=1)["x"].values, **TOL)
    q = post.daml.quantile(list(QS))["x"].transpose(*s["quantiles"].dims)
    np.testing.assert_allclose(s["quantiles"].values, q.values, **TOL)
    np.testing.assert_allclose(s["ess"].values, diagnostics.ess(post).values, **TOL)
    np.testing.assert_allclose(s["crps"].values, diagnostics.crps(post, data.truth).transpose(*s["crps"].dims).values,
                               **TOL)
    np.testing.assert_allclose(s["pit"].values, diagnostics.pit(post, data.truth).transpose(*s["pit"].dims).values,
                               **TOL)
    for key in ("resampled", "loglik"):                   # the filter's info, as in the posterior
        if key in post:
            np.testing.assert_array_equal(s[key].values, post[key].values)


def test_weighted_quantile_with_ties_zero_weights_and_no_time_dim():
    # a posterior without time, members with ties and weights that underflow to 0: xarray is the oracle
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(60, 3)), 1)            # ties
    lw = rng.normal(size=60) * 3.0
    lw[:5] = -1e4                                        # weight exactly 0 after exp
    post = daml.from_members(x, lw)
    qs = (0.0, 0.01, 0.3, 0.5, 0.77, 1.0)
    s = filters.summarise(post, quantiles=qs)
    assert s["quantiles"].dims == ("quantile", "variable") and "crps" not in s
    np.testing.assert_allclose(s["quantiles"].values, post.daml.quantile(list(qs))["x"].values, **TOL)
    # equal weights: numpy's default (type 7) quantile
    eq = daml.from_members(x)
    np.testing.assert_allclose(filters.summarise(eq, quantiles=qs)["quantiles"].values,
                               np.quantile(x, qs, axis=0), **TOL)


@pytest.mark.parametrize("case", ["etkf-l96", "bootstrap-before-l63"])
def test_summary_scores_are_the_same_on_both_paths_and_equal_the_diagnostics(case):
    make, twin = CASES[case]
    model, data = twin()
    post = filters.run(make(), model, data, seed=3, progress=False).analysis
    summ = filters.run(make(), model, data, seed=3, progress=False, keep="summary").analysis
    from_post = filters.summary_scores(post, data.truth)
    from_summ = filters.summary_scores(summ, data.truth)
    oracle = {"rmse": diagnostics.rmse(post, data.truth), "spread": diagnostics.spread(post),
              "crps": diagnostics.crps(post, data.truth).mean("variable")}
    batch = [d for d in post["log_weight"].dims if d != "member"]
    for k, ref in oracle.items():
        for scores in (from_post, from_summ):
            assert set(scores[k].dims) == set(batch), k
            np.testing.assert_allclose(scores[k].transpose(*ref.dims).values, ref.values, err_msg=k, **TOL)


def test_thin_records_every_kth_analysis_and_equals_the_full_run():
    model, data = _l96(steps=30, every=2)
    filt = filters.etkf(members=6)
    full = filters.run(filt, model, data, seed=4, progress=False, forecast=True)
    n = full.analysis.sizes["time"]
    assert n == 15
    for k in (1, 2, 4, 15, 40):
        part = filters.run(filt, model, data, seed=4, progress=False, forecast=True, thin=k)
        idx = np.arange(0, n, k)                         # analyses 0, k, 2k, ... (the first always)
        assert part.analysis.attrs["thin"] == k and part.analysis.attrs["keep"] == "members"
        np.testing.assert_array_equal(part.analysis["step"].values, full.analysis["step"].values[idx])
        for stage in ("analysis", "forecast"):
            a, b = getattr(part, stage), getattr(full, stage).isel(time=idx)
            assert np.array_equal(a["x"].values, b["x"].values)          # bit for bit: same filter path
            assert np.array_equal(a["log_weight"].values, b["log_weight"].values)
        daml.validate(part.analysis)
        summ = filters.run(filt, model, data, seed=4, progress=False, forecast=True, keep="summary", thin=k)
        ref = filters.summarise(full.analysis.isel(time=idx), truth=data.truth)
        ref.attrs["thin"] = k
        _assert_same_summary(summ.analysis, ref)
        np.testing.assert_array_equal(summ.forecast["step"].values, full.analysis["step"].values[idx])


def test_summary_memory_does_not_grow_with_members_times_analyses(monkeypatch):
    # the documented example: L96-40, 3 experiments, 3000 particles, 1000 analyses
    shape, item = (3, 3000, 40), 8
    members = record_bytes("members", 1000, shape, item)
    summary = record_bytes("summary", 1000, shape, item, 3, True)
    assert members > 2.9e9 and summary < 0.1e9
    # ten times the analyses: the members ten times, the summary's records only (its working memory stays)
    assert record_bytes("members", 10000, shape, item) == 10 * members
    assert record_bytes("summary", 10000, shape, item, 3, True) < 3 * summary
    # a run refused for its members fits with keep="summary" (the up-front check of run)
    model, data = _l63(steps=300, every=1)
    filt = filters.bootstrap(members=2000)
    need_members = record_bytes("members", 300, (2000, 3), 8)
    need_summary = record_bytes("summary", 300, (2000, 3), 8, 3, True)
    assert need_summary < 0.6 * need_members
    fake = int(0.8 * need_members)
    monkeypatch.setattr(errors, "available_memory", lambda device=None: fake)
    with pytest.raises(InputError, match=r"^members: expected a size whose arrays fit in memory.*keep='summary'"):
        filters.run(filt, model, data, seed=0, progress=False)
    res = filters.run(filt, model, data, seed=0, progress=False, keep="summary")
    assert res.analysis.sizes["time"] == 300 and res.analysis.attrs["members"] == 2000


@pytest.mark.parametrize("name, bad", [
    ("keep", "all"), ("keep", None), ("keep", 1), ("keep", "Summary"),
    ("thin", 0), ("thin", -2), ("thin", 1.5), ("thin", True), ("thin", "2"), ("thin", None),
    ("quantiles", ()), ("quantiles", (1.5,)), ("quantiles", (0.5, 0.5)), ("quantiles", "0.5"), ("quantiles", 0.5),
    ("quantiles", (math.nan,)), ("quantiles", (True,)), ("quantiles", None), ("quantiles", (-0.1, 0.5)),
])
def test_bad_keep_thin_quantiles_are_refused_naming_the_argument(name, bad):
    model, data = _l63(steps=4)
    with pytest.raises(InputError, match=rf"^{name}: expected"):
        filters.run(filters.etkf(members=4), model, data, seed=0, progress=False, **{name: bad})


def test_summarise_and_summary_scores_refuse_bad_input_naming_the_argument():
    model, data = _l63(steps=6)
    post = filters.run(filters.etkf(members=4), model, data, seed=0, progress=False).analysis
    with pytest.raises(InputError, match="^post: expected"):
        filters.summarise(data)
    with pytest.raises(InputError, match="^post: expected"):
        filters.summarise(np.zeros((3, 4)))
    with pytest.raises(InputError, match="^quantiles: expected"):
        filters.summarise(post, quantiles=(2.0,))
    with pytest.raises(InputError, match="^truth: expected"):
        filters.summarise(post, truth=np.zeros(3))
    with pytest.raises(InputError, match="^result: expected"):
        filters.summary_scores(data, data.truth)
    with pytest.raises(InputError, match="^result: expected"):
        filters.summary_scores("post", data.truth)
    no_crps = filters.summarise(post)                     # a summary made without a truth: no crps
    with pytest.raises(InputError, match="^result: expected a summary with .*crps"):
        filters.summary_scores(no_crps, data.truth)
    summ = filters.summarise(post, truth=data.truth)
    with pytest.raises(daml.errors.ShapeError, match="^truth: expected"):
        filters.summary_scores(summ, data.truth.isel(variable=slice(0, 2)))


def test_data_without_truth_gives_a_summary_without_crps_and_pit():
    model, data = _l63(steps=10)
    res = filters.run(filters.etkf(members=5), model, data.drop_vars("truth"), seed=0, progress=False,
                      keep="summary")
    assert {"mean", "sd", "quantiles", "ess"} <= set(res.analysis.data_vars)
    assert not {"crps", "pit"} & set(res.analysis.data_vars)
    bad = data.assign(truth=data.truth.isel(time=0))     # a truth without time: refused, not ignored
    with pytest.raises(daml.errors.ShapeError, match="^data: expected a truth"):
        filters.run(filters.etkf(members=5), model, bad, seed=0, progress=False, keep="summary")
    bad = data.assign(truth=data.truth.isel(variable=slice(0, 2)))     # aligned: NaN for variable 2
    with pytest.raises(daml.errors.NonFiniteError, match="^data: expected a finite truth"):
        filters.run(filters.etkf(members=5), model, bad, seed=0, progress=False, keep="summary")


def test_all_weight_on_one_member_gives_nan_sd_with_a_warning_and_scores_refuse():
    x = np.arange(12.0).reshape(2, 3, 2)                  # (time, member, variable)
    lw = np.array([[0.0, -2000.0, -2000.0], [0.0, -1.0, -2.0]])
    post = daml.from_members(x, lw, dims=("time", "member", "variable"), coords={"time": [0, 1]})
    truth = xr.DataArray(np.zeros((2, 2)), dims=("time", "variable"), coords={"time": [0, 1]})
    with pytest.warns(UserWarning, match="ESS 1"):
        s = filters.summarise(post, truth=truth)
    assert np.isnan(s["sd"].values[0]).all() and np.isfinite(s["sd"].values[1]).all()
    np.testing.assert_allclose(s["sd"].values[1], post.isel(time=[1]).daml.std(ddof=1)["x"].values[0], **TOL)
    with pytest.raises(InputError, match="^result: expected weights spread over at least two members"):
        filters.summary_scores(s, truth)
    with pytest.raises(InputError, match="weights spread over at least two members"):
        filters.summary_scores(post, truth)


def _blow_up_after(base, call, shift=1e19):
    calls = {"n": 0}

    def analysis(state, y, op, mask, g):
        calls["n"] += 1
        state, info = base.analysis(state, y, op, mask, g)
        if calls["n"] >= call:
            state = state._replace(x=state.x + shift)
        return state, info

    return base._replace(analysis=analysis)


@pytest.mark.parametrize("thin", [1, 2])
def test_divergence_keeps_the_partial_result_in_the_chosen_mode(thin):
    model, data = _l96(steps=16, every=2)
    base = filters.etkf(members=6)
    full = filters.run(base, model, data, seed=0, progress=False)
    with pytest.raises(DivergenceError, match="max_magnitude") as info:
        filters.run(_blow_up_after(base, 5), model, data, seed=0, progress=False, keep="summary", thin=thin)
    part = info.value.partial
    assert info.value.step == int(full.analysis["step"].values[4])
    idx = np.arange(0, 4, thin)                          # the good analyses 0..3, thinned
    assert part.attrs["daml_kind"] == "summary" and part.sizes["time"] == len(idx)
    ref = filters.summarise(full.analysis.isel(time=idx), truth=data.truth)
    ref.attrs["thin"] = thin
    _assert_same_summary(part, ref)
    with pytest.raises(DivergenceError) as info:
        filters.run(_blow_up_after(base, 5), model, data, seed=0, progress=False, thin=thin)
    part = info.value.partial
    daml.validate(part)
    assert part.attrs["keep"] == "members"
    np.testing.assert_array_equal(part["x"].values, full.analysis["x"].values[idx])
