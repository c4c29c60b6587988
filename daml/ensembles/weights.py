"""Member weights: training is a proposal density.

A member trained from a prior draw is a draw from the push-forward of the prior through the optimiser,
a proposal density ``q(w | D)``. Its importance weight for the posterior ``p(w | D)`` is (seed 001;
van Leeuwen, Chiu & Yang 2025)

    β_i ∝ p(D | w_i) p(w_i) / q(w_i | D),

not ``1/M``. This module computes the three terms for the Gaussian likelihood
``y_n = f(x_n; w) + e_n``, ``e_n ~ N(0, σ²)``, and the Gaussian prior ``w ~ N(0, Σ_p)`` of
:mod:`~daml.ensembles.training`, with two estimators of ``log q``:

``"rml"`` (randomised maximum likelihood, Oliver 1996; Ba, de Wiljes, Oliver & Reich 2021)
    An RML member minimises ``½‖y + ε - f(w)‖²/σ² + ½ (w - w0)ᵀ Σ_p⁻¹ (w - w0)`` with
    ``w0 ~ N(0, Σ_p)``, ``ε ~ N(0, σ² I)``. At the minimiser ``w*`` the stationarity condition gives
    every pair ``(w0, y + ε)`` that lands on ``w*`` in terms of the residual ``v = y + ε - f(w*)``:
    ``w0 = w* - Σ_p Gᵀ v / σ²`` with ``G = ∂f/∂w`` at ``w*``. The change of variables
    ``(w*, v) -> (w0, y + ε)`` has, in the Gauss-Newton approximation (dropping second derivatives of
    ``f``), Jacobian determinant ``det(I + Σ_p GᵀG / σ²)``; integrating the Gaussian ``v`` out
    exactly gives

        log β(w*) = log N(y - f(w*) + G w*;  0,  G Σ_p Gᵀ + σ² I) + const,

    the evidence of the model linearised at ``w*``. For a model linear in ``w`` every term is
    constant: all RML members get equal weights, as they must, because RML then samples the posterior
    exactly. ``log q`` is ``log p(D | w) + log p(w) - log β``. ``rank=k`` keeps the ``k`` leading
    eigenpairs of the prior-preconditioned Gauss-Newton matrix (the low-rank version of Ba et al.).

``"laplace"`` (a mixture of Laplace approximations, Eschenhagen et al. 2021)
    ``q(w) = (1/M) Σ_j N(w; w_j, A_j⁻¹)`` with ``A_j = Σ_p⁻¹ + G_jᵀ G_j / σ²`` the Gauss-Newton
    precision at member ``j``; it needs no knowledge of how the members were trained.

Both need the Jacobian of the network outputs with respect to all parameters on the training set,
accumulated in chunks into ``GᵀG`` (``P × P`` per member), so memory is ``O(M P²)`` whatever the data
size. Members trained with the heteroscedastic likelihood (mean and variance outputs) are weighed
with ``"laplace"`` (or ``"none"``), ``G_jᵀG_j/σ²`` replaced by the Fisher matrix of that likelihood
(:func:`fisher`); RML needs a fixed noise level. The weights are reported with Kish ESS and PSIS k-hat (Vehtari et al. 2024): the degeneracy that
the seed predicts shows as an ESS near one and k-hat above 0.7.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch.func import functional_call, grad, jacrev, vmap

from ..diagnostics import ess_kernel, psis_kernel
from ..errors import InputError, NonFiniteError, ShapeError, check_int
from .training import (Ensemble, check_data, check_ensemble, flat_params, heteroscedastic_variance, prior_log_prob, prior_moments,
                       unflatten, warn_unconverged)

ESTIMATORS = ("rml", "laplace", "none")


class GaussNewton(NamedTuple):
    """Per-member sufficient statistics of the linearised model on a data set (normalised units)."""

    theta: torch.Tensor     # (M, P) flat parameters
    gtg: torch.Tensor       # (M, P, P) Σ_n g_n g_nᵀ
    gtr: torch.Tensor       # (M, P)    Σ_n g_n r_n,  r = y - f(w)
    rtr: torch.Tensor       # (M,)      Σ_n r_n²
    n: int


class MemberWeights(NamedTuple):
    """The three terms of the member weights and their diagnostics (per member, normalised units)."""

    log_weight: torch.Tensor      # (M,) normalised
    log_likelihood: torch.Tensor  # (M,) log p(D | w_i)
    log_prior: torch.Tensor       # (M,) log p(w_i)
    log_proposal: torch.Tensor    # (M,) log q(w_i | D) up to a constant shared by the members
    ess: float                    # Kish effective sample size of the raw weights
    khat: float                   # PSIS Pareto k-hat of the raw log-weights
    psis_log_weight: torch.Tensor  # (M,) Pareto-smoothed, normalised
    estimator: str
    converged: torch.Tensor | None = None   # (M,) bool: the member reached its minimum (fit's tol); None: unknown
    trusted: bool = True          # False when some members did not converge: the weights assume minima


def _require_gaussian(ens: Ensemble, who: str) -> None:
    check_ensemble(ens)
    if ens.likelihood != "gaussian":
        raise InputError("ens", f"an ensemble trained with likelihood='gaussian' for {who}",
                         f"likelihood={ens.likelihood!r}")


def _normalised_data(ens: Ensemble, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The data ``(x, y)`` (original units) checked and normalised as the ensemble was trained, and
    the flat member parameters ``(M, P)``."""
    check_ensemble(ens)
    xt, yt = check_data(x, y, dtype=ens.x_mean.dtype, device=ens.x_mean.device)
    if xt.shape[1] != ens.x_mean.shape[0]:
        raise ShapeError("x", f"inputs with {ens.x_mean.shape[0]} columns", f"{xt.shape[1]} columns")
    return ens.normalise_x(xt), (yt - ens.y_mean) / ens.y_sd, flat_params(ens)


def gauss_newton(ens: Ensemble, x: Any, y: Any, *, chunk: int | None = None) -> GaussNewton:
    """Accumulate ``GᵀG``, ``Gᵀr`` and ``rᵀr`` per member over the data ``(x, y)`` (original units)."""
    _require_gaussian(ens, "Gauss-Newton statistics")
    xn, yn, theta = _normalised_data(ens, x, y)
    m, p = theta.shape
    module = ens.module
    module.eval()

    def f(th, b, xc):
        out = functional_call(module, (unflatten(ens, th), b), (xc,))
        return out.reshape(xc.shape[0])

    def f1(th, b, x1):                                     # one data point: a scalar output
        return f(th, b, x1.unsqueeze(0))[0]

    # per-point gradients (vmap over points inside, members outside): memory (M, chunk, P); jacrev of
    # the batched f would hold a (chunk, chunk, hidden) intermediate instead
    jac = vmap(vmap(grad(f1), in_dims=(None, None, 0)), in_dims=(0, 0, None))
    fwd = vmap(f, in_dims=(0, 0, None))
    n = xn.shape[0]
    step = chunk or max(1, int(2e7 // max(1, m * p)))
    gtg = torch.zeros(m, p, p, dtype=theta.dtype, device=theta.device)
    gtr = torch.zeros(m, p, dtype=theta.dtype, device=theta.device)
    rtr = torch.zeros(m, dtype=theta.dtype, device=theta.device)
    try:
        for s in range(0, n, step):
            xc, yc = xn[s:s + step], yn[s:s + step]
            with torch.no_grad():
                r = yc - fwd(theta, ens.buffers, xc)               # (M, c)
            g = jac(theta, ens.buffers, xc).detach()               # (M, c, P)
            gtg += g.transpose(1, 2) @ g
            gtr += torch.einsum("mcp,mc->mp", g, r)
            rtr += (r**2).sum(1)
    finally:
        module.train(True)
    return GaussNewton(theta=theta, gtg=gtg, gtr=gtr, rtr=rtr, n=n)


def heteroscedastic_log_density(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``log N(y; mean, var) + ½ log 2π`` per point: the heteroscedastic log-likelihood terms that
    depend on the parameters (the constant is added where a normalised density is needed)."""
    return -0.5 * (torch.log(var) + (y - mean) ** 2 / var)


class Fisher(NamedTuple):
    """Per-member log-likelihood and generalised Gauss-Newton (Fisher) matrix of the likelihood
    (normalised units)."""

    theta: torch.Tensor       # (M, P) flat parameters
    precision: torch.Tensor   # (M, P, P) Σ_n J_nᵀ Λ_n J_n
    loglik: torch.Tensor      # (M,) log p(D | w_i)
    n: int


def fisher(ens: Ensemble, x: Any, y: Any, *, chunk: int | None = None) -> Fisher:
    """The log-likelihood and the Fisher matrix of the likelihood of every member on ``(x, y)``.

    Gaussian likelihood: ``GᵀG / σ²`` from :func:`gauss_newton`. Heteroscedastic likelihood (outputs
    ``μ`` and ``s``, variance ``v = softplus(s) + 1e-6``): per point the Fisher information of
    ``N(y; μ, v)`` is ``1 / v`` for ``μ`` and ``1 / (2 v²)`` for ``v``, so with the per-point gradients
    ``g_μ``, ``g_s`` of the two outputs, ``F = Σ_n g_μ g_μᵀ / v + g_s g_sᵀ sigmoid(s)² / (2 v²)``
    (``dv/ds = sigmoid(s)``). Positive semi-definite, and the expected Hessian of ``-log p(D | w)``.
    """
    ens = check_ensemble(ens)
    if ens.likelihood == "gaussian":
        return _gaussian_fisher(ens, gauss_newton(ens, x, y, chunk=chunk))
    xn, yn, theta = _normalised_data(ens, x, y)
    m, p = theta.shape
    module = ens.module
    module.eval()

    def raw1(th, b, x1):                                   # one point: the two raw outputs (μ, s)
        return functional_call(module, (unflatten(ens, th), b), (x1.unsqueeze(0),))[0]

    jac = vmap(vmap(jacrev(raw1), in_dims=(None, None, 0)), in_dims=(0, 0, None))       # (M, c, 2, P)
    fwd = vmap(vmap(raw1, in_dims=(None, None, 0)), in_dims=(0, 0, None))               # (M, c, 2)
    n = xn.shape[0]
    step = chunk or max(1, int(1e7 // max(1, m * p)))
    prec = torch.zeros(m, p, p, dtype=theta.dtype, device=theta.device)
    loglik = torch.zeros(m, dtype=theta.dtype, device=theta.device)
    try:
        for s0 in range(0, n, step):
            xc, yc = xn[s0:s0 + step], yn[s0:s0 + step]
            with torch.no_grad():
                out = fwd(theta, ens.buffers, xc)
                mu, raw = out[..., 0], out[..., 1]
                var = heteroscedastic_variance(raw)
                loglik += heteroscedastic_log_density(yc, mu, var).sum(1) - 0.5 * math.log(2 * math.pi) * xc.shape[0]
            g = jac(theta, ens.buffers, xc).detach()
            w_mu = 1.0 / var
            w_s = torch.sigmoid(raw) ** 2 / (2.0 * var**2)             # (dv/ds)² / (2 v²)
            prec += torch.einsum("mcp,mc,mcq->mpq", g[:, :, 0], w_mu, g[:, :, 0])
            prec += torch.einsum("mcp,mc,mcq->mpq", g[:, :, 1], w_s, g[:, :, 1])
    finally:
        module.train(True)
    return Fisher(theta=theta, precision=prec, loglik=loglik, n=n)


def _prior_var(ens: Ensemble) -> torch.Tensor:
    """Marginal prior variances ``(P,)`` (of the Gaussian surrogate for a non-Gaussian prior)."""
    return torch.cat([s.reshape(-1) for s in ens.prior_sd.values()]) ** 2          # (P,)


def _prior_precision(ens: Ensemble, like: torch.Tensor) -> torch.Tensor:
    """Prior precision ``(P, P)`` (of the Gaussian surrogate for a non-Gaussian prior)."""
    return prior_moments(ens)[2].to(like)


def log_likelihood(ens: Ensemble, x: Any = None, y: Any = None, *, stats: GaussNewton | None = None) -> torch.Tensor:
    """``log p(D | w_i)`` per member ``(M,)`` (normalised target units)."""
    _require_gaussian(ens, "the Gaussian log-likelihood")
    st = stats if stats is not None else gauss_newton(ens, x, y)
    s2 = ens.noise_sd**2
    return -0.5 * st.rtr / s2 - 0.5 * st.n * math.log(2 * math.pi * s2)


def log_prior(ens: Ensemble) -> torch.Tensor:
    """``log p(w_i)`` per member ``(M,)``: the diagonal Gaussian ``N(0, Σ_p)`` of ``prior_sd``, or the prior
    given to :func:`~daml.ensembles.fit`."""
    check_ensemble(ens)
    return prior_log_prob(ens, flat_params(ens))


def _precision_eig(ens: Ensemble, st: GaussNewton, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of ``B = Lᵀ GᵀG L / σ²`` per member (``Σ_p = L Lᵀ``), truncated to ``rank``."""
    chol = prior_moments(ens)[1].to(st.theta)
    b = chol.T @ st.gtg @ chol / ens.noise_sd**2
    lam, vec = torch.linalg.eigh(b)                               # ascending
    lam = lam.clamp(min=0.0)
    if rank is not None and rank < lam.shape[-1]:
        lam, vec = lam[..., -rank:], vec[..., -rank:]
    return lam, vec


def log_weight_rml(ens: Ensemble, st: GaussNewton, rank: int | None = None) -> torch.Tensor:
    """Unnormalised RML log-weights ``log N(y - f + G w; 0, G Σ_p Gᵀ + σ² I)`` (see module docs)."""
    s2 = ens.noise_sd**2
    mean, chol, _ = (t.to(st.theta) for t in prior_moments(ens))
    theta = st.theta - mean                       # w0 ~ N(μ, Σ_p): the linearised evidence of the centred model
    gtg_w = torch.einsum("mpq,mq->mp", st.gtg, theta)
    # u = r + G w:  uᵀu and Gᵀu from the accumulated statistics
    utu = st.rtr + 2 * (st.gtr * theta).sum(1) + (theta * gtg_w).sum(1)
    gtu = st.gtr + gtg_w
    lam, vec = _precision_eig(ens, st, rank)
    # uᵀ S⁻¹ u = uᵀu/σ² - zᵀ (I + B)⁻¹ z with z = Lᵀ Gᵀu / σ² (Woodbury), and with the (possibly
    # truncated) eigenpairs of B: (I + B)⁻¹ = I - V diag(λ / (1 + λ)) Vᵀ; log det S = n log σ² + Σ log(1 + λ)
    z = gtu @ chol / s2
    zc = torch.einsum("mpk,mp->mk", vec, z)
    quad = utu / s2 - ((z**2).sum(1) - (zc**2 * lam / (1 + lam)).sum(1))
    logdet = st.n * math.log(s2) + torch.log1p(lam).sum(1)
    return -0.5 * quad - 0.5 * logdet - 0.5 * st.n * math.log(2 * math.pi)


def _gaussian_fisher(ens: Ensemble, st: GaussNewton) -> Fisher:
    """:class:`Fisher` of the Gaussian likelihood from its Gauss-Newton statistics: ``GᵀG / σ²``."""
    return Fisher(theta=st.theta, precision=st.gtg / ens.noise_sd**2, loglik=log_likelihood(ens, stats=st), n=st.n)


def log_proposal_laplace(ens: Ensemble, st: Fisher) -> torch.Tensor:
    """``log (1/M) Σ_j N(w_i; w_j, A_j⁻¹)``, ``A_j = Σ_p⁻¹ + F_j`` with ``F_j`` the Fisher matrix of the
    likelihood (``G_jᵀG_j/σ²`` for the Gaussian one), per member ``(M,)``."""
    a = st.precision + _prior_precision(ens, st.theta).expand_as(st.precision)
    chol = torch.linalg.cholesky(a)                                         # (M, P, P)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # log det A_j
    diff = st.theta[:, None, :] - st.theta[None, :, :]                      # (i, j, P)
    # (w_i - w_j)ᵀ A_j (w_i - w_j) = ‖L_jᵀ (w_i - w_j)‖²
    proj = torch.einsum("jpq,ijp->ijq", chol, diff)
    maha = (proj**2).sum(-1)
    p = st.theta.shape[1]
    comp = 0.5 * logdet[None, :] - 0.5 * p * math.log(2 * math.pi) - 0.5 * maha
    return torch.logsumexp(comp, dim=1) - math.log(st.theta.shape[0])


def weigh(ens: Ensemble, x: Any, y: Any, *, estimator: str = "rml", rank: int | None = None,
          smooth: bool = False) -> tuple[Ensemble, MemberWeights]:
    """Importance weights of the members of ``ens`` given the training data ``(x, y)``.

    Parameters
    ----------
    ens : Ensemble
        Trained by :func:`~daml.ensembles.fit` with the Gaussian or the heteroscedastic likelihood.
    x, y : array-like
        The training data, in original units (the same the ensemble was fitted on).
    estimator : {"rml", "laplace", "none"}
        How ``log q`` is estimated (module docs); ``"none"`` weighs by ``p(D|w) p(w)`` alone, as if the
        members were prior draws. ``"rml"`` needs the Gaussian likelihood; ``"laplace"`` uses the
        Fisher matrix of either likelihood (:func:`fisher`).
    rank : int, optional
        Low-rank Gauss-Newton for ``"rml"`` (``None``: all ``P`` eigenpairs).
    smooth : bool
        Return Pareto-smoothed weights (PSIS) in the ensemble instead of the raw ones.

    Returns
    -------
    (Ensemble, MemberWeights)
        The ensemble with its ``log_weight`` set, and the terms with ESS and k-hat.
    """
    ens = check_ensemble(ens)
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise InputError("estimator", f"one of {ESTIMATORS}", repr(estimator))
    if ens.members < 2:
        raise InputError("ens", "an ensemble of at least 2 members to weigh", f"{ens.members} member")
    if rank is not None:
        rank = check_int(rank, "rank")
    if ens.likelihood != "gaussian":
        if estimator == "rml":
            raise InputError("estimator", "'laplace' or 'none' for a heteroscedastic ensemble (the RML change "
                             "of variables needs a fixed noise level)", repr(estimator))
        gn, fi = None, fisher(ens, x, y)
    else:
        gn = gauss_newton(ens, x, y)
        fi = _gaussian_fisher(ens, gn)
    ll = fi.loglik
    lp = log_prior(ens)
    if estimator == "rml":
        lw_raw = log_weight_rml(ens, gn, rank)
        if ens.prior is not None and ens.prior.kind == "distribution":
            # members started from draws of a non-Gaussian prior p, anchored with its Gaussian surrogate g:
            # log q = log q_g(w) + log p(w0) - log g(w0) at the member's own draw (exact for Gaussian p),
            # and the target uses log p(w) itself
            g_prior = ens.prior._replace(kind="gaussian", dist=None)
            w0 = torch.cat([v.reshape(v.shape[0], -1) for v in ens.prior_draw.values()], 1)
            lq_g = ll + g_prior.log_prob(gn.theta) - lw_raw
            lq = lq_g + ens.prior.log_prob(w0) - g_prior.log_prob(w0)
            lw_raw = ll + lp - lq
        else:
            lq = ll + lp - lw_raw
    elif estimator == "laplace":
        lq = log_proposal_laplace(ens, fi)
        lw_raw = ll + lp - lq
    else:
        lq = torch.zeros_like(ll)
        lw_raw = ll + lp
    lw = lw_raw - torch.logsumexp(lw_raw, 0)
    smoothed, khat = psis_kernel(lw_raw)
    if float(lw_raw.max() - lw_raw.min()) <= 1e-9 * (1.0 + float(lw_raw.abs().max())):
        # equal weights (to rounding) have no tail; PSIS would fit noise
        smoothed, khat = lw, torch.tensor(-math.inf)
    if not bool(torch.isfinite(lw_raw).all()):
        raise NonFiniteError("ens", "members whose log-likelihood, log-prior and log-proposal are finite",
                             f"{int((~torch.isfinite(lw_raw)).sum())} members with a non-finite log-weight",
                             hint="a member sits where the prior density is zero or the likelihood overflows")
    converged = None if ens.convergence is None else ens.convergence["converged"]
    unconverged = 0
    if estimator != "none":
        unconverged = warn_unconverged(ens, "weigh", stacklevel=2)
    info = MemberWeights(log_weight=lw, log_likelihood=ll, log_prior=lp, log_proposal=lq,
                         ess=float(ess_kernel(lw_raw)), khat=float(khat), psis_log_weight=smoothed,
                         estimator=estimator, converged=converged, trusted=unconverged == 0)
    return ens.replace(log_weight=smoothed if smooth else lw,
                       config={**ens.config, "weights": estimator, "rank": rank, "smooth": bool(smooth),
                               "weights_unconverged_members": unconverged}), info
