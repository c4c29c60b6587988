r"""Resampling schemes for weighted particle systems.

A particle approximation :math:`\sum_i w_i \delta_{x_i}` with normalised weights :math:`w_i` is turned
into an equally weighted one by drawing ``n`` *ancestor* indices :math:`a_1, \dots, a_n` so that the
number of copies (the *offspring count*) :math:`N_i = \#\{j : a_j = i\}` of particle :math:`i` has
expectation :math:`n w_i`. All four schemes here are unbiased in that sense; they differ in the
variance of :math:`N_i`, in cost, and in the dependence between the draws (Douc & Cappé 2005 compare
them; Hol, Schön & Gustafsson 2006 discuss cost and variance).

Write :math:`C_i = \sum_{k \le i} w_k` for the cumulative weights (with :math:`C_{-1} = 0` and
:math:`C_{N-1} = 1`) and choose ancestor :math:`i` for a point :math:`u \in [0, 1)` when
:math:`C_{i-1} \le u < C_i`. The schemes differ only in how the ``n`` points are chosen:

multinomial
    :math:`u_j \sim \mathcal U[0, 1)` independently: the offspring counts are multinomial,
    :math:`\operatorname{Var} N_i = n w_i (1 - w_i)`. The textbook reference, and the noisiest.
stratified (Kitagawa 1996)
    :math:`u_j = (j + U_j) / n` with independent :math:`U_j \sim \mathcal U[0, 1)`: one point in each
    of ``n`` equal strata of :math:`[0, 1)`.
systematic (Kitagawa 1996; Carpenter, Clifford & Fearnhead 1999)
    :math:`u_j = (j + U) / n` with a single :math:`U` per problem. Then
    :math:`N_i = \lceil n C_i - U \rceil - \lceil n C_{i-1} - U \rceil`, which is always
    :math:`\lfloor n w_i \rfloor` or :math:`\lceil n w_i \rceil`. Cheapest and usually the least
    noisy, though not provably better than stratified in every case (Douc & Cappé 2005).
residual (Liu & Chen 1998)
    Particle :math:`i` first gets :math:`\lfloor n w_i \rfloor` copies deterministically; the remaining
    :math:`R = n - \sum_i \lfloor n w_i \rfloor` ancestors are drawn multinomially from the residual
    weights :math:`n w_i - \lfloor n w_i \rfloor`.

Conventions
-----------
* ``weights`` has shape ``(..., N)``: particles on the **last** axis, any number of leading batch
  axes (many problems resampled at once). They need not be normalised; every batch row is
  normalised on its own. The result holds ``int64`` ancestor indices of shape ``(..., n)`` on the
  device of ``weights``.
* A particle of weight exactly zero is never selected, by construction rather than with high
  probability: the cumulative sums are divided by their own last entry, so a run of zero weights
  gives a run of *identical* :math:`C_i` (and :math:`C_{N-1} = 1` exactly), and every point is
  located with ``searchsorted(..., right=True)`` for :math:`u < 1`, which can only land on an index
  where :math:`C` strictly increases. Systematic resampling counts the points in each interval
  directly instead (O(N + n) per row, no binary search), with the same guarantee; its counts are
  computed exactly in float64, so every row gets exactly ``n`` ancestors whatever the rounding.
* Randomness comes from :func:`daml._device.generator` only. Each function draws all of its
  uniforms in one ``torch.rand`` call shaped ``(rows, n)`` (``(rows, 1)`` for systematic) in
  batch-row order. On the CPU the generator fills a tensor element after element, so resampling a
  batch of rows with a fresh generator gives exactly the ancestors obtained by resampling the rows
  one after the other while passing the *same* :class:`torch.Generator` along (the tests check this
  for all four schemes). On CUDA the stream is counter-based and this equality is not promised.
  Same seed, same device: the same ancestors, bit for bit on the CPU.

Differentiable resampling
-------------------------
Resampling draws discrete ancestors, so the new particles are piecewise constant in the weights and
ordinary backpropagation sees no dependence on them at all: the gradient of a particle filter's
output with respect to the parameters that shaped the weights is lost (and the gradient of a
log-likelihood estimate is biased). Three remedies are offered, all with the signature
``(x, log_weight, ...) -> Resampled`` for particles ``x`` ``(*batch, N, n)`` and log-weights
``(*batch, N)`` (normalised or not; ``-inf`` marks a zero weight), and dispatched by name by
:func:`differentiable` (the names are :data:`DIFFERENTIABLE`):

:func:`stop_gradient` (Scibior & Wood 2021)
    The forward pass is ordinary resampling, unchanged: the ancestors are drawn exactly as
    :func:`daml.filters.particle.resample_where` draws them, the new log-weights have the value
    ``-log N`` exactly. Each new log-weight is written ``lw[a] - stop(lw[a]) - log N``, which is zero
    plus a constant in value but carries the derivative of the ancestor's log-weight. For any test
    function ``phi``, the gradient of ``sum_j w'_j phi(x'_j)`` is then, in expectation over the
    ancestors, exactly the gradient of ``sum_i w_i phi(x_i)``: the estimator is **unbiased**. It is
    a score-function (REINFORCE-type) estimator, so its variance grows with the spread of the
    weights' derivatives; it needs no tuning and costs nothing beyond resampling.
:func:`soft` (Karkus, Hsu & Lee 2018)
    Ancestors are drawn from the mixture ``q = alpha w + (1 - alpha) / N`` and reweighted by
    importance, ``w'_j ∝ w[a_j] / q[a_j]``, so the new weights depend on the old ones smoothly and
    the gradient passes through them. Unnormalised (``normalise=False``: ``w'_j = w[a_j] /
    (N q[a_j])``), weighted expectations *and* their gradients are unbiased; normalised (the
    default, weights summing to one) they are consistent with an ``O(1/N)`` bias, as any
    self-normalised estimate. ``alpha`` trades the two costs: ``alpha = 1`` is ordinary resampling
    (equal weights in value; with ``q`` held constant the gradient is then the stop-gradient one),
    and as ``alpha -> 0`` the ancestors become uniform and the resampling stops removing
    low-weight particles (the weights stay as uneven as before).
:func:`optimal_transport` (Corenflos, Thornton, Deligiannidis & Doucet 2021)
    Deterministic: the weighted ensemble is moved to an equally weighted one by the entropic
    optimal-transport map of :func:`daml.transport.ensemble_transform` (``solver="sinkhorn"``),
    ``x'_j = N sum_i P_ij x_i``. The map is smooth in ``x`` and ``log_weight`` and differentiated
    implicitly (no unrolled iterations); the new equally weighted mean equals the weighted mean to
    the Sinkhorn tolerance. Its bias is the entropic blur: the new members are contracted towards
    the mean, so the covariance is too small by an amount that vanishes with ``epsilon`` (the
    regularisation as a fraction of the mean squared distance between members), while the
    gradients grow noisier and the iterations more numerous as ``epsilon`` shrinks. Cost:
    ``O(N^2)`` memory and work per iteration, and an ``N x N`` solve in the backward pass.

Scibior, A. & Wood, F. (2021). Differentiable particle filtering without modifying the forward
pass. arXiv:2106.10314.

Karkus, P., Hsu, D. & Lee, W. S. (2018). Particle filter networks with application to visual
localization. *Proceedings of the 2nd Conference on Robot Learning (CoRL)*, PMLR 87.

Corenflos, A., Thornton, J., Deligiannidis, G. & Doucet, A. (2021). Differentiable particle
filtering via entropy-regularized optimal transport. *Proceedings of the 38th International
Conference on Machine Learning (ICML)*, PMLR 139.

References
----------
Kitagawa, G. (1996). Monte Carlo filter and smoother for non-Gaussian nonlinear state space models.
*Journal of Computational and Graphical Statistics* 5(1), 1--25.

Liu, J. S. & Chen, R. (1998). Sequential Monte Carlo methods for dynamic systems. *Journal of the
American Statistical Association* 93(443), 1032--1044.

Carpenter, J., Clifford, P. & Fearnhead, P. (1999). Improved particle filter for nonlinear problems.
*IEE Proceedings - Radar, Sonar and Navigation* 146(1), 2--7.

Douc, R. & Cappé, O. (2005). Comparison of resampling schemes for particle filtering. *Proceedings
of the 4th International Symposium on Image and Signal Processing and Analysis (ISPA)*, 64--69.

Hol, J. D., Schön, T. B. & Gustafsson, F. (2006). On resampling algorithms for particle filters.
*IEEE Nonlinear Statistical Signal Processing Workshop*, 79--82.

Examples
--------
>>> import torch
>>> from daml import resampling
>>> w = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]])
>>> anc = resampling.systematic(w, seed=0)          # shape (2, 4), int64
>>> resampling.offspring_counts(anc, 4).sum(-1)
tensor([4, 4])
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Union

import numpy as np
import torch

from ._device import Seed, as_tensor, generator
from .errors import (ConvergenceWarning, DivergenceError, DtypeError, InputError, NonFiniteError, ShapeError, check_fits,
                     check_real)

__all__ = [
    "METHODS",
    "multinomial",
    "systematic",
    "stratified",
    "residual",
    "resample",
    "offspring_counts",
    "Resampled",
    "DIFFERENTIABLE",
    "stop_gradient",
    "soft",
    "optimal_transport",
    "differentiable",
]

ArrayLike = Union[torch.Tensor, np.ndarray]


# --------------------------------------------------------------------------------------------------
# validation and shared pieces

# Rows of the systematic scheme are processed in chunks of about this many elements, so that its
# scratch buffers stay small (and in cache on the CPU) whatever the batch size. On CUDA each chunk
# costs a host synchronisation (the row checks), so chunks are much larger there.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}


def _check_n(n: Any, default: int) -> int:
    if n is None:
        return default
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError("n", "a positive int (the number of ancestors to draw) or None", repr(n))
    return int(n)


def _validate(weights: Any, n: Any) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """Check ``weights`` and ``n`` and flatten the batch axes.

    Returns the weights as a ``(B, N)`` float32/float64 tensor (a view where possible), the batch
    shape and ``n``. Row-wise conditions (an all-zero row) are checked later, by :func:`_cdf` or
    :func:`_row_totals`, where the row sums are computed anyway.
    """
    w = as_tensor(weights, "weights")
    if w.ndim == 0:
        raise ShapeError("weights", "an array of shape (..., N) with particles on the last axis",
                         "a 0-d scalar")
    n_particles = w.shape[-1]
    if n_particles == 0:
        raise ShapeError("weights", "at least one particle on the last axis", f"shape {tuple(w.shape)}")
    n = _check_n(n, n_particles)
    rows = float(np.prod(w.shape[:-1], dtype=float))
    # int64 ancestors and float64 uniforms (or counts) per drawn index: refuse at once what cannot fit
    check_fits("n", rows * n * 16.0, what=f"n={n} ancestors in each of {int(rows)} rows")
    w = _widen_half(w)
    batch_shape = tuple(w.shape[:-1])
    w = w.reshape(-1, n_particles)
    if w.numel() == 0:
        return w, batch_shape, n
    # One pass finds NaN (it propagates through both), +inf, -inf and negative entries.
    smallest, largest = torch.aminmax(w)
    if not (torch.isfinite(smallest) and torch.isfinite(largest)):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(torch.isinf(w).sum())
        raise NonFiniteError("weights", "finite values", f"{n_nan} NaN and {n_inf} infinite entries")
    if smallest < 0:
        n_neg = int((w < 0).sum())
        raise InputError("weights", "non-negative values",
                         f"{n_neg} negative entries, the smallest {float(smallest):g}")
    return w, batch_shape, n


def _widen_half(w: torch.Tensor) -> torch.Tensor:
    """Half-precision weights as float32: too coarse for cumulative sums."""
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


def _rows_ok(total: torch.Tensor) -> bool:
    return bool(((total > 0) & torch.isfinite(total)).all())


def _rescue_rows(w: torch.Tensor, total: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Handle rows whose sum is zero or overflows; ``w`` and ``full`` hold finite, non-negative values.

    Raises for an all-zero row (counting them over ``full``, the whole batch) and otherwise returns a
    ``(rows, 1)`` divisor: the row maximum for rows whose sum overflows, 1 elsewhere. After division
    such a row sums to at most ``N``.
    """
    if bool((total == 0).any()):
        zero_rows = int((full.amax(dim=-1) == 0).sum())
        raise InputError("weights", "at least one positive weight in every batch row",
                         f"{zero_rows} all-zero row(s) out of {full.shape[0]}")
    return torch.where(torch.isfinite(total), torch.ones_like(total), w.amax(dim=-1, keepdim=True))


def _cdf(
    w: torch.Tensor, out: torch.Tensor | None = None, full: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row cumulative weights divided by their own last entry.

    The result is non-decreasing along each row (cumsum of non-negative numbers is, and division by
    a positive number is monotone), lies in ``[0, 1]``, has a last column of exactly 1.0 (``x / x``
    is 1 in IEEE arithmetic), and repeats the same value over any run of zero weights.

    Parameters
    ----------
    w : (rows, N) tensor
        Validated weights.
    out : (rows, N) tensor, optional
        Buffer to write into.
    full : (B, N) tensor, optional
        The whole batch ``w`` belongs to, for the error message.
    """
    cdf = torch.cumsum(w, dim=-1, out=out)
    total = cdf[:, -1:].clone()  # a copy: dividing by a view of the tensor being written would race
    if not _rows_ok(total):
        scale = _rescue_rows(w, total, w if full is None else full)
        w = w / scale
        torch.cumsum(w, dim=-1, out=cdf)
    if cdf.device.type != "cpu":
        _tie_zero_weights(cdf, w)
    total = cdf[:, -1:].clone()
    return cdf.div_(total)


def _tie_zero_weights(cdf: torch.Tensor, w: torch.Tensor) -> None:
    """Make ``cdf`` non-decreasing with exact ties over zero weights, in place.

    On the CPU ``torch.cumsum`` adds sequentially along the row (float32 through a float64
    accumulator), so adding a zero weight repeats the previous value exactly and the sums never
    decrease. A GPU computes the prefix sums with a parallel scan, where neighbouring entries come
    from different association orders and may differ by a rounding error even across a zero weight.
    There each zero-weight entry is replaced by the largest sum up to the previous positive weight
    (0 before the first one): a running maximum over the positive-weight entries only.
    """
    cdf.masked_fill_(w == 0, float("-inf"))
    cdf.copy_(torch.cummax(cdf, dim=-1).values).clamp_min_(0.0)


def _below_one(u: torch.Tensor) -> torch.Tensor:
    """Clamp points into ``[0, 1)`` in place.

    A point ``(j + U) / n`` lies in ``[0, 1)`` in exact arithmetic, but for ``j = n - 1`` and ``U``
    within half an ulp of 1 the floating-point sum can round to exactly 1.0. Clamping to the largest
    float below 1 moves such a point by one rounding error only. It is what makes the lookup safe:
    with ``u < 1 = cdf[..., -1]``, ``searchsorted(cdf, u, right=True)`` returns an index ``i <= N - 1``
    with ``cdf[i - 1] <= u < cdf[i]``, so ``cdf[i] > cdf[i - 1]`` and particle ``i`` has positive weight.
    """
    top = torch.nextafter(torch.ones((), dtype=u.dtype, device=u.device),
                          torch.zeros((), dtype=u.dtype, device=u.device))
    return torch.minimum(u, top, out=u)


def _locate(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Ancestor of each point: the ``i`` with ``cdf[i-1] <= u < cdf[i]`` (``u`` must be below 1)."""
    return torch.searchsorted(cdf, u.to(cdf.dtype), right=True)


def _expand_bounds(bounds: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted ancestors from cumulative offspring counts (used by the residual scheme).

    ``bounds[:, i]`` (int64, non-decreasing, values in ``[0, n]``) is the number of output slots
    taken by particles ``0..i``; particle ``i`` owns the slots ``bounds[i-1] <= j < bounds[i]``. The
    ancestor of slot ``j`` is then ``#{i < N - 1 : bounds[i] <= j}``: a 1 is scattered at each end
    position and a cumulative sum counts them. A particle with no slots (``bounds[i] ==
    bounds[i-1]``) is never an ancestor, and only ``N - 1`` marks exist, so every ancestor is
    ``<= N - 1``.
    """
    rows, n_particles = bounds.shape
    marks = torch.zeros(rows, n + 1, dtype=torch.int64, device=bounds.device)
    if n_particles > 1:
        ones = torch.ones((), dtype=torch.int64, device=bounds.device).expand(rows, n_particles - 1)
        marks.scatter_add_(1, bounds[:, :-1], ones)  # column n collects the ends at n; dropped
    return marks[:, :n].cumsum(dim=1)


def _finish(ancestors: torch.Tensor, batch_shape: tuple[int, ...], n: int) -> torch.Tensor:
    return ancestors.reshape(*batch_shape, n)


# --------------------------------------------------------------------------------------------------
# the cores: validated (B, N) weights and explicit uniforms


def _multinomial_core(w: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``uniforms``: (B, n) in [0, 1) (overwritten).

    ``torch.rand`` already returns values below 1; the clamp only guards that contract.
    """
    return _locate(_cdf(w), _below_one(uniforms))


def _stratified_core(w: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``uniforms``: (B, n) in [0, 1) (overwritten); point ``j`` is ``(j + uniforms[:, j]) / n``.

    In exact arithmetic the point is below 1; ``_below_one`` undoes the rare rounding up to 1.0.
    """
    n = uniforms.shape[-1]
    j = torch.arange(n, dtype=uniforms.dtype, device=uniforms.device)
    points = uniforms.add_(j).div_(n)
    return _locate(_cdf(w), _below_one(points))


def _systematic_core(w: torch.Tensor, uniform: torch.Tensor, n: int) -> torch.Tensor:
    """``w``: validated (B, N) weights; ``uniform``: (B, 1) in [0, 1), one offset per row.

    **Counts.** With ``x_i = n C_i``, particle ``i`` owns the slots ``j`` with
    ``x_{i-1} <= j + U < x_i``, so particles ``0..i`` own ``bounds_i = #{j : j + U < x_i} =
    ceil(x_i - U)`` slots. Rounding ``x - U`` could break this (for ``x = n`` and ``U`` within half an
    ulp of 1, ``n - U`` rounds to ``n - 1``, which would hand the last slot to a zero-weight particle
    at the end), so it is evaluated exactly: with ``f = floor(x)`` and the fraction ``x - f`` (exact in
    IEEE arithmetic), ``j + U < x`` holds for every ``j < f`` and for ``j = f`` iff ``U < x - f``:
    ``bounds = f + (U < x - f)``. ``x`` is formed in float64 from ``C`` in ``[0, 1]``; it is monotone
    in ``C``, 0 at ``C = 0`` and exactly ``n`` at ``C = 1`` (``n < 2**53``). Hence ``bounds`` is
    non-decreasing, starts at ``>= 0`` and ends at exactly ``n`` (``f = n``, fraction 0): every row
    yields exactly ``n`` ancestors, and a zero weight repeats ``C``, ``x`` and ``bounds``: no copy.

    **Expansion.** The ancestor of slot ``j`` is ``#{i < N-1 : bounds_i <= j}`` (the particles that
    end at or before ``j``): a 1 is scattered at every end position and a cumulative sum counts them,
    O(N + n) per row with no binary search. All rows share one flat buffer of ``B n + 1`` counters,
    row ``b`` scattering at ``b n + bounds_{b,i}`` for all ``N`` particles; the ends of row ``b`` that
    fall on ``b n + n`` are then counted from row ``b + 1`` on. So the flat cumulative sum at
    ``b n + j`` equals ``b N`` (every end of the earlier rows lies at or before ``b n``) plus the
    ancestor, and the row offset ``b N`` is subtracted. The last particle's end, ``n``, never counts
    within its own row, so every ancestor is ``<= N - 1``; only particles that own slots are counted
    past, so only they appear.

    On the CPU this is several times faster than a binary search of the points (``torch.searchsorted``;
    ``benchmarks/resampling.py`` times both) and faster than expanding the counts with
    ``repeat_interleave`` (tried during development). Rows are processed in chunks through small
    scratch buffers, so the memory beyond the ``(B, n)`` output stays at a few MiB.
    """
    rows_total, n_particles = w.shape
    device = w.device
    chunk = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cuda"])
    rows = max(1, min(rows_total, chunk // n_particles))
    x = torch.empty(rows, n_particles, dtype=torch.float64, device=device)
    f = torch.empty_like(x)
    c = x if w.dtype == torch.float64 else torch.empty(rows, n_particles, dtype=w.dtype, device=device)
    u64 = uniform.to(torch.float64)
    marks = torch.zeros(rows_total * n + 1, dtype=torch.int64, device=device)
    one = torch.ones((), dtype=torch.int64, device=device)
    for s in range(0, rows_total, rows):
        r = min(rows, rows_total - s)
        xc, fc = x[:r], f[:r]
        cdf = _cdf(w[s:s + r], out=c[:r], full=w)
        if cdf.data_ptr() != xc.data_ptr():
            xc.copy_(cdf)                                  # float32 cdf -> float64
        xc.mul_(n)                                         # x = n C
        torch.floor(xc, out=fc)
        xc.sub_(fc).gt_(u64[s:s + r])                      # exact fraction, then 1.0 where U < x - f
        fc.add_(xc)                                        # bounds, integer-valued, in [0, n]
        pos = xc.view(torch.int64).copy_(fc)               # x is free again: reuse it for int64
        pos.add_(torch.arange(s, s + r, device=device).mul_(n).unsqueeze(1))
        marks.scatter_add_(0, pos.view(-1), one.expand(r * n_particles))
    marks.cumsum_(dim=0)
    ancestors = marks[: rows_total * n].view(rows_total, n)
    return ancestors.sub_(torch.arange(rows_total, device=device).mul_(n_particles).unsqueeze(1))


def _row_totals(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 weights and their positive, finite row sums (rescaling rows whose sum overflows)."""
    w64 = w.to(torch.float64)
    total = w64.sum(dim=-1, keepdim=True)
    if not _rows_ok(total):
        w64 = w64 / _rescue_rows(w64, total, w)
        total = w64.sum(dim=-1, keepdim=True)
    return w64, total


def _residual_core(w: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``w``: validated (B, N) weights; ``uniforms``: (B, n) in [0, 1) (overwritten).

    Every output slot ``j`` gets two candidates: the deterministic ancestor (slot ``j`` of the sorted
    run of ``floor(n w_i)`` copies) and a multinomial draw from the residual weights using
    ``uniforms[:, j]``. ``torch.where(j < D)`` keeps the first for the ``D = sum floor(n w_i)``
    deterministic slots of the row and the second for the rest; the uniforms of the deterministic
    slots are drawn but unused, which keeps one ``torch.rand`` call per batch while the number of
    residual draws differs from row to row. Computed in float64.
    """
    n = uniforms.shape[-1]
    w64, total = _row_totals(w)
    nw = w64 / total
    nw.mul_(n)
    floors = torch.floor(nw)
    residual = nw - floors                                 # exact, >= 0, 0 where w == 0
    det_bounds = torch.cumsum(floors, dim=-1)              # integer-valued, exact below 2**53
    deterministic = det_bounds[:, -1:].to(torch.int64)     # D per row
    # In exact arithmetic D <= n. With rounding, sum(nw) = n (1 + d), |d| < (N + 2) 2**-53, so D <= n
    # whenever n (N + 2) < 2**53; clipping the positions at n only affects slots >= n, which are
    # dropped, and never creates an index of a particle without deterministic copies.
    det_ancestors = _expand_bounds(det_bounds.clamp_(max=n).to(torch.int64), n)

    # Rows with no residual mass (all n w_i integers) need no residual draw in exact arithmetic, and
    # the rounding bound above gives D == n there as well. Should a row ever combine D < n with zero
    # residual mass, it draws its remainder from the weights themselves, so the lookup below always
    # sees a proper cumulative distribution and lands on a positive-weight particle.
    no_residual = residual.sum(dim=-1, keepdim=True) == 0
    residual = torch.where(no_residual, nw, residual)
    res_ancestors = _locate(_cdf(residual), _below_one(uniforms))

    slot = torch.arange(n, device=w.device)
    return torch.where(slot < deterministic, det_ancestors, res_ancestors)


_CORES: dict[str, Callable[..., torch.Tensor]] = {
    "multinomial": lambda w, u, n: _multinomial_core(w, u),
    "stratified": lambda w, u, n: _stratified_core(w, u),
    "systematic": _systematic_core,
    "residual": lambda w, u, n: _residual_core(w, u),
}


def _with_uniforms(
    method: str, weights: ArrayLike, uniforms: ArrayLike, n: int | None = None
) -> torch.Tensor:
    """Run scheme ``method`` on given uniforms instead of drawing them (tests and benchmarks).

    ``uniforms`` has shape ``(..., 1)`` for systematic and ``(..., n)`` otherwise, values in
    ``[0, 1)``; it is not modified. The public functions are exactly ``_with_uniforms`` applied to
    ``torch.rand`` of that shape.
    """
    w, batch_shape, n = _validate(weights, n)
    width = 1 if method == "systematic" else n
    u = as_tensor(uniforms, "uniforms", device=w.device)
    if tuple(u.shape) != (*batch_shape, width):
        raise ShapeError("uniforms", f"shape {(*batch_shape, width)}", f"shape {tuple(u.shape)}")
    if w.shape[0] == 0:
        return torch.empty(*batch_shape, n, dtype=torch.int64, device=w.device)
    u = u.reshape(w.shape[0], width).to(w.dtype, copy=True)
    return _finish(_CORES[method](w, u, n), batch_shape, n)


# --------------------------------------------------------------------------------------------------
# public API


def _draw(method: str, weights: ArrayLike, n: int | None, seed: Seed) -> torch.Tensor:
    """Validate, draw all uniforms of the batch in one ``torch.rand`` call, run the core."""
    w, batch_shape, n = _validate(weights, n)
    return _draw_valid(method, w, batch_shape, n, generator(seed, device=w.device))


def resample_normalised(weights: torch.Tensor, method: str, g: torch.Generator) -> torch.Tensor:
    """:func:`resample` for weights the caller has made finite, non-negative and normalised (the
    exponentials of normalised log-weights): the same draws from the same stream, without the checks
    of the weights and ``method`` (for filters, which resample at every analysis)."""
    weights = _widen_half(weights)
    n = weights.shape[-1]
    return _draw_valid(method, weights.reshape(-1, n), tuple(weights.shape[:-1]), n, g)


def _draw_valid(method: str, w: torch.Tensor, batch_shape: tuple[int, ...], n: int, g: torch.Generator) -> torch.Tensor:
    """The draw for valid ``(B, N)`` weights ``w`` (the batch flattened) and ``n`` ancestors per row."""
    if w.shape[0] == 0:
        return torch.empty(*batch_shape, n, dtype=torch.int64, device=w.device)
    width = 1 if method == "systematic" else n
    # Rows in batch order, each row's uniforms contiguous: on the CPU the stream is consumed element
    # by element, so this equals drawing row after row from the same generator.
    uniforms = torch.rand((w.shape[0], width), generator=g, dtype=w.dtype, device=w.device)
    return _finish(_CORES[method](w, uniforms, n), batch_shape, n)


def multinomial(weights: ArrayLike, n: int | None = None, *, seed: Seed = None) -> torch.Tensor:
    r"""Multinomial resampling: ``n`` independent draws from the weights.

    Parameters
    ----------
    weights : (..., N) tensor or array
        Non-negative, finite weights, particles on the last axis; each batch row needs at least one
        positive entry. Normalised per row internally.
    n : int, optional
        Number of ancestors per row (default ``N``).
    seed : int, numpy.random.SeedSequence, torch.Generator or None
        Random stream (see :func:`daml._device.generator`). A generator is advanced.

    Returns
    -------
    ancestors : (..., n) torch.LongTensor
        Indices into the last axis of ``weights``, in the order drawn (not sorted).

    Raises
    ------
    NonFiniteError, InputError, ShapeError
        For NaN/inf, negative or all-zero weights, an empty or 0-d ``weights``, or a bad ``n``.
    """
    return _draw("multinomial", weights, n, seed)


def stratified(weights: ArrayLike, n: int | None = None, *, seed: Seed = None) -> torch.Tensor:
    r"""Stratified resampling: one uniform point in each stratum ``[j/n, (j+1)/n)``.

    Parameters
    ----------
    weights : (..., N) tensor or array
        Non-negative, finite weights, particles on the last axis (normalised per row internally).
    n : int, optional
        Number of ancestors per row (default ``N``).
    seed : int, numpy.random.SeedSequence, torch.Generator or None
        Random stream; a generator is advanced.

    Returns
    -------
    ancestors : (..., n) torch.LongTensor
        Sorted (non-decreasing) along the last axis.

    Notes
    -----
    The points are formed in the dtype of ``weights``; in float32 they are exact only for
    ``n < 2**24``.
    """
    return _draw("stratified", weights, n, seed)


def systematic(weights: ArrayLike, n: int | None = None, *, seed: Seed = None) -> torch.Tensor:
    r"""Systematic resampling: the points ``(j + U) / n`` share a single uniform ``U`` per row.

    Offspring counts are computed directly, ``N_i = ceil(n C_i - U) - ceil(n C_{i-1} - U)`` (done
    exactly, see the module notes), and expanded into sorted ancestors in O(N + n) per row, without a
    binary search. Every particle gets ``floor(n w_i)`` or ``ceil(n w_i)`` copies.

    Parameters
    ----------
    weights : (..., N) tensor or array
        Non-negative, finite weights, particles on the last axis (normalised per row internally).
    n : int, optional
        Number of ancestors per row (default ``N``).
    seed : int, numpy.random.SeedSequence, torch.Generator or None
        Random stream; a generator is advanced by one draw per batch row.

    Returns
    -------
    ancestors : (..., n) torch.LongTensor
        Sorted (non-decreasing) along the last axis.
    """
    return _draw("systematic", weights, n, seed)


def residual(weights: ArrayLike, n: int | None = None, *, seed: Seed = None) -> torch.Tensor:
    r"""Residual resampling: ``floor(n w_i)`` copies for sure, the rest drawn multinomially.

    The remaining ``n - sum_i floor(n w_i)`` ancestors of each row are drawn from the residual weights
    ``n w_i - floor(n w_i)``. The computation is float64 whatever the dtype of ``weights``.

    Parameters
    ----------
    weights : (..., N) tensor or array
        Non-negative, finite weights, particles on the last axis (normalised per row internally).
    n : int, optional
        Number of ancestors per row (default ``N``).
    seed : int, numpy.random.SeedSequence, torch.Generator or None
        Random stream; a generator is advanced by ``n`` draws per batch row (those of the
        deterministic slots are drawn and not used).

    Returns
    -------
    ancestors : (..., n) torch.LongTensor
        The deterministic copies first (sorted), then the residual draws in the order drawn.
    """
    return _draw("residual", weights, n, seed)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "multinomial": multinomial,
    "systematic": systematic,
    "stratified": stratified,
    "residual": residual,
}
"""The resampling schemes by name, as :func:`resample` accepts them."""


def resample(
    weights: ArrayLike,
    method: str = "systematic",
    n: int | None = None,
    *,
    seed: Seed = None,
) -> torch.Tensor:
    """Resample with the scheme named ``method`` (a key of :data:`METHODS`).

    Parameters
    ----------
    weights : (..., N) tensor or array
        Non-negative, finite weights, particles on the last axis.
    method : str
        One of ``"multinomial"``, ``"systematic"``, ``"stratified"``, ``"residual"``.
    n : int, optional
        Number of ancestors per row (default ``N``).
    seed : int, numpy.random.SeedSequence, torch.Generator or None
        Random stream.

    Returns
    -------
    ancestors : (..., n) torch.LongTensor
    """
    try:
        scheme = METHODS[method]
    except (KeyError, TypeError):  # TypeError: unhashable method
        raise InputError("method", f"one of {sorted(METHODS)}", repr(method)) from None
    return scheme(weights, n, seed=seed)


def offspring_counts(ancestors: ArrayLike, n_particles: int) -> torch.Tensor:
    """Number of copies of each particle among the ancestors.

    Parameters
    ----------
    ancestors : (..., n) integer tensor or array
        Ancestor indices in ``[0, n_particles)``, as returned by the resampling functions.
    n_particles : int
        ``N``, the number of particles resampled from.

    Returns
    -------
    counts : (..., n_particles) torch.LongTensor
        ``counts[..., i]`` is how often ``i`` occurs in ``ancestors[..., :]``; each row sums to ``n``.
    """
    if isinstance(n_particles, (bool, np.bool_)) or not isinstance(n_particles, (int, np.integer)) \
            or n_particles < 1:
        raise InputError("n_particles", "a positive int", repr(n_particles))
    a = as_tensor(ancestors, "ancestors", floating=False)
    if a.dtype == torch.bool or a.is_floating_point() or a.is_complex():
        raise DtypeError("ancestors", "integer indices", f"dtype {a.dtype}")
    if a.ndim == 0:
        raise ShapeError("ancestors", "an array of shape (..., n)", "a 0-d scalar")
    a = a.to(torch.int64)
    check_fits("n_particles", 8.0 * math.prod(a.shape[:-1]) * float(n_particles),
               what=f"n_particles={int(n_particles)} (counts of shape {(*a.shape[:-1], int(n_particles))})",
               device=a.device)
    counts = torch.zeros(*a.shape[:-1], int(n_particles), dtype=torch.int64, device=a.device)
    if a.numel() == 0:
        return counts
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= n_particles:
        raise InputError("ancestors", f"indices in [0, {int(n_particles)})", f"values in [{lo}, {hi}]")
    ones = torch.ones((), dtype=torch.int64, device=a.device).expand(a.shape)
    return counts.scatter_add_(-1, a, ones)


# --------------------------------------------------------------------------------------------------
# differentiable resampling (see the module notes)


class Resampled(NamedTuple):
    """What the differentiable resamplers return for particles ``x`` ``(*batch, N, n)``."""

    x: torch.Tensor
    """The new particles ``(*batch, N, n)``, differentiable with respect to the old ones."""
    log_weight: torch.Tensor
    """Their log-weights ``(*batch, N)``: normalised (``logsumexp`` 0 over the last axis) except for
    :func:`soft` with ``normalise=False``."""
    ancestors: torch.Tensor | None
    """``int64`` ancestor indices ``(*batch, N)``, or ``None`` for :func:`optimal_transport` (no
    particle has a single ancestor)."""


DIFFERENTIABLE = ("stop_gradient", "soft", "optimal_transport")
"""The names :func:`differentiable` accepts."""


def _check_particles(x: Any, log_weight: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(*batch, N, n)`` and ``log_weight`` ``(*batch, N)`` checked, on one device and dtype.

    Autograd is kept (tensors are converted with ``Tensor.to``). The log-weights may be unnormalised
    and may hold ``-inf`` (zero weight), but no NaN or ``+inf``, and each row needs a finite entry.
    """
    x = as_tensor(x, "x")
    if x.ndim < 2 or x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ShapeError("x", "particles of shape (*batch, N, n) with N, n >= 1", f"shape {tuple(x.shape)}")
    x = _widen_half(x)
    lw = as_tensor(log_weight, "log_weight", dtype=x.dtype, device=x.device)
    if tuple(lw.shape) != tuple(x.shape[:-1]):
        raise ShapeError("log_weight", f"shape {tuple(x.shape[:-1])} (one per particle of x)",
                         f"shape {tuple(lw.shape)}")
    if x.numel() and not bool(torch.isfinite(x.detach()).all()):
        n_bad = int((~torch.isfinite(x.detach())).sum())
        raise NonFiniteError("x", "finite particles", f"{n_bad} NaN or infinite entries")
    if lw.numel():
        d = lw.detach()
        if bool(torch.isnan(d).any()) or bool((d == math.inf).any()):
            raise NonFiniteError("log_weight", "log-weights without NaN or +inf (-inf is a zero weight)",
                                 f"{int(torch.isnan(d).sum())} NaN and {int((d == math.inf).sum())} +inf entries")
        dead = ~torch.isfinite(d).any(-1)
        if bool(dead.any()):
            raise InputError("log_weight", "at least one finite log-weight in every batch row",
                             f"{int(dead.sum())} all -inf row(s) out of {dead.numel()}")
    return x, lw


def _check_scheme(scheme: Any) -> str:
    if not isinstance(scheme, str) or scheme not in METHODS:
        raise InputError("scheme", f"one of {sorted(METHODS)}", repr(scheme))
    return scheme


def _draw_log(log_w: torch.Tensor, scheme: str, g: torch.Generator) -> torch.Tensor:
    """Ancestors for (detached) log-weights ``(*batch, N)``: ``resample_normalised(exp(log_w))``.

    Rows whose largest log-weight lies within ``[-50, 50]`` (normalised ones, in particular) are
    exponentiated as they are, which is exactly the call :func:`daml.filters.particle.resample_where`
    makes with normalised log-weights, hence the same ancestors from the same stream. Other rows are
    shifted by their maximum first, so that ``exp`` neither overflows nor underflows.
    """
    top = log_w.amax(-1, keepdim=True)
    shift = torch.where(top.abs() <= 50.0, torch.zeros_like(top), top)
    return resample_normalised(torch.exp(log_w - shift) if bool((shift != 0).any()) else torch.exp(log_w),
                               scheme, g)


def _gather(x: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """``x[..., ancestors[..., j], :]`` (the same gather as :func:`daml.filters.particle.gather_members`)."""
    return torch.gather(x, -2, ancestors.unsqueeze(-1).expand(*ancestors.shape, x.shape[-1]))


def stop_gradient(x: Any, log_weight: Any, *, scheme: str = "multinomial", seed: Seed = None) -> Resampled:
    r"""Stop-gradient resampling (Scibior & Wood 2021): ordinary resampling whose weights carry gradients.

    The forward values are those of ordinary resampling, bit for bit: the ancestors are
    ``resample_normalised(exp(log_weight), scheme, g)`` (the call of
    :func:`daml.filters.particle.resample_where`; rows far from normalised are shifted by their
    maximum first), the new particles ``x[a]`` and the new log-weights exactly ``-log N``. Each new
    log-weight is computed as ``lw[a] - stop(lw[a]) - log N`` with ``lw`` the normalised log-weights,
    so its derivative is that of the ancestor's log-weight, and for any ``phi`` the gradient of
    ``sum_j w'_j phi(x'_j)`` is an unbiased estimate of the gradient of ``sum_i w_i phi(x_i)``.

    Parameters
    ----------
    x : (*batch, N, n) tensor
        Particles; gradients flow through the gathered copies.
    log_weight : (*batch, N) tensor
        Log-weights, normalised or not (``-inf``: zero weight, never drawn).
    scheme : str
        A resampling scheme of :data:`METHODS` (default ``"multinomial"``).
    seed : int, numpy.random.SeedSequence, torch.Generator or None
        Random stream (:func:`daml._device.generator`); a generator is advanced.

    Returns
    -------
    Resampled
        ``x`` ``(*batch, N, n)``, ``log_weight`` ``(*batch, N)`` (value ``-log N``), ``ancestors``
        ``(*batch, N)`` int64.

    Raises
    ------
    ShapeError, NonFiniteError, InputError, DtypeError, SeedError
        Naming ``x``, ``log_weight``, ``scheme`` or ``seed``.
    """
    x, lw = _check_particles(x, log_weight)
    scheme = _check_scheme(scheme)
    g = generator(seed, device=x.device)
    n_particles = x.shape[-2]
    ancestors = _draw_log(lw.detach(), scheme, g)
    lwn = torch.log_softmax(lw, -1)
    picked = torch.gather(lwn, -1, ancestors)
    new_lw = (picked - picked.detach()) - math.log(n_particles)
    return Resampled(_gather(x, ancestors), new_lw, ancestors)


def soft(x: Any, log_weight: Any, *, alpha: float = 0.5, scheme: str = "multinomial", normalise: bool = True,
         seed: Seed = None) -> Resampled:
    r"""Soft resampling (Karkus, Hsu & Lee 2018): draw from a mixture with the uniform, reweight by importance.

    Ancestors are drawn from ``q = alpha w + (1 - alpha) / N`` (held constant for differentiation) and
    the new weights are ``w'_j = w[a_j] / (N q[a_j])``; gradients flow through ``w[a_j]`` and the
    gathered particles. With ``normalise=False`` these weights are returned as they are: their sum has
    expectation 1, and ``E[sum_j w'_j phi(x'_j)] = sum_i w_i phi(x_i)`` for every ``phi``, gradients
    included (unbiased for every scheme of :data:`METHODS`, each having ``E[copies_i] = N q_i``).
    Keep them unnormalised in a particle filter whose likelihood estimate must stay unbiased. With
    ``normalise=True`` (the default) they are normalised to sum to one, a self-normalised estimate:
    consistent, with an ``O(1/N)`` bias.

    ``alpha = 1`` is ordinary resampling: the weights ``w[a] / q[a]`` are equal in value, and because
    ``q`` is held constant their gradient is that of :func:`stop_gradient` (exactly so with
    ``normalise=False``). Smaller ``alpha`` keeps more gradient signal in the weights and leaves them
    less even after resampling (``alpha -> 0``: uniform ancestors, the weights unchanged in law).

    Parameters
    ----------
    x : (*batch, N, n) tensor
        Particles.
    log_weight : (*batch, N) tensor
        Log-weights, normalised or not (``-inf``: zero weight, never drawn when ``alpha = 1``; when
        drawn with ``alpha < 1`` it keeps weight zero).
    alpha : float
        Mixing weight in ``(0, 1]``.
    scheme : str
        A resampling scheme of :data:`METHODS` (default ``"multinomial"``).
    normalise : bool
        Normalise the new log-weights (default) or keep the unbiased, unnormalised ones.
    seed : int, numpy.random.SeedSequence, torch.Generator or None
        Random stream; a generator is advanced.

    Returns
    -------
    Resampled

    Raises
    ------
    ShapeError, NonFiniteError, InputError, DtypeError, SeedError
        Naming ``x``, ``log_weight``, ``alpha``, ``scheme``, ``normalise`` or ``seed``.
    DivergenceError
        With ``normalise=True``, when every ancestor drawn in a row has weight zero (possible only
        with ``-inf`` log-weights and ``alpha < 1``): such a row cannot be normalised.
    """
    x, lw = _check_particles(x, log_weight)
    a = check_real(alpha, "alpha", positive=True, expected="a mixing weight in (0, 1]")
    if a > 1.0:
        raise InputError("alpha", "a mixing weight in (0, 1]", repr(alpha))
    scheme = _check_scheme(scheme)
    if not isinstance(normalise, (bool, np.bool_)):
        raise InputError("normalise", "True or False", repr(normalise))
    g = generator(seed, device=x.device)
    n_particles = x.shape[-2]
    lwn = torch.log_softmax(lw, -1)
    uniform = math.log1p(-a) - math.log(n_particles) if a < 1.0 else -math.inf
    # log q in log space: alpha = 1 gives log q = log w exactly (log 1 = 0, logaddexp(y, -inf) = y)
    log_q = torch.logaddexp(lwn.detach() + math.log(a), torch.full_like(lwn, uniform).detach())
    ancestors = _draw_log(log_q, scheme, g)
    new_lw = torch.gather(lwn, -1, ancestors) - torch.gather(log_q, -1, ancestors) - math.log(n_particles)
    if normalise:
        dead = ~torch.isfinite(new_lw.detach()).any(-1)
        if bool(dead.any()):
            raise DivergenceError(f"soft: every ancestor drawn has weight zero in {int(dead.sum())} of {dead.numel()} "
                                  "rows, which cannot be normalised (raise alpha, or pass normalise=False to keep "
                                  "the unnormalised, zero-mass weights)")
        new_lw = torch.log_softmax(new_lw, -1)
    return Resampled(_gather(x, ancestors), new_lw, ancestors)


def optimal_transport(x: Any, log_weight: Any, *, epsilon: float = 0.1, tol: float = 1e-6, max_iter: int = 500,
                      relaxation: Any = "auto") -> Resampled:
    r"""Entropy-regularised optimal-transport resampling (Corenflos, Thornton, Deligiannidis & Doucet 2021).

    The weighted ensemble is mapped to an equally weighted one by
    :func:`daml.transport.ensemble_transform` with ``solver="sinkhorn"``: ``x'_j = N sum_i P_ij x_i``
    with ``P`` the entropic optimal plan from the weights ``w`` to ``1/N`` for the cost
    ``|x_i - x_j|^2``. Deterministic (no seed), smooth in ``x`` and ``log_weight``, differentiated
    implicitly through the Sinkhorn fixed point. The equally weighted mean of the new particles is the
    weighted mean up to the plan's marginal error (at most ``tol * max|x|``); their covariance is
    smaller than the weighted one, by an amount that vanishes as ``epsilon -> 0``.

    Parameters
    ----------
    x : (*batch, N, n) tensor
        Particles (float32 or float64).
    log_weight : (*batch, N) tensor
        Log-weights, normalised or not.
    epsilon : float
        Entropic regularisation **relative to the mean squared distance** between the particles of
        each problem (the absolute regularisation is ``epsilon * mean_ij |x_i - x_j|^2``, as in
        :func:`daml.transport.ensemble_transform`). Smaller: closer to the exact transport (less
        contraction of the spread), more iterations and larger gradients.
    tol, max_iter, relaxation
        L1 marginal tolerance, iteration limit and over-relaxation of :func:`daml.transport.sinkhorn`.

    Returns
    -------
    Resampled
        ``x`` ``(*batch, N, n)``, ``log_weight`` ``-log N`` everywhere (constant, no gradient),
        ``ancestors`` ``None``.

    Warns
    -----
    ConvergenceWarning
        Naming ``optimal_transport`` when Sinkhorn stopped at ``max_iter`` above ``tol`` in some
        problems (the result is returned; its mean is then only as accurate as the reported error).

    Raises
    ------
    ShapeError, NonFiniteError, InputError, DtypeError
        Naming ``x``, ``log_weight``, ``epsilon``, ``tol``, ``max_iter`` or ``relaxation``.
    """
    from .transport.transform import check_transport_params, ensemble_transform

    x, lw = _check_particles(x, log_weight)
    if x.dtype not in (torch.float32, torch.float64):
        raise DtypeError("x", "float32 or float64 particles", f"dtype {x.dtype}")
    epsilon, tol, max_iter = check_transport_params(epsilon, tol, max_iter)
    n_particles = x.shape[-2]
    uniform = torch.full(lw.shape, -math.log(n_particles), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return Resampled(x.clone(), uniform, None)
    res = ensemble_transform(x, lw, solver="sinkhorn", epsilon=epsilon, tol=tol, max_iter=max_iter,
                             relaxation=relaxation)
    if not bool(res.converged.all()):
        bad = int((~res.converged).sum())
        warnings.warn(f"optimal_transport: Sinkhorn did not reach tol={tol:g} within max_iter={max_iter} in {bad} "
                      f"of {res.converged.numel()} problems (largest L1 marginal error "
                      f"{float(res.error.detach().max()):.3g}); the new particles' mean is only that accurate. "
                      "Raise max_iter or epsilon.", ConvergenceWarning, stacklevel=2)
    return Resampled(res.x, uniform, None)


_DIFFERENTIABLE: dict[str, Callable[..., Resampled]] = {
    "stop_gradient": stop_gradient,
    "soft": soft,
    "optimal_transport": optimal_transport,
}


def differentiable(name: str, x: Any, log_weight: Any, *, seed: Seed = None, **options: Any) -> Resampled:
    """Differentiable resampling by name: :func:`stop_gradient`, :func:`soft` or :func:`optimal_transport`.

    Parameters
    ----------
    name : str
        One of :data:`DIFFERENTIABLE`.
    x : (*batch, N, n) tensor
        Particles.
    log_weight : (*batch, N) tensor
        Log-weights, normalised or not.
    seed : int, numpy.random.SeedSequence, torch.Generator or None
        Random stream of the stochastic resamplers (not used by ``"optimal_transport"``, which is
        deterministic).
    **options
        Keyword arguments of the chosen resampler (``scheme``, ``alpha``, ``normalise``, ``epsilon``,
        ``tol``, ``max_iter``, ``relaxation``); one it does not take is refused with an
        :class:`~daml.errors.InputError` naming it.

    Returns
    -------
    Resampled
    """
    if not isinstance(name, str) or name not in _DIFFERENTIABLE:
        raise InputError("name", f"a differentiable resampler, one of {DIFFERENTIABLE}", repr(name))
    fn = _DIFFERENTIABLE[name]
    allowed = {"stop_gradient": ("scheme",), "soft": ("alpha", "scheme", "normalise"),
               "optimal_transport": ("epsilon", "tol", "max_iter", "relaxation")}[name]
    for key in options:
        if key not in allowed:
            raise InputError(key, f"an option of the {name!r} resampler, one of {allowed}", f"{key}={options[key]!r}")
    if name == "optimal_transport":
        return fn(x, log_weight, **options)
    return fn(x, log_weight, seed=seed, **options)
