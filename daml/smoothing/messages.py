r"""Kalman smoothing as message passing: the MAP of a linear(ised)-Gaussian chain by gradient ascent.

For the chain

.. math::

    x_0 \sim N(m_0, P_0), \qquad x_t = F_t x_{t-1} + w_t,\ w_t \sim N(0, Q), \qquad
    y_t = H x_t + v_t,\ v_t \sim N(0, R),

the gradient of :math:`\log p(x_{0:T}, y_{0:T})` with respect to one state :math:`x_t` is the sum of
the three messages it receives (Satorras, Akata and Welling 2019):

* from the past, :math:`m_1 = -Q^{-1}(x_t - F_t x_{t-1})` (at :math:`t = 0` the prior's
  :math:`-P_0^{-1}(x_0 - m_0)`);
* from its observation, :math:`m_2 = H^\top R^{-1}(y_t - H x_t)` (only the observed entries; NaN marks
  a missing one and is removed exactly, as in :func:`daml.filters.base.masked_observation`);
* from the future, :math:`m_3 = F_{t+1}^\top Q^{-1}(x_{t+1} - F_{t+1} x_t)` (zero at the last time).

:func:`message_passing` iterates :math:`x_t \leftarrow x_t + \gamma (m_1 + m_2 + m_3)` for ``K``
iterations, for every time at once and batched over sequences. For a linear model the objective is a
concave quadratic whose maximiser is the RTS smoother's mean, so the iteration converges to it when
:math:`0 < \gamma < 2 / \lambda_{\max}` (the largest eigenvalue of the negative Hessian, bounded by
:math:`\|P_0^{-1}\| + \|Q^{-1}\|(1 + \|F\|)^2 + \|H^\top R^{-1} H\|`), at the rate
:math:`1 - \gamma \lambda_{\min}` per iteration.

For a nonlinear model ``dx/dt = f(x)``, ``F_t`` is the order-``J`` Taylor polynomial of the matrix
exponential of the Jacobian :math:`A` of the tendency (:func:`taylor_transition`), and the predicted
mean :math:`F_t x_{t-1}` in :math:`m_1` and :math:`m_3` becomes the order-``J`` Taylor step of the flow,
:math:`x + \sum_{j=1}^{J} \Delta t^j A^{j-1} f(x) / j!` (exact to second order; equal to
:math:`F x` for a linear tendency), both evaluated at the current estimate of :math:`x_{t-1}` and
recomputed at every iteration. The reference code multiplies its matrix by the state instead, which is
right there because its Lorenz-63 "Jacobian" is the factorisation :math:`f(x) = A(x) x`, not the
Jacobian; with the true Jacobian, :math:`F(x) x` would not follow the flow.

References
----------
* V. Garcia Satorras, Z. Akata and M. Welling (2019), Combining generative and discriminative models
  for hybrid inference. *Advances in Neural Information Processing Systems* 32.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch

from ..errors import ConvergenceWarning, DivergenceError, InputError, NonFiniteError, ShapeError, check_int, check_real
from ..models.base import _check_finite_state, as_covariance, check_memory, as_real_tensor, batched_jacobian

__all__ = ["Smoothed", "message_passing", "taylor_transition"]   # Chain, prepare_chain: internal, shared with hybrid.py

DIVERGENCE_FACTOR = 1e8     # a gradient this many times its initial size means the iteration blew up
CHECK_EVERY = 10            # iterations between divergence checks (each one synchronises a GPU)


class Smoothed(NamedTuple):
    """The result of :func:`message_passing`.

    Attributes
    ----------
    mean : tensor (*batch, T, n)
        The estimate after the last iteration.
    history : tensor (K, *batch, T, n) or None
        The estimate after each iteration (``history=True``), for losses averaged over iterations.
    gradient_norm : tensor (*batch,)
        The largest absolute entry of the sum of the messages at ``mean`` (the gradient of the log
        density), per sequence: zero at the MAP.
    converged : tensor (*batch,) of bool, or None
        ``gradient_norm <= tol`` (``None`` when ``tol`` is ``None``).
    iterations : int
        ``K``.
    """

    mean: torch.Tensor
    history: torch.Tensor | None
    gradient_norm: torch.Tensor
    converged: torch.Tensor | None
    iterations: int


MAX_ORDER = 64      # (A dt)^J / J! beyond this is below rounding for any step the expansion suits


def _check_order(order: Any) -> int:
    order = check_int(order, "order", 0, f"an int from 0 to {MAX_ORDER} (the Taylor order J)")
    if order > MAX_ORDER:
        raise InputError("order", f"an int from 0 to {MAX_ORDER} (the Taylor order J; higher terms are below rounding)",
                         repr(order))
    return order


LINEARISATIONS = ("jacobian", "factorised")


def _check_linearisation(value: Any, model: Any = None) -> str:
    if not isinstance(value, str) or value not in LINEARISATIONS:
        raise InputError("linearisation", f"one of {LINEARISATIONS}", repr(value))
    if value == "factorised" and model is not None and not callable(getattr(model, "factor_matrix", None)):
        raise InputError("linearisation", "'jacobian' for a model without factor_matrix(x) (a matrix A(x) with "
                         "tendency(x) = A(x) x, e.g. Lorenz63)", f"'factorised' with {type(model).__name__}")
    return value


def _tendency_jacobian(model: Any, x: torch.Tensor, linearisation: str = "jacobian") -> torch.Tensor:
    tendency = getattr(model, "tendency", None)
    dt = getattr(model, "dt", None)
    if not callable(tendency) or dt is None or getattr(model, "continuous", True) is False:
        raise InputError("model", "a continuous-time model with tendency(x) and dt (an ODEModel)",
                         type(model).__name__)
    if linearisation == "factorised":
        jac = model.factor_matrix(x)
    else:
        jac = batched_jacobian(tendency, x).to(x.dtype)     # a model may compute in float64
    if not bool(torch.isfinite(jac).all()):
        raise NonFiniteError("x", "states where the tendency's Jacobian is finite", "NaN or infinite entries")
    return jac * float(dt)


def _taylor(a_dt: torch.Tensor, order: int) -> torch.Tensor:
    n = a_dt.shape[-1]
    eye = torch.eye(n, dtype=a_dt.dtype, device=a_dt.device).expand(a_dt.shape)
    out, term = eye, eye
    for j in range(1, order + 1):
        term = term @ a_dt / j
        out = out + term
    return out


def _taylor_step(model: Any, x: torch.Tensor, order: int,
                 linearisation: str = "jacobian") -> tuple[torch.Tensor, torch.Tensor]:
    """``F(x)`` of :func:`taylor_transition` and the predicted mean: with the Jacobian, the Taylor step
    of the flow ``x + sum_{j=1..J} (A dt)^{j-1} f(x) dt / j!`` (``F x`` for a linear tendency
    ``f = A x``); with ``linearisation="factorised"``, ``F(x) x`` with ``A(x)`` the model's
    ``factor_matrix`` (the reference code's choice)."""
    a_dt = _tendency_jacobian(model, x, linearisation)
    n = a_dt.shape[-1]
    eye = torch.eye(n, dtype=a_dt.dtype, device=a_dt.device).expand(a_dt.shape)
    if linearisation == "factorised":
        f_mat = _taylor(a_dt, order)
        return f_mat, _mv(f_mat, x)
    drift = model.tendency(x) * float(model.dt)
    f_mat, term, pred = eye, eye, x
    vec = drift
    for j in range(1, order + 1):
        term = term @ a_dt / j
        f_mat = f_mat + term
        if j > 1:
            vec = _mv(a_dt, vec) / j
        pred = pred + vec
    return f_mat, pred


def taylor_transition(model: Any, x: Any, order: int, linearisation: str = "jacobian") -> torch.Tensor:
    r"""The linearised transition :math:`F = \sum_{j=0}^{J} (A(x)\,\Delta t)^j / j!` of a model.

    ``A(x)`` is the Jacobian of the model's tendency at ``x`` (forward-mode autodiff) and
    :math:`\Delta t` the model's ``dt``; the sum is the order-``J`` Taylor polynomial of
    :math:`e^{A \Delta t}`, which it approaches as ``J`` grows. ``J = 0`` gives the identity, ``J = 1``
    the Euler step :math:`I + A \Delta t`; for a linear ODE ``J = 4`` is exactly the RK4 step.

    Parameters
    ----------
    model : ODEModel
        A model with ``tendency(x)`` and ``dt`` (a continuous :class:`~daml.models.LinearModel`,
        :class:`~daml.models.Lorenz63`, ...).
    x : tensor (..., n)
        States at which to linearise.
    order : int
        ``J >= 0``.
    linearisation : {"jacobian", "factorised"}
        ``A(x)``: the Jacobian of the tendency (default), or the model's ``factor_matrix(x)``, a matrix
        with ``f(x) = A(x) x`` (:meth:`daml.models.Lorenz63.factor_matrix`, the reference code's choice).

    Returns
    -------
    tensor (..., n, n)

    Raises
    ------
    InputError
        Naming ``model`` (no tendency) or ``order``.
    DtypeError, ShapeError, NonFiniteError
        Naming ``x``.
    """
    order = _check_order(order)
    if getattr(model, "state_size", None) is None:
        raise InputError("model", "a model with state_size, tendency(x) and dt", type(model).__name__)
    linearisation = _check_linearisation(linearisation, model)
    x = _check_finite_state(x, "x", model)
    if x.numel() == 0:
        return x.new_zeros((*x.shape, x.shape[-1]))
    return _taylor(_tendency_jacobian(model, x, linearisation), order)


def _covariance(value: Any, n: int, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A positive-definite ``(n, n)`` covariance (checked on a detached copy, so that a full matrix that
    requires grad keeps the caller's graph)."""
    if isinstance(value, torch.Tensor) and value.ndim == 2 and value.is_floating_point():
        as_covariance(value.detach(), n, name, allow_zero=False)
        return value.to(dtype=dtype, device=device)
    return as_covariance(value, n, name, allow_zero=False).to(dtype=dtype, device=device)


def _spd_inverse(c: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(c))


def _as_y(y: Any, m: int) -> torch.Tensor:
    if isinstance(y, (list, tuple)) and len(y) > 0 and all(hasattr(v, "shape") or isinstance(v, (list, tuple)) for v in y):
        lengths = {len(v) for v in y}
        if len(lengths) > 1:
            raise ShapeError("y", "sequences of equal length (pad the shorter ones with NaN: NaN entries are masked)",
                             f"lengths {sorted(lengths)}")
    if isinstance(y, torch.Tensor) and y.is_complex():
        raise InputError("y", "real observations", f"dtype {y.dtype}")
    t = as_real_tensor(y, "y")
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        from ..errors import DtypeError
        raise DtypeError("y", "float32 or float64 observations", f"dtype {t.dtype}")
    if t.ndim < 2 or t.shape[-1] != m or t.shape[-2] == 0:
        raise ShapeError("y", f"observations (*batch, T, {m}) with T >= 1 (the operator's size {m})",
                         f"shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ShapeError("y", "a non-empty batch of observations", f"shape {tuple(t.shape)}")
    if bool(torch.isinf(t).any()):
        raise NonFiniteError("y", "finite observations (NaN marks a missing one)", "infinite entries")
    return t


def _masked_precision(r: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per time ``H_m`` (unobserved rows zeroed) and ``R_m^{-1}`` (the unobserved block replaced by I)."""
    d = mask.to(r.dtype)                                            # (*batch, T, m)
    dd = d.unsqueeze(-1) * d.unsqueeze(-2)
    r_m = r * dd + torch.diag_embed(1.0 - d)
    return h * d.unsqueeze(-1), _spd_inverse(r_m)


def _mv(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (a @ v.unsqueeze(-1)).squeeze(-1)


class Chain:
    """A checked linear(ised)-Gaussian chain and its three messages (built by :func:`prepare_chain`).

    Attributes: ``y`` (observations, NaN kept), ``y0`` (zeros where missing), ``mask`` (observed
    entries, ``(*batch, T, m)``), ``h`` ``(m, n)``, ``r`` ``(m, m)``, ``q`` ``(n, n)``, ``batch``,
    ``n_t``, ``n``, ``dtype``, ``device``, ``x0`` (the initial estimate ``(*batch, T, n)``),
    ``prior`` (``(mean, cov)`` or ``None`` for a flat prior on the first state), ``model``, ``order``
    and ``linearisation``.
    """

    def __init__(self, **fields: Any):
        self.__dict__.update(fields)

    def transitions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``F_t`` (``(n, n)`` for a linear model, ``(*batch, T-1, n, n)`` otherwise) and the predicted
        means ``(*batch, T-1, n)`` of the states ``x[..., 1:, :]`` from ``x[..., :-1, :]``."""
        prev = x[..., :-1, :]
        if self.order is None:
            return self.f, _mv(self.f, prev)
        return _taylor_step(self.model, prev, self.order, self.linearisation)

    def messages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The messages ``(m1, m2, m3)`` each state of ``x`` ``(*batch, T, n)`` receives: from the past
        (the prior's term at the first time, zero there for a flat prior), from its observation, and
        from the future (zero at the last time). Their sum is the gradient of the log density."""
        m2 = _mv(self.h_m.transpose(-1, -2), _mv(self.r_inv, self.y0 - _mv(self.h_m, x)))
        if self.prior is None:
            prior_term = torch.zeros_like(x[..., 0, :])
        else:
            prior_term = -_mv(self.p0_inv, x[..., 0, :] - self.prior[0])
        if self.n_t == 1:
            return prior_term.unsqueeze(-2), m2, torch.zeros_like(m2)
        ft, pred = self.transitions(x)
        resid = _mv(self.q_inv, x[..., 1:, :] - pred)                # Q^-1 (x_t - F_t x_{t-1}), t >= 1
        m1 = torch.cat([prior_term.unsqueeze(-2), -resid], dim=-2)
        m3 = torch.cat([_mv(ft.transpose(-1, -2), resid), torch.zeros_like(prior_term).unsqueeze(-2)], dim=-2)
        return m1, m2, m3


def prepare_chain(
    model: Any,
    y: Any,
    *,
    operator: Any,
    prior: tuple[Any, Any] | None,
    order: int | None = None,
    noise_cov: Any = None,
    linearisation: str = "jacobian",
    init: Any = None,
) -> Chain:
    """Check the arguments of :func:`message_passing` (same meanings) and build the :class:`Chain`.

    ``prior=None`` puts a flat prior on the first state (no prior message), as the reference code does.
    """
    n = getattr(model, "state_size", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError("model", "a daml model with state_size", type(model).__name__)
    mat_h = getattr(operator, "matrix", None)
    if mat_h is None or getattr(operator, "noise_cov", None) is None or getattr(operator, "state_size", None) != n:
        raise InputError("operator", f"a linear Observation of states of size {n} (observe_all, observe_indices, ...)",
                         type(operator).__name__ if mat_h is not None or operator is None else "a nonlinear operator")
    m = int(mat_h.shape[0])
    y_t = _as_y(y, m)
    dtype, device = y_t.dtype, y_t.device
    h = mat_h.to(dtype=dtype, device=device)
    r = operator.noise_cov.to(dtype=dtype, device=device)

    q_src = noise_cov if noise_cov is not None else getattr(model, "noise_cov", None)
    if q_src is None:
        raise InputError("noise_cov", "a model noise covariance Q (the model has none)", "None")
    q = _covariance(q_src, n, "noise_cov", dtype, device)
    batch = tuple(y_t.shape[:-2])

    if prior is None:
        mean0 = cov0 = p0_inv = None
    else:
        if not isinstance(prior, (tuple, list)) or len(prior) != 2:
            raise InputError("prior", "a pair (mean, cov) or None (a flat prior)", type(prior).__name__)
        mean0 = as_real_tensor(prior[0], "prior").to(dtype=dtype, device=device)
        if mean0.ndim == 0 or mean0.shape[-1] != n:
            raise ShapeError("prior", f"a mean (..., {n})", f"shape {tuple(mean0.shape)}")
        if not bool(torch.isfinite(mean0).all()):
            raise NonFiniteError("prior", "a finite mean", "NaN or infinite entries")
        cov0 = _covariance(prior[1], n, "prior", dtype, device)
        try:
            ok = torch.broadcast_shapes(tuple(mean0.shape[:-1]), batch) == batch
        except RuntimeError:
            ok = False
        if not ok:
            raise ShapeError("prior", f"a mean whose leading dims broadcast to y's batch {batch}",
                             f"shape {tuple(mean0.shape)}")
        p0_inv = _spd_inverse(cov0)

    if not isinstance(linearisation, str) or linearisation not in LINEARISATIONS:
        raise InputError("linearisation", f"one of {LINEARISATIONS}", repr(linearisation))
    if order is None:
        f = getattr(model, "step_matrix", None)
        if not isinstance(f, torch.Tensor):
            raise InputError("order", "a Taylor order J >= 0 for a model without step_matrix", "None")
        if linearisation != "jacobian":
            raise InputError("linearisation", "'jacobian' for a linear model (order=None)", repr(linearisation))
        f = f.to(dtype=dtype, device=device)
    else:
        order = _check_order(order)
        _check_linearisation(linearisation, model)
        f = None

    n_t = y_t.shape[-2]
    mask = torch.isfinite(y_t)
    y0 = torch.where(mask, y_t, torch.zeros((), dtype=dtype, device=device))
    h_m, r_inv = _masked_precision(r, h, mask)

    if init is None:
        x0 = _mv(torch.linalg.pinv(h).expand(*batch, n_t, n, m), y0)
    else:
        x0 = as_real_tensor(init, "init").to(dtype=dtype, device=device)
        if tuple(x0.shape) != (*batch, n_t, n):
            raise ShapeError("init", f"states of shape {(*batch, n_t, n)} (y's batch and times, the state size)",
                             f"shape {tuple(x0.shape)}")
        if not bool(torch.isfinite(x0).all()):
            raise NonFiniteError("init", "finite states", "NaN or infinite entries")
    return Chain(model=model, y=y_t, y0=y0, mask=mask, h=h, r=r, q=q, q_inv=_spd_inverse(q), h_m=h_m, r_inv=r_inv,
                 batch=batch, n_t=n_t, n=n, m=m, dtype=dtype, device=device, x0=x0,
                 prior=None if prior is None else (mean0, cov0), p0_inv=p0_inv, f=f, order=order,
                 linearisation=linearisation)


def message_passing(
    model: Any,
    y: Any,
    *,
    operator: Any,
    prior: tuple[Any, Any],
    gamma: float,
    iterations: int = 100,
    order: int | None = None,
    noise_cov: Any = None,
    init: Any = None,
    tol: float | None = 1e-6,
    history: bool = False,
    detach_messages: bool = False,
    linearisation: str = "jacobian",
) -> Smoothed:
    r"""The MAP of a linear(ised)-Gaussian chain by ``K`` iterations of message passing (gradient ascent).

    Each iteration moves every state by ``gamma`` times the sum of its three messages (see the module
    docstring); all times and all sequences move at once. With a linear model and enough iterations at
    a stable ``gamma`` the result is the RTS smoother's mean (:func:`daml.filters.kalman_smoother`,
    the same time convention: the prior is on the first time, which may be observed too).

    Parameters
    ----------
    model : Model
        A linear model (``step_matrix``, used as ``F`` when ``order`` is ``None``) or any model with
        ``tendency`` and ``dt`` (``F_t`` = :func:`taylor_transition` of order ``order`` at the current
        estimate of ``x_{t-1}``, recomputed every iteration). ``Q`` is its ``noise_cov``.
    y : array (*batch, T, m)
        Observations, NaN where missing. Sequences of unequal length: pad the shorter ones with NaN at
        the end (the padded states are predictions and change nothing before them).
    operator : Observation
        A linear operator (``H``, ``R``).
    prior : (mean, cov) or None
        The Gaussian prior of the first state: mean ``(n,)`` or ``(*batch, n)``, cov ``(n, n)``;
        ``None``: a flat prior (no prior message, as the reference code).
    gamma : float
        Step size, ``> 0``; stable below :math:`2/\lambda_{\max}` (module docstring).
    iterations : int
        ``K >= 1``.
    order : int, optional
        Taylor order ``J >= 0`` of the linearised transition; required for a model without
        ``step_matrix``.
    noise_cov : scalar, (n,) or (n, n), optional
        ``Q`` in place of the model's ``noise_cov`` (required when the model has none).
    init : array (*batch, T, n), optional
        Starting estimate; default: the least-squares states of the observations
        (:math:`H^+ y_t`, zero where nothing is observed; :math:`H^\top y` for a selection operator, as
        in the reference).
    tol : float or None
        Convergence threshold on the largest absolute entry of the gradient at the result; a sequence
        above it is not ``converged`` and a :class:`~daml.errors.ConvergenceWarning` says so. The
        threshold is raised to the rounding floor ``100 eps`` times the initial gradient's largest
        entry (``eps`` of the dtype: it matters in float32 only). ``None``:
        no tolerance (fixed-``K`` unrolling for training); a gradient that ends larger than it started
        still gives a :class:`~daml.errors.ConvergenceWarning` (an unstable ``gamma`` oscillating below
        the divergence factor).
    history : bool
        Keep the estimate after every iteration (``Smoothed.history``).
    detach_messages : bool
        Detach the messages from the autograd graph (as the reference code does), so gradients reach
        the result only through ``init`` (and a learned correction, later). Default ``False``: exact
        gradients of the unrolled iteration with respect to ``y``, the prior, ``Q``, ``R`` and ``init``.
    linearisation : {"jacobian", "factorised"}
        With ``order``: linearise with the Jacobian of the tendency and predict with the Taylor step of
        the flow (default), or with the model's ``factor_matrix`` ``A(x)`` (``f(x) = A(x) x``) and predict
        ``F(x) x``, as the reference code does for Lorenz-63.

    Returns
    -------
    Smoothed

    Raises
    ------
    InputError, ShapeError, NonFiniteError, DtypeError
        Naming the argument.
    DivergenceError
        When the gradient grows by a factor :data:`DIVERGENCE_FACTOR` or becomes non-finite (``gamma``
        too large); the message names ``gamma`` and the iteration by which it was seen (the size is
        checked every :data:`CHECK_EVERY` iterations and at the last, so as not to synchronise a GPU
        at every step; a non-finite Jacobian is caught at once).
    """
    gamma = check_real(gamma, "gamma", positive=True, expected="a positive step size")
    k_iter = check_int(iterations, "iterations", 1, "an int >= 1 (K)")
    if tol is not None:
        tol = check_real(tol, "tol", positive=True, expected="a positive tolerance or None")
    for name, flag in (("history", history), ("detach_messages", detach_messages)):
        if not isinstance(flag, bool):
            raise InputError(name, "True or False", repr(flag))
    chain = prepare_chain(model, y, operator=operator, prior=prior, order=order, noise_cov=noise_cov,
                          linearisation=linearisation, init=init)
    if history:
        check_memory(8 * k_iter * chain.x0.numel(), "iterations", f"{k_iter} iterations kept (history=True)")
    dtype = chain.dtype
    x = chain.x0

    def gradient(xc: torch.Tensor) -> torch.Tensor:
        m1, m2, m3 = chain.messages(xc)
        g = m1 + m2 + m3
        return g.detach() if detach_messages else g

    def size(g: torch.Tensor) -> torch.Tensor:
        return g.detach().abs().amax(dim=(-2, -1))

    g = gradient(x)
    g0 = float(size(g).max())
    kept = []
    for it in range(k_iter):
        x = x + gamma * g
        if history:
            kept.append(x)
        try:
            g = gradient(x)
            # reading the size back synchronises a GPU: every CHECK_EVERY iterations and at the end
            gmax = float(size(g).max()) if (it + 1) % CHECK_EVERY == 0 or it + 1 == k_iter else 0.0
        except NonFiniteError:          # the estimate itself overflowed (the Jacobian at it is not finite)
            gmax = math.inf
        if not math.isfinite(gmax) or gmax > DIVERGENCE_FACTOR * max(g0, 1e-300):
            raise DivergenceError(
                f"message_passing: the iteration diverged by iteration {it + 1} (largest gradient entry "
                f"{gmax:.3g}, from {g0:.3g} at the start): gamma={gamma!r} is too large (stable below "
                "2 / the largest eigenvalue of the negative Hessian, see docs/smoothing.md)")
    gnorm = size(g)
    # the gradient cannot be computed closer to zero than rounding of messages of the initial size
    floor = 100.0 * torch.finfo(dtype).eps * g0
    converged = None if tol is None else gnorm <= max(tol, floor)
    if tol is None and float(gnorm.max()) > g0:
        # no tolerance asked for, but a gradient that ended larger than it started means the iteration did
        # not ascend at all (an unstable gamma can oscillate at a bounded, wrong value below the divergence
        # factor): never a silent answer
        warnings.warn(
            f"message_passing: the largest gradient entry grew from {g0:.3g} to {float(gnorm.max()):.3g} over "
            f"{k_iter} iterations: gamma={gamma!r} is too large (unstable), the result is not the MAP",
            ConvergenceWarning, stacklevel=2)
    if converged is not None and not bool(converged.all()):
        bad = int((~converged).sum())
        grew = float(gnorm.max()) > g0
        warnings.warn(
            f"message_passing: {bad} of {converged.numel()} sequences not converged after {k_iter} iterations "
            f"(largest gradient entry {float(gnorm.max()):.3g} > tol {tol:g}"
            + ("; it grew from the start: gamma is too large" if grew else "; more iterations or a larger gamma")
            + ")", ConvergenceWarning, stacklevel=2)
    return Smoothed(x, torch.stack(kept) if history else None, gnorm, converged, k_iter)
