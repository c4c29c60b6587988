"""Kalman filter, EKF and RTS smoother, tested three ways (the dynamax recipe).

1. an independent library: filterpy's ``KalmanFilter`` and ``rts_smoother`` on the same data;
2. a brute-force dense solve: all states and observations stacked into one joint Gaussian and
   conditioned with ``numpy.linalg.solve``, which gives the filtered and smoothed marginals and the
   total log-likelihood without any recursion;
3. a Monte Carlo check of the analytic mean squared error of a scalar random walk, with a stated
   tolerance.

Plus exact equivalences (EKF = KF on linear problems, masked entries = the operator restricted to the
observed rows, a batch = its experiments run one by one) and bad-input errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from filterpy.kalman import KalmanFilter, rts_smoother

import daml
from daml.errors import InputError
from daml.filters import (GaussianState, extended_kalman_filter, kalman_filter, kalman_smoother, make_filter,
                          run)
from daml.models.observations import observe_all, observe_linear, observe_nonlinear
from daml.twin import simulate

N_STATE, N_OBS, STEPS = 4, 3, 30


class TinyLinear:
    """The smallest linear model the protocol allows: ``x_{k+1} = M x_k + w``, ``w ~ N(0, Q)``."""

    def __init__(self, matrix: np.ndarray, noise_cov: np.ndarray, dt: float = 1.0):
        self.step_matrix = torch.as_tensor(matrix, dtype=torch.float64)
        self.noise_cov = torch.as_tensor(noise_cov, dtype=torch.float64)
        self.state_size = self.step_matrix.shape[0]
        self.dt = dt

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.step_matrix.to(x).T


class TinyNonlinear:
    """A model without ``step_matrix``: ``x_{k+1} = x_k + 0.1 sin(x_k)``."""

    state_size = N_STATE
    dt = 1.0
    noise_cov = None

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.sin(x)


def _spd(rng: np.random.Generator, k: int, floor: float) -> np.ndarray:
    b = rng.normal(size=(k, k))
    return b @ b.T / k + floor * np.eye(k)


def _problem(seed: int) -> dict:
    """A random stable linear-Gaussian problem (spectral radius 0.95)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(N_STATE, N_STATE))
    mat = 0.95 * a / np.abs(np.linalg.eigvals(a)).max()
    return {
        "M": mat,
        "Q": _spd(rng, N_STATE, 0.2),
        "R": _spd(rng, N_OBS, 0.3),
        "H": rng.normal(size=(N_OBS, N_STATE)),
        "m0": rng.normal(size=N_STATE),
        "P0": _spd(rng, N_STATE, 0.5),
    }


def _twin(p: dict, *, every: int = 1, missing: float = 0.0, experiments: int | None = None, seed: int = 1):
    model = TinyLinear(p["M"], p["Q"])
    op = observe_linear(p["H"], cov=p["R"])
    data = simulate(model, STEPS, op, every=every, x0=p["m0"], x0_cov=p["P0"], missing=missing,
                    experiments=experiments, seed=seed)
    return model, op, data


CASES = {"every step": {"every": 1, "missing": 0.0}, "every 3, missing": {"every": 3, "missing": 0.3}}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    p = _problem(7)
    model, op, data = _twin(p, **CASES[request.param])
    if CASES[request.param]["missing"]:
        assert np.isnan(data.y.values[data.observed.values]).any()      # the case really has NaN entries
    return p, model, op, data


def _forward(filt, model, op, data) -> dict:
    """Drive the filter's functions by hand over every model step: ``{k: (forecast, analysis, info)}``
    at the observation times (the same loop as :func:`daml.filters.run`)."""
    y_all = torch.as_tensor(data.y.values)
    state = filt.init(model, torch.as_tensor(data.prior_mean.values).expand(*y_all.shape[:-2], -1),
                      torch.as_tensor(data.prior_cov.values), None)
    out = {}
    for k in range(1, data.sizes["time"]):
        state = filt.forecast(state, model, None)
        if data.observed.values[k]:
            y = y_all[..., k, :]
            mask = torch.isfinite(y)
            fc = state
            state, info = filt.analysis(state, torch.where(mask, y, 0.0), op, mask, None)
            out[k] = (fc, state, info)
    return out


def _posterior_moments(post) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and plug-in covariance over ``member`` of a posterior's ``x``."""
    x = post.x.transpose(..., "member", "variable").values
    w = np.exp(post.log_weight.transpose(..., "member").values)[..., None]
    mean = (w * x).sum(-2)
    dev = x - mean[..., None, :]
    cov = np.einsum("...i,...ij,...ik->...jk", w[..., 0], dev, dev)
    return mean, cov


def _filterpy(p: dict, data) -> dict:
    """filterpy's Kalman filter on the same data, NaN entries handled by dropping their rows."""
    kf = KalmanFilter(dim_x=N_STATE, dim_z=N_OBS)
    kf.F, kf.Q, kf.H, kf.R = p["M"], p["Q"], p["H"], p["R"]
    kf.x, kf.P = data.prior_mean.values[:, None].copy(), data.prior_cov.values.copy()
    out = {0: (kf.x.ravel().copy(), kf.P.copy())}
    for k in range(1, data.sizes["time"]):
        kf.predict()
        if data.observed.values[k]:
            y = data.y.values[k]
            obs = np.isfinite(y)
            if obs.any():
                kf.update(y[obs][:, None], R=p["R"][np.ix_(obs, obs)], H=p["H"][obs])
        out[k] = (kf.x.ravel().copy(), kf.P.copy())
    return out


def _brute_force(p: dict, data) -> dict:
    """The joint Gaussian of ``x_0..x_T`` and every observed entry, conditioned densely.

    Returns the smoothed marginals, the filtered marginal at each observation time (conditioning on
    the observations up to it) and the log-density of all observed entries.
    """
    n, t1 = N_STATE, data.sizes["time"]
    mat, q = p["M"], p["Q"]
    var = [data.prior_cov.values]
    mx = [data.prior_mean.values]
    for _ in range(1, t1):
        var.append(mat @ var[-1] @ mat.T + q)
        mx.append(mat @ mx[-1])
    cxx = np.zeros((t1 * n, t1 * n))
    for j in range(t1):
        prop = np.eye(n)
        for k in range(j, t1):                       # Cov(x_k, x_j) = M^(k-j) Var(x_j)
            block = prop @ var[j]
            cxx[k * n:(k + 1) * n, j * n:(j + 1) * n] = block
            cxx[j * n:(j + 1) * n, k * n:(k + 1) * n] = block.T
            prop = mat @ prop
    mx = np.concatenate(mx)
    rows, yv, rblocks, when = [], [], [], []
    for k in range(t1):
        if not data.observed.values[k]:
            continue
        y = data.y.values[k]
        obs = np.flatnonzero(np.isfinite(y))
        for i in obs:
            row = np.zeros(t1 * n)
            row[k * n:(k + 1) * n] = p["H"][i]
            rows.append(row)
            yv.append(y[i])
            when.append(k)
        rblocks.append(p["R"][np.ix_(obs, obs)])
    g = np.array(rows)
    yv, when = np.array(yv), np.array(when)
    rbig = np.zeros((len(yv), len(yv)))
    at = 0
    for b in rblocks:
        rbig[at:at + len(b), at:at + len(b)] = b
        at += len(b)

    def condition(sel):
        gs = g[sel]
        cyy = gs @ cxx @ gs.T + rbig[np.ix_(sel, sel)]
        cxy = cxx @ gs.T
        mean = mx + cxy @ np.linalg.solve(cyy, yv[sel] - gs @ mx)
        cov = cxx - cxy @ np.linalg.solve(cyy, cxy.T)
        return mean, cov, gs @ mx, cyy

    mean, cov, my, cyy = condition(np.ones(len(yv), bool))
    smoothed = [(mean[k * n:(k + 1) * n], cov[k * n:(k + 1) * n, k * n:(k + 1) * n]) for k in range(t1)]
    filtered = {}
    for k in np.flatnonzero(data.observed.values):
        sel = when <= k
        if not sel.any():
            continue
        mk, ck, _, _ = condition(sel)
        filtered[int(k)] = (mk[k * n:(k + 1) * n], ck[k * n:(k + 1) * n, k * n:(k + 1) * n])
    loglik = scipy.stats.multivariate_normal(my, cyy).logpdf(yv)
    return {"smoothed": smoothed, "filtered": filtered, "loglik": loglik}


# -- 1. filterpy ---------------------------------------------------------------------------------------

def test_kf_equals_filterpy(case):
    p, model, op, data = case
    ref = _filterpy(p, data)
    result = run(kalman_filter(), model, data, seed=0)
    post = daml.validate(result.analysis)
    mean, cov = _posterior_moments(post)
    steps = post.step.values
    assert list(steps) == list(np.flatnonzero(data.observed.values))
    for i, k in enumerate(steps):
        np.testing.assert_allclose(mean[i], ref[k][0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(cov[i], ref[k][1], rtol=0, atol=1e-10)
    direct = _forward(kalman_filter(), model, op, data)
    for k, (_, state, info) in direct.items():
        np.testing.assert_allclose(state.mean.numpy(), ref[k][0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(state.cov.numpy(), ref[k][1], rtol=0, atol=1e-10)
        assert int(info["nobs"]) == int(np.isfinite(data.y.values[k]).sum())
    np.testing.assert_allclose(post.loglik.values, [float(direct[k][2]["loglik"]) for k in steps], rtol=0,
                               atol=1e-12)
    assert make_filter("kf").name == "kf"


# -- 2. brute-force dense solve ------------------------------------------------------------------------

def test_kf_and_rts_equal_dense_joint_gaussian(case):
    p, model, op, data = case
    ref = _brute_force(p, data)
    direct = _forward(kalman_filter(), model, op, data)
    assert sorted(direct) == sorted(ref["filtered"]) or all(
        not np.isfinite(data.y.values[k]).any() for k in set(direct) ^ set(ref["filtered"]))
    for k, (mk, ck) in ref["filtered"].items():
        np.testing.assert_allclose(direct[k][1].mean.numpy(), mk, rtol=0, atol=1e-10)
        np.testing.assert_allclose(direct[k][1].cov.numpy(), ck, rtol=0, atol=1e-10)
    total = sum(float(v[2]["loglik"]) for v in direct.values())
    np.testing.assert_allclose(total, ref["loglik"], rtol=0, atol=1e-8)

    smooth = kalman_smoother(model, data)
    assert smooth["mean"].dims == ("time", "variable") and smooth["cov"].dims == ("time", "variable", "variable_")
    for k, (mk, ck) in enumerate(ref["smoothed"]):
        np.testing.assert_allclose(smooth["mean"].values[k], mk, rtol=0, atol=1e-10)
        np.testing.assert_allclose(smooth["cov"].values[k], ck, rtol=0, atol=1e-10)
    np.testing.assert_allclose(float(smooth.loglik), ref["loglik"], rtol=0, atol=1e-8)


# -- 3. filterpy's RTS smoother and the smoother's posterior -----------------------------------------

def test_rts_equals_filterpy_and_is_a_posterior():
    p = _problem(11)
    model, op, data = _twin(p, every=1)
    ref = _filterpy(p, data)
    xs = np.stack([ref[k][0] for k in range(STEPS + 1)])
    ps = np.stack([ref[k][1] for k in range(STEPS + 1)])
    xs_s, ps_s, _, _ = rts_smoother(xs, ps, [p["M"]] * (STEPS + 1), [p["Q"]] * (STEPS + 1))

    smooth = daml.validate(kalman_smoother(model, data))
    np.testing.assert_allclose(smooth["mean"].values, xs_s, rtol=0, atol=1e-10)
    np.testing.assert_allclose(smooth["cov"].values, ps_s, rtol=0, atol=1e-10)
    np.testing.assert_allclose(smooth["filtered_mean"].values, xs, rtol=0, atol=1e-10)
    np.testing.assert_allclose(smooth["filtered_cov"].values, ps, rtol=0, atol=1e-10)
    # the sigma-point members reproduce the exact smoothed moments
    mean, cov = _posterior_moments(smooth)
    np.testing.assert_allclose(mean, smooth["mean"].values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, smooth["cov"].values, rtol=0, atol=1e-12)
    assert smooth.attrs["method"] == "rts" and smooth.sizes["member"] == 2 * N_STATE
    assert smooth.loglik.dims == ()
    # the last smoothed state is the last filtered one
    np.testing.assert_array_equal(smooth["mean"].values[-1], smooth["filtered_mean"].values[-1])


# -- 4. EKF --------------------------------------------------------------------------------------------

def test_ekf_equals_kf_on_linear_problem(case):
    p, model, op, data = case
    kf = _forward(kalman_filter(), model, op, data)
    ekf = _forward(extended_kalman_filter(), model, op, data)
    assert sorted(kf) == sorted(ekf)
    for k in kf:
        for a, b in zip(kf[k][:2], ekf[k][:2]):
            np.testing.assert_allclose(b.mean.numpy(), a.mean.numpy(), rtol=0, atol=1e-12)
            np.testing.assert_allclose(b.cov.numpy(), a.cov.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(ekf[k][2]["loglik"].numpy(), kf[k][2]["loglik"].numpy(), rtol=0, atol=1e-12)


def test_ekf_with_library_linear_model_equals_kf():
    from daml.models import LinearModel

    p = _problem(3)
    model = LinearModel(p["M"], dt=1.0, noise_cov=p["Q"])
    op = observe_linear(p["H"], cov=p["R"])
    data = simulate(model, STEPS, op, every=2, x0=p["m0"], x0_cov=p["P0"], missing=0.2, seed=5)
    a = run(kalman_filter(), model, data, seed=0).analysis
    b = run(extended_kalman_filter(), model, data, seed=0).analysis
    np.testing.assert_allclose(b.x.values, a.x.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b.loglik.values, a.loglik.values, rtol=0, atol=1e-12)


def _h_nonlinear(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[..., 0] ** 2 / 10 + x[..., 0], x[..., 1] + x[..., 2], x[..., 3]], dim=-1)


def test_ekf_nonlinear_operator_matches_hand_update():
    p = _problem(5)
    model = TinyLinear(p["M"], p["Q"])
    op = observe_nonlinear(_h_nonlinear, N_STATE, N_OBS, cov=p["R"])
    data = simulate(model, STEPS, op, x0=p["m0"], x0_cov=p["P0"], seed=2)
    post = daml.validate(run(extended_kalman_filter(), model, data, operator=op, seed=0).analysis)
    assert np.isfinite(post.x.values).all() and post.sizes["time"] == STEPS

    # one EKF cycle by hand, in numpy
    mf = p["M"] @ p["m0"]
    pf = p["M"] @ p["P0"] @ p["M"].T + p["Q"]
    h = np.array([mf[0] ** 2 / 10 + mf[0], mf[1] + mf[2], mf[3]])
    jac = np.array([[mf[0] / 5 + 1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1.0]])
    s = jac @ pf @ jac.T + p["R"]
    gain = pf @ jac.T @ np.linalg.inv(s)
    ma = mf + gain @ (data.y.values[1] - h)
    pa = (np.eye(N_STATE) - gain @ jac) @ pf

    first = _forward(extended_kalman_filter(), model, op, data)[1][1]
    np.testing.assert_allclose(first.mean.numpy(), ma, rtol=0, atol=1e-12)
    np.testing.assert_allclose(first.cov.numpy(), pa, rtol=0, atol=1e-12)
    mean, _ = _posterior_moments(post.isel(time=0))
    np.testing.assert_allclose(mean, ma, rtol=0, atol=1e-12)


def test_ekf_nonlinear_model_forecast_uses_tangent_linear():
    rng = np.random.default_rng(4)
    mean, cov = rng.normal(size=N_STATE), _spd(rng, N_STATE, 0.5)
    filt = extended_kalman_filter()
    state = filt.init(TinyNonlinear(), torch.as_tensor(mean), torch.as_tensor(cov), None)
    fc = filt.forecast(state, TinyNonlinear(), None)
    jac = np.eye(N_STATE) + 0.1 * np.diag(np.cos(mean))
    np.testing.assert_allclose(fc.mean.numpy(), mean + 0.1 * np.sin(mean), rtol=0, atol=1e-14)
    np.testing.assert_allclose(fc.cov.numpy(), jac @ cov @ jac.T, rtol=0, atol=1e-13)


# -- 5. scalar random walk: analytic variances and Monte Carlo MSE --------------------------------------

def test_random_walk_variances_converge_to_riccati_fixed_point():
    """``M = 1, Q = 1, R = 2``: ``P_a -> 1`` and ``P_f -> 2`` (the Riccati map contracts by 1/4 a step)."""
    from daml.models import Identity

    model, op = Identity(1, noise_cov=1.0), observe_all(1, cov=2.0)
    filt = kalman_filter()
    state = filt.init(model, torch.zeros(1, dtype=torch.float64), torch.full((1, 1), 5.0, dtype=torch.float64), None)
    for _ in range(50):
        state = filt.forecast(state, model, None)
        pf = float(state.cov)
        state, _ = filt.analysis(state, torch.zeros(1, dtype=torch.float64), op, torch.ones(1, dtype=torch.bool), None)
    assert abs(pf - 2.0) < 1e-8 and abs(float(state.cov) - 1.0) < 1e-8


def test_random_walk_monte_carlo_mse():
    """Over E = 4000 experiments the time-averaged (steps 21-60) squared error of the analysis mean
    has expectation ``P_a = 1`` and that of the forecast mean ``P_f = 2`` (the filter starts from the
    truth's own prior, so its variances are the exact MSE). Each is checked within 4 standard errors
    of the mean over experiments, estimated from the per-experiment errors: a two-sided false-alarm
    rate of about 6e-5 per check under the normal approximation (and the seed is fixed)."""
    from daml.models import Identity

    model, op = Identity(1, noise_cov=1.0), observe_all(1, cov=2.0)
    data = simulate(model, 60, op, x0=[0.0], x0_cov=3.0, experiments=4000, seed=2026)
    result = run(kalman_filter(), model, data, seed=0, forecast=True)
    truth = data.truth.transpose("experiment", "time", "variable").values[..., 0]    # (E, T+1)
    for post, expected in ((result.analysis, 1.0), (result.forecast, 2.0)):
        daml.validate(post)
        mean, var = _posterior_moments(post.transpose("experiment", "time", "member", "variable"))
        steps = post.step.values
        late = steps > 20
        np.testing.assert_allclose(var[:, late, 0, 0], expected, rtol=0, atol=1e-10)
        err = ((mean[:, late, 0] - truth[:, steps[late]]) ** 2).mean(axis=1)       # per experiment
        se = err.std(ddof=1) / np.sqrt(err.size)
        assert abs(err.mean() - expected) < 4 * se, (err.mean(), expected, se)


# -- 6. missing entries ---------------------------------------------------------------------------------

def test_masked_entry_equals_restricted_operator():
    p = _problem(9)
    rng = np.random.default_rng(1)
    state = GaussianState(torch.as_tensor(rng.normal(size=N_STATE)), torch.as_tensor(p["P0"]))
    y = torch.as_tensor(rng.normal(size=N_OBS))
    mask = torch.tensor([True, False, True])
    keep = [0, 2]
    full = observe_linear(p["H"], cov=p["R"])
    sub = observe_linear(p["H"][keep], cov=p["R"][np.ix_(keep, keep)])
    for filt in (kalman_filter(), extended_kalman_filter()):
        a, info_a = filt.analysis(state, torch.where(mask, y, 0.0), full, mask, None)
        b, info_b = filt.analysis(state, y[keep], sub, torch.ones(2, dtype=torch.bool), None)
        np.testing.assert_allclose(a.mean.numpy(), b.mean.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(a.cov.numpy(), b.cov.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(float(info_a["loglik"]), float(info_b["loglik"]), rtol=0, atol=1e-12)
        assert int(info_a["nobs"]) == 2
        # the value under the mask has exactly no influence
        c, info_c = filt.analysis(state, torch.where(mask, y, 1e6), full, mask, None)
        assert torch.equal(c.mean, a.mean) and torch.equal(c.cov, a.cov)
        assert torch.equal(info_c["loglik"], info_a["loglik"])


def test_all_missing_leaves_state_unchanged():
    p = _problem(9)
    state = GaussianState(torch.as_tensor(p["m0"]), torch.as_tensor(p["P0"]))
    mask = torch.zeros(N_OBS, dtype=torch.bool)
    for filt in (kalman_filter(), extended_kalman_filter()):
        out, info = filt.analysis(state, torch.zeros(N_OBS, dtype=torch.float64),
                                  observe_linear(p["H"], cov=p["R"]), mask, None)
        np.testing.assert_allclose(out.mean.numpy(), p["m0"], rtol=0, atol=1e-15)
        np.testing.assert_allclose(out.cov.numpy(), p["P0"], rtol=0, atol=1e-15)
        assert float(info["loglik"]) == 0.0 and int(info["nobs"]) == 0


# -- 7. batches ----------------------------------------------------------------------------------------

def test_batch_equals_experiments_one_by_one():
    p = _problem(13)
    model, op, data = _twin(p, every=3, missing=0.3, experiments=5, seed=3)
    batched = run(kalman_filter(), model, data, seed=0).analysis
    smooth = kalman_smoother(model, data)
    assert batched.x.dims == ("time", "experiment", "member", "variable")
    assert smooth["mean"].dims == ("time", "experiment", "variable") and smooth.loglik.dims == ("experiment",)
    for i in range(5):
        one = data.isel(experiment=i)
        alone = run(kalman_filter(), model, one, seed=0).analysis
        np.testing.assert_allclose(batched.x.values[:, i], alone.x.values, rtol=0, atol=1e-12)
        np.testing.assert_allclose(batched.loglik.values[:, i], alone.loglik.values, rtol=0, atol=1e-12)
        s_alone = kalman_smoother(model, one)
        for key in ("mean", "cov", "filtered_mean", "filtered_cov"):
            np.testing.assert_allclose(smooth[key].values[:, i], s_alone[key].values, rtol=0, atol=1e-12)
        np.testing.assert_allclose(float(smooth.loglik[i]), float(s_alone["loglik"]), rtol=0, atol=1e-12)


# -- 8. bad input --------------------------------------------------------------------------------------

def test_kf_rejects_nonlinear_model_and_operator():
    p = _problem(2)
    model, op, data = _twin(p)
    with pytest.raises(InputError) as err:
        run(kalman_filter(), TinyNonlinear(), data, seed=0)
    assert err.value.argument == "model" and "ekf" in str(err.value)
    with pytest.raises(InputError) as err:
        kalman_smoother(TinyNonlinear(), data)
    assert err.value.argument == "model"
    nonlinear = observe_nonlinear(_h_nonlinear, N_STATE, N_OBS, cov=p["R"])
    with pytest.raises(InputError) as err:
        run(kalman_filter(), model, data, operator=nonlinear, seed=0)
    assert err.value.argument == "operator" and "ekf" in str(err.value)
    with pytest.raises(InputError) as err:
        kalman_smoother(model, data, operator=nonlinear)
    assert err.value.argument == "operator"
    with pytest.raises(InputError) as err:
        kalman_smoother(model, data.drop_vars("y"))
    assert err.value.argument == "data"


def test_non_positive_definite_innovation_covariance_is_divergence():
    p = _problem(2)
    state = GaussianState(torch.as_tensor(p["m0"]), torch.full((N_STATE, N_STATE), float("nan"), dtype=torch.float64))
    with pytest.raises(daml.errors.DivergenceError):
        kalman_filter().analysis(state, torch.zeros(N_OBS, dtype=torch.float64),
                                 observe_linear(p["H"], cov=p["R"]), torch.ones(N_OBS, dtype=torch.bool), None)
