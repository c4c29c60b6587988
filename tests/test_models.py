"""Models, observation operators and twin experiments: correctness against hand-written oracles.

Monte Carlo assertions use fixed seeds and a bound of 5 standard errors (false-alarm rate about
6e-7 per compared quantity under the Gaussian approximation), so the suite is deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import xarray as xr

import daml
import daml.models as dm
from daml.errors import InputError, ShapeError
from daml.models import (
    Identity,
    Kuramoto,
    LinearDrag,
    LinearModel,
    Lorenz63,
    Lorenz96,
    ODEModel,
    make_model,
    observe_all,
    observe_every,
    observe_indices,
    observe_linear,
    observe_nonlinear,
    propagate,
    rk4_step,
    tangent_linear,
)
from daml.models.base import _rk4
from daml.twin import simulate

F64 = torch.float64


def _all_models():
    gen = torch.Generator().manual_seed(3)
    return [
        Lorenz63(),
        Lorenz96(n=40),
        Lorenz96(n=5, forcing=4.0),
        Kuramoto(n=12, coupling=1.5, seed=0),
        LinearDrag(dims=2),
        LinearModel(torch.randn(6, 6, generator=gen, dtype=F64) / 3),
        LinearModel(torch.randn(6, 6, generator=gen, dtype=F64), dt=0.1, continuous=True),
        Identity(4),
    ]


# --------------------------------------------------------------------------------------------------
# tendencies against oracles


def _l96_oracle(x: np.ndarray, forcing: float) -> np.ndarray:
    n = x.shape[-1]
    out = np.empty_like(x)
    for i in range(n):
        out[..., i] = (x[..., (i + 1) % n] - x[..., (i - 2) % n]) * x[..., (i - 1) % n] - x[..., i] + forcing
    return out


@pytest.mark.parametrize("n", [40, 5])
def test_lorenz96_tendency_matches_index_loop(n):
    rng = np.random.default_rng(1)
    x = rng.normal(scale=3.0, size=(4, n))
    model = Lorenz96(n=n, forcing=8.0)
    got = model.tendency(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _l96_oracle(x, 8.0), rtol=1e-14, atol=1e-13)


def test_lorenz63_tendency_matches_formula():
    m = Lorenz63(sigma=9.0, rho=27.0, beta=2.5)
    x, y, z = 1.3, -2.1, 20.5
    got = m.tendency(torch.tensor([x, y, z], dtype=F64)).tolist()
    assert got == pytest.approx([9.0 * (y - x), x * (27.0 - z) - y, x * y - 2.5 * z], rel=1e-15)


def test_lorenz63_divergence_is_constant():
    """Phase-space volume contracts at -(sigma + 1 + beta) everywhere."""
    m = Lorenz63()
    x = torch.tensor([[1.0, 2.0, 3.0], [-8.0, 4.0, 30.0]], dtype=F64)
    jac = torch.func.vmap(torch.func.jacfwd(m.tendency))(x)
    trace = torch.diagonal(jac, dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(trace, torch.full((2,), -(10.0 + 1.0 + 8.0 / 3.0), dtype=F64), rtol=0, atol=1e-13)


def test_lorenz96_fixed_point_and_energy_budget():
    m = Lorenz96(n=40, forcing=8.0)
    assert torch.equal(m.tendency(torch.full((40,), 8.0, dtype=F64)), torch.zeros(40, dtype=F64))
    # the advection term conserves energy: d/dt |x|^2/2 = -|x|^2 + F sum(x)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0), dtype=F64) * 4
    budget = (x * m.tendency(x)).sum(-1)
    torch.testing.assert_close(budget, -(x * x).sum(-1) + 8.0 * x.sum(-1), rtol=1e-12, atol=1e-10)


def test_default_initial_states():
    assert Lorenz63.default_x0().tolist() == [1.509, -1.531, 25.46]
    assert Lorenz63().default_x0().dtype == F64
    x0 = Lorenz96(n=10).default_x0()
    assert x0.dtype == F64 and x0.tolist() == [1.0] + [0.0] * 9
    assert Lorenz96(n=10).default_x0(dtype="float32").dtype == torch.float32


def test_lorenz96_spin_up_reaches_the_attractor():
    """From e_1, a few hundred steps give a chaotic state (spread about 3.6 around a mean near 2.3)."""
    m = Lorenz96()
    x = propagate(m, m.default_x0(), steps=400)
    assert 2.5 < float(x.std()) < 5.0 and 0.5 < float(x.mean()) < 4.5


@pytest.mark.parametrize("model, dt", [(Lorenz63, 0.02), (Lorenz96, 0.05)])
def test_rk4_local_error_is_fifth_order(model, dt):
    """One RK4 step's error against a converged reference falls like dt^5: ratio ~32 per halving."""
    base = model(dt=dt)
    start = base.default_x0() if model is Lorenz63 else propagate(base, base.default_x0(), steps=400)
    errors = []
    for h in (dt, dt / 2):
        m = model(dt=h)
        ref = start
        for _ in range(400):
            ref = rk4_step(m.tendency, ref, h / 400)
        errors.append(float((m.step(start) - ref).norm()))
    ratio = errors[0] / errors[1]
    assert 20 < ratio < 45, (errors, ratio)


# --------------------------------------------------------------------------------------------------
# Kuramoto


def test_kuramoto_without_coupling_advances_at_omega():
    omega = torch.linspace(-1.0, 2.0, 7, dtype=F64)
    m = Kuramoto(n=7, coupling=0.0, omega=omega, dt=0.01)
    theta = torch.linspace(0.0, 6.0, 7, dtype=F64)
    torch.testing.assert_close(m.step(theta), theta + 0.01 * omega, rtol=0, atol=1e-12)


def test_kuramoto_mean_phase_advances_at_mean_omega():
    """The coupling cancels in sum_i theta_i, so the sum moves by dt * sum(omega) per step."""
    m = Kuramoto(n=30, coupling=4.0, seed=1, dt=0.05)
    theta = torch.rand(30, generator=torch.Generator().manual_seed(2), dtype=F64) * 2 * math.pi
    out = propagate(m, theta, steps=20)
    assert float(out.sum() - theta.sum()) == pytest.approx(20 * 0.05 * float(m.omega.sum()), abs=1e-10)


def test_kuramoto_identical_oscillators_synchronise():
    n = 50
    m = Kuramoto(n=n, coupling=5.0, omega=torch.ones(n, dtype=F64), dt=0.05)
    theta = torch.rand(4, n, generator=torch.Generator().manual_seed(5), dtype=F64) * 2 * math.pi
    r0 = m.order_parameter(theta)
    assert (r0 < 0.5).all()
    r = dm.kuramoto.order_parameter(propagate(m, theta, steps=400))
    assert r.shape == (4,) and (r > 0.999).all(), r


def test_kuramoto_tendency_equals_double_sum():
    n = 9
    m = Kuramoto(n=n, coupling=2.5, seed=3)
    theta = torch.rand(3, n, generator=torch.Generator().manual_seed(4), dtype=F64) * 10 - 5
    th = theta.numpy()
    w = m.omega.numpy()
    oracle = np.empty_like(th)
    for b in range(th.shape[0]):
        for i in range(n):
            oracle[b, i] = w[i] + 2.5 / n * sum(math.sin(th[b, j] - th[b, i]) for j in range(n))
    np.testing.assert_allclose(m.tendency(theta).numpy(), oracle, rtol=1e-13, atol=1e-13)


def test_kuramoto_omega_from_seed():
    a, b, c = Kuramoto(8, 1.0, seed=7), Kuramoto(8, 1.0, seed=7), Kuramoto(8, 1.0, seed=8)
    assert torch.equal(a.omega, b.omega) and not torch.equal(a.omega, c.omega)
    assert a.omega.dtype == F64 and a.config()["omega"] == a.omega.tolist()


def test_order_parameter_limits():
    assert float(Kuramoto.order_parameter(torch.full((6,), 1.3, dtype=F64))) == pytest.approx(1.0, abs=1e-15)
    even = torch.arange(8, dtype=F64) * 2 * math.pi / 8
    assert float(Kuramoto.order_parameter(even)) == pytest.approx(0.0, abs=1e-15)


# --------------------------------------------------------------------------------------------------
# batching, dtype, configuration


@pytest.mark.parametrize("model", _all_models(), ids=lambda m: m.name)
def test_batched_step_equals_row_by_row(model):
    x = torch.randn(7, 3, model.state_size, generator=torch.Generator().manual_seed(0), dtype=F64)
    batched = model.step(x)
    rows = torch.stack([torch.stack([model.step(x[i, j]) for j in range(3)]) for i in range(7)])
    if type(model) is LinearModel:
        # a BLAS matrix product picks different kernels for different batch sizes: equal to rounding
        torch.testing.assert_close(batched, rows, rtol=1e-14, atol=1e-14)
    else:
        assert torch.equal(batched, rows)
    assert model.step(x.float()).dtype == torch.float32


@pytest.mark.parametrize("model", [m for m in _all_models() if type(m).step is dm.ODEModel.step], ids=lambda m: m.name)
def test_large_batches_step_in_pieces_equal_to_one_go(model, monkeypatch):
    from daml import _device

    x = torch.randn(5, 9, model.state_size, generator=torch.Generator().manual_seed(1), dtype=F64)
    whole = rk4_step(model.tendency, x, model.dt)
    # pieces of 4 states (some pieces straddle the first batch axis, the last one is short)
    monkeypatch.setattr(_device, "_ELEMENTWISE_CHUNK", 4 * model.state_size)
    assert _device.elementwise_rows(x) == 4
    calls = []
    monkeypatch.setattr(model, "_step_no_grad",
                        lambda v, f=model._step_no_grad: calls.append(v.shape[:-1].numel()) or f(v))
    with torch.no_grad():
        assert torch.equal(model.step(x), whole)
    assert calls == [4] * 11 + [1]                         # 45 rows: 11 pieces of 4 and one of 1
    # with autograd on: one go through tendency, and the gradient reaches the input
    calls.clear()
    monkeypatch.setattr(model, "tendency", lambda v, f=model.tendency: calls.append(v.shape[:-1].numel()) or f(v))
    xg = x.clone().requires_grad_(True)
    model.step(xg).sum().backward()
    assert calls == [45] * 4
    expect = torch.func.vjp(lambda v: rk4_step(model.tendency, v, model.dt), x)[1](torch.ones_like(x))[0]
    assert torch.equal(xg.grad, expect)
    # small batches and vectors are never split
    monkeypatch.setattr(_device, "_ELEMENTWISE_CHUNK", 1 << 16)
    assert _device.elementwise_rows(x) is None
    assert _device.elementwise_rows(x[0, 0]) is None


@pytest.mark.parametrize("model", _all_models(), ids=lambda m: m.name)
def test_config_is_json_and_rebuilds(model):
    import json

    cfg = model.config()
    json.dumps(cfg)
    json.dumps(dm.model_config(model))
    cls = type(model)
    rebuilt = cls(**cfg)
    x = torch.randn(2, model.state_size, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.equal(rebuilt.step(x), model.step(x))
    if model.name in dm.MODELS:
        assert torch.equal(make_model(model.name, **cfg).step(x), model.step(x))


def test_noise_cov_roundtrips_through_config():
    q = torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, 0.1], [0.0, 0.1, 0.5]], dtype=F64)
    for cov in (0.25, [0.1, 0.2, 0.3], q):
        m = Lorenz63(noise_cov=cov)
        assert torch.equal(Lorenz63(**m.config()).noise_cov, m.noise_cov)


# --------------------------------------------------------------------------------------------------
# tangent linear


def _central_difference(step, x, eps):
    n = x.shape[-1]
    cols = []
    for j in range(n):
        e = torch.zeros(n, dtype=x.dtype)
        e[j] = eps
        cols.append((step(x + e) - step(x - e)) / (2 * eps))
    return torch.stack(cols, dim=-1)


@pytest.mark.parametrize("model, x", [
    (Lorenz63(), Lorenz63.default_x0()),
    (Lorenz96(n=10), torch.linspace(-3.0, 7.0, 10, dtype=F64)),
    (Kuramoto(n=6, coupling=2.0, seed=0), torch.linspace(0.0, 5.0, 6, dtype=F64)),
], ids=["lorenz63", "lorenz96", "kuramoto"])
def test_tangent_linear_matches_finite_differences(model, x):
    """Central differences with step 1e-5: truncation ~1e-10, rounding ~1e-11 relative."""
    jac = tangent_linear(model, x)
    fd = _central_difference(model.step, x, 1e-5)
    assert jac.shape == (model.state_size, model.state_size)
    torch.testing.assert_close(jac, fd, rtol=1e-6, atol=1e-6 * float(fd.abs().max()))
    batch = torch.stack([x, x + 0.1])
    assert tangent_linear(model, batch).shape == (2, model.state_size, model.state_size)


@pytest.mark.parametrize("model", [m for m in _all_models() if hasattr(m, "step_matrix")], ids=lambda m: m.name)
def test_linear_models_tangent_linear_is_step_matrix(model):
    n = model.state_size
    x = torch.randn(5, 2, n, generator=torch.Generator().manual_seed(2), dtype=F64)
    m = model.step_matrix
    assert torch.equal(tangent_linear(model, x), m.expand(5, 2, n, n))
    torch.testing.assert_close(model.step(x), x @ m.T, rtol=0, atol=1e-13)
    autograd = torch.func.jacfwd(model.step)(x[0, 0])
    torch.testing.assert_close(autograd, m, rtol=0, atol=1e-13)


def test_linear_drag_matrix_and_exponential():
    m = LinearDrag(dims=1, drag=0.3, tau=0.2)
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, -0.3, 1.0], [0.0, -0.2, 0.0]], dtype=F64)
    assert torch.equal(m.matrix, expected)
    t = 2.0
    x0 = torch.tensor([1.0, -0.5, 0.7, 0.2, 0.3, -1.0], dtype=F64)
    fine = LinearDrag(dims=2, drag=0.3, tau=0.2, dt=t / 100)
    exact = scipy.linalg.expm(fine.matrix.numpy() * t) @ x0.numpy()
    np.testing.assert_allclose(propagate(fine, x0, steps=100).numpy(), exact, rtol=0, atol=1e-8)
    # layout: [p1, p2, v1, v2, a1, a2]
    torch.testing.assert_close(fine.tendency(x0), torch.tensor([0.7, 0.2, 0.3 - 0.3 * 0.7, -1.0 - 0.3 * 0.2,
                                                                -0.2 * 0.7, -0.2 * 0.2], dtype=F64))


def test_linear_model_discrete_and_identity():
    mat = torch.tensor([[0.9, 0.1], [-0.2, 0.8]], dtype=F64)
    m = LinearModel(mat)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=F64)
    assert torch.equal(m.step_matrix, mat)
    torch.testing.assert_close(m.step(x), torch.stack([mat @ x[0], mat @ x[1]]), rtol=0, atol=1e-15)
    with pytest.raises(InputError, match="continuous"):
        m.tendency(x)
    ident = Identity(3)
    y = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ident.step(y), y) and torch.equal(ident.step_matrix, torch.eye(3, dtype=F64))


# --------------------------------------------------------------------------------------------------
# model noise


def test_propagate_noise_has_covariance_q():
    """Sample covariance of N = 200000 noise draws within 5 standard errors of Q entrywise, with
    se(C_ij) = sqrt((Q_ii Q_jj + Q_ij^2) / N) for Gaussian noise."""
    q = torch.tensor([[1.0, 0.4, -0.2], [0.4, 0.5, 0.1], [-0.2, 0.1, 0.3]], dtype=F64)
    model = Lorenz63(noise_cov=q)
    n = 200_000
    x0 = Lorenz63.default_x0() + torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    x1 = propagate(model, x0, steps=1, seed=11)
    eta = (x1 - model.step(x0)).numpy()
    cov = np.cov(eta, rowvar=False)
    qn = q.numpy()
    se = np.sqrt((np.outer(np.diag(qn), np.diag(qn)) + qn**2) / n)
    assert np.all(np.abs(cov - qn) < 5 * se), (cov, qn, se)
    assert np.all(np.abs(eta.mean(0)) < 5 * np.sqrt(np.diag(qn) / n))
    assert torch.equal(propagate(model, x0[:100], steps=3, seed=11), propagate(model, x0[:100], steps=3, seed=11))
    assert not torch.equal(propagate(model, x0[:100], steps=3, seed=11), propagate(model, x0[:100], steps=3, seed=12))


def test_propagate_singular_noise_stays_in_its_range():
    q = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    model = Identity(3, noise_cov=q)
    x = propagate(model, torch.zeros(1000, 3, dtype=F64), steps=2, seed=0)
    torch.testing.assert_close(x[:, 0], x[:, 1], rtol=0, atol=1e-12)
    assert float(x[:, 2].abs().max()) < 1e-12 and float(x[:, 0].std()) > 1.0


def test_perfect_model_propagate_is_deterministic_steps():
    m = Lorenz96(n=10)
    x = propagate(m, m.default_x0(), steps=3)
    assert torch.equal(x, m.step(m.step(m.step(m.default_x0()))))


# --------------------------------------------------------------------------------------------------
# user-defined models and the protocol


class Oscillator(ODEModel):
    def __init__(self, omega=1.0, damping=0.1, dt=0.05):
        super().__init__(state_size=2, dt=dt)
        self.omega, self.damping = omega, damping

    def tendency(self, x):
        pos, vel = x[..., 0], x[..., 1]
        return torch.stack([vel, -self.omega**2 * pos - self.damping * vel], dim=-1)

    def config(self):
        return {"omega": self.omega, "damping": self.damping, "dt": self.dt}


class RandomWalk:
    """A model written from scratch, without ODEModel."""

    state_size = 2
    dt = 1.0
    noise_cov = torch.eye(2, dtype=F64)

    def step(self, x):
        return 0.5 * x


def test_user_models_satisfy_the_protocol():
    osc = Oscillator()
    assert isinstance(osc, dm.Model) and isinstance(RandomWalk(), dm.Model)
    assert not isinstance(object(), dm.Model)
    for model in _all_models():
        assert isinstance(model, dm.Model)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    out = propagate(osc, x, steps=10)
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    # the oscillator is linear: its Jacobian is the same everywhere, equal to its RK4 matrix
    a = torch.tensor([[0.0, 1.0], [-1.0, -0.1]], dtype=F64)
    tl = tangent_linear(osc, x)
    torch.testing.assert_close(tl, dm.linear.rk4_matrix(a, 0.05).expand(2, 2, 2), rtol=0, atol=1e-14)
    assert dm.model_config(osc) == {"model": "Oscillator", "omega": 1.0, "damping": 0.1, "dt": 0.05}
    noisy = propagate(RandomWalk(), torch.zeros(3, 2, dtype=F64), steps=2, seed=0)
    assert noisy.shape == (3, 2) and float(noisy.abs().sum()) > 0


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("build, match", [
    (lambda: Lorenz96(n=3), "^n:"),
    (lambda: Lorenz96(dt=0), "^dt:"),
    (lambda: Lorenz96(forcing=float("nan")), "^forcing:"),
    (lambda: Lorenz63(rho="28"), "^rho:"),
    (lambda: Kuramoto(n=3, coupling=1.0, omega=[1.0, 2.0]), "^omega:"),
    (lambda: Kuramoto(n=1, coupling=1.0), "^n:"),
    (lambda: LinearModel(torch.zeros(2, 3)), "^matrix:"),
    (lambda: LinearModel([[1.0, float("inf")], [0.0, 1.0]]), "^matrix:"),
    (lambda: LinearDrag(dims=0), "^dims:"),
    (lambda: Identity(2, noise_cov=[[1.0, 2.0], [2.0, 1.0]]), "^noise_cov:.*semidefinite"),
    (lambda: Lorenz63(noise_cov=[1.0, -1.0, 1.0]), "^noise_cov:"),
    (lambda: make_model("lorenz95"), "^model:.*lorenz96"),
    (lambda: make_model("lorenz96", N=40), "^lorenz96:.*forcing"),
    (lambda: make_model("lorenz96", n=2), "^n:"),
])
def test_bad_input_names_the_argument(build, match):
    with pytest.raises(InputError, match=match):
        build()


def test_make_model_builds_by_name():
    m = make_model("lorenz96", n=10, forcing=6.0)
    assert isinstance(m, Lorenz96) and m.state_size == 10 and m.forcing == 6.0
    assert set(dm.MODELS) == {"lorenz63", "lorenz96", "kuramoto", "linear_drag", "identity", "mixture_transition",
                              "mechanical"}
    for name, cls in dm.MODELS.items():
        assert cls.name == name


# --------------------------------------------------------------------------------------------------
# observation operators


def test_observation_constructors():
    a = observe_all(4, sd=0.5)
    assert torch.equal(a.matrix, torch.eye(4, dtype=F64)) and torch.equal(a.noise_cov, 0.25 * torch.eye(4, dtype=F64))
    e = observe_every(10, 3, sd=2.0, offset=1)
    expected = torch.zeros(3, 10, dtype=F64)
    expected[[0, 1, 2], [1, 4, 7]] = 1.0
    assert torch.equal(e.matrix, expected) and torch.equal(e.noise_cov, 4.0 * torch.eye(3, dtype=F64))
    r = [[1.0, 0.5], [0.5, 2.0]]
    i = observe_indices(6, [5, 0], cov=r)
    x = torch.arange(12, dtype=F64).reshape(2, 6)
    assert torch.equal(i.apply(x), x[:, [5, 0]])
    assert torch.equal(i.noise_cov, torch.tensor(r, dtype=F64))
    assert observe_indices(3, [0, 2], cov=[0.1, 0.2]).noise_cov.tolist() == [[0.1, 0.0], [0.0, 0.2]]
    lin = observe_linear([[1.0, 1.0, 0.0]], sd=1.0)
    assert lin.apply(torch.tensor([2.0, 3.0, 5.0], dtype=F64)).tolist() == [5.0]
    assert lin.jacobian(torch.zeros(4, 3, dtype=F64)).shape == (4, 1, 3)


def test_selection_operators_pick_and_equal_the_matrix_product():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, generator=g, dtype=F64)
    sel = observe_indices(8, [7, 0, 3], sd=1.0)
    assert torch.equal(sel.apply(x), x @ sel.matrix.T)
    assert sel._selected_indices().tolist() == [7, 0, 3]
    scaled = observe_linear([[0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], sd=1.0)    # not a row of I
    assert scaled._selected_indices() is None
    assert torch.allclose(scaled.apply(x), 2.0 * x[..., 1:2])
    # replacing the matrix is seen: the picked indices follow the new H
    sel.matrix = torch.eye(8, dtype=F64)[[1, 2, 4]]
    assert torch.equal(sel.apply(x), x[..., [1, 2, 4]])
    sel.matrix = 0.5 * torch.eye(8, dtype=F64)[[1, 2, 4]]
    assert torch.allclose(sel.apply(x), 0.5 * x[..., [1, 2, 4]])
    # evenly spaced picks become a strided copy: every variable, every other one, a single one
    for op, picker in ((observe_all(8, sd=1.0), slice(0, 8, 1)), (observe_every(8, k=2, sd=1.0), slice(0, 7, 2)),
                       (observe_indices(8, [5], sd=1.0), slice(5, 6, 1)), (observe_indices(8, [1, 4, 7], sd=1.0), slice(1, 8, 3))):
        assert op._selected_indices() == picker
        got = op.apply(x)
        assert torch.equal(got, x @ op.matrix.T) and got.is_contiguous()
        got.add_(1.0)                                               # a copy: x is not touched
        assert torch.equal(op.apply(x), x @ op.matrix.T)
    assert isinstance(observe_indices(8, [3, 1], sd=1.0)._selected_indices(), torch.Tensor)   # decreasing: indices


def test_nonlinear_observation_jacobian_is_analytic():
    idx = [0, 2, 3]
    obs = observe_nonlinear(lambda x: x[..., idx] ** 2, state_size=5, size=3, sd=1.0)
    x = torch.tensor([[1.0, 2.0, -3.0, 0.5, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0]], dtype=F64)
    analytic = torch.zeros(2, 3, 5, dtype=F64)
    for k, j in enumerate(idx):
        analytic[:, k, j] = 2 * x[:, j]
    assert torch.equal(obs.jacobian(x), analytic)
    assert torch.equal(obs.apply(x), x[:, idx] ** 2) and not obs.linear


@pytest.mark.parametrize("build, match", [
    (lambda: observe_all(2, cov=[[1.0, 2.0], [2.0, 1.0]]), "^cov:"),
    (lambda: observe_all(2, cov=[[1.0, 0.0], [0.0, 0.0]]), "^cov:.*positive-definite"),
    (lambda: observe_every(10, k=0), "^k:"),
    (lambda: observe_indices(4, [0, 4]), "^indices:"),
    (lambda: observe_all(3, sd=-1.0), "^sd:"),
    (lambda: observe_nonlinear(lambda x: x[..., :2], 4, 3), "^func:"),
])
def test_observation_bad_input(build, match):
    with pytest.raises(InputError, match=match):
        build()


def test_observation_apply_checks_state_size():
    with pytest.raises(ShapeError, match="^x:"):
        observe_all(3).apply(torch.zeros(4, dtype=F64))
    with pytest.raises(ShapeError, match="^x:"):
        observe_all(3).residual(torch.zeros(3, dtype=F64), torch.zeros(4, dtype=F64))


def test_observation_residual_equals_y_minus_apply():
    # the same values as y - h(x) for every kind of operator, with y broadcast over the members
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 8, generator=g, dtype=F64)
    y = torch.randn(2, 1, 3, generator=g, dtype=F64)
    ops = [observe_every(8, k=3, sd=1.0), observe_indices(8, [7, 0, 3], sd=1.0),
           observe_linear(torch.randn(3, 8, generator=g, dtype=F64), sd=1.0),
           observe_nonlinear(lambda v: v[..., :3] ** 2, state_size=8, size=3, sd=1.0)]
    for op in ops:
        got = op.residual(y, x)
        assert got.shape == (2, 5, 3) and torch.equal(got, y - op.apply(x))
    everything = observe_all(8, sd=1.0)
    y8 = torch.randn(2, 1, 8, generator=g, dtype=F64)
    assert torch.equal(everything.residual(y8, x), y8 - x)


# --------------------------------------------------------------------------------------------------
# twin experiments


def _twin(**kw):
    args = dict(steps=50, observe=observe_every(10, 2, sd=0.5), every=5, seed=1)
    args.update(kw)
    return simulate(Lorenz96(n=10), **args)


def test_simulate_layout_and_truth():
    ds = _twin(x0=Lorenz96(n=10).default_x0() * 3 + 1.0)
    assert set(ds.data_vars) == {"truth", "y", "prior_mean", "prior_cov", "H", "R"}
    assert ds.truth.dims == ("time", "variable") and ds.truth.shape == (51, 10)
    assert ds.y.dims == ("time", "obs") and ds.y.shape == (51, 5)
    assert ds.H.dims == ("obs", "variable") and ds.R.dims == ("obs", "obs_")
    assert ds.prior_cov.dims == ("variable", "variable_")
    np.testing.assert_allclose(ds.time.values, np.arange(51) * 0.05)
    assert ds.step.values.tolist() == list(range(51))
    observed = ds.observed.values
    assert observed.tolist() == [k > 0 and k % 5 == 0 for k in range(51)]
    y = ds.y.values
    assert np.isnan(y[~observed]).all() and np.isfinite(y[observed]).all()
    np.testing.assert_allclose(ds.R.values, 0.25 * np.eye(5))
    # the truth is the model's own trajectory from truth[0] (perfect model, x0_cov = 0)
    m = Lorenz96(n=10)
    x = torch.from_numpy(ds.truth.values[0])
    np.testing.assert_array_equal(ds.truth.values[0], ds.prior_mean.values)
    steps = [x]
    for _ in range(50):
        x = m.step(x)
        steps.append(x)
    np.testing.assert_allclose(torch.stack(steps).numpy(), ds.truth.values, rtol=0, atol=1e-12)
    for key in ("model", "observation", "seed", "daml_version", "every", "missing"):
        assert key in ds.attrs
    assert ds.attrs["seed"] == "1" and ds.attrs["every"] == 5


def test_simulate_is_reproducible():
    a, b, c = _twin(x0_cov=1.0), _twin(x0_cov=1.0), _twin(x0_cov=1.0, seed=2)
    xr.testing.assert_identical(a, b)
    assert not np.array_equal(a.truth.values, c.truth.values)
    assert not np.allclose(np.nan_to_num(a.y.values), np.nan_to_num(c.y.values))


def test_simulate_missing_fraction_and_independent_streams():
    """Hidden entries ~ Binomial(N, 0.3): asserted within 5 standard deviations."""
    kw = dict(steps=400, every=1, x0_cov=1.0)
    full = _twin(**kw)
    holey = _twin(missing=0.3, **kw)
    xr.testing.assert_identical(full.truth, holey.truth)
    observed = holey.observed.values
    y_full, y_holey = full.y.values[observed], holey.y.values[observed]
    n = y_holey.size
    hidden = int(np.isnan(y_holey).sum())
    assert abs(hidden - 0.3 * n) < 5 * math.sqrt(n * 0.3 * 0.7), (hidden, n)
    keep = ~np.isnan(y_holey)
    np.testing.assert_array_equal(y_holey[keep], y_full[keep])


def test_simulate_experiments_dim():
    ds = _twin(experiments=4, x0_cov=1.0)
    assert ds.truth.dims == ("experiment", "time", "variable") and ds.truth.shape == (4, 51, 10)
    assert ds.y.dims == ("experiment", "time", "obs")
    assert ds.experiment.values.tolist() == [0, 1, 2, 3]
    t = ds.truth.values
    for i in range(4):
        for j in range(i):
            assert not np.allclose(t[i], t[j])


def test_simulate_observation_noise_covariance():
    """Pooled y - H truth over 3000 experiments x 5 times: sample covariance within 5 se of R."""
    r = np.array([[0.5, 0.2, 0.0], [0.2, 0.4, -0.1], [0.0, -0.1, 0.3]])
    obs = observe_indices(10, [1, 4, 7], cov=r)
    ds = simulate(Lorenz96(n=10), steps=5, observe=obs, every=1, x0_cov=1.0, experiments=3000, seed=4)
    resid = ds.y.values[:, 1:] - ds.truth.values[:, 1:] @ ds.H.values.T
    e = resid.reshape(-1, 3)
    n = e.shape[0]
    cov = e.T @ e / n  # known zero mean
    se = np.sqrt((np.outer(np.diag(r), np.diag(r)) + r**2) / n)
    assert np.all(np.abs(cov - r) < 5 * se), (cov, r)


def test_simulate_irregular_times_and_model_noise():
    ds = _twin(at=[20, 3, 7], every=None)
    assert np.flatnonzero(ds.observed.values).tolist() == [3, 7, 20]
    assert ds.attrs["every"] == -1
    assert np.isfinite(ds.y.values[[3, 7, 20]]).all() and np.isnan(np.delete(ds.y.values, [3, 7, 20], 0)).all()
    noisy = simulate(Identity(2, noise_cov=1.0), steps=400, observe=observe_all(2), experiments=50, seed=0)
    incr = np.diff(noisy.truth.values, axis=1).reshape(-1, 2)
    assert abs(incr.var() - 1.0) < 5 * math.sqrt(2.0 / incr.size)


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "^steps:"),
    ({"every": 0}, "^every:"),
    ({"missing": 1.0}, "^missing:"),
    ({"observe": observe_all(9)}, "^observe:"),
    ({"experiments": 0}, "^experiments:"),
    ({"at": [0, 3], "every": None}, "^at:"),
    ({"x0": torch.zeros(9)}, "^x0:"),
])
def test_simulate_bad_input(kw, match):
    with pytest.raises(InputError, match=match):
        _twin(**kw)


class _Overflow:
    """x -> (1e200 x_0, x_1): the first component overflows at step 2, the second stays finite."""

    state_size = 2
    dt = 1.0
    noise_cov = None

    def step(self, x):
        return x * torch.tensor([1e200, 1.0], dtype=x.dtype)


@pytest.mark.parametrize("model", [_Overflow(), LinearModel([[1e200, 0.0], [0.0, 1.0]])],
                         ids=["elementwise", "matrix"])
def test_simulate_reports_the_first_step_where_the_truth_blows_up(model):
    with pytest.raises(InputError, match="^model:.*step 2 "):
        simulate(model, steps=5, observe=observe_all(2), x0=[1.0, 1.0], seed=0)


def test_arctan_observations_of_a_selection():
    base = dm.observe_every(8, 2, sd=0.05)
    op = dm.observe_transformed(base, "arctan")
    x = torch.linspace(-20, 20, 24, dtype=torch.float64).reshape(3, 8)
    assert torch.equal(op.apply(x), torch.atan(x[:, ::2]))
    assert torch.equal(op.noise_cov, base.noise_cov) and not op.linear
    assert op.positions.tolist() == [0.0, 2.0, 4.0, 6.0]
    jac = op.jacobian(x)                                           # autograd: diag(1 / (1 + x_i^2)) on the selection
    expected = torch.zeros(3, 4, 8, dtype=torch.float64)
    expected[:, torch.arange(4), torch.arange(0, 8, 2)] = 1.0 / (1.0 + x[:, ::2] ** 2)
    assert torch.allclose(jac, expected, atol=1e-14, rtol=0)
    with pytest.raises(daml.errors.InputError, match="transform"):
        dm.observe_transformed(base, "tanh-ish")
    with pytest.raises(daml.errors.InputError, match="base"):
        dm.observe_transformed(op, "arctan")


def test_example_configs_parse_and_the_arctan_transform_reaches_the_filters():
    from daml.experiment import build_data, load_config

    root = Path(__file__).resolve().parents[1] / "examples"
    for path in sorted(root.glob("*.toml")):
        load_config(path)                                           # every shipped config is valid
    exp = load_config(root / "diffusion_arctan.toml")
    exp.steps, exp.experiments = 40, 1
    model, op, data = build_data(exp)
    obs = data["y"].values[..., data["observed"].values, :]
    assert np.nanmax(np.abs(obs)) < np.pi / 2 + 0.5                # arctan-range observations (+ noise)
    res = daml.filters.run(daml.filters.letkf(members=10, radius=4.0), model, data, operator=op, seed=0,
                           progress=False)
    assert np.isfinite(res.analysis["x"].values).all()
    with pytest.raises(daml.errors.InputError, match="observations.transform"):
        load_config(root.joinpath("diffusion_arctan.toml").read_text().replace('"arctan"', '"sqrt"'))


@pytest.mark.parametrize("model", [m for m in _all_models() if isinstance(m, dm.ODEModel)
                                   and type(m)._step_no_grad is not dm.ODEModel._step_no_grad], ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_own_step_without_autograd_is_bit_identical_to_rk4(model, dtype):
    # a model's cheaper autograd-free step must give exactly rk4_step's numbers (those of its unchecked
    # core _rk4, since rk4_step refuses NaN), for a single state,
    # batches of any rank, large values and non-finite entries (which must spread the same way)
    g = torch.Generator().manual_seed(5)
    # a single state and batches of growing and shrinking size
    for shape in [(model.state_size,), (3, model.state_size), (4, 6, model.state_size), (2, model.state_size)]:
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 5.0).to(dtype)
        x.view(-1)[1] = 1e30
        if x.ndim > 1:
            x[..., -1, 0] = math.nan
            x[..., 0, 2] = math.inf
        with torch.no_grad():
            got = model._step_no_grad(x)
            want = _rk4(model.tendency, x, model.dt)   # rk4_step unchecked: it refuses NaN
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0))


# --------------------------------------------------------------------------------------------------
# transitions: Gaussian (step + N(0, Q)) or the model's own (sample_step / log_transition)


def test_transition_density_and_draws_of_a_gaussian_model_against_scipy():
    from scipy.stats import multivariate_normal

    from daml.models.base import has_gaussian_transition, transition_log_density, transition_sample

    q = np.array([[0.5, 0.1], [0.1, 0.3]])
    model = dm.LinearModel([[0.9, 0.2], [-0.1, 0.8]], noise_cov=q)
    assert has_gaussian_transition(model)
    x_prev = torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=torch.float64)
    x = torch.tensor([[0.1, 0.4], [1.0, -0.2], [0.0, 0.0]], dtype=torch.float64)
    pairs = transition_log_density(model, x_prev.unsqueeze(0), x.unsqueeze(1))         # (3, 2): every pair
    for i in range(3):
        for j in range(2):
            ref = multivariate_normal(model.step(x_prev[j]).numpy(), q).logpdf(x[i].numpy())
            assert float(pairs[i, j]) == pytest.approx(ref, rel=1e-12)
    # draws: mean step(x), covariance Q (Monte Carlo, 40 000 draws: 5 standard errors per entry)
    g = torch.Generator().manual_seed(0)
    draws = transition_sample(model, x_prev[0].expand(40_000, 2), g)
    d = (draws - model.step(x_prev[0])).numpy()
    assert np.all(np.abs(d.mean(0)) <= 5 * np.sqrt(q.diagonal() / 40_000))
    np.testing.assert_allclose(np.cov(d.T), q, atol=5 * np.sqrt(2 * 0.5**2 / 40_000))
    # a perfect model steps deterministically and has no density
    perfect = dm.LinearModel([[0.9, 0.2], [-0.1, 0.8]])
    assert torch.equal(transition_sample(perfect, x_prev, g), perfect.step(x_prev))
    with pytest.raises(daml.errors.InputError, match="model"):
        transition_log_density(perfect, x_prev, x_prev)


def test_a_model_with_its_own_transition_is_used_and_refused_where_gaussian_noise_is_needed():
    from daml.models.base import (check_gaussian_transition, has_gaussian_transition, transition_log_density,
                                  transition_sample)

    class Jumpy:                                  # x' = x + Laplace(0, 1) noise: not Gaussian
        state_size, dt, noise_cov = 2, 1.0, None

        def step(self, x):
            return x

        def sample_step(self, x, generator):
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype) - 0.5
            return x - torch.sign(u) * torch.log1p(-2 * u.abs())

        def log_transition(self, x_prev, x):
            return -(x - x_prev).abs().sum(-1) - x.shape[-1] * math.log(2.0)

    model = Jumpy()
    assert not has_gaussian_transition(model)
    with pytest.raises(daml.errors.InputError, match="model: expected a model with additive Gaussian noise .* for kf"):
        check_gaussian_transition(model, "kf")
    check_gaussian_transition(dm.Lorenz63(noise_cov=0.1), "kf")                 # Gaussian: accepted
    x = torch.zeros(20_000, 2, dtype=torch.float64)
    draws = transition_sample(model, x, torch.Generator().manual_seed(1))
    assert float(draws.abs().mean()) == pytest.approx(1.0, abs=5 * 1.0 / math.sqrt(40_000))   # E|Laplace(0,1)| = 1
    assert float(transition_log_density(model, x[:1], torch.ones(1, 2, dtype=torch.float64))) == pytest.approx(
        -2 - 2 * math.log(2.0), rel=1e-12)
    prop = dm.propagate(model, x[:3], 2, seed=0)                               # propagate draws the model's steps
    assert prop.shape == (3, 2) and not torch.equal(prop, x[:3])
