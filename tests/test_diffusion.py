"""Score-based diffusion DA: schedules, analytic scores and forcings against closed forms, the
samplers against exact posteriors, the filters, and bad input."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal as mvn

import daml
from daml import diffusion as dif
from daml.errors import DivergenceError, InputError, ShapeError
from daml.filters.letkf import ring_taper
from daml.models.observations import observe_indices, observe_linear, observe_nonlinear

F64 = torch.float64
SCHEDULES = [dif.VPLinear(), dif.VPLinear(0.5, 0.025), dif.VPCosine(), dif.VE(5.0)]


def t64(a):
    return torch.as_tensor(np.asarray(a), dtype=F64)


# -- closed-form oracles (numpy) -------------------------------------------------------------------------------

def kalman(m, p, h, r, y):
    s = h @ p @ h.T + r
    k = p @ h.T @ np.linalg.inv(s)
    return m + k @ (y - h @ m), p - k @ h @ p


def gm_posterior(means, covs, weights, h, r, y):
    """Per-component Kalman updates and the reweighted component weights."""
    out_m, out_c, logw = [], [], []
    for mu, c, w in zip(means, covs, weights):
        s = h @ c @ h.T + r
        d = y - h @ mu
        logw.append(math.log(w) - 0.5 * d @ np.linalg.solve(s, d) - 0.5 * np.linalg.slogdet(s)[1])
        ma, ca = kalman(mu, c, h, r, y)
        out_m.append(ma)
        out_c.append(ca)
    logw = np.array(logw)
    return np.array(out_m), np.array(out_c), np.exp(logw - logsumexp(logw))


def gm_noised_score(x, means, covs, weights, a, s2):
    """Score of sum_k w_k N(x; a mu_k, a^2 C_k + s2 I) at each row of x."""
    d = x.shape[-1]
    out = []
    for xi in x:
        logs, grads = [], []
        for mu, c, w in zip(means, covs, weights):
            cov = a * a * c + s2 * np.eye(d)
            diff = xi - a * mu
            sol = np.linalg.solve(cov, diff)
            logs.append(math.log(w) - 0.5 * diff @ sol - 0.5 * np.linalg.slogdet(cov)[1])
            grads.append(-sol)
        r = np.exp(np.array(logs) - logsumexp(logs))
        out.append(r @ np.array(grads))
    return np.array(out)


def random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.3 * np.eye(d))


# -- schedules ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sched", SCHEDULES, ids=repr)
def test_schedule_derivatives_and_forward_variance(sched):
    """dalpha, dsigma2 match finite differences, and the marginal variance a^2 v0 + s^2 solves the
    forward SDE's variance equation dv/dt = 2 f v + g^2 for any initial variance v0."""
    for t in (0.05, 0.3, 0.7, 0.95):
        e = 1e-6
        fd_a = (sched.alpha(t + e) - sched.alpha(t - e)) / (2 * e)
        fd_s = (sched.sigma2(t + e) - sched.sigma2(t - e)) / (2 * e)
        assert abs(fd_a - sched.dalpha(t)) < 1e-6 and abs(fd_s - sched.dsigma2(t)) < 1e-6
        for v0 in (0.0, 0.5, 3.0):
            var = lambda s: sched.alpha(s) ** 2 * v0 + sched.sigma2(s)  # noqa: E731
            lhs = (var(t + e) - var(t - e)) / (2 * e)
            assert abs(lhs - (2 * sched.drift(t) * var(t) + sched.diffusion2(t))) < 1e-6
        assert sched.diffusion2(t) > 0
    assert sched.alpha(0.0) == pytest.approx(1.0)


def test_make_schedule_forms_and_errors():
    assert isinstance(dif.make_schedule("ve"), dif.VE)
    s = dif.make_schedule({"schedule": "vp-linear", "eps_alpha": 0.5, "eps_sigma": 0.025})
    assert s.eps_alpha == 0.5 and dif.make_schedule(s.config()).config() == s.config()
    with pytest.raises(InputError, match="schedule"):
        dif.make_schedule("linear")
    with pytest.raises(InputError, match="eps_alpha"):
        dif.VPLinear(eps_alpha=1.5)


# -- score identities -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sched", SCHEDULES[:3], ids=repr)
def test_gaussian_prior_plus_gain_forcing_is_noised_kalman_score(sched):
    rng = np.random.default_rng(0)
    d, p = 4, 2
    m, pc = rng.normal(size=d), random_spd(rng, d)
    h, r = rng.normal(size=(p, d)), random_spd(rng, p, 0.5)
    y = rng.normal(size=p)
    ma, pa = kalman(m, pc, h, r, y)
    mix = dif.gaussian_mixture(t64(m[None]), t64(pc[None]))
    lin = dif.linearise(mix, t64(y), observe_linear(h, cov=r))
    x = rng.normal(size=(7, d))
    for t in (0.01, 0.2, 0.9):
        a, s2 = sched.alpha(t), sched.sigma2(t)
        forcing, post = dif.exact_forcing(mix, lin, t64(x), a, s2)
        expect = gm_noised_score(x, [ma], [pa], [1.0], a, s2)
        assert np.abs(post.numpy() - expect).max() < 1e-10
        prior = dif.mixture_score(mix, t64(x), a, s2)
        assert np.abs((prior + forcing).numpy() - expect).max() < 1e-10


def test_low_rank_and_tapered_ensemble_gaussian():
    """gaussian_prior keeps the ensemble covariance in the member subspace (N < d) or tapers it; the
    posterior score is the noised Kalman score of that (singular or tapered) Gaussian."""
    rng = np.random.default_rng(1)
    d, n = 6, 4
    ens = rng.normal(size=(n, d))
    h = np.eye(d)[[0, 3]]
    r = np.diag([0.3, 0.5])
    y = np.array([0.4, -1.0])
    mean, cov = ens.mean(0), np.cov(ens.T)
    taper = ring_taper(d, 1.0).numpy()
    op = observe_linear(h, cov=r)
    x = rng.normal(size=(5, d))
    for tap in (None, taper):
        c = cov if tap is None else cov * tap
        mix = dif.gaussian_prior(t64(ens), taper=None if tap is None else t64(tap))
        lin = dif.linearise(mix, t64(y), op)
        ma, pa = kalman(mean, c, h, r, y)
        _, post = dif.exact_forcing(mix, lin, t64(x), 0.7, 0.4)
        assert np.abs(post.numpy() - gm_noised_score(x, [ma], [pa], [1.0], 0.7, 0.4)).max() < 1e-10
        assert np.abs(dif.mixture_score(mix, t64(x), 0.7, 0.4).numpy()
                      - gm_noised_score(x, [mean], [c], [1.0], 0.7, 0.4)).max() < 1e-10


def test_mixture_prior_exact_forcing_against_posterior_mixture_and_autograd():
    rng = np.random.default_rng(2)
    d, p, k = 3, 2, 3
    means = rng.normal(scale=2.0, size=(k, d))
    covs = np.array([random_spd(rng, d, 0.4) for _ in range(k)])
    w = np.array([0.2, 0.5, 0.3])
    h, r = rng.normal(size=(p, d)), np.diag([0.4, 0.2])
    y = rng.normal(size=p)
    pm, pc, pw = gm_posterior(means, covs, w, h, r, y)
    mix = dif.gaussian_mixture(t64(means), t64(covs), t64(np.log(w)))
    lin = dif.linearise(mix, t64(y), observe_linear(h, cov=r))
    x = rng.normal(size=(6, d))
    a, s2 = 0.6, 0.5
    forcing, post = dif.exact_forcing(mix, lin, t64(x), a, s2)
    expect = gm_noised_score(x, pm, pc, pw, a, s2)
    assert np.abs(post.numpy() - expect).max() < 1e-10

    # autograd of the closed-form log p(y | x^t) = log sum_k r_k(x) N(y; H m_k(x), R + H P_k H^T)
    xt = t64(x).requires_grad_(True)
    hm, rm = t64(h), t64(r)
    terms = []
    for mu, c, wk in zip(t64(means), t64(covs), w):
        ct = a * a * c + s2 * torch.eye(d, dtype=F64)
        kg = a * c @ torch.linalg.inv(ct)
        prior_k = torch.distributions.MultivariateNormal(a * mu, ct).log_prob(xt)
        mk = mu + (xt - a * mu) @ kg.T
        pk = c - a * kg @ c
        lik_k = torch.distributions.MultivariateNormal(mk @ hm.T, rm + hm @ pk @ hm.T).log_prob(t64(y))
        terms.append((math.log(wk) + prior_k, lik_k))
    log_prior = torch.logsumexp(torch.stack([tp for tp, _ in terms]), 0)
    log_lik = torch.logsumexp(torch.stack([tp + tl for tp, tl in terms]), 0) - log_prior
    (g,) = torch.autograd.grad(log_lik.sum(), xt)
    assert torch.allclose(forcing, g, atol=1e-10, rtol=0)


def test_isotropic_kernels_match_the_kde_posterior():
    """Kernels N(x_i, h^2 I) with linear H: the posterior score is the noised score of the KDE
    posterior (per-kernel Kalman updates); h = 0 is the noised likelihood-weighted ensemble."""
    rng = np.random.default_rng(3)
    n, d = 8, 3
    ens = rng.normal(size=(n, d))
    lw = rng.normal(size=n)
    w = np.exp(lw - logsumexp(lw))
    h, r, y = np.eye(d)[:2], np.diag([0.5, 0.3]), np.array([0.2, 0.9])
    op = observe_linear(h, cov=r)
    x = rng.normal(size=(5, d))
    for bw in (0.0, 0.4):
        mix = dif.kernel_mixture(t64(ens), t64(lw), bw)
        lin = dif.linearise(mix, t64(y), op, jacobians=bw > 0)
        pm, pc, pw = gm_posterior(ens, [bw**2 * np.eye(d)] * n, w, h, r, y)
        for a, s2 in ((0.9, 0.05), (0.3, 0.9)):
            _, post = dif.exact_forcing(mix, lin, t64(x), a, s2)
            assert np.abs(post.numpy() - gm_noised_score(x, pm, pc, pw, a, s2)).max() < 1e-10
            assert np.abs(dif.mixture_score(mix, t64(x), a, s2).numpy()
                          - gm_noised_score(x, ens, [bw**2 * np.eye(d)] * n, w, a, s2)).max() < 1e-10


def test_nonlinear_operator_via_autograd():
    """A linear map given as a function (Jacobian by autograd) gives the matrix results; the
    zero-bandwidth forcing with a nonlinear h uses h(x_i) exactly."""
    rng = np.random.default_rng(4)
    n, d = 6, 3
    ens = t64(rng.normal(size=(n, d)))
    hmat = t64(rng.normal(size=(2, d)))
    lin_op = observe_linear(hmat, sd=0.5)
    fn_op = observe_nonlinear(lambda z: z @ hmat.T, d, 2, sd=0.5)
    y, x = t64([0.3, -0.4]), t64(rng.normal(size=(4, d)))
    mix = dif.kernel_mixture(ens, bandwidth=0.3)
    a = dif.exact_forcing(mix, dif.linearise(mix, y, lin_op), x, 0.8, 0.2)[1]
    b = dif.exact_forcing(mix, dif.linearise(mix, y, fn_op), x, 0.8, 0.2)[1]
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert torch.allclose(dif.likelihood_score(x, y, fn_op, torch.ones(2, dtype=torch.bool)),
                          (y - x @ hmat.T) / 0.25 @ hmat, atol=1e-12, rtol=0)
    arctan = observe_nonlinear(torch.atan, d, d, sd=0.1)
    yy = t64([0.5, -0.2, 1.0])
    bare = dif.kernel_mixture(ens)
    _, post = dif.exact_forcing(bare, dif.linearise(bare, yy, arctan, jacobians=False), x, 0.8, 0.2)
    ll = (-0.5 * ((yy - torch.atan(ens)) / 0.1) ** 2).sum(-1).numpy()
    w = np.exp(ll - logsumexp(ll))
    expect = gm_noised_score(x.numpy(), ens.numpy(), [np.zeros((d, d))] * n, w, 0.8, 0.2)
    assert np.abs(post.numpy() - expect).max() < 1e-10


def test_ensemble_forcing_matches_the_seed_formula_and_its_gradient():
    rng = np.random.default_rng(5)
    n, d = 12, 3
    ens = rng.normal(size=(n, d))
    ll = rng.normal(size=n)
    x = rng.normal(size=(4, d))
    a, s2 = 0.7, 0.3
    gauss = dif.gaussian_prior(t64(ens))
    got = dif.ensemble_forcing(gauss, t64(ens), t64(ll), t64(x), a, s2).numpy()
    # the seed: C_tt^-1 C_tT (C_TT - C_Tt C_tt^-1 C_tT)^-1 sum_i w_i (x_i - xbar - C_Tt C_tt^-1 (x - a xbar))
    p, xbar = np.cov(ens.T), ens.mean(0)
    c_tt, c_tT = a * a * p + s2 * np.eye(d), a * p
    gain = c_tT.T @ np.linalg.inv(c_tt)
    cond = p - gain @ c_tT
    w = np.exp(ll - logsumexp(ll))
    for xi, gi in zip(x, got):
        inner = w @ (ens - xbar - gain @ (xi - a * xbar))
        expect = np.linalg.inv(c_tt) @ c_tT @ np.linalg.inv(cond) @ inner
        assert np.abs(gi - expect).max() < 1e-10
    # conditional weights: the gradient of log sum_i exp(ll_i) N(x_i; m_t(x), P_t)
    xt = t64(x).requires_grad_(True)
    m_t = t64(xbar) + (xt - a * t64(xbar)) @ t64(gain).T
    dist = torch.distributions.MultivariateNormal(m_t.unsqueeze(-2), t64(cond))
    lp = torch.logsumexp(t64(ll) + dist.log_prob(t64(ens)), -1)
    (g,) = torch.autograd.grad(lp.sum(), xt)
    got_c = dif.ensemble_forcing(gauss, t64(ens), t64(ll), t64(x), a, s2, conditional=True)
    assert torch.allclose(got_c, g, atol=1e-10, rtol=0)


def test_local_and_fitted_mixtures():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(30, 2)) * 0.1 + 3.0
    b = rng.normal(size=(20, 2)) * 0.2 - 3.0
    ens = t64(np.concatenate([a, b]))
    loc0 = dif.local_mixture(ens, neighbours=5, bandwidth=0.0)
    assert torch.allclose(loc0.mean, ens) and float(loc0.vals.abs().max()) < 1e-12
    loc1 = dif.local_mixture(ens, neighbours=30, bandwidth=1.0)
    assert torch.allclose(loc1.mean[0], ens[:30].mean(0), atol=1e-12)    # 30 nearest of a point in A = A
    fit = dif.fitted_mixture(ens, components=2)
    order = torch.argsort(fit.mean[:, 0], descending=True)
    covs = fit.vecs @ torch.diag_embed(fit.vals) @ fit.vecs.transpose(-1, -2)
    for k, blk in zip(order, (a, b)):
        assert np.allclose(fit.mean[k].numpy(), blk.mean(0), atol=1e-10)
        assert np.allclose(covs[k].numpy(), np.cov(blk.T, bias=True), atol=1e-5)
    assert np.allclose(np.exp(fit.log_weight[order].numpy()), [0.6, 0.4], atol=1e-10)
    # a diagonal taper: the EM fit of axis-aligned Gaussians (per-block means and variances, no covariance)
    diag = dif.fitted_mixture(ens, components=2, taper=torch.eye(2, dtype=F64))
    dcov = diag.vecs @ torch.diag_embed(diag.vals) @ diag.vecs.transpose(-1, -2)
    for k, blk in zip(torch.argsort(diag.mean[:, 0], descending=True), (a, b)):
        assert np.allclose(diag.mean[k].numpy(), blk.mean(0), atol=1e-10)
        assert np.allclose(np.diag(dcov[k].numpy()), blk.var(0), atol=1e-5)
        assert abs(float(dcov[k][0, 1])) < 1e-12
    # the tapered neighbourhood covariance is the Schur product of the untapered one
    taper = t64([[1.0, 0.25], [0.25, 1.0]])
    lt = dif.local_mixture(ens, neighbours=30, bandwidth=1.0, taper=taper)
    cov_lt = lt.vecs @ torch.diag_embed(lt.vals) @ lt.vecs.transpose(-1, -2)
    cov_l1 = loc1.vecs @ torch.diag_embed(loc1.vals) @ loc1.vecs.transpose(-1, -2)
    assert torch.allclose(cov_lt, cov_l1 * taper, atol=1e-12)
    with pytest.raises(InputError, match="neighbours"):
        dif.local_mixture(ens, neighbours=80)
    with pytest.raises(InputError, match="bandwidth"):
        dif.local_mixture(ens, neighbours=5, bandwidth=1.5)


def test_radius_localises_the_fitted_mixture_in_the_posterior_score():
    """``radius`` reaches the fitted mixture: the score equals the exact forcing of the mixture
    fitted with the same ring taper (diagonal at radius 0.25 on two variables), not the untapered one."""
    g = torch.Generator().manual_seed(3)
    ens = t64([[3.0, 3.0], [0.8, 0.8]])[torch.arange(60) % 2] + 0.1 * torch.randn(60, 2, generator=g, dtype=F64)
    op = observe_indices(2, [0], sd=0.1)
    y, x, sched = t64([4.0]), torch.randn(7, 2, generator=g, dtype=F64) + 2.0, dif.VPLinear()
    a, s2 = sched.alpha(0.2), sched.sigma2(0.2)
    got = dif.posterior_score(ens, y, op, forcing="weighted", components=2, radius=0.25)(x, 0.2)
    taper = ring_taper(2, 0.25)
    assert float(taper[0, 1]) == 0.0
    for tp, same in ((taper, True), (None, False)):
        mix = dif.fitted_mixture(ens, components=2, taper=tp)
        want = dif.exact_forcing(mix, dif.linearise(mix, y, op), x, a, s2, forcing=False)[1]
        assert torch.allclose(got, want, atol=1e-10) is same


# -- samplers against exact posteriors -------------------------------------------------------------------------

def _sample_exact(mix, lin, sched, settings, m, seed, post):
    """Reverse-integrate the exact posterior score from the exact noised posterior at t = 1 (the
    deterministic ODE would otherwise carry any terminal mismatch through to the samples)."""
    pm, pc, pw = post
    score = lambda x, t: dif.exact_forcing(mix, lin, x, sched.alpha(t), sched.sigma2(t))[1]  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    a, s2 = sched.alpha(1.0), sched.sigma2(1.0)
    comp = torch.multinomial(t64(pw), m, replacement=True, generator=g).numpy()
    roots = [np.linalg.cholesky(a * a * c + s2 * np.eye(c.shape[0])) for c in pc]
    z = torch.randn(m, pm.shape[-1], generator=g, dtype=F64).numpy()
    start = np.stack([a * pm[k] + roots[k] @ zi for k, zi in zip(comp, z)])
    return dif.reverse(score, t64(start), sched, settings, g)


@pytest.mark.parametrize("method,noise,steps", [("sde", None, 400), ("ode", None, 400), ("exponential", 0.0, 200),
                                                ("exponential", 1.0, 200), ("interpolant", 0.5, 400)])
def test_integrators_reproduce_a_bimodal_posterior(method, noise, steps):
    """Gaussian-mixture prior, linear-Gaussian observation, exact noised-posterior score: mean within
    3 standard errors, covariance within 5 %, mode weight inside a 3-sigma binomial interval."""
    means = np.array([[2.0, 1.0], [-1.0, -1.5]])
    covs = np.array([[[0.5, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.6]]])
    w = np.array([0.5, 0.5])
    h, r, y = np.array([[1.0, 1.0]]), np.array([[1.5]]), np.array([0.6])
    pm, pc, pw = gm_posterior(means, covs, w, h, r, y)
    mix = dif.gaussian_mixture(t64(means), t64(covs), t64(np.log(w)))
    lin = dif.linearise(mix, t64(y), observe_linear(h, cov=r))
    sched = dif.VPLinear()
    m = 6000
    x = _sample_exact(mix, lin, sched, dif.check_sampler(method, steps, 1e-4, noise), m, 11, (pm, pc, pw)).numpy()
    mean = pw @ pm
    cov = sum(wk * (ck + np.outer(mk - mean, mk - mean)) for wk, mk, ck in zip(pw, pm, pc))
    se = np.sqrt(np.diag(cov) / m)
    assert np.all(np.abs(x.mean(0) - mean) < 3 * se), (x.mean(0), mean, se)
    assert np.abs(np.cov(x.T) - cov).max() / np.abs(cov).max() < 0.05
    # classify by the posterior component density
    lab = mvn(pm[0], pc[0]).logpdf(x) + math.log(pw[0]) > mvn(pm[1], pc[1]).logpdf(x) + math.log(pw[1])
    p0 = pw[0]
    # the exact samples' own misclassification rate is below 1e-3 here
    assert abs(lab.mean() - p0) < 3 * math.sqrt(p0 * (1 - p0) / m) + 1e-3, (lab.mean(), p0)


def test_langevin_corrector_keeps_the_target():
    rng = np.random.default_rng(7)
    m0, p0 = np.array([1.0, -1.0]), random_spd(rng, 2)
    mix = dif.gaussian_mixture(t64(m0[None]), t64(p0[None]))
    h, r, y = np.eye(2)[:1], np.array([[0.5]]), np.array([2.0])
    lin = dif.linearise(mix, t64(y), observe_linear(h, cov=r))
    ma, pa = kalman(m0, p0, h, r, y)
    x = _sample_exact(mix, lin, dif.VPCosine(), dif.check_sampler("ode", 100, 1e-4, corrector_steps=2), 6000, 3,
                      (ma[None], pa[None], np.ones(1)))
    x = x.numpy()
    assert np.all(np.abs(x.mean(0) - ma) < 3 * np.sqrt(np.diag(pa) / 6000))
    assert np.abs(np.cov(x.T) - pa).max() / np.abs(pa).max() < 0.05


@pytest.mark.parametrize("forcing", ["gaussian", "weighted"])
def test_linear_gaussian_analysis_approaches_kalman(forcing):
    """Members from N(m, P), linear-Gaussian y: the analysis mean and covariance approach the Kalman
    update of the true prior as N grows (tolerances: a few Monte Carlo standard errors at the larger N)."""
    rng = np.random.default_rng(8)
    d = 3
    m, p = np.array([0.5, -1.0, 2.0]), random_spd(rng, d)
    h, r, y = np.eye(d)[[0, 2]], np.diag([0.8, 0.6]), np.array([1.0, 1.5])
    ma, pa = kalman(m, p, h, r, y)
    op = observe_linear(h, cov=r)
    errs = []
    big = 4000 if forcing == "gaussian" else 2000         # the weighted forcing is O(N^2) per step
    for n in (50, big):
        ens = rng.multivariate_normal(m, p, size=n)
        x = dif.analysis(ens, y, op, forcing=forcing, steps=400 if forcing == "gaussian" else 200, seed=n).numpy()
        errs.append(np.abs(x.mean(0) - ma).max())
        if n == big:
            se = np.sqrt(np.diag(pa) / n)
            assert np.all(np.abs(x.mean(0) - ma) < 4 * se * math.sqrt(2)), (x.mean(0), ma)
            assert np.abs(np.cov(x.T) - pa).max() / np.abs(pa).max() < 0.08
    assert errs[1] < errs[0]


def test_seed_bimodal_case_best_variant():
    """The seed's test: a two-component fitted prior with the exact forcing puts every particle in
    the observed mode, with its mean near the exact (3.5, 3.0)."""
    g = torch.Generator().manual_seed(0)
    comp = torch.arange(100) % 2
    ens = t64([[3.0, 3.0], [0.8, 0.8]])[comp] + 0.1 * torch.randn(100, 2, generator=g, dtype=F64)
    op = observe_indices(2, [0], sd=0.1)
    x = dif.analysis(ens, t64([4.0]), op, forcing="weighted", components=2, sampler="exponential", steps=100, seed=1)
    assert float((x[:, 1] < 1.9).double().mean()) == 0.0           # the unobserved coordinate tells the mode
    assert abs(float(x[:, 0].mean()) - 3.5) < 0.1 and abs(float(x[:, 1].mean()) - 3.0) < 0.1
    assert 0.7 < float(x[:, 0].std()) / 0.0707 < 1.3


# -- batching, filters ---------------------------------------------------------------------------------------

def test_batched_problems_equal_separate_scores():
    rng = np.random.default_rng(9)
    ens = t64(rng.normal(size=(3, 10, 4)))
    y = t64(rng.normal(size=(3, 2)))
    op = observe_indices(4, [0, 2], sd=0.7)
    x = t64(rng.normal(size=(3, 5, 4)))
    for forcing, kw in (("weighted", {"bandwidth": 0.3}), ("gaussian", {}), ("ensemble", {"conditional": True}),
                        ("weighted", {"components": 2})):
        both = dif.posterior_score(ens, y, op, forcing=forcing, **kw)(x, 0.3)
        for i in range(3):
            one = dif.posterior_score(ens[i], y[i], op, forcing=forcing, **kw)(x[i], 0.3)
            assert torch.allclose(both[i], one, atol=1e-11, rtol=0), forcing


@pytest.mark.parametrize("name,params,sd,bound", [
    ("diffusion", {"members": 20, "forcing": "gaussian", "steps": 30}, 2.0, 2.0),
    ("diffusion", {"members": 20, "bandwidth": 0.5, "steps": 30}, 2.0, 2.0),
    # EnSF's paired prior score pins each particle near its own forecast member: weak updates
    ("ensf", {"members": 20, "steps": 50}, 0.5, 4.0)])
def test_cycled_lorenz63_beats_climatology(name, params, sd, bound):
    model = daml.models.Lorenz63()
    obs = daml.models.observe_all(3, sd=sd)
    data = daml.simulate(model, 200, obs, every=5, x0=np.array([1.0, 1.0, 20.0]), x0_cov=1.0, seed=3)
    res = daml.filters.run(daml.filters.make_filter(name, **params), model, data, seed=1, progress=False)
    rmse = float(daml.diagnostics.rmse(res.analysis, data["truth"]).mean())
    assert rmse < bound, rmse                     # climatology ~ 8 on L63


# -- bad input -----------------------------------------------------------------------------------------------

def test_bad_input_raises_named_errors():
    ens = torch.zeros(10, 2, dtype=F64) + torch.arange(10, dtype=F64)[:, None] * 0.1
    op = observe_indices(2, [0], sd=0.1)
    y = t64([1.0])
    with pytest.raises(InputError, match="bandwidth"):
        dif.analysis(ens, y, op, bandwidth=-0.1)
    for bad in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(InputError, match="t_min"):
            dif.analysis(ens, y, op, t_min=bad)
    with pytest.raises(ShapeError, match="y"):
        dif.analysis(ens, t64([1.0, 2.0]), op)
    with pytest.raises(ShapeError, match="members"):
        dif.analysis(torch.zeros(10, 3, dtype=F64), y, op)
    with pytest.raises(InputError, match="forcing"):
        dif.analysis(ens, y, op, forcing="magic")
    with pytest.raises(InputError, match="neighbours/components"):
        dif.analysis(ens, y, op, neighbours=3, components=2)
    with pytest.raises(InputError, match="noise"):
        dif.analysis(ens, y, op, sampler="ode", noise=0.5)
    with pytest.raises(InputError, match="sampler"):
        dif.analysis(ens, y, op, sampler="heun")
    with pytest.raises(InputError, match="bandwidth"):
        daml.filters.make_filter("diffusion", members=10, bandwidth=-1.0)


def test_non_finite_score_stops_with_step_and_time():
    calls = []

    def score(x, t):
        calls.append(t)
        return -x if len(calls) < 4 else x * float("nan")

    g = torch.Generator().manual_seed(0)
    settings = dif.check_sampler("sde", 10, 1e-3)
    with pytest.raises(DivergenceError, match=r"reverse step 3, pseudo-time t = 0\.1"):
        dif.reverse(score, torch.zeros(5, 2, dtype=F64), dif.VPLinear(), settings, g)


def test_analysis_is_reproducible_with_a_seed():
    ens = torch.randn(20, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    op = observe_indices(3, [1], sd=0.5)
    a = dif.analysis(ens, t64([0.5]), op, bandwidth=0.2, steps=20, seed=5)
    b = dif.analysis(ens, t64([0.5]), op, bandwidth=0.2, steps=20, seed=5)
    assert torch.equal(a, b) and a.shape == (20, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_unchanged():
    ens = torch.randn(2, 20, 40, dtype=F64, device="cuda")
    op = daml.models.observe_every(40, 2, sd=1.0)
    x = dif.analysis(ens, torch.zeros(2, 20, dtype=F64, device="cuda"), op, forcing="ensemble", steps=10, seed=0)
    assert x.device.type == "cuda" and bool(torch.isfinite(x).all())
