r"""Closed-form Gaussian smoothers of a linear(ised) chain: the baselines of hybrid inference.

For the chain of :mod:`daml.smoothing.messages`,

.. math::

    x_0 \sim N(m_0, P_0), \qquad x_t = F_t x_{t-1} + w_t,\ w_t \sim N(0, Q), \qquad
    y_t = H x_t + v_t,\ v_t \sim N(0, R),

:func:`extended_kalman_smoother` runs a Kalman filter forward and the Rauch-Tung-Striebel recursion
backward (Särkkä 2013, ch. 8 and 9). With a linear model (``order=None``, ``F = model.step_matrix``)
it is the exact RTS smoother, the maximiser that message passing climbs to. With ``order=J`` it is
the extended Kalman smoother the hybrid-inference paper uses as its Lorenz baseline: at each step the
covariance is propagated with ``F_t``, the order-``J`` Taylor transition
(:func:`~daml.smoothing.taylor_transition`) at the previous filtered mean, and the mean is predicted
either by the Taylor step of the same order (``predict="taylor"``, the reference's choice; with
``linearisation="factorised"`` it is ``F_t m`` with ``F_t`` built on the model's
``factor_matrix``) or by the model's own step (``predict="model"``, an ODE integration). The backward
recursion uses the same ``F_t``:

.. math::

    G_t = P^a_t F_{t+1}^\top (P^f_{t+1})^{-1}, \quad
    m^s_t = m^a_t + G_t (m^s_{t+1} - m^f_{t+1}), \quad
    P^s_t = P^a_t + G_t (P^s_{t+1} - P^f_{t+1}) G_t^\top .

:func:`linearised_covariance` gives the marginal covariances of the chain linearised at a given
trajectory ``x`` (``F_t`` at ``x_{t-1}``): the inverse of the negative Hessian of its log density, a
symmetric block-tridiagonal matrix with diagonal blocks
:math:`D_t = [t>0] Q^{-1} + H^\top R^{-1} H + F_{t+1}^\top Q^{-1} F_{t+1}` (plus :math:`P_0^{-1}` at
the first time, or nothing for a flat prior) and off-diagonal blocks :math:`-Q^{-1} F_t`. It is
inverted blockwise without forming it: a forward sweep of Schur complements
:math:`S_t = D_t - Q^{-1} F_t S_{t-1}^{-1} F_t^\top Q^{-1}` and a backward sweep
:math:`\Sigma_t = S_t^{-1} + G_t \Sigma_{t+1} G_t^\top` with :math:`G_t = S_t^{-1} F_{t+1}^\top Q^{-1}`.
At the MAP of a nonlinear chain this is the Laplace approximation of the posterior; for a linear
model it equals the RTS covariances at any ``x``.

Conventions are those of :func:`~daml.smoothing.message_passing`: observations ``(*batch, T, m)``
with NaN for a missing entry (removed exactly), the prior on the first time (which is assimilated
when observed), batching over leading dims, float64 unless the observations are float32.

References
----------
* H. E. Rauch, F. Tung and C. T. Striebel (1965), Maximum likelihood estimates of linear dynamic
  systems. *AIAA J.* 3(8).
* S. Särkkä (2013), *Bayesian Filtering and Smoothing*. Cambridge University Press.
* V. Garcia Satorras, Z. Akata and M. Welling (2019), Combining generative and discriminative models
  for hybrid inference. *NeurIPS* 32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import DivergenceError, DtypeError, InputError, NonFiniteError, ShapeError
from ..filters.base import GaussianState
from ..filters.kalman import _linear_update, _solve_spd, _sym
from ..models.base import _check_finite_state, as_covariance, as_real_tensor
from .messages import _as_y, _check_order, _masked_precision, _mv, _taylor_step

__all__ = ["GaussianSmoothed", "extended_kalman_smoother", "linearised_covariance"]

_LINEARISATIONS = ("jacobian", "factorised")
_PREDICTS = ("taylor", "model")


class GaussianSmoothed(NamedTuple):
    """The result of :func:`extended_kalman_smoother`.

    Attributes
    ----------
    mean : tensor (*batch, T, n)
        Smoothed means.
    cov : tensor (*batch, T, n, n)
        Smoothed covariances.
    filtered_mean : tensor (*batch, T, n)
        Filtered means (given the observations up to each time).
    filtered_cov : tensor (*batch, T, n, n)
        Filtered covariances.
    loglik : tensor (*batch,)
        ``log p(y)`` of all observed entries under the (linearised) chain: the sum of the
        one-step-ahead predictive log densities.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    filtered_mean: torch.Tensor
    filtered_cov: torch.Tensor
    loglik: torch.Tensor


def _check_model(model: Any) -> int:
    n = getattr(model, "state_size", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError("model", "a daml model with state_size", type(model).__name__)
    return n


def _check_operator(operator: Any, n: int) -> torch.Tensor:
    mat_h = getattr(operator, "matrix", None)
    if mat_h is None or getattr(operator, "noise_cov", None) is None or getattr(operator, "state_size", None) != n:
        raise InputError("operator", f"a linear Observation of states of size {n} (observe_all, observe_indices, ...)",
                         type(operator).__name__ if mat_h is not None or operator is None else "a nonlinear operator")
    return mat_h


def _spd(value: Any, n: int, name: str, batch: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A positive-definite covariance ``(n, n)`` (scalar, variances or matrix) or a batch of them
    ``(*batch, n, n)`` broadcasting to ``batch``; checked on a detached copy so a graph is kept."""
    if isinstance(value, torch.Tensor) and value.ndim > 2:
        if not value.is_floating_point() or value.is_complex():
            raise DtypeError(name, "real floating covariances", f"dtype {value.dtype}")
        if tuple(value.shape[-2:]) != (n, n):
            raise ShapeError(name, f"covariances (..., {n}, {n})", f"shape {tuple(value.shape)}")
        try:
            ok = torch.broadcast_shapes(tuple(value.shape[:-2]), batch) == batch
        except RuntimeError:
            ok = False
        if not ok:
            raise ShapeError(name, f"a batch of covariances broadcasting to the batch {batch} of y (or x)",
                             f"shape {tuple(value.shape)}")
        v = value.detach()
        if not bool(torch.isfinite(v).all()):
            raise NonFiniteError(name, "finite entries", "NaN or infinite entries")
        if not torch.allclose(v, v.transpose(-1, -2), rtol=1e-10, atol=1e-12 * float(v.abs().max().clamp_min(1e-300))):
            raise InputError(name, "symmetric matrices", "an asymmetric one")
        if int(torch.linalg.cholesky_ex(v.to(torch.float64))[1].max()) != 0:
            raise InputError(name, "positive-definite covariances", "one that is not")
        return value.to(dtype=dtype, device=device)
    if isinstance(value, torch.Tensor) and value.ndim == 2 and value.is_floating_point():
        as_covariance(value.detach(), n, name, allow_zero=False)
        return value.to(dtype=dtype, device=device)
    return as_covariance(value, n, name, allow_zero=False).to(dtype=dtype, device=device)


def _prior(prior: Any, n: int, batch: tuple, dtype: torch.dtype, device: torch.device,
           allow_none: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    if prior is None and allow_none:
        return None
    if not isinstance(prior, (tuple, list)) or len(prior) != 2:
        raise InputError("prior", "a pair (mean, cov)" + (" or None (flat)" if allow_none else ""),
                         type(prior).__name__)
    mean0 = as_real_tensor(prior[0], "prior").to(dtype=dtype, device=device)
    if mean0.ndim == 0 or mean0.shape[-1] != n:
        raise ShapeError("prior", f"a mean (..., {n})", f"shape {tuple(mean0.shape)}")
    if not bool(torch.isfinite(mean0).all()):
        raise NonFiniteError("prior", "a finite mean", "NaN or infinite entries")
    try:
        ok = torch.broadcast_shapes(tuple(mean0.shape[:-1]), batch) == batch
    except RuntimeError:
        ok = False
    if not ok:
        raise ShapeError("prior", f"a mean whose leading dims broadcast to the batch {batch}",
                         f"shape {tuple(mean0.shape)}")
    cov0 = _spd(prior[1], n, "prior", batch, dtype, device)
    return mean0.expand(*batch, n), cov0


def _transition_setup(model: Any, order: Any, linearisation: Any, dtype: torch.dtype,
                      device: torch.device) -> tuple[int | None, str, torch.Tensor | None]:
    if not isinstance(linearisation, str) or linearisation not in _LINEARISATIONS:
        raise InputError("linearisation", f"one of {_LINEARISATIONS}", repr(linearisation))
    if order is None:
        if linearisation != "jacobian":
            raise InputError("linearisation", "'jacobian' when order is None (a linear model's step_matrix)",
                             repr(linearisation))
        f = getattr(model, "step_matrix", None)
        if not isinstance(f, torch.Tensor):
            raise InputError("order", "a Taylor order J >= 0 for a model without step_matrix", "None")
        return None, linearisation, f.to(dtype=dtype, device=device)
    order = _check_order(order)
    if not callable(getattr(model, "tendency", None)) or getattr(model, "dt", None) is None \
            or getattr(model, "continuous", True) is False:
        raise InputError("model", "a continuous-time model with tendency(x) and dt for order=J (or order=None "
                         "with a linear model's step_matrix)", type(model).__name__)
    if linearisation == "factorised" and not callable(getattr(model, "factor_matrix", None)):
        raise InputError("linearisation", "'jacobian' for a model without factor_matrix(x) (a matrix A(x) with "
                         "tendency(x) = A(x) x, e.g. Lorenz63)", f"'factorised' with {type(model).__name__}")
    return order, linearisation, None


def _chain_setup(model: Any, mat_h: torch.Tensor, operator: Any, order: Any, linearisation: Any, noise_cov: Any,
                 n: int, batch: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
    """The checked transition set-up and ``H``, ``R``, ``Q`` in the run's dtype and device."""
    order, linearisation, f_lin = _transition_setup(model, order, linearisation, dtype, device)
    h = mat_h.to(dtype=dtype, device=device)
    r = operator.noise_cov.to(dtype=dtype, device=device)
    q_src = noise_cov if noise_cov is not None else getattr(model, "noise_cov", None)
    if q_src is None:
        raise InputError("noise_cov", "a model noise covariance Q (the model has none)", "None")
    return order, linearisation, f_lin, h, r, _spd(q_src, n, "noise_cov", batch, dtype, device)


def _taylor(model: Any, x: torch.Tensor, order: int, linearisation: str) -> tuple[torch.Tensor, torch.Tensor]:
    if linearisation == "jacobian":
        return _taylor_step(model, x, order)
    return _taylor_step(model, x, order, linearisation=linearisation)


def extended_kalman_smoother(
    model: Any,
    y: Any,
    *,
    operator: Any,
    prior: tuple[Any, Any],
    order: int | None = None,
    noise_cov: Any = None,
    linearisation: str = "jacobian",
    predict: str = "taylor",
) -> GaussianSmoothed:
    r"""Kalman filter and RTS smoother of a linear(ised) chain, batched (see the module docstring).

    Parameters
    ----------
    model : Model
        A linear model with ``step_matrix`` (``order=None``: the exact RTS smoother) or a model with
        ``tendency`` and ``dt`` (``order=J``: the extended smoother with the order-``J`` Taylor
        transition at the previous filtered mean).
    y : array (*batch, T, m)
        Observations, NaN where missing.
    operator : Observation
        A linear operator (``H``, ``R``).
    prior : (mean, cov)
        Gaussian prior of the first state: mean ``(n,)`` or ``(*batch, n)``, cov ``(n, n)`` or
        ``(*batch, n, n)``. The first time is assimilated too when observed.
    order : int, optional
        Taylor order ``J >= 0``; ``None`` for a linear model.
    noise_cov : scalar, (n,), (n, n) or (*batch, n, n), optional
        ``Q`` in place of the model's ``noise_cov`` (a batch of them runs, e.g., a grid of ``Q`` at once).
    linearisation : {"jacobian", "factorised"}
        ``A(x)`` of the Taylor transition: the tendency's Jacobian, or the model's ``factor_matrix``
        (``f(x) = A(x) x``; the reference code's EKS on Lorenz-63).
    predict : {"taylor", "model"}
        The predicted mean: the order-``J`` Taylor step (``F_t m`` with ``"factorised"``), as the
        reference; or ``model.step(m)``. With ``order=None`` both give ``F m`` (up to rounding).

    Returns
    -------
    GaussianSmoothed

    Raises
    ------
    InputError, ShapeError, NonFiniteError, DtypeError
        Naming the argument.
    DivergenceError
        When a predicted mean or covariance stops being finite or positive definite (the time step is
        named).

    Examples
    --------
    >>> import daml, torch
    >>> model = daml.models.LinearModel([[0.9]], noise_cov=0.1)
    >>> op = daml.models.observe_all(1, sd=0.5)
    >>> res = extended_kalman_smoother(model, torch.ones(4, 1), operator=op, prior=(torch.zeros(1), torch.eye(1)))
    >>> res.mean.shape, res.cov.shape
    (torch.Size([4, 1]), torch.Size([4, 1, 1]))
    """
    n = _check_model(model)
    mat_h = _check_operator(operator, n)
    if not isinstance(predict, str) or predict not in _PREDICTS:
        raise InputError("predict", f"one of {_PREDICTS}", repr(predict))
    y_t = _as_y(y, int(mat_h.shape[0]))
    dtype, device = y_t.dtype, y_t.device
    batch = tuple(y_t.shape[:-2])
    order, linearisation, f_lin, h, r, q = _chain_setup(model, mat_h, operator, order, linearisation, noise_cov,
                                                       n, batch, dtype, device)
    mean0, cov0 = _prior(prior, n, batch, dtype, device, allow_none=False)

    n_t = y_t.shape[-2]
    mask = torch.isfinite(y_t)
    y0 = torch.where(mask, y_t, torch.zeros((), dtype=dtype, device=device))
    loglik = torch.zeros(batch, dtype=dtype, device=device)

    def update(state: GaussianState, k: int) -> GaussianState:
        nonlocal loglik
        innovation = y0[..., k, :] - _mv(h, state.mean)
        new, info = _linear_update(state.mean, state.cov, innovation, h, r, mask[..., k, :])
        loglik = loglik + info["loglik"]
        return new

    def transition(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if order is None:
            return f_lin, (model.step(m) if predict == "model" else _mv(f_lin, m))
        ft, pred = _taylor(model, m, order, linearisation)
        return ft, (model.step(m) if predict == "model" else pred)

    state = GaussianState(mean0, _sym(cov0.expand(*batch, n, n)))
    state = update(state, 0)
    filt, pred_states, fs = [state], [], []
    for k in range(1, n_t):
        try:
            ft, m_f = transition(state.mean)
        except NonFiniteError as exc:
            raise DivergenceError(f"extended_kalman_smoother: the linearisation is not finite at time {k} "
                                  f"(the filtered mean ran off: {exc})", step=k) from None
        p_f = _sym(ft @ state.cov @ ft.transpose(-1, -2) + q)
        if not bool(torch.isfinite(m_f).all()) or not bool(torch.isfinite(p_f).all()):
            raise DivergenceError(f"extended_kalman_smoother: the predicted mean or covariance is not finite at "
                                  f"time {k} (the filter diverged)", step=k)
        predicted = GaussianState(m_f, p_f)
        try:
            state = update(predicted, k)
        except DivergenceError as exc:
            raise DivergenceError(f"extended_kalman_smoother: at time {k}: {exc}", step=k) from None
        filt.append(state)
        pred_states.append(predicted)
        fs.append(ft)

    m_s, p_s = filt[-1].mean, filt[-1].cov
    means, covs = [m_s], [p_s]
    for k in range(n_t - 2, -1, -1):
        fa, fp, ft = filt[k], pred_states[k], fs[k]
        gain = _solve_spd(fp.cov, ft @ fa.cov).transpose(-1, -2)          # P^a F^T (P^f)^-1
        m_s = fa.mean + _mv(gain, m_s - fp.mean)
        p_s = _sym(fa.cov + gain @ (p_s - fp.cov) @ gain.transpose(-1, -2))
        means.append(m_s)
        covs.append(p_s)
    means.reverse()
    covs.reverse()
    return GaussianSmoothed(torch.stack(means, dim=-2), torch.stack(covs, dim=-3),
                            torch.stack([s.mean for s in filt], dim=-2), torch.stack([s.cov for s in filt], dim=-3),
                            loglik)


def _spd_solve_or_raise(a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info.max()) != 0:
        raise InputError("prior", f"a chain whose negative Hessian is positive definite ({what}); with prior=None "
                         "the first states must be determined by the observations and dynamics",
                         "a singular or indefinite Hessian")
    return torch.cholesky_solve(b, chol)


def linearised_covariance(
    model: Any,
    x: Any,
    *,
    operator: Any,
    prior: tuple[Any, Any] | None,
    order: int | None = None,
    noise_cov: Any = None,
    linearisation: str = "jacobian",
    mask: Any = None,
) -> torch.Tensor:
    r"""Marginal covariances of the Gaussian chain linearised at ``x``: the Laplace covariance.

    ``F_t`` is the Taylor transition of order ``order`` at ``x_{t-1}`` (``model.step_matrix`` for
    ``order=None``); the result is the diagonal blocks of the inverse of the negative Hessian of the
    log density of that linear-Gaussian chain (module docstring). It does not depend on the
    observations' values, only on which entries are observed (``mask``).

    Parameters
    ----------
    model : Model
        As for :func:`extended_kalman_smoother`.
    x : array (*batch, T, n)
        The trajectory to linearise at (e.g. the MAP from :func:`~daml.smoothing.message_passing`).
    operator : Observation
        A linear operator (``H``, ``R``).
    prior : (mean, cov) or None
        The Gaussian prior of the first state (only its covariance matters); ``None``: a flat prior
        (exact, in information form: no large stand-in variance).
    order : int, optional
        Taylor order ``J``; ``None`` for a linear model.
    noise_cov : scalar, (n,), (n, n) or (*batch, n, n), optional
        ``Q`` in place of the model's.
    linearisation : {"jacobian", "factorised"}
        As for :func:`extended_kalman_smoother`.
    mask : bool array (*batch, T, m) or (T, m), optional
        The observed entries; default: all.

    Returns
    -------
    tensor (*batch, T, n, n)

    Raises
    ------
    InputError, ShapeError, NonFiniteError, DtypeError
        Naming the argument; ``prior`` when the Hessian is not positive definite (a flat prior with
        too little observed to pin the states down).

    Examples
    --------
    >>> import daml, torch
    >>> model = daml.models.LinearModel([[0.9]], noise_cov=0.1)
    >>> op = daml.models.observe_all(1, sd=0.5)
    >>> linearised_covariance(model, torch.zeros(4, 1), operator=op, prior=None).shape
    torch.Size([4, 1, 1])
    """
    n = _check_model(model)
    mat_h = _check_operator(operator, n)
    m = int(mat_h.shape[0])
    x_t = _check_finite_state(x, "x", model)
    if x_t.ndim < 2 or x_t.shape[-2] == 0:
        raise ShapeError("x", f"a trajectory (*batch, T, {n}) with T >= 1", f"shape {tuple(x_t.shape)}")
    if x_t.dtype in (torch.float16, torch.bfloat16):
        raise DtypeError("x", "float32 or float64 states", f"dtype {x_t.dtype}")
    dtype, device = x_t.dtype, x_t.device
    batch, n_t = tuple(x_t.shape[:-2]), x_t.shape[-2]
    order, linearisation, f_lin, h, r, q = _chain_setup(model, mat_h, operator, order, linearisation, noise_cov,
                                                       n, batch, dtype, device)
    pri = _prior(prior, n, batch, dtype, device, allow_none=True)
    if mask is None:
        mask_t = torch.ones((*batch, n_t, m), dtype=torch.bool, device=device)
    else:
        if isinstance(mask, torch.Tensor):
            mask_t = mask.to(device)
        else:
            try:
                arr = np.asarray(mask)
            except (TypeError, ValueError):
                arr = None
            if arr is None or arr.dtype != np.bool_:
                raise DtypeError("mask", "a bool array of observed entries",
                                 f"dtype {arr.dtype}" if arr is not None else type(mask).__name__)
            mask_t = torch.as_tensor(arr, device=device)
        if mask_t.dtype != torch.bool:
            raise DtypeError("mask", "a bool array of observed entries", f"dtype {mask_t.dtype}")
        try:
            mask_t = mask_t.expand(*batch, n_t, m)
        except RuntimeError:
            raise ShapeError("mask", f"a bool array broadcasting to {(*batch, n_t, m)}",
                             f"shape {tuple(mask_t.shape)}") from None

    h_m, r_inv = _masked_precision(r, h, mask_t)
    info_obs = h_m.transpose(-1, -2) @ r_inv @ h_m                      # (*batch, T, n, n)
    q_inv = torch.cholesky_inverse(torch.linalg.cholesky(q))
    if n_t > 1:
        if order is None:
            ft = f_lin.expand(*batch, n_t - 1, n, n)
        else:
            try:
                ft = _taylor(model, x_t[..., :-1, :], order, linearisation)[0]
            except NonFiniteError:
                raise NonFiniteError("x", "states where the linearised transition is finite",
                                     "NaN or infinite entries in F") from None
        q_inv_t = q_inv.unsqueeze(-3) if q_inv.ndim > 2 else q_inv
        lower = -(q_inv_t @ ft)                                          # J[t, t-1] = -Q^-1 F_t, t >= 1
        back = ft.transpose(-1, -2) @ q_inv_t @ ft                        # F_t^T Q^-1 F_t, adds to D_{t-1}
    diag = []
    for k in range(n_t):
        d = info_obs[..., k, :, :]
        if k == 0:
            if pri is not None:
                d = d + torch.cholesky_inverse(torch.linalg.cholesky(pri[1]))
        else:
            d = d + q_inv
        if k < n_t - 1:
            d = d + back[..., k, :, :]
        diag.append(d.expand(*batch, n, n))
    # forward Schur complements S_t and the backward sweep
    s_inv = []
    s = diag[0]
    for k in range(n_t):
        if k > 0:
            low = lower[..., k - 1, :, :]
            s = diag[k] - low @ _spd_solve_or_raise(s_prev, low.transpose(-1, -2), f"at time {k - 1}")
        s = _sym(s)
        s_inv.append(_spd_solve_or_raise(s, torch.eye(n, dtype=dtype, device=device).expand(*batch, n, n),
                                         f"at time {k}"))
        s_prev = s
    sigma = _sym(s_inv[-1])
    out = [sigma]
    for k in range(n_t - 2, -1, -1):
        g = -(s_inv[k] @ lower[..., k, :, :].transpose(-1, -2))          # -S_k^-1 J[k+1, k]^T
        sigma = _sym(s_inv[k] + g @ sigma @ g.transpose(-1, -2))
        out.append(sigma)
    out.reverse()
    return torch.stack(out, dim=-3)
