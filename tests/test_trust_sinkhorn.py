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

from daml.errors import ConvergenceWarning, DtypeError, InputError, NonFiniteError, ShapeError
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
    eps = torch.tensor(0.4 if relative else 0.6, dtype=F64)
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
        return _outputs(sinkhorn(c, a, epsilon=0.5, relative=relative, **SOLVE), z)

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
