"""Issue 26, wave 2: the models, twin, experiment, io, errors, diagnostics, posterior and resampling
entry points either answer correctly or refuse with a daml error naming the argument.

Each test here failed before its fix (wrong answers: ``periodic_covariance`` not positive
semidefinite, the Kish ESS and the normalised log-weights of log-weights of large magnitude,
``observation_steps(5.5)``; other library errors or silent NaN for the bad calls).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from daml import diagnostics, experiment, io, models, posterior, resampling, twin
from daml.errors import DamlError, DtypeError, InputError, NonFiniteError, ShapeError, check_fits

F64 = torch.float64
HUGE = 10 ** 12


def _ones(n=3):
    return torch.ones(n, dtype=F64)


# ---- periodic_covariance: a covariance for every (n, variance, length) ------------------------------------

@pytest.mark.parametrize("n", list(range(1, 13)) + [16, 31, 40, 64, 101])
def test_periodic_covariance_is_positive_semidefinite(n):
    worst = math.inf
    for length in [0.1, 0.4, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 50.0]:
        for variance in [1e-3, 1.0, 6.5]:
            c = models.periodic_covariance(n, variance, length, dtype=F64)
            assert torch.equal(c, c.T)
            e = torch.linalg.eigvalsh(c)
            assert float(e.min()) >= -1e-12 * float(e.max()), (n, variance, length, float(e.min()))
            worst = min(worst, float(e.min() / e.max()))
    assert worst > 0          # with the 1e-9 diagonal: positive definite, as test_properties asserts


@pytest.mark.parametrize("n, length", [(4, 1.0), (40, 5.0), (5, 1.0), (12, 2.0)])
def test_periodic_covariance_is_the_gaussian_kernel_of_the_chordal_distance(n, length):
    # the cases the grid distance got wrong (n=4, length=1 had eigenvalue -0.078; n=40, length=5: -3e-4),
    # against an independent numpy computation of the points on a circle of circumference n
    c = models.periodic_covariance(n, 2.0, length, dtype=F64).numpy()
    angle = 2 * np.pi * np.arange(n) / n
    pts = (n / (2 * np.pi)) * np.stack([np.cos(angle), np.sin(angle)], -1)
    chord = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    want = 2.0 * (np.exp(-0.5 * (chord / length) ** 2) + 1e-9 * np.eye(n))
    np.testing.assert_allclose(c, want, rtol=1e-12, atol=1e-14)
    assert np.linalg.eigvalsh(c).min() > 0


def test_periodic_covariance_neighbours_are_close_to_the_grid_distance():
    # for n = 40 the neighbours' chordal distance is 0.999 (grid distance 1): the correlations change little
    c = models.periodic_covariance(40, 1.0, 1.0, dtype=F64)
    assert abs(float(c[0, 1]) - math.exp(-0.5)) < 2e-3
    assert float(c[0, 1]) == pytest.approx(math.exp(-0.5 * ((40 / math.pi) * math.sin(math.pi / 40)) ** 2), rel=1e-14)


# ---- log-weights of large magnitude: shift first ---------------------------------------------------------

@pytest.mark.parametrize("value, n", [(1e17, 2), (4.5e15, 2), (-3e16, 5), (1e300, 3)])
def test_ess_and_normalisation_of_equal_large_log_weights(value, n):
    lw = torch.full((n,), value, dtype=F64)
    assert float(diagnostics.ess_kernel(lw)) == pytest.approx(n, rel=1e-14)
    assert torch.allclose(posterior.normalise_log_weight(lw), torch.full((n,), -math.log(n), dtype=F64),
                          rtol=0, atol=1e-15)


def test_ess_and_normalisation_are_shift_invariant():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(4, 9)) * 2.0
    ref_ess = diagnostics.ess_kernel(torch.tensor(base))
    ref_lw = posterior.normalise_log_weight(torch.tensor(base))
    for shift in [1e6, 1e12, 2.5e14]:        # the differences survive the shift to within its rounding
        shifted = torch.tensor(base + shift)
        err = float(np.abs((base + shift) - shift - base).max())
        assert torch.allclose(diagnostics.ess_kernel(shifted), ref_ess, rtol=50 * err + 1e-12)
        assert torch.allclose(posterior.normalise_log_weight(shifted), ref_lw, rtol=0, atol=10 * err + 1e-12)


def test_normalised_log_weights_are_accurate_to_an_ulp():
    # ordinary inputs: against a 50-digit oracle, the error is about 1 ulp of max(|exact|, 1)
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    rng = np.random.default_rng(0)
    worst_new = worst_old = 0.0
    for _ in range(150):
        n = int(rng.integers(2, 16))
        lw = rng.normal(size=n) * 10 ** rng.uniform(-2, 2) + rng.normal() * 10 ** rng.uniform(0, 3)
        t = torch.tensor(lw)
        got = posterior.normalise_log_weight(t).numpy()
        old = (t - torch.logsumexp(t, -1, keepdim=True)).numpy()       # the former formula
        total = mpmath.log(mpmath.fsum([mpmath.exp(mpmath.mpf(float(v))) for v in lw]))
        exact = np.array([float(mpmath.mpf(float(v)) - total) for v in lw])
        ulp = np.spacing(np.maximum(np.abs(exact), 1.0))
        worst_new = max(worst_new, float(np.max(np.abs(got - exact) / ulp)))
        worst_old = max(worst_old, float(np.max(np.abs(old - exact) / ulp)))
        weights = [mpmath.exp(mpmath.mpf(float(v)) - total) for v in lw]
        ess = float(1 / mpmath.fsum([w * w for w in weights]))
        assert float(diagnostics.ess_kernel(t)) == pytest.approx(ess, rel=1e-14)
    assert worst_new <= 2.0
    assert worst_new <= worst_old


def test_normalisation_of_ordinary_log_weights_is_unchanged_within_ulps():
    rng = np.random.default_rng(1)
    t = torch.tensor(rng.normal(size=(50, 20)) * 3.0)
    got = posterior.normalise_log_weight(t)
    old = t - torch.logsumexp(t, -1, keepdim=True)
    ulp = torch.tensor(np.spacing(np.maximum(np.abs(old.numpy()), 1.0)))
    assert bool(((got - old).abs() <= 2 * ulp).all())
    assert torch.equal(posterior.normalise_log_weight(torch.tensor([[-math.inf, 0.0]], dtype=F64)),
                       torch.tensor([[-math.inf, 0.0]], dtype=F64))


# ---- crps_kernel with outcomes of more batch dims than the ensemble --------------------------------------

def test_crps_kernel_broadcasts_outcomes_over_the_ensemble():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, generator=g, dtype=F64)
    w = torch.softmax(torch.randn(2, 6, generator=g, dtype=F64), -1)
    y = torch.randn(3, 1, 2, generator=g, dtype=F64)          # 3-d: batch (3, 1, 2) against the ensemble's (2,)
    got = diagnostics.crps_kernel(x, w, y)
    assert got.shape == (3, 1, 2)
    for i in range(3):
        assert torch.allclose(got[i, 0], diagnostics.crps_kernel(x, w, y[i, 0]), rtol=1e-14, atol=0)
    with pytest.raises(ShapeError, match="y"):
        diagnostics.crps_kernel(x, w, torch.zeros(3, dtype=F64))


# ---- observation_steps refuses non-int steps --------------------------------------------------------------

def test_observation_steps_refuses_a_float_step_count():
    with pytest.raises(InputError, match="steps"):
        twin.observation_steps(5.5, 2)          # gave [2, 4, 6]: step 6 beyond 5.5 steps
    assert twin.observation_steps(5, 2).tolist() == [2, 4]


# ---- bad calls: a daml error naming the argument ---------------------------------------------------------

def _fig():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt
    return plt.figure(figsize=(1, 1))


def _experiment(**change):
    exp = experiment.load_config(experiment.DEFAULT_CONFIG)
    fields = {k: getattr(exp, k) for k in ("name", "steps", "burn_in", "experiments", "seed", "model",
                                            "observations", "prior", "methods")}
    fields.update(change)
    return experiment.Experiment(**fields)


BAD = {
    "rk4_step f=None": (lambda: models.rk4_step(None, _ones(), 0.1), InputError, "f"),
    "rk4_step f=str": (lambda: models.rk4_step("f", _ones(), 0.1), InputError, "f"),
    "rk4_step x=nan": (lambda: models.rk4_step(lambda x: -x, torch.tensor([1.0, math.nan], dtype=F64), 0.1),
                       NonFiniteError, "x"),
    "rk4_step x=inf": (lambda: models.rk4_step(lambda x: -x, torch.tensor([math.inf], dtype=F64), 0.1),
                       NonFiniteError, "x"),
    "rk4_step x=str": (lambda: models.rk4_step(lambda x: -x, "abc", 0.1), DtypeError, "x"),
    "rk4_step x=None": (lambda: models.rk4_step(lambda x: -x, None, 0.1), DtypeError, "x"),
    "rk4_step x=complex": (lambda: models.rk4_step(lambda x: -x, torch.ones(2, dtype=torch.complex128), 0.1),
                           DtypeError, "x"),
    "rk4_step x=empty": (lambda: models.rk4_step(lambda x: -x, torch.ones(0, dtype=F64), 0.1), ShapeError, "x"),
    "rk4_step x=list_str": (lambda: models.rk4_step(lambda x: -x, ["a", "b"], 0.1), DtypeError, "x"),
    "rk4_step dt=nan": (lambda: models.rk4_step(lambda x: -x, _ones(), math.nan), InputError, "dt"),
    "rk4_step dt=str": (lambda: models.rk4_step(lambda x: -x, _ones(), "0.1"), InputError, "dt"),
    "rk4_step dt=complex": (lambda: models.rk4_step(lambda x: -x, _ones(), 1j), InputError, "dt"),
    "propagate x=nan": (lambda: models.propagate(models.Lorenz63(), torch.tensor([1.0, math.nan, 0.0], dtype=F64)),
                        NonFiniteError, "x"),
    "propagate x=list_inf": (lambda: models.propagate(models.Lorenz63(), [1.0, math.inf, 0.0]), NonFiniteError, "x"),
    "tangent_linear model=None": (lambda: models.tangent_linear(None, _ones()), InputError, "model"),
    "tangent_linear model=str": (lambda: models.tangent_linear("lorenz63", _ones()), InputError, "model"),
    "tangent_linear x=nan": (lambda: models.tangent_linear(models.Lorenz63(), torch.tensor([1.0, math.nan, 0.0])),
                             NonFiniteError, "x"),
    "tangent_linear x=empty": (lambda: models.tangent_linear(models.Lorenz63(), torch.ones(0, dtype=F64)),
                               ShapeError, "x"),
    "tangent_linear x=wrong_shape": (lambda: models.tangent_linear(models.Lorenz63(), torch.ones(4, 2)),
                                     ShapeError, "x"),
    "tangent_linear x=scalar": (lambda: models.tangent_linear(models.Lorenz63(), torch.tensor(1.0)), ShapeError, "x"),
    "tangent_linear x=complex": (lambda: models.tangent_linear(models.Lorenz63(), torch.ones(3, dtype=torch.complex128)),
                                 DtypeError, "x"),
    "tangent_linear x=str": (lambda: models.tangent_linear(models.Lorenz63(), np.array(["a", "b", "c"])),
                             DtypeError, "x"),
    "tangent_linear x=None": (lambda: models.tangent_linear(models.Lorenz63(), None), DtypeError, "x"),
    "tangent_linear x=dict": (lambda: models.tangent_linear(models.Lorenz63(), {}), DtypeError, "x"),
    "periodic_covariance n=huge": (lambda: models.periodic_covariance(HUGE, 1.0, 1.0), InputError, "n"),
    "Lorenz96 n=huge": (lambda: models.Lorenz96(n=HUGE), InputError, "n"),
    "make_model n=huge": (lambda: models.make_model("lorenz96", n=HUGE), InputError, "n"),
    "Observation matrix=nan": (lambda: models.Observation(3, torch.eye(2, dtype=F64),
                                                          matrix=torch.tensor([[1.0, math.nan, 0], [0, 1, 0]], dtype=F64)),
                               NonFiniteError, "matrix"),
    "Observation matrix=inf": (lambda: models.Observation(3, torch.eye(2, dtype=F64),
                                                          matrix=torch.tensor([[1.0, math.inf, 0], [0, 1, 0]], dtype=F64)),
                               NonFiniteError, "matrix"),
    "observe_indices indices=scalar": (lambda: models.observe_indices(5, np.float64(2.0)), InputError, "indices"),
    "observe_indices indices=0-d": (lambda: models.observe_indices(5, np.array(2)), InputError, "indices"),
    "observe_indices indices=int": (lambda: models.observe_indices(5, 2), InputError, "indices"),
    "observe_transformed base=None": (lambda: models.observe_transformed(None, "arctan"), InputError, "base"),
    "observe_transformed base=str": (lambda: models.observe_transformed("all", "arctan"), InputError, "base"),
    "observation_steps steps=nan": (lambda: twin.observation_steps(math.nan, 1), InputError, "steps"),
    "observation_steps steps=str": (lambda: twin.observation_steps("3", 1), InputError, "steps"),
    "observation_steps steps=None": (lambda: twin.observation_steps(None, 1), InputError, "steps"),
    "observation_steps steps=huge": (lambda: twin.observation_steps(HUGE, 1), InputError, "steps"),
    "Experiment steps=str": (lambda: experiment.run_experiment(_experiment(steps="3")), InputError, "steps"),
    "Experiment steps=None": (lambda: experiment.run_experiment(_experiment(steps=None)), InputError, "steps"),
    "Experiment experiments=str": (lambda: experiment.run_experiment(_experiment(experiments="2")),
                                   InputError, "experiments"),
    "Experiment experiments=None": (lambda: experiment.run_experiment(_experiment(experiments=None)),
                                    InputError, "experiments"),
    "Experiment model=None": (lambda: experiment.run_experiment(_experiment(model=None)), InputError, "model"),
    "Experiment model=str": (lambda: experiment.run_experiment(_experiment(model="lorenz96")), InputError, "model"),
    "Experiment model={}": (lambda: experiment.run_experiment(_experiment(model={})), InputError, "model.name"),
    "Experiment methods=None": (lambda: experiment.run_experiment(_experiment(methods=None)), InputError, "methods"),
    "Experiment methods=str": (lambda: experiment.run_experiment(_experiment(methods="etkf")), InputError, "methods"),
    "Experiment methods=[int]": (lambda: experiment.run_experiment(_experiment(methods=[3])), InputError, "methods"),
    "run_experiment exp=None": (lambda: experiment.run_experiment(None), InputError, "exp"),
    "run_experiment exp=dict": (lambda: experiment.run_experiment({"methods": []}), InputError, "exp"),
    "check_experiment exp=str": (lambda: experiment.check_experiment("x"), InputError, "exp"),
    "save_figure path=None": (lambda: io.save_figure(_fig(), None), InputError, "path"),
    "save_figure path=int": (lambda: io.save_figure(_fig(), 3), InputError, "path"),
    "save_figure path=dict": (lambda: io.save_figure(_fig(), {}), InputError, "path"),
    "save_figure dpi=0": (lambda: io.save_figure(_fig(), "/nonexistent-dir-daml/f.png", dpi=0), InputError, "dpi"),
    "save_figure dpi=-1": (lambda: io.save_figure(_fig(), "/nonexistent-dir-daml/f.png", dpi=-1), InputError, "dpi"),
    "save_figure dpi=nan": (lambda: io.save_figure(_fig(), "/nonexistent-dir-daml/f.png", dpi=math.nan),
                            InputError, "dpi"),
    "save_figure dpi=str": (lambda: io.save_figure(_fig(), "/nonexistent-dir-daml/f.png", dpi="110"),
                            InputError, "dpi"),
    "save_figure fig=None": (lambda: io.save_figure(None, "/nonexistent-dir-daml/f.png"), InputError, "fig"),
    "check_fits nbytes=str": (lambda: check_fits("n", "x"), InputError, "nbytes"),
    "check_fits nbytes=None": (lambda: check_fits("n", None), InputError, "nbytes"),
    "check_fits nbytes=complex": (lambda: check_fits("n", 1j), InputError, "nbytes"),
    "offspring_counts n_particles=huge": (lambda: resampling.offspring_counts(torch.tensor([0, 1]), HUGE),
                                         InputError, "n_particles"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_calls_are_refused_naming_the_argument(case):
    call, error, argument = BAD[case]
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, DamlError)
    assert argument in str(info.value), str(info.value)


def test_load_config_of_a_missing_file_is_an_input_error_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-config.toml"
    with pytest.raises(InputError, match="no-such-config.toml") as info:
        experiment.load_config(missing)
    assert info.value.argument == "config"
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(InputError, match="no-such-config.toml"):
        experiment.load_config(str(missing))


# ---- the checks do not change correct answers ------------------------------------------------------------

def test_rk4_step_of_good_input_is_unchanged():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    got = models.rk4_step(lambda v: -v, x, 0.1)
    h = 0.1
    factor = 1 - h + h ** 2 / 2 - h ** 3 / 6 + h ** 4 / 24      # RK4 of dx/dt = -x, exactly
    assert torch.allclose(got, factor * x, rtol=1e-15, atol=0)
    assert torch.equal(models.rk4_step(lambda v: -v, torch.tensor([1, -2]), 0.1),
                       models.rk4_step(lambda v: -v, torch.tensor([1.0, -2.0], dtype=F64), 0.1))


def test_tangent_linear_and_propagate_of_good_input():
    m = models.Lorenz63()
    x = m.default_x0(dtype=F64)
    jac = models.tangent_linear(m, x)
    fd = torch.stack([(m.step(x + 1e-6 * e) - m.step(x - 1e-6 * e)) / 2e-6 for e in torch.eye(3, dtype=F64)], -1)
    assert torch.allclose(jac, fd, rtol=1e-6, atol=1e-6)
    assert torch.equal(models.propagate(m, x, 2), m.step(m.step(x)))


def test_save_figure_writes_with_a_float_dpi(tmp_path):
    path = io.save_figure(_fig(), tmp_path / "sub" / "f.png", dpi=50.0)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_offspring_counts_of_a_fitting_size():
    counts = resampling.offspring_counts(torch.tensor([[0, 0, 2], [1, 2, 2]]), 4)
    assert counts.tolist() == [[2, 0, 1, 0], [0, 1, 2, 0]]
