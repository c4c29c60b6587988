"""daml.diffusion refuses bad input with a daml error naming the argument, widens half precision, and
the documented ``mask`` of :func:`daml.diffusion.analysis` works (issue 26, fuzz wave 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import daml.diffusion as dif
from daml import models as M
from daml.errors import DamlError, DtypeError, InputError, NonFiniteError, SeedError, ShapeError

F64 = torch.float64
HUGE = 10**12
H = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def op():
    return M.observe_linear(H, sd=0.5)


def ens(n=8, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def refuses(fn, err, name):
    with pytest.raises(err) as info:
        fn()
    assert name in str(info.value), str(info.value)
    return info.value


# -- the documented mask argument of analysis -------------------------------------------------------------

@pytest.mark.parametrize("forcing, bandwidth", [("weighted", 0.0), ("weighted", 0.4), ("gaussian", 0.0)])
def test_analysis_mask_equals_dropping_the_masked_observations(forcing, bandwidth):
    x, y = ens(), torch.tensor([0.5, -0.2], dtype=F64)
    kw = dict(forcing=forcing, bandwidth=bandwidth, steps=30, t_min=1e-2, seed=3)
    masked = dif.analysis(x, y, op(), mask=torch.tensor([True, False]), **kw)
    dropped = dif.analysis(x, y[:1], M.observe_linear(H[:1], sd=0.5), **kw)
    torch.testing.assert_close(masked, dropped, rtol=1e-10, atol=1e-10)
    # the masked value has no influence: a wildly different (even NaN) value there gives the same particles
    y_bad = torch.tensor([0.5, 1e6], dtype=F64)
    torch.testing.assert_close(dif.analysis(x, y_bad, op(), mask=torch.tensor([True, False]), **kw), masked,
                               rtol=1e-10, atol=1e-10)
    y_nan = torch.tensor([0.5, math.nan], dtype=F64)
    torch.testing.assert_close(dif.analysis(x, y_nan, op(), mask=torch.tensor([True, False]), **kw), masked,
                               rtol=1e-10, atol=1e-10)
    # and it matters: observing both entries moves the particles
    assert not torch.allclose(dif.analysis(x, y, op(), **kw), masked)


def test_analysis_mask_must_be_boolean_and_agree_with_y():
    x, y = ens(), torch.tensor([0.5, -0.2], dtype=F64)
    refuses(lambda: dif.analysis(x, y, op(), mask=torch.tensor([1.0, 0.0]), steps=4, seed=0), DtypeError, "mask")
    refuses(lambda: dif.analysis(x, y, op(), mask="yes", steps=4, seed=0), InputError, "mask")
    y_nan = torch.tensor([0.5, math.nan], dtype=F64)
    refuses(lambda: dif.analysis(x, y_nan, op(), mask=torch.tensor([True, True]), steps=4, seed=0),
            NonFiniteError, "y")


# -- half precision is widened to float32 (as daml.posterior.from_members) -----------------------------------

def _half(x):
    return x.to(torch.float16)


@pytest.mark.parametrize("factory, kw", [
    (dif.kernel_mixture, dict(bandwidth=0.3)),
    (dif.local_mixture, dict(neighbours=3)),
    (dif.fitted_mixture, dict(components=2, iterations=10)),
    (dif.gaussian_prior, {}),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_members_are_widened_losslessly(factory, kw, dtype):
    members = ens(12).to(dtype)
    mix = factory(members, **kw)
    assert mix.mean.dtype == torch.float32
    xq = ens(2, seed=1)
    score = dif.mixture_score(mix, xq, 0.8, 0.3)                      # float32 mixture, float64 particles
    assert score.dtype == F64
    # the same as building the mixture from the widened members
    ref = dif.mixture_score(factory(members.to(torch.float32), **kw), xq, 0.8, 0.3)
    torch.testing.assert_close(score, ref)


def test_half_precision_gaussian_mixture_ensemble_forcing_and_posterior_score():
    means = ens(2).to(torch.float16)
    covs = torch.stack([torch.eye(3, dtype=F64), 2 * torch.eye(3, dtype=F64)])
    mix = dif.gaussian_mixture(means, covs)
    ref = dif.gaussian_mixture(means.float(), covs)
    xq = ens(2, seed=1)
    torch.testing.assert_close(dif.mixture_score(mix, xq, 0.8, 0.3), dif.mixture_score(ref, xq, 0.8, 0.3))

    members = ens(6)
    gauss = dif.gaussian_prior(members)
    loglik = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=F64)
    got = dif.ensemble_forcing(gauss, members.to(torch.float16), loglik, xq, 0.8, 0.3)
    want = dif.ensemble_forcing(gauss, members.to(torch.float16).double(), loglik, xq, 0.8, 0.3)
    torch.testing.assert_close(got, want)

    y = torch.tensor([0.5, -0.2], dtype=F64)
    half = dif.posterior_score(members.to(torch.float16), y, op())(xq, 0.5)
    single = dif.posterior_score(members.to(torch.float16).float(), y, op())(xq, 0.5)
    assert bool(torch.isfinite(half).all())
    torch.testing.assert_close(half, single)


# -- Mixture is checked on construction ---------------------------------------------------------------------

MEAN, LW = ens(3), torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=F64))


@pytest.mark.parametrize("mean, log_weight, err, name", [
    (MEAN.clone().fill_(math.nan), LW, NonFiniteError, "mean"),
    (MEAN[:0], LW, ShapeError, "mean"),
    (torch.tensor(1.5, dtype=F64), LW, ShapeError, "mean"),
    (MEAN.long(), LW, DtypeError, "mean"),
    (MEAN.to(torch.complex128), LW, DtypeError, "mean"),
    (None, LW, DtypeError, "mean"),
    ({"a": 1}, LW, DtypeError, "mean"),
    (MEAN[:1], LW, ShapeError, "mean"),
    (MEAN, torch.tensor([0.0, math.nan, 0.0], dtype=F64), NonFiniteError, "log_weight"),
    (MEAN, torch.tensor([0.0, math.inf, 0.0], dtype=F64), NonFiniteError, "log_weight"),
    (MEAN, torch.full((3,), -math.inf, dtype=F64), NonFiniteError, "log_weight"),
    (MEAN, LW[:2], ShapeError, "log_weight"),
    (MEAN, LW.to(torch.complex128), DtypeError, "log_weight"),
    (MEAN, "x", DtypeError, "log_weight"),
    (MEAN, None, DtypeError, "log_weight"),
])
def test_mixture_refuses_bad_fields(mean, log_weight, err, name):
    refuses(lambda: dif.Mixture(mean, log_weight), err, name)


def test_mixture_normalises_widens_and_checks_the_spectral_fields():
    mix = dif.Mixture(MEAN.half(), LW + 3.0)
    assert mix.mean.dtype == torch.float32 and mix.log_weight.dtype == torch.float32
    torch.testing.assert_close(mix.log_weight.exp().sum(), torch.tensor(1.0))
    vecs = torch.eye(3, dtype=F64).expand(3, 3, 3)
    refuses(lambda: dif.Mixture(MEAN, LW, 0.0, vecs, None), InputError, "vecs")
    refuses(lambda: dif.Mixture(MEAN, LW, 0.0, vecs, -torch.ones(3, 3, dtype=F64)), NonFiniteError, "vals")
    refuses(lambda: dif.Mixture(MEAN, LW, 0.0, vecs[:2], torch.ones(2, 3, dtype=F64)), ShapeError, "vecs")
    refuses(lambda: dif.Mixture(MEAN, LW, -1.0), InputError, "floor")
    # a valid spectral mixture with identity covariances scores as the isotropic one with floor 1
    full = dif.Mixture(MEAN, LW, 0.0, vecs, torch.ones(3, 3, dtype=F64))
    iso = dif.Mixture(MEAN, LW, 1.0)
    xq = ens(2, seed=1)
    torch.testing.assert_close(dif.mixture_score(full, xq, 0.8, 0.3), dif.mixture_score(iso, xq, 0.8, 0.3))


# -- tapers, EM settings, observations -----------------------------------------------------------------------

@pytest.mark.parametrize("factory, kw", [(dif.gaussian_prior, {}), (dif.local_mixture, dict(neighbours=3)),
                                         (dif.fitted_mixture, dict(iterations=5))])
@pytest.mark.parametrize("taper, err", [
    (np.full((3, 3), math.nan), NonFiniteError), (np.full((3, 3), math.inf), NonFiniteError),
    (np.full((3, 3), "a"), DtypeError), ({"a": 1}, DtypeError), (np.eye(2), ShapeError),
])
def test_bad_taper_is_refused(factory, kw, taper, err):
    refuses(lambda: factory(ens(8), taper=taper, **kw), err, "taper")


def test_numpy_taper_is_accepted():
    x = ens(8)
    t = np.eye(3)
    torch.testing.assert_close(dif.gaussian_prior(x, taper=t).vals, dif.gaussian_prior(x, taper=torch.eye(3, dtype=F64)).vals)


@pytest.mark.parametrize("kw, name", [
    (dict(tol="x"), "tol"), (dict(tol=None), "tol"), (dict(tol=1 + 1j), "tol"), (dict(tol=-1.0), "tol"),
    (dict(ridge=math.nan), "ridge"), (dict(ridge=math.inf), "ridge"), (dict(ridge=-1.0), "ridge"),
    (dict(ridge=0.0), "ridge"), (dict(ridge="x"), "ridge"), (dict(ridge=None), "ridge"),
    (dict(ridge=1 + 1j), "ridge"), (dict(iterations=0), "iterations"),
])
def test_fitted_mixture_settings_are_checked(kw, name):
    refuses(lambda: dif.fitted_mixture(ens(12), **kw), InputError, name)


def test_observed_nan_is_refused_by_linearise_and_likelihood_score():
    mix = dif.gaussian_prior(ens(6))
    y = torch.tensor([0.5, math.nan], dtype=F64)
    everything = torch.ones(2, dtype=torch.bool)
    refuses(lambda: dif.linearise(mix, y, op(), everything), NonFiniteError, "y")
    refuses(lambda: dif.likelihood_score(ens(2), y, op(), everything), NonFiniteError, "y")
    # unobserved NaN is fine, and the same as any other value there
    part = torch.tensor([True, False])
    lin = dif.linearise(mix, y, op(), part)
    assert bool(torch.isfinite(lin.loglik).all())
    g = dif.likelihood_score(ens(2), y, op(), part)
    torch.testing.assert_close(g, dif.likelihood_score(ens(2), torch.tensor([0.5, 7.0], dtype=F64), op(), part))


def test_ensemble_forcing_checks():
    members, xq = ens(6), ens(2, seed=1)
    gauss = dif.gaussian_prior(members)
    ll = torch.arange(6, dtype=F64)
    refuses(lambda: dif.ensemble_forcing(None, members, ll, xq, 0.8, 0.3), InputError, "gauss")
    refuses(lambda: dif.ensemble_forcing(gauss, members, torch.full((6,), -math.inf, dtype=F64), xq, 0.8, 0.3),
            NonFiniteError, "loglik")
    refuses(lambda: dif.ensemble_forcing(gauss, members, ll.to(torch.complex128), xq, 0.8, 0.3), DtypeError, "loglik")
    refuses(lambda: dif.ensemble_forcing(gauss, members[:, :2], ll, xq, 0.8, 0.3), ShapeError, "members")
    # integer log-likelihoods are exact numbers: the same forcing as their float values
    torch.testing.assert_close(dif.ensemble_forcing(gauss, members, ll.long(), xq, 0.8, 0.3),
                               dif.ensemble_forcing(gauss, members, ll, xq, 0.8, 0.3))


# -- samplers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, err, name", [
    (dict(members=ens(6).clone().fill_(math.nan)), NonFiniteError, "members"),
    (dict(members=ens(6).long()), DtypeError, "members"),
    (dict(members=ens(6).to(torch.complex128)), DtypeError, "members"),
    (dict(log_weight=torch.full((6,), math.nan, dtype=F64)), NonFiniteError, "log_weight"),
    (dict(log_weight=torch.full((6,), -math.inf, dtype=F64)), NonFiniteError, "log_weight"),
    (dict(log_weight=torch.zeros(5, dtype=F64)), ShapeError, "log_weight"),
    (dict(log_weight="x"), DtypeError, "log_weight"),
    (dict(bandwidth=math.nan), InputError, "bandwidth"),
    (dict(bandwidth=math.inf), InputError, "bandwidth"),
    (dict(bandwidth="x"), InputError, "bandwidth"),
    (dict(bandwidth=None), InputError, "bandwidth"),
    (dict(factor=math.nan), InputError, "factor"),
])
def test_divergence_bound_refuses(kw, err, name):
    args = dict(members=ens(6))
    args.update(kw)
    refuses(lambda: dif.divergence_bound(**args), err, name)


def test_divergence_bound_of_half_members_matches_widened():
    x = ens(6).half()
    b, ref = dif.divergence_bound(x, bandwidth=0.1), dif.divergence_bound(x.float(), bandwidth=0.1)
    torch.testing.assert_close(b.centre, ref.centre)
    torch.testing.assert_close(b.scale, ref.scale)


@pytest.mark.parametrize("generator", ["x", {}, 3, None])
def test_generator_must_be_a_torch_generator(generator):
    sched = dif.VPLinear()
    refuses(lambda: dif.terminal_sample(sched, torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), 4, generator),
            SeedError, "generator")
    refuses(lambda: dif.reverse(lambda x, t: -x, ens(4), sched, dif.check_sampler("sde", 3), generator),
            SeedError, "generator")


def test_sizes_that_cannot_fit_are_refused_up_front():
    g = torch.Generator().manual_seed(0)
    refuses(lambda: dif.terminal_sample(dif.VPLinear(), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), HUGE, g),
            InputError, "particles")
    refuses(lambda: dif.time_grid(HUGE, 1e-3), InputError, "steps")
    refuses(lambda: dif.check_sampler("sde", HUGE), InputError, "steps")
    refuses(lambda: dif.ensf_growth(4.0, HUGE), InputError, "steps")
    refuses(lambda: dif.diffusion(4, steps=HUGE), InputError, "steps")
    refuses(lambda: dif.ensf(4, steps=HUGE), InputError, "steps")
    y = torch.tensor([0.5, -0.2], dtype=F64)
    refuses(lambda: dif.analysis(ens(), y, op(), particles=HUGE, steps=4, seed=0), InputError, "particles")
    refuses(lambda: dif.analysis(ens(), y, op(), steps=HUGE, seed=0), InputError, "steps")
    refuses(lambda: dif.analysis(torch.tensor(1.5, dtype=F64), y, op(), steps=4, seed=0), ShapeError, "members")


# -- schedules -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [dif.VPLinear, dif.VPCosine, dif.VE])
@pytest.mark.parametrize("t", [math.nan, math.inf, -1.0, 1.5, "x", None, 1 + 1j, True])
def test_schedules_refuse_pseudo_times_outside_0_1(cls, t):
    s = cls()
    for method in (s.alpha, s.sigma2, s.dalpha, s.dsigma2, s.drift, s.diffusion2, s.log_snr):
        err = refuses(lambda: method(t), InputError, "t")
        assert isinstance(err, DamlError)


def test_schedules_accept_the_unit_interval_and_refuse_log_snr_without_noise():
    for cls in (dif.VPLinear, dif.VPCosine, dif.VE):
        s = cls()
        for t in (0.0, 0.5, 1.0, np.float64(0.25)):
            assert math.isfinite(s.alpha(t)) and math.isfinite(s.sigma2(t)) and math.isfinite(s.diffusion2(t))
    refuses(lambda: dif.VE().log_snr(0.0), InputError, "t")          # sigma_0 = 0
    assert math.isfinite(dif.VPCosine().log_snr(0.0))                  # sigma_0^2 = eta^2 > 0


def test_mask_that_would_enlarge_y_is_refused():
    x, y = ens(), torch.tensor([0.5, -0.2], dtype=F64)
    refuses(lambda: dif.analysis(x, y, op(), mask=torch.tensor([[[True, False]]]), steps=4, seed=0), ShapeError, "mask")
    refuses(lambda: dif.linearise(dif.gaussian_prior(x), y, op(), torch.ones(3, 2, dtype=torch.bool)), ShapeError, "mask")


def test_scalar_mask_broadcasts_to_every_observation():
    x, y = ens(2), torch.tensor([0.5, -0.2], dtype=F64)
    torch.testing.assert_close(dif.likelihood_score(x, y, op(), torch.tensor(True)),
                               dif.likelihood_score(x, y, op(), torch.ones(2, dtype=torch.bool)))
