"""Tests of daml.models.mechanics: integrators, true systems, the Mechanical model.

Oracles: closed-form linear maps of each method on the spring, autograd of each system's own
Hamiltonian and Lagrangian, conservation laws, measured orders of convergence, and the
non-separable code path against the explicit one on separable systems.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import daml
from daml.errors import ConvergenceWarning, DivergenceError, DtypeError, InputError, NonFiniteError, ShapeError
from daml.models import observe_all, tangent_linear
from daml.models.mechanics import (
    METHODS,
    SYSTEMS,
    DoublePendulum,
    MassSpring,
    Mechanical,
    Pendulum,
    Trajectory,
    TwoBody,
    convergence_order,
    energy,
    integrate,
    make_mechanical,
    step,
)

F64 = torch.float64


def _rand(shape, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=F64)


class _AsNonSeparable:
    """A separable system declared non-separable: forces the implicit (iterated) code path."""

    def __init__(self, system):
        self.system, self.dim, self.separable = system, system.dim, False
        self.dq, self.dp, self.hamiltonian = system.dq, system.dp, system.hamiltonian


class _Damped:
    """dq = p, dp = -rate p: non-separable and linear; the fixed point of symplectic Euler's
    p-stage, p1 = p - h rate p1, contracts only for h rate < 1."""

    dim, separable = 1, False

    def __init__(self, rate):
        self.rate = rate

    def dq(self, q, p):
        return p

    def dp(self, q, p):
        return -self.rate * p


class _BlowUp:
    """dq = p, dp = q^2 (separable): q'' = q^2 from q = 1 at rest reaches infinity in finite time."""

    dim, separable = 1, True

    def dq(self, q, p):
        return p

    def dp(self, q, p):
        return q * q


# ---------------------------------------------------------------------------------------------------
# each method against its closed form on the linear spring
# ---------------------------------------------------------------------------------------------------

def _spring_map(method, m, k, h):
    """The one-step matrix of each method on dq = p/m, dp = -k q (state (q, p))."""
    a = torch.tensor([[0.0, 1.0 / m], [-k, 0.0]], dtype=F64)
    eye = torch.eye(2, dtype=F64)
    if method == "symplectic_euler":         # p1 = p - h k q;  q1 = q + h p1 / m
        return torch.tensor([[1.0 - h * h * k / m, h / m], [-h * k, 1.0]], dtype=F64)
    if method == "leapfrog":
        half = torch.tensor([[1.0, 0.0], [-0.5 * h * k, 1.0]], dtype=F64)
        drift = torch.tensor([[1.0, h / m], [0.0, 1.0]], dtype=F64)
        return half @ drift @ half
    if method == "implicit_midpoint":        # the Cayley transform
        return torch.linalg.solve(eye - 0.5 * h * a, eye + 0.5 * h * a)
    ha = h * a
    return eye + ha + ha @ ha / 2 + ha @ ha @ ha / 6 + ha @ ha @ ha @ ha / 24


@pytest.mark.parametrize("method", METHODS)
def test_each_method_equals_its_closed_form_on_the_spring(method):
    m, k, h = 0.7, 2.3, 0.13
    q, p = _rand((5, 3, 1), -1, 1, 0), _rand((5, 3, 1), -1, 1, 1)
    q1, p1 = step(MassSpring(mass=m, stiffness=k), q, p, h, method)
    z1 = torch.cat([q, p], -1) @ _spring_map(method, m, k, h).T
    torch.testing.assert_close(torch.cat([q1, p1], -1), z1, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("method", ["symplectic_euler", "leapfrog"])
@pytest.mark.parametrize("system", [Pendulum(), TwoBody()], ids=["pendulum", "two_body"])
def test_the_implicit_path_equals_the_explicit_formulas_on_separable_systems(method, system):
    q, p = system.default_state()
    q = q + _rand((4, system.dim), -0.1, 0.1, 2)
    p = p + _rand((4, system.dim), -0.1, 0.1, 3)
    explicit = integrate(system, q, p, dt=0.02, steps=20, method=method)
    implicit = integrate(_AsNonSeparable(system), q, p, dt=0.02, steps=20, method=method)
    torch.testing.assert_close(implicit.q, explicit.q, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(implicit.p, explicit.p, rtol=1e-12, atol=1e-13)


class _WithField:
    """A pendulum that offers dqdp(q, p) and counts which evaluations the integrators use."""

    dim, separable = 1, True

    def __init__(self):
        self.pend, self.calls = Pendulum(), {"dq": 0, "dp": 0, "dqdp": 0}

    def dq(self, q, p):
        self.calls["dq"] += 1
        return self.pend.dq(q, p)

    def dp(self, q, p):
        self.calls["dp"] += 1
        return self.pend.dp(q, p)

    def dqdp(self, q, p):
        self.calls["dqdp"] += 1
        return self.pend.dq(q, p), self.pend.dp(q, p)


def test_a_systems_joint_dqdp_serves_rk4_and_the_midpoint_predictor():
    q, p = _rand((3, 1), -1, 1, 30), _rand((3, 1), -1, 1, 31)
    sys_ = _WithField()
    assert [torch.equal(a, b) for a, b in zip(step(sys_, q, p, 0.1, "rk4"), step(Pendulum(), q, p, 0.1, "rk4"))] == [
        True, True]
    assert sys_.calls == {"dq": 0, "dp": 0, "dqdp": 4}
    model = Mechanical(sys_, dt=0.1)
    x = torch.cat([q, p], -1)
    assert torch.equal(model.tendency(x), Mechanical(Pendulum(), dt=0.1).tendency(x)) and sys_.calls["dqdp"] == 5
    mid = step(sys_, q, p, 0.1, "implicit_midpoint")
    assert sys_.calls["dqdp"] == 7
    torch.testing.assert_close(mid, step(Pendulum(), q, p, 0.1, "implicit_midpoint"), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# energy: bounded for symplectic methods, drifting for RK4 (issue check 1)
# ---------------------------------------------------------------------------------------------------

def _energy_windows(method, steps, batch=32, dt=0.1):
    """Largest |H - H0| per initial state over the first and the last tenth of the run."""
    pend = Pendulum()
    q0 = torch.linspace(0.3, 2.5, batch, dtype=F64).unsqueeze(-1)
    traj = integrate(pend, q0, torch.zeros_like(q0), dt=dt, steps=steps, method=method)
    err = (energy(pend, traj.q, traj.p) - energy(pend, q0, torch.zeros_like(q0))).abs()
    tenth = err.shape[0] // 10
    return err[1:tenth + 1].amax(0), err[-tenth:].amax(0)


@pytest.mark.parametrize("method,steps", [("symplectic_euler", 2000), ("leapfrog", 2000),
                                          ("implicit_midpoint", 600)])
def test_symplectic_energy_error_is_bounded(method, steps):
    first, last = _energy_windows(method, steps, batch=8 if method == "implicit_midpoint" else 32)
    ratio = last / first
    # no drift: the error over the last tenth is the error over the first tenth (each spans >= 10 periods)
    assert float(ratio.max()) < 1.1 and float(ratio.min()) > 0.9, ratio
    assert float(last.max()) < 2.5          # and it is small (|H| up to 17.5 for these amplitudes)


def test_rk4_energy_drifts():
    first, last = _energy_windows("rk4", 2000)
    ratio = last / first
    # linear drift: the error at the end is ~10 times the error at a tenth of the run
    assert float(ratio.min()) > 7.0, ratio


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_energy_over_1e5_pendulum_steps(method):
    first, last = _energy_windows(method, 100_000, batch=8)
    ratio = last / first
    if method == "rk4":                      # the loss of energy slows as the swing shrinks: 6 to 9
        assert float(ratio.min()) > 4.0
    else:
        assert float(ratio.max()) < 1.1 and float(ratio.min()) > 0.9


# ---------------------------------------------------------------------------------------------------
# orders of convergence
# ---------------------------------------------------------------------------------------------------

ORDERS = {"symplectic_euler": 1.0, "leapfrog": 2.0, "implicit_midpoint": 2.0, "rk4": 4.0}


@pytest.mark.parametrize("method", METHODS)
def test_order_of_convergence_on_the_pendulum(method):
    q0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    p0 = torch.tensor([[0.0], [0.5]], dtype=F64)
    dts = [0.2, 0.1, 0.05] if method == "rk4" else [0.04, 0.02, 0.01]
    order = convergence_order(Pendulum(), q0, p0, method=method, t_end=0.4, dts=dts)
    assert abs(order - ORDERS[method]) < 0.1, order


@pytest.mark.parametrize("method", ["symplectic_euler", "leapfrog"])
def test_order_of_convergence_on_the_non_separable_double_pendulum(method):
    q0, p0 = torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([0.3, -0.2], dtype=F64)
    order = convergence_order(DoublePendulum(), q0, p0, method=method, t_end=0.2, dts=[0.04, 0.02, 0.01])
    assert abs(order - ORDERS[method]) < 0.1, order


@pytest.mark.slow
@pytest.mark.parametrize("method", ["implicit_midpoint", "rk4"])
def test_order_of_convergence_on_the_double_pendulum_slow(method):
    q0, p0 = torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([0.3, -0.2], dtype=F64)
    dts = [0.04, 0.02, 0.01] if method == "rk4" else [0.02, 0.01, 0.005]
    order = convergence_order(DoublePendulum(), q0, p0, method=method, t_end=0.4, dts=dts)
    assert abs(order - ORDERS[method]) < 0.1, order


# ---------------------------------------------------------------------------------------------------
# invariants
# ---------------------------------------------------------------------------------------------------

def test_implicit_midpoint_conserves_the_springs_quadratic_energy_to_round_off():
    spring = MassSpring(mass=0.5, stiffness=2.0)
    q0, p0 = _rand((8, 1), -1, 1, 4), _rand((8, 1), -1, 1, 5)
    h0 = energy(spring, q0, p0)
    mid = integrate(spring, q0, p0, dt=0.1, steps=200, method="implicit_midpoint", every=20)
    rel = ((energy(spring, mid.q, mid.p) - h0) / h0).abs().max()
    assert float(rel) < 1e-13
    leap = integrate(spring, q0, p0, dt=0.1, steps=200, method="leapfrog", every=20)
    assert float(((energy(spring, leap.q, leap.p) - h0) / h0).abs().max()) > 1e-4   # leapfrog's H is not exact


def test_two_body_leapfrog_conserves_momentum_and_angular_momentum():
    tb = TwoBody(m1=1.0, m2=0.5, gravity=1.0)
    q0, p0 = tb.default_state()
    q0 = q0 + _rand((6, 4), -0.05, 0.05, 6)                  # eccentric orbits with drift
    p0 = p0 * _rand((6, 1), 0.7, 1.1, 7) + _rand((6, 4), -0.02, 0.02, 8)
    traj = integrate(tb, q0, p0, dt=0.01, steps=500, method="leapfrog", every=50)
    mom = tb.total_momentum(traj.p)
    ang = tb.angular_momentum(traj.q, traj.p)
    torch.testing.assert_close(mom, mom[:1].expand_as(mom), rtol=0, atol=1e-13)
    torch.testing.assert_close(ang, ang[:1].expand_as(ang), rtol=0, atol=1e-12)
    h = energy(tb, traj.q, traj.p)
    assert float((h - h[0]).abs().max()) < 1e-2 * float(h[0].abs().min())
    rk = integrate(tb, q0, p0, dt=0.01, steps=500, method="rk4", every=50)
    ang_rk = tb.angular_momentum(rk.q, rk.p)
    assert float((ang_rk - ang_rk[0]).abs().max()) > 1e-10     # RK4 does not keep the quadratic invariant


# ---------------------------------------------------------------------------------------------------
# the systems against autograd of their own Hamiltonians and Lagrangians
# ---------------------------------------------------------------------------------------------------

SYSTEM_CASES = [MassSpring(mass=0.5, stiffness=2.0), Pendulum(mass=2.0, length=0.5, gravity=3.0),
                DoublePendulum(m1=1.3, m2=0.7, l1=0.9, l2=1.2, gravity=9.8), TwoBody(m1=1.0, m2=2.0, gravity=1.5)]


def _states(system, n, seed):
    q0, p0 = system.default_state()
    return q0 + _rand((n, system.dim), -0.3, 0.3, seed), p0 + _rand((n, system.dim), -0.5, 0.5, seed + 1)


@pytest.mark.parametrize("system", SYSTEM_CASES, ids=lambda s: s.name)
def test_field_is_the_symplectic_gradient_of_the_hamiltonian(system):
    q, p = _states(system, 50, 10)
    dhdq, dhdp = torch.func.vmap(torch.func.grad(system.hamiltonian, argnums=(0, 1)))(q, p)
    torch.testing.assert_close(system.dq(q, p), dhdp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(system.dp(q, p), -dhdq, rtol=1e-12, atol=1e-12)


def _euler_lagrange(lagrangian, q, v):
    """a = (d2L/dv2)^-1 (dL/dq - d2L/dv dq v), per sample by torch.func, for the oracle."""
    def one(qi, vi):
        dldq = torch.func.grad(lagrangian, argnums=0)(qi, vi)
        hvv = torch.func.hessian(lagrangian, argnums=1)(qi, vi)
        hvq = torch.func.jacrev(torch.func.grad(lagrangian, argnums=1), argnums=0)(qi, vi)
        return torch.linalg.solve(hvv, dldq - hvq @ vi)
    return torch.func.vmap(one)(q, v)


def test_double_pendulum_acceleration_solves_the_euler_lagrange_equations_of_its_lagrangian():
    dp = DoublePendulum()                    # Cranmer et al.: m = l = 1, g = 9.8; their state distribution
    q, v = _rand((200, 2), 0, 2 * math.pi, 11), _rand((200, 2), -10, 10, 12)
    torch.testing.assert_close(dp.acceleration(q, v), _euler_lagrange(dp.lagrangian, q, v), rtol=1e-10, atol=1e-10)
    other = SYSTEM_CASES[2]
    torch.testing.assert_close(other.acceleration(q, v), _euler_lagrange(other.lagrangian, q, v),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("system", SYSTEM_CASES, ids=lambda s: s.name)
def test_hamiltonian_field_is_the_lagrangian_dynamics_through_the_legendre_map(system):
    q, _ = _states(system, 40, 13)
    v = _rand((40, system.dim), -2, 2, 14)
    a = system.acceleration(q, v)
    torch.testing.assert_close(a, _euler_lagrange(system.lagrangian, q, v), rtol=1e-10, atol=1e-10)
    p = system.momentum(q, v)
    torch.testing.assert_close(p, torch.func.vmap(torch.func.grad(system.lagrangian, argnums=1))(q, v),
                               rtol=1e-12, atol=1e-12)                       # p = dL/dv
    torch.testing.assert_close(system.velocity(q, p), v, rtol=1e-12, atol=1e-12)
    # dq/dt = v and dp/dt = d/dt [p(q, v)] along (q', v') = (v, a)
    _, pdot = torch.func.jvp(system.momentum, (q, v), (v, a))
    torch.testing.assert_close(system.dq(q, p), v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(system.dp(q, p), pdot, rtol=1e-10, atol=1e-10)
    # and the Hamiltonian is the energy T + V = v . dL/dv - L
    torch.testing.assert_close(system.hamiltonian(q, p), (v * p).sum(-1) - system.lagrangian(q, v),
                               rtol=1e-12, atol=1e-12)


def test_double_pendulum_mass_matrix():
    dp = SYSTEM_CASES[2]
    q, v = _rand((20, 2), 0, 6, 15), _rand((20, 2), -3, 3, 16)
    mm = dp.mass_matrix(q)
    torch.testing.assert_close((mm @ v.unsqueeze(-1)).squeeze(-1), dp.momentum(q, v), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(mm, torch.func.vmap(torch.func.hessian(dp.lagrangian, argnums=1))(q, v),
                               rtol=1e-12, atol=1e-12)


def test_greydanus_hamiltonians():
    q, p = _rand((30, 1), -3, 3, 17), _rand((30, 1), -3, 3, 18)
    torch.testing.assert_close(MassSpring(mass=0.5, stiffness=2.0).hamiltonian(q, p), (q * q + p * p).sum(-1))
    torch.testing.assert_close(Pendulum(mass=2.0, length=0.5, gravity=3.0).hamiltonian(q, p),
                               (3 * (1 - torch.cos(q)) + p * p).sum(-1))


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_config_round_trips(name):
    cls = SYSTEMS[name]
    system = cls()
    assert cls(**system.config()) == system and system.name == name
    model = make_mechanical(name, dt=0.05, substeps=2, method="rk4", noise_cov=0.01)
    cfg = model.config()
    assert cfg["system"] == name and cfg["dt"] == 0.05 and cfg["substeps"] == 2 and cfg["noise_cov"] == 0.01
    again = Mechanical(**cfg)
    assert again.config() == cfg and again.system == model.system
    rest = dict(cfg)
    assert make_mechanical(rest.pop("system"), **rest).config() == cfg


# ---------------------------------------------------------------------------------------------------
# dtypes, batching, recording, gradients
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_float32_follows_float64(method):
    dp = DoublePendulum()
    q, p = _states(dp, 3, 20)
    ref = integrate(dp, q, p, dt=0.01, steps=50, method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        low = integrate(dp, q.float(), p.float(), dt=0.01, steps=50, method=method)
    assert low.q.dtype == torch.float32 and low.p.dtype == torch.float32 and low.t.dtype == torch.float32
    torch.testing.assert_close(low.q.double(), ref.q, rtol=0, atol=2e-5)
    torch.testing.assert_close(low.p.double(), ref.p, rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("system", [Pendulum(), DoublePendulum()], ids=["pendulum", "double_pendulum"])
def test_leading_dims_are_independent_problems(system, method):
    q, p = _states(system, 6, 21)
    q, p = q.reshape(2, 3, system.dim), p.reshape(2, 3, system.dim)
    q1, p1 = step(system, q, p, 0.05, method)
    assert q1.shape == (2, 3, system.dim)
    for i in range(2):
        for j in range(3):
            qi, pi = step(system, q[i, j], p[i, j], 0.05, method)
            torch.testing.assert_close(q1[i, j], qi, rtol=1e-14, atol=1e-15)
            torch.testing.assert_close(p1[i, j], pi, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("method", METHODS)
def test_empty_batches(method):
    traj = integrate(DoublePendulum(), torch.ones(0, 2, dtype=F64), torch.ones(0, 2, dtype=F64), dt=0.1, steps=2,
                     method=method)
    assert traj.q.shape == (3, 0, 2) and traj.p.shape == (3, 0, 2)


def test_integrate_records_every_step_and_matches_step():
    pend = Pendulum()
    q0, p0 = _states(pend, 4, 22)
    full = integrate(pend, q0, p0, dt=0.05, steps=23, method="implicit_midpoint")
    sparse = integrate(pend, q0, p0, dt=0.05, steps=23, method="implicit_midpoint", every=5)
    assert isinstance(sparse, Trajectory) and sparse.q.shape == (5, 4, 1) and full.q.shape == (24, 4, 1)
    torch.testing.assert_close(sparse.t, torch.arange(0, 24, 5, dtype=F64) * 0.05)
    assert torch.equal(sparse.q, full.q[::5]) and torch.equal(sparse.p, full.p[::5])
    q1, p1 = step(pend, q0, p0, 0.05, "implicit_midpoint")
    assert torch.equal(q1, full.q[1]) and torch.equal(p1, full.p[1])
    none = integrate(pend, q0, p0, dt=0.05, steps=0)
    assert none.q.shape == (1, 4, 1) and torch.equal(none.q[0], q0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("system", [Pendulum(), DoublePendulum()], ids=["pendulum", "double_pendulum"])
def test_gradients_flow_through_integrate(system, method):
    q0, p0 = _states(system, 2 if system.separable else 1, 23)

    def final(q, p):
        traj = integrate(system, q, p, dt=0.05, steps=3 if system.separable else 2, method=method)
        return traj.q[-1], traj.p[-1]

    assert torch.autograd.gradcheck(final, (q0.requires_grad_(), p0.requires_grad_()))


def test_gradients_reach_system_parameters():
    class Spring(torch.nn.Module):
        dim, separable = 1, False

        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(2.0, dtype=F64))

        def dq(self, q, p):
            return p

        def dp(self, q, p):
            return -self.k * q

    s = Spring()
    traj = integrate(s, torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64), dt=0.01, steps=10,
                     method="implicit_midpoint")
    traj.q[-1].sum().backward()
    # q(t) = cos(sqrt(k) t): dq/dk = -t sin(sqrt(k) t) / (2 sqrt(k)) at t = 0.1, to O(dt^2)
    expected = -0.1 * math.sin(math.sqrt(2.0) * 0.1) / (2 * math.sqrt(2.0))
    assert abs(float(s.k.grad) - expected) < 1e-4 * abs(expected)


# ---------------------------------------------------------------------------------------------------
# the Mechanical model in daml
# ---------------------------------------------------------------------------------------------------

def test_mechanical_step_is_substeps_of_step():
    dp = DoublePendulum()
    model = Mechanical(dp, dt=0.1, substeps=4, method="leapfrog")
    assert model.state_size == 4 and model.dt == 0.1
    x = model.default_x0()
    q, p = x[:2], x[2:]
    for _ in range(4):
        q, p = step(dp, q, p, 0.025, "leapfrog")
    with torch.no_grad():
        assert torch.equal(model.step(x), torch.cat([q, p]))
    torch.testing.assert_close(model.tendency(x), torch.cat([dp.dq(x[:2], x[2:]), dp.dp(x[:2], x[2:])]))
    torch.testing.assert_close(model.energy(x), dp.hamiltonian(x[:2], x[2:]))


@pytest.mark.parametrize("method", METHODS)
def test_tangent_linear_under_vmap_jacfwd_equals_reverse_mode(method):
    model = Mechanical(DoublePendulum(), dt=0.02, method=method, max_iter=12)
    x = torch.cat(_states(model.system, 2, 24), -1)
    jac = tangent_linear(model, x)               # vmap(jacfwd(step)): a fixed iteration count
    for i in range(2):
        ref = torch.autograd.functional.jacobian(model.step, x[i])   # data-dependent stopping
        torch.testing.assert_close(jac[i], ref, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pendulum_twin_with_the_etkf_the_ekf_and_a_particle_filter(dtype):
    model = Mechanical(Pendulum(), dt=0.05, substeps=2, noise_cov=[1e-4, 1e-3])
    obs = observe_all(2, sd=0.3)
    data = daml.simulate(model, 40, obs, every=2, x0=[1.5, 0.0], x0_cov=0.1, seed=0, dtype=dtype)
    obs_err = float(np.sqrt(np.nanmean((data["y"].values - data["truth"].values) ** 2)))
    filts = (daml.filters.etkf(members=20), daml.filters.extended_kalman_filter(), daml.filters.bootstrap(200))
    for filt in filts:
        res = daml.filters.run(filt, model, data, seed=1, progress=False, dtype=dtype)
        daml.posterior.validate(res.analysis)
        err = float(daml.diagnostics.rmse(res.analysis, data["truth"]).mean())
        assert err < 0.8 * obs_err, (filt.name, err, obs_err)


# ---------------------------------------------------------------------------------------------------
# trust: convergence and divergence
# ---------------------------------------------------------------------------------------------------

def test_unconverged_fixed_point_warns_naming_dt():
    q, p = torch.ones(1, dtype=F64), torch.ones(1, dtype=F64)
    with pytest.warns(ConvergenceWarning, match="dt=1.0"):
        step(_Damped(1.0), q, p, 1.0, "symplectic_euler")        # contraction factor 1: oscillates
    with pytest.warns(ConvergenceWarning, match="3 steps"):
        integrate(_Damped(1.0), q, p, dt=1.0, steps=3, method="symplectic_euler", max_iter=51)
    with pytest.warns(ConvergenceWarning, match="dt / substeps"):
        Mechanical(_Damped(1.0), dt=1.0, method="symplectic_euler").step(torch.ones(2, dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        q1, p1 = step(_Damped(1.0), q, p, 0.1, "symplectic_euler")   # contracts
    torch.testing.assert_close(p1, p / 1.1, rtol=1e-14, atol=0)
    with pytest.warns(ConvergenceWarning, match="dt=0.3"):           # the double pendulum at a large step
        step(DoublePendulum(), torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([5.0, -3.0], dtype=F64), 0.3,
             "symplectic_euler")


def test_non_finite_states_raise_divergence():
    q, p = torch.ones(1, dtype=F64), torch.ones(1, dtype=F64)
    with pytest.raises(DivergenceError, match="dt=1.0"):
        step(_Damped(1e10), q, p, 1.0, "symplectic_euler")           # the iteration overflows
    tb = TwoBody()
    coll = torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=F64)            # both bodies at one point
    with pytest.raises(DivergenceError):
        step(tb, coll, torch.zeros(4, dtype=F64), 0.1, "rk4")
    with pytest.raises(DivergenceError) as info:                    # q'' = q^2 blows up at t ~ 3
        integrate(_BlowUp(), torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64), dt=0.05, steps=200,
                  method="leapfrog")
    assert info.value.step is not None and 50 <= info.value.step <= 200


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    pend = Pendulum()
    q, p = torch.ones(3, 1, dtype=F64), torch.zeros(3, 1, dtype=F64)
    with pytest.raises(InputError, match="^system:"):
        step(object(), q, p, 0.1)
    with pytest.raises(InputError, match="^method: expected one of"):
        step(pend, q, p, 0.1, "euler")
    for bad in (0.0, -0.1, float("nan"), "0.1"):
        with pytest.raises(InputError, match="^dt:"):
            step(pend, q, p, bad)
    with pytest.raises(InputError, match="^steps:"):
        integrate(pend, q, p, dt=0.1, steps=-1)
    with pytest.raises(InputError, match="^every:"):
        integrate(pend, q, p, dt=0.1, steps=3, every=0)
    with pytest.raises(ShapeError, match="^p:.*shape of q"):
        step(pend, q, torch.zeros(2, 1, dtype=F64), 0.1)
    with pytest.raises(ShapeError, match="^p0:"):
        integrate(pend, q, torch.zeros(2, 1, dtype=F64), dt=0.1, steps=1)
    with pytest.raises(ShapeError, match="^q:.*dim"):
        step(pend, torch.ones(3, 2, dtype=F64), torch.ones(3, 2, dtype=F64), 0.1)
    with pytest.raises(DtypeError, match="^p:"):
        step(pend, q, p.float(), 0.1)
    with pytest.raises(DtypeError, match="^q:"):
        step(pend, "one", p, 0.1)
    with pytest.raises(NonFiniteError, match="^q:"):
        step(pend, torch.tensor([[float("nan")]], dtype=F64), torch.zeros(1, 1, dtype=F64), 0.1)
    with pytest.raises(NonFiniteError, match="^p0:"):
        integrate(pend, q, torch.full((3, 1), float("inf"), dtype=F64), dt=0.1, steps=1)
    with pytest.raises(InputError, match="^tol:"):
        step(pend, q, p, 0.1, tol=-1.0)
    with pytest.raises(InputError, match="^max_iter:"):
        step(pend, q, p, 0.1, max_iter=0)
    with pytest.raises(InputError, match="^system:.*hamiltonian"):
        energy(_Damped(1.0), q, p)
    with pytest.raises(InputError, match="^dts:"):
        convergence_order(pend, q, p, method="leapfrog", t_end=1.0, dts=[0.1])
    with pytest.raises(InputError, match="^dts:.*divide"):
        convergence_order(pend, q, p, method="leapfrog", t_end=1.0, dts=[0.3, 0.1])
    with pytest.raises(InputError, match="^dts:.*1e\\+07"):
        convergence_order(pend, q, p, method="leapfrog", t_end=1.0, dts=[1e-300, 0.1])
    with pytest.raises(InputError, match="^q0:"):
        convergence_order(pend, torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), method="rk4", t_end=1.0,
                          dts=[0.5, 0.25])
    with pytest.raises(InputError, match="^steps:.*memory"):
        integrate(pend, q, p, dt=0.1, steps=10**15)
    with pytest.raises(InputError, match="^name:"):
        make_mechanical("pendulumm", dt=0.1)
    with pytest.raises(InputError, match="^pendulum:.*parameters"):
        make_mechanical("pendulum", dt=0.1, lenght=1.0)
    with pytest.raises(InputError, match="^length:"):
        Pendulum(length=-1.0)
    with pytest.raises(InputError, match="^substeps:"):
        Mechanical(pend, dt=0.1, substeps=0)
    with pytest.raises(InputError, match="^noise_cov:"):
        Mechanical(pend, dt=0.1, noise_cov=-1.0)
    with pytest.raises(InputError, match="^system:"):
        Mechanical("nope", dt=0.1)
    with pytest.raises(ShapeError, match="^x:"):
        Mechanical(pend, dt=0.1).step(torch.ones(3, dtype=F64))
