"""Hamiltonian, Lagrangian and plain networks (daml.models.hamiltonian): oracles, transforms, training."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, stack_module_state, vmap

from daml.errors import (ConvergenceWarning, DivergenceError, DtypeError, InputError, ModuleError,
                         NonFiniteError, SeedError, ShapeError)
from daml.models import mechanics as M
from daml.models.hamiltonian import (DerivativeNet, FitResult, HamiltonianNet, IllConditionedWarning, LagrangianNet,
                                     fit_derivatives, fit_trajectories, lagrangian_acceleration)

F64 = torch.float64
NETS = [(HamiltonianNet, {"hidden": 16}), (DerivativeNet, {"hidden": 16}), (LagrangianNet, {"hidden": 16, "layers": 2})]


def _states(n, d, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2 * d, generator=g, dtype=dtype)


def _dp_states(n, seed=0):
    """Cranmer et al.'s double-pendulum training distribution: theta ~ U(0, 2pi)^2, omega ~ U(-10, 10)^2."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(n, 2, generator=g, dtype=F64) * 2 * math.pi
    v = (torch.rand(n, 2, generator=g, dtype=F64) - 0.5) * 20
    return q, v


class TrueH(HamiltonianNet):
    """A HamiltonianNet whose H is a true system's Hamiltonian."""

    def __init__(self, system, **kw):
        super().__init__(system.dim, hidden=4, seed=0, **kw)
        self.system = system

    def hamiltonian(self, q, p):
        return self.system.hamiltonian(q, p)


class TrueL(LagrangianNet):
    """A LagrangianNet whose L is a true system's Lagrangian."""

    def __init__(self, system, **kw):
        super().__init__(system.dim, hidden=4, layers=1, seed=0, **kw)
        self.system = system

    def lagrangian(self, q, v):
        return self.system.lagrangian(q, v)


# -- oracles ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("system", [M.MassSpring(0.5, 2.0), M.Pendulum(2.0, 0.5, 3.0), M.DoublePendulum(),
                                    M.TwoBody()], ids=lambda s: s.name)
def test_true_hamiltonian_reproduces_the_exact_field(system):
    net = TrueH(system)
    x = _states(64, system.dim, seed=1)
    if system.name == "two_body":
        x[:, 2:4] += 3.0                                      # keep the bodies apart
    q, p = x[..., :system.dim], x[..., system.dim:]
    exact = torch.cat([system.dq(q, p), system.dp(q, p)], -1)
    torch.testing.assert_close(net(x), exact, rtol=1e-12, atol=1e-12)
    with torch.no_grad():                                     # filters run under no_grad
        torch.testing.assert_close(net(x), exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.dq(q, p), system.dq(q, p), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.dp(q, p), system.dp(q, p), rtol=1e-12, atol=1e-12)
    # the tangent-linear map (EKF): jacfwd of the network's field = jacfwd of the exact field
    exact_f = lambda z: torch.cat([system.dq(z[..., :system.dim], z[..., system.dim:]),
                                   system.dp(z[..., :system.dim], z[..., system.dim:])], -1)
    torch.testing.assert_close(vmap(jacfwd(net))(x[:8]), vmap(jacfwd(exact_f))(x[:8]), rtol=1e-10, atol=1e-10)


def test_euler_lagrange_matches_analytic_double_pendulum():
    """The Euler-Lagrange solve of the true Lagrangian = the closed-form accelerations, to 1e-10 (float64)."""
    system = M.DoublePendulum()
    q, v = _dp_states(2000)
    exact = system.acceleration(q, v)
    for solver in ("solve", "pinv"):
        acc = lagrangian_acceleration(system.lagrangian, q, v, solver=solver)
        assert float((acc - exact).abs().max()) < 1e-10
    net = TrueL(system)
    out = net(torch.cat([q, v], -1))
    assert float((out[:, 2:] - exact).abs().max()) < 1e-10
    torch.testing.assert_close(out[:, :2], v, rtol=0, atol=0)
    # a non-default double pendulum too (masses and lengths enter the mass matrix)
    other = M.DoublePendulum(m1=2.0, m2=0.5, l1=1.5, l2=0.7, gravity=3.0)
    assert float((lagrangian_acceleration(other.lagrangian, q, v) - other.acceleration(q, v)).abs().max()) < 1e-10
    # energy E = v.dL/dv - L is the Hamiltonian at p = M(q) v
    torch.testing.assert_close(net.energy(torch.cat([q, v], -1)), system.hamiltonian(q, system.momentum(q, v)),
                               rtol=1e-12, atol=1e-10)


def test_batched_solve_equals_per_sample_loop():
    """vmap + batched solve = a Python loop of torch.autograd.functional.hessian / jacobian per state."""
    net = LagrangianNet(2, hidden=32, layers=2, seed=3)
    q, v = _dp_states(12, seed=4)
    batched = lagrangian_acceleration(lambda a, b: net.lagrangian(a, b), q, v)
    rows = []
    for qi, vi in zip(q, v):
        f = lambda a, b: net.lagrangian(a, b)
        (hqq, hqv), (hvq, hvv) = torch.autograd.functional.hessian(f, (qi, vi))
        gq = torch.autograd.functional.jacobian(lambda a: f(a, vi), qi)
        rows.append(torch.linalg.solve(hvv, gq - hvq @ vi))
    torch.testing.assert_close(batched, torch.stack(rows), rtol=1e-9, atol=1e-9)
    # leading dims are all batch dims
    torch.testing.assert_close(lagrangian_acceleration(net.lagrangian, q.reshape(3, 4, 2), v.reshape(3, 4, 2)),
                               batched.reshape(3, 4, 2), rtol=1e-12, atol=1e-12)
    one = lagrangian_acceleration(net.lagrangian, q[0], v[0])
    assert one.shape == (2,)
    torch.testing.assert_close(one, batched[0], rtol=1e-12, atol=1e-12)


def test_singular_velocity_hessian_is_refused_or_flagged():
    def L(q, v):                                    # no v2 dependence: d2L/dv2 = diag(1, 0)
        return 0.5 * v[..., 0] ** 2 - 0.5 * (q ** 2).sum(-1)

    q, v = _dp_states(5)
    with pytest.raises(DivergenceError, match="singular"):
        lagrangian_acceleration(L, q, v)
    with pytest.warns(IllConditionedWarning, match="singular"):
        acc = lagrangian_acceleration(L, q, v, solver="pinv")
    torch.testing.assert_close(acc[:, 0], -q[:, 0])          # determined part right, minimum-norm rest = 0
    torch.testing.assert_close(acc[:, 1], torch.zeros(5, dtype=F64))

    def L_ill(q, v):                                # condition number 1e15 > 1e-2 / eps
        return 0.5 * v[..., 0] ** 2 + 0.5e-15 * v[..., 1] ** 2
    with pytest.warns(IllConditionedWarning, match="ill-conditioned"):
        lagrangian_acceleration(L_ill, q, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lagrangian_acceleration(L_ill, q, v, check=False)       # no check asked: no warning


# -- torch.func: what the filters and daml.ensembles need -------------------------------------------------------
@pytest.mark.parametrize("cls,kw", NETS, ids=lambda c: getattr(c, "__name__", ""))
def test_transforms_vmap_functional_call_grad_jacfwd_no_grad(cls, kw):
    x = _states(6, 2, seed=5)
    nets = [cls(2, seed=s, **kw) for s in range(3)]
    net = nets[0]
    params, _ = stack_module_state(nets)
    # members stacked: vmap over functional_call = each member on its own
    out = vmap(lambda p, xx: functional_call(net, p, (xx,)), in_dims=(0, None))(params, x)
    torch.testing.assert_close(out, torch.stack([n(x) for n in nets]), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        out_ng = vmap(lambda p, xx: functional_call(net, p, (xx,)), in_dims=(0, None))(params, x)
        # the same states expanded over members (stride 0), as daml.ensembles.fit's vmap probe passes them
        out_ex = vmap(lambda p, xx: functional_call(net, p, (xx,)), randomness="different")(
            params, x.unsqueeze(0).expand(3, *x.shape))
    torch.testing.assert_close(out_ng, out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(out_ex, out.detach(), rtol=1e-12, atol=1e-12)

    def loss(p, xx):
        return functional_call(net, p, (xx,)).pow(2).mean()

    # torch.func.grad over parameters, vmapped over members = autograd of each member
    g = vmap(grad(loss), in_dims=(0, None))(params, x)
    nets[2].zero_grad()
    nets[2](x).pow(2).mean().backward()
    for name, p in nets[2].named_parameters():
        torch.testing.assert_close(g[name][2], p.grad, rtol=1e-9, atol=1e-12)
        assert float(p.grad.abs().sum()) > 0
    # ordinary autograd through vmap(functional_call) (daml.ensembles.fit's loop) = the same gradients
    req = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(vmap(loss, in_dims=(0, None))(req, x).sum(), list(req.values()))
    for gr, name in zip(grads, req):
        torch.testing.assert_close(gr, g[name], rtol=1e-9, atol=1e-12)
    # jacfwd (EKF tangent-linear), vmapped over states, under no_grad = autograd's Jacobian
    with torch.no_grad():
        jac = vmap(jacfwd(net))(x)
    ref = torch.stack([torch.autograd.functional.jacobian(net, xi) for xi in x])
    torch.testing.assert_close(jac, ref, rtol=1e-9, atol=1e-9)


def test_networks_are_partitioned_systems_for_the_integrators():
    for cls, kw in NETS:
        net = cls(1, seed=0, **kw)
        assert net.dim == 1 and net.separable is False and net.state_size == 2
        q, p = torch.tensor([[0.3]], dtype=F64), torch.tensor([[-0.2]], dtype=F64)
        with torch.no_grad():
            for method in M.METHODS:
                traj = M.integrate(net, q, p, dt=0.01, steps=2, method=method)
                assert traj.q.shape == (3, 1, 1) and bool(torch.isfinite(traj.p).all())
    # a HamiltonianNet conserves its own H under the implicit midpoint rule, to the fixed-point tolerance
    net = HamiltonianNet(1, hidden=16, seed=2)
    with torch.no_grad():
        tr = M.integrate(net, q, p, dt=0.05, steps=20, method="implicit_midpoint")
        h = net.hamiltonian(tr.q, tr.p)
        assert float((h - h[0]).abs().max()) < 1e-3 * float(h.abs().max() + 1)


def _model_checks(cls, kw, methods):
    from daml.models.base import batched_jacobian

    net = cls(1, seed=0, **{**kw, "init": "orthogonal"})      # Cranmer's init: |accelerations| up to 140, stiff
    x = _states(2, 1, seed=11)
    for method in methods:
        model = M.Mechanical(net, 0.01, method=method, max_iter=12)      # 12 iterations: converged at dt=0.01
        with torch.no_grad():
            y = model.step(x)
            jac = batched_jacobian(model.step, x)
        torch.testing.assert_close(y, model.step(x).detach(), rtol=0, atol=0)
        ref = torch.stack([torch.autograd.functional.jacobian(model.step, xi) for xi in x])
        torch.testing.assert_close(jac, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cls,kw", NETS, ids=lambda c: getattr(c, "__name__", ""))
def test_networks_as_daml_models_step_and_tangent_linear(cls, kw):
    """Wrapped by mechanics.Mechanical: filters step it under no_grad, and the EKF's tangent-linear map
    (models.base.batched_jacobian: vmap of jacfwd) equals autograd's Jacobian, implicit stages included
    (for the Lagrangian network those are in the slow test below)."""
    _model_checks(cls, kw, ("rk4",) if cls is LagrangianNet else ("rk4", "implicit_midpoint"))


@pytest.mark.slow
def test_lagrangian_net_model_tangent_linear_through_implicit_stages():
    _model_checks(LagrangianNet, {"hidden": 16, "layers": 2}, ("implicit_midpoint", "leapfrog"))


# -- training -----------------------------------------------------------------------------------------------------
def _spring_data(seed, n=250, noise=0.1):
    """Greydanus' ideal spring H = q^2 + p^2: states on circles of radius U(0.1, 1), exact derivatives
    at the clean states, noise of sd 0.1 on the inputs (experiment-spring/data.py)."""
    system = M.MassSpring(mass=0.5, stiffness=2.0)
    g = torch.Generator().manual_seed(seed)
    r = 0.1 + 0.9 * torch.rand(n, 1, generator=g, dtype=F64)
    th = 2 * math.pi * torch.rand(n, 1, generator=g, dtype=F64)
    clean = torch.cat([r * torch.cos(th), r * torch.sin(th)], -1)
    dxdt = torch.cat([system.dq(clean[:, :1], clean[:, 1:]), system.dp(clean[:, :1], clean[:, 1:])], -1)
    return system, clean + noise * torch.randn(n, 2, generator=g, dtype=F64), dxdt


def test_spring_training_decreases_loss_and_hnn_conserves_energy_better():
    """Trained on noisy spring data, both fit the derivatives; only the HNN keeps the energy (Greydanus
    et al.'s finding; this configuration measured energy-MSE ratios MLP / HNN of 6 to 2900 over seeds
    0-3, 2900 for the seed used here; asserted > 10)."""
    system, x, dxdt = _spring_data(0, n=150)
    ang = torch.linspace(0, 2 * math.pi, 9, dtype=F64)[:-1, None]
    q0, p0 = 0.7 * torch.cos(ang), 0.7 * torch.sin(ang)
    energy_mse = {}
    for cls in (HamiltonianNet, DerivativeNet):
        net = cls(1, hidden=32, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = fit_derivatives(net, x[:100], dxdt[:100], steps=200, x_val=x[100:], dxdt_val=dxdt[100:])
        assert isinstance(res, FitResult) and res.net is net
        assert res.history.shape == (200,) and res.val_history.shape == (200,)
        assert float(res.history[-1]) < 0.1 * float(res.history[0])
        assert float(res.val_history[-1]) < 0.1 * float(res.val_history[0])
        assert res.seconds > 0 and res.config["steps"] == 200 and res.config["net"] == cls.__name__
        with torch.no_grad():
            tr = M.integrate(net, q0, p0, dt=0.2, steps=100, method="rk4")
        e = system.hamiltonian(tr.q, tr.p)
        energy_mse[cls.__name__] = float(((e - e[0]) ** 2).mean())
    assert energy_mse["HamiltonianNet"] < energy_mse["DerivativeNet"] / 10, energy_mse


def test_lagrangian_net_trains_on_accelerations():
    system = M.MassSpring(mass=0.5, stiffness=2.0)
    x = _states(128, 1, seed=6)
    dxdt = torch.cat([x[:, 1:], system.acceleration(x[:, :1], x[:, 1:])], -1)
    net = LagrangianNet(1, hidden=32, layers=2, init="orthogonal", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = fit_derivatives(net, x, dxdt, steps=60, lr=3e-3, batch_size=64, seed=1)
    assert float(res.history[-10:].mean()) < 0.5 * float(res.history[:10].mean())
    assert net.checks is True                                   # restored after training
    res = fit_derivatives(LagrangianNet(1, hidden=8, layers=1, solver="pinv", seed=0), x, dxdt, steps=3, loss="l1",
                          tol=math.inf)
    assert bool(torch.isfinite(res.history).all())


def test_fit_trajectories_decreases_loss():
    system = M.MassSpring(mass=0.5, stiffness=2.0)
    g = torch.Generator().manual_seed(0)
    q0 = torch.rand(8, 1, generator=g, dtype=F64) + 0.2
    tr = M.integrate(system, q0, torch.zeros_like(q0), dt=0.1, steps=20)
    net = HamiltonianNet(1, hidden=16, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = fit_trajectories(net, tr, 0.1, horizon=3, method="rk4", steps=30, lr=1e-2, batch_size=32, seed=0,
                               val_trajectory=torch.cat([tr.q, tr.p], -1)[:, :2])
    assert float(res.history[-5:].mean()) < 0.5 * float(res.history[:5].mean())
    assert float(res.val_history[-1]) < 0.5 * float(res.val_history[0])
    assert res.val_history.shape == (30,) and res.config["method"] == "rk4"
    # an implicit integrator (fixed-point stages on the non-separable network), gradients through it
    before = [p.detach().clone() for p in net.parameters()]
    res = fit_trajectories(net, tr, 0.1, horizon=2, method="leapfrog", steps=2, step_tol=1e-8, tol=math.inf)
    assert bool(torch.isfinite(res.history).all())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_unconverged_training_warns():
    system, x, dxdt = _spring_data(1, n=50)
    with pytest.warns(ConvergenceWarning, match="still falling"):
        res = fit_derivatives(HamiltonianNet(1, hidden=8, seed=0), x, dxdt, steps=20)
    assert res.converged is False
    res = fit_derivatives(DerivativeNet(1, hidden=8, seed=0), x, dxdt, steps=30, lr=1e-12, tol=1e-2)
    assert res.converged is True                              # a flat loss has stopped improving


def test_a_loss_that_rises_at_the_end_is_not_converged():
    """A loss that rose over the last quarter (an unstable step size) was counted as converged: the
    criterion only asked whether it had stopped falling. Regression test."""
    from daml.models.hamiltonian import _convergence

    ok, rel = _convergence(torch.linspace(1.0, 2.0, 40, dtype=torch.float64), 0.01)
    assert not ok and rel < -0.01
    ok, rel = _convergence(torch.linspace(2.0, 1.0, 40, dtype=torch.float64), 0.01)
    assert not ok and rel > 0.01
    ok, _ = _convergence(torch.full((40,), 1.0, dtype=torch.float64), 0.01)
    assert ok


def test_divergent_training_names_the_step():
    system, x, dxdt = _spring_data(1, n=50)
    with pytest.raises(DivergenceError, match="time step"):
        fit_derivatives(DerivativeNet(1, hidden=8, seed=0), x, dxdt * 1e300, steps=5)


# -- reproducibility, dtypes, configuration ---------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", NETS, ids=lambda c: getattr(c, "__name__", ""))
def test_seeds_reproduce_bit_for_bit_and_config_rebuilds(cls, kw):
    a, b, c = cls(2, seed=7, **kw), cls(2, seed=7, **kw), cls(2, seed=8, **kw)
    for (k, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), k
        assert k.endswith("bias") or not torch.equal(pa, pc), k       # Cranmer's biases start at zero
    rebuilt = cls(**a.config())
    assert all(torch.equal(u, w) for u, w in zip(a.state_dict().values(), rebuilt.state_dict().values()))
    # daml.io.load_network: constructor from config() with seed=0, dtype, device; then the saved weights
    cfg = {k: v for k, v in a.config().items() if k != "seed"}
    loaded = cls(**cfg, seed=0, dtype=F64, device="cpu")
    loaded.load_state_dict(c.state_dict())
    torch.testing.assert_close(loaded(_states(3, 2)), c(_states(3, 2)), rtol=0, atol=0)
    x = _states(40, 2, seed=9)
    y = a(x).detach()
    r1 = fit_derivatives(a, x, y + 0.1, steps=3, batch_size=16, seed=3, tol=math.inf)
    r2 = fit_derivatives(b, x, y + 0.1, steps=3, batch_size=16, seed=3, tol=math.inf)
    assert torch.equal(r1.history, r2.history)
    assert all(torch.equal(u, w) for u, w in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("cls,kw", NETS, ids=lambda c: getattr(c, "__name__", ""))
def test_float32_works(cls, kw):
    net = cls(2, seed=0, dtype=torch.float32, **kw)
    x = _states(20, 2, dtype=torch.float32)
    y = net(x)
    assert y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    # same draw as float64, cast
    n64 = cls(2, seed=0, **kw)
    torch.testing.assert_close(y, n64(x.double()).float(), rtol=1e-3, atol=1e-3)
    before = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():                                    # training turns autograd on itself
        res = fit_derivatives(net, x, y.detach() * 0.5, steps=5, tol=math.inf)
    assert bool(torch.isfinite(res.history).all()) and res.converged is True
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_initialisations_follow_the_peers():
    # Greydanus: orthogonal weights (rows orthonormal for wide, columns for tall), no output bias
    net = HamiltonianNet(1, seed=0)
    lins = list(net.mlp.linears)
    assert [tuple(l.weight.shape) for l in lins] == [(200, 2), (200, 200), (1, 200)]
    assert lins[-1].bias is None and all(l.bias is not None for l in lins[:-1])
    for l in lins:
        w = l.weight
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=F64), rtol=0, atol=1e-12)
    assert float(lins[0].bias.detach().abs().max()) <= 1 / math.sqrt(2)          # torch's default bias bound
    assert float(lins[1].bias.detach().abs().max()) <= 1 / math.sqrt(200)
    # Cranmer's custom_init for the double pendulum (600 wide, 3 layers): sd c_i / sqrt(600), biases 0
    lnn = LagrangianNet(2, seed=0)
    lins = list(lnn.mlp.linears)
    assert [tuple(l.weight.shape) for l in lins] == [(600, 4), (600, 600), (600, 600), (1, 600)]
    expected = [2.2, 0.58, 1.16, 600.0]
    for l, c in zip(lins, expected):
        sd = float(l.weight.detach().std())
        n = l.weight.numel()
        # relative standard error of a sample sd is 1/sqrt(2n): 5 standard errors
        assert abs(sd / (c / math.sqrt(600)) - 1) < 5 / math.sqrt(2 * n) + 1e-12, (c, sd)
    assert all(float(l.bias.detach().abs().max()) == 0 for l in lins[:-1])
    assert lnn.config() == {"dim": 2, "hidden": 600, "layers": 3, "activation": "softplus", "init": "cranmer",
                            "seed": 0, "solver": "solve", "periodic": False}


def test_defaults_are_the_peers_numbers():
    """greydanus/hamiltonian-nn experiment-spring/train.py: hidden_dim 200, tanh, Adam lr 1e-3, weight decay
    1e-4, 2000 full-batch steps, L2 loss; lagrangian_nns DoublePendulum.ipynb: 600 wide, 3 layers, softplus."""
    import inspect

    fit = inspect.signature(fit_derivatives).parameters
    assert (fit["steps"].default, fit["lr"].default, fit["weight_decay"].default, fit["batch_size"].default,
            fit["loss"].default) == (2000, 1e-3, 1e-4, None, "mse")
    for cls in (HamiltonianNet, DerivativeNet):
        c = cls(3, seed=0).config()
        assert (c["hidden"], c["layers"], c["activation"], c["init"]) == (200, 2, "tanh", "orthogonal")
    c = LagrangianNet(2, seed=0).config()
    assert (c["hidden"], c["layers"], c["activation"], c["init"]) == (600, 3, "softplus", "cranmer")
    assert [tuple(l.weight.shape) for l in DerivativeNet(2, seed=0).mlp.linears] == [(200, 4), (200, 200), (4, 200)]


def test_periodic_lagrangian_wraps_coordinates():
    net = LagrangianNet(2, hidden=16, layers=1, periodic=True, seed=0)
    q, v = _dp_states(5)
    torch.testing.assert_close(net.lagrangian(q, v), net.lagrangian(q + 2 * math.pi, v), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net.acceleration(q, v), net.acceleration(q - 4 * math.pi, v), rtol=1e-8, atol=1e-8)


# -- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_gets_named_errors():
    def raises(exc, arg, fn, *a, **k):
        with pytest.raises(exc) as info:
            fn(*a, **k)
        assert str(info.value).startswith(arg + ":"), str(info.value)

    raises(InputError, "dim", HamiltonianNet, 0)
    raises(InputError, "hidden", HamiltonianNet, 1, hidden=-3)
    raises(InputError, "layers", DerivativeNet, 1, layers=0)
    raises(InputError, "activation", HamiltonianNet, 1, activation="swish")
    raises(InputError, "activation", LagrangianNet, 1, activation="relu")
    raises(InputError, "init", HamiltonianNet, 1, init="xavier")
    raises(InputError, "solver", LagrangianNet, 1, solver="lstsq")
    raises(InputError, "periodic", LagrangianNet, 1, periodic="yes")
    raises(SeedError, "seed", HamiltonianNet, 1, seed=-1)
    raises(InputError, "hidden", HamiltonianNet, 1, hidden=10**9)
    net = HamiltonianNet(1, hidden=8, seed=0)
    raises(ShapeError, "x", net, torch.zeros(3, 3, dtype=F64))
    raises(DtypeError, "x", net, torch.zeros(3, 2, dtype=torch.float32))
    raises(DtypeError, "x", net, torch.zeros(3, 2, dtype=torch.int64))
    raises(NonFiniteError, "x", net, torch.tensor([[math.nan, 0.0]], dtype=F64))
    raises(ShapeError, "p", net.dq, torch.zeros(2, 1, dtype=F64), torch.zeros(2, 2, dtype=F64))
    # the integrators' hot path lets non-finite states through (simulate / filters.run report the step)
    for n in (net, LagrangianNet(1, hidden=8, layers=1, seed=0)):
        out = n.dp(torch.tensor([[math.nan], [0.5]], dtype=F64), torch.tensor([[0.1], [0.2]], dtype=F64))
        assert bool(torch.isnan(out[0]).all()) and bool(torch.isfinite(out[1]).all())
    raises(ShapeError, "p", net.dp, torch.zeros(2, 1, dtype=F64), torch.zeros(3, 1, dtype=F64))
    x = torch.zeros(10, 2, dtype=F64)
    raises(ModuleError, "net", fit_derivatives, torch.nn.Linear(2, 2), x, x)
    raises(ModuleError, "net", fit_derivatives, HamiltonianNet, x, x)
    raises(ShapeError, "dxdt", fit_derivatives, net, x, x[:5])
    raises(ShapeError, "x", fit_derivatives, net, x[0], x[0])
    raises(InputError, "steps", fit_derivatives, net, x, x, steps=0)
    raises(InputError, "lr", fit_derivatives, net, x, x, lr=-1.0)
    raises(InputError, "weight_decay", fit_derivatives, net, x, x, weight_decay=-1.0)
    raises(InputError, "loss", fit_derivatives, net, x, x, loss="huber")
    raises(InputError, "batch_size", fit_derivatives, net, x, x, batch_size=0)
    raises(InputError, "dxdt_val", fit_derivatives, net, x, x, x_val=x)
    raises(InputError, "threads", fit_derivatives, net, x, x, threads=0)
    raises(InputError, "threads", fit_derivatives, net, x, x, threads=10**12)
    raises(InputError, "steps", fit_derivatives, net, x, x, steps=10**12)           # histories cannot fit
    raises(InputError, "substeps", fit_trajectories, net, torch.zeros(4, 3, 2, dtype=F64), 0.1, horizon=2,
           substeps=10**12)
    raises(ShapeError, "trajectory", fit_trajectories, net, torch.zeros(0, 3, 2, dtype=F64), 0.1)
    raises(SeedError, "seed", fit_derivatives, net, x, x, seed="a")
    raises(NonFiniteError, "dxdt", fit_derivatives, net, x, x + math.inf)
    traj = torch.zeros(4, 3, 2, dtype=F64)
    raises(ShapeError, "trajectory", fit_trajectories, net, traj, 0.1, horizon=4)
    raises(InputError, "dt", fit_trajectories, net, traj, 0.0)
    raises(InputError, "method", fit_trajectories, net, traj, 0.1, method="euler")
    raises(InputError, "horizon", fit_trajectories, net, traj, 0.1, horizon=0)
    raises(ShapeError, "trajectory", fit_trajectories, net, torch.zeros(4, 3, dtype=F64), 0.1)
    q = torch.zeros(3, 2, dtype=F64)
    raises(InputError, "L", lagrangian_acceleration, "L", q, q)
    raises(InputError, "L", lagrangian_acceleration, lambda a, b: a * b, q, q)           # not one number
    raises(InputError, "L", lagrangian_acceleration, lambda a, b: a @ torch.ones(5), q, q)
    raises(ShapeError, "v", lagrangian_acceleration, lambda a, b: (b * b).sum(-1), q, torch.zeros(3, 3, dtype=F64))
    raises(DtypeError, "v", lagrangian_acceleration, lambda a, b: (b * b).sum(-1), q, q.float())
    raises(DtypeError, "q", lagrangian_acceleration, lambda a, b: (b * b).sum(-1), q.long(), q)
    raises(NonFiniteError, "q", lagrangian_acceleration, lambda a, b: (b * b).sum(-1), q + math.nan, q)
    raises(InputError, "solver", lagrangian_acceleration, lambda a, b: (b * b).sum(-1), q, q, solver="x")
    raises(InputError, "check", lagrangian_acceleration, lambda a, b: (b * b).sum(-1), q, q, check=1)


def test_greydanus_sized_training_runs_on_one_thread_by_default(monkeypatch):
    """The spring HNN of Greydanus (width 200, 750 points: 150 000 elements per operation, above
    SMALL_WORK) trains on one intra-op thread unless asked otherwise (issue 30: two threads were
    several times slower on a 2-core machine)."""
    from daml import _device

    monkeypatch.delenv("DAML_THREADS", raising=False)
    seen = []

    class Probe(HamiltonianNet):
        def hamiltonian(self, q, p):
            seen.append(torch.get_num_threads())
            return super().hamiltonian(q, p)

    net = Probe(1, seed=0)
    assert _device.network_work(net, 1, 750) > _device.SMALL_WORK
    x = torch.randn(750, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with _device.threads(2):
        fit_derivatives(net, x, x, steps=1, tol=math.inf)
        assert torch.get_num_threads() == 2                        # the caller's setting is restored
        assert seen and set(seen) == {1}
        seen.clear()
        fit_derivatives(net, x, x, steps=1, tol=math.inf, threads=2)
        assert set(seen) == {2}


def test_hamiltonian_field_under_inference_mode_is_the_field():
    """daml.filters.run steps models under torch.inference_mode, where autograd records nothing: the HNN's
    field was silently zero there (a frozen forecast model, the filter lost the truth). Regression test."""
    net = HamiltonianNet(1, hidden=8, seed=0)
    x = torch.tensor([[1.5, 0.5], [0.2, -0.3]], dtype=torch.float64)
    with torch.no_grad():
        want = net(x)
    assert bool((want.abs() > 1e-6).all())
    with torch.inference_mode():
        got = net(x)
        step = M.Mechanical(net, 0.1, substeps=2).step(x)
    assert torch.equal(got, want)
    with torch.no_grad():
        assert torch.allclose(step, M.Mechanical(net, 0.1, substeps=2).step(x), atol=1e-15, rtol=0)
