"""Windowed local analyses (:mod:`daml.filters.local`) against the dense LETKF and LETPF.

Oracles: the analysis functions of :func:`daml.filters.letkf` and :func:`daml.filters.letpf` (dense
tapers over the whole ring), the closed form of the halo, and the windowed results themselves (blocked
or cut differently, bit for bit).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from daml import models
from daml.errors import ConvergenceWarning, InputError, NonFiniteError, ShapeError
from daml.filters import EnsembleState, letkf, letpf
from daml.filters.letkf import HALF_WIDTH_PER_RADIUS, gaspari_cohn
from daml.filters.local import halo, letkf_local, letkf_window, letpf_local, letpf_window

F64 = torch.float64


def _ensemble(n, members, *, batch=(), seed=0, dtype=F64):
    """Lorenz-96-like forecast ensembles: a truth with the model's climatological mean and spread
    (about 2.3 and 3.6) and members around it with errors correlated over a few grid points."""
    g = torch.Generator().manual_seed(seed)
    truth = 2.3 + 3.6 * torch.randn(*batch, 1, n, generator=g, dtype=F64)
    white = torch.randn(*batch, members, n, generator=g, dtype=F64)
    smooth = (white + torch.roll(white, 1, -1) + torch.roll(white, -1, -1) + torch.roll(white, 2, -1)) / 2.0
    return (truth + smooth).to(dtype), truth.squeeze(-2), g


def _problem(n, members, every, *, batch=(), missing=0.0, seed=0):
    """A forecast ensemble, a selection operator with a diagonal R (one variance per observation),
    observations with a mask, and the same observations on the grid (NaN where unobserved)."""
    x, truth, g = _ensemble(n, members, batch=batch, seed=seed)
    idx = torch.arange(0, n, every)
    r = 0.5 + torch.rand(idx.numel(), generator=g, dtype=F64)                      # diagonal R
    op = models.observe_every(n, every, cov=r)
    y = truth[..., idx] + r.sqrt() * torch.randn(*batch, idx.numel(), generator=g, dtype=F64)
    mask = torch.rand(*batch, idx.numel(), generator=g) >= missing
    y_grid = torch.full((*batch, n), math.nan, dtype=F64)
    y_grid[..., idx] = torch.where(mask, y, math.nan)
    precision = torch.zeros(*batch, n, dtype=F64)
    precision[..., idx] = mask.to(F64) / r
    return x, op, y, mask, y_grid, precision


def _dense(filt, x, op, y, mask):
    """One analysis of a dense filter from equal weights."""
    n_mem = x.shape[-2]
    state = EnsembleState(x, torch.full(x.shape[:-1], -math.log(n_mem), dtype=x.dtype))
    new, _ = filt.analysis(state, y, op, mask, torch.Generator().manual_seed(0))
    return new.x


# -- the halo ----------------------------------------------------------------------------------------------

def test_halo_is_the_last_point_the_taper_reaches():
    assert (halo(1.0), halo(2.0), halo(4.0), halo(0.1)) == (3, 7, 14, 0)
    for radius in [0.2, 0.5, 1.0, 1.5, 2.5, 3.3, 4.0, 7.3, 15 / 3.64, 14 / 3.64, 10.0]:
        h = halo(radius)
        support = 2 * HALF_WIDTH_PER_RADIUS * radius
        taper = gaspari_cohn(torch.tensor([float(h), h + 1.0], dtype=F64), support)
        assert taper[0] > 0 and taper[1] == 0, radius


def test_halo_refuses_a_global_or_bad_radius():
    for bad in (math.inf, 0.0, -1.0, True, "2", math.nan):
        with pytest.raises(InputError) as err:
            halo(bad)
        assert err.value.argument == "radius"


# -- 1. LETKF against the dense filter ------------------------------------------------------------------

@pytest.mark.parametrize("n", [40, 97])
@pytest.mark.parametrize("members", [8, 20])
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_letkf_local_equals_the_dense_letkf(n, members, every, missing):
    radius = 1.0 if every == 1 else 3.0                      # halos 3 and 10: both analysis routes
    x, op, y, mask, y_grid, precision = _problem(n, members, every, batch=(2,), missing=missing, seed=n + members)
    expected = _dense(letkf(members, radius), x, op, y, mask)
    got = letkf_local(x, y_grid, precision, radius)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, x, atol=1e-3)             # the analysis did move the ensemble


@pytest.mark.parametrize("radius", [6.0, 50.0, math.inf])
def test_letkf_local_when_the_taper_reaches_around_the_ring(radius):
    # 2 * halo + 1 > n: each point reads every point of the ring once, at its periodic distance,
    # as the dense filter does (radius = inf: the ETKF)
    x, op, y, mask, y_grid, precision = _problem(40, 20, 1, missing=0.2, seed=3)
    expected = _dense(letkf(20, radius), x, op, y, mask)
    torch.testing.assert_close(letkf_local(x, y_grid, precision, radius), expected, rtol=1e-10, atol=1e-12)


def test_letkf_local_float32_follows_float64():
    x, _, _, _, y_grid, precision = _problem(40, 8, 1, missing=0.2, seed=5)
    ref = letkf_local(x, y_grid, precision, 2.0)
    got = letkf_local(x.float(), y_grid.float(), precision.float(), 2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


# -- 2. LETPF against the dense filter ------------------------------------------------------------------

@pytest.mark.parametrize("n,members,every", [(40, 8, 1), (40, 20, 2), (97, 8, 2)])
def test_letpf_local_equals_the_dense_letpf_exactly_with_emd(n, members, every):
    x, op, y, mask, y_grid, precision = _problem(n, members, every, missing=0.2, seed=7 + n)
    expected = _dense(letpf(members, 2.0, solver="emd", rejuvenation=0.0), x, op, y, mask)
    got = letpf_local(x, y_grid, precision, 2.0, solver="emd")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, x, atol=1e-3)


def test_letpf_local_equals_the_dense_letpf_with_sinkhorn():
    members, tol = 20, 1e-6
    x, op, y, mask, y_grid, precision = _problem(40, members, 1, batch=(2,), missing=0.2, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)             # every problem converged
        got = letpf_local(x, y_grid, precision, 2.0, tol=tol, max_iter=20_000)
    expected = _dense(letpf(members, 2.0, rejuvenation=0.0, tol=tol, max_iter=20_000), x, op, y, mask)
    # both plans meet the marginals to tol (L1); a new member is a convex combination of N members
    bound = members * tol * float(x.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=bound)
    # observed: the same iterations on both sides, rounding apart (about 1e-13)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_letpf_local_when_the_taper_reaches_around_the_ring():
    x, op, y, mask, y_grid, precision = _problem(24, 8, 1, missing=0.2, seed=13)
    expected = _dense(letpf(8, math.inf, solver="emd", rejuvenation=0.0), x, op, y, mask)
    torch.testing.assert_close(letpf_local(x, y_grid, precision, math.inf, solver="emd"), expected,
                               rtol=1e-10, atol=1e-10)


def test_letpf_local_warns_about_unconverged_problems():
    x, _, _, _, y_grid, precision = _problem(20, 8, 1, seed=17)
    with pytest.warns(ConvergenceWarning, match="did not reach"):
        letpf_local(x, y_grid, precision, 1.0, tol=1e-14, max_iter=2)


# -- 3. blocking invariance, bit for bit ----------------------------------------------------------------

@pytest.mark.parametrize("members", [8, 9, 21])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_letkf_local_blocks_are_bitwise_equal(members, dtype):
    # odd N and odd 2h+1 are the cases where MKL's eigensolver would round differently by position
    n = 37
    x, _, _, _, y_grid, precision = _problem(n, members, 2, batch=(2,), missing=0.2, seed=members)
    x, y_grid, precision = x.to(dtype), y_grid.to(dtype), precision.to(dtype)
    for radius in (1.0, 2.5):
        ref = letkf_local(x, y_grid, precision, radius, block=n)
        for block in (1, 2, 7, None):
            assert torch.equal(letkf_local(x, y_grid, precision, radius, block=block), ref), (radius, block)
        # each batch element alone: also the same bits
        assert torch.equal(letkf_local(x[1], y_grid[1], precision[1], radius, block=5), ref[1])


def test_letpf_local_blocks_bitwise_with_emd_and_to_rounding_with_sinkhorn():
    n, members = 23, 9
    x, _, _, _, y_grid, precision = _problem(n, members, 1, batch=(2,), missing=0.3, seed=19)
    ref = letpf_local(x, y_grid, precision, 1.5, solver="emd", block=n)
    for block in (1, 7):
        assert torch.equal(letpf_local(x, y_grid, precision, 1.5, solver="emd", block=block), ref)
    # the batched Sinkhorn's over-relaxation switches every problem of a batch to the relaxed update
    # once one of them is relaxed: not bitwise, the same to rounding here
    ref = letpf_local(x, y_grid, precision, 1.5, block=n)
    for block in (1, 7):
        torch.testing.assert_close(letpf_local(x, y_grid, precision, 1.5, block=block), ref, rtol=0, atol=1e-10)


# -- 4. a window with its halo equals the matching slice of the ring -------------------------------------

def _padded(t, h):
    return torch.cat([t[..., -h:], t, t[..., :h]], dim=-1)


@pytest.mark.parametrize("members", [8, 13])
def test_letkf_window_equals_the_slice_of_the_ring_bitwise(members):
    n, radius = 60, 2.0
    h = halo(radius)
    x, _, _, _, y_grid, precision = _problem(n, members, 1, batch=(2,), missing=0.2, seed=23)
    ring = letkf_local(x, y_grid, precision, radius)
    xp, yp, pp = _padded(x, h), _padded(y_grid, h), _padded(precision, h)
    for start, width in [(0, 1), (5, 9), (17, 20), (n - 12, 12), (0, n)]:
        cut = slice(start, start + width + 2 * h)                  # interior start .. start + width - 1
        got = letkf_window(xp[..., cut], yp[..., cut], pp[..., cut], radius, h, block=4)
        assert torch.equal(got, ring[..., start:start + width]), (start, width)
    # a wider margin than the halo: the same interior, the same bits
    wide = _padded(x, h + 3), _padded(y_grid, h + 3), _padded(precision, h + 3)
    got = letkf_window(*(t[..., 10:10 + 8 + 2 * (h + 3)] for t in wide), radius, h + 3)
    assert torch.equal(got, ring[..., 10:18])


def test_letpf_window_equals_the_slice_of_the_ring_bitwise():
    n, radius = 30, 1.0
    h = halo(radius)
    x, _, _, _, y_grid, precision = _problem(n, 8, 1, missing=0.2, seed=29)
    ring = letpf_local(x, y_grid, precision, radius, solver="emd")
    xp, yp, pp = _padded(x, h), _padded(y_grid, h), _padded(precision, h)
    cut = slice(4, 4 + 10 + 2 * h)
    got = letpf_window(xp[..., cut], yp[..., cut], pp[..., cut], radius, h, solver="emd", block=3)
    assert torch.equal(got, ring[..., 4:14])


def test_a_window_is_not_periodic():
    # the same window data with the far ends changed beyond the halo of the interior: same interior
    x, _, _, _, y_grid, precision = _problem(30, 8, 1, seed=31)
    h = halo(1.0)
    got = letkf_window(x, torch.nan_to_num(y_grid), precision, 1.0, h + 5)
    x2 = x.clone()
    x2[..., :5] += 10.0
    x2[..., -5:] -= 10.0
    assert torch.equal(letkf_window(x2, torch.nan_to_num(y_grid), precision, 1.0, h + 5), got)


# -- 5. bad input ------------------------------------------------------------------------------------------

def test_unobserved_values_are_ignored_whatever_they_hold():
    x, _, _, _, y_grid, precision = _problem(40, 8, 2, missing=0.3, seed=37)
    filled = torch.where(precision > 0, y_grid, 1e6)
    assert torch.equal(letkf_local(x, y_grid, precision, 2.0), letkf_local(x, filled, precision, 2.0))
    assert torch.equal(letpf_local(x, y_grid, precision, 2.0, solver="emd"),
                       letpf_local(x, filled, precision, 2.0, solver="emd"))


def test_precision_broadcasts_over_the_batch():
    x, _, _, _, _, _ = _problem(30, 8, 1, batch=(3,), seed=41)
    y = torch.linspace(-1.0, 1.0, 30, dtype=F64)
    p = torch.full((30,), 2.0, dtype=F64)
    got = letkf_local(x, y, p, 1.0)
    assert torch.equal(got, letkf_local(x, y.expand(3, 30), p.expand(3, 30), 1.0))


@pytest.mark.parametrize("func", [letkf_local, letpf_local])
def test_bad_inputs_raise_named_errors(func):
    x, _, _, _, y_grid, precision = _problem(20, 8, 1, seed=43)
    y = torch.nan_to_num(y_grid)

    def raises(kind, name, *args, **kwargs):
        with pytest.raises(kind) as err:
            func(*args, **kwargs)
        assert err.value.argument == name

    raises(ShapeError, "x", x[:1], y, precision, 1.0)                     # one member
    raises(ShapeError, "x", x[0], y, precision, 1.0)                      # no member axis
    raises(ShapeError, "y", x, y[:-1], precision, 1.0)
    raises(ShapeError, "precision", x, y, precision.expand(2, 20), 1.0)   # batch that x does not have
    raises(NonFiniteError, "x", x.index_put((torch.tensor([0]), torch.tensor([3])), torch.tensor(math.nan, dtype=F64)),
           y, precision, 1.0)
    raises(NonFiniteError, "y", x, torch.full_like(y, math.nan), precision, 1.0)
    raises(NonFiniteError, "precision", x, y, precision.index_fill(0, torch.tensor([2]), math.inf), 1.0)
    raises(InputError, "precision", x, y, precision.index_fill(0, torch.tensor([2]), -1.0), 1.0)
    raises(InputError, "radius", x, y, precision, 0.0)
    raises(InputError, "radius", x, y, precision, -2.0)
    raises(InputError, "block", x, y, precision, 1.0, block=0)
    raises(InputError, "block", x, y, precision, 1.0, block=2.5)
    if func is letpf_local:
        raises(InputError, "solver", x, y, precision, 1.0, solver="exact")
        raises(InputError, "epsilon", x, y, precision, 1.0, epsilon=-1.0)


@pytest.mark.parametrize("func", [letkf_window, letpf_window])
def test_bad_windows_raise_named_errors(func):
    x, _, _, _, y_grid, precision = _problem(20, 8, 1, seed=47)
    y = torch.nan_to_num(y_grid)
    h = halo(2.0)                                                            # 7: w = 20 >= 15

    def raises(kind, name, *args, **kwargs):
        with pytest.raises(kind) as err:
            func(*args, **kwargs)
        assert err.value.argument == name

    raises(InputError, "halo", x, y, precision, 2.0, h - 1)                  # the taper reaches further
    raises(InputError, "halo", x, y, precision, 2.0, 7.0)
    raises(InputError, "radius", x, y, precision, math.inf, h)               # a global analysis has no halo
    raises(ShapeError, "x", x, y, precision, 2.0, 10)                        # 20 < 2 * 10 + 1
    assert func(x, y, precision, 2.0, h).shape == (8, 20 - 2 * h)
    assert func(x[..., :15], y[:15], precision[:15], 2.0, h).shape == (8, 1)
