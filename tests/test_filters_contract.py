"""The contract every registered filter must keep (ARCHITECTURE invariant 5)."""

import math

import numpy as np
import pytest
import torch
import xarray as xr

import daml
from daml import filters, models

N_STATE = 3

PARAMS = {
    "kf": {},
    "ekf": {},
    "enkf": {"members": 12},
    "etkf": {"members": 12},
    "letkf": {"members": 12, "radius": 2.0},
    "climatology": {"mean": np.zeros(N_STATE), "cov": np.eye(N_STATE), "members": 12},
    "bootstrap": {"members": 30, "jitter": 0.5},
    "optimal": {"members": 30},
    "auxiliary": {"members": 30},
    "iapf": {"members": 30},
    "dpf": {"members": 30},
    "ewpf": {"members": 12},
    "iewpf": {"members": 12, "keep": 0.8},
    "etpf": {"members": 12, "rejuvenation": 0.1},
    "letpf": {"members": 12, "radius": 2.0, "second_order": True},
    "diffusion": {"members": 12, "bandwidth": 0.3, "steps": 20},
    "ensf": {"members": 12, "steps": 20},
}
DETERMINISTIC = {"kf", "ekf", "etkf", "letkf", "climatology"}  # given the initial ensemble


def test_every_registered_filter_is_covered():
    assert set(filters.REGISTRY) == set(PARAMS), "add new filters to PARAMS"


@pytest.fixture(scope="module")
def problem():
    m = np.array([[0.9, 0.2, 0.0], [-0.2, 0.9, 0.1], [0.0, 0.1, 0.8]])
    model = models.LinearModel(m, noise_cov=0.1)
    obs = models.observe_all(N_STATE, sd=0.5)
    data = daml.simulate(model, 12, obs, every=2, x0=np.ones(N_STATE), x0_cov=1.0, missing=0.2,
                         experiments=2, seed=4)
    return model, obs, data


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_contract(name, problem):
    model, obs, data = problem
    filt = filters.make_filter(name, **PARAMS[name])
    assert isinstance(filt, filters.Filter) and filt.name == name
    res = filters.run(filt, model, data, seed=0, forecast=True, progress=False)
    for post in (res.analysis, res.forecast):
        daml.validate(post)
        assert post["x"].dims == ("time", "experiment", "member", "variable")
        assert post.sizes["time"] == int(data["observed"].sum())
        np.testing.assert_allclose(np.exp(post["log_weight"]).sum("member"), 1.0, atol=1e-12)
    assert res.analysis.attrs["method"] == name and res.seconds > 0
    again = filters.run(filt, model, data, seed=0, progress=False)
    xr.testing.assert_identical(res.analysis.drop_attrs(), again.analysis.drop_attrs())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_masked_entries_have_no_influence(name, problem):
    model, obs, _ = problem
    filt = filters.make_filter(name, **PARAMS[name])
    mean = torch.ones(2, N_STATE, dtype=torch.float64)
    state = filt.init(model, mean, torch.eye(N_STATE, dtype=torch.float64), daml._device.generator(1))
    y = torch.tensor([[0.3, -0.2, 0.9], [1.0, 0.5, -0.4]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    y_other = torch.where(mask, y, torch.full_like(y, 1e6))
    a, _ = filt.analysis(state, y, obs, mask, daml._device.generator(2))
    b, _ = filt.analysis(state, y_other, obs, mask, daml._device.generator(2))
    for ta, tb in zip(filt.members(a), filt.members(b)):
        assert torch.equal(ta, tb)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_batch_equals_each_experiment_alone(name, problem):
    model, obs, data = problem
    filt = filters.make_filter(name, **PARAMS[name])
    mean = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    cov = torch.eye(N_STATE, dtype=torch.float64)
    both = filt.init(model, mean, cov, daml._device.generator(3))
    y = torch.tensor([[0.3, -0.2, 0.9], [1.0, 0.5, -0.4]], dtype=torch.float64)
    mask = torch.ones(2, N_STATE, dtype=torch.bool)
    out, _ = filt.analysis(both, y, obs, mask, daml._device.generator(4))
    x_both, _ = filt.members(out)
    for i in range(2):
        one = type(both)(*(t[i:i + 1] for t in both))
        o1, _ = filt.analysis(one, y[i:i + 1], obs, mask[i:i + 1], daml._device.generator(4))
        torch.testing.assert_close(filt.members(o1)[0][0], x_both[i], rtol=0, atol=1e-12)


def test_inflation_wrapper_scales_anomalies_only(problem):
    model, obs, data = problem
    base = filters.etkf(members=12)
    wrapped = filters.inflate(base, 1.5)
    state = base.init(model, torch.zeros(1, N_STATE, dtype=torch.float64), torch.eye(N_STATE, dtype=torch.float64),
                      daml._device.generator(0))
    y = torch.zeros(1, N_STATE, dtype=torch.float64)
    mask = torch.ones(1, N_STATE, dtype=torch.bool)
    a, _ = base.analysis(state, y, obs, mask, daml._device.generator(1))
    b, _ = wrapped.analysis(state, y, obs, mask, daml._device.generator(1))
    ma, mb = a.x.mean(-2), b.x.mean(-2)
    torch.testing.assert_close(ma, mb, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.x - mb.unsqueeze(-2), 1.5 * (a.x - ma.unsqueeze(-2)), rtol=0, atol=1e-12)
    assert wrapped.config["inflation"] == 1.5
    with pytest.raises(daml.errors.InputError, match="inflation"):
        filters.inflate(base, -1.0)


def test_unknown_filter_and_bad_parameters():
    with pytest.raises(daml.errors.InputError, match="method: expected one of"):
        filters.make_filter("etfk")
    with pytest.raises(daml.errors.InputError, match="etkf parameters"):
        filters.make_filter("etkf", members=10, radius=3)


def test_divergence_is_reported_with_the_step_and_partial_result(problem):
    model, obs, data = problem
    with pytest.raises(daml.errors.DivergenceError) as info:
        filters.run(filters.etkf(members=12), model, data, seed=0, progress=False, max_spread=1e-6)
    assert info.value.step == int(data["step"].values[data["observed"].values][0])
    assert info.value.partial is None


def test_partial_result_of_a_divergence_mid_run_holds_the_analyses_before_it(problem):
    model, obs, data = problem
    base = filters.etkf(members=12)
    calls = {"n": 0}

    def analysis(state, y, op, mask, g):                   # the third analysis returns NaN members
        calls["n"] += 1
        state, info = base.analysis(state, y, op, mask, g)
        return (state._replace(x=state.x * math.nan) if calls["n"] == 3 else state), info

    broken = base._replace(analysis=analysis)
    full = filters.run(base, model, data, seed=0, forecast=True, progress=False)
    with pytest.raises(daml.errors.DivergenceError, match="non-finite") as info:
        filters.run(broken, model, data, seed=0, forecast=True, progress=False)
    part = info.value.partial
    assert info.value.step == int(full.analysis["step"].values[2])
    assert part.sizes["time"] == 2
    assert np.array_equal(part["x"].values, full.analysis["x"].values[:2])
    assert np.array_equal(part["log_weight"].values, full.analysis["log_weight"].values[:2])
    daml.validate(part)


def test_records_refuse_a_change_of_shape_or_more_analyses_than_announced():
    from daml.filters.run import _Records

    rec = _Records(2)
    x, lw = torch.zeros(3, 5, 2, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64)
    rec.append(x, lw)
    with pytest.raises(daml.errors.ShapeError, match="filt"):
        rec.append(torch.zeros(3, 6, 2, dtype=torch.float64), torch.zeros(3, 6, dtype=torch.float64))
    rec.append(x + 1.0, lw - 1.0)
    with pytest.raises(daml.errors.ShapeError, match="2 analyses"):
        rec.append(x, lw)
    xs, lws = rec.stacked()
    assert xs.shape == (2, 3, 5, 2) and torch.equal(xs[1], x + 1.0) and torch.equal(lws[0], lw)


def test_wrong_observation_size_raises(problem):
    model, _, data = problem
    with pytest.raises(daml.errors.ShapeError, match="operator"):
        filters.run(filters.etkf(members=12), model, data, operator=models.observe_all(4), progress=False)


def test_divergence_check_catches_non_finite_members_even_with_zero_weight():
    from daml.errors import DivergenceError
    from daml.filters.run import _check_divergence

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 4, generator=gen, dtype=torch.float64) * 3.0 + 100.0
    lw = torch.log_softmax(torch.randn(2, 50, generator=gen, dtype=torch.float64), -1)
    w = lw.exp().unsqueeze(-1)
    centred = ((w * (x - (w * x).sum(-2, keepdim=True)) ** 2).sum(-2).mean(-1)).sqrt().max()
    _check_divergence(x, lw, float(centred) * 1.0001, 7, "f")              # below the threshold: passes
    with pytest.raises(DivergenceError, match="spread") as info:
        _check_divergence(x, lw, float(centred) * 0.9999, 7, "f")
    assert info.value.step == 7
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[1, 3, 2] = bad
        lw0 = lw.clone()
        lw0[1] = torch.log_softmax(torch.where(torch.arange(50) == 3, -800.0, 0.0).double(), -1)   # exp(-800) = 0
        assert float(lw0[1, 3].exp()) == 0.0
        with pytest.raises(DivergenceError, match="non-finite"):
            _check_divergence(y, lw, 1e9, 0, "f")
        with pytest.raises(DivergenceError, match="non-finite"):
            _check_divergence(y, lw0, 1e9, 0, "f")
    lw_nan = lw.clone()
    lw_nan[0, 0] = math.nan
    with pytest.raises(DivergenceError, match="non-finite"):
        _check_divergence(x, lw_nan, 1e9, 0, "f")


# -- inference mode ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PARAMS))
def test_inference_mode_changes_nothing_but_the_mode(name, problem):
    # run() uses torch.inference_mode for filters that declare it; the results must be bit-identical
    # to the same filter under torch.no_grad, and only filters that never differentiate may declare it
    model, obs, data = problem
    filt = filters.make_filter(name, **PARAMS[name])
    assert filt.inference == (name not in {"ekf", "diffusion", "ensf", "dpf"})
    fast = filters.run(filt, model, data, seed=3, progress=False)
    plain = filters.run(filt._replace(inference=False), model, data, seed=3, progress=False)
    xr.testing.assert_identical(fast.analysis.drop_attrs(), plain.analysis.drop_attrs())


def test_a_filter_that_differentiates_keeps_autograd_in_the_loop(problem):
    # a hand-made filter (inference=False, the default) may use autograd in its analysis
    model, obs, data = problem
    base = filters.etkf(members=12)
    seen = []

    def analysis(state, y, operator, mask, g):
        with torch.enable_grad():                         # run() turns autograd off, as diffusion does here
            x = state.x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad((x * x).sum(), x)
        seen.append(bool(torch.equal(grad, 2 * state.x)))
        return base.analysis(state, y, operator, mask, g)

    filt = filters.Filter("grad", {}, base.init, base.forecast, analysis, base.members)
    assert filt.inference is False
    filters.run(filt, model, data, seed=0, progress=False)
    assert seen and all(seen)
    with pytest.raises(RuntimeError):                     # the same analysis under inference mode fails
        filters.run(filt._replace(inference=True), model, data, seed=0, progress=False)


def test_operator_cache_made_in_the_loop_works_with_autograd_afterwards(problem):
    # the observation operator caches which entries it picks on first use, which may be inside the
    # inference-mode loop; the cache must stay an ordinary tensor, usable with autograd later
    model, _, data = problem
    op = models.observe_indices(N_STATE, [2, 0], sd=0.5)          # irregular: an index tensor, not a slice
    sub = data.isel(obs=[2, 0]).drop_vars(["H", "R"])
    assert op._selection is None
    filters.run(filters.etkf(members=12), model, sub, operator=op, seed=0, progress=False)
    assert isinstance(op._selection[1], torch.Tensor) and not op._selection[1].is_inference()
    x = torch.randn(5, N_STATE, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(op.apply(x).sum(), x)
    assert grad[:, 1].eq(0).all() and grad[:, [0, 2]].eq(1).all()


# -- every registered filter x every model ------------------------------------------------------------

MATRIX_MODELS = {                                   # tiny states, a little model noise (particle filters need it)
    "lorenz63": lambda noise: models.Lorenz63(noise_cov=noise),
    "lorenz96": lambda noise: models.Lorenz96(n=5, noise_cov=noise),
    "kuramoto": lambda noise: models.Kuramoto(n=3, coupling=1.0, noise_cov=noise, seed=0),
    "linear_drag": lambda noise: models.LinearDrag(dims=1, noise_cov=noise),
    "identity": lambda noise: models.Identity(3, noise_cov=noise),
    # a learned Gaussian-mixture transition (issue 28), its initial spread the noise's standard deviation
    "mixture_transition": lambda noise: models.MixtureTransition(3, components=2, hidden=(8,), seed=0,
                                                                 init_scale=math.sqrt(noise or 1e-4)),
    # a true pendulum stepped by Stormer-Verlet (issue 30; tests/test_mechanics_filters.py: a learned one)
    "mechanical": lambda noise: models.Mechanical(models.Pendulum(), 0.05, substeps=2, noise_cov=noise),
}
MATRIX_PARAMS = {
    "kf": {}, "ekf": {}, "enkf": {"members": 6}, "etkf": {"members": 6}, "letkf": {"members": 6, "radius": 2.0},
    "climatology": {"members": 6}, "bootstrap": {"members": 10, "jitter": 0.5}, "optimal": {"members": 10},
    "auxiliary": {"members": 10}, "iapf": {"members": 10}, "dpf": {"members": 10}, "ewpf": {"members": 6}, "iewpf": {"members": 6, "keep": 0.8},
    "etpf": {"members": 6, "rejuvenation": 0.1}, "letpf": {"members": 6, "radius": 2.0, "second_order": True},
    "diffusion": {"members": 6, "bandwidth": 0.3, "steps": 10}, "ensf": {"members": 6, "steps": 10},
}
LINEAR_ONLY = {"kf"}                                # refuse a model without step_matrix, naming model
NEEDS_MODEL_NOISE = {"optimal", "auxiliary", "iapf", "ewpf", "iewpf"}   # refuse a perfect model, naming model_noise
GAUSSIAN_NOISE_ONLY = {"kf", "ekf", "optimal", "auxiliary", "ewpf", "iewpf"}  # refuse a non-Gaussian transition
NOT_GAUSSIAN = {"mixture_transition"}


def test_matrix_covers_every_filter_and_model():
    assert set(MATRIX_MODELS) == set(models.MODELS), "add new models to MATRIX_MODELS"
    assert set(MATRIX_PARAMS) == set(filters.REGISTRY), "add new filters to MATRIX_PARAMS"


@pytest.fixture(scope="module")
def matrix_data():
    out = {}
    for name, make in MATRIX_MODELS.items():
        model = make(0.01)
        n = model.state_size
        x0 = np.full(n, 8.0) + np.eye(n)[0] if name == "lorenz96" else (
            model.default_x0().numpy() if name == "lorenz63" else np.ones(n))
        data = daml.simulate(model, 4, models.observe_all(n, sd=0.5), every=2, x0=x0, x0_cov=0.5, missing=0.2,
                             experiments=2, seed=1)
        out[name] = (model, data)
    return out


def _matrix_filter(fname, n, **extra):
    params = dict(MATRIX_PARAMS[fname], **extra)
    if fname == "climatology":
        params.update(mean=np.zeros(n), cov=np.eye(n))
    return filters.make_filter(fname, **params)


@pytest.mark.parametrize("fname", sorted(MATRIX_PARAMS))
@pytest.mark.parametrize("mname", sorted(MATRIX_MODELS))
def test_every_filter_on_every_model(mname, fname, matrix_data):
    model, data = matrix_data[mname]
    filt = _matrix_filter(fname, model.state_size)
    if fname in GAUSSIAN_NOISE_ONLY and mname in NOT_GAUSSIAN:
        with pytest.raises(daml.errors.InputError, match="model: expected a model with additive Gaussian noise"):
            filters.run(filt, model, data, seed=0, progress=False)
        return
    if fname in LINEAR_ONLY and not hasattr(model, "step_matrix"):
        with pytest.raises(daml.errors.InputError, match="model: expected a linear model"):
            filters.run(filt, model, data, seed=0, progress=False)
        return
    res = filters.run(filt, model, data, seed=0, progress=False)
    post = daml.validate(res.analysis)
    assert post["x"].dims == ("time", "experiment", "member", "variable")
    assert post.sizes["time"] == int(data["observed"].values[1:].sum())
    assert np.isfinite(post["x"].values).all()
    np.testing.assert_allclose(np.exp(post["log_weight"]).sum("member"), 1.0, atol=1e-12)


@pytest.mark.parametrize("fname", sorted(NEEDS_MODEL_NOISE))
@pytest.mark.parametrize("mname", sorted(set(MATRIX_MODELS) - NOT_GAUSSIAN))
def test_filters_that_need_model_noise_refuse_a_perfect_model_or_take_it_as_a_parameter(mname, fname, matrix_data):
    _, data = matrix_data[mname]
    model = MATRIX_MODELS[mname](None)
    with pytest.raises(daml.errors.InputError, match="model_noise"):
        filters.run(_matrix_filter(fname, model.state_size), model, data, seed=0, progress=False)
    res = filters.run(_matrix_filter(fname, model.state_size, model_noise=0.01), model, data, seed=0, progress=False)
    assert np.isfinite(res.analysis["x"].values).all()


@pytest.mark.parametrize("fname", sorted(MATRIX_PARAMS))
@pytest.mark.parametrize("mname", ["lorenz63", "lorenz96"])
def test_every_filter_runs_in_float32(mname, fname, matrix_data):
    # the EKF's tangent-linear map came in the model's float64 and met a float32 covariance (a torch
    # RuntimeError); every filter must compute in the dtype the run asks for
    model, data = matrix_data[mname]
    filt = _matrix_filter(fname, model.state_size)
    if fname in LINEAR_ONLY:
        return
    res = filters.run(filt, model, data, seed=0, progress=False, dtype="float32")
    assert res.analysis["x"].dtype == np.float32
    assert np.isfinite(res.analysis["x"].values).all()
