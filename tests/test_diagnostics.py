import math

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import stats

import daml
from daml import diagnostics as dg
from daml.errors import InputError, NonFiniteError, ShapeError


def _post(x, lw=None, dims=None, coords=None):
    return daml.from_members(x, lw, dims=dims, coords=coords, method="test")


# -- ESS -------------------------------------------------------------------------------------------------

def test_ess_limits_and_formula(rng):
    n = 64
    assert float(dg.ess(_post(rng.normal(size=n)))) == pytest.approx(n, rel=1e-12)
    lw = np.full(n, -1e4)
    lw[5] = 0.0
    assert float(dg.ess(_post(rng.normal(size=n), lw))) == pytest.approx(1.0, rel=1e-12)
    lw = rng.normal(scale=2, size=(3, n))
    w = np.exp(lw - lw.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    e = dg.ess(xr.DataArray(lw, dims=("time", "member")))
    np.testing.assert_allclose(e.values, 1 / (w**2).sum(1), rtol=1e-12)
    assert e.dims == ("time",)


def test_ess_is_invariant_to_a_constant_shift(rng):
    lw = xr.DataArray(rng.normal(scale=3, size=(5, 100)), dims=("t", "member"))
    for c in (-1e3, -7.5, 0.0, 42.0, 650.0):
        np.testing.assert_allclose(dg.ess(lw + c).values, dg.ess(lw).values, rtol=1e-12)


def test_ess_bad_input(rng):
    with pytest.raises(NonFiniteError, match="post: expected finite log-weights"):
        dg.ess(xr.DataArray([0.0, np.nan], dims="member"))
    with pytest.raises(ShapeError, match="post: expected a non-empty 'member' dimension"):
        dg.ess(xr.DataArray([0.0, 1.0], dims="draw"))


# -- PSIS against ArviZ ---------------------------------------------------------------------------------

def _arviz_psislw(lw, r_eff=1.0):
    import arviz as az

    return az.psislw(lw, reff=r_eff)


@pytest.mark.parametrize("s, scale, r_eff", [(100, 0.5, 1.0), (1000, 1.0, 1.0), (1000, 3.0, 1.0),
                                             (4000, 2.0, 0.7), (30, 1.0, 1.0), (12, 1.0, 1.0)])
def test_psis_equals_arviz(rng, s, scale, r_eff):
    """Tolerance: 1e-9 absolute on log-weights and k-hat (float64, same algorithm, different summation order)."""
    lw = rng.standard_t(df=3, size=(6, s)) * scale
    ours = dg.psis(xr.DataArray(lw, dims=("case", "member")), r_eff=r_eff)
    ref_lw, ref_k = _arviz_psislw(lw, r_eff)
    np.testing.assert_allclose(ours.log_weight.values, ref_lw, rtol=0, atol=1e-9)
    finite = np.isfinite(ref_k)
    assert np.array_equal(np.isfinite(ours.khat.values), finite)
    np.testing.assert_allclose(ours.khat.values[finite], ref_k[finite], rtol=0, atol=1e-9)
    assert ours.log_weight.dims == ("case", "member") and ours.khat.dims == ("case",)


def test_psis_heavy_tail_flags_high_khat(rng):
    """Log ratios of a log-normal with sigma 3 have a very heavy tail: k-hat well above 0.7."""
    lw = xr.DataArray(rng.normal(scale=3.0, size=2000), dims="member")
    k = float(dg.psis(lw).khat)
    ref = float(_arviz_psislw(lw.values)[1])
    assert k == pytest.approx(ref, abs=1e-9) and k > dg.pareto_khat_threshold(2000)


def test_psis_of_a_posterior_uses_its_weights_and_is_shift_invariant(weighted_post):
    a = weighted_post.daml.psis()
    b = dg.psis(weighted_post["log_weight"] + 10.0)
    np.testing.assert_allclose(a.log_weight.values, b.log_weight.values, atol=1e-12)
    np.testing.assert_allclose(np.exp(a.log_weight).sum("member"), 1.0, atol=1e-12)


def test_psis_kernel_float32_and_bad_r_eff(rng):
    lw = torch.from_numpy(rng.normal(size=(2, 500)))
    out64, k64 = dg.psis_kernel(lw)
    out32, k32 = dg.psis_kernel(lw.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-4)
    torch.testing.assert_close(k32.double(), k64, rtol=0, atol=1e-3)
    with pytest.raises(InputError, match="r_eff"):
        dg.psis(xr.DataArray(rng.normal(size=10), dims="member"), r_eff=0.0)


def test_khat_threshold():
    assert dg.pareto_khat_threshold(10) == pytest.approx(0.0)
    assert dg.pareto_khat_threshold(100) == pytest.approx(0.5)
    assert dg.pareto_khat_threshold(10**6) == 0.7


# -- CRPS and energy score against scoringrules / properscoring --------------------------------------------

@pytest.fixture
def ens(rng):
    x = rng.normal(size=(5, 9, 3))           # (time, member, variable)
    lw = rng.normal(scale=1.0, size=(5, 9))
    y = rng.normal(size=(5, 3))
    coords = {"time": np.arange(5), "variable": ["a", "b", "c"]}
    post = _post(x, lw, dims=("time", "member", "variable"), coords=coords)
    truth = xr.DataArray(y, dims=("time", "variable"), coords=coords)
    w = np.exp(post["log_weight"].values)
    return post, truth, x, w, y


def test_crps_weighted_equals_properscoring_and_scoringrules(ens):
    import properscoring as ps
    import scoringrules as sr

    post, truth, x, w, y = ens
    ours = dg.crps(post, truth).transpose("time", "variable").values
    xm = np.moveaxis(x, 1, -1)               # (time, variable, member)
    wm = np.broadcast_to(w[:, None, :], xm.shape)
    np.testing.assert_allclose(ours, ps.crps_ensemble(y, xm, weights=wm), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ours, sr.crps_ensemble(y, xm, ens_w=wm, estimator="nrg"), rtol=1e-12, atol=1e-13)
    fair = dg.crps(post, truth, estimator="fair").transpose("time", "variable").values
    np.testing.assert_allclose(fair, sr.crps_ensemble(y, xm, ens_w=wm, estimator="fair"), rtol=1e-12, atol=1e-13)


def test_crps_equal_weights_exact_and_fair(rng):
    import properscoring as ps
    import scoringrules as sr

    x = rng.normal(size=(40, 11))
    y = rng.normal(size=40)
    post = _post(x.T, dims=("member", "case"))
    truth = xr.DataArray(y, dims="case")
    np.testing.assert_allclose(dg.crps(post, truth).values, ps.crps_ensemble(y, x), rtol=1e-12)
    np.testing.assert_allclose(dg.crps(post, truth, estimator="fair").values,
                               sr.crps_ensemble(y, x, estimator="fair"), rtol=1e-12)


def test_fair_crps_is_unbiased_for_fixed_unequal_weights(rng):
    """Members iid N(0,1), fixed unequal weights, y = 0.3: the mean fair CRPS over R replications
    matches the closed-form CRPS of N(0,1) within 4 standard errors (false alarm ~6e-5), while the
    exact estimator is biased upward by 0.5 (sum w^2) E|X - X'|, far outside that band."""
    r, m, y = 20000, 6, 0.3
    w = np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
    x = rng.normal(size=(r, m))
    post = _post(x.T, np.broadcast_to(np.log(w)[:, None], (m, r)).copy(), dims=("member", "case"))
    truth = xr.DataArray(np.full(r, y), dims="case")
    exact_crps = y * (2 * stats.norm.cdf(y) - 1) + 2 * stats.norm.pdf(y) - 1 / math.sqrt(math.pi)
    fair = dg.crps(post, truth, estimator="fair").values
    plug = dg.crps(post, truth).values
    se = fair.std() / math.sqrt(r)
    assert abs(fair.mean() - exact_crps) < 4 * se
    assert plug.mean() - exact_crps > 8 * se


def test_energy_score_equals_scoringrules(ens):
    import scoringrules as sr

    es = getattr(sr, "es_ensemble", None) or sr.energy_score  # renamed in scoringrules 0.10
    post, truth, x, w, y = ens
    ours = dg.energy_score(post, truth).values
    np.testing.assert_allclose(ours, es(y, x, ens_w=w), rtol=1e-12)
    fair = dg.energy_score(post, truth, estimator="fair").values
    np.testing.assert_allclose(fair, es(y, x, ens_w=w, estimator="fair"), rtol=1e-12)


def test_energy_score_in_one_dimension_is_the_crps(ens):
    post, truth, *_ = ens
    one = post.isel(variable=[1])
    np.testing.assert_allclose(dg.energy_score(one, truth.isel(variable=[1])).values,
                               dg.crps(one, truth.isel(variable=[1])).isel(variable=0).values, rtol=1e-12)


def test_score_bad_input(ens):
    post, truth, *_ = ens
    with pytest.raises(InputError, match="estimator"):
        dg.crps(post, truth, estimator="pwm")
    nan_truth = truth.copy()
    nan_truth[0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="truth: expected finite values"):
        dg.crps(post, nan_truth)
    with pytest.raises(ShapeError, match="truth: expected every 'time' label"):
        dg.crps(post, truth.assign_coords(time=np.arange(5) + 1))
    finer = xr.concat([truth, truth.assign_coords(time=np.arange(5) + 0.5)], "time").sortby("time")
    np.testing.assert_array_equal(dg.crps(post, finer).values, dg.crps(post, truth).values)
    with pytest.raises(ShapeError, match="truth: expected the posterior's dimension sizes"):
        dg.rmse(post, truth.isel(time=slice(0, 3)).drop_vars("time"))
    with pytest.raises(ShapeError, match="truth: expected no 'member' dimension"):
        dg.crps(post, truth.expand_dims(member=[0]))
    with pytest.raises(ShapeError, match="dim"):
        dg.energy_score(post, truth, dim="time")
    two = post.assign(z=post["x"] * 2)
    with pytest.raises(InputError, match="var: expected one of"):
        dg.crps(two, truth)
    assert dg.crps(two, truth, var="z").shape == (5, 3)


# -- RMSE and spread --------------------------------------------------------------------------------------

def test_rmse_and_spread_match_numpy(ens):
    post, truth, x, w, y = ens
    mean = np.einsum("tm,tmv->tv", w, x)
    var = np.einsum("tm,tmv->tv", w, (x - mean[:, None]) ** 2) / (1 - (w**2).sum(1))[:, None]
    r = dg.rmse(post, truth)
    assert r.dims == ("time",)
    np.testing.assert_allclose(r.values, np.sqrt(((mean - y) ** 2).mean(1)), rtol=1e-12)
    np.testing.assert_allclose(dg.spread(post).values, np.sqrt(var.mean(1)), rtol=1e-12)
    np.testing.assert_allclose(float(dg.rmse(post, truth, dim=["time", "variable"])),
                               np.sqrt(((mean - y) ** 2).mean()), rtol=1e-12)


def test_rmse_keeps_batch_dims_of_the_weights(rng):
    x = rng.normal(size=(4, 2, 30, 5))          # (time, experiment, member, variable)
    post = _post(x, rng.normal(size=(4, 2, 30)), dims=("time", "experiment", "member", "variable"))
    truth = xr.DataArray(rng.normal(size=(2, 4, 5)), dims=("experiment", "time", "variable"))
    r = dg.rmse(post, truth)
    assert set(r.dims) == {"time", "experiment"}
    for e in range(2):
        one = _post(x[:, e], post["log_weight"].values[:, e], dims=("time", "member", "variable"))
        np.testing.assert_allclose(r.isel(experiment=e).values,
                                   dg.rmse(one, truth.isel(experiment=e)).values, rtol=1e-12)
    assert set(dg.spread(post).dims) == {"time", "experiment"}


# -- PIT, rank histogram, spread-skill ------------------------------------------------------------------

def test_rank_histogram_equals_talagrand_counts_for_equal_weights(rng):
    m, cases = 7, 500
    x = rng.normal(size=(m, cases))
    y = rng.normal(size=cases)
    post = _post(x, dims=("member", "case"))
    hist = dg.rank_histogram(post, xr.DataArray(y, dims="case"))
    ranks = (x < y).sum(0)
    np.testing.assert_array_equal(hist.values, np.bincount(ranks, minlength=m + 1))
    assert hist.dims == ("rank",) and hist.sum() == cases
    assert hist["lower"].values[0] == 0 and hist["upper"].values[-1] == 1


def test_rank_histogram_keeps_unpooled_dims(ens):
    post, truth, *_ = ens
    h = dg.rank_histogram(post, truth, dim="time", bins=4)
    assert h.dims == ("variable", "rank") and np.all(h.sum("rank").values == 5)


def test_calibrated_ensemble_has_flat_rank_histogram_and_unit_spread_skill(rng):
    """Truth and 5 members iid N(mu_c, 1) per case: flat histogram (chi-square test at false-alarm
    rate 1e-3) and spread-skill within 4 MC standard errors of 1; without the (M+1)/M correction
    the ratio would be sqrt(5/6) = 0.913, far outside that band."""
    m, cases = 5, 40000
    mu = rng.normal(scale=3, size=cases)
    x = mu + rng.normal(size=(m, cases))
    y = mu + rng.normal(size=cases)
    post = _post(x, dims=("member", "case"))
    truth = xr.DataArray(y, dims="case")
    flat = dg.rank_histogram_flatness(dg.rank_histogram(post, truth))
    assert float(flat.pvalue) > 1e-3 and flat.dof == m
    ssr = float(dg.spread_skill(post, truth))
    # delta-method se of sqrt(mean s2 / mean e2) with e2 ~ 1.2 chi2_1 and s2 ~ chi2_4 / 4
    se = 0.5 * math.sqrt(2 / cases + 2 / (4 * cases))
    assert abs(ssr - 1) < 4 * se
    assert abs(math.sqrt(m / (m + 1)) - 1) > 10 * se


def test_underdispersed_ensemble_is_detected(rng):
    m, cases = 9, 4000
    x = rng.normal(scale=0.5, size=(m, cases))
    y = rng.normal(size=cases)
    post = _post(x, dims=("member", "case"))
    truth = xr.DataArray(y, dims="case")
    hist = dg.rank_histogram(post, truth)
    assert float(dg.rank_histogram_flatness(hist).pvalue) < 1e-6
    assert hist.values[0] > 2 * hist.values[m // 2] and hist.values[-1] > 2 * hist.values[m // 2]  # U shape
    assert float(dg.spread_skill(post, truth)) < 0.7


def test_importance_weighted_posterior_has_flat_weighted_pit(rng):
    """Prior N(0, 1) members, one observation y = 1.2 with noise variance 0.5, truth drawn from the exact
    posterior N(0.8, 1/3) in each case: the weighted PIT histogram (10 bins, 3000 cases, 2000 fresh
    members per case) is flat at false-alarm rate 1e-3, and the unweighted one is not."""
    cases, m, s2 = 3000, 2000, 0.5
    obs = np.full(cases, 1.2)
    post_mean, post_var = obs / (1 + s2), s2 / (1 + s2)
    truth = post_mean + math.sqrt(post_var) * rng.normal(size=cases)
    x = rng.normal(size=(m, cases))
    lw = -0.5 * (x - obs) ** 2 / s2
    post = _post(x, lw, dims=("member", "case"))
    hist = dg.rank_histogram(post, xr.DataArray(truth, dims="case"), bins=10)
    assert float(dg.rank_histogram_flatness(hist).pvalue) > 1e-3
    # the same ensemble scored without its weights is badly calibrated
    unweighted = _post(x, dims=("member", "case"))
    h0 = dg.rank_histogram(unweighted, xr.DataArray(truth, dims="case"), bins=10)
    assert float(dg.rank_histogram_flatness(h0).pvalue) < 1e-6


def test_pit_ties_split_by_seed(rng):
    post = _post(np.array([[0.0], [1.0], [1.0], [2.0]]), dims=("member", "case"))
    truth = xr.DataArray([1.0], dims="case")
    assert dg.pit(post, truth).item() == pytest.approx(0.5)
    a = dg.pit(post, truth, seed=1).item()
    assert 0.25 <= a <= 0.75 and a == dg.pit(post, truth, seed=1).item()


def test_rank_histogram_bad_bins(ens):
    post, truth, *_ = ens
    with pytest.raises(InputError, match="bins"):
        dg.rank_histogram(post, truth, bins=0)


def test_describe_mentions_method_and_ess(weighted_post):
    text = dg.describe(weighted_post)
    assert "method: test" in text and "ESS min" in text and "k-hat" in text
