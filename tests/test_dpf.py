"""The differentiable particle filter against oracles: bit-for-bit equality with the bootstrap filter,
the Kalman filter's exact evidence (unbiasedness of exp(log p_hat)) and its exact score (autograd
through a small Kalman filter written here), and the filter contract."""

import math

import numpy as np
import pytest
import torch

import daml
from daml import filters, models
from daml.errors import DivergenceError, InputError, ShapeError
from daml.filters.dpf import DPFState, Evidence, dpf, log_evidence

M3 = np.array([[0.9, 0.2, 0.0], [-0.2, 0.9, 0.1], [0.0, 0.1, 0.8]])
A0 = torch.tensor([[0.8, 0.3], [-0.3, 0.7]], dtype=torch.float64)


def _twin(model, obs, steps, experiments=None, missing=0.2, seed=4):
    data = daml.simulate(model, steps, obs, every=1, x0=np.ones(model.state_size), x0_cov=1.0, missing=missing,
                         experiments=experiments, seed=seed)
    dims = [d for d in data["y"].dims if d not in ("time", "obs")]
    y = torch.as_tensor(data["y"].transpose(*dims, "time", "obs").values[..., 1:, :])
    return data, y


class GaussianProposal(torch.nn.Module):
    """A hand-made proposal for a linear-Gaussian model: ``N(f + c K d, s^2 P)`` with ``f = M x_prev``,
    ``K``, ``P`` the optimal proposal's gain and covariance and ``d = y - H f`` (masked); ``c`` and
    ``log s`` are learnable. ``c = s = 1`` is the optimal proposal; any ``c, s`` keeps the evidence
    estimate unbiased."""

    def __init__(self, q, h, r, shift=0.5, scale=1.3):
        super().__init__()
        self.q, self.h, self.r = q, h, r
        self.shift = torch.nn.Parameter(torch.tensor(shift, dtype=torch.float64))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float64))

    def sample(self, x_prev, y, mask, generator, *, model, operator):
        f = model.step(x_prev)
        h = self.h * mask.unsqueeze(-1).to(f)                            # unobserved rows: no information
        eye = torch.eye(self.r.shape[0], dtype=f.dtype)
        r = torch.where(mask.unsqueeze(-1) & mask.unsqueeze(-2), self.r, eye)
        s = h @ self.q @ h.transpose(-1, -2) + r
        gain = self.q @ h.transpose(-1, -2) @ torch.linalg.inv(s)        # (*batch, n, m)
        p = self.q - gain @ h @ self.q
        d = torch.where(mask.unsqueeze(-2), y.unsqueeze(-2) - f @ self.h.T, torch.zeros((), dtype=f.dtype))
        mean = f + self.shift * (d @ gain.transpose(-1, -2))
        chol = torch.linalg.cholesky(0.5 * (p + p.transpose(-1, -2))) * torch.exp(self.log_scale)
        z = torch.randn(f.shape, generator=generator, dtype=f.dtype)
        x = mean + (chol.unsqueeze(-3) @ z.unsqueeze(-1)).squeeze(-1)
        log_q = torch.distributions.MultivariateNormal(mean, scale_tril=chol.unsqueeze(-3)).log_prob(x)
        return x, log_q


# -- bit for bit with the bootstrap filter ----------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_stop_gradient_dpf_is_the_bootstrap_filter_bit_for_bit(scheme):
    model = models.LinearModel(M3, noise_cov=0.3)
    obs = models.observe_all(3, sd=0.5)
    data, y = _twin(model, obs, 10, experiments=3)
    a = filters.run(filters.bootstrap(20, threshold=1.0, resampling=scheme), model, data, seed=3,
                    forecast=True, progress=False)
    b = filters.run(dpf(20, scheme=scheme), model, data, seed=3, forecast=True, progress=False)
    for key in ("x", "log_weight", "loglik", "ess", "resampled"):
        assert np.array_equal(a.analysis[key].values, b.analysis[key].values), key
    assert np.array_equal(a.forecast["x"].values, b.forecast["x"].values)
    # the differentiable loop repeats run's analyses value for value (same generator spawning)
    ev = log_evidence(dpf(20, scheme=scheme), model, y, operator=obs, mean=data["prior_mean"].values,
                      cov=data["prior_cov"].values, seed=3)
    assert np.array_equal(ev.increments.numpy(), a.analysis["loglik"].values.T)
    assert np.array_equal(ev.ess.numpy(), a.analysis["ess"].values.T)
    torch.testing.assert_close(ev.log_evidence, ev.increments.sum(-1), rtol=0, atol=0)
    assert ev.mean.shape == (3, 10, 3)


# -- unbiasedness of the evidence against the Kalman filter -----------------------------------------------

@pytest.fixture(scope="module")
def lg3():
    model = models.LinearModel(M3, noise_cov=0.3)
    obs = models.observe_all(3, sd=0.5)
    data, y = _twin(model, obs, 8)
    kf = filters.run(filters.make_filter("kf"), model, data, progress=False).analysis
    return model, obs, data, y, float(kf["loglik"].sum())


@pytest.mark.parametrize("resampler, with_proposal", [("stop_gradient", False), ("soft", False),
                                                      ("stop_gradient", True)])
def test_evidence_is_unbiased_for_the_kalman_likelihood(resampler, with_proposal, lg3):
    # exp(log p_hat) is unbiased for p(y_1:T) (soft resampling too: its weights' mass is carried): over
    # 1000 independent estimates on the same data the mean ratio p_hat / p_KF is within 3 standard errors
    # of 1 (the ratio's right tail makes the check conservative)
    model, obs, data, y, exact = lg3
    proposal = None
    if with_proposal:
        proposal = GaussianProposal(model.noise_cov, obs.matrix, obs.noise_cov)
    filt = dpf(100, proposal=proposal, resampler=resampler, threshold=0.6 if with_proposal else 1.0)
    with torch.no_grad():
        ev = log_evidence(filt, model, y.expand(1000, *y.shape), operator=obs, mean=data["prior_mean"].values,
                          cov=data["prior_cov"].values, seed=11)
    ratio = np.exp(ev.log_evidence.numpy() - exact)
    se = ratio.std(ddof=1) / math.sqrt(ratio.size)
    assert abs(ratio.mean() - 1.0) < 3 * se, (ratio.mean(), se)
    assert abs(np.mean(np.log(ratio))) < 0.6       # log p_hat's bias, about -Var/2, is small at this size


# -- the score against autograd through an exact Kalman filter ----------------------------------------------

class ThetaModel:
    """``x_k = theta A0 x_{k-1} + N(0, Q)``; ``theta`` broadcasts against the leading dims of ``x``
    (one value per sequence gives one gradient per sequence)."""

    state_size, dt = 2, 1.0

    def __init__(self, theta, q):
        self.theta, self.noise_cov = theta, q

    def step(self, x):
        return self.theta * (x @ A0.T)


def _kalman_loglik(theta, q, r, y, m0, p0):
    """``log p(y_1:T)`` of the model above observed fully with noise ``R``, differentiable in ``theta``."""
    mean, cov, total = m0, p0, 0.0
    for t in range(y.shape[0]):
        a = theta * A0
        mean, cov = a @ mean, a @ cov @ a.T + q
        s = cov + r
        total = total + torch.distributions.MultivariateNormal(mean, s).log_prob(y[t])
        gain = cov @ torch.linalg.inv(s)
        mean, cov = mean + gain @ (y[t] - mean), cov - gain @ cov
    return total


def test_stop_gradient_score_matches_the_kalman_score():
    # The stop-gradient DPF's gradient of p_hat is unbiased for the gradient of p (Scibior & Wood 2021):
    # E[p_hat grad log p_hat] / E[p_hat] = grad log p exactly, estimated here by the self-normalised mean
    # over 1200 independent sequences (one theta each), within 4 delta-method standard errors.
    q, r = 0.2 * torch.eye(2, dtype=torch.float64), 0.3 * torch.eye(2, dtype=torch.float64)
    obs = models.observe_all(2, sd=math.sqrt(0.3))
    data, y = _twin(models.LinearModel(A0.numpy(), noise_cov=0.2), obs, 6, missing=0.0, seed=7)
    m0 = torch.as_tensor(data["prior_mean"].values)
    p0 = torch.as_tensor(data["prior_cov"].values)
    theta0 = 0.8
    th = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    exact_ll = _kalman_loglik(th, q, r, y, m0, p0)
    (exact,) = torch.autograd.grad(exact_ll, th)
    exact = float(exact)

    b = 1200
    theta = torch.full((b, 1, 1), theta0, dtype=torch.float64, requires_grad=True)
    ev = log_evidence(dpf(300), ThetaModel(theta, q), y.expand(b, *y.shape), operator=obs, mean=m0, cov=p0, seed=2)
    (g,) = torch.autograd.grad(ev.log_evidence.sum(), theta)
    g = g.reshape(b).numpy()
    lp = ev.log_evidence.detach().numpy()
    w = np.exp(lp - lp.max())
    w /= w.sum()
    est = float((w * g).sum())
    se = math.sqrt(float((w**2 * (g - est) ** 2).sum()))
    assert abs(est - exact) < 4 * se, (est, exact, se)
    assert se < 0.1 * abs(exact)                      # the check has power: the score is far from zero
    # and the plain mean of grad log p_hat is close too: its bias is O(1/N) (measured on this problem:
    # +14% of the score at N = 100, +5% at N = 400, +2% at N = 1000)
    se_mean = g.std(ddof=1) / math.sqrt(b)
    assert abs(g.mean() - exact) < 4 * se_mean + 0.1 * abs(exact), (g.mean(), exact, se_mean)


# -- gradients reach the model, the proposal and the observation noise -----------------------------------------

@pytest.mark.parametrize("resampler", ["stop_gradient", "soft", "optimal_transport"])
def test_every_resampler_gives_finite_gradients(resampler, lg3):
    model, obs, data, y, _ = lg3
    theta = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    q = torch.as_tensor(model.noise_cov)
    m3 = torch.as_tensor(M3)

    class Scaled:
        state_size, dt, noise_cov = 3, 1.0, q

        def step(self, x):
            return theta * (x @ m3.T)

    proposal = GaussianProposal(q, obs.matrix, obs.noise_cov)
    noise = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    op = models.observe_all(3, sd=0.5)
    op.noise_cov = noise * torch.eye(3, dtype=torch.float64)
    ev = log_evidence(dpf(30, proposal=proposal, resampler=resampler), Scaled(), y.expand(4, *y.shape), operator=op,
                      mean=data["prior_mean"].values, cov=data["prior_cov"].values, seed=0)
    assert isinstance(ev, Evidence) and ev.log_evidence.shape == (4,) and ev.mean.shape == (4, 8, 3)
    ev.log_evidence.sum().backward()
    for grad in (theta.grad, proposal.shift.grad, proposal.log_scale.grad, noise.grad):
        assert grad is not None and bool(torch.isfinite(grad)) and float(grad) != 0.0


# -- contract and errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("with_proposal", [False, True])
def test_run_returns_a_valid_posterior(with_proposal):
    model = models.LinearModel(M3, noise_cov=0.1)
    obs = models.observe_all(3, sd=0.5)
    data = daml.simulate(model, 12, obs, every=2, x0=np.ones(3), x0_cov=1.0, missing=0.2, experiments=2, seed=4)
    proposal = GaussianProposal(model.noise_cov, obs.matrix, obs.noise_cov) if with_proposal else None
    filt = filters.make_filter("dpf", members=30, proposal=proposal)
    assert filt.lookahead is with_proposal and not filt.inference
    res = filters.run(filt, model, data, seed=0, forecast=True, progress=False)
    for post in (res.analysis, res.forecast):
        daml.validate(post)
        assert post.sizes["time"] == int(data["observed"].sum())
    assert res.analysis.attrs["method"] == "dpf"
    again = filters.run(filt, model, data, seed=0, progress=False)
    np.testing.assert_array_equal(res.analysis["x"].values, again.analysis["x"].values)


def test_a_pending_state_reports_the_transition_mean():
    model = models.LinearModel(M3, noise_cov=0.1)
    obs = models.observe_all(3, sd=0.5)
    filt = dpf(5, proposal=GaussianProposal(model.noise_cov, obs.matrix, obs.noise_cov))
    g = daml._device.generator(0)
    state = filt.init(model, torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), g)
    y = torch.zeros(3, dtype=torch.float64)
    up = filters.Upcoming(y, torch.ones(3, dtype=torch.bool), obs, 1, 1)
    pending = filt.forecast(state, model, g, up)
    assert isinstance(pending, DPFState) and pending.pending
    x, lw = filt.members(pending)
    torch.testing.assert_close(x, model.step(state.x))
    assert torch.equal(lw, state.log_weight)


def test_bad_input_is_refused_naming_the_argument():
    for kwargs, name in [({"members": 0}, "members"), ({"members": 2.5}, "members"),
                         ({"members": 5, "resampler": "magic"}, "resampler"),
                         ({"members": 5, "scheme": "magic"}, "scheme"),
                         ({"members": 5, "threshold": 1.5}, "threshold"),
                         ({"members": 5, "proposal": object()}, "proposal"),
                         ({"members": 5, "alpha": 0.0}, "alpha"),
                         ({"members": 5, "epsilon": -1.0}, "epsilon")]:
        with pytest.raises(InputError) as info:
            dpf(**kwargs)
        assert info.value.argument == name
    perfect = models.LinearModel(M3)
    obs = models.observe_all(3, sd=0.5)
    filt = dpf(5, proposal=GaussianProposal(torch.eye(3, dtype=torch.float64), obs.matrix, obs.noise_cov))
    with pytest.raises(InputError) as info:
        filt.init(perfect, torch.zeros(3), torch.eye(3), daml._device.generator(0))
    assert info.value.argument == "model"
    model = models.LinearModel(M3, noise_cov=0.1)
    y = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ShapeError) as info:
        log_evidence(dpf(5), model, torch.zeros(4, 2), operator=obs, mean=np.zeros(3), cov=np.eye(3))
    assert info.value.argument == "y"
    with pytest.raises(InputError) as info:
        log_evidence("dpf", model, y, operator=obs, mean=np.zeros(3), cov=np.eye(3))
    assert info.value.argument == "filt"
    with pytest.raises(ShapeError) as info:
        log_evidence(dpf(5), model, y, operator=obs, mean=np.zeros(2), cov=np.eye(3))
    assert info.value.argument == "mean"


def test_impossible_observations_stop_with_the_time_index():
    class Exploding:
        state_size, dt, noise_cov = 3, 1.0, 0.1 * torch.eye(3, dtype=torch.float64)

        def step(self, x):
            return x * float("nan") if x.abs().max() > 1e9 else x * 100.0

    obs = models.observe_all(3, sd=0.5)
    y = torch.zeros(10, 3, dtype=torch.float64)
    with pytest.raises(DivergenceError) as info:
        log_evidence(dpf(5), Exploding(), y, operator=obs, mean=np.ones(3), cov=np.eye(3), seed=0)
    assert info.value.step is not None and 0 < info.value.step < 10


def test_the_loop_runs_any_filter_reporting_loglik_as_run_does(lg3):
    # log_evidence with the Kalman filter: the exact log-likelihood and filtering means of run's Kalman filter
    model, obs, data, y, exact = lg3
    ev = log_evidence(filters.kalman_filter(), model, y, operator=obs, mean=data["prior_mean"].values,
                      cov=data["prior_cov"].values)
    assert ev.log_evidence.shape == () and ev.increments.shape == (8,)
    np.testing.assert_allclose(float(ev.log_evidence), exact, rtol=1e-12)
    kf = filters.run(filters.make_filter("kf"), model, data, progress=False).analysis
    kf_mean = (np.exp(kf["log_weight"]) * kf["x"]).sum("member").values
    np.testing.assert_allclose(ev.mean.numpy(), kf_mean, rtol=1e-10, atol=1e-12)
    with pytest.raises(InputError) as info:                   # a filter without an evidence increment
        log_evidence(filters.etkf(10), model, y, operator=obs, mean=np.zeros(3), cov=np.eye(3))
    assert info.value.argument == "filt"
