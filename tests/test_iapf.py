"""The improved auxiliary particle filter (``iapf``, Elvira et al. 2019) against oracles: the Kalman
filter's evidence and posterior, exact properties of its first-stage weights, the multiple-importance-
sampling weights computed directly in numpy; and models with their own transition (``sample_step``,
``log_transition``): the filters that sample the model run them, the Gaussian-only ones refuse them."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import daml
from daml import filters, models
from daml._device import generator
from daml.filters.particle import apf_first_stage

M = np.array([[0.9, 0.2, 0.0], [-0.2, 0.9, 0.1], [0.0, 0.1, 0.8]])
Q = np.diag([0.3, 0.2, 0.4])


class OwnTransition:
    """The linear-Gaussian model ``x' = M x + N(0, Q)`` written as a model with its own transition
    (``sample_step``, ``log_transition``, no ``noise_cov``): a stand-in for a learned transition with
    a Kalman filter to check it against. ``log_transition`` broadcasts its leading dims."""

    name = "own_transition"

    def __init__(self, matrix=M, cov=Q):
        self.state_size = matrix.shape[0]
        self.dt = 1.0
        self.noise_cov = None
        self.matrix = torch.as_tensor(matrix, dtype=torch.float64)
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        self.root = torch.linalg.cholesky(self.cov)

    def step(self, x):
        return x @ self.matrix.to(x).T

    def sample_step(self, x, g):
        f = self.step(x)
        return f + torch.randn(f.shape, generator=g, dtype=f.dtype, device=f.device) @ self.root.to(f).T

    def log_transition(self, x_prev, x):
        d = x - self.step(x_prev)
        z = d @ torch.linalg.inv(self.root).to(d).T
        return (-0.5 * (z * z).sum(-1) - torch.log(torch.diagonal(self.root)).sum()
                - 0.5 * d.shape[-1] * math.log(2 * math.pi))

    def config(self):
        return {}


class SampleOnly(OwnTransition):
    """A transition that can be drawn but has no density."""
    log_transition = None


def _data(model, experiments, steps=12, seed=4):
    one = daml.simulate(model, steps, models.observe_all(3, sd=0.5), every=2, x0=np.ones(3), x0_cov=1.0,
                        missing=0.2, seed=seed)
    many = one.copy()
    many["y"] = one["y"].expand_dims(experiment=experiments).copy()
    return one, many


@pytest.fixture(scope="module")
def gaussian():
    model = models.LinearModel(M, noise_cov=Q)
    one, many = _data(model, 200)
    kf = filters.run(filters.make_filter("kf"), model, one, progress=False).analysis
    return model, one, many, kf


def _ratio(post, kf):
    return np.exp(post["loglik"].sum("time").values - float(kf["loglik"].sum()))


# -- the evidence and the posterior against the Kalman filter ------------------------------------------------

@pytest.mark.parametrize("name, own", [("iapf", False), ("iapf", True), ("bootstrap", True)])
def test_evidence_is_unbiased_for_the_kalman_likelihood(name, own, gaussian):
    # exp(log Z_hat) is unbiased for p(y_1:T): over 200 independent runs on the same data the mean
    # ratio Z_hat / Z must be within 4 standard errors of 1. own=True runs the same model written with
    # its own transition (sample_step / log_transition, no noise_cov): iapf's generic path, and the
    # bootstrap filter's draw of that transition (before, it stepped such a model without noise, and
    # its evidence was off by orders of magnitude).
    model, one, many, kf = gaussian
    members = 300 if name == "bootstrap" else 100
    post = filters.run(filters.make_filter(name, members=members), OwnTransition() if own else model, many, seed=11,
                       progress=False).analysis
    daml.validate(post)
    ratio = _ratio(post, kf)
    se = ratio.std(ddof=1) / math.sqrt(ratio.size)
    assert abs(ratio.mean() - 1.0) < 4 * se + 0.02, (ratio.mean(), se)
    assert abs(np.mean(np.log(ratio))) < 0.5


def test_filtered_mean_approaches_the_kalman_mean_with_its_own_transition(gaussian):
    # the generic path (pairwise log_transition): 8 times more particles must shrink the RMS distance to
    # the KF mean (in KF standard deviations) by at least 1.6 (expected sqrt(8) = 2.8), and to < 0.15
    model, one, many, kf = gaussian
    w = np.exp(kf["log_weight"])
    kf_mean, kf_var = kf["x"].weighted(w).mean("member"), kf["x"].weighted(w).var("member")
    data = many.isel(experiment=slice(0, 10))
    errors = []
    for n in (50, 400):
        post = filters.run(filters.iapf(members=n), OwnTransition(), data, seed=5, progress=False).analysis
        mean = post["x"].weighted(np.exp(post["log_weight"])).mean("member")
        errors.append(float(np.sqrt(((mean - kf_mean) ** 2 / kf_var).mean())))
    assert errors[1] < errors[0] / 1.6, errors
    assert errors[1] < 0.15, errors


def test_iapf_evidence_varies_less_than_the_classic_and_bootstrap_filters(gaussian):
    # what the improved first stage is for (Elvira et al. 2019): on this problem, at equal N and with
    # the same (multinomial) ancestor draw at every analysis, the spread of log Z_hat over 200 runs
    # is smallest for iapf, then the classic auxiliary PF, then the bootstrap PF (measured 0.72, 0.98
    # and 1.82, quoted in docs/particle_filters.md; the standard error of each standard deviation is
    # about 5%, the gaps are 25% and more)
    model, one, many, kf = gaussian
    sd = {}
    for name, extra in [("bootstrap", {"threshold": 1.0}), ("auxiliary", {}), ("iapf", {})]:
        filt = filters.make_filter(name, members=100, resampling="multinomial", **extra)
        post = filters.run(filt, model, many, seed=11, progress=False).analysis
        sd[name] = float(np.log(_ratio(post, kf)).std(ddof=1))
    assert sd["iapf"] < 0.9 * sd["auxiliary"] and sd["auxiliary"] < 0.9 * sd["bootstrap"], sd


# -- the weights: exact properties and a direct O(N^2) computation --------------------------------------------

def test_first_stage_is_uniform_without_observations_and_equal_weights():
    # lambda_i ~ p(y | mu_i) sum_j w_j f(mu_i | x_j) / sum_j f(mu_i | x_j): with w_j = 1/N and no
    # observed entry (p = 1) every lambda_i is 1/N whatever the kernels
    rng = np.random.default_rng(0)
    n = 7
    kern = torch.from_numpy(rng.normal(scale=5.0, size=(3, n, n)))
    lw = torch.full((3, n), -math.log(n), dtype=torch.float64)
    lam = apf_first_stage(torch.zeros(3, n, dtype=torch.float64), lw, kern)
    np.testing.assert_allclose(lam.numpy(), -math.log(n), rtol=0, atol=1e-12)
    # and through the filter: no entry observed leaves the weights equal and adds nothing to the evidence
    model = models.LinearModel(M, noise_cov=Q)
    filt = filters.iapf(members=n)
    state = filt.init(model, torch.zeros(2, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), generator(0))
    y, mask = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.bool)
    out, info = filt.analysis(state, y, models.observe_all(3, sd=0.5), mask, generator(1))
    np.testing.assert_allclose(out.log_weight.numpy(), -math.log(n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(info["loglik"].numpy(), 0.0, atol=1e-12)


def test_first_stage_without_overlap_is_the_weight_times_the_point_likelihood():
    # kernels that do not overlap (f(mu_i | x_j) = 0 for i != j): the ratio is w_i, so
    # lambda_i ~ w_i p(y | mu_i), the point-likelihood APF
    rng = np.random.default_rng(1)
    n = 6
    kern = torch.full((n, n), -math.inf, dtype=torch.float64)
    kern.diagonal().copy_(torch.from_numpy(rng.normal(size=n)))
    lw = torch.log_softmax(torch.from_numpy(rng.normal(size=n)), -1)
    ll = torch.from_numpy(rng.normal(size=n))
    np.testing.assert_allclose(apf_first_stage(ll, lw, kern).numpy(), (ll + lw).numpy(), rtol=0, atol=1e-12)


def _direct_weights(prev_f, lw, x, y, h, r, q, mask):
    """The iapf weights in numpy, O(N^2) loops: first stage at mu = prev_f (the model step of the
    previous particles), second stage at the drawn x; returns (log lambda, log w, loglik) normalised."""
    n = len(lw)
    w = np.exp(lw)
    obs = np.flatnonzero(mask)

    def lik(v):
        return stats.multivariate_normal(h[obs] @ v, r[np.ix_(obs, obs)]).pdf(y[obs]) if obs.size else 1.0

    def f(v, j):
        return stats.multivariate_normal(prev_f[j], q).pdf(v)

    lam = np.array([lik(prev_f[i]) * sum(w[j] * f(prev_f[i], j) for j in range(n))
                    / sum(f(prev_f[i], j) for j in range(n)) for i in range(n)])
    lam /= lam.sum()
    raw = np.array([lik(x[i]) * sum(w[j] * f(x[i], j) for j in range(n))
                    / sum(lam[j] * f(x[i], j) for j in range(n)) for i in range(n)])
    return np.log(lam), np.log(raw / raw.sum()), np.log(raw.mean())


@pytest.mark.parametrize("own", [False, True])
def test_weights_are_the_mis_ratio(own):
    rng = np.random.default_rng(2)
    n, members = 3, 5
    model = OwnTransition() if own else models.LinearModel(M, noise_cov=Q)
    op = models.observe_all(3, sd=0.7)
    filt = filters.iapf(members=members)
    state = filt.init(model, torch.zeros(2, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), generator(0))
    lw0 = torch.log_softmax(torch.from_numpy(rng.normal(size=(2, members))), -1)
    state = state._replace(log_weight=lw0)
    upcoming = filters.Upcoming(None, None, op, 1, 1)
    pending = filt.forecast(state, model, generator(1), upcoming)
    np.testing.assert_allclose(pending.x.numpy(), (state.x @ torch.from_numpy(M).T).numpy(), rtol=1e-14)
    y = torch.from_numpy(rng.normal(size=(2, 3)))
    mask = torch.tensor([[True, False, True], [True, True, True]])
    out, info = filt.analysis(pending, y, op, mask, generator(2))
    for b in range(2):
        _, lw, loglik = _direct_weights(pending.x[b].numpy(), lw0[b].numpy(), out.x[b].numpy(), y[b].numpy(),
                                        np.eye(3), 0.49 * np.eye(3), Q, mask[b].numpy())
        np.testing.assert_allclose(out.log_weight[b].numpy(), lw, rtol=0, atol=1e-10)
        np.testing.assert_allclose(float(info["loglik"][b]), loglik, rtol=0, atol=1e-10)
    assert torch.equal(info["resampled"], torch.ones(2, dtype=torch.float64))
    np.testing.assert_allclose(info["ess"].numpy(), 1.0 / np.exp(2 * out.log_weight.numpy()).sum(-1), rtol=1e-12)


def test_generic_path_equals_the_gaussian_path_on_the_same_model():
    # a Gaussian model written with its own transition draws the same numbers from the same stream
    # (same ancestors, same noise): the pairwise log_transition and the whitened kernel agree
    data = _data(models.LinearModel(M, noise_cov=Q), 3)[1]
    a = filters.run(filters.iapf(members=20), models.LinearModel(M, noise_cov=Q), data, seed=3, progress=False).analysis
    b = filters.run(filters.iapf(members=20), OwnTransition(), data, seed=3, progress=False).analysis
    np.testing.assert_allclose(a["x"].values, b["x"].values, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a["log_weight"].values, b["log_weight"].values, rtol=0, atol=1e-8)
    np.testing.assert_allclose(a["loglik"].values, b["loglik"].values, rtol=0, atol=1e-8)


# -- the names, the removed keyword, the refusals -----------------------------------------------------------

def test_auxiliary_is_the_classic_filter_and_improved_points_to_iapf():
    with pytest.raises(daml.errors.InputError, match="improved.*iapf"):
        filters.auxiliary(members=5, improved=True)
    with pytest.raises(daml.errors.InputError, match="iapf"):
        filters.make_filter("auxiliary", members=5, improved=False)
    assert "improved" not in filters.auxiliary(members=5).config
    assert filters.make_filter("iapf", members=5).config == {"members": 5, "resampling": "multinomial",
                                                             "model_noise": "model"}


@pytest.mark.parametrize("call, argument", [
    (lambda: filters.iapf(members=1), "members"),
    (lambda: filters.iapf(members=5, resampling="bogus"), "resampling"),
    (lambda: filters.iapf(members=5, model_noise=-1.0), "model_noise"),
])
def test_iapf_bad_parameters_raise_named_errors(call, argument):
    with pytest.raises(daml.errors.InputError, match=argument):
        call()


def _init(filt, model):
    return filt.init(model, torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), generator(0))


def test_iapf_needs_a_transition_density():
    with pytest.raises(daml.errors.InputError, match="model.*log_transition"):
        _init(filters.iapf(members=5), SampleOnly())
    with pytest.raises(daml.errors.InputError, match="model_noise"):
        _init(filters.iapf(members=5), models.LinearModel(M))
    # model_noise replaces the model's transition by N(step(x), Q): then no density of its own is needed
    _init(filters.iapf(members=5, model_noise=0.1), SampleOnly())


@pytest.mark.parametrize("name, params", [("optimal", {"members": 5}), ("auxiliary", {"members": 5}),
                                          ("ewpf", {"members": 5}), ("iewpf", {"members": 5}), ("kf", {}),
                                          ("ekf", {})])
def test_gaussian_only_filters_refuse_a_model_with_its_own_transition(name, params):
    with pytest.raises(daml.errors.InputError, match="model: expected a model with additive Gaussian noise"):
        _init(filters.make_filter(name, **params), OwnTransition())


@pytest.mark.parametrize("name, params", [("bootstrap", {"members": 4000}), ("etpf", {"members": 4000}),
                                          ("letpf", {"members": 4000, "radius": 2.0})])
def test_sampling_filters_draw_the_models_own_transition(name, params):
    # every member starts at the same point: one forecast step must spread them with the transition's
    # covariance Q (sample covariance of 4000 draws: relative standard error about 2%, allowed 10%);
    # a model with sample_step but no noise_cov used to be stepped without noise (zero spread)
    filt = filters.make_filter(name, **params)
    model = OwnTransition()
    state = filt.init(model, torch.ones(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64), generator(0))
    out = filt.forecast(state, model, generator(1))
    np.testing.assert_allclose(out.x.mean(0).numpy(), M @ np.ones(3), atol=0.05)
    np.testing.assert_allclose(np.cov(out.x.numpy().T), Q, rtol=0, atol=0.1 * Q.max())


def test_mixture_transition_runs_through_iapf_and_bootstrap():
    mixture = pytest.importorskip("daml.models.mixture")
    model = mixture.MixtureTransition(3, components=2, hidden=(8,), seed=0, dtype=torch.float64)
    data = _data(models.LinearModel(M, noise_cov=Q), 2, steps=4)[1]
    for name in ("iapf", "bootstrap"):
        post = filters.run(filters.make_filter(name, members=20), model, data, seed=0, progress=False).analysis
        daml.validate(post)
        assert np.isfinite(post["loglik"].values).all()
    with pytest.raises(daml.errors.InputError, match="model"):
        _init(filters.auxiliary(members=5), model)
