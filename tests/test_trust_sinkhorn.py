"""Trust tests of daml.transport.sinkhorn (issue 26): exact gradients with a relative epsilon,
batches of problems of different sizes, and named errors for bad input.

Gradients are checked with ``torch.autograd.gradcheck`` (central finite differences against the
analytic Jacobian of every output) on small float64 problems solved to an L1 marginal error of
1e-13, so that the solver's own stopping error (about 1e-13 / 1e-6 in a difference quotient) stays
far below the tolerances.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from daml.errors import ConvergenceWarning, DtypeError, InputError, NonFiniteError, PaddingWarning, ShapeError
from daml.transport import ensemble_transform, second_order_correction, sinkhorn, softmin

F64 = torch.float64
SOLVE = dict(tol=1e-13, max_iter=100000)
GRADCHECK = dict(eps=1e-6, atol=1e-7, rtol=1e-6)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sq(x, y):
    """Squared distances ``|x_i - y_j|^2`` (differentiable, no square roots)."""
    return ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)


def _outputs(res, z):
    """Every differentiable output: potentials, both values, the plan and the plan applied to ``z``."""
    return res.f, res.g, res.value, res.value_linear, res.plan(), res.apply(z)


# -- 1. exact gradients, relative epsilon or not -----------------------------------------------------------

@pytest.mark.parametrize("relative", [False, True])
def test_every_output_passes_gradcheck_wrt_points_weights_and_epsilon(relative):
    """Regression: with ``relative=True`` the effective epsilon (a fraction of the mean cost) was
    treated as a constant in the backward pass, and every output was 2-12 % off finite differences."""
    gen = _gen(3)
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    y = torch.randn(4, 2, generator=gen, dtype=F64) + 0.3
    logits_a = 0.5 * torch.randn(5, generator=gen, dtype=F64)
    log_b = torch.log_softmax(0.5 * torch.randn(4, generator=gen, dtype=F64), 0)
    eps = torch.tensor(0.4 if relative else 1.5, dtype=F64)     # about the same absolute size
    z = torch.randn(4, 3, generator=gen, dtype=F64)

    def fn(x, y, logits_a, log_b, eps):
        res = sinkhorn(_sq(x, y), a=torch.softmax(logits_a, 0), log_b=log_b, epsilon=eps, relative=relative,
                       **SOLVE)
        assert bool(res.converged)
        return _outputs(res, z)

    inputs = tuple(t.clone().requires_grad_() for t in (x, y, logits_a, log_b, eps))
    assert gradcheck(fn, inputs, **GRADCHECK)


@pytest.mark.parametrize("relative", [False, True])
def test_every_output_passes_gradcheck_wrt_a_batch_of_cost_matrices(relative):
    gen = _gen(4)
    x = torch.randn(2, 4, 2, generator=gen, dtype=F64)
    y = torch.randn(2, 3, 2, generator=gen, dtype=F64)
    cost = _sq(x, y) + 0.1                      # entries well above the finite-difference step
    a = torch.softmax(torch.randn(2, 4, generator=gen, dtype=F64), -1)
    z = torch.randn(2, 3, generator=gen, dtype=F64)

    def fn(c):
        return _outputs(sinkhorn(c, a, epsilon=0.5 if relative else 1.5, relative=relative, **SOLVE), z)

    assert gradcheck(fn, (cost.requires_grad_(),), **GRADCHECK)


def test_value_gradient_with_relative_epsilon_has_the_closed_form():
    """An independent oracle: with ``eps = r mean(C)``, the envelope theorem gives
    ``d value / d C_ij = P_ij + KL(P | a x b) * r / (n m)`` (``d value / d eps`` is the KL term)."""
    gen = _gen(5)
    n, m, r = 6, 5, 0.3
    c = _sq(torch.randn(n, 2, generator=gen, dtype=F64), torch.randn(m, 2, generator=gen, dtype=F64))
    a = torch.softmax(torch.randn(n, generator=gen, dtype=F64), 0)
    b = torch.softmax(torch.randn(m, generator=gen, dtype=F64), 0)
    ct = c.clone().requires_grad_()
    res = sinkhorn(ct, a, b, epsilon=r, relative=True, **SOLVE)
    grad, = torch.autograd.grad(res.value, ct)
    p = res.plan().detach()
    kl = (p * torch.log(p / (a[:, None] * b[None, :]))).sum()
    assert torch.allclose(grad, p + kl * r / (n * m), atol=1e-11, rtol=0)


def test_ensemble_transform_gradient_is_exact():
    """ensemble_transform reads epsilon relative to the mean squared distance: its gradient w.r.t. the
    members and the log-weights must include that dependence."""
    gen = _gen(6)
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    lw = 0.5 * torch.randn(5, generator=gen, dtype=F64)

    def fn(x, lw):
        return ensemble_transform(x, lw, epsilon=0.3, tol=1e-13, max_iter=100000, relaxation=1.0).x

    assert gradcheck(fn, (x.requires_grad_(), lw.requires_grad_()), **GRADCHECK)


# -- 2. batches of problems of different sizes -------------------------------------------------------------

SHAPES = [(5, 4), (3, 6), (7, 7), (1, 2)]


def _padded_problems(seed, shapes=SHAPES):
    """Points, masses and weights of the problems of the given shapes, and the same zero-padded to
    the largest (7 x 7 for SHAPES)."""
    gen = _gen(seed)
    n_max, m_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    probs = []
    x_pad = torch.zeros(len(shapes), n_max, 2, dtype=F64)
    y_pad = torch.zeros(len(shapes), m_max, 2, dtype=F64)
    a_pad = torch.zeros(len(shapes), n_max, dtype=F64)
    lb_pad = torch.full((len(shapes), m_max), -torch.inf, dtype=F64)
    w_pad = torch.zeros(len(shapes), n_max, m_max, dtype=F64)
    for k, (n, m) in enumerate(shapes):
        x = torch.randn(n, 2, generator=gen, dtype=F64)
        y = torch.randn(m, 2, generator=gen, dtype=F64) + 0.5
        a = torch.softmax(torch.randn(n, generator=gen, dtype=F64), 0)
        lb = torch.log_softmax(torch.randn(m, generator=gen, dtype=F64), 0)
        w = torch.randn(n, m, generator=gen, dtype=F64)
        probs.append((x, y, a, lb, w))
        x_pad[k, :n], y_pad[k, :m], a_pad[k, :n], lb_pad[k, :m], w_pad[k, :n, :m] = x, y, a, lb, w
    return probs, (x_pad, y_pad, a_pad, lb_pad, w_pad)


def _loss(res, w):
    """A scalar that every output enters, each with its own weight."""
    return (res.value + 0.7 * res.value_linear + (res.plan() * w).sum((-2, -1))
            + (res.f ** 2).sum(-1) + 0.3 * (res.g ** 2).sum(-1)).sum()


@pytest.mark.parametrize("masses", ["given", "uniform"])
@pytest.mark.parametrize("relative", [False, True])
def test_padded_batch_with_sizes_equals_each_problem_alone(relative, masses):
    probs, (x_pad, y_pad, a_pad, lb_pad, w_pad) = _padded_problems(7)
    kw = dict(epsilon=0.3 if relative else 1.0, relative=relative, **SOLVE)
    # padding may hold anything: it is ignored (garbage masses, NaN costs)
    a_garbage = torch.where(a_pad > 0, a_pad, 0.25)
    xg, yg = x_pad.clone().requires_grad_(), y_pad.clone().requires_grad_()
    cost = _sq(xg, yg)
    sizes = torch.tensor(SHAPES)
    inside = (torch.arange(7)[:, None] < sizes[:, None, :1]) & (torch.arange(7)[None, :] < sizes[:, None, 1:2])
    cost = torch.where(inside, cost, torch.nan)
    if masses == "given":
        res = sinkhorn(cost, a_garbage, log_b=lb_pad, sizes=sizes, **kw)
    else:
        res = sinkhorn(cost, sizes=sizes.numpy(), **kw)
    gx, gy = torch.autograd.grad(_loss(res, w_pad), (xg, yg))
    assert bool(res.converged.all())
    for k, ((n, m), (x, y, a, lb, w)) in enumerate(zip(SHAPES, probs)):
        xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
        alone = (sinkhorn(_sq(xa, ya), a, log_b=lb, **kw) if masses == "given"
                 else sinkhorn(_sq(xa, ya), **kw))
        ga_x, ga_y = torch.autograd.grad(_loss(alone, w), (xa, ya))
        assert torch.allclose(res.epsilon[k], alone.epsilon, rtol=1e-14, atol=0)
        for got, want in ((res.f[k, :n], alone.f), (res.g[k, :m], alone.g), (res.value[k], alone.value),
                          (res.value_linear[k], alone.value_linear), (res.plan()[k, :n, :m], alone.plan()),
                          (gx[k, :n], ga_x), (gy[k, :m], ga_y)):
            assert torch.allclose(got, want, atol=1e-11, rtol=1e-11)
        # padding: zero potentials, zero plan rows/columns, zero gradients
        assert bool((res.f[k, n:] == 0).all() & (res.g[k, m:] == 0).all())
        plan = res.plan()[k]
        assert bool((plan[n:] == 0).all() & (plan[:, m:] == 0).all())
        assert bool((gx[k, n:] == 0).all() & (gy[k, m:] == 0).all())


@pytest.mark.parametrize("relative", [False, True])
def test_padded_batch_passes_gradcheck_with_sizes(relative):
    shapes = [(3, 2), (2, 4)]
    _, (x_pad, y_pad, a_pad, lb_pad, _) = _padded_problems(8, shapes)
    z = torch.randn(2, 4, 2, generator=_gen(9), dtype=F64)

    def fn(x, y, lb):
        res = sinkhorn(_sq(x, y), a_pad, log_b=lb, epsilon=0.4 if relative else 1.5, relative=relative,
                       sizes=shapes, **SOLVE)
        return _outputs(res, z)

    inputs = tuple(t.clone().requires_grad_() for t in (x_pad, y_pad, lb_pad))
    assert gradcheck(fn, inputs, **GRADCHECK)


@pytest.mark.parametrize("relative", [False, True])
def test_zero_padding_without_sizes_is_a_different_problem_and_warns(relative):
    """The pitfall that ``sizes`` removes: padding with zeros changes a relative epsilon (the mean
    cost counts the zeros) and, with default masses, puts mass on the padding. It is not silent."""
    probs, (x_pad, y_pad, *_) = _padded_problems(10)
    cost = _sq(x_pad, y_pad)
    sizes = torch.tensor(SHAPES)
    inside = (torch.arange(7)[:, None] < sizes[:, None, :1]) & (torch.arange(7)[None, :] < sizes[:, None, 1:2])
    cost = torch.where(inside, cost, 0.0)
    with pytest.warns(PaddingWarning, match="pass sizes="):
        naive = sinkhorn(cost, epsilon=0.3, relative=relative, tol=1e-10, max_iter=100000)
    right = sinkhorn(cost, epsilon=0.3, relative=relative, sizes=sizes, tol=1e-10, max_iter=100000)
    n, m = SHAPES[0]
    assert not torch.allclose(naive.plan()[0, :n, :m], right.plan()[0, :n, :m], atol=1e-3)
    # with sizes, or with a batch that is not padded, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn(cost, epsilon=0.3, relative=relative, sizes=sizes, tol=1e-6)
        sinkhorn(cost[:, :3, :2] + 1.0, epsilon=0.3, relative=relative, tol=1e-6)


def test_sizes_of_the_full_shape_change_nothing():
    c = _sq(torch.randn(3, 6, 2, generator=_gen(11), dtype=F64), torch.randn(3, 5, 2, generator=_gen(12), dtype=F64))
    plain = sinkhorn(c, epsilon=0.2, relative=True, tol=1e-12, max_iter=100000)
    sized = sinkhorn(c, epsilon=0.2, relative=True, tol=1e-12, max_iter=100000, sizes=[[6, 5]] * 3)
    for name in ("f", "g", "value", "value_linear", "epsilon", "iterations"):
        assert torch.allclose(getattr(plain, name), getattr(sized, name), atol=1e-14, rtol=1e-14), name


def test_bad_sizes_raise_named_errors():
    c = torch.ones(2, 4, 3, dtype=F64)
    for bad, err in (([[4, 3]], ShapeError), ([4, 3], ShapeError), ([[4, 3], [5, 3]], InputError),
                     ([[4, 3], [0, 3]], InputError), ([[4, 3], [4, 4]], InputError),
                     ([[4.0, 3.0], [2.0, 2.0]], DtypeError), ("4x3", DtypeError),
                     ([[True, True], [True, True]], DtypeError), ([[4, 3], [2]], ShapeError)):
        with pytest.raises(err, match="sizes"):
            sinkhorn(c, sizes=bad)
    with pytest.raises(InputError, match="a: expected masses summing to one.*sizes"):
        sinkhorn(c, a=torch.full((2, 4), 0.25, dtype=F64), sizes=[[4, 3], [2, 3]])


# -- 3. bad input: a daml error naming the argument, never torch's, never a silent NaN ------------------------

def _small():
    rng = np.random.default_rng(0)
    c = rng.random((4, 3))
    return c, np.full(4, 0.25), np.full(3, 1 / 3)


def _members():
    return np.random.default_rng(1).normal(size=(5, 2)), np.zeros(5)


NAN = float("nan")
_C, _A, _B = _small()
_X, _LW = _members()
_T = torch.full((5, 5), 0.2, dtype=F64)
_LW5 = torch.full((5,), -np.log(5.0), dtype=F64)
_H = np.log(np.full(3, 1 / 3))

BAD = [
    # sinkhorn: cost
    (lambda: sinkhorn("abc"), DtypeError, "cost"),
    (lambda: sinkhorn(None), DtypeError, "cost"),
    (lambda: sinkhorn([["a", "b"], ["c", "d"]]), DtypeError, "cost"),
    (lambda: sinkhorn([[1.0, 2.0], [3.0]]), ShapeError, "cost"),
    (lambda: sinkhorn(_C.astype(complex)), DtypeError, "cost"),
    (lambda: sinkhorn(_C > 0.5), DtypeError, "cost"),
    (lambda: sinkhorn(torch.tensor(_C, dtype=torch.float16)), DtypeError, "cost"),
    (lambda: sinkhorn(torch.tensor(_C, dtype=torch.bfloat16)), DtypeError, "cost"),
    (lambda: sinkhorn(np.zeros((0, 3))), ShapeError, "cost"),
    (lambda: sinkhorn(np.zeros((0, 3, 3))), ShapeError, "cost"),
    (lambda: sinkhorn(np.full((3, 3), NAN)), NonFiniteError, "cost"),
    (lambda: sinkhorn(torch.zeros(1, 1, dtype=F64).expand(10**6, 10**6)), InputError, "cost.*fit in memory"),
    # masses
    (lambda: sinkhorn(_C, [NAN, 0.5, 0.25, 0.25], _B), NonFiniteError, "a"),
    (lambda: sinkhorn(_C, _A, [np.inf, 0.0, 0.0]), NonFiniteError, "b"),
    (lambda: sinkhorn(_C, [-0.25, 0.75, 0.25, 0.25], _B), InputError, "a: expected non-negative"),
    (lambda: sinkhorn(_C, np.zeros(4), _B), InputError, "a: expected masses summing to one"),
    (lambda: sinkhorn(_C, _A, _B * 0.5), InputError, "b: expected masses summing to one"),
    (lambda: sinkhorn(_C, "abcd", _B), DtypeError, "a"),
    (lambda: sinkhorn(_C, _A.astype(complex), _B), DtypeError, "a"),
    (lambda: sinkhorn(_C, log_a=np.full(4, -np.inf)), InputError, "log_a"),
    (lambda: sinkhorn(_C, log_b=np.full(3, NAN)), NonFiniteError, "log_b"),
    # epsilon and parameters
    (lambda: sinkhorn(_C, epsilon="0.1"), DtypeError, "epsilon"),
    (lambda: sinkhorn(_C, epsilon=None), DtypeError, "epsilon"),
    (lambda: sinkhorn(_C, epsilon=NAN), InputError, "epsilon"),
    (lambda: sinkhorn(_C, epsilon=-0.1), InputError, "epsilon"),
    (lambda: sinkhorn(_C, epsilon=True), DtypeError, "epsilon"),
    (lambda: sinkhorn(_C, epsilon=[0.1, 0.2]), ShapeError, "epsilon"),
    (lambda: sinkhorn(_C, tol=NAN), InputError, "tol"),
    (lambda: sinkhorn(_C, warn="no"), InputError, "warn"),
    (lambda: sinkhorn(_C, relaxation=np.array([1.2, 1.3])), InputError, "relaxation"),
    # SinkhornResult.apply
    (lambda: sinkhorn(_C).apply(np.full(3, NAN)), NonFiniteError, "x"),
    (lambda: sinkhorn(_C).apply("abc"), DtypeError, "x"),
    (lambda: sinkhorn(_C).apply(np.ones(4), transpose="yes"), InputError, "transpose"),
    # softmin
    (lambda: softmin(_C, _H, 0.0, -1), InputError, "epsilon"),
    (lambda: softmin(_C, _H, NAN, -1), InputError, "epsilon"),
    (lambda: softmin(_C, _H, 0.1, 0), InputError, "dim"),
    (lambda: softmin(_C, np.zeros(4), 0.1, -1), ShapeError, "h"),
    (lambda: softmin(_C, np.full(3, NAN), 0.1, -1), NonFiniteError, "h"),
    (lambda: softmin(_C, np.full(3, -np.inf), 0.1, -1), InputError, "h"),
    (lambda: softmin(np.full((4, 3), NAN), _H, 0.1, -1), NonFiniteError, "cost"),
    # ensemble_transform
    (lambda: ensemble_transform(np.full((5, 2), NAN), _LW), NonFiniteError, "x"),
    (lambda: ensemble_transform(np.full((5, 2), NAN), _LW, solver="emd"), NonFiniteError, "x"),
    (lambda: ensemble_transform(_X * 1e200, _LW), NonFiniteError, "x"),
    (lambda: ensemble_transform("abc", _LW), DtypeError, "x"),
    (lambda: ensemble_transform(np.ones(5), _LW), ShapeError, "x"),
    (lambda: ensemble_transform(np.zeros((0, 2)), np.zeros(0)), ShapeError, "x"),
    (lambda: ensemble_transform(np.ones((5, 0)), _LW), ShapeError, "x"),
    (lambda: ensemble_transform(torch.tensor(_X, dtype=torch.float16), _LW), DtypeError, "x"),
    (lambda: ensemble_transform(_X, "abcde"), DtypeError, "log_weight"),
    (lambda: ensemble_transform(_X, _LW, second_order="yes"), InputError, "second_order"),
    (lambda: ensemble_transform(_X, _LW, cost=-np.ones((5, 5))), InputError, "cost"),
    (lambda: ensemble_transform(_X, _LW, cost=-np.ones((5, 5)), solver="emd"), InputError, "cost"),
    (lambda: ensemble_transform(_X, _LW, cost=np.full((5, 5), NAN), solver="emd"), NonFiniteError, "cost"),
    (lambda: ensemble_transform(_X, _LW, cost="abc"), DtypeError, "cost"),
    # second_order_correction
    (lambda: second_order_correction(_T, torch.full((5,), -np.inf, dtype=F64)), InputError, "log_weight"),
    (lambda: second_order_correction(torch.full((5, 5), NAN, dtype=F64), _LW5), NonFiniteError, "transform"),
    (lambda: second_order_correction(_T, torch.full((5,), NAN, dtype=F64)), NonFiniteError, "log_weight"),
    (lambda: second_order_correction(_T[:, :4], _LW5), ShapeError, "transform"),
    (lambda: second_order_correction(_T, _LW5[:4]), ShapeError, "log_weight"),
    (lambda: second_order_correction("abc", "def"), DtypeError, "transform"),
    (lambda: second_order_correction(torch.zeros(0, 0, dtype=F64), torch.zeros(0, dtype=F64)), ShapeError,
     "transform"),
]


@pytest.mark.parametrize("call,error,match", BAD, ids=range(len(BAD)))
def test_bad_input_gives_a_named_daml_error(call, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.raises(error, match=match):
            call()


def test_softmin_takes_any_batch_shape_and_matches_logsumexp():
    """Regression: a single (n, m) problem came back as (1, n)."""
    from scipy.special import logsumexp
    c, _, b = _small()
    h = np.log(b) + np.array([0.3, -0.2, 0.1])
    got = softmin(c, h, 0.1, -1)
    assert got.shape == (4,)
    assert np.allclose(got.numpy(), -0.1 * logsumexp(h[None] - c / 0.1, axis=1), atol=1e-14)
    cc = np.stack([c, 2 * c])
    eps = np.array([0.1, 0.3])
    got = softmin(cc, np.log(np.full(4, 0.25)), eps, -2)
    assert got.shape == (2, 3)
    for k in range(2):
        want = -eps[k] * logsumexp(np.log(0.25) - cc[k] / eps[k], axis=0)
        assert np.allclose(got[k].numpy(), want, atol=1e-14)


def test_iteration_limits_beyond_int64_are_accepted():
    c, a, b = _small()
    res = sinkhorn(c, a, b, epsilon=0.5, tol=1e-10, max_iter=10**30)
    assert bool(res.converged) and torch.isfinite(res.f).all()


def test_a_user_cost_for_the_ensemble_transform_must_be_non_negative():
    """Regression: a negative cost had a non-positive mean, was taken for a constant one and gave the
    product plan (every member moved to the weighted mean) without a word."""
    x, _ = _members()
    lw = np.linspace(-1, 1, 5)
    c = ((x[:, None] - x[None]) ** 2).sum(-1)
    good = ensemble_transform(x, lw, cost=c, tol=1e-10)
    assert not torch.allclose(good.x, good.x.mean(0).expand(5, 2))
    with pytest.raises(InputError, match="cost: expected non-negative"):
        ensemble_transform(x, lw, cost=c - c.max())


def test_second_order_correction_normalises_the_log_weights():
    """Regression: unnormalised log-weights (documented as normalised) were used as they were and gave
    a transform that matched neither the weighted mean nor the covariance, without a word."""
    x, _ = _members()
    x = torch.tensor(x)
    lw = torch.linspace(-1.0, 1.0, 5, dtype=F64)
    t = ensemble_transform(x, lw, solver="emd").transform
    corrected = second_order_correction(t, lw + 3.0)
    assert torch.allclose(corrected, second_order_correction(t, torch.log_softmax(lw, 0)), atol=1e-13)
    w = torch.softmax(lw, 0)
    new = corrected.T @ x
    mean = (w[:, None] * x).sum(0)
    cov = ((x - mean).T * w) @ (x - mean)
    assert torch.allclose(new.mean(0), mean, atol=1e-12)
    assert torch.allclose((new - mean).T @ (new - mean) / 5, cov, atol=1e-12)


def test_ensemble_transform_never_warns_of_padding():
    """The ensemble transform builds its own unpadded batches: a cost whose last row is zero in one
    problem of the batch (members that coincide, or distances lost to cancellation in a collapsed
    ensemble) is not padding, and must not warn that it is (seen in the Lorenz-63 ETPF golden run)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    lw = torch.log_softmax(torch.randn(3, 6, generator=g, dtype=torch.float64), -1)
    c = torch.cdist(x, x) ** 2
    c[1, -1, :] = 0.0
    c[1, :, -1] = 0.0
    with pytest.warns(PaddingWarning):          # the plain solver does warn on this batch
        sinkhorn(c, log_a=lw, epsilon=0.05, relative=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PaddingWarning)
        res = ensemble_transform(x, lw, cost=c)
    assert torch.isfinite(res.transform).all()
