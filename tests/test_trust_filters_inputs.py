"""Issue 26, wave 2: the public building blocks of daml.filters refuse bad input with a daml error that
names the argument, and give the right answer otherwise (each test failed before its fix)."""

import math

import numpy as np
import pytest
import torch

import daml
from daml import filters, models
from daml.errors import DamlError, DtypeError, InputError, NonFiniteError, ShapeError
from daml.filters.base import unchecked

F64 = torch.float64


def t(a):
    return torch.tensor(a, dtype=F64)


def _ens(m=4, n=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, n, generator=g, dtype=F64), torch.full((m,), -math.log(m), dtype=F64)


def _gen():
    return torch.Generator().manual_seed(0)


NON_PD = [[1.0, 2.0], [2.0, 1.0]]          # eigenvalues 3 and -1
ONES2 = torch.ones(2, dtype=torch.bool)


def _init(members=4, mean=None, cov=None, model=None):
    mean = t([0.0, 0.0, 0.0]) if mean is None else mean
    cov = torch.eye(3, dtype=F64) if cov is None else cov
    return filters.ensemble_init(members)(model or models.Lorenz63(), mean, cov, _gen())


def _ew(**over):
    f, lw = _ens()
    kw = dict(f=f, log_weight=lw, y=t([1.0, 1.0, 1.0]), operator=models.observe_all(3, sd=1.0),
              mask=torch.ones(3, dtype=torch.bool), q=0.5 * torch.eye(3, dtype=F64), keep=0.8)
    kw.update(over)
    return filters.equivalent_weights_step(**kw)


BAD = [
    # (call, error type, argument the message must name)
    (lambda: filters.ensemble_members(None), InputError, "state"),
    (lambda: filters.ensemble_members(filters.EnsembleState(t([[0.0, math.nan]]), t([0.0]))), NonFiniteError, "x"),
    (lambda: filters.ensemble_members(filters.EnsembleState(_ens()[0], torch.full((4,), -math.inf, dtype=F64))),
     NonFiniteError, "log_weight"),
    (lambda: filters.ensemble_members(filters.EnsembleState(_ens()[0], t([0.0, 0.0, 0.0]))), ShapeError, "log_weight"),
    (lambda: filters.ensemble_members(filters.EnsembleState("x", t([0.0]))), DtypeError, "x"),
    (lambda: filters.ensemble_forecast("state", models.Lorenz63(), _gen()), InputError, "state"),
    (lambda: filters.gaussian_members({"mean": 0}), InputError, "state"),
    (lambda: filters.gaussian_members(filters.GaussianState(t([0.0, math.nan]), torch.eye(2, dtype=F64))),
     NonFiniteError, "mean"),
    (lambda: filters.gaussian_members(filters.GaussianState(t([0.0, 0.0]), t([[1.0, math.nan], [math.nan, 1.0]]))),
     NonFiniteError, "cov"),
    (lambda: filters.gaussian_members(filters.GaussianState(t([0.0, 0.0]), torch.eye(3, dtype=F64))), ShapeError, "cov"),
    (lambda: filters.gaussian_members(filters.GaussianState(t(0.0), torch.eye(1, dtype=F64))), ShapeError, "mean"),
    (lambda: filters.gaussian_members(filters.GaussianState(None, torch.eye(2, dtype=F64))), DtypeError, "mean"),
    (lambda: filters.gaussian_members(filters.GaussianState(t([0.0, 0.0]), t([[1.0, 0.5], [0.0, 1.0]]))),
     InputError, "cov"),                                                      # asymmetric
    (lambda: filters.masked_observation(t([math.nan, 1.0]), torch.ones(4, 2, dtype=F64), torch.eye(2, dtype=F64),
                                        ONES2), NonFiniteError, "innovation"),
    (lambda: filters.masked_observation(t([1.0, 1.0]), t([[math.inf, 1.0]]), torch.eye(2, dtype=F64), ONES2),
     NonFiniteError, "obs_anomalies"),
    (lambda: filters.masked_observation(t([1.0, 1.0]), torch.ones(4, 2, dtype=F64),
                                        t([[math.nan, 0.0], [0.0, 1.0]]), ONES2), NonFiniteError, "noise_cov"),
    (lambda: filters.masked_observation(t([1.0, 1.0]), torch.ones(4, 2, dtype=F64), torch.eye(2, dtype=F64),
                                        t([1.0, 1.0])), DtypeError, "mask"),
    (lambda: filters.masked_observation(t([1.0, 1.0]), torch.ones(4, 2, dtype=F64), None, ONES2), DtypeError,
     "noise_cov"),
    (lambda: filters.masked_observation(t([1.0, 1.0]), torch.ones(4, 3, dtype=F64), torch.eye(2, dtype=F64), ONES2),
     ShapeError, "obs_anomalies"),
    (lambda: filters.masked_observation(torch.ones(0, dtype=F64), torch.ones(4, 2, dtype=F64),
                                        torch.eye(2, dtype=F64), ONES2), ShapeError, "innovation"),
    (lambda: filters.gaussian_loglik(torch.ones(2, 2, dtype=F64), torch.eye(2, dtype=F64), t([math.nan, 0.5])),
     DtypeError, "mask"),
    (lambda: filters.gaussian_loglik(t([[math.nan, 1.0]]), torch.eye(2, dtype=F64), ONES2), NonFiniteError,
     "innovation"),
    (lambda: filters.gaussian_loglik(t([[math.inf, 1.0]]), 2.0 * torch.eye(2, dtype=F64), ONES2), NonFiniteError,
     "innovation"),
    (lambda: filters.gaussian_loglik(torch.ones(2, 2, dtype=torch.float16), torch.eye(2), ONES2), DtypeError,
     "innovation"),
    (lambda: filters.gaussian_loglik(t([1.0]), torch.eye(1, dtype=F64), torch.ones(1, dtype=torch.bool)), ShapeError,
     "innovation"),
    (lambda: filters.gaussian_loglik(torch.ones(2, 2, dtype=F64), torch.ones(2, 1, dtype=F64), ONES2), ShapeError,
     "noise_cov"),
    (lambda: filters.gaussian_loglik(torch.ones(2, 2, dtype=F64), {"r": 1}, ONES2), DtypeError, "noise_cov"),
    (lambda: filters.gaussian_loglik(torch.ones(2, 2, dtype=F64), torch.eye(2, dtype=F64), None), DtypeError, "mask"),
    (lambda: filters.ensemble_init(0), InputError, "members"),
    (lambda: filters.ensemble_init(2.0), InputError, "members"),
    (lambda: filters.ensemble_init(True), InputError, "members"),
    (lambda: filters.ensemble_init(None), InputError, "members"),
    (lambda: _init(mean=t([0.0, math.nan, 0.0])), NonFiniteError, "mean"),
    (lambda: _init(mean=t([0.0, 0.0])), ShapeError, "mean"),
    (lambda: _init(mean=torch.zeros(3, dtype=torch.float16)), DtypeError, "mean"),
    (lambda: _init(mean="abc"), DtypeError, "mean"),
    (lambda: _init(cov=torch.full((3, 3), math.nan, dtype=F64)), NonFiniteError, "cov"),
    (lambda: _init(cov=-torch.eye(3, dtype=F64)), InputError, "cov"),
    (lambda: _init(cov=torch.ones(3, 2, dtype=F64)), ShapeError, "cov"),
    (lambda: _init(cov="abc"), DtypeError, "cov"),
    (lambda: filters.register({"a": 1}), InputError, "name"),
    (lambda: filters.register(""), InputError, "name"),
    (lambda: filters.inflate(None, 1.05), InputError, "filt"),
    (lambda: filters.inflate("etkf", 1.05), InputError, "filt"),
    (lambda: filters.operator_from_data(None), InputError, "data"),
    (lambda: filters.gaspari_cohn(t([0.0, math.nan]), 2.0), NonFiniteError, "distance"),
    (lambda: _ew(f=t([[0.0, math.nan, 0.0]] * 4)), NonFiniteError, "f"),
    (lambda: _ew(f=torch.ones(4, 2, dtype=F64)), ShapeError, "f"),
    (lambda: _ew(f=None), DtypeError, "f"),
    (lambda: _ew(log_weight=torch.full((4,), -math.inf, dtype=F64)), NonFiniteError, "log_weight"),
    (lambda: _ew(log_weight=torch.zeros(3, dtype=F64)), ShapeError, "log_weight"),
    (lambda: _ew(y=t([1.0, math.inf, 1.0])), NonFiniteError, "y"),
    (lambda: _ew(y=t([1.0, 1.0])), ShapeError, "y"),
    (lambda: _ew(operator=None), InputError, "operator"),
    (lambda: _ew(mask=t([1.0, 1.0, 1.0])), DtypeError, "mask"),
    (lambda: _ew(q=torch.full((3, 3), math.nan, dtype=F64)), NonFiniteError, "q"),
    (lambda: _ew(q=t([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])), InputError, "q"),
    (lambda: _ew(q=torch.eye(2, dtype=F64)), ShapeError, "q"),
    (lambda: _ew(q="q"), DtypeError, "q"),
]


@pytest.mark.parametrize("call, error, argument", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_refused_naming_the_argument(call, error, argument):
    with pytest.raises(error) as info:
        call()
    assert argument in str(info.value)


# -- wrong finite answers found by hand ---------------------------------------------------------------------

def test_gaussian_members_refuses_a_non_pd_covariance():
    # the eigenvalue clamp turned [[1, 2], [2, 1]] into sigma points of covariance [[2, 2], [2, 2]]
    with pytest.raises(InputError, match="cov"):
        filters.gaussian_members(filters.GaussianState(t([0.0, 0.0]), t(NON_PD)))


def test_gaussian_members_of_a_semidefinite_covariance_are_exact():
    # a singular (rank-1) covariance is a valid Gaussian (a perfectly observed direction): its sigma
    # points must reproduce the mean and the covariance exactly
    v = t([[1.0], [2.0]])
    cov, mean = v @ v.T, t([0.5, -1.0])
    x, lw = filters.gaussian_members(filters.GaussianState(mean, cov))
    w = torch.exp(lw)
    m = (w.unsqueeze(-1) * x).sum(0)
    c = ((x - m).T * w) @ (x - m)
    torch.testing.assert_close(m, mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(c, cov, atol=1e-12, rtol=0)


def test_masked_observation_refuses_a_non_pd_noise_cov():
    with pytest.raises(InputError, match="noise_cov"):
        filters.masked_observation(t([1.0, 1.0]), torch.ones(4, 2, dtype=F64), t(NON_PD), ONES2)


def test_masked_observation_ignores_what_is_unobserved():
    # NaN in the unobserved entry of the innovation and of R is no error: it is masked out exactly
    innov, anom, r = filters.masked_observation(t([math.nan, 2.0]), torch.ones(3, 2, dtype=F64),
                                                t([[math.nan, 0.0], [0.0, 4.0]]), torch.tensor([False, True]))
    torch.testing.assert_close(innov, t([0.0, 2.0]))
    torch.testing.assert_close(anom, t([[0.0, 1.0]] * 3))
    torch.testing.assert_close(r, t([[1.0, 0.0], [0.0, 4.0]]))


def test_gaussian_loglik_refuses_a_float_mask_and_matches_the_density_of_the_observed_entries():
    with pytest.raises(DtypeError, match="mask"):
        filters.gaussian_loglik(torch.ones(2, 2, dtype=F64), torch.eye(2, dtype=F64), t([math.nan, 0.5]))
    # oracle: torch.distributions on the observed sub-vector alone (the unobserved entry is NaN)
    c = t([[2.0, 0.3, 0.1], [0.3, 1.0, 0.2], [0.1, 0.2, 1.5]])
    d = t([[0.4, math.nan, -1.0], [1.2, math.nan, 0.3]])
    mask = torch.tensor([True, False, True])
    got = filters.gaussian_loglik(d, c, mask)
    keep = [0, 2]
    want = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64), c[keep][:, keep]).log_prob(d[:, keep])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_ensemble_init_refuses_a_negative_size_at_once_and_a_non_pd_cov():
    with pytest.raises(InputError, match="members"):
        filters.ensemble_init(-1)
    with pytest.raises(InputError, match="cov"):
        _init(cov=t([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_ensemble_init_draws_the_prior():
    # Monte Carlo limit: 20000 draws of N(mean, cov); the sample mean within 5 standard errors
    cov = t([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.5]])
    mean = t([1.0, -2.0, 0.5])
    st = _init(members=20000, mean=mean, cov=cov)
    assert st.x.shape == (20000, 3)
    torch.testing.assert_close(st.log_weight, torch.full((20000,), -math.log(20000), dtype=F64))
    se = torch.sqrt(torch.diagonal(cov) / 20000)
    assert bool(((st.x.mean(0) - mean).abs() < 5 * se).all())
    torch.testing.assert_close(torch.cov(st.x.T), cov, atol=0.06, rtol=0)


def test_gaspari_cohn_nan_refused_inf_is_zero():
    with pytest.raises(NonFiniteError, match="distance"):
        filters.gaspari_cohn(t([math.nan]), 2.0)
    torch.testing.assert_close(filters.gaspari_cohn(t([0.0, math.inf]), 2.0), t([1.0, 0.0]))


def test_kalman_smoother_without_times_is_refused():
    model, data = _lin()
    with pytest.raises(ShapeError, match="data"):
        filters.kalman_smoother(model, data.isel(time=slice(0, 0)))


def _lin(steps=6):
    model = models.LinearModel(np.array([[0.9, 0.1], [0.0, 0.8]]), noise_cov=0.1 * np.eye(2))
    return model, daml.simulate(model, steps, models.observe_all(2, sd=0.5), x0=np.zeros(2), x0_cov=1.0, seed=0)


# -- the equivalent-weights step ---------------------------------------------------------------------------

def test_equivalent_weights_step_refuses_all_zero_weights_and_gives_equal_weights_otherwise():
    with pytest.raises(NonFiniteError, match="log_weight"):
        _ew(log_weight=torch.full((4,), -math.inf, dtype=F64))
    st = _ew(keep=1.0)
    assert bool(st.kept.all())
    # every kept particle reaches the target weight (the defining property of the step)
    torch.testing.assert_close(st.neg_log_weight, st.target.unsqueeze(-1).expand_as(st.neg_log_weight),
                               atol=1e-9, rtol=0)
    assert bool(torch.isfinite(st.x).all())


# -- the checks are off only inside run's loop --------------------------------------------------------------

def test_unchecked_skips_the_checks_and_restores_them():
    bad = filters.EnsembleState(t([[math.nan, 0.0]]), t([0.0]))
    with pytest.raises(NonFiniteError):
        filters.ensemble_members(bad)
    with pytest.raises(RuntimeError):
        with unchecked():
            x, _ = filters.ensemble_members(bad)           # as it is: run checks divergence itself
            assert bool(torch.isnan(x).any())
            raise RuntimeError("leave the block by an exception")
    with pytest.raises(NonFiniteError):
        filters.ensemble_members(bad)


def test_run_still_reports_divergence_not_bad_input():
    # members that blow up inside run's loop are a DivergenceError (with the step), not an input error
    # of ensemble_members: the building blocks' checks are off there and run checks divergence itself
    data = daml.simulate(models.Lorenz63(), 6, models.observe_all(3, sd=1.0), x0=np.ones(3), x0_cov=1.0, seed=0)
    filt = filters.etkf(4)
    blow_up = filt._replace(analysis=lambda s, y, op, mask, g: (filters.EnsembleState(s.x * math.nan, s.log_weight),
                                                                {}))
    with pytest.raises(DamlError) as info:
        filters.run(blow_up, models.Lorenz63(), data, seed=0, progress=False)
    assert isinstance(info.value, daml.errors.DivergenceError)
    assert info.value.step is not None
