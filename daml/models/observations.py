"""Observation operators with Gaussian noise: ``y = h(x) + e``, ``e ~ N(0, R)``.

An :class:`Observation` maps states ``(..., n)`` to observations ``(..., m)``. Linear operators carry
their matrix ``H`` (shape ``(m, n)``); nonlinear ones a batched torch function ``h`` whose Jacobian
(for the EKF) comes from automatic differentiation. The noise covariance ``R`` is a full
symmetric positive-definite ``(m, m)`` matrix (a scalar or a vector of variances is expanded).

Constructors:

* :func:`observe_all` -- every state variable;
* :func:`observe_every` -- every ``k``-th variable (from ``offset``);
* :func:`observe_indices` -- an arbitrary list of variables;
* :func:`observe_linear` -- any matrix ``H``;
* :func:`observe_nonlinear` -- any callable ``h``.

*When* to observe (every ``k`` model steps, at irregular steps) and *what is missing* (NaN entries)
belong to the data, see :func:`daml.simulate`; the filters treat NaN entries of ``y`` as unobserved.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .. import _device
from ..errors import InputError, NonFiniteError, ShapeError, check_int, check_real
from .base import as_covariance, as_real_tensor, batched_jacobian, check_memory

__all__ = [
    "Observation",
    "observe_all",
    "observe_every",
    "observe_indices",
    "observe_linear",
    "observe_nonlinear",
]


class Observation:
    """An observation operator and its noise covariance.

    Parameters
    ----------
    state_size : int
        ``n``, the length of the states it observes.
    noise_cov : tensor (m, m)
        ``R``, symmetric positive definite.
    matrix : tensor (m, n), optional
        ``H`` of a linear operator.
    func : callable, optional
        ``h(x)`` of a nonlinear operator, batched over leading dims: ``(..., n) -> (..., m)``.
    description : str
        A short text recorded in attrs.

    ``positions`` (set by :func:`observe_transformed`) holds the observed variable of each row where
    that is known for a nonlinear operator; localising filters read it.
    """

    def __init__(self, state_size: int, noise_cov: torch.Tensor, matrix: torch.Tensor | None = None,
                 func: Callable[[torch.Tensor], torch.Tensor] | None = None, description: str = ""):
        if (matrix is None) == (func is None):
            raise InputError("matrix/func", "exactly one of a matrix H or a function h", "both or neither")
        self.state_size = check_int(state_size, "state_size", expected="a positive int (the state size)")
        r = as_real_tensor(noise_cov, "noise_cov")
        if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
            raise ShapeError("noise_cov", "a non-empty square covariance R (m, m)", f"shape {tuple(r.shape)}")
        self.noise_cov = as_covariance(r, r.shape[0], "noise_cov", allow_zero=False)   # symmetric positive definite
        self.size = int(r.shape[0])
        if matrix is not None:
            matrix = as_real_tensor(matrix, "matrix")
            if tuple(matrix.shape) != (self.size, self.state_size):
                raise ShapeError("matrix", f"H of shape ({self.size}, {self.state_size}) (R's size, the state size)",
                                 f"shape {tuple(matrix.shape)}")
            if not bool(torch.isfinite(matrix).all()):
                raise NonFiniteError("matrix", "finite entries of H",
                                     f"{int((~torch.isfinite(matrix)).sum())} NaN or infinite entries")
        self.matrix = matrix
        self.func = func
        self.description = description
        self.positions: torch.Tensor | None = None    # observed variable of each row, where known
        self._selection: tuple[torch.Tensor, torch.Tensor | slice | None] | None = None   # (matrix, picker)

    @property
    def linear(self) -> bool:
        """Whether the operator is a matrix."""
        return self.matrix is not None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``h(x)`` for states ``(..., n)``; returns ``(..., m)``."""
        if x.shape[-1] != self.state_size:
            raise ShapeError("x", f"a last axis of length {self.state_size}", f"shape {tuple(x.shape)}")
        if self.matrix is not None:
            idx = self._selected_indices()
            if idx is not None:                       # rows of the identity: pick, do not multiply
                if isinstance(idx, slice):            # a regular stride: one strided copy (never a view of x)
                    return x[..., idx].clone(memory_format=torch.contiguous_format)
                return x.index_select(-1, idx.to(x.device))
            return x @ self.matrix.to(x).T
        return self.func(x)

    def residual(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y - h(x)`` for observations ``y`` ``(..., m)`` and states ``x`` ``(..., n)`` (broadcast), the
        same values as ``y - apply(x)``; an operator that picks evenly spaced entries subtracts them
        from ``y`` in place of copying them out first (one pass over the members instead of two)."""
        if x.shape[-1] != self.state_size:
            raise ShapeError("x", f"a last axis of length {self.state_size}", f"shape {tuple(x.shape)}")
        idx = self._selected_indices() if self.matrix is not None else None
        if isinstance(idx, slice):
            return y - x[..., idx]
        return y - self.apply(x)

    def _selected_indices(self) -> torch.Tensor | slice | None:
        """The variable each row of ``H`` picks when every row is a row of the identity (a single entry
        ``1``), else ``None``; a ``slice`` when the picked variables are evenly spaced and increasing
        (every variable, every k-th, a block: a strided copy, where ``index_select`` along the last
        axis is several times slower on the CPU), else an index tensor. Recomputed when ``matrix`` is
        replaced (not when it is edited in place). Picking gives the product's values exactly (and a
        finite value where an unobserved entry is infinite, which the product would turn into NaN) for
        ``m`` copies instead of ``m n`` multiply-adds per member."""
        if self._selection is None or self._selection[0] is not self.matrix:
            with torch.inference_mode(False):      # a cache kept beyond an inference-mode loop
                self._selection = (self.matrix, self._picker(self.matrix))
        return self._selection[1]

    @staticmethod
    def _picker(h: torch.Tensor) -> torch.Tensor | slice | None:
        """The picker of :meth:`_selected_indices` for ``H`` (computed once per matrix)."""
        pos = selection_positions(h)
        picker: torch.Tensor | slice | None = None
        if pos is not None and bool((h[h != 0] == 1).all()):
            idx = pos.to(torch.int64)
            steps = torch.unique(idx[1:] - idx[:-1]) if idx.numel() > 1 else torch.ones(1, dtype=torch.int64)
            if steps.numel() == 1 and int(steps[0]) >= 1:
                start, step = int(idx[0]), int(steps[0])
                picker = slice(start, start + step * (idx.numel() - 1) + 1, step)
            else:
                picker = idx.to(h.device)
        return picker

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """``dh/dx`` at ``x`` (..., n): shape ``(..., m, n)`` (``H`` broadcast for linear operators)."""
        if self.matrix is not None:
            return self.matrix.to(x).expand(*x.shape[:-1], self.size, self.state_size)
        return batched_jacobian(self.func, x)

    def config(self) -> dict:
        """JSON-able description (recorded in attrs)."""
        return {"observation": self.description, "size": self.size, "linear": self.linear}

    def __repr__(self) -> str:
        return f"Observation({self.description}, m={self.size}, n={self.state_size})"


def _noise(size: int, sd: float | None, cov: Any, dtype=None) -> torch.Tensor:
    if cov is not None and sd is not None:
        raise InputError("sd/cov", "one of sd or cov", "both")
    if cov is None:
        sd = check_real(1.0 if sd is None else sd, "sd", positive=True, expected="a positive standard deviation")
        cov = sd**2
    return as_covariance(cov, size, "cov", dtype=dtype, allow_zero=False)


def observe_indices(state_size: int, indices: Sequence[int], sd: float | None = None, cov: Any = None) -> Observation:
    """Observe the variables ``indices`` of an ``n``-state directly.

    Parameters
    ----------
    state_size : int
        ``n``.
    indices : sequence of int
        Observed variables, each an int in ``[0, n)``. Floats (even whole ones) and bools are refused,
        never truncated. A variable may appear twice: two independent observations of it.
    sd : float, optional
        Noise standard deviation (``R = sd^2 I``); default 1.
    cov : scalar, (m,) or (m, m), optional
        The noise covariance ``R`` instead of ``sd``.
    """
    state_size = check_int(state_size, "state_size", expected="a positive int (the state size)")
    try:                                                            # H is a dense (m, n) matrix
        m = None if isinstance(indices, (str, bytes)) else len(indices)
    except TypeError:                                               # a scalar or 0-d array: refused below
        m = None
    if m is not None:
        check_memory(2 * 8 * m * state_size, "state_size", f"{m} x {state_size} entries of H")
    idx = _check_indices(indices, state_size)
    h = torch.zeros(idx.numel(), state_size, dtype=torch.float64)
    h[torch.arange(idx.numel()), idx] = 1.0
    r = _noise(idx.numel(), sd, cov)
    return Observation(state_size, r, matrix=h, description=f"indices {idx.tolist()}" if idx.numel() <= 8
                       else f"{idx.numel()} of {state_size} variables")


def _check_indices(indices: Any, state_size: int) -> torch.Tensor:
    """``indices`` as an int64 tensor of variables in ``[0, state_size)``: integers only (a float,
    even a whole one such as ``2.0``, or a bool is refused rather than truncated or read as 0/1)."""
    import numbers

    import numpy as np

    if isinstance(indices, (str, bytes)) or indices is None:
        raise InputError("indices", "a sequence of int variable indices", repr(indices))
    if isinstance(indices, (torch.Tensor, np.ndarray)):
        values = indices.reshape(-1).tolist() if indices.ndim == 1 else None
    else:
        try:
            values = list(indices)
        except TypeError:
            raise InputError("indices", "a sequence of int variable indices", type(indices).__name__) from None
    if values is None:
        raise ShapeError("indices", "a 1-d sequence of variable indices", f"shape {tuple(indices.shape)}")
    bad = [v for v in values if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Integral, np.integer))]
    if bad:
        raise InputError("indices", "int variable indices", f"{bad[0]!r} ({type(bad[0]).__name__})",
                         hint="indices are not truncated: pass ints")
    if not values:
        raise ShapeError("indices", "at least one observed variable", "none")
    out = [v for v in values if not 0 <= int(v) < state_size]
    if out:
        raise InputError("indices", f"variables in [0, {state_size})", f"{[int(v) for v in values]} ({int(out[0])} is outside)")
    return torch.as_tensor([int(v) for v in values], dtype=torch.int64)


def observe_all(state_size: int, sd: float | None = None, cov: Any = None) -> Observation:
    """Observe every variable: ``H = I``."""
    state_size = check_int(state_size, "state_size", expected="a positive int (the state size)")
    check_memory(3 * 8 * state_size**2, "state_size", f"{state_size} x {state_size} entries of H and R")
    obs = observe_indices(state_size, range(state_size), sd=sd, cov=cov)
    obs.description = f"all {state_size} variables"
    return obs


def observe_every(state_size: int, k: int, sd: float | None = None, cov: Any = None, offset: int = 0) -> Observation:
    """Observe every ``k``-th variable starting at ``offset``."""
    state_size = check_int(state_size, "state_size", expected="a positive int (the state size)")
    k = check_int(k, "k", expected="a positive int")
    check_memory(3 * 8 * state_size * (state_size // k + 1), "state_size", f"{state_size // k + 1} x {state_size} "
                 "entries of H")
    offset = check_int(offset, "offset", 0, f"an int in [0, {state_size})")
    if offset >= state_size:
        raise InputError("offset", f"an int in [0, {state_size})", repr(offset))
    obs = observe_indices(state_size, range(offset, state_size, k), sd=sd, cov=cov)
    obs.description = f"every {k}th of {state_size} variables from {offset}"
    return obs


def observe_linear(matrix: Any, sd: float | None = None, cov: Any = None) -> Observation:
    """Observe ``H x`` for any matrix ``H`` of shape ``(m, n)``."""
    h = as_real_tensor(matrix, "matrix")
    if h.ndim != 2 or 0 in h.shape:
        raise ShapeError("matrix", "a non-empty 2-d matrix (m, n)", f"shape {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise InputError("matrix", "finite entries", "NaN or infinite entries")
    return Observation(h.shape[1], _noise(h.shape[0], sd, cov), matrix=h, description=f"linear {tuple(h.shape)}")


def observe_nonlinear(func: Callable[[torch.Tensor], torch.Tensor], state_size: int, size: int,
                      sd: float | None = None, cov: Any = None, description: str = "nonlinear") -> Observation:
    """Observe ``h(x)`` for a batched torch function ``h: (..., n) -> (..., size)``."""
    if not callable(func):
        raise InputError("func", "a callable h(x)", type(func).__name__)
    state_size = check_int(state_size, "state_size", expected="a positive int (the state size)")
    size = check_int(size, "size", expected="a positive int (the number of observations)")
    check_memory(8 * (2 * state_size + 3 * size**2), "state_size" if state_size > size else "size",
                 f"state_size={state_size}, size={size}")
    probe = func(torch.zeros(2, state_size, dtype=torch.float64))
    if not isinstance(probe, torch.Tensor):
        raise InputError("func", "a function returning a torch tensor", type(probe).__name__)
    if tuple(probe.shape) != (2, size):
        raise ShapeError("func", f"outputs of shape (..., {size}) for inputs (..., {state_size})",
                         f"shape {tuple(probe.shape)} for input (2, {state_size})")
    return Observation(state_size, _noise(size, sd, cov), func=func, description=description)


TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"arctan": torch.atan}


def observe_transformed(base: Observation, transform: str | Callable[[torch.Tensor], torch.Tensor],
                        name: str | None = None) -> Observation:
    """Observe ``t(H x)``: an elementwise function ``t`` applied to a linear operator's output.

    ``transform`` is a key of :data:`TRANSFORMS` (``"arctan"``: the strongly nonlinear observations
    of EnSF, Bao et al. 2024, which saturate for large ``|x|``, so the likelihood is nearly flat there) or a
    batched elementwise torch function. The noise covariance is ``base``'s. When ``base`` selects one
    variable per observation, ``positions`` records which (localising filters read it).
    """
    if not isinstance(base, Observation):
        raise InputError("base", "a linear Observation (see daml.models.observe_all)", type(base).__name__)
    if not base.linear:
        raise InputError("base", "a linear observation operator", base.description)
    if isinstance(transform, str):
        if transform not in TRANSFORMS:
            raise InputError("transform", f"one of {sorted(TRANSFORMS)} or a callable", repr(transform))
        name, transform = name or transform, TRANSFORMS[transform]
    elif not callable(transform):
        raise InputError("transform", f"one of {sorted(TRANSFORMS)} or a callable", type(transform).__name__)
    def func(x: torch.Tensor) -> torch.Tensor:
        return transform(base.apply(x))

    out = observe_nonlinear(func, base.state_size, base.size, cov=base.noise_cov,
                            description=f"{name or 'transform'} of {base.description}")
    out.positions = selection_positions(base.matrix)
    return out


def selection_positions(matrix: torch.Tensor) -> torch.Tensor | None:
    """The observed variable of each row of ``H`` (float64, on the CPU) when every row selects one
    variable; ``None`` otherwise."""
    nonzero = matrix != 0
    if not bool((nonzero.sum(-1) == 1).all()):
        return None
    return nonzero.to(torch.float64).argmax(-1).to(torch.float64).cpu()
