"""Equal-weight correction of a weighted ensemble of networks: resample, then move.

Properly weighted, ensembles of trained networks are degenerate (seed 001): one or two members carry
nearly all the weight, so the weighted predictive is as overconfident as a single network. The
data-assimilation answer is to give up the importance weights while keeping the target: here the
particle-filter *resample-move* step (Gilks & Berzuini 2001).

1. **Resample** the members by their weights (systematic resampling, :mod:`daml.resampling`): the
   result has equal weights and still targets the posterior, but holds copies.
2. **Move** every copy with a Markov kernel that leaves the weight posterior
   ``p(w | D) ∝ p(D | w) p(w)`` invariant, so the equal weights stay correct while the copies spread
   out. The kernel is preconditioned MALA (Metropolis-adjusted Langevin; Roberts & Tweedie 1996) on
   the full training set, with the fixed preconditioner ``Ā⁻¹``, ``Ā = Σ_p⁻¹ + mean_j G_jᵀG_j/σ²``: the
   Gauss-Newton posterior covariance of :mod:`~daml.ensembles.weights` (a dense ``P × P`` Cholesky
   factor, fine for the few thousand parameters of the networks this module targets). For members
   with the heteroscedastic likelihood the likelihood term of the target and of ``Ā`` is theirs
   (``G_jᵀG_j/σ²`` becomes the Fisher matrix of :func:`~daml.ensembles.weights.fisher`). The step
   size of each chain is tuned towards an acceptance rate of 0.574 during the first ``adapt`` steps and
   then frozen, so that the remaining steps are an exact MH kernel.

Cost: ``steps`` full-data gradient evaluations per member (one vmapped call over members per step) on
top of the training, plus one Gauss-Newton pass for the preconditioner. The MH correction makes the
output exact in the limit of many steps; with few steps the copies of a dominant member stay close to
it, which the returned ``unique_before`` and ``acceptance`` make visible.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch.func import grad, vmap

from .. import _device
from ..errors import InputError, check_int, check_real
from ..resampling import systematic
from .training import Ensemble, check_data, flat_params, member_output, unflatten
from .training import check_ensemble, prior_log_prob
from .weights import _prior_precision, fisher, gauss_newton, heteroscedastic_log_density


class CorrectionInfo(NamedTuple):
    ess_before: float          # Kish ESS of the incoming weights
    unique_before: int         # distinct members after resampling, before the moves
    acceptance: torch.Tensor   # (M,) acceptance rate of each chain after adaptation
    step_size: torch.Tensor    # (M,) frozen step size of each chain
    steps: int


def log_posterior_fn(ens: Ensemble, xn: torch.Tensor, yn: torch.Tensor):
    """``θ -> log p(D | θ) + log p(θ)`` (normalised units, constants dropped) for one member, with the
    ensemble's likelihood: Gaussian with its noise level, or heteroscedastic (the network's variance)."""
    s2 = ens.noise_sd**2
    module = ens.module
    hetero = ens.likelihood == "heteroscedastic"

    def logp(theta, buffers):
        out, v = member_output(module, unflatten(ens, theta), buffers, xn, ens.likelihood)
        if hetero:
            data = heteroscedastic_log_density(yn, out, v).sum()
        else:
            data = -0.5 * ((yn - out) ** 2).sum() / s2
        return data + prior_log_prob(ens, theta)
    return logp


def equal_weight(ens: Ensemble, x: Any, y: Any, *, steps: int = 200, adapt: int | None = None,
                 target_accept: float = 0.574, seed: _device.Seed = None) -> tuple[Ensemble, CorrectionInfo]:
    """Turn a weighted ensemble into an equal-weight one by resample-move (module docs).

    Parameters
    ----------
    ens : Ensemble
        Weighted ensemble (Gaussian or heteroscedastic likelihood), for example from
        :func:`~daml.ensembles.weigh`; the moves target its posterior under its own likelihood.
    x, y : array-like
        The training data (original units).
    steps : int
        MALA steps per member (``0``: resampling only).
    adapt : int, optional
        Steps of step-size adaptation at the start (default ``steps // 2``); the rest use frozen steps.
    target_accept : float
        Acceptance rate the adaptation aims at (0.574 is optimal for MALA in high dimension).
    seed : int, SeedSequence, torch.Generator or None

    Returns
    -------
    (Ensemble, CorrectionInfo)
        Members with equal log-weights ``-log M``.
    """
    ens = check_ensemble(ens)
    steps = check_int(steps, "steps", minimum=0)
    adapt = steps // 2 if adapt is None else check_int(adapt, "adapt", minimum=0)
    if adapt > steps:
        raise InputError("adapt", f"at most steps={steps}", adapt)
    target_accept = check_real(target_accept, "target_accept")
    if not 0 < target_accept < 1:
        raise InputError("target_accept", "a rate in (0, 1)", target_accept)
    if ens.members < 2:
        raise InputError("ens", "an ensemble of at least 2 members", f"{ens.members} member")
    xt, yt = check_data(x, y, dtype=ens.x_mean.dtype, device=ens.x_mean.device)
    xn, yn = ens.normalise_x(xt), (yt - ens.y_mean) / ens.y_sd
    root = _device.seed_sequence(seed)
    s_res, s_move = root.spawn(2)
    g = _device.generator(s_move, xn.device)

    m = ens.members
    ess_before = float(torch.exp(-torch.logsumexp(2 * ens.log_weight, 0)))
    anc = systematic(torch.exp(ens.log_weight), seed=s_res)
    theta = flat_params(ens)[anc].clone()
    buffers = {k: v[anc] for k, v in ens.buffers.items()}
    unique_before = int(torch.unique(anc).numel())

    # preconditioner M = Ā⁻¹ with Ā the Gauss-Newton (Fisher) posterior precision averaged over members;
    # chol_a = chol(Ā), so M = chol_a⁻ᵀ chol_a⁻¹ and noise M^½ ξ = chol_a⁻ᵀ ξ
    if ens.likelihood == "gaussian":
        like_prec = gauss_newton(ens, xt, yt).gtg.mean(0) / ens.noise_sd**2
    else:
        like_prec = fisher(ens, xt, yt).precision.mean(0)
    a_bar = like_prec + _prior_precision(ens, theta)
    chol_a = torch.linalg.cholesky(a_bar)

    def precondition(v):                                             # M v for rows v (M, P)
        return torch.cholesky_solve(v.T, chol_a).T

    def noise(xi):                                                   # M^½ ξ: solve chol_aᵀ z = ξ
        return torch.linalg.solve_triangular(chol_a.T, xi.T, upper=True).T

    def sq_norm(v):                                                  # vᵀ M⁻¹ v = ‖chol_aᵀ v‖²
        return ((v @ chol_a) ** 2).sum(1)
    logp = log_posterior_fn(ens, xn, yn)
    value_and_grad = vmap(lambda th, b: (logp(th, b), grad(logp)(th, b)))
    module = ens.module
    module.eval()
    p = theta.shape[1]
    log_h = torch.full((m,), math.log(1.0 * p ** (-1.0 / 3.0)), dtype=theta.dtype, device=theta.device)
    accepted = torch.zeros(m, dtype=theta.dtype, device=theta.device)
    try:
        lp, gr = value_and_grad(theta, buffers)
        for k in range(steps):
            h = torch.exp(log_h)[:, None]
            mean_fwd = theta + 0.5 * h * precondition(gr)
            prop = mean_fwd + torch.sqrt(h) * noise(torch.randn(theta.shape, generator=g, dtype=theta.dtype,
                                                                device=theta.device))
            lp_new, gr_new = value_and_grad(prop, buffers)
            mean_bwd = prop + 0.5 * h * precondition(gr_new)
            log_q_fwd = -0.5 * sq_norm(prop - mean_fwd) / h[:, 0]
            log_q_bwd = -0.5 * sq_norm(theta - mean_bwd) / h[:, 0]
            log_alpha = lp_new - lp + log_q_bwd - log_q_fwd
            log_alpha = torch.where(torch.isfinite(log_alpha), log_alpha, torch.full_like(log_alpha, -math.inf))
            u = torch.rand(m, generator=g, dtype=theta.dtype, device=theta.device)
            acc = torch.log(u) < log_alpha
            theta = torch.where(acc[:, None], prop, theta)
            lp = torch.where(acc, lp_new, lp)
            gr = torch.where(acc[:, None], gr_new, gr)
            if k < adapt:
                rate = torch.exp(log_alpha.clamp(max=0.0))
                log_h = log_h + (rate - target_accept) * 2.0 / math.sqrt(k + 1.0)
            else:
                accepted += acc.to(theta.dtype)
    finally:
        module.train(True)
    params = unflatten(ens, theta)
    params = {k: v.contiguous() for k, v in params.items()}
    out = ens.replace(params=params, buffers=buffers, prior_draw={k: v[anc] for k, v in ens.prior_draw.items()},
                      log_weight=torch.full((m,), -math.log(m), dtype=theta.dtype, device=theta.device),
                      config={**ens.config, "correction": "resample-move MALA", "correction_steps": steps})
    frozen = max(steps - adapt, 1)
    return out, CorrectionInfo(ess_before=ess_before, unique_before=unique_before, acceptance=accepted / frozen,
                               step_size=torch.exp(log_h), steps=steps)
