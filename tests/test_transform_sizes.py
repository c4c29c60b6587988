"""``ensemble_transform(..., sizes=)``: ensembles of different sizes padded into one batch give, member
for member, the results of the unpadded ensembles transformed one at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from daml.errors import DtypeError, InputError, NonFiniteError, ShapeError
from daml.transport import ensemble_transform

SIZES = [7, 4, 9, 4, 1]
D = 3


def _problems(seed: int = 0, sizes=SIZES, d: int = D):
    gen = torch.Generator().manual_seed(seed)
    xs, lws = [], []
    for s in sizes:
        xs.append(torch.randn(s, d, generator=gen, dtype=torch.float64))
        lws.append(-0.5 * (xs[-1][:, 0] - 0.7) ** 2 / 0.4 + 0.3 * torch.randn(s, generator=gen, dtype=torch.float64))
    return xs, lws


def _padded(xs, lws, fill: float = 0.0, fill_lw: float = 0.0):
    n = max(x.shape[0] for x in xs)
    x = torch.full((len(xs), n, xs[0].shape[1]), fill, dtype=torch.float64)
    lw = torch.full((len(xs), n), fill_lw, dtype=torch.float64)
    for k, (a, b) in enumerate(zip(xs, lws)):
        x[k, :a.shape[0]] = a
        lw[k, :a.shape[0]] = b
    return x, lw


@pytest.mark.parametrize("solver,second_order", [("sinkhorn", False), ("sinkhorn", True),
                                                 ("emd", False), ("emd", True)])
def test_padded_batch_equals_each_ensemble_alone(solver, second_order):
    xs, lws = _problems()
    x, lw = _padded(xs, lws)
    kw = dict(solver=solver, second_order=second_order, epsilon=0.1, tol=1e-12, max_iter=20000)
    res = ensemble_transform(x, lw, sizes=SIZES, **kw)
    n = x.shape[1]
    for k, s in enumerate(SIZES):
        alone = ensemble_transform(xs[k], lws[k], **kw)
        assert torch.allclose(res.x[k, :s], alone.x, rtol=0, atol=1e-10)
        assert torch.allclose(res.transform[k, :s, :s], alone.transform, rtol=0, atol=1e-10)
        # padded members: zero weight, zero transport, zero new members
        assert float(res.transform[k, s:].abs().sum()) == 0.0
        assert float(res.transform[k, :, s:].abs().sum()) == 0.0
        assert float(res.x[k, s:].abs().sum()) == 0.0
        assert bool(res.converged[k]) == bool(alone.converged)
        if solver == "sinkhorn":
            assert abs(float(res.error[k]) - float(alone.error)) <= 1e-10
        else:
            assert float(res.error[k]) <= 1e-12
        # the new members carry the weighted mean of the real members
        w = torch.softmax(lws[k], 0)
        assert torch.allclose(res.x[k, :s].mean(0), (w[:, None] * xs[k]).sum(0), atol=1e-8)
    assert res.transform.shape == (len(SIZES), n, n)


def test_relative_epsilon_counts_only_the_real_members():
    """Without sizes, the padded zeros lower the mean cost and so the epsilon: the result differs from
    the ensemble alone; with sizes it does not (the same problem, padded with copies of member 0, to
    make the padded cost non-zero too)."""
    xs, lws = _problems(seed=3, sizes=[6, 10])
    x, lw = _padded(xs, lws)
    x[0, 6:] = 5.0 + xs[0][0]                      # padding that would change the mean cost
    kw = dict(epsilon=0.2, tol=1e-12, max_iter=20000)
    alone = ensemble_transform(xs[0], lws[0], **kw)
    res = ensemble_transform(x, lw, sizes=[6, 10], **kw)
    assert torch.allclose(res.x[0, :6], alone.x, rtol=0, atol=1e-10)
    padded_lw = lw.clone()
    padded_lw[0, 6:] = -math.inf
    naive = ensemble_transform(x, padded_lw, **kw)           # the padded cost enters epsilon's scale
    assert float((naive.x[0, :6] - alone.x).abs().max()) > 1e-3


def test_padding_contents_are_ignored_nan_included():
    xs, lws = _problems(seed=5)
    clean = ensemble_transform(*_padded(xs, lws), sizes=SIZES, tol=1e-12, max_iter=20000)
    x, lw = _padded(xs, lws, fill=math.nan, fill_lw=50.0)
    dirty = ensemble_transform(x, lw, sizes=SIZES, tol=1e-12, max_iter=20000)
    assert torch.equal(clean.x, dirty.x)
    assert torch.equal(clean.transform, dirty.transform)
    n = x.shape[1]
    cost = torch.full((len(SIZES), n, n), math.nan, dtype=torch.float64)
    for k, s in enumerate(SIZES):
        cost[k, :s, :s] = torch.cdist(xs[k], xs[k]) ** 2
    with_cost = ensemble_transform(x, lw, sizes=SIZES, cost=cost, tol=1e-12, max_iter=20000)
    assert torch.allclose(with_cost.x, clean.x, rtol=0, atol=1e-10)


def test_full_sizes_equal_no_sizes_and_batch_shapes_are_kept():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 5, 2, generator=gen, dtype=torch.float64)
    lw = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    a = ensemble_transform(x, lw, tol=1e-12, max_iter=20000)
    b = ensemble_transform(x, lw, sizes=np.full((2, 3), 5), tol=1e-12, max_iter=20000)
    assert torch.allclose(a.x, b.x, rtol=0, atol=1e-12)
    sizes = torch.tensor([[5, 2, 3], [1, 4, 5]])
    c = ensemble_transform(x, lw, sizes=sizes, tol=1e-12, max_iter=20000)
    assert c.x.shape == x.shape and c.error.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            s = int(sizes[i, j])
            alone = ensemble_transform(x[i, j, :s], lw[i, j, :s], tol=1e-12, max_iter=20000)
            assert torch.allclose(c.x[i, j, :s], alone.x, rtol=0, atol=1e-10)


def test_gradients_do_not_reach_the_padding():
    xs, lws = _problems(seed=11, sizes=[5, 3])
    x, lw = _padded(xs, lws)
    x.requires_grad_(True)
    lw.requires_grad_(True)
    out = ensemble_transform(x, lw, sizes=[5, 3], tol=1e-12, max_iter=20000)
    (out.x ** 2).sum().backward()
    assert float(x.grad[1, 3:].abs().sum()) == 0.0
    assert float(lw.grad[1, 3:].abs().sum()) == 0.0
    xa = xs[1].clone().requires_grad_(True)
    alone = ensemble_transform(xa, lws[1], tol=1e-12, max_iter=20000)
    (alone.x ** 2).sum().backward()
    assert torch.allclose(x.grad[1, :3], xa.grad, rtol=0, atol=1e-8)


@pytest.mark.parametrize("sizes,error", [
    ([7, 4], ShapeError),                      # one per ensemble of the batch (5)
    ([7, 4, 9, 4, 0], InputError),             # N_i >= 1
    ([7, 4, 10, 4, 1], InputError),            # N_i <= N = 9
    ([7.0, 4.0, 9.0, 4.0, 1.0], DtypeError),   # integers
    ("7", DtypeError),
    ([[7], [4, 9]], ShapeError),               # ragged
    ([True, True, True, True, True], DtypeError),
])
def test_bad_sizes_are_refused_naming_sizes(sizes, error):
    x, lw = _padded(*_problems())
    with pytest.raises(error, match="sizes"):
        ensemble_transform(x, lw, sizes=sizes)


def test_all_real_log_weights_minus_inf_is_refused_and_real_nan_members_too():
    xs, lws = _problems()
    x, lw = _padded(xs, lws)
    lw[1, :4] = -math.inf                          # its padding holds finite values: still refused
    with pytest.raises(InputError, match="log_weight"):
        ensemble_transform(x, lw, sizes=SIZES)
    x, lw = _padded(xs, lws)
    x[1, 0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="x"):
        ensemble_transform(x, lw, sizes=SIZES)
