"""Ensemble transforms by optimal transport: the core of the ensemble transform particle filter.

Reich (2013) replaces the random resampling of a particle filter by a deterministic, optimal
coupling. Given members ``x_1..x_N`` with normalised importance weights ``w_i``, find the plan ``P``
between the weighted ensemble (row masses ``w``) and the equally weighted one (column masses ``1/N``)
that minimises the expected squared distance ``sum_ij P_ij |x_i - x_j|^2``; the new members are

.. math::

    \\tilde x_j = N \\sum_i P_{ij}\\, x_i = \\sum_i T_{ij}\\, x_i, \\qquad T = N P,

convex combinations of the old ones whose equally weighted mean is exactly the weighted mean
``sum_i w_i x_i``. With the exact plan (``solver="emd"``, POT's network simplex) this is Reich's
ETPF; with an entropic plan (``solver="sinkhorn"``, :func:`daml.transport.sinkhorn`) the map is
smooth in the weights and the members, batched over any number of problems and differentiable, at
the price of an extra contraction that grows with ``epsilon``.

Both transforms shrink the spread: the covariance of the new members is smaller than the weighted
covariance ``sum_i w_i (x_i - m)(x_i - m)^T``. ``second_order=True`` adds a correction ``D`` to ``T``
so that the new ensemble has the weighted mean *and* the weighted covariance exactly (the goal of
Acevedo, de Wiljes & Reich 2017). The construction here is daml's own: with ``Pi = I - 11^T/N``,
``S = T Pi`` and ``W = diag(w) - w w^T``, every ``T + D`` with ``D 1 = 0``, ``1^T D = 0`` and
``(S + D)(S + D)^T = N W`` reproduces both moments for any ensemble; among them we take the one
closest to ``T`` in the Frobenius norm, an orthogonal Procrustes problem solved in the
``(N-1)``-dimensional complement of ``1``: ``S + D = (N W)^{1/2} U`` with ``U`` the orthogonal polar
factor of ``(N W)^{1/2} S``. The paper instead solves an algebraic Riccati equation for a symmetric
correction; both give second-order accuracy, and the cost is one ``N x N`` eigen- and singular-value
decomposition per problem. The corrected ``T`` can have negative entries (the new members are then
affine, not convex, combinations).

References
----------
* S. Reich (2013), A nonparametric ensemble transform method for Bayesian inference. SIAM J. Sci.
  Comput. 35, A2013-A2024.
* W. Acevedo, J. de Wiljes and S. Reich (2017), Second-order accurate ensemble transform particle
  filters. SIAM J. Sci. Comput. 39, A1834-A1850.
* S. Reich and C. Cotter (2015), Probabilistic Forecasting and Bayesian Data Assimilation. CUP.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import ot
import torch

from ..errors import DtypeError, InputError, NonFiniteError, ShapeError, check_int, check_real
from .sinkhorn import _integer_sizes, _tensor, sinkhorn

__all__ = ["ensemble_transform", "TransformResult", "second_order_correction", "SOLVERS"]

SOLVERS = ("sinkhorn", "emd")


class TransformResult(NamedTuple):
    """What :func:`ensemble_transform` returns, for a batch ``(...)`` of ensembles of ``N`` members."""

    x: torch.Tensor
    """The transformed, equally weighted members ``(..., N, d)``."""
    transform: torch.Tensor
    """``T`` ``(..., N, N)`` with ``x_new[j] = sum_i T[i, j] x[i]``."""
    error: torch.Tensor
    """L1 marginal error of the plan ``(...)`` (0 up to rounding for ``"emd"``)."""
    iterations: torch.Tensor
    """Sinkhorn iterations per problem ``(...)`` (0 for ``"emd"``)."""
    converged: torch.Tensor
    """Whether the plan met ``tol`` ``(...)``."""


def check_solver(solver: Any) -> str:
    """Validate the transport solver name."""
    if solver not in SOLVERS:
        raise InputError("solver", f"one of {SOLVERS}", repr(solver))
    return solver


def check_transport_params(epsilon: Any, tol: Any, max_iter: Any) -> tuple[float, float, int]:
    """Validate the Sinkhorn parameters shared by the ETPF constructors."""
    eps = check_real(epsilon, "epsilon", positive=True,
                     expected="a positive regularisation (a fraction of the mean squared distance)")
    tol = check_real(tol, "tol", positive=True, expected="a positive L1 marginal tolerance")
    return eps, tol, check_int(max_iter, "max_iter", 1)


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """``|x_i - x_j|^2`` between the members of each ensemble: ``(..., N, d) -> (..., N, N)`` (exactly 0
    on the diagonal, never negative)."""
    sq = (x * x).sum(-1)
    c = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (x @ x.transpose(-1, -2))
    c = c.clamp_min(0.0)
    return c * (1.0 - torch.eye(x.shape[-2], dtype=x.dtype, device=x.device))


def exact_plans(cost: torch.Tensor, log_a: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Exact optimal plans from masses ``exp(log_a)`` to uniform, one POT ``ot.emd`` call per problem.

    ``cost`` ``(B, N, N)``, ``log_a`` ``(B, N)``; returns ``(B, N, N)`` in the dtype and on the device of
    ``cost`` (POT works in float64 on the CPU). With ``sizes`` ``(B,)`` (each problem's own member count
    ``N_i``), problem ``k`` is ``cost[k, :N_i, :N_i]`` with target masses ``1 / N_i``; the rest of its
    plan is zero.
    """
    n = cost.shape[-1]
    c64 = cost.detach().to("cpu", torch.float64)
    l64 = log_a.detach().to("cpu", torch.float64)
    own = [n] * c64.shape[0] if sizes is None else [int(k) for k in sizes.cpu()]
    plans = np.zeros(tuple(c64.shape))
    for k, s in enumerate(own):
        a = torch.softmax(l64[k, :s], -1).numpy()
        plans[k, :s, :s] = ot.emd(a, np.full(s, 1.0 / s), c64[k, :s, :s].numpy())
    return torch.from_numpy(plans).to(dtype=cost.dtype, device=cost.device)


_BASIS: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def _complement_basis(n: int, like: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``(n, n-1)`` of the vectors orthogonal to ``1``."""
    key = (n, like.dtype, str(like.device))
    if key not in _BASIS:
        m = torch.eye(n, dtype=torch.float64)
        m[:, 0] = 1.0
        q, _ = torch.linalg.qr(m)
        _BASIS[key] = q[:, 1:].to(dtype=like.dtype, device=like.device)
    return _BASIS[key]


def second_order_correction(transform: torch.Tensor, log_weight: torch.Tensor) -> torch.Tensor:
    """The transform closest to ``transform`` that reproduces the weighted mean and covariance.

    Parameters
    ----------
    transform : (..., N, N)
        ``T`` with columns summing to one and rows summing to ``N w``.
    log_weight : (..., N)
        Log-weights ``log w`` (normalised here: unnormalised ones give the result of their
        normalisation; ``-inf`` for zero weight).

    Returns
    -------
    torch.Tensor
        ``T + D`` ``(..., N, N)`` (see the module docstring).

    Raises
    ------
    ShapeError, DtypeError, NonFiniteError, InputError
        Naming ``transform`` (not square, empty, not real floating, not finite) or ``log_weight``
        (wrong shape, NaN or ``+inf``, all ``-inf``).
    """
    t = _tensor(transform, "transform", "a transform (tensor or array-like of shape (..., N, N))")
    if t.ndim < 2 or t.shape[-1] != t.shape[-2] or t.shape[-1] == 0 or t.numel() == 0:
        raise ShapeError("transform", "a square transform of shape (..., N, N) with N >= 1", f"shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise DtypeError("transform", "float32 or float64 values", f"dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError("transform", "finite entries", "NaN or infinite entries")
    lw = _tensor(log_weight, "log_weight", "log-weights (tensor or array-like of shape (..., N))", dtype=t.dtype,
                 device=t.device)
    if lw.ndim == 0 or lw.shape[-1] != t.shape[-1]:
        raise ShapeError("log_weight", f"shape (..., {t.shape[-1]}) (one per member)", f"shape {tuple(lw.shape)}")
    if bool(torch.isnan(lw).any()) or bool((lw == math.inf).any()):
        raise NonFiniteError("log_weight", "log-weights that are finite or -inf", "NaN or +inf entries")
    if not bool(torch.isfinite(lw).any(-1).all()):
        raise InputError("log_weight", "at least one finite log-weight per ensemble", "all -inf")
    return _second_order(t, torch.log_softmax(lw, -1))


def _second_order(transform: torch.Tensor, log_weight: torch.Tensor) -> torch.Tensor:
    """:func:`second_order_correction` on checked tensors."""
    n = transform.shape[-1]
    v = _complement_basis(n, transform)
    w = torch.exp(log_weight)
    cov = torch.diag_embed(w) - w.unsqueeze(-1) * w.unsqueeze(-2)          # W
    a = n * (v.T @ cov @ v)
    a = 0.5 * (a + a.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(a)
    root = (evecs * evals.clamp_min(0.0).sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)
    s = v.T @ transform @ v
    left, _, right = torch.linalg.svd(root @ s)
    target = root @ (left @ right)
    return transform + v @ (target - s) @ v.T


def _second_order_sized(transform: torch.Tensor, log_weight: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """:func:`_second_order` for ``(B, N, N)`` transforms of problems with their own member counts
    ``sizes`` ``(B,)``: each problem's ``N_i x N_i`` block is corrected as the problem alone would be
    (problems of one size in one batched call); the padding stays zero."""
    n = transform.shape[-1]
    out = torch.zeros_like(transform)
    for s in torch.unique(sizes).tolist():
        idx = torch.nonzero(sizes == s).squeeze(-1)
        block = _second_order(transform[idx, :s, :s], log_weight[idx, :s])
        if s < n:
            block = torch.nn.functional.pad(block, (0, n - s, 0, n - s))
        out = out.index_copy(0, idx, block)
    return out


def _check_member_sizes(sizes: Any, batch: tuple[int, ...], n: int, device: torch.device) -> torch.Tensor:
    """Each problem's own member count ``N_i`` ``(B,)`` (int64), checked: integers of the batch's shape,
    ``1 <= N_i <= N``."""
    arr = _integer_sizes(sizes, batch, "integer member counts N_i", "one per ensemble").reshape(-1)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 1 or hi > n:
        raise InputError("sizes", f"member counts with 1 <= N_i <= {n} (the padded member axis of x)",
                         f"N_i between {lo} and {hi}")
    return torch.from_numpy(arr).to(device)


def ensemble_transform(x: Any, log_weight: Any, *, solver: str = "sinkhorn", epsilon: float = 0.05,
                       tol: float = 1e-6, max_iter: int = 2000, relaxation: Any = "auto",
                       second_order: bool = False, cost: Any = None, sizes: Any = None) -> TransformResult:
    """Move a weighted ensemble to an equally weighted one by optimal transport (Reich's ETPF step).

    Parameters
    ----------
    x : (..., N, d)
        Members, batched over any leading dimensions.
    log_weight : (..., N)
        Log importance weights (normalised or not; ``-inf`` for zero weight).
    solver : {"sinkhorn", "emd"}
        Entropic plan from :func:`daml.transport.sinkhorn`, or the exact plan from POT's ``ot.emd``.
    epsilon : float
        Sinkhorn regularisation as a fraction of each problem's mean cost.
    tol, max_iter, relaxation
        Passed to :func:`daml.transport.sinkhorn`.
    second_order : bool
        Correct the transform to reproduce the weighted covariance exactly.
    cost : (..., N, N), optional
        The cost between members; default ``|x_i - x_j|^2``.
    sizes : array-like of int (...), optional
        Each ensemble's own member count ``N_i`` when ensembles of different sizes are padded to
        ``N`` members in one batch: ensemble ``k`` is ``x[k, :N_i]``. The padded members are ignored
        whatever they hold (their ``x``, ``log_weight`` and ``cost`` entries, NaN included): they get
        zero weight, their rows and columns of the transform are zero, and so are their new members.
        The target is uniform over the ``N_i`` real members, ``T = N_i P``, and the relative
        ``epsilon`` is a fraction of the mean cost over the ``N_i^2`` real pairs. Each ensemble's
        result is that of the ensemble transformed alone (to the solver's tolerance).

    Returns
    -------
    TransformResult

    Raises
    ------
    ShapeError, DtypeError, NonFiniteError, InputError
        Naming ``x`` (no member or no coordinate, not real floating, NaN or infinite entries, or
        squared distances that overflow), ``log_weight``, ``cost`` (wrong shape, NaN, infinite or
        negative entries), ``sizes`` (not integers of the batch's shape, or outside ``[1, N]``) or a
        parameter out of range.
    """
    x = _tensor(x, "x", "members (tensor or array-like of shape (..., N, d))")
    if x.ndim < 2 or x.shape[-2] == 0 or x.shape[-1] == 0 or x.numel() == 0:
        raise ShapeError("x", "members of shape (..., N, d) with N, d >= 1", f"shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise DtypeError("x", "float32 or float64 members", f"dtype {x.dtype}")
    n = x.shape[-2]
    batch = x.shape[:-2]
    own = valid = None
    if sizes is not None:
        own = _check_member_sizes(sizes, tuple(batch), n, x.device)             # (B,)
        valid = (torch.arange(n, device=x.device) < own.unsqueeze(-1)).reshape(x.shape[:-1])
        x = torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("x", "finite members", "NaN or infinite entries")
    lw = _tensor(log_weight, "log_weight", "log-weights (tensor or array-like of shape (..., N))", dtype=x.dtype,
                 device=x.device)
    if lw.shape != x.shape[:-1]:
        raise ShapeError("log_weight", f"shape {tuple(x.shape[:-1])} (one per member of x)", f"shape {tuple(lw.shape)}")
    if valid is not None:
        lw = torch.where(valid, lw, torch.full((), -math.inf, dtype=lw.dtype, device=lw.device))
    solver = check_solver(solver)
    epsilon, tol, max_iter = check_transport_params(epsilon, tol, max_iter)
    if not isinstance(second_order, bool):
        raise InputError("second_order", "True or False", repr(second_order))
    if torch.isnan(lw).any() or (lw == math.inf).any() or not bool(torch.isfinite(lw).any(-1).all()):
        raise InputError("log_weight", "log-weights with at least one finite entry per ensemble and no NaN/+inf" +
                         (" (among its own N_i members)" if valid is not None else ""),
                         "NaN, +inf or all -inf entries")
    lw = torch.log_softmax(lw, -1)
    inside = None if valid is None else valid.unsqueeze(-1) & valid.unsqueeze(-2)
    if cost is None:
        c = squared_distances(x)
        if not bool(torch.isfinite(c).all()):
            raise NonFiniteError("x", f"members whose squared distances are finite in {x.dtype}",
                                 "distances that overflow", hint="rescale the members")
    else:
        c = _tensor(cost, "cost", "a cost between members (tensor or array-like of shape (..., N, N))",
                    dtype=x.dtype, device=x.device)
        if c.shape != (*x.shape[:-1], n):
            raise ShapeError("cost", f"shape {(*x.shape[:-1], n)}", f"shape {tuple(c.shape)}")
        if inside is not None:
            c = torch.where(inside, c, torch.zeros((), dtype=c.dtype, device=c.device))
        lo, hi = torch.aminmax(c.detach())
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise NonFiniteError("cost", "finite costs", "NaN or infinite entries")
        if not bool(lo >= 0):
            raise InputError("cost", "non-negative costs", f"a minimum of {float(lo):.3g}",
                             hint="OT plans do not change when a constant is added to the cost; shift it")
    if inside is not None:                           # padding: ignored, whatever it holds
        c = torch.where(inside, c, torch.zeros((), dtype=c.dtype, device=c.device))
    flat_c = c.reshape(-1, n, n)
    flat_lw = lw.reshape(-1, n)
    if solver == "emd":
        plan = exact_plans(flat_c, flat_lw, own)
        if own is None:
            target = torch.full_like(flat_lw, 1.0 / n)
        else:
            target = torch.where(valid.reshape(-1, n), 1.0 / own.to(x.dtype).unsqueeze(-1),
                                 torch.zeros((), dtype=x.dtype, device=x.device))
        err = (plan.sum(-1) - torch.exp(flat_lw)).abs().sum(-1) + (plan.sum(-2) - target).abs().sum(-1)
        iters = torch.zeros(flat_lw.shape[0], dtype=torch.int64, device=x.device)
        conv = torch.ones(flat_lw.shape[0], dtype=torch.bool, device=x.device)
    else:
        # a constant cost (all members equal) has no scale: any plan is optimal, use the product
        if own is None:
            scale = flat_c.mean((-2, -1))
        else:
            scale = flat_c.sum((-2, -1)) / own.to(x.dtype) ** 2
        flat = scale <= 0
        safe_c = torch.where(flat.view(-1, 1, 1), torch.ones_like(flat_c), flat_c)
        pairs = None if own is None else torch.stack([own, own], -1)
        res = sinkhorn(safe_c, log_a=flat_lw, epsilon=epsilon, relative=True, tol=tol, max_iter=max_iter,
                       relaxation=relaxation, warn=False, sizes=pairs)
        plan = res.plan()
        err, iters, conv = res.error, res.iterations, res.converged
    if own is None:
        t = n * plan
        if second_order:
            t = _second_order(t, flat_lw)
    else:
        t = own.to(plan.dtype).view(-1, 1, 1) * plan
        if second_order:
            t = _second_order_sized(t, flat_lw, own)
    x_new = t.transpose(-1, -2) @ x.reshape(-1, n, x.shape[-1])
    return TransformResult(x_new.reshape(x.shape), t.reshape(*batch, n, n), err.reshape(batch),
                           iters.reshape(batch), conv.reshape(batch))
