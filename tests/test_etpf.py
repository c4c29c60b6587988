"""Ensemble transforms and the ensemble transform particle filters (global and local)."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

import daml
from daml import filters, models
from daml.errors import InputError, ShapeError
from daml.transport import ensemble_transform, second_order_correction
from daml.transport.transform import squared_distances


def _weighted(n=60, d=3, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    lw = -0.5 * (x[:, 0] - 1.0) ** 2 / 2.0
    return x, lw


def _moments(x, w=None):
    if w is None:
        w = torch.full(x.shape[:-1], 1.0 / x.shape[-2], dtype=x.dtype)
    m = (w.unsqueeze(-1) * x).sum(-2)
    a = x - m.unsqueeze(-2)
    return m, (a * w.unsqueeze(-1)).transpose(-1, -2) @ a


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_transform_keeps_the_weighted_mean_and_shrinks_the_spread(solver):
    x, lw = _weighted()
    w = torch.softmax(lw, 0)
    res = ensemble_transform(x, lw, solver=solver, epsilon=0.02, tol=1e-10, max_iter=100000)
    assert bool(res.converged)
    m_w, cov_w = _moments(x, w)
    m, cov = _moments(res.x)
    assert torch.allclose(m, m_w, atol=1e-8)
    assert torch.all(torch.diagonal(cov) <= torch.diagonal(cov_w) + 1e-12)
    t = res.transform
    assert torch.allclose(t.sum(0), torch.ones(60, dtype=torch.float64), atol=1e-8)   # convex combinations
    assert torch.allclose(t.sum(1), 60 * w, atol=1e-8)
    assert bool((t >= -1e-15).all())


def test_exact_transform_is_n_times_pots_emd_plan():
    x, lw = _weighted(n=40, seed=3)
    w = torch.softmax(lw, 0).numpy()
    c = ((x.numpy()[:, None] - x.numpy()[None]) ** 2).sum(-1)
    plan = ot.emd(w, np.full(40, 1 / 40), c)
    res = ensemble_transform(x, lw, solver="emd")
    assert np.allclose(res.transform.numpy(), 40 * plan, atol=1e-12)
    assert np.allclose(res.x.numpy(), 40 * plan.T @ x.numpy(), atol=1e-12)


def test_sinkhorn_transform_approaches_the_exact_one_as_epsilon_shrinks():
    x, lw = _weighted(n=50, seed=5)
    exact = ensemble_transform(x, lw, solver="emd").x
    gaps = [float((ensemble_transform(x, lw, epsilon=e, tol=1e-9, max_iter=200000).x - exact).abs().max())
            for e in (0.2, 0.05, 0.01, 0.002)]
    assert gaps[2] < gaps[0] and gaps[3] < gaps[1]
    assert gaps[-1] < 0.2 * gaps[0]


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_second_order_correction_reproduces_weighted_mean_and_covariance(solver):
    x, lw = _weighted(n=30, d=4, seed=7)
    w = torch.softmax(lw, 0)
    res = ensemble_transform(x, lw, solver=solver, second_order=True, tol=1e-10, max_iter=100000)
    m_w, cov_w = _moments(x, w)
    m, cov = _moments(res.x)
    assert torch.allclose(m, m_w, atol=1e-8)
    assert torch.allclose(cov, cov_w, atol=1e-8, rtol=1e-7)
    t = res.transform
    assert torch.allclose(t.sum(0), torch.ones(30, dtype=torch.float64), atol=1e-8)


def test_second_order_correction_is_the_identity_where_nothing_is_missing():
    n = 12
    t = torch.eye(n, dtype=torch.float64)                       # equal weights, members unchanged
    lw = torch.full((n,), -math.log(n), dtype=torch.float64)
    assert torch.allclose(second_order_correction(t, lw), t, atol=1e-12)


def test_second_order_correction_is_minimal():
    """No other moment-matching transform of the same form is closer to T (random competitors)."""
    x, lw = _weighted(n=10, d=2, seed=2)
    t = ensemble_transform(x, lw, solver="emd").transform
    best = second_order_correction(t, lw)
    n = 10
    from daml.transport.transform import _complement_basis
    v = _complement_basis(n, t)
    w = torch.softmax(lw, 0)
    a = n * (v.T @ (torch.diag(w) - torch.outer(w, w)) @ v)
    evals, evecs = torch.linalg.eigh(a)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        u, _ = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=g, dtype=torch.float64))
        other = t + v @ (root @ u - v.T @ t @ v) @ v.T
        assert float((best - t).norm()) <= float((other - t).norm()) + 1e-10


def test_transform_is_batched_over_leading_dimensions():
    xs, lws = zip(*[_weighted(n=20, seed=s) for s in range(6)])
    x, lw = torch.stack(xs).reshape(2, 3, 20, 3), torch.stack(lws).reshape(2, 3, 20)
    batch = ensemble_transform(x, lw, tol=1e-10, max_iter=100000)
    corrected = ensemble_transform(x, lw, second_order=True, tol=1e-10, max_iter=100000)
    assert batch.x.shape == x.shape and batch.iterations.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            one = ensemble_transform(x[i, j], lw[i, j], tol=1e-10, max_iter=100000)
            assert torch.allclose(one.x, batch.x[i, j], atol=1e-10)
            # the Procrustes factor is not unique along directions with (near-)zero weight, where the
            # batched and the single SVD may pick different bases; the moments agree exactly
            one = ensemble_transform(x[i, j], lw[i, j], second_order=True, tol=1e-10, max_iter=100000)
            for a, b in zip(_moments(one.x), _moments(corrected.x[i, j])):
                assert torch.allclose(a, b, atol=1e-9)


def test_squared_distances():
    x, _ = _weighted(n=15)
    c = squared_distances(x)
    assert torch.allclose(c, torch.cdist(x, x) ** 2, atol=1e-10)
    assert bool((torch.diagonal(c) == 0).all()) and bool((c >= 0).all())


def test_transform_bad_input():
    x, lw = _weighted(n=10)
    with pytest.raises(ShapeError, match="log_weight"):
        ensemble_transform(x, lw[:-1])
    with pytest.raises(InputError, match="solver"):
        ensemble_transform(x, lw, solver="greedy")
    with pytest.raises(InputError, match="epsilon"):
        ensemble_transform(x, lw, epsilon=0.0)
    with pytest.raises(InputError, match="log_weight"):
        ensemble_transform(x, torch.full((10,), -math.inf, dtype=torch.float64))
    with pytest.raises(ShapeError, match="cost"):
        ensemble_transform(x, lw, cost=torch.zeros(9, 9))


def test_all_members_equal_is_not_an_error():
    x = torch.ones(8, 2, dtype=torch.float64)
    lw = torch.linspace(-3, 0, 8, dtype=torch.float64)
    res = ensemble_transform(x, lw)
    assert torch.allclose(res.x, x)


# -- the filters ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def linear_problem():
    m = np.array([[0.95, 0.1], [-0.1, 0.9]])
    model = models.LinearModel(m, noise_cov=0.2)
    obs = models.observe_all(2, sd=0.7)
    data = daml.simulate(model, 8, obs, every=2, x0=np.zeros(2), x0_cov=1.0, experiments=16, seed=11)
    kf = filters.run(filters.kalman_filter(), model, data, seed=0, progress=False)
    return model, data, kf


def _final_mean_error(post, kf):
    mean = post.daml.mean()["x"].isel(time=-1)
    ref = kf.analysis.daml.mean()["x"].isel(time=-1)
    sd = np.sqrt(kf.analysis.daml.var()["x"].isel(time=-1))
    return float((np.abs(mean - ref) / sd).mean())


@pytest.mark.parametrize("kw", [{"solver": "emd"}, {"solver": "sinkhorn", "epsilon": 0.01, "second_order": True}])
def test_etpf_approaches_the_kalman_filter_as_members_grow(linear_problem, kw):
    """Monte Carlo limit: 16x more members at least halve the mean error against the KF, and the
    large ensemble is within 0.15 KF standard deviations (averaged over 16 experiments)."""
    model, data, kf = linear_problem
    errs = []
    for n in (25, 400):
        res = filters.run(filters.etpf(members=n, **kw), model, data, seed=5, progress=False)
        daml.validate(res.analysis)
        errs.append(_final_mean_error(res.analysis, kf))
    assert errs[1] < 0.5 * errs[0]
    assert errs[1] < 0.15


def test_etpf_reports_evidence_ess_and_transport_error(linear_problem):
    model, data, kf = linear_problem
    res = filters.run(filters.etpf(members=50), model, data, seed=1, progress=False)
    post = res.analysis
    for key in ("ess", "loglik", "transport_error", "unconverged"):
        assert key in post
    assert float(post["transport_error"].max()) <= 1e-6
    assert float(post["unconverged"].max()) == 0
    assert np.allclose(post["log_weight"], -math.log(50))


def test_local_etpf_with_infinite_radius_is_the_global_etpf():
    model = models.Lorenz96(n=8, forcing=8.0, dt=0.05)
    obs = models.observe_all(8, sd=1.0)
    data = daml.simulate(model, 3, obs, x0=np.full(8, 8.0) + np.arange(8) * 0.1, x0_cov=1.0, seed=2)
    # the entropic plan is a smooth function of the inputs (an exact plan can jump between vertices
    # of a nearly degenerate transport polytope on rounding-level differences)
    kw = {"members": 16, "tol": 1e-12, "max_iter": 100000}
    glob = filters.run(filters.etpf(**kw), model, data, seed=3, progress=False)
    loc = filters.run(filters.letpf(radius=math.inf, **kw), model, data, seed=3, progress=False)
    assert np.allclose(glob.analysis["x"], loc.analysis["x"], atol=1e-8)


@pytest.mark.parametrize("make", [lambda: filters.etpf(members=16, tol=1e-8, max_iter=100000),
                                  lambda: filters.etpf(members=16, solver="emd", second_order=True),
                                  lambda: filters.letpf(members=16, radius=1.0, tol=1e-8, max_iter=100000)],
                         ids=["etpf-sinkhorn", "etpf-emd-second-order", "letpf"])
def test_etpfs_run_on_every_device(make, device):
    """The same calls on each device of the machine (CUDA where there is one): a valid equal-weight
    posterior with every transport problem solved to its tolerance."""
    model = models.Lorenz96(n=8, forcing=8.0, dt=0.05)
    obs = models.observe_indices(8, [0, 2, 4, 6], sd=1.0)
    data = daml.simulate(model, 3, obs, x0=np.full(8, 8.0) + np.arange(8) * 0.1, x0_cov=1.0, seed=2)
    post = filters.run(make(), model, data, seed=3, progress=False, device=device, dtype=torch.float64).analysis
    daml.validate(post)
    assert np.isfinite(post["x"]).all()
    assert np.allclose(post["log_weight"], -math.log(16))
    assert float(post["transport_error"].max()) <= 1e-8 and float(post["unconverged"].max()) == 0
    assert float(post["x"].std("member").min()) > 0.0          # the transform does not collapse the ensemble


def test_local_etpf_only_moves_variables_near_the_observations():
    model = models.Lorenz96(n=20, forcing=8.0, dt=0.05)
    obs = models.observe_indices(20, [0], sd=0.5)
    data = daml.simulate(model, 1, obs, x0=np.full(20, 8.0) + np.arange(20) * 0.01, x0_cov=1.0, seed=4)
    filt = filters.letpf(members=30, radius=1.0, solver="emd")
    res = filters.run(filt, model, data, seed=5, forecast=True, progress=False)
    before = res.forecast["x"].isel(time=0).values
    after = res.analysis["x"].isel(time=0).values
    moved = np.abs(after - before).max(axis=0)             # (variable,)
    assert moved[0] > 0.01
    far = [j for j in range(20) if min(j, 20 - j) > 4]        # beyond the 3.64-point support
    assert np.allclose(moved[far], 0.0, atol=1e-12)


def test_rejuvenation_adds_spread_and_keeps_the_mean():
    from daml.filters.etpf import _rejuvenate
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, 4, generator=g, dtype=torch.float64)
    y = _rejuvenate(x, 0.5, torch.Generator().manual_seed(1))
    assert torch.allclose(y.mean(-2), x.mean(-2), atol=1e-12)
    ratio = (y.var(-2) / x.var(-2)).mean()
    assert 1.1 < float(ratio) < 1.4                         # 1 + tau^2 = 1.25 in expectation


def test_etpf_constructors_check_their_parameters():
    with pytest.raises(InputError, match="solver"):
        filters.etpf(members=10, solver="exact")
    with pytest.raises(InputError, match="epsilon"):
        filters.etpf(members=10, epsilon=-1.0)
    with pytest.raises(InputError, match="rejuvenation"):
        filters.letpf(members=10, radius=2.0, rejuvenation=-0.1)
    with pytest.raises(InputError, match="radius"):
        filters.letpf(members=10, radius=0.0)
    with pytest.raises(InputError, match="tol"):
        filters.etpf(members=10, tol=0.0)
