"""Tests of the differentiable resamplers of daml.resampling: stop_gradient, soft, optimal_transport and the
dispatcher differentiable.

Oracles: bit-for-bit equality with the particle filter's own resampling (daml.filters.particle.resample_where),
exact gradients of weighted expectations computed by autograd without resampling (Monte Carlo limits, with
fixed seeds: each tolerance is 4 standard errors, a false-alarm rate of about 6e-5 per check with a fresh
seed), the weighted moments for the transport map, and finite differences (torch.autograd.gradcheck).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from daml import resampling as rs
from daml._device import generator
from daml.errors import ConvergenceWarning, DivergenceError, InputError, NonFiniteError, SeedError, ShapeError
from daml.filters.particle import log_normalise, resample_where

SCHEMES = ["multinomial", "systematic", "stratified", "residual"]
Z = 4.0  # Monte Carlo tolerance in standard errors


def particles(batch=(3, 4), n_particles=20, dim=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n_particles, dim, generator=g, dtype=dtype)
    lw = 2.0 * torch.randn(*batch, n_particles, generator=g, dtype=dtype)
    return x, lw


# --------------------------------------------------------------------------------------------------
# stop_gradient


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stop_gradient_forward_is_the_particle_filters_resampling(scheme):
    """Same generator: the same ancestors, the same members and log-weights exactly -log N, and the
    stream advanced by the same amount as resample_where's."""
    x, lw = particles()
    lw, _ = log_normalise(lw, "test")
    g1, g2 = generator(11), generator(11)
    flag = torch.ones(lw.shape[:-1], dtype=torch.bool)
    ref_x, ref_lw, ref_anc = resample_where(x, lw, flag, scheme, 0.0, g1)
    out = rs.stop_gradient(x, lw, scheme=scheme, seed=g2)
    assert torch.equal(out.ancestors, ref_anc)
    assert torch.equal(out.x, ref_x)
    assert torch.equal(out.log_weight, ref_lw)
    assert torch.equal(out.log_weight, torch.full_like(lw, -math.log(lw.shape[-1])))
    assert torch.equal(g1.get_state(), g2.get_state())


def _grad_problem(m, scheme, resampler, **options):
    """Per-replicate gradients of sum_j w'_j phi(x'_j) after resampling, and the exact gradient of
    sum_i w_i phi(x_i), for x_i = c_i theta + d_i, unnormalised log w_i = -(x_i - 1)^2 theta / 2 + e_i,
    phi(x) = x^2 + x, at theta = 0.7. Replicate k depends only on theta[k], so the gradient of the sum over
    replicates with respect to the (m,) vector theta holds each replicate's own gradient."""
    c = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    d = torch.tensor([0.2, 1.5, -1.0, 0.8], dtype=torch.float64)
    e = torch.tensor([0.0, 0.4, -0.3, 1.0], dtype=torch.float64)

    def system(theta):
        x = c * theta.unsqueeze(-1) + d
        return x.unsqueeze(-1), -0.5 * (x - 1.0) ** 2 * theta.unsqueeze(-1) + e

    def phi(x):
        return x[..., 0] ** 2 + x[..., 0]

    t0 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x0, lw0 = system(t0)
    exact = torch.autograd.grad((torch.softmax(lw0, -1) * phi(x0)).sum(), t0)[0]
    theta = torch.full((m,), 0.7, dtype=torch.float64, requires_grad=True)
    x, lw = system(theta)
    out = resampler(x, lw, scheme=scheme, seed=123, **options)
    value = (torch.exp(out.log_weight) * phi(out.x)).sum(-1)
    grads = torch.autograd.grad(value.sum(), theta)[0]
    target = (torch.softmax(lw0, -1) * phi(x0)).sum().detach()
    return grads, float(exact), value.detach(), float(target), out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stop_gradient_gradient_is_unbiased(scheme):
    """The mean of 20000 stop-gradient gradients lies within 4 standard errors of the exact gradient of the
    weighted expectation; the plain resampled estimate (weights held at 1/N, gradient through the particles
    only) is far outside, so the test can tell."""
    m = 20000
    grads, exact, _, _, out = _grad_problem(m, scheme, rs.stop_gradient)
    se = float(grads.std()) / math.sqrt(m)
    assert abs(float(grads.mean()) - exact) < Z * se, (float(grads.mean()), exact, se)
    assert se < 0.05 * abs(exact)                                  # the check is not vacuous
    theta = torch.full((m,), 0.7, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    d = torch.tensor([0.2, 1.5, -1.0, 0.8], dtype=torch.float64)
    xs = (c * theta.unsqueeze(-1) + d).unsqueeze(-1)
    naive = ((xs[..., 0] ** 2 + xs[..., 0]).gather(-1, out.ancestors)).mean(-1)
    naive_grads = torch.autograd.grad(naive.sum(), theta)[0]
    assert abs(float(naive_grads.mean()) - exact) > 10 * float(naive_grads.std()) / math.sqrt(m)


def test_stop_gradient_never_draws_zero_weights_and_keeps_gradients_finite():
    x, lw = particles(batch=(50,), n_particles=8)
    lw[:, [0, 3, 7]] = -math.inf
    lw.requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    out = rs.stop_gradient(xr, lw, seed=3)
    assert not bool(torch.isin(out.ancestors, torch.tensor([0, 3, 7])).any())
    (torch.exp(out.log_weight) * out.x.sum(-1)).sum().backward()
    assert bool(torch.isfinite(lw.grad).all()) and bool(torch.isfinite(xr.grad).all())
    assert bool((lw.grad[:, [0, 3, 7]] == 0).all())


@pytest.mark.parametrize("name", ["stop_gradient", "soft", "optimal_transport"])
def test_zero_weights_give_finite_values_and_gradients(name):
    x, lw = particles(batch=(6,), n_particles=8)
    lw[:, [1, 6]] = -math.inf
    lw.requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    out = rs.differentiable(name, xr, lw, seed=1)
    assert bool(torch.isfinite(out.x).all())
    (torch.exp(out.log_weight) * (out.x ** 2).sum(-1)).sum().backward()
    assert bool(torch.isfinite(lw.grad).all()) and bool(torch.isfinite(xr.grad).all())
    assert bool((lw.grad[:, [1, 6]] == 0).all())


def test_unnormalised_log_weights_far_from_zero():
    """A constant shift of the log-weights changes nothing (rows are normalised), even far beyond exp's range."""
    x, lw = particles(batch=(4,))
    a = rs.stop_gradient(x, lw, seed=5)
    b = rs.stop_gradient(x, lw + 5000.0, seed=5)
    c = rs.stop_gradient(x, lw - 5000.0, seed=5)
    assert torch.equal(b.x, c.x) and torch.equal(b.log_weight, a.log_weight)
    assert bool(torch.isfinite(b.x).all())


def test_batch_equals_rows_in_turn_on_one_stream():
    x, lw = particles(batch=(5,))
    whole = rs.stop_gradient(x, lw, scheme="multinomial", seed=9)
    g = generator(9)
    rows = [rs.stop_gradient(x[k], lw[k], scheme="multinomial", seed=g).ancestors for k in range(5)]
    assert torch.equal(whole.ancestors, torch.stack(rows))


def test_seed_types_give_the_same_stream():
    x, lw = particles()
    a = rs.stop_gradient(x, lw, seed=4).ancestors
    b = rs.stop_gradient(x, lw, seed=np.random.SeedSequence(4)).ancestors
    c = rs.stop_gradient(x, lw, seed=generator(4)).ancestors
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, rs.stop_gradient(x, lw, seed=5).ancestors)


# --------------------------------------------------------------------------------------------------
# soft


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_soft_unnormalised_is_unbiased_with_its_gradient(scheme):
    """normalise=False: E[sum_j w'_j phi(x'_j)] and its gradient equal the weighted expectation and its
    gradient (4 standard errors over 20000 replicates), and the mass sum_j w'_j has mean 1."""
    m = 20000
    grads, exact, value, target, out = _grad_problem(m, scheme, rs.soft, alpha=0.3, normalise=False)
    se = float(grads.std()) / math.sqrt(m)
    assert abs(float(grads.mean()) - exact) < Z * se
    se_v = float(value.std()) / math.sqrt(m)
    assert abs(float(value.mean()) - target) < Z * se_v
    mass = torch.exp(out.log_weight.detach()).sum(-1)
    assert abs(float(mass.mean()) - 1.0) < Z * float(mass.std()) / math.sqrt(m)
    assert float(mass.std()) > 0.01        # the weights are uneven: the mass is random


def test_soft_normalised_weights_and_gradients():
    x, lw = particles()
    lw.requires_grad_(True)
    out = rs.soft(x, lw, alpha=0.5, seed=2)
    raw = rs.soft(x, lw, alpha=0.5, seed=2, normalise=False)
    assert torch.equal(out.ancestors, raw.ancestors)
    torch.testing.assert_close(out.log_weight, torch.log_softmax(raw.log_weight, -1))
    torch.testing.assert_close(torch.logsumexp(out.log_weight, -1), torch.zeros(lw.shape[:-1], dtype=lw.dtype))
    assert float(out.log_weight.detach().std()) > 0.1         # not uniform: the weights keep information
    (torch.exp(out.log_weight) * out.x.detach()[..., 0]).sum().backward()   # gradient through the weights only
    assert float(lw.grad.abs().max()) > 1e-3


def test_soft_alpha_one_is_stop_gradient():
    """alpha = 1, unnormalised: uniform log-weights exactly -log N and the stop-gradient gradient."""
    x, lw = particles()
    lw = torch.log_softmax(lw, -1).detach()
    l1 = lw.clone().requires_grad_(True)
    l2 = lw.clone().requires_grad_(True)
    a = rs.soft(x, l1, alpha=1.0, normalise=False, seed=8)
    b = rs.stop_gradient(x, l2, seed=8)
    assert torch.equal(a.ancestors, b.ancestors)
    assert torch.equal(a.log_weight, b.log_weight)
    phi = x[..., 0] ** 2
    (torch.exp(a.log_weight) * phi.gather(-1, a.ancestors)).sum().backward()
    (torch.exp(b.log_weight) * phi.gather(-1, b.ancestors)).sum().backward()
    torch.testing.assert_close(l1.grad, l2.grad)
    assert float(l1.grad.abs().max()) > 1e-3


def test_soft_all_drawn_zero_weight_is_refused_when_normalising():
    x = torch.zeros(200, 2, 1, dtype=torch.float64)
    lw = torch.tensor([0.0, -math.inf], dtype=torch.float64).expand(200, 2)
    with pytest.raises(DivergenceError, match="soft"):
        rs.soft(x, lw, alpha=1e-6, seed=0)
    raw = rs.soft(x, lw, alpha=1e-6, seed=0, normalise=False)
    assert not bool(torch.isnan(raw.log_weight).any())
    assert bool((torch.logsumexp(raw.log_weight, -1) == -math.inf).any())


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_soft_alpha_out_of_range(alpha):
    x, lw = particles()
    with pytest.raises(InputError) as err:
        rs.soft(x, lw, alpha=alpha)
    assert err.value.argument == "alpha"


# --------------------------------------------------------------------------------------------------
# optimal_transport


def gaussian_cloud(n_particles, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_particles, 2, generator=g, dtype=dtype) * torch.tensor([1.0, 0.5], dtype=dtype)
    y = torch.tensor([0.8, -0.4], dtype=dtype)
    lw = -0.5 * ((x - y) ** 2).sum(-1) / 0.5
    return x, lw


def weighted_moments(x, lw):
    w = torch.softmax(lw, -1)
    mean = (w.unsqueeze(-1) * x).sum(-2)
    a = x - mean.unsqueeze(-2)
    return mean, (w.unsqueeze(-1) * a).mT @ a


@pytest.mark.parametrize("epsilon", [1.0, 0.1, 0.02])
def test_optimal_transport_keeps_the_weighted_mean(epsilon):
    x, lw = gaussian_cloud(60, 1)
    tol = 1e-9
    out = rs.optimal_transport(x, lw, epsilon=epsilon, tol=tol, max_iter=20000)
    assert out.ancestors is None
    assert torch.equal(out.log_weight, torch.full_like(lw, -math.log(60)))
    mean, _ = weighted_moments(x, lw)
    # |mean' - mean| <= ||P 1 - w||_1 max|x| <= tol max|x|
    assert float((out.x.mean(-2) - mean).abs().max()) <= tol * float(x.abs().max()) + 1e-12


def test_optimal_transport_covariance_approaches_the_weighted_one():
    """N = 400 in 2-d: the relative error of the new covariance falls as epsilon shrinks, below 3 % at
    epsilon = 0.002 (the contraction of the entropic map is the only error: the map is deterministic)."""
    x, lw = gaussian_cloud(400, 2)
    _, cov = weighted_moments(x, lw)
    errors = []
    for eps in (0.1, 0.02, 0.002):
        out = rs.optimal_transport(x, lw, epsilon=eps, tol=1e-6, max_iter=5000)
        new = out.x - out.x.mean(-2)
        errors.append(float(torch.linalg.matrix_norm(new.mT @ new / 400 - cov) / torch.linalg.matrix_norm(cov)))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[-1] < 0.03, errors
    assert errors[0] > 0.1, errors                        # large epsilon visibly contracts


@pytest.mark.parametrize("epsilon", [0.5, 0.1])
def test_optimal_transport_gradcheck(epsilon):
    """Implicit gradients against finite differences, N = 4 in 2-d, two problems in one batch."""
    x = torch.stack([gaussian_cloud(4, 3)[0], gaussian_cloud(4, 5)[0]]).requires_grad_(True)
    lw = torch.stack([gaussian_cloud(4, 3)[1], gaussian_cloud(4, 5)[1]]).requires_grad_(True)

    def f(x_, lw_):
        return rs.optimal_transport(x_, lw_, epsilon=epsilon, tol=1e-11, max_iter=50000).x

    assert torch.autograd.gradcheck(f, (x, lw), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_optimal_transport_batched_equals_each_problem():
    x = torch.stack([gaussian_cloud(30, s)[0] for s in range(3)])
    lw = torch.stack([gaussian_cloud(30, s)[1] for s in range(3)])
    whole = rs.optimal_transport(x, lw, epsilon=0.1, tol=1e-10, max_iter=20000).x
    for k in range(3):
        torch.testing.assert_close(whole[k], rs.optimal_transport(x[k], lw[k], epsilon=0.1, tol=1e-10,
                                                                  max_iter=20000).x, atol=1e-8, rtol=0)


def test_optimal_transport_warns_when_sinkhorn_does_not_converge():
    x, lw = gaussian_cloud(50, 4)
    with pytest.warns(ConvergenceWarning, match="optimal_transport"):
        rs.optimal_transport(x, lw, epsilon=0.01, tol=1e-12, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rs.optimal_transport(x, lw, epsilon=0.5, tol=1e-8, max_iter=20000)


# --------------------------------------------------------------------------------------------------
# dispatch and bad input


def test_dispatch_is_the_named_function():
    x, lw = particles()
    assert rs.DIFFERENTIABLE == ("stop_gradient", "soft", "optimal_transport")
    assert torch.equal(rs.differentiable("stop_gradient", x, lw, seed=1, scheme="systematic").x,
                       rs.stop_gradient(x, lw, seed=1, scheme="systematic").x)
    assert torch.equal(rs.differentiable("soft", x, lw, seed=1, alpha=0.2).log_weight,
                       rs.soft(x, lw, seed=1, alpha=0.2).log_weight)
    assert torch.equal(rs.differentiable("optimal_transport", x, lw, epsilon=0.5).x,
                       rs.optimal_transport(x, lw, epsilon=0.5).x)


RESAMPLERS = ["stop_gradient", "soft", "optimal_transport"]


@pytest.mark.parametrize("name", RESAMPLERS)
@pytest.mark.parametrize("case, argument, error", [
    ("lw_shape", "log_weight", ShapeError),
    ("lw_nan", "log_weight", NonFiniteError),
    ("lw_plus_inf", "log_weight", NonFiniteError),
    ("lw_all_minus_inf", "log_weight", InputError),
    ("no_particles", "x", ShapeError),
    ("x_vector", "x", ShapeError),
    ("x_nan", "x", NonFiniteError),
    ("x_string", "x", InputError),
])
def test_bad_input_names_the_argument(name, case, argument, error):
    x, lw = particles(batch=(2,), n_particles=5)
    if case == "lw_shape":
        lw = lw[:, :4]
    elif case == "lw_nan":
        lw[1, 2] = float("nan")
    elif case == "lw_plus_inf":
        lw[0, 0] = math.inf
    elif case == "lw_all_minus_inf":
        lw[1] = -math.inf
    elif case == "no_particles":
        x, lw = x[:, :0], lw[:, :0]
    elif case == "x_vector":
        x, lw = x[0, :, 0], lw[0]
    elif case == "x_nan":
        x[0, 1, 1] = float("nan")
    elif case == "x_string":
        x = "particles"
    with pytest.raises(error) as err:
        rs.differentiable(name, x, lw, seed=0)
    assert err.value.argument == argument


@pytest.mark.parametrize("call, argument, error", [
    (lambda x, lw: rs.differentiable("kernel", x, lw), "name", InputError),
    (lambda x, lw: rs.differentiable(None, x, lw), "name", InputError),
    (lambda x, lw: rs.stop_gradient(x, lw, scheme="nope"), "scheme", InputError),
    (lambda x, lw: rs.soft(x, lw, scheme=3), "scheme", InputError),
    (lambda x, lw: rs.soft(x, lw, normalise="yes"), "normalise", InputError),
    (lambda x, lw: rs.optimal_transport(x, lw, epsilon=0.0), "epsilon", InputError),
    (lambda x, lw: rs.optimal_transport(x, lw, epsilon=-1.0), "epsilon", InputError),
    (lambda x, lw: rs.optimal_transport(x, lw, tol=0.0), "tol", InputError),
    (lambda x, lw: rs.optimal_transport(x, lw, max_iter=0), "max_iter", InputError),
    (lambda x, lw: rs.differentiable("soft", x, lw, epsilon=0.1), "epsilon", InputError),
    (lambda x, lw: rs.differentiable("optimal_transport", x, lw, alpha=0.1), "alpha", InputError),
    (lambda x, lw: rs.stop_gradient(x, lw, seed="zero"), "seed", SeedError),
    (lambda x, lw: rs.soft(x, lw, seed=-1), "seed", SeedError),
])
def test_bad_options_name_the_argument(call, argument, error):
    x, lw = particles(batch=(2,), n_particles=5)
    with pytest.raises(error) as err:
        call(x, lw)
    assert err.value.argument == argument


def test_float32_and_empty_batch():
    x, lw = particles(dtype=torch.float32)
    for name in RESAMPLERS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            out = rs.differentiable(name, x, lw, seed=0)
        assert out.x.dtype == torch.float32 and out.log_weight.dtype == torch.float32
        assert out.x.shape == x.shape and out.log_weight.shape == lw.shape
    for name in ("stop_gradient", "soft"):
        out = rs.differentiable(name, torch.zeros(0, 5, 2), torch.zeros(0, 5), seed=0)
        assert out.x.shape == (0, 5, 2) and out.ancestors.shape == (0, 5)
