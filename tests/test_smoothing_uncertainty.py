"""daml.smoothing.uncertainty: Gaussian (mixture) smoothed posteriors, held-out weights, variance
scale and calibration scores (issue 29, item 3)."""

import math

import numpy as np
import pytest
import scoringrules as sr
import torch
from scipy import stats

import daml
from daml.errors import InputError, NonFiniteError, ShapeError
from daml.smoothing.uncertainty import calibration, held_out_weights, mixture_posterior, variance_scale

D = torch.float64


def _spd(shape, n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, n, n, dtype=D, generator=g)
    return scale * (a @ a.transpose(-1, -2) / n + 0.2 * torch.eye(n, dtype=D))


def _components(c=3, batch=(2,), t=5, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(c, *batch, t, n, dtype=D, generator=g)
    cov = _spd((c, *batch, t), n, seed + 1)
    lw = torch.randn(c, dtype=D, generator=g)
    return mu, cov, lw


def test_one_gaussian_scores_equal_scoringrules_and_scipy():
    mu, cov, _ = _components(c=1)
    g = torch.Generator().manual_seed(5)
    truth = mu[0] + torch.randn(mu.shape[1:], dtype=D, generator=g)
    got = calibration(mu[0, 0], cov[0, 0], truth[0])           # (T, n): one component without the leading axis
    m, s, y = mu[0, 0].numpy().ravel(), np.sqrt(np.diagonal(cov[0, 0].numpy(), axis1=-2, axis2=-1)).ravel(), \
        truth[0].numpy().ravel()
    assert got["crps"] == pytest.approx(float(np.mean(sr.crps_normal(y, m, s))), rel=1e-10)
    assert got["nll"] == pytest.approx(float(-np.mean(stats.norm.logpdf(y, m, s))), rel=1e-10)
    assert got["rmse"] == pytest.approx(float(np.sqrt(np.mean((y - m) ** 2))), rel=1e-12)
    lo, hi = stats.norm.ppf(0.05, m, s), stats.norm.ppf(0.95, m, s)
    assert got["coverage"] == pytest.approx(float(np.mean((y >= lo) & (y <= hi))))
    assert got["spread"] == pytest.approx(float(np.sqrt(np.mean(s ** 2))), rel=1e-12)


def test_mixture_scores_equal_scoringrules_mixnorm_and_the_mixture_quantiles():
    mu, cov, lw = _components()
    truth = mu[0] + 0.5
    got = calibration(mu, cov, truth, lw, variables=[0, 2])
    w = torch.softmax(lw, 0).numpy()
    loc = mu[..., [0, 2]].numpy().reshape(3, -1).T
    sd = np.sqrt(np.diagonal(cov.numpy(), axis1=-2, axis2=-1))[..., [0, 2]].reshape(3, -1).T
    y = truth[..., [0, 2]].numpy().ravel()
    ref = sr.crps_mixnorm(y, loc, sd, np.broadcast_to(w, loc.shape), backend="numpy")
    assert got["crps"] == pytest.approx(float(np.mean(ref)), rel=1e-8)
    dens = (w * stats.norm.pdf(y[:, None], loc, sd)).sum(1)
    assert got["nll"] == pytest.approx(float(-np.mean(np.log(dens))), rel=1e-10)
    cdf = lambda v: (w * stats.norm.cdf(v[:, None], loc, sd)).sum(1)
    inside = (cdf(y) >= 0.05) & (cdf(y) <= 0.95)
    assert got["coverage"] == pytest.approx(float(inside.mean()))
    mean = (w * loc).sum(1)
    var = (w * (sd ** 2 + loc ** 2)).sum(1) - mean ** 2
    assert got["rmse"] == pytest.approx(float(np.sqrt(np.mean((y - mean) ** 2))), rel=1e-12)
    assert got["spread_skill"] == pytest.approx(float(np.sqrt(var.mean()) / np.sqrt(np.mean((y - mean) ** 2))), rel=1e-10)


def test_a_calibrated_gaussian_covers_its_level_and_its_spread_matches_its_error():
    # 4 x 2000 x 3 = 24000 scalar draws: coverage sd sqrt(0.9 * 0.1 / 24000) = 0.002 (tolerance 5 sd);
    # spread-skill ratio within 2 %.
    mu = torch.zeros(4, 2000, 3, dtype=D)
    cov = _spd((4, 2000), 3, 7)
    g = torch.Generator().manual_seed(11)
    truth = (torch.linalg.cholesky(cov) @ torch.randn(4, 2000, 3, 1, dtype=D, generator=g)).squeeze(-1)
    got = calibration(mu.unsqueeze(0), cov.unsqueeze(0), truth)
    assert abs(got["coverage"] - 0.9) < 0.01
    assert abs(got["spread_skill"] - 1.0) < 0.02
    # the fitted variance scale of a covariance half the truth's is about 2 (MC: 24000 draws, 3 %)
    assert variance_scale(mu.unsqueeze(0), 0.5 * cov.unsqueeze(0), truth) == pytest.approx(2.0, rel=0.03)
    over = calibration(mu.unsqueeze(0), 0.25 * cov.unsqueeze(0), truth)
    assert over["coverage"] < 0.7 and over["spread_skill"] < 0.6      # over-confident is visible


def test_variance_scale_of_identical_components_is_the_closed_form():
    mu, cov, _ = _components(c=1)
    truth = mu[0] + 0.3
    one = variance_scale(mu, cov, truth)
    two = variance_scale(torch.cat([mu, mu]), torch.cat([cov, cov]), truth, torch.zeros(2, dtype=D))
    assert two == pytest.approx(one, rel=1e-6)
    z = ((truth - mu[0]) / torch.diagonal(cov[0], dim1=-2, dim2=-1).sqrt()) ** 2
    assert one == pytest.approx(float(z.mean()), rel=1e-12)


def test_held_out_weights_are_normalised_joint_gaussian_log_densities():
    mu, cov, _ = _components(c=4, batch=(2,), t=3, n=2)
    truth = mu[1] + 0.1
    res = held_out_weights(mu, cov, truth)
    dens = np.array([sum(stats.multivariate_normal.logpdf(truth[b, t].numpy(), mu[c, b, t].numpy(), cov[c, b, t].numpy())
                         for b in range(2) for t in range(3)) for c in range(4)])
    assert np.allclose(res.log_density.numpy(), dens, rtol=1e-10)
    w = np.exp(dens - dens.max()) / np.exp(dens - dens.max()).sum()
    assert np.allclose(res.log_weight.exp().numpy(), w, rtol=1e-10)
    assert res.ess == pytest.approx(1.0 / float((w ** 2).sum()))
    assert int(torch.argmax(res.log_weight)) == 1        # the member the truth sits next to


def test_mixture_posterior_sigma_points_match_the_mixture_moments_exactly():
    mu, cov, lw = _components()
    post = mixture_posterior(mu, cov, lw, time=np.arange(5) * 0.5, method="hybrid")
    assert post.x.dims == ("time", "sequence", "member", "variable") and post.sizes["member"] == 3 * 6
    w = np.exp(post.log_weight.values)
    assert np.isclose(w.sum(), 1.0)
    x = post.x.values                                      # (T, B, M, n)
    m = np.einsum("m,tbmi->tbi", w, x)
    assert np.allclose(m, post["mean"].values, atol=1e-12)
    d = x - m[:, :, None, :]
    c = np.einsum("m,tbmi,tbmj->tbij", w, d, d)
    assert np.allclose(c, post["cov"].values, atol=1e-12)
    # the mixture moments themselves, directly
    wt = torch.softmax(lw, 0)
    assert np.allclose(post["mean"].values, torch.einsum("c,cbti->tbi", wt, mu).numpy(), atol=1e-12)


def test_mixture_posterior_samples_are_seeded_and_have_the_right_moments():
    mu = torch.tensor([[[1.0, -2.0]]], dtype=D)            # one component, T = 1, n = 2
    cov = torch.tensor([[[[2.0, 0.6], [0.6, 1.0]]]], dtype=D)
    a = mixture_posterior(mu, cov, samples=20000, seed=3)
    b = mixture_posterior(mu, cov, samples=20000, seed=3)
    assert np.array_equal(a.x.values, b.x.values)
    x = a.x.values[0]                                      # (M, n)
    # MC: 20000 draws, standard errors about 0.01 on the mean and 0.02 on the covariance
    assert np.allclose(x.mean(0), [1.0, -2.0], atol=0.05)
    assert np.allclose(np.cov(x.T), cov[0, 0].numpy(), atol=0.08)


def test_bad_input_is_named():
    mu, cov, lw = _components()
    with pytest.raises(ShapeError, match="covs"):
        calibration(mu, cov[..., :2], mu[0])
    with pytest.raises(ShapeError, match="truth"):
        calibration(mu, cov, mu[0, :, :2])
    with pytest.raises(ShapeError, match="log_weight"):
        calibration(mu, cov, mu[0], lw[:2])
    with pytest.raises(InputError, match="level"):
        calibration(mu, cov, mu[0], level=1.0)
    with pytest.raises(InputError, match="variables"):
        calibration(mu, cov, mu[0], variables=[5])
    bad = mu.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="means"):
        calibration(bad, cov, mu[0])
    with pytest.raises(NonFiniteError, match="log_weight"):
        calibration(mu, cov, mu[0], torch.tensor([float("nan"), 0.0, 0.0], dtype=D))
    with pytest.raises(InputError, match="covs"):
        calibration(mu, -cov, mu[0])
    with pytest.raises(InputError, match="samples"):
        mixture_posterior(mu, cov, samples=0)
    with pytest.raises(InputError, match="batch_dims"):
        mixture_posterior(mu, cov, batch_dims=("a", "b"))


def test_hybrid_covariance_is_the_chain_covariance_at_the_estimate_and_names_its_arguments():
    from daml import models as M
    from daml.smoothing import HybridSmoother, hybrid_covariance, linearised_covariance

    model, op = M.LinearDrag(dims=1), M.observe_indices(3, [0], sd=0.5)
    q = 0.05 * torch.eye(3, dtype=D)
    sm = HybridSmoother(model, op, gamma=0.02, iterations=3, noise_cov=q, hidden=4, seed=0)
    y = torch.ones(2, 6, 1, dtype=D)
    y[1, 4:] = float("nan")
    est = sm(y, seed=0).mean.detach()
    got = hybrid_covariance(sm, est, y)
    ref = linearised_covariance(model, est, operator=op, prior=None, noise_cov=q, mask=torch.isfinite(y))
    assert torch.equal(got, ref)
    assert got[1, 5, 0, 0] > got[0, 5, 0, 0]              # an unobserved end is less certain
    with pytest.raises(ShapeError, match="estimate"):
        hybrid_covariance(sm, est[..., :2], y)
    with pytest.raises(NonFiniteError, match="estimate"):
        hybrid_covariance(sm, est * float("nan"), y)
    with pytest.raises(InputError, match="smoother"):
        hybrid_covariance(object(), est, y)


def test_hybrid_posterior_is_the_mixture_of_the_members_estimates_and_covariances():
    from daml import models as M
    from daml.smoothing import HybridSmoother, hybrid_covariance, hybrid_posterior

    model, op = M.LinearDrag(dims=1), M.observe_indices(3, [0], sd=0.5)
    q = 0.05 * torch.eye(3, dtype=D)
    members = [HybridSmoother(model, op, gamma=0.02, iterations=4, noise_cov=q, hidden=4, seed=s) for s in (0, 1)]
    y = torch.linspace(0, 1, 12, dtype=D).reshape(2, 6, 1)
    lw = torch.tensor([0.0, -1.0], dtype=D)
    post = hybrid_posterior(members, y, log_weight=lw, scale=2.0, seed=5)
    assert post.attrs["method"] == "hybrid" and members[0].training          # the train/eval mode is restored
    from daml._device import seed_sequence
    s0 = seed_sequence(5).spawn(2)[0]
    with torch.no_grad():
        est = [m.eval()(y, seed=s0).mean for m in members]
    w = torch.softmax(lw, 0)
    mean = w[0] * est[0] + w[1] * est[1]
    assert np.allclose(post["mean"].values, mean.movedim(-2, 0).numpy(), atol=1e-12)
    c0 = 2.0 * hybrid_covariance(members[0], est[0], y)
    one = hybrid_posterior(members[0].train(), y, scale=2.0, seed=5)
    assert np.allclose(one["cov"].values, c0.movedim(-3, 0).numpy(), atol=1e-12)
    with pytest.raises(InputError, match="smoothers"):
        hybrid_posterior([], y)
    with pytest.raises(InputError, match="scale"):
        hybrid_posterior(members, y, scale=0.0)


def test_a_variance_scale_at_the_search_bound_warns():
    from daml.errors import ConvergenceWarning

    mu, cov, lw = _components()
    with pytest.warns(ConvergenceWarning, match="search bound"):
        c = variance_scale(mu, 1e-9 * cov, mu[0] + 1.0, lw)       # covariances far too small for the errors
    assert c == pytest.approx(math.exp(12.0), rel=1e-3)
