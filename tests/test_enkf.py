"""Ensemble Kalman filters: stochastic EnKF, ETKF and LETKF (daml.filters.enkf, daml.filters.letkf).

Tested by exact equivalences (one ETKF analysis is the Kalman update of the ensemble's own moments;
an unlocalised LETKF is the ETKF; masked entries equal a restricted operator; a batch equals its
members), by the large-ensemble limit against the Kalman filter (Monte Carlo tolerances stated in
each test, fixed seeds) and by short Lorenz-96 runs with smoke-level error bounds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import daml
from daml.errors import InputError, ShapeError
from daml.filters import EnsembleState, enkf, etkf, gaspari_cohn, inflate, kalman_filter, letkf, make_filter, run
from daml.filters.enkf import _perturbations
from daml.models import LinearModel, Lorenz96, observe_all, observe_indices, observe_linear, observe_nonlinear

F64 = torch.float64


def _state(x: torch.Tensor) -> EnsembleState:
    return EnsembleState(x, torch.full(x.shape[:-1], -math.log(x.shape[-2]), dtype=x.dtype))


def _spd(m: int, gen: torch.Generator, diagonal: bool = False) -> torch.Tensor:
    if diagonal:
        return torch.diag(0.5 + torch.rand(m, generator=gen, dtype=F64))
    a = torch.randn(m, m, generator=gen, dtype=F64)
    return a @ a.T / m + 0.5 * torch.eye(m, dtype=F64)


def _kalman(x: torch.Tensor, h: torch.Tensor, r: torch.Tensor, y: torch.Tensor):
    """The exact Kalman update of the sample mean and sample covariance (ddof 1) of ``x`` (N, n)."""
    mean = x.mean(0)
    p = torch.cov(x.T)
    s = h @ p @ h.T + r
    k = torch.linalg.solve(s, h @ p).T
    return mean + k @ (y - h @ mean), p - k @ h @ p


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- 1. one ETKF analysis is the exact Kalman update --------------------------------------------------

@pytest.mark.parametrize("members", [4, 12])      # ensemble space (N <= m) and observation space (N > m)
@pytest.mark.parametrize("rotate", [False, True])
def test_etkf_analysis_is_kalman_update_of_sample_moments(members, rotate):
    g = _gen(1)
    n, m = 7, 5
    x = torch.randn(members, n, generator=g, dtype=F64) * 2.0 + 1.0
    h = torch.randn(m, n, generator=g, dtype=F64)
    r = _spd(m, g)                                            # full (correlated) R
    y = torch.randn(m, generator=g, dtype=F64)
    op = observe_linear(h, cov=r)
    mask = torch.ones(m, dtype=torch.bool)
    filt = etkf(members, rotate=rotate)
    xa, info = filt.analysis(_state(x), y, op, mask, _gen(5))
    mean_kf, cov_kf = _kalman(x, h, r, y)
    torch.testing.assert_close(xa.x.mean(0), mean_kf, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cov(xa.x.T), cov_kf, rtol=0, atol=1e-10)
    torch.testing.assert_close(info["spread"], torch.cov(xa.x.T).diagonal().mean().sqrt(), rtol=0, atol=1e-12)
    assert torch.equal(xa.log_weight, _state(x).log_weight)
    if rotate:  # the rotation keeps the moments but moves the members
        plain, _ = etkf(members).analysis(_state(x), y, op, mask, _gen(5))
        assert (plain.x - xa.x).abs().max() > 1e-3
        again, _ = filt.analysis(_state(x), y, op, mask, _gen(5))
        assert torch.equal(again.x, xa.x)                 # same generator state, same rotation


def test_etkf_nonlinear_operator_mean_is_ensemble_gain_update():
    """With h applied to each member the mean moves by K (y - mean h(x)), K = A^T Y (Y^T Y + (N-1) R)^-1."""
    g = _gen(2)
    n, m, members = 4, 3, 9
    x = torch.randn(members, n, generator=g, dtype=F64)
    op = observe_nonlinear(lambda z: torch.stack([z[..., 0] ** 2, torch.sin(z[..., 1]), z[..., 2] * z[..., 3]], -1),
                           n, m, cov=_spd(m, g))
    y = torch.randn(m, generator=g, dtype=F64)
    xa, _ = etkf(members).analysis(_state(x), y, op, torch.ones(m, dtype=torch.bool), _gen(0))
    a = x - x.mean(0)
    hx = op.apply(x)
    yy = hx - hx.mean(0)
    k = torch.linalg.solve(yy.T @ yy + (members - 1) * op.noise_cov, yy.T @ a).T
    torch.testing.assert_close(xa.x.mean(0), x.mean(0) + k @ (y - hx.mean(0)), rtol=0, atol=1e-10)


# -- 2. an unlocalised LETKF is the ETKF ---------------------------------------------------------------

@pytest.mark.parametrize("radius", [1e6, math.inf])
def test_letkf_without_localisation_equals_etkf(radius):
    g = _gen(3)
    n, members = 12, 6
    idx = [0, 2, 3, 5, 8, 9, 11]
    r = torch.rand(len(idx), generator=g, dtype=F64) + 0.5    # diagonal, unequal variances
    op = observe_indices(n, idx, cov=r)
    x = torch.randn(members, n, generator=g, dtype=F64)
    y = torch.randn(len(idx), generator=g, dtype=F64)
    mask = torch.ones(len(idx), dtype=torch.bool)
    ref, _ = etkf(members).analysis(_state(x), y, op, mask, _gen(0))
    out, info = letkf(members, radius).analysis(_state(x), y, op, mask, _gen(0))   # periodic ring of 12
    torch.testing.assert_close(out.x, ref.x, rtol=0, atol=1e-10)
    assert info["spread"].shape == ()
    # the same with the rotation: one shared rotation, the same draw as ETKF's
    ref, _ = etkf(members, rotate=True).analysis(_state(x), y, op, mask, _gen(9))
    out, _ = letkf(members, radius, rotate=True).analysis(_state(x), y, op, mask, _gen(9))
    torch.testing.assert_close(out.x, ref.x, rtol=0, atol=1e-10)


# -- 3. localisation and the Gaspari-Cohn taper ---------------------------------------------------------

def _gc_by_hand(d: float, support: float) -> float:
    """Gaspari & Cohn (1999) eq. 4.10 written out term by term, c = support / 2."""
    c = support / 2.0
    r = abs(d) / c
    if r <= 1.0:
        return -0.25 * r**5 + 0.5 * r**4 + 0.625 * r**3 - (5.0 / 3.0) * r**2 + 1.0
    if r <= 2.0:
        return r**5 / 12.0 - 0.5 * r**4 + 0.625 * r**3 + (5.0 / 3.0) * r**2 - 5.0 * r + 4.0 - 2.0 / (3.0 * r)
    return 0.0


def test_gaspari_cohn_values():
    support = 7.0
    d = torch.tensor([0.0, 0.5, 1.75, 3.0, 3.5, 4.2, 5.9, 6.999, 7.0, 8.0, 100.0, -2.0], dtype=F64)
    out = gaspari_cohn(d, support)
    expected = torch.tensor([_gc_by_hand(float(v), support) for v in d], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    assert out[0] == 1.0 and out[8] == 0.0 and out[9] == 0.0 and out[10] == 0.0
    # two values worked out exactly: z = 1 (d = c) gives 5/24; z = 1/2 gives 1 - 5/12 + 5/64 + 1/32 - 1/128
    torch.testing.assert_close(gaspari_cohn(torch.tensor([3.5], dtype=F64), support),
                               torch.tensor([5.0 / 24.0], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(gaspari_cohn(torch.tensor([1.75], dtype=F64), support),
                               torch.tensor([1 - 5 / 12 + 5 / 64 + 1 / 32 - 1 / 128], dtype=F64), rtol=0, atol=1e-15)
    # continuous (and monotone) across the joins at c and 2c
    eps = 1e-7
    joins = torch.tensor([3.5 - eps, 3.5 + eps, 7.0 - eps], dtype=F64)
    vals = gaspari_cohn(joins, support)
    assert abs(float(vals[0] - vals[1])) < 1e-6 and 0.0 <= float(vals[2]) < 1e-12
    grid = gaspari_cohn(torch.linspace(0, 8, 801, dtype=F64), support)
    assert (grid.diff() <= 1e-15).all() and (grid >= 0).all()
    assert gaspari_cohn(3.0, math.inf).item() == 1.0
    with pytest.raises(InputError, match="support"):
        gaspari_cohn(d, 0.0)


def test_letkf_ignores_observations_beyond_the_support():
    g = _gen(4)
    n, members, radius = 40, 8, 2.0                 # taper zero beyond 3.64 * radius = 7.28 grid points
    op = observe_all(n, sd=1.0)
    x = torch.randn(members, n, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    mask = torch.ones(n, dtype=torch.bool)
    filt = letkf(members, radius)
    base, _ = filt.analysis(_state(x), y, op, mask, _gen(0))
    y2 = y.clone()
    y2[0] += 5.0                                     # observation of variable 0 (on the ring)
    moved, _ = filt.analysis(_state(x), y2, op, mask, _gen(0))
    dist = torch.minimum(torch.arange(n), n - torch.arange(n))
    far = dist > 3.64 * radius
    assert torch.equal(moved.x[:, far], base.x[:, far])          # exactly unaffected
    assert (moved.x[:, dist <= 3] - base.x[:, dist <= 3]).abs().amax(0).min() > 1e-6
    # the ring wraps: variable 39 is 1 grid point from observation 0 and moves; without periodicity
    # (explicit positions, domain None) it is 39 points away and does not
    assert (moved.x[:, 39] - base.x[:, 39]).abs().max() > 1e-6
    line = letkf(members, radius, positions=list(range(n)))
    b2, _ = line.analysis(_state(x), y, op, mask, _gen(0))
    m2, _ = line.analysis(_state(x), y2, op, mask, _gen(0))
    assert torch.equal(m2.x[:, 39], b2.x[:, 39])
    line_inf = letkf(members, radius, domain=math.inf)
    b3, _ = line_inf.analysis(_state(x), y, op, mask, _gen(0))
    torch.testing.assert_close(b3.x, b2.x, rtol=0, atol=1e-14)


# -- 4. the large-ensemble limit: the Kalman filter ----------------------------------------------------

def test_enkf_and_etkf_approach_the_kalman_filter():
    """N = 20000 members, 5 analysis cycles of a noisy 4-variable linear model with 2 observations.

    The ensemble mean must lie within 5 Monte Carlo standard errors (ensemble sd / sqrt(N), a
    false-alarm rate below 1e-5 per entry for a Gaussian error; the EnKF's perturbed observations add
    noise of the same order, covered by that margin) of the Kalman mean at every analysis time, and the
    ensemble variances within 5 % of the Kalman variances (their relative sd is about sqrt(2/N) = 1 %).
    """
    mat = torch.tensor([[0.9, 0.2, 0.0, 0.0], [-0.2, 0.9, 0.1, 0.0], [0.0, 0.0, 0.95, 0.3],
                        [0.1, 0.0, -0.3, 0.8]], dtype=F64)
    model = LinearModel(mat, dt=1.0, noise_cov=0.2)
    op = observe_indices(4, [0, 2], cov=torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=F64))
    data = daml.simulate(model, 5, op, x0=[1.0, -1.0, 0.5, 2.0], x0_cov=1.5, seed=11)
    kf = run(kalman_filter(), model, data, seed=0).analysis
    daml.validate(kf)
    w = np.exp(kf.log_weight)
    kf_mean = (kf.x * w).sum("member")
    kf_var = (((kf.x - kf_mean) ** 2) * w).sum("member")
    members = 20000
    for filt in (enkf(members), etkf(members)):
        post = run(filt, model, data, seed=3).analysis
        daml.validate(post)
        mean = post.x.mean("member")
        var = post.x.var("member", ddof=1)
        se = np.sqrt(var / members)
        assert (np.abs(mean - kf_mean) < 5 * se).all(), (filt.name, float((np.abs(mean - kf_mean) / se).max()))
        assert (np.abs(var / kf_var - 1) < 0.05).all(), (filt.name, float(np.abs(var / kf_var - 1).max()))


# -- 5. the stochastic EnKF ------------------------------------------------------------------------------

def test_enkf_perturbations_are_centred():
    r = _spd(5, _gen(6))
    e = _perturbations(r, (3, 50, 5), _gen(7))
    assert e.shape == (3, 50, 5)
    assert e.mean(-2).abs().max() < 1e-14
    cov = torch.einsum("bki,bkj->ij", e, e) / (3 * 49)     # about R (loose: 147 draws)
    assert (cov - r).abs().max() < 0.5


@pytest.mark.parametrize("members", [4, 30])      # ensemble space (N <= m) and observation space (N > m)
@pytest.mark.parametrize("linear", [True, False])
def test_enkf_analysis_is_ensemble_gain_update(members, linear):
    """Mean: x_bar + K (y - mean h(x)); members: x_i + K (y + e_i - h(x_i)), with the ensemble gain
    K = A^T Y (Y^T Y + (N-1) R)^-1 and the perturbations e_i replayed from the same generator state."""
    g = _gen(8)
    n, m = 6, 5
    x = torch.randn(members, n, generator=g, dtype=F64)
    r = _spd(m, g)
    if linear:
        op = observe_linear(torch.randn(m, n, generator=g, dtype=F64), cov=r)
    else:
        op = observe_nonlinear(lambda z: torch.tanh(z[..., :5]) + 0.1 * z[..., 1:] ** 2, n, m, cov=r)
    y = torch.randn(m, generator=g, dtype=F64)
    gen = _gen(21)
    xa, info = enkf(members).analysis(_state(x), y, op, torch.ones(m, dtype=torch.bool), gen)
    hx = op.apply(x)
    a, yy = x - x.mean(0), hx - hx.mean(0)
    k = torch.linalg.solve(yy.T @ yy + (members - 1) * r, yy.T @ a).T
    torch.testing.assert_close(xa.x.mean(0), x.mean(0) + k @ (y - hx.mean(0)), rtol=0, atol=1e-10)
    e = _perturbations(r, (members, m), _gen(21))
    torch.testing.assert_close(xa.x, x + (y + e - hx) @ k.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(info["spread"], xa.x.var(0).mean().sqrt(), rtol=0, atol=1e-12)


# -- 6. missing entries ------------------------------------------------------------------------------------

def _masked_problem(seed: int, diagonal: bool):
    g = _gen(seed)
    n, members = 10, 6
    idx = [0, 1, 3, 4, 6, 7, 9]
    m = len(idx)
    r = _spd(m, g, diagonal=diagonal)
    op = observe_indices(n, idx, cov=r)
    x = torch.randn(members, n, generator=g, dtype=F64)
    y = torch.randn(m, generator=g, dtype=F64)
    mask = torch.ones(m, dtype=torch.bool)
    mask[[2, 5]] = False
    keep = mask.nonzero().squeeze(-1)
    restricted = observe_indices(n, [idx[int(i)] for i in keep], cov=r[keep][:, keep])
    y_nan = torch.where(mask, y, torch.tensor(float("nan"), dtype=F64))
    return x, y_nan, op, mask, restricted, y[keep]


@pytest.mark.parametrize("name", ["etkf", "letkf"])
def test_missing_entries_equal_the_restricted_operator(name):
    diagonal = name == "letkf"
    x, y, op, mask, restricted, y_obs = _masked_problem(12, diagonal)
    filt = etkf(6) if name == "etkf" else letkf(6, 2.0)
    out, _ = filt.analysis(_state(x), y, op, mask, _gen(0))
    ref, _ = filt.analysis(_state(x), y_obs, restricted, torch.ones(len(y_obs), dtype=torch.bool), _gen(0))
    torch.testing.assert_close(out.x, ref.x, rtol=0, atol=1e-10)
    assert torch.isfinite(out.x).all()


def test_enkf_missing_entries_have_no_influence():
    x, y, op, mask, _, _ = _masked_problem(13, diagonal=False)
    y0 = torch.where(mask, y, 0.0)
    y1 = torch.where(mask, y, 1e6)
    a0, _ = enkf(6).analysis(_state(x), y0, op, mask, _gen(4))
    a1, _ = enkf(6).analysis(_state(x), y1, op, mask, _gen(4))
    an, _ = enkf(6).analysis(_state(x), y, op, mask, _gen(4))          # NaN where unobserved
    assert torch.equal(a0.x, a1.x) and torch.equal(a0.x, an.x)
    none, _ = enkf(6).analysis(_state(x), y0, op, torch.zeros_like(mask), _gen(4))
    assert torch.equal(none.x, x)                                       # nothing observed, nothing moves


# -- 7. batching --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("filt", [etkf(5), etkf(16), letkf(5, 3.0)], ids=["etkf-ens", "etkf-obs", "letkf"])
def test_batch_equals_each_alone(filt):
    g = _gen(14)
    n, members = 10, filt.config["members"]
    op = observe_indices(n, [0, 2, 4, 5, 7, 9], cov=torch.rand(6, generator=g, dtype=F64) + 0.5)
    x = torch.randn(3, members, n, generator=g, dtype=F64)
    y = torch.randn(3, 6, generator=g, dtype=F64)
    mask = torch.rand(3, 6, generator=g) > 0.3
    out, info = filt.analysis(_state(x), y, op, mask, _gen(0))
    assert out.x.shape == x.shape and info["spread"].shape == (3,)
    for b in range(3):
        alone, info_b = filt.analysis(_state(x[b]), y[b], op, mask[b], _gen(0))
        torch.testing.assert_close(out.x[b], alone.x, rtol=0, atol=1e-12)
        torch.testing.assert_close(info["spread"][b], info_b["spread"], rtol=0, atol=1e-12)


def test_enkf_batch_shapes():
    g = _gen(15)
    op = observe_all(5, sd=0.5)
    x = torch.randn(2, 3, 8, 5, generator=g, dtype=F64)
    out, info = enkf(8).analysis(_state(x), torch.zeros(2, 3, 5, dtype=F64), op,
                                 torch.ones(2, 3, 5, dtype=torch.bool), _gen(0))
    assert out.x.shape == x.shape and info["spread"].shape == (2, 3) and torch.isfinite(out.x).all()


# -- 8. Lorenz-96 smoke runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def l96_data():
    model = Lorenz96(40, 8.0, 0.05)
    x0 = daml.models.propagate(model, model.default_x0(), steps=500)
    data = daml.simulate(model, 300, observe_all(40, sd=1.0), x0=x0, x0_cov=1.0, seed=2024)
    return model, data


@pytest.mark.parametrize("filt, bound", [
    (inflate(etkf(24), 1.02), 0.35),
    (make_filter("letkf", members=10, radius=4, inflation=1.04), 0.4),
    (inflate(enkf(40), 1.06), 0.4),
], ids=["etkf24", "letkf10", "enkf40"])
def test_lorenz96_short_run(l96_data, filt, bound):
    """Time-averaged analysis RMSE after 100 of 300 cycles: DAPPER gets 0.18-0.22 for these settings
    (Sakov & Oke 2008 configuration), the bounds here are smoke-level."""
    model, data = l96_data
    result = run(filt, model, data, seed=7)
    post = result.analysis
    daml.validate(post)
    assert post.sizes["time"] == 300 and "spread" in post
    err = daml.diagnostics.rmse(post, data.truth)
    score = float(err.isel(time=slice(100, None)).mean())
    assert score < bound, score
    assert float(post.spread.isel(time=slice(100, None)).mean()) < 2 * bound


# -- 9. bad input -----------------------------------------------------------------------------------------------

def test_bad_input():
    for ctor in (enkf, etkf):
        with pytest.raises(InputError, match="members"):
            ctor(1)
    with pytest.raises(InputError, match="members"):
        letkf(1, 4.0)
    for bad in (0.0, -1.0, float("nan"), "4"):
        with pytest.raises(InputError, match="radius"):
            letkf(10, bad)
    with pytest.raises(InputError, match="rotate"):
        etkf(10, rotate=1)
    with pytest.raises(InputError, match="domain"):
        letkf(10, 4.0, domain=-3)
    with pytest.raises(InputError, match="positions"):
        letkf(10, 4.0, positions=[0.0, float("nan")])
    x = torch.randn(10, 6, dtype=F64)
    full_r = observe_all(6, cov=_spd(6, _gen(16)))
    with pytest.raises(InputError, match="operator") as err:
        letkf(10, 4.0).analysis(_state(x), torch.zeros(6, dtype=F64), full_r, torch.ones(6, dtype=torch.bool), _gen(0))
    assert "uncorrelated" in str(err.value)
    op = observe_all(6, sd=1.0)
    with pytest.raises(ShapeError, match="positions"):
        letkf(10, 4.0, positions=[0, 1, 2]).analysis(_state(x), torch.zeros(6, dtype=F64), op,
                                                     torch.ones(6, dtype=torch.bool), _gen(0))
    mixing = observe_linear(torch.ones(2, 6, dtype=F64), sd=1.0)
    with pytest.raises(InputError, match="positions"):
        letkf(10, 4.0).analysis(_state(x), torch.zeros(2, dtype=F64), mixing, torch.ones(2, dtype=torch.bool), _gen(0))
    # explicit positions make any diagonal-R operator usable
    out, _ = letkf(10, 4.0, positions=[1.0, 4.0]).analysis(_state(x), torch.zeros(2, dtype=F64), mixing,
                                                           torch.ones(2, dtype=torch.bool), _gen(0))
    assert torch.isfinite(out.x).all()


def test_registry_and_config():
    filt = make_filter("letkf", members=7, radius=4, rotate=True, inflation=1.04)
    assert filt.name == "letkf" and filt.config == {"members": 7, "radius": 4.0, "positions": None, "domain": None,
                                                    "rotate": True, "inflation": 1.04}
    assert make_filter("etkf", members=24).config == {"members": 24, "rotate": False}
    assert make_filter("enkf", members=40).config == {"members": 40}
