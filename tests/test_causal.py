"""daml.causal: DML against DoubleML and a manual reference, coverage, Q10, partitioning, the CLI."""

from __future__ import annotations

import json
import numpy as np
import pandas as pd
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn.ensemble import RandomForestRegressor  # noqa: E402
from sklearn.linear_model import LinearRegression  # noqa: E402

import daml  # noqa: E402
from daml import causal  # noqa: E402
from daml.errors import InputError, NonFiniteError, ShapeError  # noqa: E402


def _plr_data(n: int, theta: float, seed: int, p: int = 3):
    """Y = theta D + g(X) + e with linear g and m (so linear learners are correctly specified)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    d = x @ np.linspace(0.5, 1.0, p) + rng.normal(size=n)
    y = theta * d + x @ np.linspace(1.0, -1.0, p) + rng.normal(size=n)
    return y, d, x


@pytest.fixture(scope="module")
def site():
    return causal.synthetic_site(years=1, seed=0)


def _subsample(site, n, seed):
    idx = np.sort(np.random.default_rng(seed).choice(site.sizes["time"], n, replace=False))
    return site.isel(time=idx)


# ------------------------------------------------------------------------------------------------
# equality with DoubleML and with a hand-written reference


@pytest.mark.parametrize("score", ["partialling out", "IV-type"])
@pytest.mark.parametrize("kind", ["forest", "linear", "network", "network-batched"])
def test_plr_equals_doubleml(score, kind):
    dml = pytest.importorskip("doubleml")
    y, d, x = _plr_data(300, 0.5, seed=1)
    splits = causal.sample_splits(y.size, folds=4, repetitions=3, seed=2)
    learner = {"forest": RandomForestRegressor(n_estimators=30, min_samples_leaf=5, random_state=7),
               "linear": LinearRegression(),
               "network": causal.MLPRegressor(iterations=150, random_state=3),
               "network-batched": causal.MLPRegressor(iterations=150, random_state=3)}[kind]
    ours = causal.plr(y, d, x, ml_l=learner, ml_m=learner, ml_g=learner, score=score, splits=splits, seed=0,
                      batched=kind == "network-batched")
    daml.validate(ours)
    data = dml.DoubleMLData.from_arrays(x, y, d)
    ref = dml.DoubleMLPLR(data, learner, learner, ml_g=learner if score == "IV-type" else None, score=score,
                          n_folds=4, n_rep=3, draw_sample_splitting=False)
    ref.set_sample_splitting(splits)
    ref.fit()
    # the batched network differs from one-at-a-time training by rounding only
    tol = 1e-8 if kind != "network-batched" else 1e-6
    assert abs(float(ours["theta"]) - ref.coef[0]) < tol
    assert abs(float(ours["se"]) - ref.se[0]) < tol
    assert np.allclose(ours["ci"].values, ref.confint(level=0.95).values[0], rtol=0, atol=tol)
    assert np.allclose(ours["theta_rep"].values, ref.all_coef[0], rtol=0, atol=tol)
    assert np.allclose(ours["se_rep"].values, ref.all_se[0], rtol=0, atol=tol)
    rmse = ref.evaluate_learners()
    assert np.allclose(ours["nuisance_rmse"].sel(nuisance="ml_m").values, rmse["ml_m"][:, 0], atol=tol)


def test_variance_aggregation_over_repetitions():
    """aggregation="variance": se^2 = median(se_r^2 + (theta_r - theta)^2) (Chernozhukov et al. 2018)
    on the same per-split estimates as the default; one split: both aggregations agree."""
    y, d, x = _plr_data(300, 0.5, seed=5)
    splits = causal.sample_splits(y.size, folds=4, repetitions=5, seed=6)
    kw = dict(ml_l=LinearRegression(), ml_m=LinearRegression(), splits=splits, seed=0)
    base = causal.plr(y, d, x, **kw)
    var = causal.plr(y, d, x, aggregation="variance", **kw)
    th, se = var["theta_rep"].values, var["se_rep"].values
    assert np.array_equal(th, base["theta_rep"].values) and float(var["theta"]) == float(base["theta"])
    want = np.sqrt(np.median(se**2 + (th - np.median(th)) ** 2))
    assert abs(float(var["se"]) - want) < 1e-15
    assert np.allclose(var["ci"].values, float(var["theta"]) + np.array([-1, 1]) * 1.959963984540054 * want,
                       rtol=0, atol=1e-14)
    assert float(var["se"]) >= np.median(se) and json.loads(var.attrs["config"])["aggregation"] == "variance"
    for how, ds in (("variance", var), ("interval", base)):                 # the helper plr uses
        assert causal.aggregate_repetitions(th, se, how) == (float(ds["theta"]), float(ds["se"]))
    one = [splits[0]]
    a = causal.plr(y, d, x, ml_l=LinearRegression(), ml_m=LinearRegression(), splits=one, seed=0)
    b = causal.plr(y, d, x, ml_l=LinearRegression(), ml_m=LinearRegression(), splits=one, seed=0, aggregation="variance")
    assert abs(float(a["se"]) - float(b["se"])) < 1e-15
    assert np.allclose(a["ci"].values, b["ci"].values, rtol=0, atol=1e-14)
    assert np.allclose(a["ci_boot"].values, b["ci_boot"].values, rtol=0, atol=1e-14)
    with pytest.raises(InputError, match="^aggregation"):
        causal.plr(y, d, x, aggregation="mean", **kw)


def test_multiplier_bootstrap_equals_doubleml():
    dml = pytest.importorskip("doubleml")
    y, d, x = _plr_data(200, 0.5, seed=3)
    splits = causal.sample_splits(y.size, folds=5, repetitions=2, seed=4)
    ours = causal.plr(y, d, x, ml_l=LinearRegression(), ml_m=LinearRegression(), splits=splits, seed=0)
    ref = dml.DoubleMLPLR(dml.DoubleMLData.from_arrays(x, y, d), LinearRegression(), LinearRegression(),
                          n_folds=5, n_rep=2, draw_sample_splitting=False)
    ref.set_sample_splitting(splits)
    ref.fit()
    for method in ("normal", "Bayes", "wild"):
        np.random.seed(11)                  # DoubleML draws its weights from numpy's global stream
        ref.bootstrap(method=method, n_rep_boot=50)
        rs = np.random.RandomState(11)
        weights = []
        for _ in range(2):                  # the same draws, in DoubleML's order, handed to daml
            if method == "normal":
                weights.append(rs.normal(size=(50, 200)))
            elif method == "Bayes":
                weights.append(rs.exponential(size=(50, 200)) - 1.0)
            else:
                a, b = rs.normal(size=(50, 200)), rs.normal(size=(50, 200))
                weights.append(a / np.sqrt(2) + (b**2 - 1) / 2)
        score = causal.solve_linear_score(-(ours["d"].values - ours["m_hat"].values) ** 2,
                                          (ours["d"].values - ours["m_hat"].values)
                                          * (ours["y"].values - ours["l_hat"].values))
        t_ours = causal.multiplier_bootstrap(score, np.stack(weights)).numpy()
        assert np.allclose(t_ours, ref.framework.boot_t_stat[:, 0, :].T, rtol=0, atol=1e-10), method


def test_plr_manual_reference():
    """theta and se from a hand-written residual-on-residual computation on the same folds."""
    y, d, x = _plr_data(40, 1.0, seed=5, p=2)
    splits = causal.sample_splits(40, folds=4, repetitions=1, seed=6)
    ours = causal.plr(y, d, x, ml_l=LinearRegression(), ml_m=LinearRegression(), splits=splits, seed=0)
    u = np.empty(40)
    v = np.empty(40)
    for train, test in splits[0]:
        design = np.column_stack([np.ones(train.size), x[train]])
        beta_y = np.linalg.lstsq(design, y[train], rcond=None)[0]
        beta_d = np.linalg.lstsq(design, d[train], rcond=None)[0]
        u[test] = y[test] - np.column_stack([np.ones(test.size), x[test]]) @ beta_y
        v[test] = d[test] - np.column_stack([np.ones(test.size), x[test]]) @ beta_d
    theta = (u * v).sum() / (v * v).sum()
    psi = (u - theta * v) * v
    se = np.sqrt(np.mean(psi**2) / np.mean(v * v) ** 2 / 40)
    assert abs(float(ours["theta"]) - theta) < 1e-12
    assert abs(float(ours["se"]) - se) < 1e-12
    assert np.allclose(ours["ci"].values, theta + np.array([-1, 1]) * 1.959963984540054 * se, atol=1e-12)


def test_bootstrap_interval_and_draws_are_consistent():
    y, d, x = _plr_data(150, 0.5, seed=8)
    ds = causal.plr(y, d, x, ml_l=LinearRegression(), ml_m=LinearRegression(), repetitions=3, n_boot=400, seed=9)
    t = (ds["theta_draw"] - ds["theta_rep"]) / ds["se_rep"]
    q = np.quantile(np.abs(t.values), 0.95, axis=0)
    lower = np.median(ds["theta_rep"].values - q * ds["se_rep"].values)
    upper = np.median(ds["theta_rep"].values + q * ds["se_rep"].values)
    assert np.allclose(ds["ci_boot"].values, [lower, upper], atol=1e-12)
    # the normal multiplier t* is N(0, 1) given the data: its quantile is close to 1.96 (400 draws)
    assert 1.7 < q.mean() < 2.25
    assert np.allclose(ds["log_weight"].values, -np.log(400))
    again = causal.plr(y, d, x, ml_l=LinearRegression(), ml_m=LinearRegression(), repetitions=3, n_boot=400, seed=9)
    assert np.array_equal(again["theta_draw"].values, ds["theta_draw"].values)


# ------------------------------------------------------------------------------------------------
# statistical checks


def test_coverage_linear_nuisance():
    """Known theta, correctly specified linear learners: 300 seeded data sets, 95 % intervals.

    With 300 repetitions the empirical coverage of a correct 95 % interval lies in [0.92, 0.975] with
    probability > 0.99 (binomial); the mean estimate is within 3 Monte Carlo standard errors of theta.
    """
    theta = 0.7
    est, cover, ses = [], [], []
    for s in range(300):
        y, d, x = _plr_data(200, theta, seed=1000 + s)
        ds = causal.plr(y, d, x, ml_l=LinearRegression(), ml_m=LinearRegression(), n_boot=1, seed=s)
        est.append(float(ds["theta"]))
        ses.append(float(ds["se"]))
        lo, hi = ds["ci"].values
        cover.append(lo <= theta <= hi)
    est = np.array(est)
    assert 0.92 <= np.mean(cover) <= 0.975
    assert abs(est.mean() - theta) < 3 * est.std() / np.sqrt(est.size)
    # the standard error matches the spread of the estimates (within 15 %)
    assert abs(np.mean(ses) / est.std() - 1.0) < 0.15


def test_q10_recovers_truth_on_synthetic_site(site):
    sub = _subsample(site, 3200, seed=1)
    ds = causal.q10(sub, seed=3)
    daml.validate(ds)
    q = float(ds["q10"])
    assert abs(q - 1.5) < 0.05
    lo, hi = ds["q10_ci"].values
    assert lo < q < hi and np.isclose(np.log(lo), float(ds["ci"][0]))
    # confounding is real: regressing log RECO on temperature alone overstates Q10 badly
    slope = np.polyfit((sub["TA"].values - 15.0) / 10.0, np.log(sub["RECO_obs"].values), 1)[0]
    assert np.exp(slope) > 2.0
    # the fitted base respiration follows the true one (relative RMSE below 15 %)
    rel = np.sqrt(np.mean((ds["rb"].values - sub["RB"].values) ** 2)) / sub["RB"].values.mean()
    assert rel < 0.15
    assert "time" in ds.coords and ds["time"].size == 3200
    assert "Q10" in causal.summary(ds)


def test_q10_network_learner(site):
    sub = _subsample(site, 2000, seed=2)
    ds = causal.q10(sub, learner="network", seed=4)
    assert abs(float(ds["q10"]) - 1.5) < 0.06
    rel = np.sqrt(np.mean((ds["rb"].values - sub["RB"].values) ** 2)) / sub["RB"].values.mean()
    assert rel < 0.1


@pytest.mark.slow
def test_q10_coverage_on_synthetic_site(site):
    """40 subsamples of the synthetic site (n = 3200, noise 0.2), network learner: coverage >= 0.85."""
    cover = []
    for s in range(40):
        ds = causal.q10(_subsample(site, 3200, seed=100 + s), learner="network", seed=s)
        lo, hi = ds["q10_ci"].values
        cover.append(lo <= 1.5 <= hi)
    assert np.mean(cover) >= 0.85


def test_end_to_end_identified_and_equifinal(site):
    sub = _subsample(site, 3000, seed=3)
    ok = causal.q10_end_to_end(sub, members=10, iterations=1500, seed=1)
    daml.validate(ok)
    assert abs(float(ok["q10"]) - 1.5) < 0.05
    # with temperature among the network's inputs Q10 is not identified: it drifts far from the truth
    bad = causal.q10_end_to_end(sub, include_ta=True, members=10, iterations=1500, seed=1)
    assert float(bad["q10"]) > 1.8
    assert ok["q10_draw"].sizes["member"] == 10 and np.all(ok["best_step"].values > 0)


def test_partition_recovers_lue_and_gpp(site):
    sub = _subsample(site, 4000, seed=4)
    ds = causal.partition(sub, members=5, seed=2)
    daml.validate(ds)
    day = sub["SW_IN"].values > 0
    corr = np.corrcoef(ds["lue_hat"].values[day], sub["LUE"].values[day])[0, 1]
    gpp = sub["GPP"].values
    r2 = 1.0 - np.mean((ds["gpp_hat"].values - gpp) ** 2) / np.var(gpp)
    assert corr > 0.95 and r2 > 0.95
    assert (ds["gpp_ci"][0] <= ds["gpp_ci"][1]).all()
    reco_r2 = 1.0 - np.mean((ds["reco_hat"].values - sub["RECO"].values) ** 2) / np.var(sub["RECO"].values)
    assert reco_r2 > 0.5
    assert ds.attrs["config"].count('"bootstrap": "full"') == 1


def test_partition_full_bootstrap_carries_the_nuisance_error(site):
    """Refitting only the final stage keeps l and m fixed, so RECO's members differ only through
    theta(x) m; the full bootstrap refits l and m too: its members vary in l, its RECO band is wider and
    the point estimates do not depend on the choice."""
    sub = _subsample(site, 2000, seed=5)
    fast = dict(ml_l=causal.default_boosting(0, max_iter=60), ml_m=causal.default_boosting(1, max_iter=60),
                final=causal.default_final(2, n_estimators=30), members=4, seed=3)
    full = causal.partition(sub, bootstrap="full", **fast)
    final = causal.partition(sub, bootstrap="final", **fast)
    daml.validate(full)
    for name in ("gpp_hat", "reco_hat", "lue_hat"):
        assert np.array_equal(full[name].values, final[name].values)
    width = {k: float((d["reco_ci"][1] - d["reco_ci"][0]).mean()) for k, d in (("full", full), ("final", final))}
    assert width["full"] > 1.2 * width["final"]
    # final: RECO_b + theta_b m = l_hat for every member; full: that sum differs between members
    implied_l = lambda d: d["reco"].values - d["lue"].values * d["m_hat"].values[None]  # noqa: E731
    assert np.allclose(implied_l(final), final["l_hat"].values[None], atol=1e-9)
    assert np.ptp(implied_l(full), axis=0).mean() > 0.05
    with pytest.raises(InputError, match="^bootstrap:"):
        causal.partition(sub, bootstrap="nuisance", **fast)


def test_block_bootstrap_draws_whole_groups():
    from daml.causal.partition import _resample_rows

    groups = np.repeat(np.array([4, 9, 1, 7]), [3, 1, 5, 2])            # 4 groups of sizes 3, 1, 5, 2
    rows = _resample_rows(groups.size, groups, np.random.default_rng(0))
    drawn = groups[rows]
    for label in np.unique(drawn):
        size = int((groups == label).sum())
        assert (drawn == label).sum() % size == 0                         # whole groups, possibly repeated
        assert np.array_equal(np.unique(rows[drawn == label]), np.flatnonzero(groups == label))
    counts = [int((drawn == label).sum() // (groups == label).sum()) for label in np.unique(groups)]
    assert sum(counts) == 4                                               # as many draws as groups
    plain = _resample_rows(10, None, np.random.default_rng(0))
    assert plain.size == 10 and plain.min() >= 0 and plain.max() < 10


# ------------------------------------------------------------------------------------------------
# splits and learners


def test_sample_splits_partition_and_groups():
    splits = causal.sample_splits(103, folds=5, repetitions=2, seed=0)
    for rep in splits:
        tests = np.concatenate([te for _, te in rep])
        assert np.array_equal(np.sort(tests), np.arange(103))
        for tr, te in rep:
            assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == 103
    assert not np.array_equal(splits[0][0][1], splits[1][0][1])
    again = causal.sample_splits(103, folds=5, repetitions=2, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits[0], again[0]))
    groups = np.repeat(np.arange(20), 6)
    blocked = causal.sample_splits(120, folds=4, seed=1, groups=groups)[0]
    for _, te in blocked:
        assert set(np.unique(groups[te])).isdisjoint(set(groups[np.setdiff1d(np.arange(120), te)]))
        assert te.size == 30


def test_mlp_regressor_fits_and_clones():
    from sklearn.base import clone

    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(400, 1))
    y = np.sin(2 * x[:, 0]) + 0.05 * rng.normal(size=400)
    net = causal.MLPRegressor(iterations=800, random_state=1).fit(x, y)
    assert np.sqrt(np.mean((net.predict(x) - np.sin(2 * x[:, 0])) ** 2)) < 0.08
    twin = clone(net).fit(x, y)
    assert np.array_equal(twin.predict(x), net.predict(x))
    problems = [(np.arange(0, 300), np.arange(300, 400)), (np.arange(100, 400), np.arange(0, 100))]
    batched = causal.MLPRegressor(iterations=300, random_state=1).fit_many(x, y, problems)
    for (tr, te), pred in zip(problems, batched):
        alone = causal.MLPRegressor(iterations=300, random_state=1).fit(x[tr], y[tr]).predict(x[te])
        assert np.allclose(pred, alone, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_named():
    y, d, x = _plr_data(60, 0.5, seed=0)
    lr = LinearRegression()
    with pytest.raises(InputError, match="d: expected a treatment that varies"):
        causal.plr(y, np.full(60, 2.0), x, ml_l=lr, ml_m=lr)
    with pytest.raises(InputError, match="y: expected at least 2 x folds"):
        causal.plr(y[:7], d[:7], x[:7], ml_l=lr, ml_m=lr, folds=5)
    with pytest.raises(InputError, match="ml_m"):
        causal.plr(y, d, x, ml_l=lr, ml_m=object())
    with pytest.raises(InputError, match="score"):
        causal.plr(y, d, x, ml_l=lr, ml_m=lr, score="dml1")
    with pytest.raises(ShapeError, match="x: expected 60 rows"):
        causal.plr(y, d, x[:50], ml_l=lr, ml_m=lr)
    with pytest.raises(InputError, match="splits"):
        causal.plr(y, d, x, ml_l=lr, ml_m=lr, splits=[[(np.arange(30), np.arange(30, 60))], [(np.arange(5),)]])
    with pytest.raises(InputError, match="x: expected controls that exclude the temperature"):
        causal.q10({"RECO_obs": np.ones(60), "TA": d}, x=("TA",))
    with pytest.raises(InputError, match="reco: expected positive respiration"):
        causal.q10({"RECO_obs": np.r_[-1.0, np.ones(59)], "TA": d, "SW_POT_sm": x[:, 0], "SW_POT_sm_diff": x[:, 1]})
    with pytest.raises(InputError, match=r"data: expected the columns 'R' \(reco\), 'TA' \(ta\), .*got columns \['RECO_obs'\]"):
        causal.q10({"RECO_obs": np.ones(60)}, reco="R")


def test_nan_rows_dropped_with_count():
    y, d, x = _plr_data(100, 0.5, seed=1)
    y[[3, 10]] = np.nan
    x[20, 1] = np.nan
    lr = LinearRegression()
    with pytest.warns(causal.DroppedRowsWarning, match="dropped 3 of 100 rows"):
        ds = causal.plr(y, d, x, ml_l=lr, ml_m=lr, seed=0)
    assert ds.attrs["n_dropped"] == 3 and ds.attrs["n_obs"] == 97
    assert "3 rows with NaN dropped" in causal.summary(ds)
    assert np.isfinite(float(ds["theta"]))
    with pytest.raises(NonFiniteError, match="3 rows with NaN"):
        causal.plr(y, d, x, ml_l=lr, ml_m=lr, nan="raise")


# ------------------------------------------------------------------------------------------------
# the CLI and FLUXNET files


def test_cli_q10_round_trip(tmp_path, capsys):
    from daml.cli import main

    site = causal.synthetic_site(years=1, seed=3)
    path = tmp_path / "site.csv"
    causal.to_fluxnet_csv(site, path)
    frame = pd.read_csv(path)
    frame.loc[5:9, "TA_F"] = -9999                     # missing values are counted, not used
    frame.loc[frame.index[frame.NIGHT == 1][:4], "NEE_VUT_REF_QC"] = 2
    frame.to_csv(path, index=False)
    assert main(["q10", str(path), "--out", str(tmp_path / "out"), "--learner", "forest", "--block", "none"]) == 0
    text = capsys.readouterr().out
    assert "Q10" in text and "dropped 4 with NEE_VUT_REF_QC > 0" in text
    ds = daml.open_posterior(tmp_path / "out" / "site_q10.nc")
    assert abs(float(ds["q10"]) - 1.5) < 0.05
    assert ds.attrs["rows_bad_qc"] == 4 and ds.attrs["source_file"] == str(path)


def _write(tmp_path, frame):
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    return path


def test_fluxnet_bad_files(tmp_path):
    site = causal.synthetic_site(years=1, seed=3)
    good = tmp_path / "good.csv"
    causal.to_fluxnet_csv(site, good)
    frame = pd.read_csv(good, dtype={"TIMESTAMP_START": str})
    with pytest.raises(InputError, match="without NEE_VUT_REF_QC"):
        causal.read_fluxnet_csv(_write(tmp_path, frame.drop(columns="NEE_VUT_REF_QC")))
    with pytest.raises(InputError, match="looks like Kelvin"):
        causal.read_fluxnet_csv(_write(tmp_path, frame.assign(TA_F=frame.TA_F + 273.15)))
    with pytest.raises(InputError, match="looks like kPa"):
        causal.read_fluxnet_csv(_write(tmp_path, frame.assign(VPD_F=frame.VPD_F / 10.0)))
    with pytest.raises(InputError, match="at least 100 usable night-time rows"):
        causal.read_fluxnet_csv(_write(tmp_path, frame.assign(NEE_VUT_REF_QC=np.where(frame.index < 100, 0, 3))))
    with pytest.raises(InputError, match="SW_IN_POT \\(or pass latitude\\)"):
        causal.read_fluxnet_csv(_write(tmp_path, frame.drop(columns="SW_IN_POT")))
    data, report = causal.read_fluxnet_csv(_write(tmp_path, frame.drop(columns="SW_IN_POT")), latitude=47.12)
    assert report["kept"] == int((site["NIGHT"] == 1).sum())
    reference, _ = causal.read_fluxnet_csv(good)
    # the computed potential radiation gives the same seasonal controls as the stored one
    assert np.allclose(data["SW_POT_sm"], reference["SW_POT_sm"], rtol=1e-4)
    from daml.cli import main

    assert main(["q10", str(tmp_path / "missing.csv"), "--out", str(tmp_path)]) == 2
