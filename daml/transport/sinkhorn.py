"""Entropic optimal transport by the Sinkhorn algorithm, in the log domain, batched in torch.

The problem
-----------
Given a cost matrix ``C`` ``(n, m)``, source masses ``a`` ``(n,)`` and target masses ``b`` ``(m,)`` (both
summing to one) and a regularisation ``epsilon > 0``, find the plan

.. math::

    P^\\star = \\arg\\min_{P 1 = a,\\; P^T 1 = b} \\langle C, P \\rangle
               + \\varepsilon \\operatorname{KL}(P \\,|\\, a \\otimes b).

Its solution has the form ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / epsilon)`` with dual potentials
``f`` and ``g`` (in the units of ``C``). The entropy term relative to ``a ⊗ b`` (as in GeomLoss and
OTT-JAX) has the same minimiser as POT's ``sum P log P``; only the objective's constant differs. As
``epsilon -> 0`` the plan tends to an exact optimal plan; as it grows, to ``a ⊗ b``.

The loop
--------
Sinkhorn's algorithm alternates the two *soft-min* updates

.. math::

    f_i \\leftarrow -\\varepsilon \\log \\sum_j b_j e^{(g_j - C_{ij})/\\varepsilon}, \\qquad
    g_j \\leftarrow -\\varepsilon \\log \\sum_i a_i e^{(f_i - C_{ij})/\\varepsilon},

each of which makes one marginal of the plan exact. Both are one primitive, :func:`softmin`, applied
along the rows or along the columns; the loop is written once over it. Evaluated directly, every
soft-min costs one ``exp`` per matrix entry. Most of that is avoidable: anchored at potentials
``(f0, g0)``, the soft-min of a nearby ``g`` is

.. math::

    f_i = f0_i - \\varepsilon \\log \\sum_j K_{ij}\\, b_j e^{(g_j - g0_j)/\\varepsilon},
    \\qquad K_{ij} = e^{(f0_i + g0_j - C_{ij})/\\varepsilon},

a mat-vec with the kernel at the anchor. This is the *absorption* stabilisation of Schmitzer (2019):
the iterates are the log-domain iterates (the same numbers up to rounding), yet the inner loop runs at
the speed of the exp-domain algorithm. The anchor moves (one exact soft-min pass, which also forms the
kernel again) whenever a potential has moved by more than ``tau * epsilon`` since the last anchor
(``tau`` = 100 in float64, 15 in float32), so no exponential overflows and no product in the loop
is subnormal. In the loop the masses multiply vectors, not the kernel: the kernel is
``K_ij = exp((f0_i + g0_j - C_ij)/epsilon)`` and the plan ``diag(a u) K diag(b v)``. Its entries are
clipped below at ``exp(log(tiny) + tau + 2)``, which changes any plan entry by less than
``a_i b_j exp(-560)`` (float64) or ``a_i b_j exp(-40)`` (float32), and above where only zero or
subnormal masses could reach. Zero masses stay exactly zero; masses below the dtype's smallest normal
number are set to zero.

Stopping and per-problem masks
------------------------------
Any number of problems of the same size are solved together (leading batch dimensions of ``C``).
Every ``check_every`` iterations the L1 marginal error ``||P 1 - a||_1 + ||P^T 1 - b||_1`` of each
problem's current plan is measured; problems whose error is at most ``tol`` are finished and removed
from the batch, so converged problems stop costing work. Problems still above ``tol`` after
``max_iter`` iterations are returned as they are with ``converged = False`` and their error, and a
:class:`~daml.errors.ConvergenceWarning` says how many there were.

Problems of different sizes share a batch by padding to the largest ``n`` and ``m`` with
``sizes=`` giving each problem's own ``(n_i, m_i)``: the padded rows and columns get zero mass (the
solver already keeps zero masses exactly zero, so the loop is unchanged and costs nothing extra per
iteration), uniform default masses and a relative epsilon's mean cost count only the problem's own
entries, and padded potentials are set to zero. Each problem's iterates are then those of the
problem alone, up to rounding.

Options: ``anneal`` (epsilon-scaling) starts from ``epsilon_0 = max C`` and multiplies it by
``anneal`` each iteration down to the target (GeomLoss's schedule), which helps at small
``epsilon``; ``relaxation`` ``omega`` in ``[1, 2)`` over-relaxes each update,
``f <- f + omega (softmin(g) - f)`` (Thibault et al. 2017), which can cut the iterations of slowly
converging problems several-fold; both keep the same fixed point.

Gradients
---------
The loop itself runs without autograd, in ``torch.inference_mode`` (less bookkeeping per operation
than ``torch.no_grad``; its results are copied into ordinary tensors). ``value`` (the entropic
objective) carries its gradient by the envelope theorem: ``d value / d C = P``,
``d value / d log b = b * g`` and so on, with no linear solve. The potentials, and through them
:meth:`SinkhornResult.plan`, :meth:`SinkhornResult.apply` and ``value_linear``, are differentiated
implicitly: the backward pass solves the linearised optimality conditions (one dense ``n x n`` solve
per problem, ``O(n^2 (n + m))`` work) instead of unrolling the iterations, so memory does not grow
with the iteration count. Epsilon is one of the inputs of both (the envelope derivative of ``value``
with respect to it is ``KL(P | a ⊗ b)``); a relative epsilon is ``epsilon * mean(C)`` built
differentiably, so its dependence on the cost reaches every gradient.

References
----------
* M. Cuturi (2013), Sinkhorn distances: lightspeed computation of optimal transport. NeurIPS.
* B. Schmitzer (2019), Stabilized sparse scaling algorithms for entropy regularized transport
  problems. SIAM J. Sci. Comput. 41, A1443-A1481.
* G. Peyré and M. Cuturi (2019), Computational optimal transport. Found. Trends Mach. Learn. 11.
* J. Feydy (2020), Geometric data analysis, beyond convolutions. PhD thesis (epsilon-scaling,
  the soft-min formulation).
* A. Thibault, L. Chizat, C. Dossal and N. Papadakis (2017), Overrelaxed Sinkhorn-Knopp algorithm
  for regularized optimal transport. arXiv:1711.01851.
* T. Lehmann, M.-K. von Renesse, A. Sambale and A. Uschmajew (2022), A note on overrelaxation in
  the Sinkhorn algorithm. Optim. Lett. 16 (the best factor from the plain rate, after Young).
* M. Eisenberger et al. (2022), A unified framework for implicit Sinkhorn differentiation. CVPR.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import _device
from ..errors import (ConvergenceWarning, DtypeError, InputError, NonFiniteError, PaddingWarning, ShapeError,
                      check_int, check_real)

__all__ = ["sinkhorn", "SinkhornResult", "softmin"]

_OMEGA_MAX = 1.98           # the largest over-relaxation "auto" chooses
_COMPACT = 8                # ended problems leave the arrays once they are 1/_COMPACT of the running ones
_CHUNK = 1 << 22            # matrix entries per chunk when a pass must not form a full (B, n, m) temporary
_MAX_ITER = 1 << 62         # larger iteration limits (never reached) are taken as this
_L2_ENTRIES = 1 << 15       # entries of a temporary that a pass re-reads at once (256 KiB in float64)


# -- the primitive ----------------------------------------------------------------------------------------

def softmin(cost: Any, h: Any, epsilon: Any, dim: int) -> torch.Tensor:
    """The soft-min ``-epsilon * logsumexp(h - C / epsilon)`` over ``dim`` of ``C`` (``-1``: over ``j``
    for every row ``i``; ``-2``: over ``i`` for every column ``j``).

    ``cost`` is ``(..., n, m)`` (finite; any leading batch dimensions); ``h`` is ``(..., m)`` for
    ``dim=-1`` and ``(..., n)`` for ``dim=-2`` (log-mass plus potential over ``epsilon``; ``-inf``
    for zero mass, at least one finite entry per problem), broadcastable to the batch; ``epsilon``
    is positive, a scalar or broadcastable to the batch. Returns ``(..., n)`` for ``dim=-1``,
    ``(..., m)`` for ``dim=-2``. Evaluated in chunks of rows or columns, so no temporary larger than
    about four million entries is formed. Differentiable.
    """
    if isinstance(dim, bool) or dim not in (-1, -2):
        raise InputError("dim", "-1 (over j, for every row i) or -2 (over i, for every column j)", repr(dim))
    c = _as_cost(cost, None, None)
    lo, hi = torch.aminmax(c.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise NonFiniteError("cost", "finite costs", "NaN or infinite entries")
    batch, n, m = tuple(c.shape[:-2]), c.shape[-2], c.shape[-1]
    size = m if dim == -1 else n
    hh = _tensor(h, "h", "log-masses plus potentials (tensor or array-like)", dtype=c.dtype, device=c.device)
    try:
        hh = torch.broadcast_to(hh, (*batch, size))
    except RuntimeError as exc:
        raise ShapeError("h", f"shape {(*batch, size)} (the cost's {'columns' if dim == -1 else 'rows'})",
                         f"shape {tuple(hh.shape)}") from exc
    if bool(torch.isnan(hh).any()) or bool((hh == math.inf).any()):
        raise NonFiniteError("h", "values that are finite or -inf", "NaN or +inf entries")
    if not bool(torch.isfinite(hh).any(-1).all()):
        raise InputError("h", "at least one finite entry per problem", "all -inf")
    e = _check_epsilon(epsilon, False, c, batch)
    out = _softmin(c.reshape(-1, n, m), hh.reshape(-1, size), e, dim)
    return out.reshape(*batch, n if dim == -1 else m)


def _softmin(cost: torch.Tensor, h: torch.Tensor, epsilon: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`softmin` on checked ``(B, n, m)``, ``(B, m or n)``, ``(B,)`` tensors."""
    e = epsilon.view(-1, 1, 1)
    if dim == -1:
        n = cost.shape[-2]
        step = max(1, _CHUNK // max(1, cost.shape[0] * cost.shape[-1]))
        parts = [torch.logsumexp(h.unsqueeze(-2) - cost[:, i:i + step] / e, dim=-1) for i in range(0, n, step)]
    else:
        m = cost.shape[-1]
        step = max(1, _CHUNK // max(1, cost.shape[0] * cost.shape[-2]))
        parts = [torch.logsumexp(h.unsqueeze(-1) - cost[:, :, j:j + step] / e, dim=-2) for j in range(0, m, step)]
    return -epsilon.view(-1, 1) * torch.cat(parts, dim=-1)


# -- the result -------------------------------------------------------------------------------------------

class SinkhornResult(NamedTuple):
    """What :func:`sinkhorn` returns; shapes for a batch ``(...)`` of ``n x m`` problems.

    The plan is ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / epsilon)``: form it with :meth:`plan`, or
    apply it to vectors without forming it with :meth:`apply`.
    """

    f: torch.Tensor
    """Source potential ``(..., n)`` in the units of the cost (gauge: ``<a, f> = <b, g>``)."""
    g: torch.Tensor
    """Target potential ``(..., m)``."""
    value: torch.Tensor
    """The entropic objective ``<C, P> + epsilon KL(P | a ⊗ b)`` at the optimum, written as the dual
    ``<a, f> + <b, g> - epsilon (sum P - 1)`` ``(...)``; differentiable by the envelope theorem."""
    value_linear: torch.Tensor
    """The transport cost ``<C, P>`` of the returned plan ``(...)``."""
    error: torch.Tensor
    """L1 marginal error ``||P 1 - a||_1 + ||P^T 1 - b||_1`` of the returned plan ``(...)``."""
    iterations: torch.Tensor
    """Iterations done per problem ``(...)`` (int64); one iteration updates both potentials."""
    converged: torch.Tensor
    """Whether ``error <= tol`` ``(...)`` (bool)."""
    epsilon: torch.Tensor
    """The regularisation used per problem ``(...)`` (absolute, in the units of the cost)."""
    matrix: torch.Tensor
    """The cost matrix ``(..., n, m)`` (the caller's tensor, not a copy; with ``sizes``, a copy whose
    padded entries are zero)."""
    log_a: torch.Tensor
    """Log source masses ``(..., n)`` (``-inf`` for zero mass)."""
    log_b: torch.Tensor
    """Log target masses ``(..., m)``."""

    def log_plan(self, rows: slice = slice(None)) -> torch.Tensor:
        """``log P`` ``(..., n, m)`` (or the rows ``rows``)."""
        return _log_plan(self.matrix, self.log_a, self.log_b, self.epsilon, self.f, self.g, rows)

    def plan(self) -> torch.Tensor:
        """The transport plan ``P`` ``(..., n, m)``; rows sum to ``a`` and columns to ``b`` (to ``error``).
        Entries below ``e`` times the dtype's smallest normal number are exactly zero (see :func:`_exp_plan`)."""
        return _exp_plan(self.log_plan())

    def apply(self, x: Any, transpose: bool = False) -> torch.Tensor:
        """``P @ x`` for ``x`` ``(..., m, d)``, or ``P^T @ x`` for ``x`` ``(..., n, d)`` with
        ``transpose=True``, computed a block of rows at a time without forming ``P``.

        A 1-d ``x`` per problem may be given as ``(..., m)`` / ``(..., n)``; the result then drops the
        trailing ``d`` too.
        """
        n, m = self.matrix.shape[-2], self.matrix.shape[-1]
        if not isinstance(transpose, bool):
            raise InputError("transpose", "True or False", repr(transpose))
        x = _tensor(x, "x", "vectors to transport (tensor or array-like)", dtype=self.f.dtype, device=self.f.device)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError("x", "finite values", "NaN or infinite entries")
        inner = n if transpose else m
        vector = x.ndim >= 1 and x.shape[-1] == inner and (x.ndim == 1 or x.ndim == self.f.ndim)
        if vector:
            x = x.unsqueeze(-1)
        if x.ndim < 2 or x.shape[-2] != inner:
            raise ShapeError("x", f"shape (..., {inner}, d) (the plan's {'rows' if transpose else 'columns'})",
                             f"shape {tuple(x.shape)}")
        batch = max(1, math.prod(self.matrix.shape[:-2]))
        step = max(1, _CHUNK // max(1, batch * m))
        if transpose:
            out = None
            for i in range(0, n, step):
                block = _exp_plan(self.log_plan(slice(i, i + step)))
                part = block.transpose(-1, -2) @ x[..., i:i + step, :]
                out = part if out is None else out + part
        else:
            out = torch.cat([_exp_plan(self.log_plan(slice(i, i + step))) @ x for i in range(0, n, step)], dim=-2)
        return out.squeeze(-1) if vector else out


# -- input checks -----------------------------------------------------------------------------------------

def _tensor(x: Any, name: str, what: str, *, dtype: Any = None, device: Any = None) -> torch.Tensor:
    """``x`` as a real floating tensor through :func:`daml._device.as_tensor`, with ``None``, strings,
    ragged sequences and arrays of text refused by a :class:`~daml.errors.DamlError` naming ``name``
    (``what`` says what was expected)."""
    if x is None or isinstance(x, (str, bytes)):
        raise DtypeError(name, what, repr(x))
    if not isinstance(x, (torch.Tensor, np.ndarray)) and not (hasattr(x, "variable") and hasattr(x, "dims")):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as exc:            # ragged nested sequences
            raise ShapeError(name, what + " (a regular array)", f"{type(x).__name__} of ragged sequences") from exc
    if isinstance(x, np.ndarray) and x.dtype.kind in "USVMm":
        raise DtypeError(name, what, f"an array of dtype {x.dtype}")
    return _device.as_tensor(x, name, dtype=dtype, device=device)


def _check_fits(count: int, n: int, m: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a batch that cannot fit in the device's memory, before anything is allocated: on the
    CPU its kernels alone (the loop forms them piece by piece, but a batch of costs as large is
    already beyond the memory); on CUDA the costs and the kernels of the whole batch."""
    need = count * n * m * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        need, total = 2 * need, torch.cuda.mem_get_info(device)[1]
    else:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):        # no sysconf (Windows): no check
            return
    if need > total:
        raise InputError("cost", f"a batch whose Sinkhorn kernels fit in memory ({total / 2**30:.3g} GiB "
                         f"on {device.type})", f"{count} problems of {n} x {m}, about {need / 2**30:.3g} GiB",
                         hint="solve the batch in parts")


def _as_cost(cost: Any, dtype: Any, device: Any) -> torch.Tensor:
    """``cost`` as a real floating tensor of shape ``(..., n, m)`` with ``n, m >= 1`` (values not checked)."""
    c = _tensor(cost, "cost", "a cost matrix (tensor or array-like of shape (..., n, m))", dtype=dtype, device=device)
    if c.ndim < 2 or c.shape[-1] == 0 or c.shape[-2] == 0:
        raise ShapeError("cost", "a cost matrix of shape (..., n, m) with n, m >= 1", f"shape {tuple(c.shape)}")
    if c.dtype not in (torch.float32, torch.float64):
        raise DtypeError("cost", "float32 or float64 costs (or pass dtype=)", f"dtype {c.dtype}")
    if c.numel() == 0:
        raise ShapeError("cost", "at least one problem (no batch dimension of size 0)", f"shape {tuple(c.shape)}")
    _check_fits(math.prod(c.shape[:-2]), c.shape[-2], c.shape[-1], c.dtype, c.device)
    return c


def _check_cost_values(c: torch.Tensor) -> None:
    lo, hi = torch.aminmax(c.detach())
    if not bool(torch.isfinite(hi)) or not bool(torch.isfinite(lo)):
        raise NonFiniteError("cost", "finite costs", "NaN or infinite entries")
    if not bool(lo >= 0):
        raise InputError("cost", "non-negative costs", f"a minimum of {float(lo):.3g}",
                         hint="OT plans do not change when a constant is added to C; shift it")


def _integer_sizes(sizes: Any, shape: tuple[int, ...], what: str, per: str) -> np.ndarray:
    """``sizes`` as an int64 array of exactly ``shape``, else a daml error naming ``sizes`` (``what``:
    the integers expected, e.g. "integer sizes (n_i, m_i)"; ``per``: what one entry stands for)."""
    if isinstance(sizes, (str, bytes)) or sizes is None:
        raise DtypeError("sizes", f"{what}, {per}", repr(sizes))
    try:
        arr = sizes.detach().cpu().numpy() if isinstance(sizes, torch.Tensor) else np.asarray(sizes)
    except (ValueError, TypeError) as exc:                    # ragged nested sequences
        raise ShapeError("sizes", f"shape {shape} ({per})", f"{type(sizes).__name__} of ragged sequences") from exc
    if arr.dtype.kind not in "iu":
        raise DtypeError("sizes", f"{what}, {per}", f"dtype {arr.dtype}")
    if arr.shape != shape:
        raise ShapeError("sizes", f"shape {shape} ({per} of the batch)", f"shape {arr.shape}")
    return arr.astype(np.int64)


def _check_sizes(sizes: Any, batch: tuple[int, ...], n: int, m: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column masks ``(B, n)``, ``(B, m)`` of the problems' own sizes, and ``n_i m_i`` ``(B,)``."""
    arr = _integer_sizes(sizes, (*batch, 2), "integer sizes (n_i, m_i)", "one pair per problem").reshape(-1, 2)
    for k, (name, full) in enumerate((("n_i", n), ("m_i", m))):
        lo, hi = int(arr[:, k].min()), int(arr[:, k].max())
        if lo < 1 or hi > full:
            raise InputError("sizes", f"sizes with 1 <= {name} <= {full} (the padded cost's "
                             f"{'rows' if k == 0 else 'columns'})", f"{name} between {lo} and {hi}")
    s = torch.from_numpy(arr).to(device)
    rows = torch.arange(n, device=device) < s[:, :1]
    cols = torch.arange(m, device=device) < s[:, 1:]
    return rows, cols, s[:, 0] * s[:, 1]


def _check_masses(mass: Any, log_mass: Any, name: str, size: int, batch: tuple[int, ...],
                  like: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Log masses ``(B, size)`` normalised exactly, from ``mass`` or ``log_mass`` (uniform if neither).

    With ``valid`` (``(B, size)`` bool, the problems' own entries) the other entries are padding:
    whatever is given there is ignored and their mass is zero; uniform means uniform over ``valid``.
    """
    if mass is not None and log_mass is not None:
        raise InputError(name, f"either {name} or log_{name}", "both")
    tol = 1e-6 if like.dtype == torch.float64 else 1e-4
    arg = name if log_mass is None else "log_" + name
    if valid is not None:
        valid = valid.reshape(*batch, size)

    def padded(t: torch.Tensor, fill: float) -> torch.Tensor:
        if valid is None:
            return t
        try:
            t = torch.broadcast_to(t, (*batch, size))
        except RuntimeError as exc:
            raise ShapeError(arg, f"masses broadcastable to {(*batch, size)}", f"shape {tuple(t.shape)}") from exc
        return torch.where(valid, t, fill)

    if mass is None and log_mass is None:
        if valid is None:
            lm = torch.full((size,), -math.log(size), dtype=like.dtype, device=like.device)
        else:
            count = valid.sum(-1, keepdim=True).to(like.dtype)
            lm = torch.where(valid, -torch.log(count), -math.inf)
    elif mass is not None:
        w = _tensor(mass, name, "masses (tensor or array-like)", dtype=like.dtype, device=like.device)
        if w.ndim == 0 or w.shape[-1] != size:
            raise ShapeError(name, f"masses of shape (..., {size})", f"shape {tuple(w.shape)}")
        w = padded(w, 0.0)
        if not bool(torch.isfinite(w).all()):
            raise NonFiniteError(name, "finite masses", "NaN or infinite entries")
        if bool((w < 0).any()):
            raise InputError(name, "non-negative masses", f"a minimum of {float(w.min()):.3g}")
        total = w.sum(-1)
        if not bool(((total - 1).abs() <= tol).all()):
            raise InputError(name, f"masses summing to one (within {tol:g})" +
                             (" over each problem's own entries (sizes)" if valid is not None else ""),
                             f"sums between {float(total.min()):.6g} and {float(total.max()):.6g}",
                             hint="normalise them, or give log-weights as log_" + name)
        lm = torch.log(w) - torch.log(total).unsqueeze(-1)
    else:
        lw = _tensor(log_mass, "log_" + name, "log-masses (tensor or array-like)", dtype=like.dtype,
                     device=like.device)
        if lw.ndim == 0 or lw.shape[-1] != size:
            raise ShapeError("log_" + name, f"log-masses of shape (..., {size})", f"shape {tuple(lw.shape)}")
        lw = padded(lw, -math.inf)
        if bool(torch.isnan(lw).any()) or bool((lw == math.inf).any()):
            raise NonFiniteError("log_" + name, "log-masses that are finite or -inf", "NaN or +inf entries")
        total = torch.logsumexp(lw, -1)
        if not bool((total.abs() <= tol).all()):
            raise InputError("log_" + name, f"log-masses whose logsumexp is 0 (within {tol:g})",
                             f"values between {float(total.min()):.6g} and {float(total.max()):.6g}")
        lm = lw - total.unsqueeze(-1)
    # masses below the smallest normal number of the dtype are zero (subnormal products would stall
    # the mat-vecs and can overflow the scalings); the mass removed is below size * tiny
    lm = torch.where(lm < math.log(torch.finfo(like.dtype).tiny), -math.inf, lm)
    try:
        lm = torch.broadcast_to(lm, (*batch, size))
    except RuntimeError as exc:
        raise ShapeError(name, f"masses broadcastable to {(*batch, size)}", f"shape {tuple(lm.shape)}") from exc
    return lm.reshape(-1, size)


def _check_epsilon(epsilon: Any, relative: bool, cost: torch.Tensor, batch: tuple[int, ...],
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """Absolute epsilon per problem ``(B,)``; relative: times the mean cost (over ``counts`` entries
    per problem when padded, the padding being zero)."""
    e = _tensor(epsilon, "epsilon", "a positive regularisation (float or tensor)", dtype=cost.dtype,
                device=cost.device)
    if not bool(torch.isfinite(e).all()) or not bool((e > 0).all()):
        raise InputError("epsilon", "a positive, finite regularisation", repr(epsilon))
    try:
        e = torch.broadcast_to(e, batch).reshape(-1)
    except RuntimeError as exc:
        raise ShapeError("epsilon", f"a scalar or a tensor broadcastable to the batch {batch}",
                         f"shape {tuple(e.shape)}") from exc
    if relative:
        # not detached: the effective epsilon depends on the cost, and its gradients (through the
        # implicit backward of the potentials and through the plan and the values) must say so
        if counts is None:
            scale = cost.mean((-2, -1)).reshape(-1)
        else:
            scale = cost.sum((-2, -1)).reshape(-1) / counts.to(cost.dtype)
        if not bool((scale > 0).all()):
            raise InputError("cost", "a cost with a positive mean when relative=True", "an all-zero cost matrix")
        e = e * scale
    return e


def _warn_if_padded(cb: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, relative: bool) -> None:
    """Warn when some problems of a batch (not all) end in an all-zero row or column of the cost,
    the mark of zero padding, and that padding changes the result (a relative epsilon, or mass on
    the zero row or column). Two reductions over the last row and column: no work per iteration."""
    if cb.shape[0] < 2:
        return
    xp, c = (np, cb.detach().numpy()) if cb.device.type == "cpu" else (torch, cb)    # numpy: less overhead
    zero_row = ~c[:, -1, :].any(-1)
    zero_col = ~c[:, :, -1].any(-1)
    suspect = zero_row | zero_col
    if not bool(suspect.any()) or bool(suspect.all()):
        return
    if not relative:
        last_a, last_b = la[:, -1].detach(), lb[:, -1].detach()
        if xp is np:
            last_a, last_b = last_a.numpy(), last_b.numpy()
        suspect = (zero_row & (last_a > -math.inf)) | (zero_col & (last_b > -math.inf))
    count = int(suspect.sum())
    if count:
        warnings.warn(f"sinkhorn: {count} of {cb.shape[0]} problems of the batch end in an all-zero row or "
                      "column of the cost, as zero padding does. If they are padded, pass sizes= (each "
                      "problem's own (n_i, m_i)): padding without it " +
                      ("changes the relative epsilon (the mean cost includes the padded zeros)" if relative else
                       "gives the padded rows or columns mass") + " and so the result.", PaddingWarning, stacklevel=3)


# -- implicit differentiation of the potentials -----------------------------------------------------------

def _residual(f, g, cost, log_a, log_b, eps):
    """The soft-min fixed-point equations divided by epsilon (zero at the solution)."""
    e = eps.view(-1, 1)
    rf = f / e - _softmin(cost, log_b + g / e, eps, -1) / e
    rg = g / e - _softmin(cost, log_a + f / e, eps, -2) / e
    return rf, rg


class _ImplicitPotentials(torch.autograd.Function):
    """Pass-through of converged potentials whose backward solves the linearised fixed-point equations."""

    @staticmethod
    def forward(ctx, cost, log_a, log_b, eps, f, g):  # noqa: D102
        ctx.save_for_backward(cost, log_a, log_b, eps, f, g)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, vf, vg):  # noqa: D102
        cost, log_a, log_b, eps, f, g = ctx.saved_tensors
        e = eps.view(-1, 1, 1)
        with torch.no_grad():
            z = (f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / e
            q = torch.softmax(z + log_b.unsqueeze(-2), dim=-1)           # (B, n, m), rows sum to 1
            r = torch.softmax(z + log_a.unsqueeze(-1), dim=-2)           # (B, n, m), columns sum to 1
            # J^T lambda = v with J = [[I, Q], [R^T, I]] / eps; eliminating lambda_g leaves
            # (I - (Q R^T)^T) lambda_f = eps (v_f - R v_g), singular along the gauge; + 1 1^T fixes it.
            ev = eps.view(-1, 1)
            rhs = ev * (vf - (r @ vg.unsqueeze(-1)).squeeze(-1))
            qr = q @ r.transpose(-1, -2)                                  # (B, n, n), row-stochastic
            n = f.shape[-1]
            mat = torch.eye(n, dtype=f.dtype, device=f.device) - qr.transpose(-1, -2) + 1.0
            lam_f = torch.linalg.solve(mat, rhs.unsqueeze(-1)).squeeze(-1)
            lam_g = ev * vg - (q.transpose(-1, -2) @ lam_f.unsqueeze(-1)).squeeze(-1)
        inputs = [cost, log_a, log_b, eps]
        need = [t.requires_grad for t in inputs]
        grads = [None] * 4
        if any(need):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(nd) for t, nd in zip(inputs, need)]
                rf, rg = _residual(f, g, *leaves)
                wanted = [lv for lv, nd in zip(leaves, need) if nd]
                pairs = [(r_, -l_) for r_, l_ in ((rf, lam_f), (rg, lam_g)) if r_.requires_grad]
                out = torch.autograd.grad([p_[0] for p_ in pairs], wanted, grad_outputs=[p_[1] for p_ in pairs],
                                          allow_unused=True)
            it = iter(out)
            grads = [next(it) if nd else None for nd in need]
            grads = [torch.zeros_like(t) if nd and gr is None else gr for t, nd, gr in zip(inputs, need, grads)]
        return (*grads, None, None)


# -- the solver -------------------------------------------------------------------------------------------

def sinkhorn(cost: Any, a: Any = None, b: Any = None, *, log_a: Any = None, log_b: Any = None,
             epsilon: Any = 0.05, relative: bool = False, sizes: Any = None, tol: float = 1e-6,
             max_iter: int = 1000, check_every: int = 10, anneal: float | None = None,
             relaxation: float = 1.0, warn: bool = True, dtype: Any = None, device: Any = None
             ) -> SinkhornResult:
    """Solve a batch of entropic optimal-transport problems with the log-domain Sinkhorn algorithm.

    Parameters
    ----------
    cost : tensor or array-like (..., n, m)
        Non-negative, finite cost matrices; leading dimensions are independent problems.
    a, b : array-like (..., n) and (..., m), optional
        Source and target masses (non-negative, each summing to one within 1e-6 in float64, 1e-4 in
        float32; they are renormalised exactly). Default: uniform. Zero entries are allowed.
    log_a, log_b : array-like, optional
        The masses as log-weights instead (``-inf`` for zero mass); use these for importance weights
        that span more orders of magnitude than the dtype can hold.
    epsilon : float or tensor broadcastable to the batch
        Entropic regularisation in the units of ``cost`` (positive).
    relative : bool
        Read ``epsilon`` as a fraction of each problem's mean cost (OTT-JAX's ``relative_epsilon``).
        The mean depends on the cost, and gradients account for it: they are those of the map from
        ``(cost, a, b, epsilon)`` to the solution with ``epsilon * mean(cost)`` as the regularisation.
    sizes : array-like of int (..., 2), optional
        Each problem's own size ``(n_i, m_i)`` when problems of different sizes are padded into one
        ``(..., n, m)`` batch: problem ``k`` is ``cost[k, :n_i, :m_i]``. The padded rows and columns
        are excluded from the transport, from the masses (give ``a``, ``b`` padded to ``n``, ``m``;
        their padded entries are ignored, and the default is uniform over ``n_i`` and ``m_i``) and
        from the mean cost of ``relative``. Padded cost entries are ignored (they may be anything,
        NaN included). Every result then equals, problem by problem and to the solver's tolerance,
        that of the problem solved alone; padded entries of ``f``, ``g`` and of the plan are zero,
        and so are the gradients with respect to padded inputs. **Zero padding without** ``sizes``
        **is not the same problem**: uniform default masses spread over the padding, and with
        ``relative=True`` the padded zeros lower the mean cost and so epsilon. A batch in which some
        problems (not all) end in an all-zero cost row or column, and in which that would matter,
        gets a ``UserWarning``.
    tol : float
        Stop a problem when its L1 marginal error ``||P 1 - a||_1 + ||P^T 1 - b||_1 <= tol``.
    max_iter : int
        Iteration limit per problem (annealing iterations included).
    check_every : int
        Measure the marginal error (and retire converged problems) every this many iterations; with
        ``relaxation="auto"`` also once after half as many, for an earlier first estimate of ``omega``.
    anneal : float in (0, 1), optional
        Epsilon-scaling: start at ``max C`` and multiply by ``anneal`` per iteration down to ``epsilon``.
    relaxation : float in [1, 2) or "auto"
        Over-relaxation ``omega`` of each potential update; 1 is plain Sinkhorn. ``"auto"`` sets it
        per problem at every check from the observed error ratio, the best factor after Young's SOR
        theory (Lehmann et al.), only upwards and at most 1.98. Either way a problem whose error grows
        between checks drops to plain Sinkhorn.
    warn : bool
        Emit a :class:`~daml.errors.ConvergenceWarning` when problems end unconverged, and a
        :class:`~daml.errors.PaddingWarning` when, without ``sizes``, the batch looks zero-padded.
        Callers that build their own unpadded batches and check convergence themselves (the ensemble
        transform) pass ``False``.
    dtype, device : optional
        Resolved through :mod:`daml._device`; default: those of ``cost`` (float64 for non-float input).

    Returns
    -------
    SinkhornResult
        Potentials, objective values, per-problem error, iterations and convergence flags; the plan
        through :meth:`SinkhornResult.plan` or :meth:`SinkhornResult.apply`.

    Raises
    ------
    InputError
        Naming ``cost`` (negative entries), ``a``/``b`` (negative entries, not summing to one),
        ``epsilon`` (not positive), ``sizes`` (out of range) or a solver parameter out of range.
    ShapeError, NonFiniteError
        Naming the argument with the wrong shape (or an empty problem) or with NaN/infinite entries.
    DtypeError
        Naming the argument of a type or dtype that cannot be a cost, mass or size (strings, ``None``
        for ``cost`` or ``epsilon``, complex or boolean values, half precision, non-integer sizes).
    """
    c = _as_cost(cost, dtype, device)
    batch, n, m = tuple(c.shape[:-2]), c.shape[-2], c.shape[-1]
    tol = check_real(tol, "tol")
    if tol < 0:
        raise InputError("tol", "a non-negative L1 marginal tolerance", repr(tol))
    max_iter = min(check_int(max_iter, "max_iter", 1), _MAX_ITER)    # counts are int64 tensors
    check_every = min(check_int(check_every, "check_every", 1), _MAX_ITER)
    if anneal is not None:
        anneal = check_real(anneal, "anneal")
        if not 0 < anneal < 1:
            raise InputError("anneal", "None or a factor in (0, 1)", repr(anneal))
    if not (isinstance(relaxation, str) and relaxation == "auto"):
        relaxation = check_real(relaxation, "relaxation", expected="'auto' or an over-relaxation factor in [1, 2)")
        if not 1 <= relaxation < 2:
            raise InputError("relaxation", "'auto' or an over-relaxation factor in [1, 2)", repr(relaxation))
    if not isinstance(relative, bool):
        raise InputError("relative", "True or False", repr(relative))
    if not isinstance(warn, bool):
        raise InputError("warn", "True or False", repr(warn))

    rows_ok = cols_ok = counts = None
    if sizes is not None:
        rows_ok, cols_ok, counts = _check_sizes(sizes, batch, n, m, c.device)
        inside = (rows_ok.unsqueeze(-1) & cols_ok.unsqueeze(-2)).reshape(c.shape)
        c = torch.where(inside, c, torch.zeros((), dtype=c.dtype, device=c.device))   # padding: ignored
    _check_cost_values(c)
    la = _check_masses(a, log_a, "a", n, batch, c, rows_ok)
    lb = _check_masses(b, log_b, "b", m, batch, c, cols_ok)
    cb = c.reshape(-1, n, m)
    eps = _check_epsilon(epsilon, relative, c, batch, counts)
    if sizes is None and warn:
        _warn_if_padded(cb, la, lb, relative)

    # the loop runs in inference mode (less bookkeeping per operation than no_grad); its results are
    # cloned into ordinary tensors, which callers may then modify in place or differentiate through
    with torch.inference_mode():
        out = _solve_in_pieces(cb.detach(), la.detach(), lb.detach(), eps.detach(),
                               tol, max_iter, check_every, anneal, relaxation)
    if not torch.is_inference_mode_enabled():
        out = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in out)
    f, g, err, iters, total, linear = out
    if torch.is_grad_enabled() and any(t.requires_grad for t in (cb, la, lb, eps)):
        f, g = _ImplicitPotentials.apply(cb, la, lb, eps, f, g)
    # gauge <a, f> = <b, g> (the plan and the values do not depend on it)
    shift = 0.5 * (_dot(lb, g) - _dot(la, f))
    f = f + shift.unsqueeze(-1)
    g = g - shift.unsqueeze(-1)
    if sizes is not None:        # the potentials of padded rows and columns mean nothing: zero
        f = torch.where(rows_ok, f, torch.zeros((), dtype=f.dtype, device=f.device))
        g = torch.where(cols_ok, g, torch.zeros((), dtype=g.dtype, device=g.device))

    if cb.dtype != torch.float64:
        # in low precision the plan rebuilt from the potentials differs from the loop's by about
        # |f / epsilon| * machine epsilon: measure the error of the plan actually returned
        with torch.no_grad():
            err = _plan_error(cb, la, lb, eps, f, g)
    fd, gd = f.detach(), g.detach()
    if f.requires_grad:          # differentiable sums; for value, the envelope form (potentials as constants)
        linear = _plan_sums(cb, la, lb, eps, f, g)[1]
        total = _plan_sums(cb, la, lb, eps, fd, gd, linear=False)[0]
    value = _dot(la, fd) + _dot(lb, gd) - eps * (total - 1.0)
    converged = err <= tol
    if warn and not bool(converged.all()):
        bad = int((~converged).sum())
        warnings.warn(f"sinkhorn: {bad} of {converged.numel()} problems did not reach tol={tol:g} in "
                      f"max_iter={max_iter} iterations (largest L1 marginal error {float(err.max()):.3g}); "
                      "see result.converged and result.error", ConvergenceWarning, stacklevel=2)

    def shaped(t: torch.Tensor, *tail: int) -> torch.Tensor:
        return t.reshape((*batch, *tail))

    return SinkhornResult(shaped(f, n), shaped(g, m), shaped(value), shaped(linear), shaped(err),
                          shaped(iters), shaped(converged), shaped(eps), c, shaped(la, n), shaped(lb, m))


def _log_plan(cost, la, lb, eps, f, g, rows: slice = slice(None)) -> torch.Tensor:
    """``log P_ij = (log a_i + f_i / epsilon) + (log b_j + g_j / epsilon) - C_ij / epsilon`` for the rows
    ``rows`` of every problem (any leading batch dimensions): one pass that forms the block and one
    in place, no other full-size temporary. Differentiable. The returned plan, its error and its sums
    are all computed by this one formula, so they agree to the last bit."""
    ev = eps.unsqueeze(-1)
    row = (la[..., rows] + f[..., rows] / ev).unsqueeze(-1)
    col = (lb + g / ev).unsqueeze(-2)
    return torch.addcmul(col, cost[..., rows, :], -1.0 / ev.unsqueeze(-1)).add_(row)


def _exp_plan(log_p: torch.Tensor) -> torch.Tensor:
    """``exp(log P)``, with every entry below ``e`` times the dtype's smallest normal number set to
    zero (which changes no sum by more than that times the entry count). The CPU's ``exp`` is fast
    only for results well inside the normal range: a result that underflows, or lands next to the
    smallest normal number, takes a slow path that costs as much as many ordinary ones, and a
    float32 plan at small epsilon has many such entries. The plan, its error and its sums all go
    through here, so they still agree to the last bit. Differentiable (out of place when ``log_p`` requires grad,
    otherwise in place on it)."""
    low = math.log(torch.finfo(log_p.dtype).tiny) + 1.0
    small = log_p < low
    if log_p.requires_grad:
        return torch.where(small, 0.0, torch.exp(log_p.clamp_min(low)))
    return log_p.clamp_min_(low).exp_().masked_fill_(small, 0.0)


def _plan_blocks(cost, la, lb, eps, f, g):
    """The plan ``a_i b_j exp((f_i + g_j - C_ij) / epsilon)`` of every problem, a block of rows at a
    time (about a million entries): yields ``(rows, block)`` with ``block`` ``(B, rows, m)``."""
    n, m = cost.shape[-2], cost.shape[-1]
    step = max(1, _CHUNK // 4 // max(1, cost.shape[0] * m))
    for i in range(0, n, step):
        rows = slice(i, i + step)
        yield rows, _exp_plan(_log_plan(cost, la, lb, eps, f, g, rows))


def _plan_error(cost, la, lb, eps, f, g) -> torch.Tensor:
    """L1 marginal error of the plan built from ``(f, g)``."""
    row_err = torch.zeros_like(eps)
    cols = torch.zeros_like(g)
    for rows, p in _plan_blocks(cost, la, lb, eps, f, g):
        row_err = row_err + (p.sum(-1) - torch.exp(la[:, rows])).abs().sum(-1)
        cols = cols + p.sum(-2)
    return row_err + (cols - torch.exp(lb)).abs().sum(-1)


def _dot(log_mass: torch.Tensor, pot: torch.Tensor) -> torch.Tensor:
    """``sum_i exp(log_mass_i) pot_i`` with zero-mass entries contributing nothing."""
    w = torch.exp(log_mass)
    return torch.where(w > 0, w * pot, torch.zeros_like(pot)).sum(-1)


def _plan_sums(cost, la, lb, eps, f, g, linear: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum P`` and ``<C, P>`` for every problem (differentiable)."""
    total = torch.zeros_like(eps)
    lin = torch.zeros_like(eps) if linear else None
    for rows, p in _plan_blocks(cost, la, lb, eps, f, g):
        total = total + p.sum((-2, -1))
        if linear:
            lin = lin + (p * cost[:, rows]).sum((-2, -1))
    return total, lin


def _floors(dtype: torch.dtype, size: int) -> tuple[float, float, float]:
    """``(tau, floor, ceil)``: the re-anchoring threshold (in units of epsilon) and the bounds of the
    logarithm of the anchored kernel's entries, chosen so that no product in the loop is subnormal
    or overflows."""
    tau = 100.0 if dtype == torch.float64 else 15.0
    info = torch.finfo(dtype)
    return tau, math.log(info.tiny) + tau + 2, math.log(info.max) - tau - math.log(size) - 2


def _rows(kernel: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``K v`` for a batch: ``(B, n, m) x (B, m) -> (B, n)``.

    On the CPU the product goes through numpy's BLAS on the same memory (no copy): on AMD processors
    torch's MKL mat-vec runs slower than OpenBLAS, and this loop is nothing but mat-vecs.
    """
    if kernel.device.type == "cpu":
        return torch.from_numpy(np.matmul(kernel.numpy(), v.numpy()[..., None])[..., 0])
    return torch.bmm(kernel, v.unsqueeze(-1)).squeeze(-1)


def _cols(kernel: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``K^T u`` for a batch: ``(B, n, m) x (B, n) -> (B, m)`` (numpy's BLAS on the CPU, see :func:`_rows`)."""
    if kernel.device.type == "cpu":
        return torch.from_numpy(np.matmul(u.numpy()[:, None, :], kernel.numpy())[:, 0, :])
    return torch.bmm(u.unsqueeze(-2), kernel).squeeze(-2)


def _weighted_rows(kern: torch.Tensor, cost: torch.Tensor, rows: torch.Tensor, mine: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
    """``(K o C) v`` for the kernels ``kern[rows]`` and costs ``cost[mine]`` (``(R, n)`` result).

    The elementwise product is formed a few problems at a time in one cache-sized buffer: forming it
    for all of them at once (or first gathering the selected kernels and costs) writes and re-reads
    arrays as large as the kernels, which at the end of a fixed-iteration run costs several
    iterations. Where ``rows`` and ``mine`` are runs of consecutive problems, as when every problem
    ends together, the chunks are views: nothing is gathered.
    """
    count, (n, m) = rows.numel(), kern.shape[-2:]                # count >= 1: some problem ended
    step = max(1, _L2_ENTRIES // (n * m)) if kern.device.type == "cpu" else count
    out = torch.empty(count, n, dtype=kern.dtype, device=kern.device)
    buf = torch.empty(min(step, count), n, m, dtype=kern.dtype, device=kern.device)

    def start(ix: torch.Tensor) -> int | None:              # ix[0] where ix (ascending) is consecutive
        first = int(ix[0])
        return first if int(ix[-1]) - first == count - 1 else None

    r0, m0 = start(rows), start(mine)
    for i in range(0, count, step):
        j = min(i + step, count)
        kc = kern[r0 + i:r0 + j] if r0 is not None else kern.index_select(0, rows[i:j])
        cc = cost[m0 + i:m0 + j] if m0 is not None else cost.index_select(0, mine[i:j])
        out[i:j] = _rows(torch.mul(kc, cc, out=buf[:j - i]), v[i:j])
    return out


def _anchor(cost, g, lb, b, eps, bounds):
    """One exact soft-min over rows from ``g``: the new ``f`` and the kernel
    ``K_ij = exp((f_i + g_j - C_ij) / epsilon)`` at ``(f, g)``, so that ``sum_j b_j K_ij = 1`` exactly
    (entries clipped to ``exp(bounds)``; the plan is ``a_i b_j K_ij``). The kernel is the only
    full-size array formed; the row maxima are taken a block of rows at a time."""
    e = eps.view(-1, 1, 1)
    k = torch.addcmul((g / eps.view(-1, 1)).unsqueeze(-2), cost, -1.0 / e)      # (B, n, m): (g - C)/eps
    top = torch.empty(k.shape[:-1] + (1,), dtype=k.dtype, device=k.device)
    step = max(1, _CHUNK // 16 // max(1, k.shape[0] * k.shape[-1]))
    for i in range(0, k.shape[-2], step):
        top[:, i:i + step] = torch.amax(k[:, i:i + step] + lb.unsqueeze(-2), -1, keepdim=True)
    k.sub_(top).clamp_(*bounds).exp_()
    s = _rows(k, b).unsqueeze(-1)
    k.div_(s)
    return -eps.view(-1, 1) * (top + torch.log(s)).squeeze(-1), k


def _relaxed_power(u: torch.Tensor, s: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``u (s u)^(-omega)``, as ``u exp(-omega log(s u))`` in one buffer (:func:`_power_in_place`).
    On the CPU through numpy, whose vectorised ``log`` and ``exp`` are faster here than torch's (or
    its ``pow`` with a per-row exponent); the same arithmetic either way."""
    if u.device.type == "cpu":
        with np.errstate(all="ignore"):          # a non-finite result is caught by the caller
            return torch.from_numpy(_power_in_place(np, u.numpy(), s.numpy(), omega.numpy()))
    return _power_in_place(torch, u, s, omega)


def _power_in_place(xp: Any, u: Any, s: Any, omega: Any) -> Any:
    """``u exp(-omega log(s u))`` for numpy arrays (``xp = np``) or torch tensors (``xp = torch``),
    written once: one new buffer, updated in place."""
    out = s * u
    xp.log(out, out=out)
    out *= -omega
    xp.exp(out, out=out)
    out *= u
    return out


def _relaxed(u: torch.Tensor, s: torch.Tensor, omega: torch.Tensor, lo: float, hi: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The over-relaxed scaling update ``u (1 / (s u))^omega`` and the rows that left
    ``[lo, hi]`` (``None`` when none did; see :func:`_out_of_range`).

    A problem whose update leaves the positive finite numbers (an overshoot past the dtype's range)
    takes the plain update ``1 / s`` instead and keeps ``omega = 1`` from then on. The range check
    decides the common case, where every entry is finite and in range, with one reduction.
    """
    new = _relaxed_power(u, s, omega)
    far = _out_of_range(new, lo, hi)
    if far is None:
        return new, omega, None
    bad = ~(torch.isfinite(new) & (new > 0)).all(-1, keepdim=True)
    if bool(bad.any()):
        new = torch.where(bad, 1.0 / s, new)
        omega = torch.where(bad, 1.0, omega)
        far = _out_of_range(new, lo, hi)
    return new, omega, far


def _out_of_range(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor | None:
    """Which problems (rows of ``x``) have a scaling outside ``[lo, hi]``; ``None`` if none has."""
    xmin, xmax = torch.aminmax(x)
    if float(xmin) >= lo and float(xmax) <= hi:          # False for NaN, which aminmax propagates
        return None
    return ((x < lo) | (x > hi)).any(-1)


def _adapt(omega: torch.Tensor, err: torch.Tensor, prev_err: torch.Tensor, auto: bool, every: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The over-relaxation ``omega`` (``(B, 1)``) after a check of the errors ``err`` (``(B,)``), and
    the errors to compare with at the next check.

    A problem whose error grew since the last check drops to ``omega = 1`` (plain Sinkhorn, which
    converges) and is not compared at the next check. With ``auto``, every other problem whose
    error fell re-estimates its best factor. Near the solution Sinkhorn is a two-block Gauss-Seidel
    iteration, so Young's SOR theory applies (Lehmann et al.): a per-iteration error ratio ``mu``
    seen under ``omega`` means a plain ratio ``r = (mu + omega - 1)^2 / (omega^2 mu)``, whose best
    factor is ``2 / (1 + sqrt(1 - r))``. At the best factor ``mu = omega - 1``, and near the solution
    ``mu`` cannot fall below ``omega - 1`` (Kahan's bound for SOR), so only ratios ``mu >= omega - 1``
    are used (a faster fall is a transient). They raise the factor or keep it (early ratios
    understate the asymptotic one), up to ``_OMEGA_MAX``.
    """
    w = omega.squeeze(-1)
    grew = (w > 1.0) & (err > prev_err)
    new = torch.where(grew, 1.0, w)
    if auto:
        mu = (err / prev_err).clamp(min=torch.finfo(err.dtype).tiny, max=1.0) ** (1.0 / every)
        fell = ~grew & torch.isfinite(prev_err) & (err < prev_err) & (mu >= w - 1.0)
        rate = ((mu + w - 1.0) ** 2 / (w * w * mu)).clamp(max=1.0)
        best = (2.0 / (1.0 + torch.sqrt(1.0 - rate))).clamp(1.0, _OMEGA_MAX)
        new = torch.where(fell, torch.maximum(best, new), new)
    return new.unsqueeze(-1), torch.where(grew, math.inf, err)


def _solve_in_pieces(cost, la, lb, eps, tol, max_iter, check_every, anneal, relaxation):
    """:func:`_solve` on consecutive pieces of the batch whose kernels fit the cache together.

    Every pass of the loop re-reads the whole ``(B, n, m)`` kernel. On the CPU a batch larger than
    the cache is read from main memory at every half-iteration, while a piece that fits is read
    from the cache: many small problems run about twice as fast in pieces. The problems are
    independent, so for plain Sinkhorn the result is the same as one call on the whole batch.

    The first pieces are consecutive slices of the batch (views, nothing copied). A piece in which
    a quarter or fewer of its problems are still unfinished at a check pauses them; the paused
    problems of all pieces are gathered and resumed from their potentials ``g`` and iteration
    counts in fuller pieces, so the few slow problems of a batch do not pay the per-iteration
    overhead once per piece. Each round leaves at most a quarter of its problems to the next, and
    the last round (one piece) never pauses. A piece whose problems all run to the end (fixed
    iterations, ``tol=0``) never pauses. Resuming from ``g`` is exact for plain Sinkhorn (the next
    row update is the exact soft-min of ``g``); an over-relaxed problem restarts its relaxation
    from there.
    """
    budget = _device.working_set_bytes(cost.device)
    per_problem = cost.shape[-2] * cost.shape[-1] * cost.element_size()
    nb = cost.shape[0]
    size = nb if budget is None else max(1, budget // per_problem)
    if size >= nb:
        return _solve(cost, la, lb, eps, tol, max_iter, check_every, anneal, relaxation)[:6]
    outs: list[Any] = [None] * 6
    pieces: list[Any] = [slice(i, min(i + size, nb)) for i in range(0, nb, size)]
    first = True
    while pieces:
        last = not first and len(pieces) == 1
        paused_all = []
        for sel in pieces:
            count = sel.stop - sel.start if isinstance(sel, slice) else sel.numel()
            resume = {} if first else {"g_start": outs[1][sel], "k_start": outs[3][sel]}
            *res, paused = _solve(cost[sel], la[sel], lb[sel], eps[sel], tol, max_iter, check_every,
                                  anneal if first else None, relaxation, pause_below=0 if last else count // 4,
                                  **resume)
            for j, column in enumerate(res):
                if outs[j] is None:
                    outs[j] = torch.empty((nb, *column.shape[1:]), dtype=column.dtype, device=column.device)
                outs[j][sel] = column
            if bool(paused.any()):
                ids = torch.arange(sel.start, sel.stop, device=cost.device) if isinstance(sel, slice) else sel
                paused_all.append(ids[paused])
        todo = torch.cat(paused_all) if paused_all else None
        pieces = [] if todo is None else [todo[i:i + size] for i in range(0, todo.numel(), size)]
        first = False
    return tuple(outs)


def _solve(cost, la, lb, eps, tol, max_iter, check_every, anneal, relaxation, g_start=None, k_start=None,
           pause_below=0):
    """The Sinkhorn loop over the batch ``(B, n, m)``; returns ``f, g, error, iterations, sum P, <C, P>``
    and a ``paused`` mask.

    ``g_start`` and ``k_start`` (per problem) resume problems from column potentials after
    ``k_start`` iterations. With ``pause_below > 0``, as soon as a check leaves between 1 and
    ``pause_below`` problems unfinished, those stop there with their current potentials and
    iteration counts and ``paused`` set; their ``sum P`` and ``<C, P>`` are not computed (see
    :func:`_solve_in_pieces`). The marginal error is checked every ``check_every`` iterations of
    this call (with "auto" relaxation also once after half as many) and at each problem's last
    iteration. Problems that end stay in the working arrays, masked out of ``live``, until they
    are an eighth of those still running: dropping them copies the kernels of the rest.

    Between anchors the state is the pair of scalings ``u = exp((f - f0)/eps)``,
    ``v = exp((g - g0)/eps)``, with the plan ``diag(a u) K diag(b v)``: a row update is
    ``u = 1 / (K (b v))`` and a column update ``v = 1 / (K^T (a u))``, exactly the log-domain
    soft-min updates. Whenever a scaling leaves ``[exp(-tau), exp(tau)]`` the problem is re-anchored.
    """
    nb, n, m = cost.shape
    dtype, dev = cost.dtype, cost.device
    tau, floor, ceil = _floors(dtype, max(n, m))
    bounds = (floor, ceil)
    lo, hi = math.exp(-tau), math.exp(tau)
    f_out = torch.zeros(nb, n, dtype=dtype, device=dev)
    g_out = torch.zeros(nb, m, dtype=dtype, device=dev)
    err_out = torch.full((nb,), math.inf, dtype=dtype, device=dev)
    it_out = torch.zeros(nb, dtype=torch.int64, device=dev)
    mass_out = torch.zeros(nb, dtype=dtype, device=dev)
    lin_out = torch.zeros(nb, dtype=dtype, device=dev)
    a_all, b_all = torch.exp(la), torch.exp(lb)
    auto = relaxation == "auto"
    relaxed = auto or relaxation != 1.0
    omega = torch.full((nb, 1), 1.0 if auto else relaxation, dtype=dtype, device=dev)
    plain = not relaxed or auto              # every omega is 1: the plain update, no powers
    prev_err = torch.full((nb,), math.inf, dtype=dtype, device=dev)

    paused = torch.zeros(nb, dtype=torch.bool, device=dev)
    g = torch.zeros(nb, m, dtype=dtype, device=dev) if g_start is None else g_start.clone()
    k0 = torch.zeros(nb, dtype=torch.int64, device=dev) if k_start is None else k_start.clone()
    if anneal is not None:           # epsilon-scaling: one exact iteration per level
        e_cur = torch.maximum(cost.amax((-2, -1)), eps)
        k = 0
        while k < max_iter and bool((e_cur > eps).any()):
            _, kern = _anchor(cost, g, lb, b_all, e_cur, bounds)
            g = g - e_cur.view(-1, 1) * torch.log(_cols(kern, a_all))
            k += 1
            e_cur = torch.maximum(e_cur * anneal, eps)
        k0 = k0 + k

    idx = torch.arange(nb, device=dev)
    lb_act, e_act, a_w, b_w = lb, eps, a_all, b_all
    live = torch.ones(nb, dtype=torch.bool, device=dev)     # the problems still running (ended ones
    nb_live = nb                                            # stay in the arrays until compacted)
    f0, kern = _anchor(cost, g, lb_act, b_w, e_act, bounds)
    g0 = g
    u = torch.ones(nb, n, dtype=dtype, device=dev)
    v = torch.ones(nb, m, dtype=dtype, device=dev)
    first_limit = max_iter - int(k0.max()) if nb else 0     # local iteration at which the first problem stops

    def potentials(u, v, f0, g0, e):
        ev = e.view(-1, 1)
        return f0 + ev * torch.log(u), g0 + ev * torch.log(v)

    def reanchor(sel):
        # integer rows and index_select / index_copy_: boolean-mask indexing of the (B, n, m) arrays
        # is several times slower, and small epsilon in float32 re-anchors a few problems per iteration
        nonlocal f0, g0, u, v
        rows = sel.nonzero().squeeze(-1)
        pick = lambda t: t.index_select(0, rows)             # noqa: E731  (rows of the working arrays)
        e_sel = pick(e_act)
        _, g_sel = potentials(pick(u), pick(v), pick(f0), pick(g0), e_sel)
        f_sel, kern_sel = _anchor(cost.index_select(0, pick(idx)), g_sel, pick(lb_act), pick(b_w), e_sel, bounds)
        f0, g0 = f0.index_copy(0, rows, f_sel), g0.index_copy(0, rows, g_sel)
        kern.index_copy_(0, rows, kern_sel)
        u, v = u.index_fill(0, rows, 1.0), v.index_fill(0, rows, 1.0)

    def update(x, sums):
        """One half-iteration's scalings from the sums ``K (b v)`` or ``K^T (a u)``, and the problems
        whose scalings left the range."""
        nonlocal omega
        if plain:
            new = torch.reciprocal(sums)
            return new, _out_of_range(new, lo, hi)
        new, omega, far = _relaxed(x, sums, omega, lo, hi)
        return new, far

    j = 0                                        # iterations done in this call
    t = None                                     # K^T (a u) of the last column update
    j_prev = 0                                   # iteration of the last check
    early = max(1, check_every // 2)             # "auto" checks once early too: its first estimate
                                                 # of omega comes half a check interval sooner
    while True:
        bv = b_w * v
        s = _rows(kern, bv)                                       # K (b v)
        if (j % check_every == 0 and j > 0) or j >= first_limit or (auto and j == early):
            au = a_w * u
            if t is None:                                         # K^T (a u) unless the last column
                t = _cols(kern, au)                               # update left it (same u, same K)
            err = (au * s - a_w).abs().sum(-1) + (bv * t - b_w).abs().sum(-1)
            k_now = k0 + j
            ended = ((err <= tol) | (k_now >= max_iter)) & live
            done = ended
            if pause_below:
                left = int((live & ~ended).sum())
                if 0 < left <= pause_below:
                    done = live
            if relaxed:
                omega, prev_err = _adapt(omega, err, prev_err, auto, j - j_prev)
                j_prev = j
            if bool(done.any()):
                live = live & ~done
                every = not bool(live.any())
                sel = slice(None) if every and nb_live == live.numel() else done   # no copies when all end at once
                finished = idx[sel]
                f_out[finished], g_out[finished] = potentials(u[sel], v[sel], f0[sel], g0[sel], e_act[sel])
                err_out[finished], it_out[finished] = err[sel], k_now[sel]
                stop = ended[sel]
                paused[finished] = ~stop
                if bool(stop.any()):                                # sums for the problems that end here
                    rows = ended.nonzero().squeeze(-1)              # (ended lies within done)
                    mine = idx.index_select(0, rows)
                    au_s, bv_s = au.index_select(0, rows), bv.index_select(0, rows)
                    mass_out[mine] = (au_s * s.index_select(0, rows)).sum(-1)
                    lin_out[mine] = (au_s * _weighted_rows(kern, cost, rows, mine, bv_s)).sum(-1)
                if every:
                    break
                nb_live = int(live.sum())
                if (live.numel() - nb_live) * _COMPACT >= nb_live:
                    # each compaction copies the kernels, about the cost of one iteration of the batch
                    keep = live.nonzero().squeeze(-1)               # integer rows: index_select is
                    idx, k0 = idx.index_select(0, keep), k0.index_select(0, keep)    # faster than a mask
                    kern, f0, g0, u, v, s, t = (x.index_select(0, keep) for x in (kern, f0, g0, u, v, s, t))
                    live = torch.ones(keep.numel(), dtype=torch.bool, device=dev)
                    if relaxed:
                        omega, prev_err = omega.index_select(0, keep), prev_err.index_select(0, keep)
                    lb_act, e_act, a_w, b_w = lb[idx], eps[idx], a_all[idx], b_all[idx]
                first_limit = max_iter - int(k0[live].max())
            if relaxed:
                plain = bool((omega == 1.0).all())
        u, far = update(u, s)
        if far is not None:
            reanchor(far)
        t = _cols(kern, a_w * u)                                  # K^T (a u)
        v, far = update(v, t)
        j += 1
        if far is not None:
            reanchor(far)
            t = None                             # the kernels changed: the column sums are stale
    return f_out, g_out, err_out, it_out, mass_out, lin_out, paused
