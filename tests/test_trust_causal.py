"""daml.causal refuses what it cannot answer (issue 26): degenerate designs, empty and non-finite input,
physically impossible values, malformed CSV files and wrong types come back as daml errors naming the
argument, never as a zero standard error with NaN draws, a silent NaN or another library's error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")
from sklearn.ensemble import RandomForestRegressor  # noqa: E402
from sklearn.linear_model import LinearRegression  # noqa: E402

import daml  # noqa: E402
from daml import causal  # noqa: E402
from daml.errors import (DamlError, DivergenceError, DtypeError, InputError, NonFiniteError,  # noqa: E402
                         ShapeError)

LR = LinearRegression()


def _data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    d = x @ [0.5, 0.8, 1.0] + rng.normal(size=n)
    y = 0.7 * d + x @ [1.0, 0.0, -1.0] + rng.normal(size=n)
    return y, d, x


# ------------------------------------------------------------------------------------------------
# degenerate designs


@pytest.mark.parametrize("score", ["partialling out", "IV-type"])
def test_constant_outcome_is_refused(score):
    """Before: theta 0, se 0, 500 NaN bootstrap draws and a posterior that failed validate."""
    y, d, x = _data()
    with pytest.raises(InputError, match="y: expected an outcome that varies across observations"):
        causal.plr(np.full(y.size, 3.0), d, x, ml_l=LR, ml_m=LR, score=score, seed=0)
    site = pd.DataFrame({"RECO_obs": 2.0, "TA": 10 * d, "SW_POT_sm": x[:, 0], "SW_POT_sm_diff": x[:, 1]})
    with pytest.raises(InputError, match="y: expected an outcome that varies"):
        causal.q10(site, learner=LinearRegression(), n_boot=10, seed=0)


def test_zero_score_has_no_bootstrap():
    """A score that is zero everywhere has se 0: its multiplier bootstrap is 0/0 and is refused."""
    score = causal.solve_linear_score(-np.ones((1, 6)), np.zeros((1, 6)))
    assert float(score.se[0]) == 0.0
    with pytest.raises(InputError, match="score: expected a score with a positive standard error"):
        causal.multiplier_bootstrap(score, np.ones((4, 6)))


@pytest.mark.parametrize("noise", [0.0, 1e-9])
def test_treatment_determined_by_controls_is_refused(noise):
    """Before: an exact linear treatment was caught, but 1e-9 of residual noise gave theta 8e6, se 9e7."""
    y, _, x = _data(200)
    d = x @ [1.0, 2.0, 3.0] + noise * np.random.default_rng(1).normal(size=200)
    with pytest.raises(InputError, match="d: expected a treatment with variation left after the controls"):
        causal.plr(y, d, x, ml_l=LR, ml_m=LR, seed=0)


def test_noise_free_model_gives_the_exact_answer():
    """Where a correct answer exists it is given: y = 0.7 d + g(x) exactly, linear learners."""
    _, d, x = _data(200)
    ds = causal.plr(0.7 * d + x @ [1.0, 2.0, 3.0], d, x, ml_l=LR, ml_m=LR, seed=0, n_boot=50)
    assert abs(float(ds["theta"]) - 0.7) < 1e-10 and 0.0 < float(ds["se"]) < 1e-10
    daml.validate(ds)
    assert np.isfinite(ds["theta_draw"].values).all()


def test_small_n_and_non_finite_inputs():
    y, d, x = _data(60)
    with pytest.raises(InputError, match="y: expected at least 2 x folds = 10 observations"):
        causal.plr(y[:9], d[:9], x[:9], ml_l=LR, ml_m=LR)
    with pytest.raises(NonFiniteError, match="d: expected finite values"):
        causal.plr(y, np.r_[np.inf, d[1:]], x, ml_l=LR, ml_m=LR)
    with pytest.raises(InputError, match="after dropping NaN rows"), pytest.warns(causal.DroppedRowsWarning):
        causal.plr(np.full(60, np.nan), d, x, ml_l=LR, ml_m=LR)
    with pytest.raises(DtypeError, match="y: expected real numbers"):       # before: imaginary part dropped
        causal.plr(y + 1j, d, x, ml_l=LR, ml_m=LR)


# ------------------------------------------------------------------------------------------------
# empty and NaN input to the score functions


@pytest.mark.parametrize("a, b, err, arg", [
    ([], [], ShapeError, "psi_a"),
    (np.empty((3, 0)), np.empty((3, 0)), ShapeError, "psi_a"),
    ([np.nan, -1.0, -2.0], [1.0, 2.0, 3.0], NonFiniteError, "psi_a"),
    ([-1.0, -1.0, -2.0], [1.0, np.nan, 3.0], NonFiniteError, "psi_b"),
    ("abc", [1.0], DtypeError, "psi_a"),
])
def test_solve_linear_score_refuses_empty_and_nan(a, b, err, arg):
    with pytest.raises(err, match=f"^{arg}:"):
        causal.solve_linear_score(a, b)


def test_solve_linear_score_closed_form():
    a, b = np.array([[-1.0, -2.0, -3.0]]), np.array([[1.0, 1.0, 4.0]])
    s = causal.solve_linear_score(a, b)
    theta = 6.0 / 6.0
    psi = a * theta + b
    assert float(s.theta[0]) == pytest.approx(theta)
    assert float(s.se[0]) == pytest.approx(np.sqrt((psi**2).mean() / (4.0 * 3)))


@pytest.mark.parametrize("theta_r, se_r, err, arg", [
    ([], [], ShapeError, "theta_r"),
    ([np.nan, 1.0], [0.1, 0.1], NonFiniteError, "theta_r"),
    ([1.0, 1.0], [np.nan, 0.1], NonFiniteError, "se_r"),
    ([1.0, 2.0, 3.0], [0.1, 0.1], ShapeError, "se_r"),
    ([1.0, 2.0], [-0.1, 0.1], InputError, "se_r"),
    (None, None, InputError, "theta_r"),
])
def test_aggregate_repetitions_refuses_empty_and_nan(theta_r, se_r, err, arg):
    with pytest.raises(err, match=f"^{arg}:"):
        causal.aggregate_repetitions(theta_r, se_r)


# ------------------------------------------------------------------------------------------------
# physically impossible values


def test_latitude_and_temperature_ranges():
    t = pd.date_range("2003-06-21", periods=48, freq="30min")
    with pytest.raises(InputError, match="latitude: expected degrees north within"):
        causal.potential_radiation(t, latitude=100)
    with pytest.raises(InputError, match="step_hours"):
        causal.potential_radiation(t, latitude=45, step_hours=0)
    with pytest.raises(DtypeError, match="time: expected timestamps"):   # before: read as ns since 1970
        causal.potential_radiation(np.arange(48), latitude=45)
    # at the pole on the June solstice the sun stays up all day: S0 (1 + 0.033 cos) sin(decl)
    pole = causal.potential_radiation(t, latitude=90)
    doy = 172.0
    decl = np.radians(23.44) * np.sin(2 * np.pi * (284 + doy) / 365)
    assert np.allclose(pole, 1361 * (1 + 0.033 * np.cos(2 * np.pi * doy / 365)) * np.sin(decl))
    with pytest.raises(InputError, match="ta: .*below absolute zero"):
        causal.saturation_vapour_pressure(-300)
    with pytest.raises(InputError, match="ta: .*pole"):
        causal.saturation_vapour_pressure([-250.0, 10.0])
    with pytest.raises(NonFiniteError, match="ta:"):
        causal.saturation_vapour_pressure([np.nan])
    # Tetens at 20 C: 6.1078 exp(17.27 * 20 / 257.3) = 23.37 hPa
    assert causal.saturation_vapour_pressure(20.0) == pytest.approx(6.1078 * np.exp(17.27 * 20 / 257.3))
    with pytest.raises(InputError, match="sw_in_pot: expected non-negative"):
        causal.smoothed_potential_radiation(-np.ones(1000))
    with pytest.raises(NonFiniteError, match="sw_in_pot"):
        causal.smoothed_potential_radiation(np.r_[np.nan, np.ones(999)])
    with pytest.raises(InputError, match="tref"):
        causal.synthetic_site(years=1, tref=-300)
    with pytest.raises(InputError, match="years"):
        causal.synthetic_site(years=10**6)
    frame = pd.DataFrame({"RECO_obs": np.ones(30), "TA": np.full(30, -300.0), "SW_POT_sm": 1.0, "SW_POT_sm_diff": 1.0})
    with pytest.raises(InputError, match="ta: expected air temperatures .* absolute zero"):
        causal.q10(frame)


# ------------------------------------------------------------------------------------------------
# CSV files and DataFrames


@pytest.fixture(scope="module")
def good_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux") / "good.csv"
    causal.to_fluxnet_csv(causal.synthetic_site(years=1, seed=3), path)
    return path


def test_csv_text_in_numeric_column(good_csv, tmp_path):
    frame = pd.read_csv(good_csv, dtype={"TIMESTAMP_START": str})
    frame["TA_F"] = frame["TA_F"].astype(object)
    frame.loc[7, "TA_F"] = "warm"
    path = tmp_path / "text.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"FILE: expected numbers in column TA_F, got 'warm' in .*text\.csv, "
                                         r"data row 8 \(line 9\)"):
        causal.read_fluxnet_csv(path)
    from daml.cli import main

    assert main(["q10", str(path)]) == 2


def test_csv_semicolon_and_decimal_comma(good_csv, tmp_path):
    frame = pd.read_csv(good_csv, dtype={"TIMESTAMP_START": str})
    semi = tmp_path / "semi.csv"
    frame.to_csv(semi, index=False, sep=";", decimal=",")
    with pytest.raises(InputError, match="looks semicolon-separated"):
        causal.read_fluxnet_csv(semi)
    comma = tmp_path / "comma.csv"           # decimal commas inside a comma-separated file
    text = good_csv.read_text().splitlines()
    head, row = text[0], text[1].split(",")
    row[2] = '"' + row[2].replace(".", ",") + '"' if "." in row[2] else '"1,5"'
    comma.write_text("\n".join([head, ",".join(row), *text[2:]]) + "\n")
    with pytest.raises(InputError, match="numbers in column TA_F.*data row 1 .*decimal commas"):
        causal.read_fluxnet_csv(comma)


def test_csv_impossible_values(good_csv, tmp_path):
    frame = pd.read_csv(good_csv, dtype={"TIMESTAMP_START": str})
    path = tmp_path / "bad.csv"
    frame.assign(TA_F=np.where(frame.index == 4, -300.0, frame.TA_F)).to_csv(path, index=False)
    with pytest.raises(InputError, match="TA_F: .*absolute zero.*data row 5"):
        causal.read_fluxnet_csv(path)
    frame.assign(NIGHT=np.where(frame.index == 2, 3, frame.NIGHT)).to_csv(path, index=False)
    with pytest.raises(InputError, match="NIGHT: expected a night flag of 0 or 1"):
        causal.read_fluxnet_csv(path)
    frame.assign(SW_IN_POT=np.where(frame.index == 2, np.inf, frame.SW_IN_POT)).to_csv(path, index=False)
    with pytest.raises(NonFiniteError, match="SW_IN_POT"):
        causal.read_fluxnet_csv(path)
    with pytest.raises(InputError, match="latitude"):
        causal.read_fluxnet_csv(good_csv, latitude=100)
    with pytest.raises(InputError, match="max_qc"):
        causal.read_fluxnet_csv(good_csv, max_qc="0")
    with pytest.raises(InputError, match="path"):
        causal.read_fluxnet_csv(None)


def test_q10_names_missing_and_present_columns():
    frame = pd.DataFrame({"RECO_obs": np.ones(30), "SW_POT_sm": 1.0, "VPD": 1.0})
    with pytest.raises(InputError, match=r"data: expected the columns 'TA' \(ta\), 'SW_POT_sm_diff' \(x\), "
                                         r"got columns \['RECO_obs', 'SW_POT_sm', 'VPD'\]"):
        causal.q10(frame)
    with pytest.raises(InputError, match="'VPD' \\(x\\)"):
        causal.partition(pd.DataFrame({"NEE_obs": [1.0], "SW_IN": [1.0]}), x=("VPD",))


@pytest.mark.parametrize("call", [
    lambda y, d, x: causal.plr(y, d, x, ml_l=RandomForestRegressor, ml_m=LR),
    lambda y, d, x: causal.q10({"RECO_obs": np.exp(y / 5), "TA": d, "SW_POT_sm": x[:, 0], "SW_POT_sm_diff": x[:, 1]},
                               learner=LinearRegression),
    lambda y, d, x: causal.cross_fit(LinearRegression, x, y, causal.sample_splits(y.size, 2, seed=0)),
])
def test_learner_class_instead_of_instance(call):
    y, d, x = _data()
    with pytest.raises(InputError, match=r"pass an instance, \w+=\w+\(\), not the class"):
        call(y, d, x)


def test_learner_failure_is_named():
    y, d, x = _data()
    with pytest.raises(InputError, match="ml_l: expected a learner that can be fitted.*RandomForestRegressor failed"):
        causal.plr(y, d, x, ml_l=RandomForestRegressor(n_estimators="many"), ml_m=LR)
    with pytest.raises(InputError, match="options"):
        causal.default_boosting(depth=3)


def test_diverged_network_is_refused():
    x = np.random.default_rng(0).normal(size=(40, 2))
    with pytest.raises(DivergenceError, match="MLPRegressor training diverged"):
        causal.MLPRegressor(lr=1e8, iterations=30).fit(x, x[:, 0])


# ------------------------------------------------------------------------------------------------
# wrong types for every public function: a daml error, never another library's


def _calls():
    y, d, x = _data(40)
    sc = causal.solve_linear_score(-(d[None] ** 2), d[None] * y[None])
    frame = pd.DataFrame({"RECO_obs": np.exp(y / 5), "TA": d, "SW_POT_sm": x[:, 0], "SW_POT_sm_diff": x[:, 1],
                          "NEE_obs": y, "SW_IN": np.abs(d), "VPD": x[:, 2]})
    t = pd.date_range("2003-01-01", periods=48, freq="30min")
    return {
        "plr groups": lambda: causal.plr(y, d, x, ml_l=LR, ml_m=LR, groups=[1, 2]),
        "plr coords": lambda: causal.plr(y, d, x, ml_l=LR, ml_m=LR, coords="time"),
        "plr predictions": lambda: causal.plr(y, d, x, ml_l=LR, ml_m=LR, predictions={"ml_l": "abc"}),
        "plr batched": lambda: causal.plr(y, d, x, ml_l=LR, ml_m=LR, batched="no"),
        "plr x text": lambda: causal.plr(y, d, np.full((40, 3), "a", dtype=object), ml_l=LR, ml_m=LR),
        "plr n_boot huge": lambda: causal.plr(y, d, x, ml_l=LR, ml_m=LR, n_boot=10**12),
        "sample_splits groups": lambda: causal.sample_splits(4, 2, groups=[None, 1, "a", 2]),
        "sample_splits huge": lambda: causal.sample_splits(10**13, 2),
        "cross_fit x": lambda: causal.cross_fit(LR, "abc", y, causal.sample_splits(40, 2, seed=0)),
        "cross_fit splits": lambda: causal.cross_fit(LR, x, y, "abc"),
        "cross_fit nan": lambda: causal.cross_fit(LR, np.full((40, 3), np.nan), y, causal.sample_splits(40, 2, seed=0)),
        "multiplier_bootstrap score": lambda: causal.multiplier_bootstrap(None, np.ones((3, 40))),
        "multiplier_bootstrap weights": lambda: causal.multiplier_bootstrap(sc, "abc"),
        "summary": lambda: causal.summary(None),
        "default_learner": lambda: causal.default_learner(None),
        "q10 data": lambda: causal.q10("file.csv"),
        "q10 reco": lambda: causal.q10(frame, reco=None),
        "q10 x": lambda: causal.q10(frame, x=3),
        "q10 text": lambda: causal.q10(frame.assign(TA="warm")),
        "q10_end_to_end dropout": lambda: causal.q10_end_to_end(frame, dropout="a", iterations=2, members=2),
        "q10_end_to_end hidden": lambda: causal.q10_end_to_end(frame, hidden="ab", iterations=2, members=2),
        "q10_end_to_end level": lambda: causal.q10_end_to_end(frame, level=2, iterations=2, members=2),
        "q10_end_to_end members": lambda: causal.q10_end_to_end(frame, members=10**10, iterations=2),
        "partition folds": lambda: causal.partition(frame, folds="2", members=2),
        "partition x": lambda: causal.partition(frame, x=None, members=2),
        "partition groups": lambda: causal.partition(frame, groups=[1], members=2),
        "partition nee": lambda: causal.partition(frame.assign(NEE_obs=1.0), x=("TA",), members=2),
        "synthetic_site start": lambda: causal.synthetic_site(years=1, start=None),
        "to_fluxnet_csv site": lambda: causal.to_fluxnet_csv(None, "x.csv"),
        "potential_radiation time": lambda: causal.potential_radiation("2003", 45),
        "potential_radiation lat": lambda: causal.potential_radiation(t, "north"),
        "smoothed_potential_radiation": lambda: causal.smoothed_potential_radiation("abc"),
        "smoothed days": lambda: causal.smoothed_potential_radiation(np.ones(1000), 48, float("nan")),
        "saturation_vapour_pressure": lambda: causal.saturation_vapour_pressure("hot"),
        "MLPRegressor hidden": lambda: causal.MLPRegressor(hidden="ab").fit(x, y),
        "MLPRegressor lr": lambda: causal.MLPRegressor(lr=float("nan")).fit(x, y),
        "MLPRegressor iterations": lambda: causal.MLPRegressor(iterations=2.5).fit(x, y),
        "MLPRegressor predict nan": lambda: causal.MLPRegressor(iterations=2).fit(x, y).predict(np.full((2, 3), np.nan)),
        "MLPRegressor fit_many": lambda: causal.MLPRegressor(iterations=2).fit_many(x, y, [(np.arange(50), [0])]),
    }


@pytest.mark.parametrize("name", list(_calls()))
def test_wrong_input_gives_a_daml_error(name):
    with pytest.raises(DamlError):
        _calls()[name]()
