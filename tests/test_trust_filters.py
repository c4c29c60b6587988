"""Regression tests of issue 26 for models, filters and twin experiments: every result is right, or
daml refuses loudly (each test failed before its fix)."""

import math

import numpy as np
import pytest
import torch

import daml
from daml import filters, models
from daml.errors import DivergenceError, DtypeError, InputError, NonFiniteError, ShapeError


def _l96_data(n=8, steps=6, every=2, seed=1, **kw):
    model = models.Lorenz96(n=n)
    x0 = np.full(n, 8.0)
    x0[0] += 1.0
    data = daml.simulate(model, steps, models.observe_all(n, sd=1.0), every=every, x0=x0, x0_cov=0.5,
                         seed=seed, **kw)
    return model, data


# -- 1. the EKF on Lorenz-96 (the tangent-linear map through the in-place RK4 fast path) -----------------

def test_ekf_runs_on_lorenz96():
    model, data = _l96_data()
    res = filters.run(filters.make_filter("ekf"), model, data, seed=0, progress=False)
    daml.validate(res.analysis)
    assert np.isfinite(res.analysis["x"].values).all()


def test_lorenz96_tangent_linear_matches_finite_differences_under_no_grad():
    # the EKF calls tangent_linear with autograd off (as run() does): the Jacobian must be the one of
    # the very step the fast path takes; central differences of that step are the oracle
    model = models.Lorenz96(n=6)
    gen = torch.Generator().manual_seed(0)
    x = 8.0 + 3.0 * torch.randn(2, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        jac = models.tangent_linear(model, x)
        h = 1e-6
        eye = torch.eye(6, dtype=torch.float64)
        fd = torch.stack([(model.step(x + h * eye[j]) - model.step(x - h * eye[j])) / (2 * h) for j in range(6)], -1)
    assert jac.shape == (2, 6, 6)
    torch.testing.assert_close(jac, fd, rtol=1e-7, atol=1e-7)


def test_fast_step_is_kept_outside_transforms_and_equals_the_plain_one():
    # the in-place fast path stays the normal no-grad path (speed), bit-identical to rk4_step
    model = models.Lorenz96(n=10)
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 8.0
    with torch.no_grad():
        fast = model.step(x)
    plain = models.rk4_step(model.tendency, x, model.dt)
    assert torch.equal(fast, plain)
    batched = torch.func.vmap(model.step)(x)                           # vmap takes the functional path
    torch.testing.assert_close(batched, plain, rtol=0, atol=1e-12)


# -- 2. divergence detection ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, 0.0, -1.0, "big", True])
@pytest.mark.parametrize("name", ["max_spread", "max_magnitude"])
def test_divergence_bounds_refuse_nan_and_non_positive(bad, name):
    model, data = _l96_data()
    with pytest.raises(InputError, match=name):
        filters.run(filters.etkf(members=6), model, data, seed=0, progress=False, **{name: bad})


def _blow_up_after(base, call, factor=0.0, shift=0.0):
    calls = {"n": 0}

    def analysis(state, y, op, mask, g):
        calls["n"] += 1
        state, info = base.analysis(state, y, op, mask, g)
        if calls["n"] >= call:
            state = state._replace(x=state.x * (1.0 + factor) + shift)
        return state, info

    return base._replace(analysis=analysis)


def test_blow_up_to_huge_finite_members_with_small_spread_is_a_divergence():
    # members of size 1e19 whose spread stays that of a healthy ensemble: only a magnitude check sees it
    model, data = _l96_data(steps=8)
    base = filters.etkf(members=6)
    full = filters.run(base, model, data, seed=0, progress=False)
    broken = _blow_up_after(base, 3, shift=1e19)
    with pytest.raises(DivergenceError, match="max_magnitude") as info:
        filters.run(broken, model, data, seed=0, progress=False)
    assert info.value.step == int(full.analysis["step"].values[2])
    part = info.value.partial
    assert part.sizes["time"] == 2
    assert np.array_equal(part["x"].values, full.analysis["x"].values[:2])
    daml.validate(part)


def test_exploding_spread_of_an_unstable_forecast_model_is_a_divergence():
    # a realistic blow-up: the forecast model amplifies an unobserved variable tenfold per step, so its
    # spread grows to 1e19 and beyond while staying finite; the default bound (relative to the prior
    # and observation scales) stops the run at the first analysis beyond it and keeps what came before
    truth_model = models.Identity(3, noise_cov=0.01)
    obs = models.observe_indices(3, [0, 2], sd=0.5)
    data = daml.simulate(truth_model, 40, obs, every=1, x0=np.zeros(3), x0_cov=1.0, seed=2)
    unstable = models.LinearModel(np.diag([1.0, 10.0, 1.0]), noise_cov=0.01)
    with pytest.raises(DivergenceError) as info:
        filters.run(filters.etkf(members=8), unstable, data, seed=0, progress=False)
    # spread of variable 1 ~ 10^k: beyond 1000 x (scale ~ 1) within a few steps, long before 1e19
    assert 2 <= info.value.step <= 6
    part = info.value.partial
    assert part is not None and part.sizes["time"] == info.value.step - 1
    assert float(np.abs(part["x"].values).max()) < 1e6
    with pytest.raises(DivergenceError, match="max_magnitude"):          # spread check off: magnitude catches it
        filters.run(filters.etkf(members=8), unstable, data, seed=0, progress=False, max_spread=math.inf)
    # both checks off on purpose: the run goes through (members of size ~1e40, finite)
    res = filters.run(filters.etkf(members=8), unstable, data, seed=0, progress=False, max_spread=math.inf,
                      max_magnitude=math.inf)
    assert float(np.abs(res.analysis["x"].values).max()) > 1e19


def test_default_bounds_are_relative_to_the_prior_and_observation_scales():
    from daml.filters.run import DIVERGENCE_FACTOR, divergence_bounds, prepare_data

    model = models.Identity(2, noise_cov=0.0)
    obs = models.observe_all(2, sd=0.1)
    data = daml.simulate(model, 4, obs, x0=np.array([50.0, -3.0]), x0_cov=np.diag([4.0, 1.0]), seed=0)
    p = prepare_data(model, data, None, None)
    spread, magnitude = divergence_bounds(p)
    y = data["y"].values[np.isfinite(data["y"].values)]
    scale = max(2.0, 0.1, float(y.std()))
    assert spread == pytest.approx(DIVERGENCE_FACTOR * scale)
    assert magnitude == pytest.approx(DIVERGENCE_FACTOR * (scale + 50.0 + float(np.abs(y).max())))


# -- 3. bad input ----------------------------------------------------------------------------------------

def test_non_psd_or_malformed_prior_covariance_is_refused():
    model, data = _l96_data()
    m = data["prior_mean"].values
    bad_covs = {
        "negative eigenvalue": -np.eye(8),
        "indefinite": np.diag([1.0] * 7 + [-0.5]),
        "asymmetric": np.eye(8) + np.triu(np.ones((8, 8)), 1),
        "wrong shape": np.eye(7),
        "NaN": np.full((8, 8), np.nan),
        "string": "eye",
    }
    for what, cov in bad_covs.items():
        with pytest.raises(InputError, match="prior") as info:
            filters.run(filters.etkf(members=6), model, data, prior=(m, cov), seed=0, progress=False)
        assert info.value.argument.startswith("prior"), what
    with pytest.raises(NonFiniteError, match="prior"):
        filters.run(filters.etkf(members=6), model, data, prior=(np.full(8, np.inf), np.eye(8)), progress=False)
    with pytest.raises(InputError, match="prior"):
        filters.run(filters.etkf(members=6), model, data, prior=np.eye(8), progress=False)


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_infinite_observation_is_refused_not_treated_as_missing(value):
    model, data = _l96_data()
    bad = data.copy(deep=True)
    k = int(np.flatnonzero(bad["observed"].values)[0])
    bad["y"].values[k, 3] = value
    with pytest.raises(NonFiniteError, match="data") as info:
        filters.run(filters.etkf(members=6), model, bad, seed=0, progress=False)
    assert "infinite" in str(info.value)
    with pytest.raises(NonFiniteError, match="data"):
        filters.kalman_smoother(models.Identity(8, noise_cov=0.1), bad)
    nan = data.copy(deep=True)                                            # NaN still means missing
    nan["y"].values[k, 3] = np.nan
    filters.run(filters.etkf(members=6), model, nan, seed=0, progress=False)


def test_simulate_outputs_are_finite_where_observed():
    model, data = _l96_data(missing=0.3)
    y = data["y"].values
    assert not np.isinf(y).any()
    assert np.isfinite(y[data["observed"].values]).any()


@pytest.mark.parametrize("indices", [[0, 1.5], [0.0, 2.0], [True, 2], np.array([0.0, 1.0]), "01", None, [0, 8],
                                     [-1, 2], [[0, 1]]])
def test_observe_indices_refuses_non_integer_or_out_of_range_indices(indices):
    with pytest.raises(InputError, match="indices"):
        models.observe_indices(8, indices)


def test_observe_indices_accepts_integer_arrays_and_repeats():
    op = models.observe_indices(8, np.array([1, 5, 5]))
    x = torch.arange(8, dtype=torch.float64)
    assert op.apply(x).tolist() == [1.0, 5.0, 5.0]
    op = models.observe_indices(8, torch.tensor([7, 0]))
    assert op.apply(x).tolist() == [7.0, 0.0]


def test_observation_constructors_refuse_bad_sizes_and_offsets():
    for call in (lambda: models.observe_all("8"), lambda: models.observe_all(2.0), lambda: models.observe_all(None),
                 lambda: models.observe_every(8, 2, offset=True), lambda: models.observe_every(8, 2, offset=8),
                 lambda: models.observe_indices(0, [0])):
        with pytest.raises(InputError):
            call()


@pytest.mark.parametrize("cov", [-1.0, 0.0, np.diag([1.0, -1.0]), np.array([[1.0, 2.0], [2.0, 1.0]]),
                                 np.array([[1.0, 0.5], [0.0, 1.0]]), np.full((2, 2), np.nan)])
def test_observation_operators_refuse_non_pd_noise_covariance(cov):
    with pytest.raises(InputError, match="cov"):
        models.observe_all(2, cov=cov)
    r = torch.as_tensor(np.eye(2) * cov if np.ndim(cov) == 0 else cov, dtype=torch.float64)
    with pytest.raises(InputError, match="noise_cov"):
        models.Observation(2, r, matrix=torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("r", [np.diag([1.0, -1.0]), np.diag([1.0, 0.0]), np.array([[1.0, 2.0], [2.0, 1.0]]),
                               np.full((2, 2), np.nan)])
def test_gaussian_loglik_refuses_non_pd_noise_covariance(r):
    d = torch.zeros(1, 3, 2, dtype=torch.float64)
    r = torch.as_tensor(r, dtype=torch.float64)
    with pytest.raises(InputError, match="noise_cov"):                     # everything observed (fast path)
        filters.gaussian_loglik(d, r, torch.tensor([[True, True]]))
    big = torch.eye(3, dtype=torch.float64)                                # the same block, a third entry masked
    big[:2, :2] = r
    with pytest.raises(InputError, match="noise_cov"):                     # (the general path)
        filters.gaussian_loglik(torch.zeros(1, 3, 3, dtype=torch.float64), big, torch.tensor([[True, True, False]]))


def test_gaussian_loglik_of_the_observed_block_only():
    # the unobserved entry's (non-PD) part of R does not enter: the density of the observed entry alone
    d = torch.tensor([[[0.7, 3.0]]], dtype=torch.float64)
    r = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    out = filters.gaussian_loglik(d, r, torch.tensor([[True, False]]))
    expected = -0.5 * 0.7**2 / 2.0 - 0.5 * math.log(2 * math.pi * 2.0)
    assert float(out) == pytest.approx(expected, rel=1e-12)


def test_propagate_refuses_wrong_state_length_and_negative_steps():
    model = models.Lorenz96(n=8)
    x = torch.ones(8, dtype=torch.float64)
    with pytest.raises(ShapeError, match="x"):
        models.propagate(model, torch.ones(7, dtype=torch.float64))
    for steps in (-1, 1.5, "2", None, True):
        with pytest.raises(InputError, match="steps"):
            models.propagate(model, x, steps=steps)
    with pytest.raises(InputError, match="model"):
        models.propagate("lorenz96", x)
    assert torch.equal(models.propagate(model, x, steps=0), x)
    out = models.propagate(model, np.ones(8), steps=2)                   # arrays are accepted
    assert torch.equal(out, models.propagate(model, x, steps=2))


@pytest.mark.parametrize("make", [
    lambda: models.LinearDrag(tau=-1.0), lambda: models.LinearDrag(tau=0.0), lambda: models.LinearDrag(drag=-0.1),
    lambda: models.LinearDrag(tau="1"), lambda: models.LinearDrag(dims=0), lambda: models.LinearDrag(dt=-0.1),
    lambda: models.Lorenz96(n=3), lambda: models.Lorenz96(n=8.0), lambda: models.Lorenz96(forcing=math.inf),
    lambda: models.Lorenz96(forcing=None), lambda: models.Lorenz96(dt=0.0), lambda: models.Lorenz96(dt=math.nan),
    lambda: models.Lorenz96(noise_cov=-1.0), lambda: models.Lorenz96(n=4, noise_cov="x"),
    lambda: models.Lorenz63(sigma="10"), lambda: models.Lorenz63(rho=math.nan), lambda: models.Lorenz63(dt=None),
    lambda: models.Kuramoto(n=1, coupling=1.0), lambda: models.Kuramoto(n=3, coupling=None),
    lambda: models.Kuramoto(n=3, coupling=1.0, omega=[1.0, math.inf, 0.0]),
    lambda: models.Identity(0), lambda: models.Identity("3"), lambda: models.Identity(3, noise_cov=np.diag([1, -1, 1])),
    lambda: models.LinearModel([[1.0, 0.0]]), lambda: models.LinearModel("eye"), lambda: models.LinearModel(None),
    lambda: models.LinearModel(np.eye(2), continuous="yes"),
])
def test_model_constructors_refuse_bad_parameters(make):
    with pytest.raises(InputError):
        make()


def test_simulate_refuses_every_beyond_steps_and_bad_sizes():
    model = models.Identity(2, noise_cov=0.1)
    obs = models.observe_all(2)
    with pytest.raises(InputError, match="every"):
        daml.simulate(model, 5, obs, every=6, seed=0)
    with pytest.raises(InputError, match="experiments"):
        daml.simulate(model, 5, obs, experiments=1e9, seed=0)
    with pytest.raises(InputError, match="experiments") as info:      # refused up front, with the bytes
        daml.simulate(model, 5, obs, experiments=10**15, seed=0)
    assert "GiB" in str(info.value)
    with pytest.raises(InputError, match="steps"):
        daml.simulate(model, 10**15, obs, seed=0)
    with pytest.raises(InputError, match="at"):
        daml.simulate(model, 5, obs, every=None, at=[1.5, 3], seed=0)
    for kwargs in ({"missing": "0.1"}, {"missing": True}, {"x0": "zero"}, {"x0": [np.inf, 0.0]}, {"x0_cov": None},
                   {"every": "2"}, {"experiments": "3"}):
        with pytest.raises(InputError):
            daml.simulate(model, 5, obs, seed=0, **kwargs)
    for args in ((None, 5, obs), ("identity", 5, obs), (model, "5", obs), (model, 5, None), (model, None, obs)):
        with pytest.raises(InputError):
            daml.simulate(*args, seed=0)
    data = daml.simulate(model, 5, obs, every=5, seed=0)                    # every == steps: one time
    assert int(data["observed"].sum()) == 1


def test_climatology_from_truth_needs_two_finite_states():
    with pytest.raises(ShapeError, match="truth"):
        filters.climatology_from_truth(np.ones((1, 3)))
    with pytest.raises(ShapeError, match="truth"):
        filters.climatology_from_truth(np.ones(3))
    with pytest.raises(NonFiniteError, match="truth"):
        filters.climatology_from_truth(np.array([[1.0, np.nan], [0.0, 1.0]]))
    x = np.random.default_rng(0).normal(size=(2, 50, 3))
    mean, cov = filters.climatology_from_truth(x)
    np.testing.assert_allclose(mean.numpy(), x.reshape(-1, 3).mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.reshape(-1, 3).T), rtol=1e-12)


@pytest.mark.parametrize("name", ["enkf", "etkf", "letkf", "climatology"])
@pytest.mark.parametrize("members", [1, 0, -3, 2.5, 1e9, "10", None, True, 2**40])
def test_ensemble_sizes_are_checked(name, members):
    extra = {"letkf": {"radius": 2.0}, "climatology": {"mean": np.zeros(2), "cov": np.eye(2)}}.get(name, {})
    with pytest.raises(InputError, match="members"):
        filters.make_filter(name, members=members, **extra)


def test_an_ensemble_that_cannot_fit_in_memory_is_refused_before_it_is_drawn():
    model, data = _l96_data()
    filt = filters.etkf(members=2**31 - 1)            # a valid size, far beyond memory with 8 variables
    with pytest.raises(InputError, match="members") as info:
        filters.run(filt, model, data, seed=0, progress=False)
    assert "GiB" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"forecast": "yes"}, {"progress": "no"}, {"prior": "none"}, {"operator": 3}])
def test_run_refuses_wrong_types(kwargs):
    model, data = _l96_data()
    with pytest.raises(InputError):
        filters.run(filters.etkf(members=6), model, data, **kwargs)


def test_run_refuses_non_numeric_observations():
    model, data = _l96_data()
    bad = data.copy()
    bad["y"] = bad["y"].astype(str)
    with pytest.raises(DtypeError, match="data"):
        filters.run(filters.etkf(members=6), model, bad, progress=False)


@pytest.mark.parametrize("make", [
    lambda: models.observe_all(10**12), lambda: models.observe_every(10**12, 2),
    lambda: models.observe_indices(10**12, [0, 1]), lambda: models.observe_nonlinear(lambda x: x, 10**12, 2),
    lambda: models.Kuramoto(n=10**13, coupling=1.0), lambda: models.LinearDrag(dims=10**12),
    lambda: models.Identity(10**12), lambda: models.Lorenz96(n=10**12, noise_cov=1.0),
])
def test_sizes_that_cannot_fit_are_refused_before_allocating(make):
    with pytest.raises(InputError, match="GiB"):
        make()


@pytest.mark.parametrize("name", ["etkf", "bootstrap", "ekf"])
def test_blow_up_between_observations_is_a_divergence_not_bad_input(name):
    """A model that overflows between two observation times, inside run's loop, is the filter's
    divergence (DivergenceError with the step and the partial posterior), not an input error of the
    model step (the public propagate/tangent_linear refuse non-finite states; run's loop must not)."""
    model = models.LinearModel(1e120 * np.eye(2))
    obs = models.observe_all(2, sd=1.0)
    data = daml.simulate(models.LinearModel(0.5 * np.eye(2)), 10, obs, every=5, x0=np.ones(2), x0_cov=0.1, seed=0)
    params = {"etkf": {"members": 8}, "bootstrap": {"members": 16}, "ekf": {}}[name]
    with pytest.raises(daml.errors.DivergenceError) as info:
        filters.run(filters.make_filter(name, **params), model, data, seed=1, progress=False)
    assert info.value.step is not None
