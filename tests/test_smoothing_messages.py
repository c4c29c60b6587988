"""daml.smoothing.messages: Kalman smoothing as message passing (issue 29, item 1)."""

import math
import warnings

import numpy as np
import pytest
import torch

import daml
from daml import models as M
from daml.errors import ConvergenceWarning, DivergenceError, InputError, NonFiniteError, ShapeError
from daml.smoothing import message_passing, taylor_transition

# test problem: 2-D linear model, 21 times (prior at the first), Q = 0.1 I, R = 0.25 I, P0 = I.
# gamma = 0.02 (below 2 / lambda_max, lambda_max <= 1 + 10 (1 + 0.92)^2 + 4 ~ 42) and K = 300 iterations
# reach the RTS mean to 1e-6 (K = 500: 1e-12).
GAMMA, K = 0.02, 300


def _problem(steps=20, seed=0):
    model = M.LinearModel(np.array([[0.9, 0.1], [0.0, 0.8]]), noise_cov=0.1 * np.eye(2))
    op = M.observe_all(2, sd=0.5)
    data = daml.simulate(model, steps, op, x0=np.zeros(2), x0_cov=1.0, seed=seed)
    return model, op, data


class _Oscillator(M.ODEModel):
    """A damped pendulum (nonlinear, 2 states)."""

    def __init__(self):
        super().__init__(state_size=2, dt=0.1, noise_cov=0.01)

    def tendency(self, x):
        return torch.stack([x[..., 1], -torch.sin(x[..., 0]) - 0.1 * x[..., 1]], dim=-1)


PRIOR = (torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))


def test_equals_rts_smoother_on_a_linear_model():
    model, op, data = _problem()
    rts = daml.filters.kalman_smoother(model, data)["mean"].values
    res = message_passing(model, torch.tensor(data.y.values), operator=op, prior=PRIOR, gamma=GAMMA, iterations=K)
    assert np.abs(res.mean.numpy() - rts).max() < 1e-6
    assert bool(res.converged) and float(res.gradient_norm) < 1e-6
    assert res.history is None and res.iterations == K


def test_linear_drag_positions_only_with_missing_entries_equals_rts():
    model = M.LinearDrag(dims=1, drag=0.1, tau=0.05, dt=0.5, noise_cov=0.05)
    op = M.observe_indices(3, [0], sd=0.5)
    data = daml.simulate(model, 15, op, x0=np.array([0.0, 1.0, 0.0]), x0_cov=1.0, seed=3)
    y = data.y.values.copy()
    y[[4, 5, 9], 0] = np.nan                           # missing observations, masked in both
    data = data.assign(y=(data.y.dims, y))
    rts = daml.filters.kalman_smoother(model, data)["mean"].values
    prior = (torch.tensor(data.prior_mean.values), torch.tensor(data.prior_cov.values))
    res = message_passing(model, torch.tensor(y), operator=op, prior=prior, gamma=0.01, iterations=3000)   # 2000 reach 1e-6
    assert np.abs(res.mean.numpy() - rts).max() < 1e-6


def test_batched_equals_one_sequence_at_a_time_and_nan_padding_is_a_mask():
    model, op, _ = _problem()
    ys = [torch.tensor(_problem(seed=s)[2].y.values) for s in range(3)]
    y = torch.stack(ys)
    y[2, 15:] = math.nan                               # a shorter third sequence, padded with NaN
    # unobserved trailing states are held only by Q: slower to converge (3000 iterations)
    res = message_passing(model, y, operator=op, prior=PRIOR, gamma=GAMMA, iterations=3000)
    assert bool(res.converged.all())
    for b in range(3):
        one = message_passing(model, y[b], operator=op, prior=PRIOR, gamma=GAMMA, iterations=3000)
        assert torch.allclose(res.mean[b], one.mean, atol=1e-10)
    short = message_passing(model, y[2, :15], operator=op, prior=PRIOR, gamma=GAMMA, iterations=K)
    assert torch.allclose(res.mean[2, :15], short.mean, atol=1e-6)     # the padding changes nothing before it
    with pytest.raises(ShapeError, match="y"):
        message_passing(model, [ys[0], ys[1][:10]], operator=op, prior=PRIOR, gamma=GAMMA)


def test_gradients_flow_to_observations_prior_and_noise():
    model, op, data = _problem(steps=8)
    y = torch.tensor(data.y.values, requires_grad=True)
    mean0 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    q = (0.1 * torch.eye(2, dtype=torch.float64)).requires_grad_()
    res = message_passing(model, y, operator=op, prior=(mean0, PRIOR[1]), gamma=GAMMA, iterations=50,
                          noise_cov=q, tol=None, history=True)
    assert res.history.shape == (50, 9, 2) and torch.equal(res.history[-1], res.mean)
    loss = (res.history ** 2).mean()
    gy, gm, gq = torch.autograd.grad(loss, (y, mean0, q))
    for g in (gy, gm, gq):
        assert torch.isfinite(g).all() and g.abs().max() > 0
    assert (gy[0] == 0).all()                          # time 0 is not observed (NaN): no gradient there
    # detached messages: the estimate does not depend on y through the messages
    res = message_passing(model, y, operator=op, prior=PRIOR, gamma=GAMMA, iterations=5, tol=None,
                          detach_messages=True, init=torch.ones(9, 2, dtype=torch.float64))
    assert not res.mean.requires_grad


def test_unstable_gamma_is_detected():
    model, op, data = _problem()
    y = torch.tensor(data.y.values)
    with pytest.raises(DivergenceError, match="gamma"):
        message_passing(model, y, operator=op, prior=PRIOR, gamma=1.0, iterations=200)
    with pytest.warns(ConvergenceWarning, match="too large"):     # too few iterations to blow up: warned
        res = message_passing(model, y, operator=op, prior=PRIOR, gamma=0.06, iterations=20)
    assert not bool(res.converged)
    with pytest.warns(ConvergenceWarning, match="not converged"):
        res = message_passing(model, y, operator=op, prior=PRIOR, gamma=GAMMA, iterations=5)
    assert not bool(res.converged)


@pytest.mark.parametrize("kwargs, err, name", [
    (dict(gamma=0.0), InputError, "gamma"),
    (dict(gamma=-0.1), InputError, "gamma"),
    (dict(iterations=0), InputError, "iterations"),
    (dict(order=-1), InputError, "order"),
    (dict(prior=(torch.tensor([math.nan, 0.0]), torch.eye(2))), NonFiniteError, "prior"),
    (dict(prior=(torch.zeros(3), torch.eye(2))), ShapeError, "prior"),
    (dict(y=torch.ones(5, 3)), ShapeError, "y"),
    (dict(y=torch.full((5, 2), math.inf)), NonFiniteError, "y"),
    (dict(init=torch.zeros(4, 2)), ShapeError, "init"),
    (dict(operator=M.observe_nonlinear(lambda x: x ** 2, 2, 2, sd=1.0)), InputError, "operator"),
    (dict(model="oscillator"), InputError, "order"),     # no step_matrix and no Taylor order
])
def test_bad_input_is_named(kwargs, err, name):
    model, op, data = _problem(steps=4)
    call = dict(model=model, y=torch.tensor(data.y.values), operator=op, prior=PRIOR, gamma=GAMMA, iterations=3,
                tol=None)
    call.update(kwargs)
    if call["model"] == "oscillator":
        call["model"] = _Oscillator()
    with pytest.raises(err) as info:
        message_passing(**call)
    assert info.value.argument == name


def test_taylor_transition_is_the_truncated_series_and_tends_to_the_exponential():
    model = M.Lorenz63(dt=0.01)
    x = torch.tensor([[1.0, 2.0, 20.0], [-3.0, 0.5, 10.0]], dtype=torch.float64)
    sigma, rho, beta = 10.0, 28.0, 8.0 / 3.0
    a = torch.stack([torch.tensor([[-sigma, sigma, 0.0], [rho - z, -1.0, -xx], [yy, xx, -beta]], dtype=torch.float64)
                     for xx, yy, z in x.tolist()])
    ad = a * model.dt
    expected = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    term = expected
    exact = torch.linalg.matrix_exp(ad)
    errors = []
    for j in range(11):
        if j > 0:
            term = term @ ad / j
            expected = expected + term
        got = taylor_transition(model, x, j)
        assert got.shape == (2, 3, 3)
        assert torch.allclose(got, expected, atol=1e-14)
        errors.append(float((got - exact).abs().max()))
    big = [e for e in errors if e > 1e-13]                               # above the rounding floor
    assert len(big) >= 7 and all(b < a_ / 5 for a_, b in zip(big, big[1:])), errors   # decreasing with J
    assert errors[-1] < 1e-13
    assert torch.equal(taylor_transition(model, x, 0), torch.eye(3, dtype=torch.float64).expand(2, 3, 3))


def test_taylor_transition_of_a_linear_ode_approaches_its_exact_step():
    model = M.LinearDrag(dims=2, drag=0.3, tau=0.2, dt=0.5)
    x = torch.zeros(4, 6, dtype=torch.float64)
    f4 = taylor_transition(model, x, 4)
    assert torch.allclose(f4, model.step_matrix.expand(4, 6, 6), atol=1e-14)      # RK4 = order-4 Taylor
    exact = torch.linalg.matrix_exp(model.matrix * model.dt)
    errs = [float((taylor_transition(model, x[0], j) - exact).abs().max()) for j in range(1, 12)]
    assert all(b < a_ for a_, b in zip(errs, errs[1:])) and errs[-1] < 1e-14 * 10
    with pytest.raises(InputError) as info:
        taylor_transition(model, x, -1)
    assert info.value.argument == "order"
    with pytest.raises(InputError) as info:
        taylor_transition(M.LinearModel(np.eye(2)), torch.zeros(2), 1)
    assert info.value.argument == "model"
    with pytest.raises(NonFiniteError):
        taylor_transition(model, torch.full((6,), math.nan), 1)


def test_lorenz63_taylor_smoother_improves_on_observations():
    model = M.Lorenz63(dt=0.01)
    op = M.observe_all(3, sd=0.5)
    data = daml.simulate(model, 200, op, x0=np.array([1.0, 1.0, 1.0]), x0_cov=0.01, seed=0)
    y = torch.tensor(data.y.values)
    truth = torch.tensor(data.truth.values)
    prior = (y[1].clone(), 3.0 * torch.eye(3, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = message_passing(model, y, operator=op, prior=prior, gamma=0.005, iterations=100, order=2,
                              noise_cov=1.5 ** 2 * 0.01)
    obs_mse = float(((y[1:] - truth[1:]) ** 2).mean())
    mse = float(((res.mean[1:] - truth[1:]) ** 2).mean())
    assert mse < 0.1 * obs_mse, (mse, obs_mse)          # 0.0166 against 0.247
    assert float(res.gradient_norm) < 1.0


def test_order_four_on_a_linear_ode_equals_the_exact_linear_smoother():
    model = M.LinearDrag(dims=1, drag=0.1, tau=0.05, dt=0.5, noise_cov=0.05)
    op = M.observe_indices(3, [0], sd=0.5)
    data = daml.simulate(model, 6, op, x0=np.array([0.0, 1.0, 0.0]), x0_cov=1.0, seed=1)
    y = torch.tensor(data.y.values)
    prior = (torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    a = message_passing(model, y, operator=op, prior=prior, gamma=0.01, iterations=40, tol=None)
    b = message_passing(model, y, operator=op, prior=prior, gamma=0.01, iterations=40, tol=None, order=4)
    assert torch.allclose(a.mean, b.mean, atol=1e-12)       # RK4 step = order-4 Taylor step of a linear ODE


class _DampedPendulum(M.ODEModel):
    def __init__(self, damping):
        super().__init__(state_size=2, dt=0.1, noise_cov=0.01)
        self.damping = damping

    def tendency(self, x):
        return torch.stack([x[..., 1], -torch.sin(x[..., 0]) - self.damping * x[..., 1]], dim=-1)


def test_gradient_to_a_nonlinear_models_parameter_matches_finite_differences():
    op = M.observe_indices(2, [0], sd=0.1)
    y = torch.sin(torch.arange(10, dtype=torch.float64) * 0.3)[:, None]
    prior = (torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))

    def loss(c):
        res = message_passing(_DampedPendulum(c), y, operator=op, prior=prior, gamma=0.005, iterations=30,
                              order=2, tol=None)
        return res.mean.pow(2).sum()

    c = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(c), c)        # through the Taylor transition (jacfwd) and the iteration
    h = 1e-6
    fd = (float(loss(torch.tensor(0.1 + h, dtype=torch.float64))) -
          float(loss(torch.tensor(0.1 - h, dtype=torch.float64)))) / (2 * h)
    assert abs(float(grad)) > 1.0 and abs(float(grad) - fd) < 1e-5 * abs(fd)


def test_float32_converges_to_its_rounding_floor():
    model, op, data = _problem()
    y = torch.tensor(data.y.values, dtype=torch.float32)
    prior = (torch.zeros(2), torch.eye(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = message_passing(model, y, operator=op, prior=prior, gamma=GAMMA, iterations=600)
    assert res.mean.dtype == torch.float32 and bool(res.converged)
    rts = daml.filters.kalman_smoother(model, data)["mean"].values
    assert np.abs(res.mean.numpy() - rts).max() < 1e-5


def test_unstable_gamma_on_lorenz63_is_a_divergence_error():
    model = M.Lorenz63(dt=0.01)
    op = M.observe_all(3, sd=0.5)
    data = daml.simulate(model, 50, op, x0=np.array([1.0, 1.0, 1.0]), x0_cov=0.01, seed=0)
    y = torch.tensor(data.y.values)
    with pytest.raises(DivergenceError, match="gamma=0.5"):
        message_passing(model, y, operator=op, prior=(y[1], 3.0 * torch.eye(3, dtype=torch.float64)), gamma=0.5,
                        iterations=200, order=2, noise_cov=0.0225)


def _log_density(model, op, y, x, prior):
    """log p(x, y) up to a constant, written directly (the oracle for the messages)."""
    f, q, h, r = model.step_matrix, model.noise_cov, op.matrix, op.noise_cov
    qi, ri = torch.linalg.inv(q), torch.linalg.inv(r)
    d = x[..., 1:, :] - x[..., :-1, :] @ f.T
    e = torch.where(torch.isfinite(y), y - x @ h.T, torch.zeros(()).to(y))    # R is diagonal: drop missing entries
    out = -0.5 * torch.einsum("...ti,ij,...tj->...", d, qi, d) - 0.5 * torch.einsum("...ti,ij,...tj->...", e, ri, e)
    if prior is not None:
        p = x[..., 0, :] - prior[0]
        out = out - 0.5 * torch.einsum("...i,ij,...j->...", p, torch.linalg.inv(prior[1]), p)
    return out


@pytest.mark.parametrize("prior", [PRIOR, None])
def test_the_messages_sum_to_the_gradient_of_the_log_density_and_a_flat_prior_gives_its_maximiser(prior):
    from daml.smoothing.messages import prepare_chain

    model, op, data = _problem(steps=8)
    y = torch.tensor(data.y.values)
    chain = prepare_chain(model, y, operator=op, prior=prior)
    x = torch.randn(y.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_log_density(model, op, y, xg, prior), xg)
    m1, m2, m3 = chain.messages(x)
    assert torch.allclose(m1 + m2 + m3, grad, atol=1e-12, rtol=1e-12)
    if prior is None:
        assert torch.equal(m1[0], torch.zeros(2, dtype=torch.float64))
    # the maximiser from the dense Hessian (one Newton step of a quadratic) is message passing's limit
    flat = lambda v: _log_density(model, op, y, v.reshape(x.shape), prior)
    hess = torch.autograd.functional.hessian(flat, torch.zeros(x.numel(), dtype=torch.float64))
    g0 = torch.autograd.functional.jacobian(flat, torch.zeros(x.numel(), dtype=torch.float64))
    x_map = torch.linalg.solve(-hess, g0).reshape(x.shape)
    res = message_passing(model, y, operator=op, prior=prior, gamma=GAMMA, iterations=1500)
    assert bool(res.converged) and (res.mean - x_map).abs().max() < 1e-6


def test_factorised_linearisation_is_the_reference_lorenz_matrix():
    model = M.Lorenz63()
    x = torch.tensor([[1.0, -2.0, 20.0], [3.0, 4.0, 5.0]], dtype=torch.float64)
    a = model.factor_matrix(x)
    assert torch.allclose((a @ x.unsqueeze(-1)).squeeze(-1), model.tendency(x), atol=1e-12)
    # not the Jacobian: d(dy/dt)/dz = -x, which the factorisation drops
    assert not torch.allclose(a, torch.func.vmap(torch.func.jacfwd(model.tendency))(x))
    f2 = taylor_transition(model, x, 2, linearisation="factorised")
    a_dt = a * model.dt
    assert torch.allclose(f2, torch.eye(3, dtype=torch.float64) + a_dt + a_dt @ a_dt / 2, atol=1e-14)
    from daml.smoothing.messages import _taylor_step
    f_mat, pred = _taylor_step(model, x, 2, "factorised")
    assert torch.allclose(pred, (f2 @ x.unsqueeze(-1)).squeeze(-1), atol=1e-14)
    with pytest.raises(InputError, match="linearisation"):
        taylor_transition(M.Lorenz96(8), torch.zeros(8, dtype=torch.float64), 2, linearisation="factorised")
    with pytest.raises(InputError, match="linearisation"):
        taylor_transition(model, x, 2, linearisation="exact")
    lin, op, data = _problem(steps=4)
    with pytest.raises(InputError, match="linearisation"):
        message_passing(lin, torch.tensor(data.y.values), operator=op, prior=PRIOR, gamma=GAMMA,
                        linearisation="factorised")


def test_float32_observations_with_the_jacobian_stay_in_float32():
    model = M.Lorenz63(dt=0.01)
    op = M.observe_all(3, sd=0.5)
    data = daml.simulate(model, 30, op, x0=np.array([1.0, 1.0, 1.0]), x0_cov=0.01, seed=0)
    y = torch.tensor(data.y.values[1:], dtype=torch.float32)
    res = message_passing(model, y, operator=op, prior=None, gamma=0.003, iterations=20, order=2, noise_cov=0.0225,
                          tol=None)
    assert res.mean.dtype == torch.float32 and bool(torch.isfinite(res.mean).all())
    ref = message_passing(model, y.double(), operator=op, prior=None, gamma=0.003, iterations=20, order=2,
                          noise_cov=0.0225, tol=None)
    assert (res.mean.double() - ref.mean).abs().max() < 1e-3


def test_an_unstable_gamma_that_oscillates_below_the_divergence_factor_warns_even_without_a_tolerance():
    # Lorenz-63, Q = 0.01 I: gamma = 0.005 is unstable but the estimate stays bounded (MSE about 77 against
    # the truth, from observations at 0.25); before the check, tol=None returned it without a word
    model, op = M.Lorenz63(dt=0.01), M.observe_all(3, sd=0.5)
    data = daml.simulate(model, 300, op, x0=np.array([1.0, 1.0, 1.0]), x0_cov=0.01, seed=0)
    y, truth = torch.tensor(data.y.values[1:]), torch.tensor(data.truth.values[1:])
    with pytest.warns(ConvergenceWarning, match="grew"):
        bad = message_passing(model, y, operator=op, prior=None, gamma=0.005, iterations=100, order=2, noise_cov=0.01,
                              tol=None)
    assert float(((bad.mean - truth) ** 2).mean()) > 1.0          # the silent answer was wrong
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)       # a stable gamma stays quiet
        good = message_passing(model, y, operator=op, prior=None, gamma=0.003, iterations=100, order=2,
                               noise_cov=0.01, tol=None)
    assert float(((good.mean - truth) ** 2).mean()) < 0.05
