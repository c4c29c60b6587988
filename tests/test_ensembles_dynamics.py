"""daml.ensembles.dynamics: ensembles of learned dynamics as weighted ensembles and as a forecast model."""

import math
import warnings

import pytest
import torch

from daml.errors import ConvergenceWarning, InputError, ShapeError
from daml.ensembles import Ensemble
from daml.ensembles.dynamics import ComponentRegression, EnsembleDynamics, dynamics_data, fit_dynamics
from daml.models.hamiltonian import DerivativeNet, HamiltonianNet
from daml.models.mechanics import Mechanical, Pendulum, step as mech_step
from daml.posterior import validate

SYSTEM = Pendulum(mass=2.0, length=0.5, gravity=3.0)          # H = 3 (1 - cos q) + p^2 (Greydanus' pendulum)


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 3
    q, p = x[:, :1], x[:, 1:]
    return x, torch.cat([SYSTEM.dq(q, p), SYSTEM.dp(q, p)], -1)


@pytest.fixture(scope="module")
def ens():
    x, dx = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)           # 3 epochs: members are not minimised
        return fit_dynamics(HamiltonianNet(1, hidden=8, seed=0), x, dx, members=3, noise_sd=0.1, seed=1, epochs=3,
                            polish=False, batch_size=40)


def _member_net(ens, i):
    net = HamiltonianNet(1, hidden=8, seed=0)
    net.load_state_dict({k[len("net."):]: v[i] for k, v in ens.params.items()})
    return net


def test_component_rows_read_the_field():
    net = DerivativeNet(1, hidden=8, seed=2)
    x, dx = _data(5)
    z, y = dynamics_data(x, dx, 2)
    assert z.shape == (10, 4) and y.shape == (10,)
    out = ComponentRegression(net)(z)[:, 0]
    assert torch.equal(out.reshape(5, 2), net(x))                   # e_k^T f(x_j) is the field's k-th entry
    assert torch.equal(y.reshape(5, 2), dx)


def test_fit_dynamics_members_and_weights(ens):
    assert isinstance(ens, Ensemble) and ens.members == 3
    assert ens.config["normalise"] is False                         # the symplectic structure is kept
    assert torch.allclose(ens.log_weight.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    # members differ (own prior draws and target perturbations)
    w = [ens.params[k] for k in ens.params if k.endswith("weight")][0]
    assert not torch.equal(w[0], w[1])


def test_member_steps_equal_each_network_run_alone(ens):
    model = EnsembleDynamics(ens, dt=0.1, method="leapfrog", substeps=2)
    x = torch.tensor([[0.7, -0.3], [1.2, 0.5]], dtype=torch.float64)
    out = model.member_steps(x)
    assert out.shape == (3, 2, 2)
    for i in range(3):
        alone = Mechanical(_member_net(ens, i), dt=0.1, method="leapfrog", substeps=2)
        assert torch.allclose(out[i], alone.step(x), rtol=0, atol=1e-12)
    w = ens.log_weight.exp()
    assert torch.allclose(model.step(x), (w[:, None, None] * out).sum(0), atol=1e-14)


def test_sample_step_draws_members_by_weight(ens):
    logw = torch.log(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
    model = EnsembleDynamics(ens.replace(log_weight=logw), dt=0.1, method="rk4")
    x = torch.tensor([0.7, -0.3], dtype=torch.float64).expand(20000, 2)
    draws = model.sample_step(x, torch.Generator().manual_seed(5))
    steps = model.member_steps(x[:1])[:, 0]                         # (3, 2): the three possible outcomes
    which = torch.cdist(draws, steps).argmin(1)
    assert torch.cdist(draws, steps).min(1).values.max() < 1e-12   # every draw is one member's step
    freq = torch.bincount(which, minlength=3).double() / 20000
    se = torch.sqrt(logw.exp() * (1 - logw.exp()) / 20000)
    assert bool(((freq - logw.exp()).abs() < 4 * se).all())          # within 4 Monte Carlo standard errors


def test_log_transition_is_the_gaussian_mixture(ens):
    model = EnsembleDynamics(ens, dt=0.1, method="rk4", noise_cov=[0.01, 0.02])
    xp = torch.tensor([[0.7, -0.3], [0.1, 0.2]], dtype=torch.float64)
    x = torch.tensor([[0.65, -0.5], [0.2, 0.1]], dtype=torch.float64)
    got = model.log_transition(xp, x)
    mean = model.member_steps(xp)
    w = ens.log_weight.exp()
    dens = sum(w[i] * torch.exp(-0.5 * (((x - mean[i]) ** 2) / torch.tensor([0.01, 0.02], dtype=torch.float64)).sum(-1))
               / (2 * math.pi * math.sqrt(0.01 * 0.02)) for i in range(3))
    assert torch.allclose(got, torch.log(dens), atol=1e-10)
    noisy = model.sample_step(xp, torch.Generator().manual_seed(0))
    assert noisy.shape == xp.shape
    with pytest.raises(InputError, match="noise_cov"):
        EnsembleDynamics(ens, dt=0.1).log_transition(xp, x)


def test_forecast_is_a_weighted_posterior_of_persistent_members(ens):
    model = EnsembleDynamics(ens, dt=0.1, method="leapfrog")
    post = model.forecast([0.7, -0.3], 20)
    validate(post)
    assert post.x.shape == (21, 3, 2)
    assert torch.allclose(torch.as_tensor(post.log_weight.values[-1]), ens.log_weight)
    alone = Mechanical(_member_net(ens, 2), dt=0.1, method="leapfrog")
    x = torch.tensor([0.7, -0.3], dtype=torch.float64)
    for _ in range(20):
        x = alone.step(x)
    assert torch.allclose(torch.as_tensor(post.x.values[-1, 2]), x, atol=1e-10)


def test_filters_run_the_mixture_transition(ens):
    from daml import filters, simulate
    from daml.models import observe_indices

    truth_model = Mechanical(SYSTEM, dt=0.1, method="leapfrog")
    op = observe_indices(2, [0], sd=0.1)
    data = simulate(truth_model, 30, op, x0=[1.0, 0.0], x0_cov=0.01, seed=0)
    model = EnsembleDynamics(ens, dt=0.1, method="rk4")
    res = filters.run(filters.etkf(members=10), model, data, operator=op, seed=1)
    validate(res.analysis)
    assert bool(torch.isfinite(torch.as_tensor(res.analysis.x.values)).all())


def test_bad_input_is_named(ens):
    x, dx = _data(5)
    with pytest.raises(InputError, match="normalise"):
        fit_dynamics(HamiltonianNet(1, hidden=4, seed=0), x, dx, noise_sd=0.1, normalise=True)
    with pytest.raises(InputError, match="net"):
        ComponentRegression(torch.nn.Linear(2, 2))
    with pytest.raises(ShapeError, match="dxdt"):
        dynamics_data(x, dx[:, :1], 2)
    with pytest.raises(ShapeError, match=r"^x: "):
        dynamics_data(x, dx, 4)
    with pytest.raises(InputError, match="method"):
        EnsembleDynamics(ens, dt=0.1, method="euler")
    with pytest.raises(InputError, match="dt"):
        EnsembleDynamics(ens, dt=-1.0)
    with pytest.raises(ShapeError, match="x0"):
        EnsembleDynamics(ens, dt=0.1).forecast([[0.1, 0.2]], 3)
    with pytest.raises(InputError, match="ens"):
        from daml.ensembles import fit, mlp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            plain = fit(mlp(2, 4), x, dx[:, 0], members=2, noise_sd=0.1, epochs=1, polish=False, seed=0)
        EnsembleDynamics(plain, dt=0.1)
