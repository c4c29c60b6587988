"""Trust in daml.diffusion (issue 26): blow-ups are refused loudly, the recommended forcing matches the
exact posterior of the prior its members represent, and bad input gets daml errors."""

import math

import numpy as np
import pytest
import torch

from daml import diffusion as dif
from daml.errors import DivergenceError, InputError, NonFiniteError, ShapeError
from daml.filters.base import EnsembleState
from daml.models.observations import observe_indices

F64 = torch.float64


def seed_case(n=100, seed=10_000):
    """The seed's 2-D bimodal prior: modes (3, 3) and (0.8, 0.8), sd 0.1, equal weights."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 3.0], [0.8, 0.8]], dtype=F64)
    return centres[torch.arange(n) % 2] + 0.1 * torch.randn(n, 2, generator=g, dtype=F64)


def mixture5(n=200, seed=3):
    """A 5-D two-component Gaussian mixture, modes at +-1 with sd 0.3."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.stack([torch.full((5,), 1.0), torch.full((5,), -1.0)]).to(F64)
    return centres[torch.arange(n) % 2] + 0.3 * torch.randn(n, 5, generator=g, dtype=F64)


def run_ensf(filt, ens, y, op):
    n = ens.shape[0]
    state = EnsembleState(ens, torch.full((n,), -math.log(n), dtype=F64))
    return filt.analysis(state, y, op, torch.ones(op.size, dtype=torch.bool), torch.Generator().manual_seed(1))[0].x


def mixture_posterior(mix, h, r, y):
    """Closed-form posterior mean and covariance of a Gaussian-mixture prior under y = H x + N(0, R):
    per-component Kalman updates, weights times the component evidence."""
    mus, lw = mix.mean.numpy(), mix.log_weight.numpy()
    covs = (mix.vecs @ torch.diag_embed(mix.vals) @ mix.vecs.transpose(-1, -2)).numpy()
    ms, cs, lws = [], [], []
    for mu, c, logw in zip(mus, covs, lw):
        s = h @ c @ h.T + r
        k = c @ h.T @ np.linalg.inv(s)
        d = y - h @ mu
        lws.append(logw - 0.5 * d @ np.linalg.solve(s, d) - 0.5 * np.linalg.slogdet(s)[1])
        ms.append(mu + k @ d)
        cs.append(c - k @ h @ c)
    w = np.exp(np.array(lws) - max(lws))
    w /= w.sum()
    ms, cs = np.array(ms), np.array(cs)
    mean = w @ ms
    second = np.einsum("k,kij->ij", w, cs + np.einsum("ki,kj->kij", ms, ms))
    return mean, second - np.outer(mean, mean)


# -- item 1: ensf and the divergence bound ------------------------------------------------------------------

def test_ensf_uses_the_published_score_clip_by_default():
    """EnSF's own post_score clips the posterior score at +-1000 (score_max=1000)."""
    assert dif.ensf(10).config["clip"] == 1000.0 == dif.ENSF_CLIP


@pytest.mark.parametrize("sd", [0.05, 0.02])
def test_ensf_refuses_the_seed_case_below_obs_sd_0_1(sd):
    """Before the fix: members of 1e61 (sd 0.05) and 1e147 (sd 0.02), no error."""
    ens = seed_case()
    op = observe_indices(2, [0], sd=sd)
    with pytest.raises(DivergenceError, match=r"unstable.*steps would be stable"):
        run_ensf(dif.ensf(100), ens, torch.tensor([4.0], dtype=F64), op)


def test_ensf_refuses_a_5d_mixture_and_is_bounded_with_enough_steps():
    ens = mixture5()
    op = observe_indices(5, [0, 2], sd=0.05)
    y = torch.tensor([1.2, 0.7], dtype=F64)
    with pytest.raises(DivergenceError, match="unstable"):
        run_ensf(dif.ensf(200), ens, y, op)
    # the growth bound is the real one: the steps it asks for give a finite ensemble within the bound
    assert dif.ensf_growth(400.0, 100) > 1e50 and dif.ensf_growth(400.0, 400) <= 10.0
    x = run_ensf(dif.ensf(200, steps=400), ens, y, op)
    spread = ens.std(0)
    assert bool(torch.isfinite(x).all()) and float(((x - ens.mean(0)).abs() / spread).max()) < 10.0


def test_ensf_growth_predicts_the_unclipped_blow_up_and_the_bound_catches_it():
    """With every safeguard but the final bound off, the run reaches ~1e61, as ensf_growth says, and
    the divergence bound refuses it rather than returning it."""
    ens = seed_case()
    op = observe_indices(2, [0], sd=0.05)
    growth = dif.ensf_growth(400.0, 100)
    assert 1e55 < growth < 1e66
    with pytest.raises(DivergenceError, match="max_distance"):
        run_ensf(dif.ensf(100, clip=None, max_growth=1e300), ens, torch.tensor([4.0], dtype=F64), op)
    x = run_ensf(dif.ensf(100, clip=None, max_growth=1e300, max_distance=1e300), ens, torch.tensor([4.0], dtype=F64),
                 op)
    assert 1e-6 * growth < float(x.abs().max()) < 1e6 * growth


def test_reverse_bound_refuses_a_finite_blow_up():
    """A score that drives particles to 1e6 (finite, so the old non-finite check passed it)."""
    ens = seed_case()
    bound = dif.divergence_bound(ens)
    settings = dif.check_sampler("sde", 20, 1e-3)
    g = torch.Generator().manual_seed(0)
    start = torch.zeros(50, 2, dtype=F64)

    def score(x, t):
        return torch.full_like(x, 1e6)

    with pytest.raises(DivergenceError, match=r"max_distance = 10 prior standard deviations"):
        dif.reverse(score, start, dif.VPLinear(), settings, g, bound)
    assert float(bound.scale.min()) > 0.5      # the bimodal spread (1.1), not the within-mode 0.1


@pytest.mark.parametrize("case", ["seed, sd 0.05", "5-D, sd 0.01"])
def test_recommended_forcing_small_obs_sd_is_finite_and_exact(case):
    """analysis() with the recommended forcing on the cases that made ensf diverge: a correct finite
    answer, against the exact posterior of the fitted mixture (tolerances as in the oracle test)."""
    if case.startswith("seed"):
        ens, op, y = seed_case(), observe_indices(2, [0], sd=0.05), np.array([4.0])
        h, r = np.array([[1.0, 0.0]]), np.array([[0.05**2]])
    else:
        ens, op, y = mixture5(), observe_indices(5, [0, 2], sd=0.01), np.array([1.2, 0.7])
        h, r = np.eye(5)[[0, 2]], 0.01**2 * np.eye(2)
    _compare_with_fitted_oracle(ens, op, y, h, r)


# -- item 4(a): the recommended forcing against the exact posterior of the members' own mixture -------------

M = 2000


def _compare_with_fitted_oracle(ens, op, y, h, r):
    """Mean within 4 Monte Carlo standard errors, sd within 8 % (4 MC s.e. of an sd, 4.5 %, plus 3.5 %
    for the time discretisation), against the exact posterior of the EM-fitted 2-component mixture
    noised to t_min (alpha x + sigma N(0, 1): what a sampler that stops at t_min targets)."""
    t_min = 1e-4
    mix = dif.fitted_mixture(ens, components=2)
    mean, cov = mixture_posterior(mix, h, r, y)
    sched = dif.VPLinear()
    a, s2 = sched.alpha(t_min), sched.sigma2(t_min)
    mean, sd = a * mean, np.sqrt(a * a * np.diag(cov) + s2)
    x = dif.analysis(ens, torch.as_tensor(y, dtype=F64), op, forcing="weighted", components=2, particles=M,
                     sampler="exponential", noise=1.0, steps=100, t_min=t_min, seed=1).numpy()
    z = (x.mean(0) - mean) / (sd / math.sqrt(M))
    assert np.all(np.abs(z) < 4.0), z
    assert np.all(np.abs(x.std(0) / sd - 1.0) < 0.08), x.std(0) / sd


@pytest.mark.parametrize("y", [4.0, 3.0, 2.0])
def test_recommended_forcing_matches_the_fitted_mixture_posterior(y):
    """Oracle (a) of issue 26 item 4 on the seed's case and other observations (y = 2 puts weight on
    both modes)."""
    _compare_with_fitted_oracle(seed_case(), observe_indices(2, [0], sd=0.1), np.array([y]),
                                np.array([[1.0, 0.0]]), np.array([[0.01]]))


# -- item 2: bad input ---------------------------------------------------------------------------------------

def test_time_grid_refuses_an_unknown_spacing_naming_the_accepted_ones():
    with pytest.raises(InputError, match=r"spacing: expected one of \('log', 'uniform'\), got 'geometric'"):
        dif.time_grid(10, 1e-3, "geometric")
    for bad in (0, -1, 2.5, "10", None):
        with pytest.raises(InputError, match="steps"):
            dif.time_grid(bad, 1e-3)
    for bad in (0.0, 1.0, float("nan"), "0.1", None):
        with pytest.raises(InputError, match="t_min"):
            dif.time_grid(10, bad)
    assert dif.time_grid(2, 0.25) == [1.0, 0.5, 0.25]


def test_kernel_mixture_and_the_other_builders_refuse_nan_members():
    ens = seed_case(10)
    bad = ens.clone()
    bad[3, 1] = float("nan")
    for build in (lambda m: dif.kernel_mixture(m, bandwidth=0.1), lambda m: dif.local_mixture(m, neighbours=3),
                  lambda m: dif.fitted_mixture(m, components=2), lambda m: dif.gaussian_prior(m)):
        with pytest.raises(NonFiniteError, match="members"):
            build(bad)
        with pytest.raises(NonFiniteError, match="members"):
            build(ens.clone().index_fill_(0, torch.tensor([0]), float("inf")))
    with pytest.raises(NonFiniteError, match="means"):
        dif.gaussian_mixture(bad, torch.eye(2, dtype=F64))
    with pytest.raises(NonFiniteError, match="log_weight"):
        dif.kernel_mixture(ens, torch.full((10,), float("nan"), dtype=F64))


@pytest.mark.parametrize("call,err,name", [
    (lambda e, y, op: dif.kernel_mixture("abc"), InputError, "members"),
    (lambda e, y, op: dif.kernel_mixture(torch.zeros(0, 2, dtype=F64)), ShapeError, "members"),
    (lambda e, y, op: dif.kernel_mixture(torch.zeros(3, dtype=F64)), ShapeError, "members"),
    (lambda e, y, op: dif.kernel_mixture(e, bandwidth=float("nan")), InputError, "bandwidth"),
    (lambda e, y, op: dif.kernel_mixture(e, torch.zeros(3, dtype=F64)), ShapeError, "log_weight"),
    (lambda e, y, op: dif.gaussian_mixture(e, torch.eye(3, dtype=F64)), ShapeError, "covs"),
    (lambda e, y, op: dif.gaussian_mixture(e, torch.full((2, 2), float("nan"), dtype=F64)), NonFiniteError, "covs"),
    (lambda e, y, op: dif.gaussian_mixture(e, -torch.eye(2, dtype=F64)), InputError, "covs"),
    (lambda e, y, op: dif.fitted_mixture(e, components=0), InputError, "components"),
    (lambda e, y, op: dif.local_mixture(e, neighbours=1), InputError, "neighbours"),
    (lambda e, y, op: dif.mixture_score(dif.kernel_mixture(e), torch.zeros(4, 3, dtype=F64), 1.0, 0.1), ShapeError,
     "x"),
    (lambda e, y, op: dif.mixture_score(dif.kernel_mixture(e), torch.full((4, 2), float("nan"), dtype=F64), 1.0,
                                        0.1), NonFiniteError, "x"),
    (lambda e, y, op: dif.mixture_score(dif.kernel_mixture(e), torch.zeros(4, 2, dtype=F64), 1.0, 0.0), InputError,
     "sigma2"),
    (lambda e, y, op: dif.mixture_score("mix", torch.zeros(4, 2, dtype=F64), 1.0, 0.1), InputError, "mix"),
    (lambda e, y, op: dif.linearise(dif.kernel_mixture(e), torch.zeros(3, dtype=F64), op), ShapeError, "y"),
    (lambda e, y, op: dif.linearise(dif.kernel_mixture(e), y, "op"), InputError, "operator"),
    (lambda e, y, op: dif.likelihood_score(e, y, op, "mask"), InputError, "mask"),
    (lambda e, y, op: dif.analysis(e, torch.tensor([float("inf")], dtype=F64), op), NonFiniteError, "y"),
    (lambda e, y, op: dif.analysis(torch.full((10, 2), float("nan"), dtype=F64), y, op), NonFiniteError, "members"),
    (lambda e, y, op: dif.analysis(torch.zeros(0, 2, dtype=F64), y, op), ShapeError, "members"),
    (lambda e, y, op: dif.analysis("members", y, op), InputError, "members"),
    (lambda e, y, op: dif.analysis(e, y, "operator"), InputError, "operator"),
    (lambda e, y, op: dif.analysis(e, y, op, forcing=["weighted"]), InputError, "forcing"),
    (lambda e, y, op: dif.analysis(e, y, op, spacing="geometric"), InputError, "spacing"),
    (lambda e, y, op: dif.analysis(e, y, op, max_distance=float("nan")), InputError, "max_distance"),
    (lambda e, y, op: dif.analysis(e, y, op, log_weight=torch.full((10,), float("nan"), dtype=F64)), NonFiniteError,
     "log_weight"),
    (lambda e, y, op: dif.posterior_score(e, y, op, forcing="magic"), InputError, "forcing"),
    (lambda e, y, op: dif.terminal_sample(dif.VPLinear(), torch.zeros(2, dtype=F64), -torch.ones(2, dtype=F64), 5,
                                          torch.Generator()), InputError, "var"),
    (lambda e, y, op: dif.terminal_sample(dif.VPLinear(), torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64), 0,
                                          torch.Generator()), InputError, "particles"),
    (lambda e, y, op: dif.reverse(lambda x, t: x, torch.zeros(3, 2, dtype=F64), dif.VPLinear(), "settings",
                                  torch.Generator()), InputError, "settings"),
    (lambda e, y, op: dif.reverse(lambda x, t: x[:, :1], torch.zeros(3, 2, dtype=F64), dif.VPLinear(),
                                  dif.check_sampler(), torch.Generator()), ShapeError, "score"),
    (lambda e, y, op: dif.check_sampler(spacing=["log"]), InputError, "spacing"),
    (lambda e, y, op: dif.check_sampler(steps=1.5), InputError, "steps"),
    (lambda e, y, op: dif.make_schedule(None), InputError, "schedule"),
    (lambda e, y, op: dif.VE(float("inf")), InputError, "sigma_max"),
    (lambda e, y, op: dif.divergence_bound(e, factor=0.0), InputError, "factor"),
    (lambda e, y, op: dif.ensf(10, max_growth=0.5), InputError, "max_growth"),
    (lambda e, y, op: dif.ensf_growth(float("nan")), InputError, "curvature"),
    (lambda e, y, op: dif.diffusion(10, max_distance=-1.0), InputError, "max_distance"),
])
def test_public_functions_give_daml_errors_naming_the_argument(call, err, name):
    ens = seed_case(10)
    op = observe_indices(2, [0], sd=0.1)
    with pytest.raises(err, match=name):
        call(ens, torch.tensor([4.0], dtype=F64), op)


def test_one_member_gives_a_finite_answer():
    ens = torch.tensor([[1.0, 2.0]], dtype=F64)
    op = observe_indices(2, [0], sd=0.1)
    x = dif.analysis(ens, torch.tensor([1.05], dtype=F64), op, bandwidth=0.2, particles=200, steps=50, seed=0)
    assert bool(torch.isfinite(x).all())
    # the KDE prior N((1, 2), 0.04 I) and y = 1.05 with sd 0.1: posterior mean of x1 is 1.04
    assert abs(float(x[:, 0].mean()) - 1.04) < 0.03 and abs(float(x[:, 1].mean()) - 2.0) < 0.06
