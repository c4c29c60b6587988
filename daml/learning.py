r"""Learning state-space models by maximising a differentiable particle filter's evidence.

:func:`fit_state_space` fits the parameters of a transition model and of a proposal (both
``torch.nn.Module`` objects, for example :class:`daml.models.mixture.MixtureTransition` and
:class:`daml.filters.proposals.MixtureProposal`) to observation sequences ``y`` by stochastic
gradient ascent on the particle estimate of the log-evidence per observation,

.. math::

    \ell(\theta, \phi) = \frac{1}{B\, L} \sum_{b=1}^{B} \log \hat p_{\theta, \phi}(y^{(b)}_{1:L}),

computed by :func:`daml.filters.log_evidence` through :func:`daml.filters.dpf` (a fresh random
stream at every iteration, derived from ``seed``). Two devices of Cox, Segarra & Elvira (2024):

*Alternating optimisation* (their Algorithm 3). The parameter groups named in ``learn`` are
updated in turn: for each window, ``iterations`` Adam steps on the proposal ``phi`` with the
transition ``theta`` frozen, then ``iterations`` steps on ``theta`` with ``phi`` frozen, repeated
``rounds`` times. Learning
only ``("proposal",)`` with a known transition is the learned-proposal case; only
``("transition",)`` (with ``proposal=None``: the bootstrap filter) recovers a transition.

*Nested observation windows* (:func:`nested_windows`). The sequences are cut to their first
``L_1 < L_2 < ... < L_W = T`` observations, ``y_{1:L_1} ⊂ y_{1:L_2} ⊂ ...``, and fitted window after
window: the likelihood of a long sequence is sharply concentrated and its particle estimate noisy
far from the optimum, while a short window gives a smooth, easy objective whose optimum starts the
next.

Trust: a non-finite loss or gradient stops the fit with a :class:`daml.errors.DivergenceError`
naming the iteration (its ``partial`` holds the report so far); a loss that has not settled by the
end (see :class:`FitReport`) gives ``converged=False`` and a
:class:`daml.errors.ConvergenceWarning`.

References
----------
Cox, B., Segarra, S. & Elvira, V. (2024). Learning state and proposal dynamics in state-space
models using differentiable particle filters and neural networks. arXiv:2411.15638.

Scibior, A. & Wood, F. (2021). Differentiable particle filtering without modifying the forward
pass. arXiv:2106.10314.

Kingma, D. P. & Ba, J. (2015). Adam: a method for stochastic optimization. *ICLR*.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from . import _device
from .errors import ConvergenceWarning, DivergenceError, InputError, NonFiniteError, ShapeError, check_int, check_real
from .filters.dpf import RESAMPLERS, dpf, log_evidence
from .models.base import _check_model, as_real_tensor
from .models.observations import Observation

__all__ = ["nested_windows", "fit_state_space", "FitReport", "GROUPS"]

GROUPS = ("proposal", "transition")
"""The parameter groups :func:`fit_state_space` can learn."""


class FitReport(NamedTuple):
    """What :func:`fit_state_space` returns (the model and proposal are trained in place)."""

    history: np.ndarray
    """The loss ``-mean_b log p_hat(y^(b)_{1:L}) / L`` at every iteration (before its update), in order."""
    converged: bool
    """Whether the loss settled in the last phase (the last window) of every group: the mean loss of its
    last 20% of iterations (at least 2) differs from that of the 20% before by at most
    ``max(tol * max(1, |mean|), 3 standard errors of the difference)`` (the losses are Monte Carlo
    estimates: a change within their noise counts as settled). Fewer than 4 iterations: ``False``."""
    iterations: int
    """Iterations run (Adam steps), over all windows and groups."""
    seconds: float
    """Wall time of the fit."""
    windows: tuple
    """The window lengths used, in order."""
    groups: tuple
    """The group updated at each iteration (``"proposal"`` or ``"transition"``), aligned with ``history``."""
    message: str
    """A sentence on the convergence check."""


def nested_windows(length: int, count: int) -> tuple[int, ...]:
    """``count`` nested observation windows ending at ``length``: ``ceil(b * length / count)``, ``b = 1..count``.

    Parameters
    ----------
    length : int
        The number of observations ``T`` (``>= 1``).
    count : int
        How many windows, ``1 <= count <= length`` (each at least one observation longer than the last).

    Returns
    -------
    tuple of int
        Strictly increasing window lengths, the last equal to ``length``.

    Raises
    ------
    InputError
        Naming ``length`` or ``count``.

    Examples
    --------
    >>> nested_windows(100, 4)
    (25, 50, 75, 100)
    """
    length = check_int(length, "length", 1, "an int >= 1 (the number of observations)")
    count = check_int(count, "count", 1, f"an int in [1, {length}] (the number of windows)")
    if count > length:
        raise InputError("count", f"an int in [1, {length}] (at most one window per observation)", repr(count))
    return tuple(int(math.ceil(b * length / count)) for b in range(1, count + 1))


def _check_windows(windows: Any, length: int) -> tuple[int, ...]:
    if windows is None:
        return (length,)
    if isinstance(windows, (int, np.integer)) and not isinstance(windows, bool):
        if windows < 1 or windows > length:
            raise InputError("windows", f"a count in [1, {length}] or increasing lengths ending at most at {length}",
                             repr(windows))
        return nested_windows(length, int(windows))
    try:
        seq = tuple(windows)
    except TypeError as exc:
        raise InputError("windows", "None, a count of nested windows or a sequence of increasing lengths",
                         type(windows).__name__) from exc
    ok = len(seq) > 0 and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in seq)
    if ok:
        ok = all(1 <= w <= length for w in seq) and all(a < b for a, b in zip(seq, seq[1:]))
    if not ok:
        raise InputError("windows", f"strictly increasing ints in [1, {length}] (the number of observations)",
                         repr(seq)[:200])
    return tuple(int(w) for w in seq)


def _parameters(obj: Any, group: str) -> list[torch.Tensor]:
    params = [p for p in obj.parameters()] if isinstance(obj, torch.nn.Module) else []
    if not params:
        what = "the proposal" if group == "proposal" else "the model (the transition)"
        raise InputError("learn", f"groups whose object has parameters ({what} must be a torch.nn.Module with "
                         "parameters to learn it)", f"{group!r} with {type(obj).__name__}")
    return params


def _settled(losses: np.ndarray, tol: float) -> tuple[bool, str]:
    """The convergence check of :class:`FitReport` on the losses of one phase."""
    k = max(2, int(math.ceil(0.2 * losses.size)))
    if losses.size < 2 * k:
        return False, f"only {losses.size} iterations (at least 4 are needed to judge)"
    tail, prev = losses[-k:], losses[-2 * k:-k]
    drift = abs(float(tail.mean() - prev.mean()))
    se = math.sqrt(float(tail.var(ddof=1)) / k + float(prev.var(ddof=1)) / k)
    allowed = max(tol * max(1.0, abs(float(tail.mean()))), 3.0 * se)
    return drift <= allowed, (f"change {drift:.3g} of the mean loss between the last two blocks of {k} iterations "
                              f"(allowed {allowed:.3g})")


def fit_state_space(model: Any, proposal: Any, y: Any, *, operator: Observation, prior: tuple[Any, Any],
                    members: int = 100, resampler: str = "stop_gradient", learn: Sequence[str] = GROUPS,
                    windows: Any = None, iterations: int = 200, lr: float = 1e-2, seed: _device.Seed = 0,
                    tol: float = 1e-2, threshold: float = 1.0, scheme: str = "multinomial",
                    max_grad_norm: float | None = None, rounds: int = 1, warmup: int = 0) -> FitReport:
    r"""Fit a transition model and/or a proposal by maximising the DPF's log-evidence (see the module docstring).

    Parameters
    ----------
    model : Model
        The transition model (a ``torch.nn.Module`` to learn ``"transition"``; any daml model otherwise).
    proposal : object with ``sample``, or None
        The proposal (a ``torch.nn.Module`` to learn ``"proposal"``); ``None``: the model's transition.
    y : (*batch, T, m) tensor or array
        Observation sequences (NaN: missing), one model step apart; leading dims are independent sequences.
    operator : Observation
        The observation operator.
    prior : (mean, cov)
        The Gaussian prior of the initial state: mean ``(n,)`` or ``(*batch, n)``, covariance ``(n, n)``.
    members : int
        Particles per sequence (default 100).
    resampler : str
        The DPF's differentiable resampler (default ``"stop_gradient"``).
    learn : sequence of str
        The groups to update, in the order of the alternation: ``"proposal"``, ``"transition"`` or both.
    windows : None, int or sequence of int
        ``None``: the whole sequence; an int ``W``: :func:`nested_windows` ``(T, W)``; or the lengths.
    iterations : int
        Adam steps per window and group (default 200).
    lr : float
        Adam's learning rate (default 0.01).
    seed : int, SeedSequence or None
        Seed of the random streams (one fresh stream per iteration, spawned from it).
    tol : float
        Relative tolerance of the convergence check (see :class:`FitReport`).
    threshold, scheme
        Resampling threshold and scheme of the DPF.
    max_grad_norm : float, optional
        Clip the gradient of each group to this norm before each step.
    rounds : int
        Alternations per window (default 1): each round updates every group of ``learn`` in turn for
        ``iterations`` steps, so a window costs ``rounds * len(learn) * iterations`` steps.
    warmup : int
        Ramp each group's learning rate linearly from ``lr / (warmup + 1)`` up to ``lr`` over its first
        ``warmup`` steps (default 0: none). Adam's first steps move every weight by about ``lr``
        whatever the gradient's size, which can throw a network far from its initialisation (the loss
        of the benchmarks' L96 proposals jumped 5-10 times before recovering); a warm-up avoids it.

    Notes
    -----
    In daml's benchmarks (``benchmarks/dpf.py``, docs/dpf.md) proposals trained with
    ``resampler="soft"`` scored better than with the default ``"stop_gradient"`` in every case (the
    stop-gradient gradient is unbiased for the gradient of ``p_hat`` but noisy); try both.

    Returns
    -------
    FitReport

    Raises
    ------
    InputError
        Naming the argument (its subclasses as fit).
    DivergenceError
        At the first iteration whose loss or gradient is not finite (or whose filter diverged), naming it;
        ``partial`` holds the :class:`FitReport` of the iterations before it.

    Warns
    -----
    ConvergenceWarning
        When the loss has not settled (``converged=False``).
    """
    _check_model(model)
    if proposal is not None and not callable(getattr(proposal, "sample", None)):
        raise InputError("proposal", "None or an object with sample(x_prev, y, mask, generator, *, model, operator)",
                         type(proposal).__name__)
    if not isinstance(operator, Observation):
        raise InputError("operator", "an Observation (see daml.models.observe_all)", type(operator).__name__)
    if not isinstance(prior, (tuple, list)) or len(prior) != 2:
        raise InputError("prior", "a pair (mean, cov) of the initial state's Gaussian prior", type(prior).__name__)
    if isinstance(learn, str) or not isinstance(learn, (tuple, list)) or not learn \
            or any(g not in GROUPS for g in learn) or len(set(learn)) != len(learn):
        raise InputError("learn", f"a non-empty sequence of distinct groups from {list(GROUPS)}", repr(learn))
    learn = tuple(learn)
    if "proposal" in learn and proposal is None:
        raise InputError("learn", "'proposal' only with a proposal to learn", "proposal=None")
    if not isinstance(resampler, str) or resampler not in RESAMPLERS:
        raise InputError("resampler", f"one of {list(RESAMPLERS)}", repr(resampler))
    iterations = check_int(iterations, "iterations", 1, "an int >= 1 (Adam steps per window and group)")
    rounds = check_int(rounds, "rounds", 1, "an int >= 1 (alternations per window)")
    warmup = check_int(warmup, "warmup", 0, "an int >= 0 (learning-rate warm-up steps per group)")
    lr = check_real(lr, "lr", positive=True, expected="a positive learning rate")
    tol = check_real(tol, "tol", positive=True, expected="a positive relative tolerance")
    if max_grad_norm is not None:
        max_grad_norm = check_real(max_grad_norm, "max_grad_norm", positive=True, expected="None or a positive norm")
    groups = {"proposal": proposal, "transition": model}
    params = {g: _parameters(groups[g], g) for g in learn}
    filt = dpf(members, proposal=proposal, resampler=resampler, scheme=scheme, threshold=threshold)
    net = getattr(model, "net", None)
    if ("transition" in learn and proposal is None and getattr(net, "weights", None) == "learned"
            and getattr(net, "components", 1) > 1):
        warnings.warn("fit_state_space: the transition's learned mixture weights get no gradient when it is its own "
                      "proposal (proposal=None: the component draw is not differentiated); they keep their initial "
                      "values. Learn them with a proposal, whose weights include the transition density",
                      UserWarning, stacklevel=2)

    first = next(iter(params.values()))[0]
    if isinstance(y, torch.Tensor) and y.is_floating_point():
        y_t = y.to(device=first.device, dtype=first.dtype)
    else:
        y_t = as_real_tensor(y, "y", dtype=first.dtype, device=first.device)
    if y_t.ndim < 2 or y_t.shape[-1] != operator.size or y_t.shape[-2] == 0:
        raise ShapeError("y", f"observations of shape (*batch, T, {operator.size}) with T >= 1",
                         f"shape {tuple(y_t.shape)}")
    length = int(y_t.shape[-2])
    wins = _check_windows(windows, length)
    mean, cov = prior
    total = len(wins) * rounds * len(learn) * iterations
    seeds = _device.spawn(seed, total, name="iterations")
    optimisers = {g: torch.optim.Adam(params[g], lr=lr) for g in learn}
    steps_taken = {g: 0 for g in learn}
    all_params = {id(p): p for obj in (proposal, model) if isinstance(obj, torch.nn.Module) for p in obj.parameters()}
    flags = {k: p.requires_grad for k, p in all_params.items()}    # every parameter not updated is frozen
    learned = {id(p) for g in learn for p in params[g]}
    history: list[float] = []
    labels: list[str] = []
    phases: list[tuple[int, str, int, int]] = []
    t0 = time.perf_counter()

    def report(converged: bool, message: str) -> FitReport:
        return FitReport(np.asarray(history, dtype=np.float64), converged, len(history),
                         time.perf_counter() - t0, wins, tuple(labels), message)

    try:
        for window, _ in ((w, r) for w in wins for r in range(rounds)):
            yw = y_t[..., :window, :]
            for group in learn:
                current = {id(p) for p in params[group]}
                for k, p in all_params.items():              # freeze every other group
                    p.requires_grad_(flags[k] and k in current)
                start = len(history)
                for _ in range(iterations):
                    i = len(history)
                    where = f"iteration {i + 1} of {total} (window {window}, group {group!r})"
                    try:
                        ev = log_evidence(filt, model, yw, operator=operator, mean=mean, cov=cov, seed=seeds[i])
                    except (DivergenceError, NonFiniteError) as err:
                        # NonFiniteError: a network met or made non-finite values (particles thrown to
                        # inf by the parameters of this iteration): a blow-up of the fit, not bad input
                        new = DivergenceError(f"fit_state_space: the filter diverged at {where}: {err}")
                        new.partial = report(False, f"stopped at {where}")
                        raise new from err
                    loss = -ev.log_evidence.mean() / window
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        err = DivergenceError(f"fit_state_space: non-finite loss {value} at {where}")
                        err.partial = report(False, f"stopped at {where}")
                        raise err
                    optimisers[group].zero_grad(set_to_none=True)
                    loss.backward()
                    grads = [p.grad for p in params[group] if p.grad is not None]
                    if not grads:
                        raise InputError("learn", f"groups whose parameters shape the evidence ({group!r} gets "
                                         "no gradient)", repr(learn))
                    if not all(bool(torch.isfinite(g).all()) for g in grads):
                        err = DivergenceError(f"fit_state_space: non-finite gradient at {where}")
                        err.partial = report(False, f"stopped at {where}")
                        raise err
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params[group], max_grad_norm)
                    if warmup:
                        done = steps_taken[group]
                        for pg in optimisers[group].param_groups:
                            pg["lr"] = lr * min(1.0, (done + 1) / (warmup + 1))
                    optimisers[group].step()
                    steps_taken[group] += 1
                    history.append(value)
                    labels.append(group)
                phases.append((window, group, start, len(history)))
    finally:
        for k, p in all_params.items():
            p.requires_grad_(flags[k])
        for k, p in all_params.items():
            if k in learned:
                p.grad = None

    hist = np.asarray(history, dtype=np.float64)
    last = {}
    for window, group, a, b in phases:                       # the last phase of each group
        last[group] = (window, a, b)
    verdicts = []
    converged = True
    for group, (window, a, b) in last.items():
        ok, why = _settled(hist[a:b], tol)
        converged &= ok
        verdicts.append(f"{group} (window {window}): {'settled' if ok else 'not settled'}, {why}")
    message = "; ".join(verdicts)
    if not converged:
        warnings.warn(f"fit_state_space: the loss has not settled ({message}); raise iterations or lower lr",
                      ConvergenceWarning, stacklevel=2)
    return report(converged, message)
