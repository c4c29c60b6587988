"""Gaussian-mixture networks (StateMixNN): daml.models.mixture and daml.filters.proposals.

Oracles: scipy's multivariate normal density (per component, then a weighted logsumexp), the exact
linear-Gaussian model (LinearModel with the same Q: same draws, same densities), Monte Carlo moments
of a mixture with stated tolerances, and an exact identity for the reparameterised gradient.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

import daml
from daml.errors import DtypeError, InputError, NonFiniteError, ShapeError
from daml.filters.proposals import MixtureProposal, Proposal
from daml.models import LinearModel, observe_all
from daml.models.base import transition_log_density, transition_sample
from daml.models.mixture import GaussianMixtureNet, MixtureParams, MixtureTransition, _softplus_inverse


def _scipy_log_prob(params: MixtureParams, x: np.ndarray) -> np.ndarray:
    """log sum_k w_k N(x; loc_k, L_k L_k^T), one input at a time, by scipy."""
    log_mix, loc, tril = (t.detach().numpy() for t in params)
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        comps = [log_mix[i, k] + stats.multivariate_normal(loc[i, k], tril[i, k] @ tril[i, k].T).logpdf(x[i])
                 for k in range(loc.shape[1])]
        out[i] = logsumexp(comps)
    return out


def _spread_means(net: GaussianMixtureNet, spacing: float = 2.0) -> None:
    """Move the components' means apart (so the mixture is far from one Gaussian) and make the head
    weights larger (so the inputs matter)."""
    s, d = net.components, net.out_features
    with torch.no_grad():
        net.head.bias[:s * d] = torch.arange(s * d, dtype=net.dtype).remainder(7.0) * spacing - 3.0
        net.head.weight.mul_(30.0)


@pytest.mark.parametrize("covariance", ["diagonal", "full", "constant"])
@pytest.mark.parametrize("weights", ["equal", "learned"])
def test_log_prob_matches_scipy(covariance, weights):
    net = GaussianMixtureNet(4, 3, components=3, hidden=(16,), covariance=covariance, weights=weights, seed=3)
    _spread_means(net)
    g = torch.Generator().manual_seed(0)
    inp = torch.randn(6, 4, generator=g, dtype=torch.float64)
    x = 2.0 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    params = net(inp)
    assert params.loc.shape == (6, 3, 3) and params.scale_tril.shape == (6, 3, 3, 3) and params.log_mix.shape == (6, 3)
    if covariance == "full":               # a genuinely full factor (else the lower triangle goes untested)
        assert float(torch.tril(params.scale_tril, -1).detach().abs().max()) > 1e-3
    if weights == "learned":
        assert float(params.log_mix.detach().std()) > 1e-3
    expected = _scipy_log_prob(params, x.numpy())
    got = net.log_prob(inp, x)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    # an independent torch implementation agrees too
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(logits=params.log_mix),
                                                torch.distributions.MultivariateNormal(params.loc,
                                                                                       scale_tril=params.scale_tril))
    torch.testing.assert_close(got, mix.log_prob(x), rtol=1e-10, atol=1e-10)


def test_log_prob_broadcasts_all_pairs():
    """(1, J, p) inputs against (M, 1, d) points give the (M, J) matrix of every pair."""
    net = GaussianMixtureNet(2, 2, components=3, hidden=(8,), covariance="full", seed=1)
    _spread_means(net)
    g = torch.Generator().manual_seed(1)
    inp, x = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
    pairs = net.log_prob(inp.unsqueeze(0), x.unsqueeze(1))
    assert pairs.shape == (4, 5)
    for i in range(4):
        torch.testing.assert_close(pairs[i], net.log_prob(inp, x[i].expand(5, 2)), rtol=1e-12, atol=1e-12)


def _linear_gaussian(a: np.ndarray, q: np.ndarray, min_scale: float = 1e-3) -> MixtureTransition:
    n = a.shape[0]
    model = MixtureTransition(n, components=1, hidden=(), covariance="constant", residual=False, min_scale=min_scale,
                              seed=0)
    with torch.no_grad():
        model.net.head.weight.copy_(torch.as_tensor(a))
        model.net.head.bias.zero_()
        raw = [[_softplus_inverse(math.sqrt(v) - min_scale) for v in q]]
        model.net.raw_scale.copy_(torch.tensor(raw, dtype=torch.float64))
    return model


A = np.array([[0.9, 0.2, 0.0], [-0.1, 0.8, 0.1], [0.0, 0.3, 0.7]])
Q = np.array([0.5, 0.2, 1.3])


def test_linear_gaussian_transition_is_exact():
    model = _linear_gaussian(A, Q)
    g = torch.Generator().manual_seed(2)
    x_prev = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(model.step(x_prev), x_prev @ torch.as_tensor(A).T, rtol=1e-13, atol=1e-13)
    got = model.log_transition(x_prev.unsqueeze(0), x.unsqueeze(1))                # (7, 5): every pair
    assert got.shape == (7, 5)
    expected = np.array([[stats.multivariate_normal(A @ xp, np.diag(Q)).logpdf(xi) for xp in x_prev.numpy()]
                         for xi in x.numpy()])
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    # the same density and the same draws as the Gaussian model step(x) + N(0, Q)
    linear = LinearModel(A, noise_cov=np.diag(Q))
    torch.testing.assert_close(transition_log_density(model, x_prev, x[:5]),
                               transition_log_density(linear, x_prev, x[:5]), rtol=1e-10, atol=1e-10)
    draws = transition_sample(model, x_prev, torch.Generator().manual_seed(9))
    torch.testing.assert_close(draws, transition_sample(linear, x_prev, torch.Generator().manual_seed(9)),
                               rtol=1e-10, atol=1e-10)


def test_simulate_and_ensemble_filters_run_the_transition():
    """simulate, enkf and etkf go through _propagate (sample_step): with the linear-Gaussian mixture they
    give the LinearModel's results (the same draws), and with a 3-component network they run."""
    model, linear = _linear_gaussian(A, Q), LinearModel(A, noise_cov=np.diag(Q))
    op = observe_all(3, sd=1.0)
    data = daml.simulate(model, 12, op, x0=[1.0, 0.0, -1.0], x0_cov=0.5, seed=4)
    ref = daml.simulate(linear, 12, op, x0=[1.0, 0.0, -1.0], x0_cov=0.5, seed=4)
    np.testing.assert_allclose(data.truth.values, ref.truth.values, rtol=1e-10, atol=1e-10)
    assert json.loads(data.attrs["model"])["model"] == "MixtureTransition"
    for name in ("enkf", "etkf"):
        filt = daml.filters.make_filter(name, members=20)
        got = daml.filters.run(filt, model, data, seed=5).analysis
        want = daml.filters.run(filt, linear, data, seed=5).analysis
        np.testing.assert_allclose(got.x.values, want.x.values, rtol=1e-9, atol=1e-9)
    net_model = MixtureTransition(3, components=3, hidden=(8,), seed=1)
    data = daml.simulate(net_model, 8, op, seed=6)
    assert np.isfinite(data.truth.values).all()
    out = daml.filters.run(daml.filters.make_filter("enkf", members=20), net_model, data, seed=7).analysis
    assert out.x.shape == (8, 20, 3) and np.isfinite(out.x.values).all()


@pytest.mark.parametrize("covariance,weights", [("full", "equal"), ("diagonal", "learned")])
def test_samples_have_the_mixture_moments(covariance, weights):
    """Mean and covariance of 40000 draws against the mixture's sum_k w_k (Sigma_k + mu_k mu_k^T) - mu mu^T.
    Tolerance: 5 standard errors of each sample moment (estimated from the draws), so a false alarm has
    probability below about 1e-5 per entry."""
    net = GaussianMixtureNet(2, 2, components=3, hidden=(8,), covariance=covariance, weights=weights, seed=5)
    _spread_means(net, 2.5)
    if weights == "learned":
        with torch.no_grad():
            net.head.bias[-3:] = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    draws = 40000
    inp = torch.tensor([0.3, -0.2], dtype=torch.float64).expand(draws, 2)
    x = net.sample(inp, torch.Generator().manual_seed(11)).detach()
    log_mix, loc, tril = (t[0].detach() for t in net(inp[:1]))
    w = log_mix.exp()
    mean = (w[:, None] * loc).sum(0)
    cov = (w[:, None, None] * (tril @ tril.transpose(-1, -2) + loc[:, :, None] * loc[:, None, :])).sum(0) \
        - mean[:, None] * mean[None, :]
    xc = x - x.mean(0)
    se_mean = x.std(0) / math.sqrt(draws)
    assert bool(((x.mean(0) - mean).abs() < 5 * se_mean).all())
    prods = xc[:, :, None] * xc[:, None, :]
    se_cov = prods.std(0) / math.sqrt(draws)
    assert bool(((prods.mean(0) - cov).abs() < 5 * se_cov + 1e-12).all())
    # the mixture is far from its components: the covariance exceeds every component's
    assert float(torch.linalg.eigvalsh(cov - (tril @ tril.transpose(-1, -2)).max(0).values).max()) > 0.5


def test_sample_is_reparameterised():
    """Every draw is loc_k + L_k eps for one component k, so d(sum of draws)/d(loc bias of (k, j)) summed over k
    is exactly the number of draws, per coordinate j; scale gradients exist too."""
    net = GaussianMixtureNet(2, 3, components=3, hidden=(8,), seed=2)
    inp = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = net.sample(inp, torch.Generator().manual_seed(4))
    x.mean(0).sum().backward()
    grad = net.head.bias.grad
    loc_grad = grad[:9].reshape(3, 3)
    torch.testing.assert_close(loc_grad.sum(0), torch.ones(3, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert bool((loc_grad.abs() > 0).all())                         # every component was drawn
    assert float(grad[9:18].abs().max()) > 0                        # the scales get a gradient
    assert float(net.trunk[0].weight.grad.abs().max()) > 0


def test_init_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = GaussianMixtureNet(3, 2, components=2, covariance="full", weights="learned", seed=7)
    b = GaussianMixtureNet(3, 2, components=2, covariance="full", weights="learned", seed=7)
    c = GaussianMixtureNet(3, 2, components=2, covariance="full", weights="learned", seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_residual_transition_starts_near_identity_with_the_initial_scale():
    model = MixtureTransition(4, components=2, init_scale=0.5, seed=0)
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        assert float((model.step(x) - x).abs().max()) < 0.05
        tril = model.net(x).scale_tril
    diag = torch.diagonal(tril, dim1=-2, dim2=-1)
    assert float((diag - 0.5).abs().max()) < 0.05
    assert float(torch.tril(tril, -1).abs().max()) == 0.0


def test_config_is_json_and_rebuilds_the_same_network():
    model = MixtureTransition(3, components=2, hidden=[8, 4], covariance="full", weights="learned", dt=0.1, seed=12)
    cfg = json.loads(json.dumps(model.config()))
    again = MixtureTransition(**cfg)
    for va, vb in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(va, vb)
    assert model.noise_cov is None and model.dt == 0.1 and model.name == "mixture_transition"


@pytest.mark.parametrize("kwargs,argument", [
    (dict(components=0), "components"), (dict(components=1.5), "components"),
    (dict(hidden=(0,)), "hidden"), (dict(hidden="32"), "hidden"), (dict(hidden=(True,)), "hidden"),
    (dict(hidden=32), "hidden"), (dict(covariance="banana"), "covariance"), (dict(weights="softmax"), "weights"),
    (dict(activation="sigmoid"), "activation"), (dict(min_scale=0.0), "min_scale"),
    (dict(init_scale=1e-4), "init_scale"), (dict(state_size=0), "state_size"), (dict(residual=1), "residual"),
    (dict(dt=-1.0), "dt"), (dict(seed="x"), "seed"), (dict(dtype=torch.int64), "dtype"),
])
def test_bad_arguments_are_named(kwargs, argument):
    args = dict(state_size=2, **kwargs) if "state_size" not in kwargs else kwargs
    with pytest.raises(InputError) as info:
        MixtureTransition(**args)
    assert info.value.argument == argument


def test_bad_proposal_arguments_are_named():
    for kwargs, argument in ((dict(obs_size=0), "obs_size"), (dict(base="prior"), "base"),
                             (dict(components=-1), "components")):
        with pytest.raises(InputError) as info:
            MixtureProposal(**{"state_size": 2, "obs_size": 1, **kwargs})
        assert info.value.argument == argument


def test_bad_states_and_non_finite_outputs_are_named():
    model = MixtureTransition(3, hidden=(4,), seed=0)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ShapeError) as info:
        model.step(torch.zeros(5, 2, dtype=torch.float64))
    assert info.value.argument == "x"
    with pytest.raises(NonFiniteError) as info:
        model.sample_step(torch.tensor([0.0, math.nan, 1.0], dtype=torch.float64), g)
    assert info.value.argument == "x"
    with pytest.raises(NonFiniteError) as info:
        model.log_transition(torch.zeros(3, dtype=torch.float64), torch.tensor([0.0, math.inf, 1.0]))
    assert info.value.argument == "x"
    with pytest.raises(ShapeError) as info:
        model.log_transition(torch.zeros(3, dtype=torch.float64), torch.zeros(4))
    assert info.value.argument == "x"
    with pytest.raises(ShapeError) as info:
        model.net(torch.zeros(2, dtype=torch.float64))
    assert info.value.argument == "inp"
    with pytest.raises(DtypeError) as info:
        model.net(torch.zeros(3, dtype=torch.float32))
    assert info.value.argument == "inp"
    with torch.no_grad():
        model.net.head.bias[3] = math.nan                         # a raw scale
    with pytest.raises(NonFiniteError) as info:
        model.sample_step(torch.zeros(3, dtype=torch.float64), g)
    assert info.value.argument == "transition" and "scales" in str(info.value)
    proposal = MixtureProposal(2, 1, hidden=(4,), seed=0)
    with torch.no_grad():
        proposal.net.head.bias[0] = math.inf                      # a mean
    with pytest.raises(NonFiniteError) as info:
        proposal.sample(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(1), torch.ones(1, dtype=torch.bool), g)
    assert info.value.argument == "proposal" and "means" in str(info.value)


def test_dtype_and_device():
    net = GaussianMixtureNet(2, 2, components=2, seed=0)
    assert net.dtype == torch.float64 and net.device == torch.device("cpu")
    assert GaussianMixtureNet(2, 2, seed=0, dtype="float32").dtype == torch.float32
    net32 = GaussianMixtureNet(2, 2, components=2, seed=0).to(torch.float32)
    x = net32.sample(torch.zeros(5, 2), torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and net32.log_prob(torch.zeros(5, 2), x).dtype == torch.float32
    model = MixtureTransition(2, seed=0)
    assert model.step(torch.zeros(4, 2, dtype=torch.float32)).dtype == torch.float32


def test_proposal_shapes_density_and_mask():
    n, m = 3, 2
    proposal = MixtureProposal(n, m, components=2, hidden=(8,), covariance="full", seed=3)
    assert isinstance(proposal, Proposal)
    _spread_means(proposal.net, 0.5)
    g = torch.Generator().manual_seed(1)
    x_prev = torch.randn(4, 10, n, generator=g, dtype=torch.float64)               # (batch, N, n)
    y = torch.randn(4, m, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False]] * 4)
    x, log_q = proposal.sample(x_prev, y, mask, torch.Generator().manual_seed(2))
    assert x.shape == (4, 10, n) and log_q.shape == (4, 10)
    torch.testing.assert_close(log_q, proposal.log_prob(x_prev, y, mask, x), rtol=1e-12, atol=1e-12)
    # the density is the network's at concat(x_prev, y * mask, mask) with the mean offset by x_prev
    inp = torch.cat([x_prev, (y * mask).unsqueeze(1).expand(4, 10, m), mask.double().unsqueeze(1).expand(4, 10, m)], -1)
    torch.testing.assert_close(log_q, proposal.net.log_prob(inp, x, base=x_prev), rtol=1e-12, atol=1e-12)
    # an unobserved entry does not matter, NaN included
    y_nan = y.clone()
    y_nan[:, 1] = math.nan
    torch.testing.assert_close(proposal.log_prob(x_prev, y_nan, mask, x), log_q, rtol=0, atol=0)
    with pytest.raises(NonFiniteError) as info:
        proposal.log_prob(x_prev, y_nan, torch.ones(4, m, dtype=torch.bool), x)
    assert info.value.argument == "y"
    with pytest.raises(ShapeError) as info:
        proposal.sample(x_prev, y[:, :1], mask, g)
    assert info.value.argument == "y"
    with pytest.raises(ShapeError) as info:
        proposal.sample(x_prev[..., :2], y, mask, g)
    assert info.value.argument == "x_prev"


def test_proposal_model_base():
    """base='model' centres the proposal on model.step(x_prev): with a zero output layer the mean is exactly it."""
    model = LinearModel(A, noise_cov=np.diag(Q))
    proposal = MixtureProposal(3, 3, hidden=(), base="model", init_scale=0.1, seed=0)
    with torch.no_grad():
        proposal.net.head.weight.zero_()
    x_prev = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, mask = torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3)
    x, log_q = proposal.sample(x_prev, y, mask, torch.Generator().manual_seed(1), model=model)
    expected = stats.multivariate_normal(np.zeros(3), 0.01 * np.eye(3)).logpdf(
        (x - model.step(x_prev)).detach().reshape(-1, 3).numpy()).reshape(2, 5)
    np.testing.assert_allclose(log_q.detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(InputError) as info:
        proposal.sample(x_prev, y, mask, torch.Generator().manual_seed(1))
    assert info.value.argument == "model"


def test_sizes_that_cannot_fit_are_refused_by_name():
    """Regression: these allocated first and leaked torch's RuntimeError (found by the fuzz harness)."""
    huge = 10 ** 12
    for build, argument in ((lambda: GaussianMixtureNet(3, 2, components=huge), "components"),
                            (lambda: GaussianMixtureNet(huge, 2), "in_features"),
                            (lambda: GaussianMixtureNet(3, 2, hidden=(huge,)), "hidden"),
                            (lambda: MixtureTransition(huge), "state_size"),
                            (lambda: MixtureProposal(3, huge), "obs_size"),
                            (lambda: MixtureProposal(huge, 2), "state_size")):
        with pytest.raises(InputError) as info:
            build()
        assert info.value.argument == argument


def test_maximum_likelihood_recovers_the_closed_form_linear_gaussian_fit():
    """Training through log_transition: an affine one-component transition fitted by maximum likelihood to
    pairs (x_prev, x) reaches the closed-form MLE (least squares for A and b, the mean squared residual
    per coordinate for the diagonal Q)."""
    rng = np.random.default_rng(5)
    a, q = A[:2, :2], np.array([0.3, 0.8])
    x_prev = rng.normal(size=(2000, 2))
    x = x_prev @ a.T + 0.5 + rng.normal(size=(2000, 2)) * np.sqrt(q)
    design = np.hstack([x_prev, np.ones((2000, 1))])
    coef, *_ = np.linalg.lstsq(design, x, rcond=None)
    q_hat = ((x - design @ coef) ** 2).mean(0)
    model = MixtureTransition(2, hidden=(), covariance="constant", residual=False, seed=0)
    xp, xt = torch.as_tensor(x_prev), torch.as_tensor(x)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -model.log_transition(xp, xt).mean()
        loss.backward()
        return loss
    opt.step(closure)
    np.testing.assert_allclose(model.net.head.weight.detach().numpy(), coef[:2].T, atol=1e-5)
    np.testing.assert_allclose(model.net.head.bias.detach().numpy(), coef[2], atol=1e-5)
    scale = torch.nn.functional.softplus(model.net.raw_scale.detach()) + model.net.min_scale
    np.testing.assert_allclose(scale.numpy()[0] ** 2, q_hat, rtol=1e-5)


def test_dpf_runs_the_mixture_transition_and_proposal():
    """Through daml.filters.dpf: the linear-Gaussian mixture transition gives LinearModel's evidence (the same
    draws and densities); a proposal equal to the transition (base='model', zero offsets, scales sqrt(Q))
    gives the bootstrap filter's evidence exactly (the weights' log f - log q cancel, the draws are the same);
    and the evidence of 2-component networks is finite with gradients on both networks' parameters."""
    from daml.filters.dpf import dpf, log_evidence
    model, linear = _linear_gaussian(A, Q), LinearModel(A, noise_cov=np.diag(Q))
    op = observe_all(3, sd=1.0)
    y = torch.as_tensor(daml.simulate(linear, 6, op, seed=1).y.values[1:])
    kw = dict(operator=op, mean=torch.zeros(3, dtype=torch.float64), cov=torch.eye(3, dtype=torch.float64), seed=4)
    proposal = MixtureProposal(3, 3, hidden=(), covariance="constant", base="model", seed=0)
    with torch.no_grad():
        proposal.net.head.weight.zero_()
        proposal.net.head.bias.zero_()
        proposal.net.raw_scale.copy_(model.net.raw_scale)
    with torch.no_grad():
        reference = log_evidence(dpf(members=32), linear, y, **kw).log_evidence
        assert math.isfinite(float(reference))
        for m in (model, linear):
            for filt in (dpf(members=32), dpf(members=32, proposal=proposal)):
                torch.testing.assert_close(log_evidence(filt, m, y, **kw).log_evidence, reference,
                                           rtol=1e-10, atol=1e-10)
    net_model = MixtureTransition(3, components=2, hidden=(8,), seed=1)
    net_proposal = MixtureProposal(3, 3, components=2, hidden=(8,), covariance="full", seed=2)
    evidence = log_evidence(dpf(members=32, proposal=net_proposal), net_model, y, **kw).log_evidence
    evidence.backward()
    for module in (net_model, net_proposal):
        grads = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
        assert bool(torch.isfinite(grads).all()) and float(grads.abs().max()) > 0


def test_proposal_standardise_feeds_the_network_standardised_inputs(tmp_path):
    # the trunk's input (x_prev, y, mask) is standardised entry by entry with the samples' statistics,
    # NaN observations left out; the default is the identity (raw inputs), and a saved file keeps it
    import daml
    from daml.filters.proposals import MixtureProposal

    rng = np.random.default_rng(0)
    xs = torch.as_tensor(rng.normal(3.0, 4.0, size=(500, 3)))
    ys = torch.as_tensor(rng.normal(-1.0, 0.5, size=(400, 2)))
    ys[::7, 1] = float("nan")
    seen = []
    prop = MixtureProposal(3, 2, hidden=(5,), seed=0)
    prop.net.trunk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    y, mask = torch.tensor([0.2, 9.0], dtype=torch.float64), torch.tensor([True, False])
    g = torch.Generator().manual_seed(0)
    prop.sample(xs.unsqueeze(0), y, mask, g)
    torch.testing.assert_close(seen[-1][0, :, :3], xs, rtol=0, atol=0)               # default: raw inputs
    prop.standardise(xs, ys)
    prop.sample(xs.unsqueeze(0), y, mask, g)
    inp = seen[-1][0]
    torch.testing.assert_close(inp[:, :3].mean(0), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(inp[:, :3].std(0), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    y_mean = torch.as_tensor(np.nanmean(ys.numpy(), 0))
    y_sd = torch.as_tensor(np.nanstd(ys.numpy(), 0, ddof=1))
    assert float(inp[0, 3]) == pytest.approx(float((0.2 - y_mean[0]) / y_sd[0]), rel=1e-12)
    assert float(inp[0, 4]) == 0.0                                                      # unobserved: still 0
    daml.io.save_network(prop, tmp_path / "p.pt")
    back = daml.io.load_network(tmp_path / "p.pt")
    torch.testing.assert_close(back.x_scale, prop.x_scale, rtol=0, atol=0)
    x1, lq1 = prop.sample(xs[:4].unsqueeze(0), y, mask, torch.Generator().manual_seed(1))
    x2, lq2 = back.sample(xs[:4].unsqueeze(0), y, mask, torch.Generator().manual_seed(1))
    assert torch.equal(x1, x2) and torch.equal(lq1, lq2)
    with pytest.raises(daml.errors.ShapeError, match="x"):
        prop.standardise(torch.ones(5, 4, dtype=torch.float64))
    with pytest.raises(daml.errors.NonFiniteError, match="y"):
        prop.standardise(y=torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
