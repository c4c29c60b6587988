r"""The differentiable particle filter ``dpf`` and the differentiable log-evidence :func:`log_evidence`.

A particle filter estimates the marginal likelihood (evidence) of the observations,

.. math::

    \hat p(y_{1:T}) = \prod_{t=1}^T \sum_{i=1}^N W_{t-1}^i\, \tilde w_t^i, \qquad
    \tilde w_t^i = \frac{g(y_t \mid x_t^i)\, f(x_t^i \mid x_{t-1}^i)}{q(x_t^i \mid x_{t-1}^i, y_t)},

with ``W_{t-1}`` the normalised weights carried from the previous analysis, ``f`` the model's
transition density, ``g`` the observation likelihood and ``q`` the proposal that drew ``x_t`` (the
model itself when there is none, and then ``tilde w = g``). ``\hat p`` is unbiased for every ``N``
(Del Moral 2004). Everything here is written in torch with autograd on, so the gradient of
``log p_hat`` with respect to the parameters of the model, of the proposal and of the observation
noise can be taken, and both networks trained by maximising the estimated evidence.

The one obstacle is resampling, which draws discrete ancestors: ordinary backpropagation sees no
dependence of the resampled particles on the weights, and the gradient is biased. The resampler is
one of :data:`daml.resampling.DIFFERENTIABLE` (see :mod:`daml.resampling`):

``"stop_gradient"`` (Scibior & Wood 2021, the default)
    The forward pass is ordinary resampling, unchanged; the new log-weights carry the derivative of
    the ancestors' log-weights. The gradient of ``p_hat`` is then an unbiased estimate of the gradient
    of ``p(y_{1:T})``. With ``proposal=None``, ``threshold=1`` and scheme ``s``, the filter's values
    (members, log-weights, ``loglik`` and ``ess``) are bit for bit those of
    :func:`daml.filters.bootstrap` ``(members, threshold=1.0, resampling=s)`` with the same seed.
``"soft"`` (Karkus, Hsu & Lee 2018)
    Ancestors from ``alpha w + (1 - alpha) / N``, importance-weighted. The unnormalised new weights
    are used: their total mass (expectation one) is carried into the next analysis's evidence
    increment and the state keeps normalised weights, so ``p_hat`` stays unbiased.
``"optimal_transport"`` (Corenflos, Thornton, Deligiannidis & Doucet 2021)
    The entropy-regularised transport map (regularisation ``epsilon``): deterministic and smooth,
    biased (the resampled cloud is contracted towards its mean by an amount that vanishes with
    ``epsilon``).

Resampling happens where ``ESS <= threshold * N`` (``threshold = 1``: at every analysis); the
decision uses the detached weights.

**Proposals.** ``proposal`` is any object with ``sample(x_prev, y, mask, generator, *, model,
operator) -> (x, log_q)`` (the protocol of :mod:`daml.filters.proposals`; for example a learned
Gaussian-mixture network, Cox, Segarra & Elvira 2024). With a proposal the filter looks ahead
(``lookahead=True``): the model step that lands on an observation is left to the analysis, which
draws it from the proposal and adds ``log f(x | x_prev) + log g(y | x) - log q(x | x_prev, y)`` to the
log-weights. The transition density is ``N(x; step(x_prev), Q)`` for a model with Gaussian noise and
the model's ``log_transition`` otherwise (:func:`daml.models.base.transition_log_density`); a
perfect model (no noise, no density) is refused. Between the forecast and the analysis the state is
*pending*: it holds the particles ``x_prev`` of the previous step, and ``members`` reports the
model's deterministic step ``step(x_prev)`` (the transition mean) with the carried weights, which is
what :func:`daml.filters.run` records as the forecast.

References
----------
Scibior, A. & Wood, F. (2021). Differentiable particle filtering without modifying the forward
pass. arXiv:2106.10314.

Karkus, P., Hsu, D. & Lee, W. S. (2018). Particle filter networks with application to visual
localization. *Proceedings of the 2nd Conference on Robot Learning (CoRL)*, PMLR 87.

Corenflos, A., Thornton, J., Deligiannidis, G. & Doucet, A. (2021). Differentiable particle
filtering via entropy-regularized optimal transport. *ICML*, PMLR 139.

Cox, B., Segarra, S. & Elvira, V. (2024). Learning state and proposal dynamics in state-space
models using differentiable particle filters and neural networks. arXiv:2411.15638.

Del Moral, P. (2004). *Feynman-Kac Formulae*. Springer.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import torch

from .. import _device
from .. import resampling as _resampling
from ..errors import DivergenceError, DtypeError, InputError, NonFiniteError, ShapeError, check_real
from ..models.base import (Model, _check_model, as_real_tensor, has_gaussian_transition, transition_log_density,
                           transition_sample)
from ..models.observations import Observation
from .base import (EnsembleState, Filter, Upcoming, check_members, ensemble_init,
                   gaussian_loglik, register, unchecked)
from .particle import check_threshold, kish_ess, log_normalise

__all__ = ["dpf", "log_evidence", "Evidence", "DPFState"]

RESAMPLERS = ("stop_gradient", "soft", "optimal_transport")
"""The differentiable resamplers ``dpf`` accepts (those of :data:`daml.resampling.DIFFERENTIABLE`)."""


class DPFState(EnsembleState):
    """The state of :func:`dpf`: an :class:`~daml.filters.EnsembleState` ``(x, log_weight)`` with
    three more attributes.

    ``x_prev``
        ``None``, or for a *pending* state (a forecast with a proposal, waiting for its analysis) the
        particles ``(*batch, N, n)`` of the previous step; ``x`` is then ``model.step(x_prev)``, the
        transition mean, which is what the state reports as its members.
    ``before``
        After an analysis: the reweighted particles and normalised log-weights before resampling
        (:func:`log_evidence` reports their weighted mean), else ``None``.
    ``log_mass``
        ``None``, or ``(*batch,)``: the log of the total mass of unnormalised resampled weights
        (``"soft"`` resampling) carried into the next analysis's evidence increment.
    ``model``
        For a pending state, the model whose step the analysis completes (the analysis is not given
        the model by the :class:`~daml.filters.Filter` protocol); else ``None``.
    """

    def __new__(cls, x: torch.Tensor, log_weight: torch.Tensor, x_prev: torch.Tensor | None = None,
                before: tuple[torch.Tensor, torch.Tensor] | None = None,
                log_mass: torch.Tensor | None = None, model: Any = None) -> "DPFState":
        self = super().__new__(cls, x, log_weight)
        self.x_prev, self.before, self.log_mass, self.model = x_prev, before, log_mass, model
        return self

    @property
    def pending(self) -> bool:
        """Whether the state waits for its analysis to draw the last step from the proposal."""
        return self.x_prev is not None


def _dpf_members(state: EnsembleState) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, log_weight)``: the particles (for a pending state the transition means ``step(x_prev)``)."""
    return state.x, state.log_weight


@register("dpf")
def dpf(members: int, proposal: Any = None, resampler: str = "stop_gradient", scheme: str = "multinomial",
        threshold: float = 1.0, alpha: float = 0.5, epsilon: float = 0.1) -> Filter:
    r"""Differentiable particle filter (see the module docstring for the maths).

    Parameters
    ----------
    members : int
        Number of particles ``N`` (``>= 1``).
    proposal : object with ``sample``, path, optional
        ``proposal.sample(x_prev, y, mask, generator, *, model, operator) -> (x, log_q)`` draws the
        step that lands on an observation (``x`` ``(*batch, N, n)``, reparameterised) and returns
        ``log q(x | x_prev, y)`` ``(*batch, N)``. A path (str) reads a trained
        :class:`~daml.filters.MixtureProposal` written by :func:`daml.io.save_network` (so an
        experiment file can name one: ``proposal = "proposal.pt"``). ``None`` (default): the model's
        own transition (the bootstrap filter).
    resampler : str
        ``"stop_gradient"`` (default), ``"soft"`` or ``"optimal_transport"``.
    scheme : str
        Scheme of the stochastic resamplers' ancestor draws: ``"multinomial"`` (default),
        ``"systematic"``, ``"stratified"`` or ``"residual"``.
    threshold : float in [0, 1]
        Resample where ``ESS <= threshold * N`` (``1``, the default: at every analysis; ``0``: never).
    alpha : float in (0, 1]
        Mixing weight of ``"soft"`` resampling.
    epsilon : float > 0
        Regularisation of ``"optimal_transport"`` resampling.

    Returns
    -------
    Filter
        Named ``"dpf"``; ``inference=False`` (its steps keep autograd); ``lookahead=True`` with a
        proposal. Each analysis reports ``ess`` (after reweighting, before resampling), ``resampled``
        and ``loglik`` (the log of the evidence increment ``log p_hat(y_t | y_{1:t-1})``).

    Raises
    ------
    InputError
        Naming ``members`` (not an int ``>= 1``), ``proposal`` (no ``sample`` method), ``resampler``,
        ``scheme``, ``threshold``, ``alpha`` or ``epsilon``; at ``init``, naming ``model`` for a
        perfect model with a proposal (no transition density).
    DivergenceError
        At an analysis where every weight is zero or not finite, or a particle is not finite.
    """
    members = check_members(members, minimum=1)
    source = None
    if isinstance(proposal, (str, os.PathLike)):          # a trained proposal (daml.io.save_network)
        from ..io import load_network

        source = os.fspath(proposal)
        proposal = load_network(source, "MixtureProposal")
    if proposal is not None and not callable(getattr(proposal, "sample", None)):
        raise InputError("proposal", "None or an object with sample(x_prev, y, mask, generator, *, model, operator) "
                         "(see daml.filters.proposals)", type(proposal).__name__)
    if not isinstance(resampler, str) or resampler not in RESAMPLERS:
        raise InputError("resampler", f"one of {list(RESAMPLERS)}", repr(resampler))
    if not isinstance(scheme, str) or scheme not in _resampling.METHODS:
        raise InputError("scheme", f"one of {sorted(_resampling.METHODS)}", repr(scheme))
    threshold = check_threshold(threshold)
    alpha = check_real(alpha, "alpha", positive=True, expected="a mixing weight in (0, 1]")
    if alpha > 1.0:
        raise InputError("alpha", "a mixing weight in (0, 1]", repr(alpha))
    epsilon = check_real(epsilon, "epsilon", positive=True, expected="a positive regularisation")
    options = {"stop_gradient": {"scheme": scheme}, "soft": {"scheme": scheme, "alpha": alpha, "normalise": False},
               "optimal_transport": {"epsilon": epsilon}}[resampler]
    base_init = ensemble_init(members)

    def init(model: Model, mean: torch.Tensor, cov: torch.Tensor, g: torch.Generator) -> EnsembleState:
        if proposal is not None and has_gaussian_transition(model) and getattr(model, "noise_cov", None) is None:
            raise InputError("model", "a model with a transition density (noise_cov, or log_transition) for dpf "
                             "with a proposal", f"{type(model).__name__} without model noise (a perfect model)",
                             hint="use proposal=None for a perfect model")
        return base_init(model, mean, cov, g)

    def forecast(state: EnsembleState, model: Model, g: torch.Generator, upcoming: Upcoming | None = None):
        mass = getattr(state, "log_mass", None)
        if proposal is not None and upcoming is not None and upcoming.steps == 1:
            return DPFState(model.step(state.x), state.log_weight, x_prev=state.x, log_mass=mass, model=model)
        x = transition_sample(model, state.x, g)
        return EnsembleState(x, state.log_weight) if mass is None else DPFState(x, state.log_weight, log_mass=mass)

    def resample(x: torch.Tensor, lw: torch.Tensor, flag: torch.Tensor, g: torch.Generator):
        """Resample where ``flag``; return the particles, normalised log-weights and the log-mass."""
        if not bool(flag.any()):
            return x, lw, None
        if not bool(torch.isfinite(x.detach()).all()):
            raise DivergenceError("dpf: non-finite particles")
        out = _resampling.differentiable(resampler, x, lw, seed=g, **options)
        new_x, new_lw, mass = out.x, out.log_weight, None
        if resampler == "soft":                       # unnormalised: carry the mass, keep lw normalised
            new_lw, mass = log_normalise(new_lw, "dpf (soft resampling)")
        if not bool(flag.all()):
            new_x = torch.where(flag[..., None, None], new_x, x)
            new_lw = torch.where(flag[..., None], new_lw, lw)
            if mass is not None:
                mass = torch.where(flag, mass, torch.zeros_like(mass))
        return new_x, new_lw, mass

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator):
        x_prev = getattr(state, "x_prev", None)
        lw = state.log_weight
        if x_prev is None:
            x = state.x
            inc = gaussian_loglik(operator.residual(y.unsqueeze(-2), x), operator.noise_cov, mask)
        else:
            model = state.model
            x, log_q = proposal.sample(x_prev, y, mask, g, model=model, operator=operator)
            mean = state.x if has_gaussian_transition(model) else None          # step(x_prev), computed once
            inc = (transition_log_density(model, x_prev, x, mean)
                   + gaussian_loglik(operator.residual(y.unsqueeze(-2), x), operator.noise_cov, mask) - log_q)
        mass = getattr(state, "log_mass", None)
        if mass is not None:
            lw = lw + mass.unsqueeze(-1)
        lw, log_z = log_normalise(lw + torch.nan_to_num(inc, nan=-math.inf), "dpf")
        ess = kish_ess(lw.detach())
        flag = ess <= threshold * x.shape[-2]
        new_x, new_lw, new_mass = resample(x, lw, flag, g)
        return (DPFState(new_x, new_lw, before=(x, lw), log_mass=new_mass),
                {"ess": ess, "resampled": flag.to(x.dtype), "loglik": log_z})

    config = {"members": members,
              "proposal": None if proposal is None else source if source is not None else type(proposal).__name__,
              "resampler": resampler, "scheme": scheme, "threshold": threshold, "alpha": alpha, "epsilon": epsilon}
    return Filter("dpf", config, init, forecast, analysis, _dpf_members, lookahead=proposal is not None,
                  inference=False)


# -- the differentiable time loop ------------------------------------------------------------------------

class Evidence(NamedTuple):
    """What :func:`log_evidence` returns (every tensor keeps its autograd graph)."""

    log_evidence: torch.Tensor
    """``log p_hat(y_{1:T})`` per sequence, ``(*batch,)``: the sum of ``increments``."""
    increments: torch.Tensor
    """``log p_hat(y_t | y_{1:t-1})``, ``(*batch, T)`` (the filter's ``loglik`` at each analysis)."""
    mean: torch.Tensor
    """The weighted filtered mean ``(*batch, T, n)`` after reweighting, before resampling."""
    ess: torch.Tensor
    """The effective sample size ``(*batch, T)`` after reweighting, before resampling (detached)."""


def _as_observations(y: Any, m: int) -> torch.Tensor:
    if isinstance(y, torch.Tensor) and y.dtype in (torch.float32, torch.float64):
        t = y
    else:
        t = as_real_tensor(y, "y", dtype=_device.resolve_dtype(None))
        if t.dtype not in (torch.float32, torch.float64):
            raise DtypeError("y", "float32 or float64 observations", f"dtype {t.dtype}")
    if t.ndim < 2 or t.shape[-1] != m or t.shape[-2] == 0:
        raise ShapeError("y", f"observations of shape (*batch, T, {m}) with T >= 1 ({m}: the operator's size)",
                         f"shape {tuple(t.shape)}")
    if bool(torch.isinf(t.detach()).any()):
        raise NonFiniteError("y", "finite observations, NaN (only) marking a missing entry", "infinite entries")
    return t


def log_evidence(filt: Filter, model: Model, y: Any, *, operator: Observation, mean: Any, cov: Any,
                 seed: _device.Seed = None) -> Evidence:
    r"""The log-evidence ``log p_hat(y_{1:T})`` of observation sequences, differentiably.

    A time loop like :func:`daml.filters.run`'s, without its recording, checks and ``no_grad``: the
    filter's ``init``, ``forecast`` and ``analysis`` run with autograd on, so that
    ``Evidence.log_evidence.sum().backward()`` reaches every tensor that requires a gradient and shaped
    the estimate: the parameters of a ``torch.nn.Module`` model (``step``, ``sample_step``,
    ``log_transition``), of a proposal, the observation operator's ``noise_cov`` and the prior.

    Each time index of ``y`` is an observation time one model step after the previous one (index 0 is
    one step after the initial state): ``T`` forecasts and ``T`` analyses. The random streams are
    those of :func:`daml.filters.run` (``g_init, g_run = spawn_generators(seed, 2)``), so for a twin
    Dataset observed at every step, ``log_evidence(filt, model, data.y[..., 1:, :], ...)`` repeats the
    analyses of ``run(filt, model, data, seed=seed)`` value for value. (Unlike ``run``, a time whose
    entries are all missing still gets an analysis, which leaves the weights unchanged but may resample.)

    Parameters
    ----------
    filt : Filter
        A filter whose analysis reports ``loglik`` (:func:`dpf`; also the Kalman filter and the
        particle filters, though only ``dpf`` is differentiable through its resampling).
    model : Model
        The model (any :class:`daml.models.Model`; a ``torch.nn.Module`` for learnable parameters).
    y : (*batch, T, m) tensor or array
        Observations, NaN where an entry is missing; leading dims are independent sequences.
    operator : Observation
        The observation operator (``h`` and the noise ``R``).
    mean : (n,) or (*batch, n)
        Mean of the Gaussian prior of the initial state.
    cov : (n, n)
        Its covariance.
    seed : int, SeedSequence, torch.Generator or None
        The random stream.

    Returns
    -------
    Evidence
        ``log_evidence`` ``(*batch,)``, ``increments`` ``(*batch, T)``, ``mean`` ``(*batch, T, n)`` (the
        weighted mean before resampling: the filtering mean) and ``ess`` ``(*batch, T)``.

    Raises
    ------
    InputError
        Naming ``filt``, ``model``, ``operator``, ``y``, ``mean`` or ``cov`` (its subclasses as fit).
    DivergenceError
        With the time index of ``y`` where every weight became zero or non-finite.
    """
    if not isinstance(filt, Filter):
        raise InputError("filt", "a daml.filters.Filter (for example daml.filters.dpf(members=100))",
                         type(filt).__name__)
    _check_model(model)
    n = model.state_size
    if not isinstance(operator, Observation):
        raise InputError("operator", "an Observation (see daml.models.observe_all)", type(operator).__name__)
    if operator.state_size != n:
        raise ShapeError("operator", f"an operator on states of size {n} (the model's)", f"size {operator.state_size}")
    y = _as_observations(y, operator.size)
    dt, dev = y.dtype, y.device
    batch = tuple(y.shape[:-2])
    m0 = mean if isinstance(mean, torch.Tensor) and mean.dtype == dt else as_real_tensor(mean, "mean", dtype=dt,
                                                                                          device=dev)
    if m0.ndim == 0 or m0.shape[-1] != n:
        raise ShapeError("mean", f"a prior mean of shape (..., {n}) ({n}: the state size)", f"shape {tuple(m0.shape)}")
    try:
        m0 = m0.expand(*batch, n) if m0.ndim == 1 else m0.expand(*torch.broadcast_shapes(m0.shape[:-1], batch), n)
    except RuntimeError as exc:
        raise ShapeError("mean", f"batch dims that broadcast with those of y {batch}", f"shape {tuple(m0.shape)}") from exc
    if not bool(torch.isfinite(m0.detach()).all()):
        raise NonFiniteError("mean", "a finite prior mean", "NaN or infinite entries")
    c0 = cov if isinstance(cov, torch.Tensor) and cov.dtype == dt else as_real_tensor(cov, "cov", dtype=dt, device=dev)
    if tuple(c0.shape) != (n, n):
        raise ShapeError("cov", f"a prior covariance of shape ({n}, {n})", f"shape {tuple(c0.shape)}")

    g_init, g_run = _device.spawn_generators(seed, 2, device=dev)
    state = filt.init(model, m0, c0, g_init)
    zero = torch.zeros((), dtype=dt, device=dev)
    incs, means, esss = [], [], []
    with unchecked():
        for t in range(y.shape[-2]):
            yt = y[..., t, :]
            mask = torch.isfinite(yt)
            yt = torch.where(mask, yt, zero)
            try:
                if filt.lookahead:
                    state = filt.forecast(state, model, g_run, Upcoming(yt, mask, operator, 1, 1))
                else:
                    state = filt.forecast(state, model, g_run)
                state, info = filt.analysis(state, yt, operator, mask, g_run)
            except DivergenceError as err:
                if err.step is not None:
                    raise
                raise DivergenceError(str(err) + " (time index of y)", step=t) from err
            if "loglik" not in info:
                raise InputError("filt", "a filter whose analysis reports loglik (an evidence increment)",
                                 f"{filt.name}, reporting {sorted(info)}")
            before = getattr(state, "before", None) or getattr(state, "recorded", None) or filt.members(state)
            x, lw = before
            means.append((torch.softmax(lw, -1).unsqueeze(-2) @ x).squeeze(-2))
            incs.append(info["loglik"].expand(batch) if info["loglik"].ndim < len(batch) else info["loglik"])
            esss.append(info["ess"].detach() if "ess" in info else kish_ess(torch.log_softmax(lw.detach(), -1)))
    increments = torch.stack(incs, -1)
    return Evidence(increments.sum(-1), increments, torch.stack(means, -2), torch.stack(esss, -1))
