"""The published data and evaluation protocols (daml.models.mechanics_data): shapes, labels equal to the
true fields of daml.models.mechanics, the peers' draw order, the energy-MSE evaluation against closed
forms, and named errors."""

import math

import numpy as np
import pytest
import torch

from daml.errors import InputError, NonFiniteError, SeedError, ShapeError
from daml.models import mechanics as mech
from daml.models import mechanics_data as md


def _field(system, x):
    return md.system_field(system)(x)


@pytest.fixture(scope="module")
def spring():
    return md.greydanus_spring(seed=0)


@pytest.fixture(scope="module")
def pendulum():
    return md.greydanus_pendulum(seed=0)


def test_spring_shapes_and_split(spring):
    assert tuple(spring.x.shape) == (750, 2) and tuple(spring.test_x.shape) == (750, 2)
    assert tuple(spring.dxdt.shape) == (750, 2) and tuple(spring.test_dxdt.shape) == (750, 2)
    assert tuple(spring.trajectories.shape) == (50, 30, 2)
    assert torch.allclose(spring.t, torch.linspace(0, 3, 30, dtype=torch.float64))
    assert spring.x.dtype == torch.float64
    assert spring.system == mech.MassSpring(mass=0.5, stiffness=2.0)


@pytest.mark.parametrize("name", ["spring", "pendulum"])
def test_labels_equal_true_field_at_noise_free_states(name, spring, pendulum):
    d = spring if name == "spring" else pendulum
    clean = d.trajectories.reshape(-1, 2)
    labels = torch.cat([d.dxdt, d.test_dxdt])
    assert torch.allclose(labels, _field(d.system, clean), rtol=0, atol=1e-12)
    # the noise-free trajectories solve the ODE: their energy is constant to the accuracy of the peer's
    # solver setting (RK45, rtol 1e-10 but SciPy's default atol 1e-6)
    h = d.system.hamiltonian(d.trajectories[..., :1], d.trajectories[..., 1:])
    assert float((h - h[:, :1]).abs().max()) < 2e-5


@pytest.mark.parametrize("name", ["spring", "pendulum"])
def test_noise_is_gaussian_with_the_peer_sd(name, spring, pendulum):
    d = spring if name == "spring" else pendulum
    clean = d.trajectories.reshape(-1, 2)
    noise = torch.cat([d.x, d.test_x]) - clean
    # 3000 (spring) / 4500 draws of N(0, 0.1^2): the sample sd is within 5 % of 0.1 (about 4 standard errors)
    assert abs(float(noise.std()) - 0.1) < 0.005
    assert abs(float(noise.mean())) < 0.01


def test_first_initial_state_follows_the_peers_draw_order(spring, pendulum):
    rs = np.random.RandomState(0)
    y0 = rs.rand(2) * 2 - 1
    r = rs.rand() * 0.9 + 0.1
    assert np.allclose(spring.trajectories[0, 0].numpy(), y0 / np.linalg.norm(y0) * r, atol=1e-14)
    rs.randn(30)
    q_noise = rs.randn(30)  # the p noise of trajectory 0 comes second
    assert np.allclose((spring.x[:30, 1] - spring.trajectories[0, :, 1]).numpy(), 0.1 * q_noise, atol=1e-12)
    rs = np.random.RandomState(0)
    y0 = rs.rand(2) * 2 - 1
    r = rs.rand() + 1.3
    assert np.allclose(pendulum.trajectories[0, 0].numpy(), y0 / np.linalg.norm(y0) * r, atol=1e-14)
    radii = pendulum.trajectories[:, 0].norm(dim=-1)
    assert float(radii.min()) >= 1.3 and float(radii.max()) <= 2.3


def test_determinism_per_seed_and_float32():
    a, b = md.greydanus_pendulum(seed=3, samples=4), md.greydanus_pendulum(seed=3, samples=4)
    c = md.greydanus_pendulum(seed=4, samples=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.test_dxdt, b.test_dxdt)
    assert not torch.equal(a.x, c.x)
    f = md.greydanus_spring(seed=3, samples=4, dtype=torch.float32)
    assert f.x.dtype == torch.float32 and tuple(f.x.shape) == (60, 2)


def test_two_body_labels_layout_and_split():
    d = md.greydanus_two_body(seed=0, trials=5, timesteps=10)
    assert tuple(d.x.shape) == (40, 8) and tuple(d.test_x.shape) == (10, 8)
    # the peer's test set is the first 20 % of the points
    assert torch.equal(d.test_x, d.trajectories.reshape(-1, 8)[:10])
    labels = torch.cat([d.test_dxdt, d.dxdt])
    assert torch.allclose(labels, _field(d.system, d.trajectories.reshape(-1, 8)), rtol=0, atol=1e-12)
    s0 = d.trajectories[:, 0]
    assert torch.allclose(s0[:, 2:4], -s0[:, 0:2]) and torch.allclose(s0[:, 6:8], -s0[:, 4:6])
    # speed = circular speed 1 / (2 sqrt(r)) times (1 + 0.05 n), n the second draw of RandomState(0)
    rs = np.random.RandomState(0)
    pos = rs.rand(2) + 0.5
    factor = 1 + 0.05 * rs.randn()
    v_circ = 1 / (2 * math.sqrt(np.linalg.norm(pos)))
    assert np.allclose(s0[0, :2].numpy(), pos) and math.isclose(float(s0[0, 4:6].norm()), v_circ * factor)
    h = d.system.hamiltonian(d.trajectories[..., :4], d.trajectories[..., 4:])
    assert float((h - h[:, :1]).abs().max()) < 1e-4  # rtol 1e-9, default atol 1e-6 as the peer


def test_energy_mse_of_the_true_field_is_zero_and_of_a_damped_field_matches_the_closed_form():
    spring = mech.MassSpring(mass=0.5, stiffness=2.0)
    r = md.energy_mse(md.system_field(spring), spring, trials=5, splits=5)
    assert r.mse < 1e-8 and r.failed == 0 and r.per_trial.shape == (5,)
    assert math.isclose(r.stretch, 1.09)
    gamma = 0.05
    true = md.system_field(spring)

    def damped(x):
        return true(x) - gamma * x

    r = md.energy_mse(damped, spring, trials=5, splits=5, points=50)
    # H = q^2 + p^2 decays as H0 exp(-2 gamma t); the model is read at the stretched times 1.09 t
    h0 = (r.x0 ** 2).sum(1)[:, None]
    t = np.linspace(0, 20, 50)[None]
    expected = ((h0 - h0 * np.exp(-2 * gamma * 1.09 * t)) ** 2).mean(1)
    # (to 1e-4: the notebooks' solve_ivp keeps SciPy's default atol 1e-6)
    assert np.allclose(r.per_trial, expected, rtol=1e-4, atol=0)
    assert math.isclose(r.mse, expected.mean(), rel_tol=1e-4)
    means = expected.reshape(5, 1).mean(1)
    assert math.isclose(r.spread, np.std(means) / math.sqrt(5), rel_tol=1e-4)


def test_energy_option_scores_another_energy():
    pend = mech.Pendulum(mass=2.0, length=0.5, gravity=3.0)
    x0 = np.array([[0.5, 0.3]])
    damped = lambda x: md.system_field(pend)(x) - 0.05 * x          # noqa: E731
    a = md.energy_mse(damped, pend, trials=1, splits=1, x0=x0, points=20)
    b = md.energy_mse(damped, pend, trials=1, splits=1, x0=x0, points=20, energy=lambda s: (s ** 2).sum(-1))
    sq = ((a.true_states ** 2).sum(-1) - (a.model_states ** 2).sum(-1)) ** 2
    assert math.isclose(b.mse, float(sq.mean()), rel_tol=1e-12) and not math.isclose(a.mse, b.mse, rel_tol=1e-3)
    with pytest.raises(ShapeError, match="energy"):
        md.energy_mse(damped, pend, trials=1, splits=1, x0=x0, points=20, energy=lambda s: s)


def test_compound_stretch_grows_the_horizon():
    spring = mech.MassSpring(mass=0.5, stiffness=2.0)
    r = md.energy_mse(md.system_field(spring), spring, trials=3, splits=3, points=10, t_end=2.0,
                      compound_stretch=True)
    assert np.allclose(r.t[:, -1], 2.0 * 1.09 ** np.arange(3))


def test_initial_states_and_bootstrap_spread():
    x0 = md.greydanus_initial_states(15, seed=0)
    rs = np.random.RandomState(0)
    u = rs.rand(2) * 1.6 - 0.8
    assert np.allclose(x0[0], u + 0.2 * np.sign(u))
    assert (np.abs(x0) >= 0.2).all() and (np.abs(x0) <= 1.0).all()
    v = np.arange(15.0)
    means = v.reshape(5, 3).mean(1)
    assert math.isclose(md.bootstrap_spread(v), np.std(means) / math.sqrt(5))


def test_double_pendulum_data_match_the_daml_system():
    x, dxdt = md.cranmer_double_pendulum(256, seed=1)
    theta, omega = x[:, :2], x[:, 2:]
    assert float(theta.min()) >= 0 and float(theta.max()) <= 2 * math.pi and float(omega.abs().max()) <= 10
    # oracles independent of the closed forms: the Euler-Lagrange solve of L = T - V, and T + V written
    # out as in the peer's experiment_dblpend/physics.py (m = l = 1, g = 9.8)
    from daml.models.hamiltonian import lagrangian_acceleration

    assert torch.allclose(dxdt[:, 2:], lagrangian_acceleration(mech.DoublePendulum().lagrangian, theta, omega),
                          rtol=0, atol=1e-9)
    t1, t2, w1, w2 = x.unbind(-1)
    energy = 0.5 * w1**2 + 0.5 * (w1**2 + w2**2 + 2 * w1 * w2 * torch.cos(t1 - t2)) \
        - 2 * 9.8 * torch.cos(t1) - 9.8 * torch.cos(t2)
    assert torch.allclose(md.double_pendulum_energy(x), energy, rtol=0, atol=1e-10)
    x2, _ = md.cranmer_double_pendulum(256, seed=1)
    assert torch.equal(x, x2)


def test_cranmer_energy_error_oracle():
    def true(x):
        return torch.cat([x[..., 2:], md.double_pendulum_acceleration(x)], -1)

    r = md.cranmer_energy_error(true, starts=3, t_end=1.0, fps=10, dt=0.002)
    assert r.mean < 1e-7 and r.per_start.shape == (3,)  # RK4 at dt 0.002: O(dt^4) energy error
    # a field that forgets gravity keeps the kinetic energy: the error is |V(t_end) - V_true(t_end)| / 29.4 > 0
    r = md.cranmer_energy_error(lambda x: torch.cat([x[..., 2:], torch.zeros_like(x[..., 2:])], -1),
                                starts=3, t_end=1.0, dt=0.01)
    assert r.mean > 1e-3


def test_cranmer_energy_error_freezes_diverging_starts():
    x0 = np.array([[0.1, 0.2, 300.0, 0.0], [0.1, 0.2, 0.01, 0.0]])

    def explode(x):            # omega' = 100 omega^3: blows up at t = 1 / (200 omega0^2)
        # regression: the RK4 stages of the first start overflow float32 within the first step; the field
        # must never be called on a non-finite state (a network refuses one with NonFiniteError)
        assert bool(torch.isfinite(x).all())
        return torch.cat([x[..., 2:], 100 * x[..., 2:] ** 3], -1)

    with pytest.warns(RuntimeWarning, match="1 of 2"):
        r = md.cranmer_energy_error(explode, starts=2, x0=x0, t_end=0.1, dt=0.01, dtype=torch.float32)
    assert r.diverged == 1 and math.isinf(r.per_start[0]) and math.isfinite(r.per_start[1])
    assert r.mean == r.per_start[1]


def test_named_errors():
    with pytest.raises(SeedError, match="seed"):
        md.greydanus_spring(seed=-1)
    with pytest.raises(InputError, match="samples"):
        md.greydanus_spring(samples=1)
    with pytest.raises(InputError, match="samples"):      # refused up front, not after hours of solve_ivp
        md.greydanus_spring(samples=10**12)
    with pytest.raises(InputError, match="points"):
        md.energy_mse(md.system_field(mech.MassSpring()), mech.MassSpring(), trials=5, points=10**12)
    with pytest.raises(InputError, match="radius"):
        md.greydanus_pendulum(radius=(2.0, 1.0))
    with pytest.raises(InputError, match="test_split"):
        md.greydanus_two_body(trials=2, test_split=1.0)
    spring = mech.MassSpring(mass=0.5, stiffness=2.0)
    with pytest.raises(InputError, match="trials"):
        md.energy_mse(md.system_field(spring), spring, trials=7, splits=5)
    with pytest.raises(ShapeError, match="x0"):
        md.energy_mse(md.system_field(spring), spring, trials=5, x0=np.zeros((4, 2)))
    with pytest.raises(NonFiniteError, match="x0"):
        md.energy_mse(md.system_field(spring), spring, trials=5, x0=np.full((5, 2), np.nan))
    with pytest.raises(ShapeError, match="field_fn"):
        md.energy_mse(lambda x: x[..., :1], spring, trials=5)
    with pytest.raises(InputError, match="field_fn"):
        md.energy_mse(3.0, spring)
    with pytest.raises(InputError, match="system"):
        md.energy_mse(md.system_field(spring), object())
    with pytest.raises(ShapeError, match="values"):
        md.bootstrap_spread(np.ones(7), 5)
    with pytest.raises(InputError, match="dt"):
        md.cranmer_energy_error(lambda x: x, starts=2, t_end=1.0, dt=0.3)
    with pytest.raises(ShapeError, match="x"):
        md.double_pendulum_energy(torch.zeros(3))
    # found by the fuzz specs: non-finite states and non-numeric scores get named errors
    with pytest.raises(NonFiniteError, match="x"):
        md.double_pendulum_acceleration(torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(NonFiniteError, match="x"):
        md.double_pendulum_energy(torch.tensor([0.0, 0.0, float("inf"), 0.0]))
    with pytest.raises(InputError, match="values"):
        md.bootstrap_spread(["a"] * 5, 5)
    assert md.bootstrap_spread(torch.ones(5, dtype=torch.bfloat16), 5) == 0.0   # any real dtype is converted


def test_the_two_body_solver_field_is_the_two_body_system():
    """solve_ivp's scalar right-hand side is numpy for speed; it must be TwoBody's field (the labels are)."""
    rng = np.random.default_rng(0)
    states = rng.uniform(-1.5, 1.5, size=(50, 8))
    states[:, 2:4] += 3.0                                       # keep the bodies apart
    want = md.system_field(mech.TwoBody(m1=1.0, m2=1.0, gravity=1.0))(torch.as_tensor(states)).numpy()
    got = np.stack([md._two_body_field(s) for s in states])
    assert np.allclose(got, want, rtol=1e-13, atol=1e-13)
