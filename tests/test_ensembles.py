"""Importance-weighted ensembles of networks: oracles are the exact linear-Gaussian posterior, dense
direct evaluations of the weight formulas, scoringrules/SciPy for the mixture scores and a stored
pyro NUTS reference (tests/data/make_nuts_reference.py) for a small nonlinear network."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as st
import torch
from torch import nn

import daml
import daml.ensembles as E
from daml.errors import InputError, ModuleError, NonFiniteError, ShapeError

DATA = Path(__file__).parent / "data"


def linear_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 + 0.5 * torch.randn(n, generator=g,
                                                                                            dtype=torch.float64)
    return x, y


def exact_linear_posterior(x, y, noise=0.5):
    """Posterior of (w, b) for y = x w + b + N(0, noise²) with the prior of prior_sd (w: 1/sqrt(3), b: 1)."""
    xx = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    prec = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=x.dtype))
    a = xx.T @ xx / noise**2 + prec
    cov = torch.linalg.inv(a)
    return cov @ xx.T @ y / noise**2, cov


@pytest.fixture(scope="module")
def linear_ensemble():
    x, y = linear_data()
    ens = E.fit(E.mlp(3, ()), x, y, members=400, noise_sd=0.5, seed=1, epochs=300, lr=0.05, batch_size=40,
                normalise=False)
    return x, y, ens


def members_theta(ens):
    return torch.cat([ens.params["0.weight"][:, 0, :], ens.params["0.bias"]], 1)


def test_rml_linear_gaussian_equal_weights_and_exact_posterior(linear_ensemble):
    x, y, ens = linear_ensemble
    weighted, info = E.weigh(ens, x, y, estimator="rml")
    # a model linear in w: RML samples the posterior exactly and its proposal density equals it
    assert info.ess == pytest.approx(400, rel=1e-8)
    assert float(info.log_weight.std()) < 1e-8
    mean, cov = exact_linear_posterior(x, y)
    th = members_theta(ens)
    sd = cov.diagonal().sqrt()
    # sample mean within 4 Monte Carlo standard errors, sample sd within 4 se of an sd (sd / sqrt(2M))
    assert ((th.mean(0) - mean).abs() < 4 * sd / math.sqrt(400)).all()
    assert ((th.std(0) / sd - 1).abs() < 4 / math.sqrt(2 * 400)).all()
    corr_err = (torch.corrcoef(th.T) - cov / torch.outer(sd, sd)).abs().max()
    assert corr_err < 4 / math.sqrt(400)


def test_prior_draws_without_rml_are_not_equally_weighted(linear_ensemble):
    x, y, ens = linear_ensemble
    _, info = E.weigh(ens, x, y, estimator="none")      # p(D|w)p(w) only: wrong for trained members
    assert info.ess < 300


def test_batched_training_equals_sequential():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(70, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(70, generator=g, dtype=torch.float64)
    # Adam alone (5 epochs, no Levenberg-Marquardt polish): the same arithmetic member by member
    kw = dict(members=4, noise_sd=0.1, seed=5, epochs=5, batch_size=16, lr=0.01, polish=False)
    a = E.fit(E.mlp(2, 8), x, y, **kw)
    b = E.fit(E.mlp(2, 8), x, y, vectorize=False, **kw)
    for k in a.params:
        assert torch.allclose(a.params[k], b.params[k], atol=1e-6, rtol=0)
    assert torch.allclose(a.history, b.history, atol=1e-6)
    # a member does not depend on the ensemble size
    c = E.fit(E.mlp(2, 8), x, y, **{**kw, "members": 2})
    for k in a.params:
        assert torch.allclose(a.params[k][:2], c.params[k], atol=1e-6, rtol=0)
    # and the caller's global random state is untouched
    net = E.mlp(2, 8, dropout=0.1)          # building a torch module draws from the global stream
    torch.manual_seed(11)
    before = torch.rand(3)
    torch.manual_seed(11)
    E.fit(net, x, y, **kw)
    assert torch.equal(torch.rand(3), before)


def _dense_jacobian(ens, x):
    theta = E.flat_params(ens)
    from daml.ensembles.training import unflatten
    out = []
    for i in range(theta.shape[0]):
        def f(th):
            return torch.func.functional_call(ens.module, unflatten(ens, th), (x,)).reshape(-1)
        out.append(torch.autograd.functional.jacobian(f, theta[i]))
    return theta, torch.stack(out)


@pytest.fixture(scope="module")
def small_nonlinear():
    rng = np.random.default_rng(4)
    x = rng.uniform(-2, 2, (30, 1))
    y = np.tanh(2 * x[:, 0]) + 0.1 * rng.normal(size=30)
    ens = E.fit(E.mlp(1, 5, activation="tanh"), x, y, members=6, noise_sd=0.1, seed=2, epochs=150, batch_size=10,
                normalise=False)
    return torch.tensor(x), torch.tensor(y), ens


def test_rml_weight_matches_dense_linearised_evidence(small_nonlinear):
    x, y, ens = small_nonlinear
    theta, jac = _dense_jacobian(ens, x)
    var = torch.cat([s.reshape(-1) for s in ens.prior_sd.values()]) ** 2
    ref = []
    for i in range(theta.shape[0]):
        f = torch.func.functional_call(ens.module, E.training.unflatten(ens, theta[i]), (x,)).reshape(-1).detach()
        u = (y - f + jac[i] @ theta[i]).numpy()
        s = (jac[i] * var) @ jac[i].T + 0.01 * torch.eye(30, dtype=torch.float64)
        ref.append(st.multivariate_normal(np.zeros(30), s.numpy()).logpdf(u))
    ref = torch.tensor(ref)
    _, info = E.weigh(ens, x, y, estimator="rml")
    ref = ref - torch.logsumexp(ref, 0)
    assert torch.allclose(info.log_weight, ref, atol=1e-8)
    # all eigenpairs kept: the low-rank path is the same computation
    _, full = E.weigh(ens, x, y, estimator="rml", rank=theta.shape[1])
    assert torch.allclose(full.log_weight, info.log_weight, atol=1e-10)


def test_laplace_mixture_proposal_matches_scipy(small_nonlinear):
    x, y, ens = small_nonlinear
    theta, jac = _dense_jacobian(ens, x)
    var = torch.cat([s.reshape(-1) for s in ens.prior_sd.values()]) ** 2
    covs = [torch.linalg.inv(jac[j].T @ jac[j] / 0.01 + torch.diag(1 / var)).numpy() for j in range(6)]
    ref = [np.log(np.mean([st.multivariate_normal(theta[j].numpy(), covs[j]).pdf(theta[i].numpy())
                           for j in range(6)])) for i in range(6)]
    _, info = E.weigh(ens, x, y, estimator="laplace")
    assert np.allclose(info.log_proposal.numpy(), ref, rtol=1e-9, atol=1e-8)
    assert np.allclose(info.log_likelihood.numpy(),
                       [st.norm(torch.func.functional_call(ens.module, E.training.unflatten(ens, theta[i]), (x,))
                                .reshape(-1).detach().numpy(), 0.1).logpdf(y.numpy()).sum() for i in range(6)])


def test_degeneracy_is_reported(small_nonlinear):
    x, y, ens = small_nonlinear
    _, info = E.weigh(ens, x, y)
    assert 1.0 <= info.ess <= 6.0
    assert info.khat == math.inf      # 6 members leave 2 tail draws: too few for a Pareto fit
    assert torch.allclose(torch.logsumexp(info.psis_log_weight, 0), torch.zeros((), dtype=torch.float64))


def test_mala_keeps_the_exact_posterior(linear_ensemble):
    x, y, ens = linear_ensemble
    weighted, _ = E.weigh(ens, x, y)
    moved, info = E.equal_weight(weighted, x, y, steps=60, seed=4)
    th = members_theta(moved)
    mean, cov = exact_linear_posterior(x, y)
    sd = cov.diagonal().sqrt()
    assert 0.3 < float(info.acceptance.mean()) < 0.9
    assert torch.allclose(moved.log_weight, torch.full((400,), -math.log(400), dtype=torch.float64))
    # resampling copies members, so allow for ESS of about M/2: 5 standard errors of M/2 draws
    assert ((th.mean(0) - mean).abs() < 5 * sd / math.sqrt(200)).all()
    assert ((th.std(0) / sd - 1).abs() < 5 / math.sqrt(2 * 200)).all()


def test_equal_weight_is_better_calibrated_than_raw_weights():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, (200, 1))
    y = np.sin(x[:, 0]) + 0.2 * rng.normal(size=200)
    xt = np.linspace(-4.5, 4.5, 60)[:, None]                # beyond the data too
    yt = np.sin(xt[:, 0]) + 0.2 * rng.normal(size=60)
    # the docs' first example: members trained to convergence with fit's defaults
    ens = E.fit(E.mlp(1, 20, activation="tanh"), x, y, members=10, noise_sd=0.2, seed=0)
    assert bool(ens.convergence["converged"].all())
    weighted, info = E.weigh(ens, x, y)
    assert info.ess < 3 and info.trusted                  # the degeneracy the seed predicts
    equal, _ = E.equal_weight(weighted, x, y, steps=200, seed=2)
    s_w, s_e = E.scores(E.predict(weighted, xt), yt), E.scores(E.predict(equal, xt), yt)
    assert s_e["nll"] < s_w["nll"] - 0.1
    assert s_e["crps"] < s_w["crps"] + 0.01            # about equal (0.23-0.25 for either, by the MALA seed)
    assert abs(s_e["coverage"] - 0.9) < abs(s_w["coverage"] - 0.9)


def test_nonlinear_network_against_nuts_reference():
    ref = json.loads((DATA / "nuts_tanh5.json").read_text())
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, 20)
    y = np.tanh(2 * x) + 0.1 * rng.normal(size=20)
    xt = np.array(ref["x_test"])[:, None]
    common = dict(noise_sd=0.1, epochs=300, batch_size=20, lr=0.02, normalise=False)
    ens = E.fit(E.mlp(1, 5, activation="tanh"), x, y, members=64, seed=3, **common)
    weighted, info = E.weigh(ens, x, y)
    equal, _ = E.equal_weight(weighted, x, y, steps=400, seed=5)
    deep = E.fit(E.mlp(1, 5, activation="tanh"), x, y, members=64, seed=3, anchor=False, perturb_targets=False,
                 **common)
    errors = {}
    for name, e in (("weighted", weighted), ("equal_weight", equal), ("uniform", deep)):
        post = E.predict(e, xt, test_noise_sd=0.0)
        loc = post["loc"].weighted(np.exp(post["log_weight"])).mean("member").values
        var = post["variance"].sel(source="total").values
        errors[name] = (np.abs(loc - ref["mean"]), np.abs(np.log(var / np.array(ref["var"]))))
    print({k: (v[0].round(3).tolist(), v[1].round(2).tolist()) for k, v in errors.items()})
    # the equal-weight ensemble (64 members, 400 MALA steps): predictive mean within 0.05 (targets of
    # scale 1, noise 0.1; NUTS standard errors <= 0.005) and variance within a factor 2.5 at every test
    # input, inside and outside the data range; the uniform ensemble of unanchored networks misses the
    # variance by more (a factor 8 here)
    assert (errors["equal_weight"][0] < 0.05).all()
    assert (errors["equal_weight"][1] < math.log(2.5)).all()
    assert errors["equal_weight"][1].max() < errors["uniform"][1].max()


def test_predict_variance_decomposition_and_scores():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 2))
    y = x[:, 0] - x[:, 1] ** 2 + 0.3 * rng.normal(size=80)
    ens = E.fit(E.mlp(2, 10), x, y, members=5, noise_sd=0.3, seed=0, epochs=20)
    xt = rng.normal(size=(7, 2))
    post = E.predict(ens, xt, test_noise_sd=0.2, model_sd=0.1, seed=0)
    daml.validate(post)
    v = post["variance"]
    # without input noise the law of total variance splits exactly into the three parts
    assert np.allclose(v.sel(source="total"), v.sel(source="members") + 0.2**2 + 0.1**2, rtol=1e-10)
    assert np.allclose(v.sel(source="testing"), 0.04) and np.allclose(v.sel(source="model"), 0.01)
    # input noise adds variance, and the draws y follow the mixture (chi-square check of the mean variance)
    noisy = E.predict(ens, xt, input_sd=0.3, input_samples=400, seed=1)
    assert (noisy["variance"].sel(source="input") > 0).all()
    w = np.exp(noisy["log_weight"].values)
    emp = ((noisy["y"] - (noisy["y"] * w).sum("member")) ** 2 * w).sum("member").values
    assert np.allclose(emp, noisy["variance"].sel(source="total").values, rtol=0.25)
    # closed-form scores against scoringrules (CRPS) and SciPy (log density of the mixture)
    import scoringrules as sr
    yt = xt[:, 0] - xt[:, 1] ** 2
    s = E.scores(post, yt)
    loc, scale = post["loc"].values, post["scale"].values
    wt = np.exp(post["log_weight"].values)
    ref_crps = sr.crps_mixnorm(yt, loc, scale, np.broadcast_to(wt, loc.shape)).mean()
    assert s["crps"] == pytest.approx(float(ref_crps), rel=1e-8)
    dens = (wt * st.norm(loc, scale).pdf(yt[:, None])).sum(1)
    assert s["nll"] == pytest.approx(float(-np.log(dens).mean()), rel=1e-10)
    lo, hi = E.mixture_quantile(post, 0.05).numpy(), E.mixture_quantile(post, 0.95).numpy()
    cdf = lambda q: (wt * st.norm(loc, scale).cdf(q[:, None])).sum(1)   # noqa: E731
    assert np.allclose(cdf(lo), 0.05, atol=1e-9) and np.allclose(cdf(hi), 0.95, atol=1e-9)


def test_baselines_deep_ensemble_is_a_mixture_and_mc_dropout_varies():
    rng = np.random.default_rng(2)
    x = rng.uniform(-2, 2, (100, 1))
    y = x[:, 0] ** 2 + 0.2 * rng.normal(size=100)
    de = E.deep_ensemble(x, y, members=3, hidden=16, seed=0, epochs=30)
    post = E.predict(de, x[:5])
    mean_i, var_i = E.forward(de, x[:5])
    loc = mean_i * de.y_sd + de.y_mean
    var = var_i * de.y_sd**2
    mix_var = var.mean(0) + loc.var(0, unbiased=False)              # the mixture, not averaged parameters
    assert np.allclose(post["variance"].sel(source="total").values, mix_var.numpy(), rtol=1e-10)
    md = E.mc_dropout(x, y, noise_sd=0.2, dropout=0.1, hidden=32, seed=0, epochs=30)
    p1 = E.predict(md, x[:5], dropout_passes=30, seed=1)
    assert p1.sizes["member"] == 30 and (p1["variance"].sel(source="members") == 0).all()
    assert float(p1["loc"].std("member").min()) > 0                     # the passes differ
    p2 = E.predict(md, x[:5], dropout_passes=30, seed=1)
    assert np.array_equal(p1["loc"].values, p2["loc"].values)          # and are seeded


def test_uncertainty_sources_one_at_a_time():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (60, 1))
    y = 2 * x[:, 0] + 0.1 * rng.normal(size=60)
    out = E.uncertainty_sources(E.mlp(1, 8), x, y, np.array([[0.2], [0.8]]), noise_sd=0.1, input_sd=0.05,
                                test_noise_sd=0.1, model_sd=0.05, members=6, samples=4000, correction_steps=20,
                                seed=0, epochs=30)
    assert list(out.source.values) == ["input", "testing", "training", "weights", "model", "total"]
    assert out["y"].shape == (6, 2, 4000)
    assert np.allclose(out["variance"].sel(source="testing"), 0.01)
    assert np.allclose(out["variance"].sel(source="model"), 0.0025)
    # sample variances agree with the stated ones (4000 draws: 10 % tolerance)
    emp = out["y"].var("sample")
    assert np.allclose(emp.sel(source="testing"), 0.01, rtol=0.1)
    assert (out["variance"].sel(source="total") >= out["variance"].sel(source="testing")).all()


def test_estimate_noise_and_model_error():
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (400, 1))
    y = x[:, 0] + 0.3 * rng.normal(size=400)
    s = E.estimate_noise(E.mlp(1, 10), x, y, seed=0, epochs=30)
    assert 0.2 < s < 0.4
    ens = E.fit(E.mlp(1, 10), x[:300], y[:300], members=4, noise_sd=s, seed=0, epochs=30)
    # the held-out residual is all noise here: with the noise level given, little model error remains
    assert E.model_error(ens, x[300:], y[300:], test_noise_sd=0.3) < 0.15
    assert E.model_error(ens, x[300:], y[300:]) > 0.2


class _Recorder(nn.Module):
    """A module whose buffer records a Python number from the data: vmap cannot batch ``.item()``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("last", torch.zeros(()))

    def forward(self, x):
        self.last.fill_(x.sum().item())
        return self.lin(x)


def test_batchnorm_members_keep_their_own_running_statistics():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 2)), rng.normal(size=40)
    bn = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    ens = E.fit(bn, x, y, members=3, noise_sd=1.0, epochs=2, seed=0)
    rm = ens.buffers["1.running_mean"]
    assert rm.shape == (3, 4) and not torch.allclose(rm[0], rm[1])


def test_bad_input_named_errors():
    x = np.zeros((10, 2))
    with pytest.raises(ShapeError, match="y"):
        E.fit(E.mlp(2, 4), x, np.zeros(9), noise_sd=0.1)
    bad = np.ones((10, 2))
    bad[3, 1] = np.nan
    with pytest.raises(NonFiniteError, match="x"):
        E.fit(E.mlp(2, 4), bad, np.arange(10.0), noise_sd=0.1)
    with pytest.raises(InputError, match="noise_sd"):
        E.fit(E.mlp(2, 4), np.random.default_rng(0).normal(size=(10, 2)), np.arange(10.0))
    one = E.fit(E.mlp(2, 4), np.random.default_rng(0).normal(size=(10, 2)), np.arange(10.0), members=1,
                noise_sd=0.1, epochs=1)
    with pytest.raises(InputError, match="at least 2 members"):
        E.weigh(one, np.random.default_rng(0).normal(size=(10, 2)), np.arange(10.0))
    with pytest.raises(ModuleError, match="buffers \\['last'\\]"):
        E.fit(_Recorder(), np.random.default_rng(0).normal(size=(10, 2)), np.arange(10.0), noise_sd=0.1)
    with pytest.raises(ModuleError, match="module"):
        E.fit("not a module", x, np.arange(10.0), noise_sd=0.1)
    de = E.deep_ensemble(np.random.default_rng(0).normal(size=(10, 2)), np.arange(10.0), members=2, hidden=4,
                         epochs=1)
    with pytest.raises(InputError, match="^estimator.*heteroscedastic"):         # RML needs a fixed noise level
        E.weigh(de, np.random.default_rng(0).normal(size=(10, 2)), np.arange(10.0))
    with pytest.raises(InputError, match="perturb_targets"):
        E.fit(E.mlp(2, 2, outputs=2), x, np.arange(10.0), likelihood="heteroscedastic")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_weights_and_correction():
    # CUDA generators give other streams than CPU ones, so the check is batched == sequential on the
    # device, and the whole chain runs there with finite results
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 2)), rng.normal(size=64)
    kw = dict(members=4, noise_sd=0.5, epochs=3, seed=0, device="cuda")
    a = E.fit(E.mlp(2, 8), x, y, **kw)
    b = E.fit(E.mlp(2, 8), x, y, vectorize=False, **kw)
    for k in a.params:
        assert a.params[k].device.type == "cuda"
        assert torch.allclose(a.params[k], b.params[k], atol=1e-6)
    weighted, info = E.weigh(a, x, y)
    assert torch.isfinite(info.log_weight).all() and 1.0 <= info.ess <= 4.0
    eq, _ = E.equal_weight(weighted, x, y, steps=10, seed=1)
    assert eq.params["0.weight"].device.type == "cuda"
    assert np.isfinite(E.scores(E.predict(eq, x[:5]), y[:5])["nll"])


class _MeanAndRawVariance(nn.Module):
    """Two free outputs, the same at every input: the mean and the raw variance of N(y; a, softplus(b))."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.b.expand(x.shape[0], 2)


def test_heteroscedastic_fisher_weights_and_moves():
    """Fisher matrix against dense Jacobians; Laplace weights of heteroscedastic members; the
    resample-move kernel keeps the exact two-parameter posterior (computed on a grid)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(12, 2))
    y = x[:, 0] + 0.3 * rng.normal(size=12) * (1 + x[:, 1] ** 2)
    ens = E.fit(E.mlp(2, 4, outputs=2, activation="tanh"), x, y, members=3, likelihood="heteroscedastic",
                perturb_targets=False, seed=1, epochs=30, batch_size=4, normalise=False)
    fi = E.fisher(ens, x, y)
    xt = torch.tensor(x)
    refs = []
    for i in range(3):
        th = E.training.flat_params(ens)[i]

        def out(t):
            return torch.func.functional_call(ens.module, E.training.unflatten(ens, t), (xt,))
        jac = torch.autograd.functional.jacobian(out, th)                  # (n, 2, P)
        o = out(th).detach()
        v = torch.nn.functional.softplus(o[:, 1]) + 1e-6
        ref = (jac[:, 0].T * (1 / v)) @ jac[:, 0] + (jac[:, 1].T * (torch.sigmoid(o[:, 1]) ** 2 / (2 * v**2))) @ jac[:, 1]
        assert torch.allclose(fi.precision[i], ref, atol=1e-10)
        refs.append(ref)
        assert abs(float(fi.loglik[i]) - st.norm(o[:, 0].numpy(), v.sqrt().numpy()).logpdf(y).sum()) < 1e-9
    assert bool((torch.linalg.eigvalsh(fi.precision) > -1e-10).all())
    _, info = E.weigh(ens, x, y, estimator="laplace")
    # the Laplace mixture with A_j = Σ_p⁻¹ + F_j, evaluated directly with SciPy
    theta = E.training.flat_params(ens)
    var = torch.cat([s.reshape(-1) for s in ens.prior_sd.values()]) ** 2
    covs = [torch.linalg.inv(refs[j] + torch.diag(1 / var)).numpy() for j in range(3)]
    lq = [np.log(np.mean([st.multivariate_normal(theta[j].numpy(), covs[j]).pdf(theta[i].numpy()) for j in range(3)]))
          for i in range(3)]
    assert np.allclose(info.log_proposal.numpy(), lq, rtol=1e-9, atol=1e-8)
    assert torch.allclose(info.log_likelihood, fi.loglik, rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="^estimator"):
        E.weigh(ens, x, y, estimator="rml")

    # two parameters (a, b): y ~ N(a, softplus(b) + 1e-6), a and b with the ensemble's Gaussian prior
    z = np.zeros((25, 1))
    yy = 0.8 + 0.6 * rng.normal(size=25)
    members = 300
    ens2 = E.fit(_MeanAndRawVariance(), z, yy, members=members, likelihood="heteroscedastic", perturb_targets=False,
                 seed=3, epochs=20, batch_size=25, normalise=False)
    # 20 epochs leave the members near their prior draws (equal weights): the moves must do the work
    moved, cinfo = E.equal_weight(ens2, z, yy, steps=80, seed=5)
    assert torch.allclose(moved.log_weight, torch.full((members,), -math.log(members), dtype=torch.float64))
    assert 0.3 < float(cinfo.acceptance.mean()) < 0.9
    sd_p = torch.cat([s.reshape(-1) for s in ens2.prior_sd.values()]).numpy()
    a, b = np.meshgrid(np.linspace(-1.0, 3.0, 801), np.linspace(-3.0, 3.0, 801), indexing="ij")
    v = np.logaddexp(0.0, b) + 1e-6
    logp = (-0.5 * (np.log(v)[..., None] + (yy - a[..., None]) ** 2 / v[..., None])).sum(-1)
    logp += -0.5 * (a / sd_p[0]) ** 2 - 0.5 * (b / sd_p[1]) ** 2
    w = np.exp(logp - logp.max())
    w /= w.sum()
    th, start = moved.params["b"].numpy(), ens2.params["b"].numpy()
    for k, g in enumerate((a, b)):
        mean = (w * g).sum()
        sd = np.sqrt((w * (g - mean) ** 2).sum())
        # 5 standard errors, allowing for an ESS of M / 2 (the chains are short)
        assert abs(th[:, k].mean() - mean) < 5 * sd / math.sqrt(members / 2)
        assert abs(th[:, k].std() / sd - 1) < 5 / math.sqrt(members)
        assert abs(start[:, k].mean() - mean) > 0.5 and start[:, k].std() / sd > 2   # far before the moves


def _loo_elpd_reference(loc, scale, w, y, c):
    """Importance-sampling leave-one-out log density per point, written out with SciPy."""
    mean = (loc * w).sum(1, keepdims=True)
    dens = st.norm(mean + math.sqrt(c) * (loc - mean), math.sqrt(c) * scale).pdf(y[:, None])
    return float(np.mean(-np.log((w / dens).sum(1))))


def test_variance_scale_and_leave_one_out_calibration():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(120, 2))
    f = lambda z: z[:, 0] - 0.5 * z[:, 1]                                   # noqa: E731
    y = f(x) + 0.2 * rng.normal(size=120)
    ens = E.fit(E.mlp(2, 8), x, y, members=4, noise_sd=0.2, seed=0, epochs=60)
    xt = rng.normal(size=(9, 2))
    # scale_variance: the mixture mean is unchanged and every part of the variance is multiplied by c
    for kw in ({"test_noise_sd": 0.6, "model_sd": 0.1}, {"input_sd": 0.2, "input_samples": 30}):
        base = E.predict(ens, xt, seed=1, **kw)
        scaled = E.scale_variance(base, 0.3)
        daml.validate(scaled)
        w = np.exp(base["log_weight"].values)
        m0, m1 = (base["loc"] * w).sum("member"), (scaled["loc"] * w).sum("member")
        assert np.allclose(m0, m1, rtol=0, atol=1e-12)
        assert np.allclose(scaled["variance"].values, 0.3 * base["variance"].values, rtol=1e-10, atol=1e-15)
        total = ((scaled["loc"] - m1) ** 2 * w).sum("member") + (scaled["scale"] ** 2 * w).sum("member")
        assert np.allclose(total, scaled["variance"].sel(source="total"), rtol=1e-10)
        assert json.loads(scaled.attrs["config"])["variance_scale"] == 0.3
        # the draws keep their standardised values: (y - loc) / scale is unchanged
        assert np.allclose((scaled["y"] - scaled["loc"]) / scaled["scale"], (base["y"] - base["loc"]) / base["scale"],
                           rtol=0, atol=1e-9)

    # identical members: the leave-one-out factor is the in-sample maximum-likelihood one, mean z²
    same = ens.replace(params={k: v[[0, 0, 0]] for k, v in ens.params.items()},
                       buffers={k: v[[0, 0, 0]] for k, v in ens.buffers.items()},
                       log_weight=torch.full((3,), -math.log(3), dtype=torch.float64))
    post = E.predict(same, x, test_noise_sd=0.6)
    loc, scale = post["loc"].values, post["scale"].values
    z2 = float((((y[:, None] - loc) / scale) ** 2)[:, 0].mean())
    r = E.loo_variance_scale(same, x, y, test_noise_sd=0.6)
    assert r.scale == pytest.approx(z2, rel=1e-6) and not r.at_bound
    assert r.elpd == pytest.approx(float(st.norm(loc[:, 0], math.sqrt(z2) * scale[:, 0]).logpdf(y).mean()), rel=1e-10)

    # distinct members: the harmonic-mean estimate, checked against SciPy, and the factor is its maximum
    post = E.predict(ens, x, test_noise_sd=0.6)
    loc, scale, w = post["loc"].values, post["scale"].values, np.exp(post["log_weight"].values)
    r = E.loo_variance_scale(ens, x, y, test_noise_sd=0.6)
    assert r.elpd_unscaled == pytest.approx(_loo_elpd_reference(loc, scale, w, y, 1.0), rel=1e-10)
    assert r.elpd == pytest.approx(_loo_elpd_reference(loc, scale, w, y, r.scale), rel=1e-10)
    for step in (1.01, 1 / 1.01):
        assert r.elpd > _loo_elpd_reference(loc, scale, w, y, r.scale * step)
    assert r.elpd > r.elpd_unscaled
    # a noise level declared three times too large: intervals far too wide; the factor restores
    # the 90 % coverage on fresh data (2000 points: binomial sd 0.007; tolerance 0.04)
    xn = rng.normal(size=(2000, 2))
    yn = f(xn) + 0.2 * rng.normal(size=2000)
    assert E.scores(E.predict(ens, xn, test_noise_sd=0.6), yn)["coverage"] > 0.99
    assert 0.05 < r.scale < 0.3
    assert abs(E.scores(E.scale_variance(E.predict(ens, xn, test_noise_sd=0.6), r.scale), yn)["coverage"] - 0.9) < 0.04

    # the optimum outside the search interval is reported
    with pytest.warns(daml.errors.ConvergenceWarning, match="end of bounds"):
        r = E.loo_variance_scale(ens, x, y, test_noise_sd=0.6, bounds=(1.0, 2.0))
    assert r.at_bound and r.scale == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(InputError, match="^factor"):
        E.scale_variance(base, 0.0)
    with pytest.raises(InputError, match="^post"):
        E.scale_variance(base.drop_vars("y"), 0.5)
    for bad in ((2.0, 1.0), (0.0, 1.0), (1.0,), (1.0, float("inf"))):
        with pytest.raises(InputError, match="^bounds"):
            E.loo_variance_scale(ens, x, y, bounds=bad)
    with pytest.raises(InputError, match="^test_noise_sd"):
        E.loo_variance_scale(ens, x, y, test_noise_sd=0.0)
    with pytest.raises(ShapeError):
        E.loo_variance_scale(ens, x, y[:-1])
