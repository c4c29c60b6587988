"""Learning state-space models with the differentiable particle filter: a linear-Gaussian transition
recovered from observations, a learned proposal that beats the bootstrap proposal, the divergence
stop and the windows."""

import math
import warnings

import numpy as np
import pytest
import torch

import daml
from daml import models
from daml.errors import ConvergenceWarning, DivergenceError, InputError
from daml.filters.dpf import dpf, log_evidence
from daml.filters.proposals import MixtureProposal
from daml.learning import FitReport, fit_state_space, nested_windows
from daml.models.mixture import MixtureTransition

A = np.array([[0.8, 0.3], [-0.3, 0.7]])


def _data(model, obs, steps, experiments, seed):
    data = daml.simulate(model, steps, obs, every=1, x0=np.zeros(2), x0_cov=1.0, experiments=experiments, seed=seed)
    y = torch.as_tensor(data["y"].transpose("experiment", "time", "obs").values[:, 1:])
    truth = torch.as_tensor(data["truth"].transpose("experiment", "time", "variable").values[:, 1:])
    return y, truth


def _affine_fit_problem(steps, experiments, seed):
    """A 2-d linear-Gaussian truth observed with sd 0.3, its observations, and a fresh one-component,
    affine, constant-covariance mixture transition (exactly a linear-Gaussian model) to fit to them."""
    obs = models.observe_all(2, sd=0.3)
    y, _ = _data(models.LinearModel(A, noise_cov=0.1), obs, steps, experiments, seed=seed)
    net = MixtureTransition(2, components=1, hidden=(), covariance="constant", residual=False, seed=0,
                            dtype=torch.float64)
    return obs, y, net


def test_the_transition_of_a_linear_gaussian_model_is_recovered():
    # x_k = A x_{k-1} + N(0, 0.1 I), observed with sd 0.3: a one-component, affine, constant-covariance
    # mixture transition fitted by the stop-gradient DPF (30 particles) recovers A to 0.15 (max entry),
    # a zero offset to 0.15 and the noise variance to 0.05 from 16 sequences of 30 observations (measured:
    # 0.11, 0.08 and 0.014; the data alone leave an error of several hundredths in each)
    obs, y, net = _affine_fit_problem(30, 16, seed=1)
    report = fit_state_space(net, None, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=30,
                             learn=("transition",), iterations=100, lr=0.1, seed=0)
    assert isinstance(report, FitReport) and report.iterations == 100 and report.history.shape == (100,)
    assert report.history[-10:].mean() < report.history[:10].mean()
    with torch.no_grad():
        zero = net.step(torch.zeros(2, dtype=torch.float64))
        a_hat = (net.step(torch.eye(2, dtype=torch.float64)) - zero).T.numpy()
        draws = net.sample_step(torch.zeros(20000, 2, dtype=torch.float64), daml._device.generator(3))
    assert np.abs(a_hat - A).max() < 0.15, a_hat
    assert np.abs(zero.numpy()).max() < 0.15
    assert np.abs(draws.var(0).numpy() - 0.1).max() < 0.05, draws.var(0)


def test_a_learned_proposal_beats_the_bootstrap_proposal():
    # a known transition with large noise (Q = 0.5) and precise observations (sd 0.1): the bootstrap
    # proposal wastes most particles; a one-component proposal network trained on the evidence moves
    # them toward the observations, and the filtering mean of held-out sequences gets closer to the truth
    truth = models.LinearModel(A, noise_cov=0.5)
    obs = models.observe_all(2, sd=0.1)
    y, _ = _data(truth, obs, 15, 16, seed=2)
    proposal = MixtureProposal(2, 2, components=1, hidden=(16,), base="model", seed=0, dtype=torch.float64)
    report = fit_state_space(truth, proposal, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=20,
                             learn=("proposal",), iterations=60, lr=0.05, seed=0)
    assert report.converged and report.history[-10:].mean() < 0.5 * report.history[:10].mean()
    y_test, x_test = _data(truth, obs, 15, 32, seed=3)
    with torch.no_grad():
        errors, evidence = {}, {}
        for name, filt in (("bootstrap", dpf(20)), ("learned", dpf(20, proposal=proposal))):
            ev = log_evidence(filt, truth, y_test, operator=obs, mean=np.zeros(2), cov=np.eye(2), seed=5)
            errors[name] = float(((ev.mean - x_test) ** 2).mean().sqrt())
            evidence[name] = float(ev.log_evidence.mean())
    # measured: RMSE 0.12 against 0.31, mean log p_hat -37 against -155
    assert errors["learned"] < 0.6 * errors["bootstrap"], errors
    assert evidence["learned"] > evidence["bootstrap"] + 50, evidence


class _NaNAfter(torch.nn.Module):
    """A transition that returns NaN from its ``calls``-th step on (a blow-up during training)."""

    state_size, dt = 2, 1.0

    def __init__(self, calls):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.noise_cov = 0.1 * torch.eye(2, dtype=torch.float64)
        self.calls, self.count = calls, 0

    def step(self, x):
        self.count += 1
        out = self.a * x
        return out * float("nan") if self.count >= self.calls else out


def test_a_non_finite_loss_stops_with_the_iteration():
    obs = models.observe_all(2, sd=0.3)
    y = torch.zeros(3, 5, 2, dtype=torch.float64)
    model = _NaNAfter(calls=2 * 5 + 1)                 # five steps per iteration: the third one diverges
    with pytest.raises(DivergenceError, match="iteration 3 of 10") as info:
        fit_state_space(model, None, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=10,
                        learn=("transition",), iterations=10, seed=0)
    partial = info.value.partial
    assert isinstance(partial, FitReport) and partial.iterations == 2 and np.isfinite(partial.history).all()
    assert model.a.requires_grad                          # the frozen/unfrozen flags are restored


def test_a_proposal_that_throws_particles_to_infinity_stops_the_fit_with_the_iteration():
    # found in the dense-proposal ablation (benchmarks/dpf_dense.py): parameters that send the particles to
    # inf make the next network call meet non-finite input; that is the fit's blow-up (DivergenceError with
    # the iteration), not the NonFiniteError of bad user input it used to leak as
    obs, y, _ = _affine_fit_problem(5, 2, seed=3)
    proposal = MixtureProposal(2, 2, components=1, hidden=(), base="state", seed=0, dtype=torch.float64)
    with torch.no_grad():
        next(proposal.parameters()).fill_(1e300)          # means of order 1e300 at the first draw
    truth = models.LinearModel(A, noise_cov=0.1)
    with pytest.raises(DivergenceError, match="iteration 1 of 4"):
        fit_state_space(truth, proposal, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=8,
                        learn=("proposal",), iterations=4, seed=0)


def test_the_convergence_check_and_its_warning():
    from daml.learning import _settled

    rng = np.random.default_rng(0)
    flat = 1.0 + 0.05 * rng.standard_normal(100)               # Monte Carlo noise around a settled loss
    falling = np.linspace(2.0, 1.0, 100) + 0.05 * rng.standard_normal(100)
    assert _settled(flat, 1e-2)[0]
    assert not _settled(falling, 1e-2)[0]
    assert not _settled(flat[:3], 1e-2)[0]                        # too few iterations to judge
    truth = models.LinearModel(A, noise_cov=0.1)
    obs = models.observe_all(2, sd=0.3)
    y, _ = _data(truth, obs, 5, 2, seed=1)
    net = MixtureTransition(2, components=1, hidden=(), covariance="constant", residual=False, seed=0,
                            dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match="not settled"):
        report = fit_state_space(net, None, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=10,
                                 learn=("transition",), iterations=3, seed=0)
    assert not report.converged and "not settled" in report.message


def test_alternation_updates_one_group_at_a_time():
    obs, y, net = _affine_fit_problem(6, 2, seed=1)
    proposal = MixtureProposal(2, 2, components=1, hidden=(4,), base="model", seed=0, dtype=torch.float64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit_state_space(net, proposal, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=8,
                        learn=("proposal",), iterations=2)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())    # the transition stayed frozen
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    p_before = {k: v.clone() for k, v in proposal.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        report = fit_state_space(net, proposal, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=8,
                                 windows=(3, 6), iterations=2)
    assert report.groups == ("proposal", "proposal", "transition", "transition") * 2
    assert report.windows == (3, 6) and report.history.shape == (8,)
    assert not all(torch.equal(p_before[k], v) for k, v in proposal.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        report = fit_state_space(net, proposal, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=8,
                                 windows=(3, 6), iterations=1, rounds=2)
    assert report.groups == ("proposal", "transition") * 4 and report.iterations == 8
    with pytest.raises(daml.errors.InputError, match="rounds"):
        fit_state_space(net, proposal, y, operator=obs, prior=(np.zeros(2), np.eye(2)), rounds=0)


def test_windows():
    assert nested_windows(100, 4) == (25, 50, 75, 100)
    assert nested_windows(7, 3) == (3, 5, 7)
    assert nested_windows(5, 5) == (1, 2, 3, 4, 5)
    for args, name in [((0, 1), "length"), ((5, 0), "count"), ((5, 6), "count"), ((5.0, 2), "length"),
                       ((5, True), "count")]:
        with pytest.raises(InputError) as info:
            nested_windows(*args)
        assert info.value.argument == name
    obs = models.observe_all(2, sd=0.3)
    net = MixtureTransition(2, components=1, hidden=(), covariance="constant", residual=False, seed=0,
                            dtype=torch.float64)
    y = torch.zeros(2, 6, 2, dtype=torch.float64)
    for windows in [(3, 2), (0, 6), (2, 7), 7, "x", ()]:
        with pytest.raises(InputError) as info:
            fit_state_space(net, None, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=5,
                            learn=("transition",), windows=windows, iterations=1)
        assert info.value.argument == "windows"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        report = fit_state_space(net, None, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=5,
                                 learn=("transition",), windows=2, iterations=2)
    assert report.windows == (3, 6) and report.iterations == 4 and report.groups == ("transition",) * 4
    for kwargs, name in [({"learn": ("proposal",)}, "learn"), ({"learn": ("magic",)}, "learn"),
                         ({"iterations": 0}, "iterations"), ({"lr": -1.0}, "lr"),
                         ({"resampler": "magic"}, "resampler")]:
        with pytest.raises(InputError) as info:
            fit_state_space(net, None, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=5,
                            **{"learn": ("transition",), **kwargs})
        assert info.value.argument == name
    with pytest.raises(InputError) as info:          # a model without parameters cannot learn a transition
        fit_state_space(models.LinearModel(A, noise_cov=0.1), None, y, operator=obs,
                        prior=(np.zeros(2), np.eye(2)), learn=("transition",))
    assert info.value.argument == "learn"


def test_warmup_ramps_the_first_steps():
    """With warmup=k the first Adam step moves the parameters by about lr / (k + 1) (Adam's first step
    is lr * sign(gradient) in size), without it by about lr."""
    moves = {}
    for warm in (0, 9):
        obs, y, net = _affine_fit_problem(5, 2, seed=2)
        before = [p.detach().clone() for p in net.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fit_state_space(net, None, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=8,
                            learn=("transition",), iterations=1, lr=0.1, warmup=warm, seed=0)
        moves[warm] = max(float((p.detach() - b).abs().max()) for p, b in zip(net.parameters(), before))
    assert moves[0] == pytest.approx(0.1, rel=1e-6)
    assert moves[9] == pytest.approx(0.01, rel=1e-6)
    with pytest.raises(InputError, match="warmup"):
        fit_state_space(net, None, y, operator=obs, prior=(np.zeros(2), np.eye(2)), learn=("transition",),
                        warmup=-1)


def test_parameters_without_a_gradient_are_reported():
    # learned mixture weights of a transition that is its own proposal (proposal=None) get no gradient: the
    # component draw is not differentiated; the fit says so instead of leaving them silently untrained
    obs, y, _ = _affine_fit_problem(5, 2, seed=4)
    net = MixtureTransition(2, components=2, hidden=(), weights="learned", seed=0, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(UserWarning, match="learned mixture weights get no gradient"):
            fit_state_space(net, None, y, operator=obs, prior=(np.zeros(2), np.eye(2)), members=8,
                            learn=("transition",), iterations=2, seed=0)
