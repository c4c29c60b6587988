r"""Kalman filters and the Rauch-Tung-Striebel smoother: the exact answer for linear-Gaussian models.

For a linear model with additive Gaussian noise and linear Gaussian observations,

.. math::

    x_0 \sim N(m_0, P_0), \qquad x_k = M x_{k-1} + w_k,\ w_k \sim N(0, Q), \qquad
    y_k = H x_k + v_k,\ v_k \sim N(0, R),

the filtering distributions :math:`p(x_k \mid y_{1:k})` and the smoothing distributions
:math:`p(x_k \mid y_{1:T})` are Gaussian, and the Kalman filter (Kalman 1960) and the RTS smoother
(Rauch, Tung and Striebel 1965) compute their means and covariances exactly. Every other filter in
:mod:`daml.filters` is judged against these on linear problems.

**Forecast.** :math:`m^f = M m^a`, :math:`P^f = M P^a M^\top + Q`.

**Analysis.** With the innovation :math:`d = y - H m^f`, its covariance
:math:`S = H P^f H^\top + R` and the gain :math:`K = P^f H^\top S^{-1}`,

.. math::

    m^a = m^f + K d, \qquad P^a = (I - K H) P^f (I - K H)^\top + K R K^\top .

The second expression (Joseph's form) equals the textbook :math:`(I - K H) P^f` in exact arithmetic
but stays symmetric positive semidefinite under rounding (Bucy and Joseph 1968). :math:`S^{-1}` is
never formed: the gain comes from a Cholesky solve with :math:`S = L L^\top`, and every covariance is
symmetrised after each step. The log-likelihood of the observation (the "evidence" used for model
comparison and parameter estimation) comes for free from the same factor,

.. math::

    \log p(y_k \mid y_{1:k-1}) = -\tfrac12 \left( d^\top S^{-1} d + \log\det S + m_k \log 2\pi \right),

where :math:`m_k` counts only the observed entries.

**Missing entries.** Entries of ``y`` marked unobserved (NaN in the data) are removed exactly with
:func:`~daml.filters.base.masked_observation`: their rows of ``H`` and innovation are zeroed and their
block of ``R`` replaced by the identity, so ``S`` is block-diagonal with an identity block, the gain
has zero columns there, the identity block contributes :math:`\log\det I = 0` and the quadratic form
receives zero from it. The result equals the filter run with the observed rows only, while the
shapes stay fixed for batching. A time with nothing observed leaves the state unchanged.

**Extended Kalman filter.** For a nonlinear model ``step`` and observation ``h``, the EKF propagates
the mean through the nonlinear functions and the covariance through their Jacobians:
:math:`m^f = \mathcal{M}(m^a)`, :math:`P^f = F P^a F^\top + Q` with the tangent-linear model
:math:`F = \partial \mathcal{M} / \partial x` at :math:`m^a`
(:func:`daml.models.base.tangent_linear`), and the analysis above with :math:`d = y - h(m^f)` and
:math:`H = \partial h / \partial x` at :math:`m^f` (Jazwinski 1970). On a linear model and operator it
computes the same numbers as the Kalman filter.

**RTS smoother.** After a forward Kalman pass that stores the predicted :math:`(m^f_k, P^f_k)` and
filtered :math:`(m^a_k, P^a_k)` moments at every model step, the backward recursion from
:math:`m^s_T = m^a_T`, :math:`P^s_T = P^a_T` is

.. math::

    G_k = P^a_k M^\top (P^f_{k+1})^{-1}, \qquad
    m^s_k = m^a_k + G_k (m^s_{k+1} - m^f_{k+1}), \qquad
    P^s_k = P^a_k + G_k (P^s_{k+1} - P^f_{k+1}) G_k^\top,

with :math:`G_k` from a Cholesky solve against :math:`P^f_{k+1}`.

Everything is batched over leading dims (independent experiments) and runs on whatever device the
tensors live on. States are :class:`~daml.filters.base.GaussianState`; as posteriors they are
recorded as ``2n`` sigma points (:func:`~daml.filters.base.gaussian_members`) whose weighted mean and
plug-in covariance are exactly the filter's.

References
----------
R. E. Kalman (1960). A new approach to linear filtering and prediction problems. J. Basic Eng. 82.
H. E. Rauch, F. Tung and C. T. Striebel (1965). Maximum likelihood estimates of linear dynamic
systems. AIAA J. 3(8).
R. S. Bucy and P. D. Joseph (1968). Filtering for Stochastic Processes with Applications to Guidance.
A. H. Jazwinski (1970). Stochastic Processes and Filtering Theory. Academic Press.
S. Särkkä (2013). Bayesian Filtering and Smoothing. Cambridge University Press, ch. 4, 5 and 8.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import xarray as xr

from .. import _device
from ..errors import DivergenceError, InputError, ShapeError
from ..models.base import Model, _tangent_linear, check_gaussian_transition, model_config, tangent_linear
from ..models.observations import Observation
from ..posterior import from_members, validate
from .base import (_CHECKS, Filter, GaussianState, _gaussian_members, _masked_observation, gaussian_members,
                   masked_logpdf_chol, register)

__all__ = ["kalman_filter", "extended_kalman_filter", "kalman_smoother"]


# -- shared pieces ---------------------------------------------------------------------------------------

def _sym(a: torch.Tensor) -> torch.Tensor:
    """``(a + a^T) / 2`` over the last two axes."""
    return 0.5 * (a + a.transpose(-1, -2))


def _step_matrix(model: Model, like: torch.Tensor) -> torch.Tensor:
    """The one-step matrix ``M`` ``(n, n)`` (or ``(*batch, n, n)``) of a linear model."""
    mat = getattr(model, "step_matrix", None)
    if mat is None:
        raise InputError("model", "a linear model (with step_matrix); use 'ekf' for nonlinear ones",
                         type(model).__name__)
    mat = torch.as_tensor(mat).to(like)
    n = model.state_size
    if mat.ndim < 2 or tuple(mat.shape[-2:]) != (n, n):
        raise ShapeError("model", f"a step_matrix of shape ({n}, {n})", f"shape {tuple(mat.shape)}")
    return mat


def _noise(model: Model, like: torch.Tensor) -> torch.Tensor | None:
    q = getattr(model, "noise_cov", None)
    return None if q is None else q.to(like)


def _check_linear_operator(operator: Observation) -> None:
    if not getattr(operator, "linear", False):
        raise InputError("operator", "a linear operator (with a matrix H); use 'ekf' for nonlinear ones",
                         repr(operator))


def _gaussian_init(model: Model, mean: torch.Tensor, cov: torch.Tensor, g: torch.Generator) -> GaussianState:
    """``N(mean, cov)`` with ``cov`` ``(n, n)`` or ``(*batch, n, n)`` broadcast to ``mean``'s batch."""
    n = mean.shape[-1]
    cov = _sym(torch.as_tensor(cov).to(mean)).expand(*mean.shape[:-1], n, n).clone()
    return GaussianState(mean.clone(), cov)


def _propagate_cov(cov: torch.Tensor, mat: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """``M P M^T + Q``, symmetrised."""
    out = mat @ cov @ mat.transpose(-1, -2)
    if q is not None:
        out = out + q
    return _sym(out)


def _linear_update(mean: torch.Tensor, cov: torch.Tensor, innovation: torch.Tensor, jac: torch.Tensor,
                   noise_cov: torch.Tensor, mask: torch.Tensor) -> tuple[GaussianState, dict]:
    """The Kalman analysis given the innovation ``d`` and the (linearised) operator ``H``.

    Parameters
    ----------
    mean : (*batch, n)
    cov : (*batch, n, n)
    innovation : (*batch, m)
        ``y - h(mean)`` (any finite value where unobserved).
    jac : (*batch, m, n) or (m, n)
        ``H``.
    noise_cov : (m, m)
        ``R``.
    mask : (*batch, m) bool
        Observed entries.

    Returns
    -------
    state, info
        The analysis and ``{"loglik", "nobs"}`` of shape ``(*batch,)``.
    """
    batch = mean.shape[:-1]
    n, m = mean.shape[-1], innovation.shape[-1]
    mask = mask.expand(*batch, m)
    ht = jac.transpose(-1, -2).expand(*batch, n, m)
    d, ht, r = _masked_observation(innovation, ht, noise_cov, mask)      # unobserved: zero / identity
    pht = cov @ ht                                                        # (*batch, n, m)
    s = _sym(ht.transpose(-1, -2) @ pht + r)                              # (*batch, m, m)
    chol, bad = torch.linalg.cholesky_ex(s)
    if int(bad.max()) != 0:
        raise DivergenceError("Kalman analysis: the innovation covariance H P H^T + R is not positive definite "
                              "(non-finite or exploding forecast covariance)")
    gain = torch.cholesky_solve(pht.transpose(-1, -2), chol).transpose(-1, -2)   # P H^T S^-1, (*batch, n, m)
    new_mean = mean + (gain @ d.unsqueeze(-1)).squeeze(-1)
    eye = torch.eye(n, dtype=mean.dtype, device=mean.device)
    a = eye - gain @ ht.transpose(-1, -2)
    new_cov = _sym(a @ cov @ a.transpose(-1, -2) + gain @ r @ gain.transpose(-1, -2))
    # log N(d; 0, S) over the observed entries: the identity block adds 0 to both terms.
    loglik = masked_logpdf_chol(d.unsqueeze(-2), chol, mask).squeeze(-1)
    nobs = mask.sum(-1)
    return GaussianState(new_mean, new_cov), {"loglik": loglik, "nobs": nobs}


# -- Kalman filter --------------------------------------------------------------------------------------

@register("kf")
def kalman_filter() -> Filter:
    """The exact Kalman filter for linear-Gaussian models (see the module docstring).

    The model must offer its one-step matrix as ``step_matrix`` ``(n, n)`` (for example
    :class:`daml.models.LinearModel`) and the operator must be linear (``operator.matrix``).

    Returns
    -------
    Filter
        Named ``"kf"``. State: :class:`GaussianState` ``(mean (*batch, n), cov (*batch, n, n))``.
        Analysis ``info``: ``loglik`` (``log p(y_k | y_{1:k-1})`` over the observed entries) and
        ``nobs`` (the number of observed entries, int64), each ``(*batch,)``. Members: ``2n`` sigma points.

    Raises
    ------
    InputError
        Naming ``model`` for a model without ``step_matrix`` or with a non-Gaussian transition
        (``sample_step``, see :mod:`daml.models.base`) and ``operator`` for a nonlinear operator (use
        :func:`extended_kalman_filter` for those).
    DivergenceError
        From the analysis when ``H P H^T + R`` is not positive definite (a non-finite forecast).
    """

    def init(model: Model, mean: torch.Tensor, cov: torch.Tensor, g: torch.Generator) -> GaussianState:
        check_gaussian_transition(model, "the Kalman filter (kf)")
        _step_matrix(model, mean)
        return _gaussian_init(model, mean, cov, g)

    def forecast(state: GaussianState, model: Model, g: torch.Generator) -> GaussianState:
        mat = _step_matrix(model, state.mean)
        mean = (mat @ state.mean.unsqueeze(-1)).squeeze(-1)
        return GaussianState(mean, _propagate_cov(state.cov, mat, _noise(model, state.mean)))

    def analysis(state: GaussianState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator) -> tuple[GaussianState, dict]:
        _check_linear_operator(operator)
        h = operator.matrix.to(state.mean)
        innovation = y - state.mean @ h.transpose(-1, -2)
        return _linear_update(state.mean, state.cov, innovation, h, operator.noise_cov.to(state.mean), mask)

    return Filter("kf", {}, init, forecast, analysis, gaussian_members, inference=True)


# -- extended Kalman filter -----------------------------------------------------------------------------

@register("ekf")
def extended_kalman_filter() -> Filter:
    """The extended Kalman filter: nonlinear mean, tangent-linear covariance (see the module docstring).

    The mean goes through ``model.step``, the covariance through the tangent-linear model at the
    previous analysis mean (:func:`daml.models.base.tangent_linear`: the model's own
    ``tangent_linear`` if it has one, else forward-mode automatic differentiation); the analysis
    linearises the operator at the forecast mean (``operator.apply``, ``operator.jacobian``). On a
    linear model and operator it equals :func:`kalman_filter`.

    Returns
    -------
    Filter
        Named ``"ekf"``; state, ``info`` and members as for :func:`kalman_filter`. Its ``init``
        refuses a model with a non-Gaussian transition (``sample_step``), naming ``model``.
    """

    def forecast(state: GaussianState, model: Model, g: torch.Generator) -> GaussianState:
        # a model's own tangent-linear map may come in its parameters' dtype: compute in the run's
        jac = (_tangent_linear if not _CHECKS.get() else tangent_linear)(model, state.mean).to(state.cov)
        mean = model.step(state.mean)
        return GaussianState(mean, _propagate_cov(state.cov, jac, _noise(model, state.mean)))

    def analysis(state: GaussianState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator) -> tuple[GaussianState, dict]:
        innovation = operator.residual(y, state.mean)
        jac = operator.jacobian(state.mean)
        return _linear_update(state.mean, state.cov, innovation, jac, operator.noise_cov.to(state.mean), mask)

    def init(model: Model, mean: torch.Tensor, cov: torch.Tensor, g: torch.Generator) -> GaussianState:
        check_gaussian_transition(model, "the extended Kalman filter (ekf)")
        return _gaussian_init(model, mean, cov, g)

    return Filter("ekf", {}, init, forecast, analysis, gaussian_members)


# -- RTS smoother ---------------------------------------------------------------------------------------

def _solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^{-1} b`` for symmetric positive-definite ``a`` (Cholesky; LU where Cholesky fails)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info.max()) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.solve(a, b)


def kalman_smoother(
    model: Model,
    data: xr.Dataset,
    *,
    operator: Observation | None = None,
    prior: tuple[Any, Any] | None = None,
    dtype: Any = None,
    device: Any = None,
) -> xr.Dataset:
    """Rauch-Tung-Striebel smoother over a twin Dataset (see the module docstring).

    A forward Kalman pass visits every model step (the analysis only where the coordinate
    ``observed`` is true, NaN entries masked out), then the backward recursion gives the smoothed
    moments at every time, the initial one included. An observation at time 0, if the data hold one,
    is assimilated into the prior.

    Parameters
    ----------
    model : Model
        A linear model with ``step_matrix`` ``(n, n)`` and ``noise_cov`` (or ``None``).
    data : xarray.Dataset
        As made by :func:`daml.simulate`: ``y`` ``(*batch, time, obs)`` with NaN where nothing is
        observed, the coordinate ``observed`` and (by default) ``prior_mean``, ``prior_cov``, ``H``
        and ``R``.
    operator : Observation, optional
        A linear observation operator; default: the ``H``, ``R`` stored in ``data``
        (:func:`daml.filters.run.operator_from_data`).
    prior : (mean, cov), optional
        Initial distribution (mean ``(..., n)``, cov ``(n, n)``) instead of ``data.prior_mean``,
        ``data.prior_cov``.
    dtype, device : optional
        Where to compute (see :mod:`daml._device`).

    Returns
    -------
    xarray.Dataset
        A posterior (method ``"rts"``) whose members are the ``2n`` sigma points of the smoothed
        Gaussian, dims ``(time, *batch, member, variable)``, plus the exact moments ``mean``
        ``(time, *batch, variable)`` and ``cov`` ``(time, *batch, variable, variable_)``, the
        filtered ones ``filtered_mean`` and ``filtered_cov`` (the same dims), and ``loglik``
        ``(*batch)``: the total log-likelihood ``log p(y_{1:T})`` of all observed entries.

    Raises
    ------
    InputError, ShapeError
        Naming ``data``, ``model``, ``operator`` or ``prior``.
    """
    from .run import prepare_data

    if operator is not None:
        _check_linear_operator(operator)
    p = prepare_data(model, data, operator, prior, dtype, device)
    op, y_da, y_all, observed, batch_dims = p.operator, p.y_da, p.y, p.observed, p.batch_dims
    _check_linear_operator(op)
    dt, dev, n = p.dtype, p.device, model.state_size
    batch_shape = tuple(p.mean.shape[:-1])
    n_times = y_da.sizes["time"]
    if n_times == 0:
        raise ShapeError("data", "observations y with at least one time", "an empty time dimension")
    mean0, cov0 = p.mean, p.cov

    filt = kalman_filter()
    mat = _step_matrix(model, mean0)
    zero = torch.zeros((), dtype=dt, device=dev)
    loglik = torch.zeros(batch_shape, dtype=dt, device=dev)

    def assimilate(state: GaussianState, k: int) -> GaussianState:
        nonlocal loglik
        y = y_all[..., k, :]
        mask = torch.isfinite(y)
        y = torch.where(mask, y, zero)
        state, info = filt.analysis(state, y, op, mask, None)
        loglik = loglik + info["loglik"]
        return state

    with torch.no_grad():
        state = filt.init(model, mean0, cov0, None)
        pred = [state]
        if observed[0]:
            state = assimilate(state, 0)
        filt_states = [state]
        for k in range(1, n_times):
            state = filt.forecast(state, model, None)
            pred.append(state)
            if observed[k]:
                state = assimilate(state, k)
            filt_states.append(state)

        # backward pass: G_k^T = (P^f_{k+1})^{-1} M P^a_k (both covariances symmetric)
        m_s, p_s = filt_states[-1].mean, filt_states[-1].cov
        smoothed = [GaussianState(m_s, p_s)]
        for k in range(n_times - 2, -1, -1):
            fa, fp = filt_states[k], pred[k + 1]
            gain = _solve_spd(fp.cov, mat @ fa.cov).transpose(-1, -2)
            m_s = fa.mean + (gain @ (m_s - fp.mean).unsqueeze(-1)).squeeze(-1)
            p_s = _sym(fa.cov + gain @ (p_s - fp.cov) @ gain.transpose(-1, -2))
            smoothed.append(GaussianState(m_s, p_s))
        smoothed.reverse()

        s_mean = torch.stack([s.mean for s in smoothed])
        s_cov = torch.stack([s.cov for s in smoothed])
        x, lw = _gaussian_members(GaussianState(s_mean, s_cov))      # (T+1, *batch, 2n, n)
        f_mean = torch.stack([s.mean for s in filt_states])
        f_cov = torch.stack([s.cov for s in filt_states])

    coords: dict[str, Any] = {"time": data["time"].values}
    for key in ("step", "observed"):
        if key in data.coords and data[key].dims == ("time",):
            coords[key] = ("time", data[key].values)
    if "variable" in data.coords and data.sizes.get("variable") == n:
        coords["variable"] = data["variable"].values
    for d in batch_dims:
        if d in data.coords:
            coords[d] = data[d].values
    config = {"smoother": "rts", **model_config(model), **op.config()}
    post = from_members({"x": x.cpu()}, lw.cpu(), dims=("time", *batch_dims, "member", "variable"),
                        coords=coords, method="rts", config=json.loads(json.dumps(config, default=str)),
                        seed=None)
    vdims = ("time", *batch_dims, "variable")
    cdims = (*vdims, "variable_")
    post["mean"] = (vdims, _device.to_numpy(s_mean))
    post["cov"] = (cdims, _device.to_numpy(s_cov))
    post["filtered_mean"] = (vdims, _device.to_numpy(f_mean))
    post["filtered_cov"] = (cdims, _device.to_numpy(f_cov))
    post["loglik"] = (tuple(batch_dims), _device.to_numpy(loglik))
    return validate(post)
