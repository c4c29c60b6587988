"""Local analyses on windows of a 1-d grid: the LETKF and the LETPF for grids too large for one tensor.

:func:`daml.filters.letkf` and :func:`daml.filters.letpf` build their local problems for all ``n``
grid points at once: a dense ``(n, m)`` taper and an ``(n, N, m)`` tensor of whitened observation
anomalies (LETKF), a dense ``(n, n)`` state taper and ``(n, N, N)`` costs (LETPF). That is quadratic in
``n`` and impossible at ``n = 10^5``. The Gaspari-Cohn taper is *exactly* zero from its support
``s = 2 * 1.82 * radius`` on (:data:`~daml.filters.letkf.HALF_WIDTH_PER_RADIUS`), so the analysis of
grid point ``j`` only ever reads the ``2 h + 1`` points ``j - h .. j + h`` with

.. math::

    h = \\operatorname{halo}(\\text{radius}) = \\max\\{d \\in \\mathbb{Z} : d < s\\} = \\lceil s \\rceil - 1 .

This module computes the same local analyses from such windows, for *selection* observations on the
grid: at most one observation per grid point, each sitting on its point. The observations are then
grid-aligned arrays: ``y`` ``(..., n)`` (any value where nothing is observed, NaN included) and
``precision`` ``(..., n)``, ``1 / r_k`` at an observed point and 0 elsewhere, which is a diagonal ``R``
and the observation mask in one array.

LETKF (Hunt, Kostelich & Szunyogh 2007). Point ``j`` is an ETKF whose observation ``j + o``
(``|o| <= h``) counts with the precision ``rho(|o|) / r_{j+o}``, ``rho`` the Gaspari-Cohn taper: with
the ensemble anomalies ``A``, innovations ``d = y - mean(x)`` and the whitened observation anomalies
``Y_j[:, o] = A[:, j + o] sqrt(rho(|o|) / r_{j+o})``, the transform of
:func:`daml.filters.enkf._sqrt_transform` (the one :func:`~daml.filters.letkf` calls, without rotation)
updates column ``j``. Only the ``2 h + 1`` columns of the window enter, where the dense filter sums
over all ``m`` observations, most with weight exactly zero: the two agree to rounding.

LETPF (Reich & Cotter 2015; Farchi & Bocquet 2018), with equal prior weights and no rejuvenation, so
deterministic. Point ``j`` weighs member ``i`` by its local log-likelihood
``-1/2 sum_o rho(|o|) precision_{j+o} (y_{j+o} - x_{i, j+o})^2``, compares members with the tapered
cost ``C^j_ik = sum_o rho(|o|) (x_{i, j+o} - x_{k, j+o})^2`` and moves its variable by the optimal
transport plan of :func:`daml.transport.ensemble_transform` (one problem per grid point, the call
:func:`~daml.filters.letpf` makes, with the same defaults).

Windows and rings. :func:`letkf_window` / :func:`letpf_window` take a window of ``w = B + 2 g``
consecutive points (not periodic inside the window) and return the analysis of the ``B`` interior
points ``g .. w - g - 1``; the margin ``g`` must be at least ``halo(radius)`` (a wider margin is
allowed and does not change the result: only ``halo(radius)`` neighbours are read). This is what a
blocked, distributed analysis needs: each block travels with its halo and returns its interior.
:func:`letkf_local` / :func:`letpf_local` do a whole periodic domain (a ring such as Lorenz-96) by
padding it periodically. When the taper reaches around the ring (``2 h + 1 > n``, ``radius = inf``
included) each point instead reads every point of the ring once, at its periodic distance: the
offsets ``-((n - 1) // 2) .. n // 2``, so that, like the dense filters, no point is counted twice.

Work and memory are linear in ``n``: the interior is processed in sub-blocks of ``block`` points
(default: the largest whose biggest temporary, ``(block, N, max(N, 2h+1))`` for the LETKF and
``(block, N, N)`` for the LETPF, stays within 64 MiB), with no Python loop over single points.

Exactness. A point's LETKF analysis is computed with the same operations on the same numbers
whatever window or block holds it, so blocked and windowed results are equal bit for bit (on one
machine and torch build; tests assert it). Three things needed care: the mean over members is summed
member by member (torch's reduction over a strided axis rounds differently with the slice's width);
a block of a single problem is solved in a batch of two (a batch of one takes BLAS's matrix-vector
kernels); and every matrix the eigensolver sees starts on a 16-byte boundary (MKL's symmetric
eigensolver rounds differently otherwise, which in a compact batch depends on the matrix's
position): ``2h+1`` is padded with zero-weight columns to a multiple of 4, and an odd ``N`` decomposed
in ensemble space is spread over a batch with zero problems in between (two times the work in
float64, four in float32).
The LETPF with the exact solver (``solver="emd"``) is bitwise blocking-invariant too. With the
batched Sinkhorn solver a problem's result depends on its batch companions: over-relaxation
(``relaxation="auto"``) switches the update of *every* problem of a batch to the relaxed form as soon
as *one* is relaxed, and cache-sized pieces pause and resume problems by batch. The differences are
bounded by the tolerance ``tol``; measured, about ``1e-13`` in float64.

References
----------
* B. R. Hunt, E. J. Kostelich and I. Szunyogh (2007), Efficient data assimilation for
  spatiotemporal chaos: a local ensemble transform Kalman filter. *Physica D* 230, 112-126.
* S. Reich and C. Cotter (2015), *Probabilistic Forecasting and Bayesian Data Assimilation*, CUP.
* A. Farchi and M. Bocquet (2018), Review article: Comparison of local particle filters and new
  implementations. *Nonlin. Processes Geophys.* 25, 765-807.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch

from .. import _device
from ..errors import ConvergenceWarning, DtypeError, InputError, NonFiniteError, ShapeError
from ..transport.transform import check_solver, check_transport_params, ensemble_transform
from .enkf import _sqrt_transform
from .letkf import HALF_WIDTH_PER_RADIUS, _check_radius, gaspari_cohn

__all__ = ["halo", "letkf_window", "letkf_local", "letpf_window", "letpf_local"]

_BLOCK_BYTES = 64 * 2**20
"""The largest temporary a sub-block of the interior may allocate (the default ``block``)."""


# -- checks and shared pieces ------------------------------------------------------------------------------

def _support(radius: float) -> float:
    return 2.0 * HALF_WIDTH_PER_RADIUS * radius


def _halo(radius: float) -> int:
    """:func:`halo` of a checked radius."""
    if not math.isfinite(radius):
        raise InputError("radius", "a finite localisation radius", repr(radius),
                         hint="radius=inf is a global analysis, which has no halo")
    return max(0, math.ceil(_support(radius)) - 1)


def halo(radius: float) -> int:
    """The number of grid points on each side that a local analysis with ``radius`` reads.

    The Gaspari-Cohn taper with the :func:`~daml.filters.letkf` convention is zero from the support
    ``s = 3.64 radius`` on, so the halo is the largest integer ``d < s``, ``ceil(s) - 1``.

    Parameters
    ----------
    radius : float
        Localisation radius in grid points (positive and finite).

    Returns
    -------
    int
        ``h >= 0``: grid point ``j`` sees observations and state variables ``j - h .. j + h``.

    Raises
    ------
    InputError
        Naming ``radius`` if it is not positive, or infinite (a global analysis has no halo).

    Examples
    --------
    >>> halo(1.0), halo(2.0), halo(4.0)
    (3, 7, 14)
    """
    return _halo(_check_radius(radius))


def _check_block(block: Any) -> int | None:
    if block is None:
        return None
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise InputError("block", "None or a positive int (grid points per sub-block)", repr(block))
    return int(block)


def _check_margin(margin: Any, need: int) -> int:
    if isinstance(margin, bool) or not isinstance(margin, numbers.Integral) or margin < need:
        raise InputError("halo", f"an int >= {need} (the halo of the radius: points the taper reaches)", repr(margin))
    return int(margin)


def _check_fields(x: Any, y: Any, precision: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` ``(*b, N, w)`` and ``y``, ``precision`` broadcast to ``(*b, w)`` in ``x``'s dtype, checked."""
    x = _device.as_tensor(x, "x")
    if x.dtype not in (torch.float32, torch.float64):
        raise DtypeError("x", "float32 or float64 members", f"dtype {x.dtype}")
    if x.ndim < 2 or x.shape[-2] < 2 or x.shape[-1] < 1:
        raise ShapeError("x", "an ensemble of shape (..., N, w) with N >= 2 members and w >= 1 grid points",
                         f"shape {tuple(x.shape)}")
    field = tuple(x.shape[:-2]) + (x.shape[-1],)
    out = []
    for name, value in (("y", y), ("precision", precision)):
        t = _device.as_tensor(value, name, dtype=x.dtype, device=x.device)
        try:
            ok = torch.broadcast_shapes(t.shape, field) == field
        except RuntimeError:
            ok = False
        if not ok:
            raise ShapeError(name, f"shape {field} (one value per grid point of x; leading dims may broadcast)",
                             f"shape {tuple(t.shape)}")
        out.append(t.expand(field))
    y, p = out
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("x", "finite members", "NaN or infinite entries")
    if not bool(torch.isfinite(p).all()):
        raise NonFiniteError("precision", "finite precisions 1/r (0 where unobserved)", "NaN or infinite entries")
    if bool((p < 0).any()):
        raise InputError("precision", "non-negative precisions 1/r (0 where unobserved)",
                         f"a minimum of {float(p.min()):.3g}")
    if not bool(torch.isfinite(y[p > 0]).all()):
        raise NonFiniteError("y", "finite observations wherever precision > 0", "NaN or infinite observed values")
    return x, y, p


def _taper(left: int, right: int, support: float, like: torch.Tensor) -> torch.Tensor:
    """``rho(|o|)`` for the offsets ``o = -left .. right`` ``(K,)``, computed in float64."""
    off = torch.arange(-left, right + 1, dtype=torch.float64)
    return gaspari_cohn(off, support).to(dtype=like.dtype, device=like.device)


def _ring_reach(n: int, radius: float) -> tuple[int, int]:
    """The offsets ``(left, right)`` each point of a ring of ``n`` reads: the halo on both sides, or
    the whole ring once (``-((n-1)//2) .. n//2``) when the taper reaches around it."""
    if math.isfinite(radius):
        h = _halo(radius)
        if 2 * h + 1 <= n:
            return h, h
    return (n - 1) // 2, n // 2


def _pad_ring(t: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Periodic padding of the last axis (``left, right < n``)."""
    n = t.shape[-1]
    return torch.cat([t[..., n - left:], t, t[..., :right]], dim=-1) if left or right else t


def _default_block(x: torch.Tensor, per_point: int) -> int:
    """Points per sub-block so that a ``(*b, block, per_point)`` temporary fits in :data:`_BLOCK_BYTES`."""
    batch = math.prod(x.shape[:-2])
    return max(1, _BLOCK_BYTES // max(1, batch * per_point * x.element_size()))


def _unfold(t: torch.Tensor, k: int) -> torch.Tensor:
    """``(..., L) -> (..., L - k + 1, k)``: the ``k`` consecutive entries around each point (a view)."""
    return t.unfold(-1, k, 1)


def _member_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over members ``(*b, N, L) -> (*b, 1, L)``, summed member by member in a fixed order.

    ``x.mean(-2)`` is not used: torch vectorises that reduction over the points in groups whose
    rounding depends on the slice's width, so a point's mean would depend on its window."""
    total = x[..., 0, :]
    for i in range(1, x.shape[-2]):
        total = total + x[..., i, :]
    return (total / x.shape[-2]).unsqueeze(-2)


def _flat_batch(*tensors: torch.Tensor, keep: tuple[int, ...]) -> tuple[list[torch.Tensor], bool]:
    """Each tensor reshaped to one contiguous batch axis (its last ``keep[i]`` axes kept), and repeated
    twice when that batch has a single problem.

    A batch of one matrix product goes through a different BLAS kernel (a matrix-vector product) than
    a batch of many, with different rounding; a lone problem is therefore solved as a batch of two
    copies, so that every point's result is the same whatever block it is computed in."""
    flat = [t.reshape(-1, *t.shape[t.ndim - k:]).contiguous() for t, k in zip(tensors, keep)]
    single = flat[0].shape[0] == 1
    if single:
        flat = [torch.cat([t, t]) for t in flat]
    return flat, single


def _spread_out(t: torch.Tensor, step: int) -> torch.Tensor:
    """``t`` ``(B, ...)`` placed at every ``step``-th problem of a zero batch ``(B * step, ...)``."""
    if step == 1:
        return t.contiguous()
    out = torch.zeros((t.shape[0] * step, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[::step] = t
    return out


def _aligned_sqrt_transform(cols: torch.Tensor, yw: torch.Tensor, dw: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~daml.filters.enkf._sqrt_transform` of ``(B, N, 1)``, ``(B, N, K)``, ``(B, K)`` problems,
    each computed as it would be in any other batch.

    Two things make a batched result depend on the batch: a batch of one takes other BLAS kernels
    (matrix-vector products), and MKL's symmetric eigensolver rounds differently when a matrix does
    not start on a 16-byte boundary, which in a compact batch of ``D x D`` matrices with ``D^2``
    itemsize not a multiple of 16 depends on the matrix's position. So ``K`` is padded with zero
    columns (observations of weight zero, which change nothing) to a multiple of 4, and when the
    matrix to decompose still has an unaligned size (``N`` odd in ensemble space) or the batch is a
    single problem, the problems are spread out over a larger batch, the gaps filled with zero
    problems."""
    n_mem, k = yw.shape[-2], yw.shape[-1]
    pad = (-k) % 4
    if pad:
        yw = torch.nn.functional.pad(yw, (0, pad))
        dw = torch.nn.functional.pad(dw, (0, pad))
    dim = n_mem if n_mem <= k + pad else k + pad                   # the matrix _sqrt_transform decomposes
    step = 16 // math.gcd(16, dim * dim * yw.element_size())
    if yw.shape[0] == 1:
        step = max(step, 2)
    inc, t_cols = _sqrt_transform(_spread_out(cols, step), _spread_out(yw, step), _spread_out(dw, step))
    return inc[::step], t_cols[::step]


def _tapered_sum(t: torch.Tensor, taper: torch.Tensor, count: int) -> torch.Tensor:
    """``sum_o taper[o] t[..., o : o + count]``, offset by offset in a fixed order (elementwise, so each
    point's sum does not depend on the block it is computed in)."""
    out = taper[0] * t[..., :count]
    for o in range(1, taper.numel()):
        out = out + taper[o] * t[..., o:o + count]
    return out


# -- LETKF ---------------------------------------------------------------------------------------------

def _letkf_blocks(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, taper: torch.Tensor, left: int, right: int,
                  start: int, count: int, block: int | None) -> torch.Tensor:
    """The LETKF analysis ``(*b, N, count)`` of points ``start .. start + count - 1`` of ``x`` (which
    must hold ``left`` points before and ``right`` after them), ``block`` points at a time."""
    k = left + right + 1
    n_mem = x.shape[-2]
    if block is None:
        block = _default_block(x, n_mem * max(n_mem, k))
    out = torch.empty(*x.shape[:-1], count, dtype=x.dtype, device=x.device)
    for s in range(0, count, block):
        bs = min(block, count - s)
        lo, hi = start + s - left, start + s + bs + right
        xs, ys, ps = x[..., lo:hi], y[..., lo:hi], p[..., lo:hi]
        xm = _member_mean(xs)                                                     # (*b, 1, L)
        anom = xs - xm                                                            # (*b, N, L)
        d = torch.where(ps > 0, ys - xm.squeeze(-2), 0.0)                         # (*b, L)
        root = (_unfold(ps, k) * taper).sqrt()                                   # (*b, bs, K)
        yw = _unfold(anom, k).transpose(-3, -2) * root.unsqueeze(-2)              # (*b, bs, N, K)
        dw = _unfold(d, k) * root                                                 # (*b, bs, K)
        cols = anom[..., left:left + bs].transpose(-1, -2).unsqueeze(-1)          # a_j, (*b, bs, N, 1)
        inc, t_cols = _aligned_sqrt_transform(cols.reshape(-1, n_mem, 1), yw.reshape(-1, n_mem, k),
                                              dw.reshape(-1, k))                  # (B, 1, 1), (B, N, 1)
        inc = inc.reshape(*cols.shape[:-2], 1)                                    # (*b, bs, 1)
        t_cols = t_cols.reshape(*cols.shape[:-2], n_mem)                          # (*b, bs, N)
        out[..., s:s + bs] = xm[..., left:left + bs] + inc.mT + t_cols.mT
    return out


def letkf_window(x: Any, y: Any, precision: Any, radius: float, halo: int, *, block: int | None = None
                 ) -> torch.Tensor:
    """The LETKF analysis of the interior of a window of the grid.

    Parameters
    ----------
    x : tensor (*b, N, w)
        Forecast ensemble on ``w`` consecutive grid points (not periodic inside the window),
        ``N >= 2`` members, float32 or float64.
    y : tensor (*b, w)
        Observed values on the grid (any value, NaN included, where ``precision`` is 0). Leading
        dimensions broadcast.
    precision : tensor (*b, w)
        ``1 / r`` at observed points, 0 elsewhere (non-negative, finite). Leading dimensions broadcast.
    radius : float
        Localisation radius in grid points, the :func:`~daml.filters.letkf` convention (finite).
    halo : int
        The window's margin ``g`` on each side, at least :func:`halo` ``(radius)``: the interior is
        ``x[..., g : w - g]``. A wider margin gives the same result (only ``halo(radius)``
        neighbours are read).
    block : int, optional
        Interior points per sub-block (default: temporaries of at most 64 MiB). Does not change the
        result.

    Returns
    -------
    torch.Tensor
        The analysis ensemble ``(*b, N, w - 2 g)`` of the interior points.

    Raises
    ------
    InputError, ShapeError, NonFiniteError, DtypeError
        Naming ``radius`` (not positive, or infinite), ``halo`` (below ``halo(radius)``), ``x`` (fewer
        than 2 members, ``w < 2 g + 1``, not finite), ``y`` or ``precision`` (shape, NaN at an observed
        point, negative precision) or ``block``.

    Examples
    --------
    >>> x = torch.randn(20, 36, dtype=torch.float64)          # 20 members, 8 interior points + 2 * 14
    >>> y, precision = torch.zeros(36), torch.ones(36)
    >>> letkf_window(x, y, precision, radius=4.0, halo=14).shape
    torch.Size([20, 8])
    >>> letkf_window(x, y, precision, 3.0, 13, block=3).shape     # a margin wider than halo(3.0) = 10
    torch.Size([20, 10])
    """
    rad = _check_radius(radius)
    need = _halo(rad)
    g = _check_margin(halo, need)
    blk = _check_block(block)
    x, y, p = _check_fields(x, y, precision)
    w = x.shape[-1]
    if w < 2 * g + 1:
        raise ShapeError("x", f"a window of at least 2 * halo + 1 = {2 * g + 1} grid points", f"{w} points")
    taper = _taper(need, need, _support(rad), x)
    return _letkf_blocks(x, y, p, taper, need, need, g, w - 2 * g, blk)


def letkf_local(x: Any, y: Any, precision: Any, radius: float, *, block: int | None = None) -> torch.Tensor:
    """The LETKF analysis of a whole periodic 1-d domain (a ring such as Lorenz-96), window by window.

    Equal, to rounding, to the analysis of :func:`daml.filters.letkf` ``(N, radius)`` (``rotate=False``)
    with a selection operator, a diagonal ``R`` and the same mask, at memory and work linear in ``n``.

    Parameters
    ----------
    x : tensor (*b, N, n)
        Forecast ensemble, ``N >= 2`` members on a ring of ``n`` points.
    y, precision : tensor (*b, n)
        Observations on the grid and their precisions ``1 / r`` (0 where unobserved), as for
        :func:`letkf_window`.
    radius : float
        Localisation radius in grid points; ``math.inf`` (or any radius whose taper reaches around the
        ring, ``2 halo(radius) + 1 > n``) makes every point read each point of the ring once at its
        periodic distance, which is what the dense filter does (with ``inf``: the ETKF).
    block : int, optional
        Grid points per sub-block (default: temporaries of at most 64 MiB); does not change the result.

    Returns
    -------
    torch.Tensor
        The analysis ensemble ``(*b, N, n)``.

    Examples
    --------
    >>> x = 8.0 + torch.randn(40, 1000, dtype=torch.float64)
    >>> y, precision = torch.zeros(1000), torch.ones(1000)
    >>> letkf_local(x, y, precision, radius=4.0).shape
    torch.Size([40, 1000])
    >>> xa = letkf_local(x, y, precision * (torch.arange(1000) % 2 == 0), 4.0, block=100)  # every 2nd point
    >>> xa = letkf_local(x.unsqueeze(0).expand(3, 40, 1000), y, precision, 2.0)           # a batch of 3
    """
    rad = _check_radius(radius)
    blk = _check_block(block)
    x, y, p = _check_fields(x, y, precision)
    n = x.shape[-1]
    left, right = _ring_reach(n, rad)
    taper = _taper(left, right, _support(rad), x)
    return _letkf_blocks(_pad_ring(x, left, right), _pad_ring(y, left, right), _pad_ring(p, left, right), taper,
                         left, right, left, n, blk)


# -- LETPF ---------------------------------------------------------------------------------------------

def _transport_settings(epsilon: Any, solver: Any, tol: Any, max_iter: Any, second_order: Any) -> dict:
    eps, tol, max_iter = check_transport_params(epsilon, tol, max_iter)
    if not isinstance(second_order, bool):
        raise InputError("second_order", "True or False", repr(second_order))
    return {"solver": check_solver(solver), "epsilon": eps, "tol": tol, "max_iter": max_iter,
            "second_order": second_order}


def _letpf_blocks(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, taper: torch.Tensor, left: int, right: int,
                  start: int, count: int, block: int | None, transport: dict) -> torch.Tensor:
    """The LETPF analysis ``(*b, N, count)`` of points ``start .. start + count - 1`` of ``x``."""
    n_mem = x.shape[-2]
    if block is None:
        block = _default_block(x, n_mem * n_mem)
    out = torch.empty(*x.shape[:-1], count, dtype=x.dtype, device=x.device)
    unconverged = 0
    for s in range(0, count, block):
        bs = min(block, count - s)
        lo, hi = start + s - left, start + s + bs + right
        xs, ys, ps = x[..., lo:hi], y[..., lo:hi], p[..., lo:hi]
        innov = torch.where(ps.unsqueeze(-2) > 0, ys.unsqueeze(-2) - xs, 0.0)      # (*b, N, L)
        local_ll = -0.5 * _tapered_sum(innov**2 * ps.unsqueeze(-2), taper, bs)     # (*b, N, bs)
        diff2 = (xs.unsqueeze(-2) - xs.unsqueeze(-3)) ** 2                         # (*b, N, N, L)
        cost = _tapered_sum(diff2, taper, bs).movedim(-1, -3)                     # (*b, bs, N, N)
        members = xs[..., left:left + bs].transpose(-1, -2).unsqueeze(-1)         # (*b, bs, N, 1)
        # contiguous (B, N) rows before the softmax: a reduction over a strided axis rounds differently
        # with the block's width
        (mem_f, ll_f, cost_f), single = _flat_batch(members, local_ll.transpose(-1, -2), cost, keep=(2, 1, 2))
        res = ensemble_transform(mem_f, torch.log_softmax(ll_f, dim=-1), cost=cost_f, **transport)
        xa, conv = (res.x[:1], res.converged[:1]) if single else (res.x, res.converged)
        out[..., s:s + bs] = xa.reshape(*members.shape[:-2], n_mem).transpose(-1, -2)
        unconverged += int((~conv).sum())
    if unconverged:
        warnings.warn(f"letpf: {unconverged} of {count * math.prod(x.shape[:-2])} local transport problems did not "
                      f"reach tol={transport['tol']:g} in max_iter={transport['max_iter']} iterations",
                      ConvergenceWarning, stacklevel=3)
    return out


def letpf_window(x: Any, y: Any, precision: Any, radius: float, halo: int, *, epsilon: float = 0.05,
                 solver: str = "sinkhorn", tol: float = 1e-6, max_iter: int = 2000, second_order: bool = False,
                 block: int | None = None) -> torch.Tensor:
    """The local ETPF analysis of the interior of a window of the grid (equal prior weights, no
    rejuvenation: deterministic).

    Parameters
    ----------
    x, y, precision, radius, halo, block
        As for :func:`letkf_window`.
    epsilon, solver, tol, max_iter, second_order
        The transport settings of :func:`daml.filters.letpf` (same defaults): one problem per
        interior point, :func:`daml.transport.ensemble_transform` with the tapered cost.

    Returns
    -------
    torch.Tensor
        The analysis ensemble ``(*b, N, w - 2 halo)`` of the interior points. Sinkhorn problems that
        miss ``tol`` within ``max_iter`` are returned as they are, with a
        :class:`~daml.errors.ConvergenceWarning`.

    Examples
    --------
    >>> x, y, precision = torch.randn(10, 30, dtype=torch.float64), torch.zeros(30), torch.ones(30)
    >>> letpf_window(x, y, precision, radius=2.0, halo=7).shape                 # 30 = 16 + 2 * 7
    torch.Size([10, 16])
    >>> xa = letpf_window(x, y, precision, 2.0, 7, solver="emd", block=5)
    """
    rad = _check_radius(radius)
    need = _halo(rad)
    g = _check_margin(halo, need)
    blk = _check_block(block)
    transport = _transport_settings(epsilon, solver, tol, max_iter, second_order)
    x, y, p = _check_fields(x, y, precision)
    w = x.shape[-1]
    if w < 2 * g + 1:
        raise ShapeError("x", f"a window of at least 2 * halo + 1 = {2 * g + 1} grid points", f"{w} points")
    taper = _taper(need, need, _support(rad), x)
    return _letpf_blocks(x, y, p, taper, need, need, g, w - 2 * g, blk, transport)


def letpf_local(x: Any, y: Any, precision: Any, radius: float, *, epsilon: float = 0.05, solver: str = "sinkhorn",
                tol: float = 1e-6, max_iter: int = 2000, second_order: bool = False, block: int | None = None
                ) -> torch.Tensor:
    """The local ETPF analysis of a whole periodic 1-d domain, window by window.

    Equal (exactly with ``solver="emd"``, to the Sinkhorn tolerance otherwise) to the analysis of
    :func:`daml.filters.letpf` ``(N, radius, rejuvenation=0)`` with a selection operator, diagonal
    ``R``, the same mask and equal prior weights.

    Parameters
    ----------
    x, y, precision, radius, block
        As for :func:`letkf_local` (a taper reaching around the ring reads each point once).
    epsilon, solver, tol, max_iter, second_order
        As for :func:`letpf_window`.

    Returns
    -------
    torch.Tensor
        The analysis ensemble ``(*b, N, n)``.

    Examples
    --------
    >>> x, y, precision = torch.randn(10, 50, dtype=torch.float64), torch.zeros(50), torch.ones(50)
    >>> xa = letpf_local(x, y, precision, radius=2.0)                            # Sinkhorn, tol 1e-6
    >>> xa = letpf_local(x, y, precision, 2.0, solver="emd")                      # exact transport
    >>> xa = letpf_local(x, y, precision, 4.0, epsilon=0.1, tol=1e-9, max_iter=20_000, block=16)
    """
    rad = _check_radius(radius)
    blk = _check_block(block)
    transport = _transport_settings(epsilon, solver, tol, max_iter, second_order)
    x, y, p = _check_fields(x, y, precision)
    n = x.shape[-1]
    left, right = _ring_reach(n, rad)
    taper = _taper(left, right, _support(rad), x)
    return _letpf_blocks(_pad_ring(x, left, right), _pad_ring(y, left, right), _pad_ring(p, left, right), taper,
                         left, right, left, n, blk, transport)
