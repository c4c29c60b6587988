r"""Hybrid inference: a graph network that learns a correction to every step of message passing.

Garcia Satorras, Akata and Welling (2019) keep the physics model and learn only its mistakes. The
smoother of :mod:`daml.smoothing.messages` moves every state of the chain up the gradient of the log
density, the sum of the three messages it receives (from the past state, its observation and the
future state); the hybrid adds a learned term :math:`\epsilon_k` to each of the ``K`` steps,

.. math::

    x^{(k+1)}_t = x^{(k)}_t + \gamma \left(m_{1,t} + m_{2,t} + m_{3,t} + \epsilon^{(k)}_t\right),
    \qquad x^{(0)} = H^+ y,

where :math:`\epsilon^{(k)}` is decoded from the hidden states of a graph neural network (GNN) that
runs alongside, one GNN step per message-passing step. The graph is the chain itself: one node per
time for the state (hidden state :math:`h_t`, drawn standard normal at the start) and one node per time
for the observation (fixed features :math:`u_t`, a linear map of the observation's differences to its
neighbours ``[y_t - y_{t-1}, y_{t+1} - y_t]`` and of its mask). Three edge types, each with its own
two-layer MLP (leaky ReLU) on ``[h_source, h_target, message]``: *right* (``t-1 -> t``, fed ``m1``),
*left* (``t+1 -> t``, fed ``m3``) and *up* (``y_t -> x_t``, fed ``m2``). A node sums what it receives,
passes the sum through Linear, BatchNorm and leaky ReLU, and updates its hidden state with a GRU cell;
the decoder (Linear, BatchNorm, ReLU, Linear) maps the hidden state to :math:`\epsilon`. Its last
layer starts small (Xavier gain 0.1), so an untrained hybrid is close to plain message passing. The
messages enter the edge networks unscaled and detached (as in the reference code).

With ``mode="network"`` the same GNN, without messages, is the network-only baseline of the paper: a
residual denoiser whose estimate after step ``k`` is :math:`H^+ y + \text{decoder}(h^{(k)})`.

:func:`fit_hybrid` trains either on sequences with known states by Adam on the mean squared error
averaged over the ``K`` iterations with weights ``k/K`` (the paper's loss), keeping the state with the
best validation error.

Differences from the reference code (``vgsatorras/hybrid-inference``, MIT), on purpose: the hidden
states start from an explicit random stream (``seed``), never the global one; sequences are batched
(BatchNorm statistics over every node of every sequence of a batch); missing observations are masked
(the observation node of a time with nothing observed sends nothing; differences that touch a missing
entry are zero, and the mask is an input); the network-only decoder outputs states, not observations.
See docs/hybrid.md.

References
----------
* V. Garcia Satorras, Z. Akata and M. Welling (2019), Combining generative and discriminative models
  for hybrid inference. *Advances in Neural Information Processing Systems* 32.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .. import _device
from ..errors import (ConvergenceWarning, DivergenceError, DtypeError, InputError, NonFiniteError, ShapeError,
                      check_int, check_real)
from ..models.base import as_real_tensor, check_memory
from .messages import CHECK_EVERY, DIVERGENCE_FACTOR, _as_y, prepare_chain

__all__ = ["HybridSmoother", "HybridResult", "HybridFit", "fit_hybrid", "MODES"]

MODES = ("hybrid", "network")
"""The modes of :class:`HybridSmoother`: learned corrections on top of message passing, or the GNN alone."""

WEIGHTS = ("linear", "last")
METRICS = ("state", "observed")
VAL_CHUNK = 64          # validation sequences per forward pass (no gradient: memory only)


class HybridResult(NamedTuple):
    """What :meth:`HybridSmoother.forward` returns.

    Attributes
    ----------
    mean : tensor (*batch, T, n)
        The estimate after the last iteration.
    history : tensor (K, *batch, T, n) or None
        The estimate after every iteration (``history=True``), for the loss averaged over iterations.
    correction : tensor (*batch, T, n)
        The last learned correction :math:`\\epsilon^{(K)}` (hybrid mode: the term added to the messages;
        network mode: the residual added to :math:`H^+ y`).
    """

    mean: torch.Tensor
    history: torch.Tensor | None
    correction: torch.Tensor


def _edge_mlp(n_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU())


def _check_linear_operator(operator: Any, n: int) -> int:
    mat_h = getattr(operator, "matrix", None)
    if mat_h is None or getattr(operator, "noise_cov", None) is None or getattr(operator, "state_size", None) != n:
        raise InputError("operator", f"a linear Observation of states of size {n} (observe_all, observe_indices, ...)",
                         type(operator).__name__ if mat_h is not None or operator is None else "a nonlinear operator")
    return int(mat_h.shape[0])


class HybridSmoother(nn.Module):
    r"""Message passing on a state-space chain plus a learned graph-network correction (hybrid inference).

    Parameters
    ----------
    model : Model
        The assumed (possibly mis-specified) model: a linear model (``step_matrix``, ``order=None``) or one
        with ``tendency`` and ``dt`` (``order`` = Taylor order ``J``), as for
        :func:`~daml.smoothing.message_passing`. Network mode uses only its ``state_size``.
    operator : Observation
        A linear observation operator (``H``, ``R``).
    gamma : float
        Step size of message passing, ``> 0`` (network mode: ignored, may be ``None``).
    iterations : int
        ``K >= 1``, message-passing (and GNN) steps per call.
    order, noise_cov, linearisation
        As for :func:`~daml.smoothing.message_passing` (hybrid mode).
    prior : (mean, cov) or None
        The Gaussian prior of the first state (mean ``(n,)`` or ``(*batch, n)``); ``None`` (default): a
        flat prior, no prior message, as the reference code. :meth:`forward` can replace it.
    hidden : int
        Width of the GNN (hidden state, edge and decoder layers); 48 as in the reference.
    mode : {"hybrid", "network"}
        ``"hybrid"``: messages plus correction; ``"network"``: the GNN alone, a residual denoiser of
        :math:`H^+ y` (the paper's baseline; no messages, no physics).
    detach_messages : bool
        Detach the messages from the autograd graph (default ``True``, as the reference): gradients
        reach the parameters only through the corrections' direct effect on the estimate.
    seed : int, SeedSequence, torch.Generator or None
        Seeds two independent streams: one initialises the parameters (nothing else does), the other
        (kept on the module) draws the GNN's initial hidden states in every :meth:`forward` call that
        gets no ``seed`` of its own. Two smoothers built with the same seed give identical parameters
        and identical sequences of outputs.
    dtype, device : optional
        Of the parameters (resolved by ``daml._device``: float64 on the CPU by default). Observations
        are converted to them.

    Notes
    -----
    ``train()`` / ``eval()`` mode matters only for BatchNorm (two layers, the node update and the
    decoder): in training mode they normalise with the statistics of the current call, over every
    state node of every sequence and time (and update their running averages once per iteration);
    in evaluation mode they use the running averages, so each sequence's result is independent of the
    others in the batch. :func:`fit_hybrid` returns the smoother in evaluation mode.
    """

    def __init__(self, model: Any, operator: Any, *, gamma: float | None, iterations: int = 100,
                 order: int | None = None, noise_cov: Any = None, linearisation: str = "jacobian",
                 prior: tuple[Any, Any] | None = None, hidden: int = 48, mode: str = "hybrid",
                 detach_messages: bool = True, seed: _device.Seed = None, dtype: Any = None, device: Any = None):
        super().__init__()
        if not isinstance(mode, str) or mode not in MODES:
            raise InputError("mode", f"one of {list(MODES)}", repr(mode))
        n = getattr(model, "state_size", None)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError("model", "a daml model with state_size", type(model).__name__)
        m = _check_linear_operator(operator, n)
        if mode == "hybrid" or gamma is not None:
            gamma = check_real(gamma, "gamma", positive=True, expected="a positive step size")
        k_iter = check_int(iterations, "iterations", 1, "an int >= 1 (K)")
        hidden = check_int(hidden, "hidden", 1, "an int >= 1 (the width of the graph network)")
        if not isinstance(detach_messages, bool):
            raise InputError("detach_messages", "True or False", repr(detach_messages))
        dev = _device.resolve_device(device)
        dt = _device.resolve_dtype(dtype, dev)
        if dt not in (torch.float32, torch.float64):
            raise DtypeError("dtype", "float32 or float64 (or None)", repr(dtype))
        # the parameters: about 16 hidden^2 entries (three edge MLPs, the node layer, the GRU, the decoder)
        check_memory(torch.finfo(dt).bits // 8 * (16 * hidden * hidden + 8 * hidden * (n + m + 4)), "hidden",
                     f"hidden={hidden} (the network's parameters)", dev)
        # plain attributes, not submodules: a model that is a torch module is not trained or moved here
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "operator", operator)
        self.mode = mode
        self.gamma, self.iterations, self.hidden = gamma, k_iter, hidden
        self.order, self.noise_cov, self.linearisation = order, noise_cov, linearisation
        self.detach_messages = detach_messages
        self.state_size, self.obs_size = n, m
        self.prior = prior
        if mode == "hybrid":      # every check of message passing, now rather than at the first call
            self._chain(torch.zeros((*self._prior_batch(prior), 2, m), dtype=dt, device=dev), prior)

        streams = _device.seed_sequence(seed).spawn(2)
        n_msg = n if mode == "hybrid" else 0
        with _device.scoped_global_stream(streams[0]):      # parameters from the seed, built on the CPU
            self.encode_y = nn.Linear(3 * m, hidden)
            self.edge_right = _edge_mlp(2 * hidden + n_msg, hidden)
            self.edge_left = _edge_mlp(2 * hidden + n_msg, hidden)
            self.edge_up = _edge_mlp(2 * hidden + n_msg, hidden)
            self.node = nn.Sequential(nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU())
            self.gru = nn.GRUCell(hidden, hidden)
            self.decoder = nn.Sequential(nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                         nn.Linear(hidden, n))
            last = self.decoder[-1]
            nn.init.xavier_uniform_(last.weight, gain=0.1)
            nn.init.uniform_(last.bias, -0.02, 0.02)
        self.to(dtype=dt, device=dev)
        self.register_buffer("_pinv_h", torch.linalg.pinv(operator.matrix.to(dtype=dt, device=dev)))
        self._stream = _device.generator(streams[1], dev)

    # -- helpers ---------------------------------------------------------------------------------------

    def _prior_batch(self, prior: Any) -> tuple:
        if prior is None or not isinstance(prior, (tuple, list)) or len(prior) != 2:
            return ()
        mean = as_real_tensor(prior[0], "prior")
        return tuple(mean.shape[:-1]) if mean.ndim >= 1 else ()

    def _chain(self, y: torch.Tensor, prior: Any, init: Any = None):
        return prepare_chain(self.model, y, operator=self.operator, prior=prior, order=self.order,
                             noise_cov=self.noise_cov, linearisation=self.linearisation, init=init)

    @property
    def _param_dtype(self) -> torch.dtype:
        return self._pinv_h.dtype

    @property
    def _param_device(self) -> torch.device:
        return self._pinv_h.device

    def _initial_hidden(self, shape: tuple, generator: torch.Generator) -> torch.Tensor:
        """The GNN's initial hidden states, standard normal from ``generator``."""
        return torch.randn(shape, generator=generator, dtype=self._param_dtype, device=self._param_device)

    def _observation_features(self, y0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[y_t - y_{t-1}, y_{t+1} - y_t, mask_t]`` (differences zero at the ends and where either entry
        is missing), ``(B, T, 3m)``."""
        d = mask.to(y0.dtype)
        diff = (y0[:, 1:] - y0[:, :-1]) * (d[:, 1:] * d[:, :-1])       # (B, T-1, m)
        zero = torch.zeros_like(y0[:, :1])
        left = torch.cat([zero, diff], dim=1)
        right = torch.cat([diff, zero], dim=1)
        return torch.cat([left, right, d], dim=-1)

    def _gnn_step(self, h: torch.Tensor, u: torch.Tensor, up_on: torch.Tensor,
                  msgs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """One GNN step on ``B`` chains: ``h`` ``(B, T, H)`` -> the new hidden states."""
        b, n_t, width = h.shape
        m1, m2, m3 = msgs if msgs is not None else (None, None, None)

        def cat(*parts: torch.Tensor | None) -> torch.Tensor:
            return torch.cat([p for p in parts if p is not None], dim=-1)

        agg = self.edge_up(cat(u, h, m2)) * up_on                     # y_t -> x_t
        if n_t > 1:
            zero = h.new_zeros((b, 1, width))
            right = self.edge_right(cat(h[:, :-1], h[:, 1:], None if m1 is None else m1[:, 1:]))   # t-1 -> t
            left = self.edge_left(cat(h[:, 1:], h[:, :-1], None if m3 is None else m3[:, :-1]))    # t+1 -> t
            agg = agg + torch.cat([zero, right], dim=1) + torch.cat([left, zero], dim=1)
        agg = self.node(agg.reshape(b * n_t, width))
        return self.gru(agg, h.reshape(b * n_t, width)).reshape(b, n_t, width)

    def _decode(self, h: torch.Tensor) -> torch.Tensor:
        b, n_t, width = h.shape
        return self.decoder(h.reshape(b * n_t, width)).reshape(b, n_t, self.state_size)

    # -- the smoother ----------------------------------------------------------------------------------

    def forward(self, y: Any, *, prior: tuple[Any, Any] | None = None, history: bool = False,
                seed: _device.Seed = None, init: Any = None) -> HybridResult:
        """Smooth observation sequences.

        Parameters
        ----------
        y : array (*batch, T, m)
            Observations, NaN where missing. Sequences of unequal length: pad the shorter ones with NaN
            at the end (a list of sequences of unequal lengths is refused).
        prior : (mean, cov), optional
            Replaces the smoother's prior for this call (hybrid mode).
        history : bool
            Keep the estimate after every iteration.
        seed : int, SeedSequence, torch.Generator or None
            The stream of the initial hidden states for this call; ``None``: the smoother's own stream
            (seeded at construction, advanced by every call).
        init : array (*batch, T, n), optional
            The starting estimate ``x^(0)`` in place of :math:`H^+ y` (for example another smoother's
            estimate, which the hybrid then refines); in network mode, the estimate the network corrects.

        Returns
        -------
        HybridResult

        Raises
        ------
        InputError, ShapeError, NonFiniteError, DtypeError
            Naming the argument.
        DivergenceError
            Hybrid mode: when the largest entry of the summed messages grows by the factor
            :data:`~daml.smoothing.messages.DIVERGENCE_FACTOR` (``1e8``) over its size at the start (or,
            if larger, the size of the observations' message :math:`H^\top R^{-1} y` at ``x = 0``) or turns
            non-finite (checked at the first iteration, every ``CHECK_EVERY`` (10) and at the last), as in
            :func:`~daml.smoothing.message_passing`; either mode: when the estimate is not finite at the end.
        """
        if not isinstance(history, bool):
            raise InputError("history", "True or False", repr(history))
        y_t = _as_y(y, self.obs_size).to(dtype=self._param_dtype, device=self._param_device)
        if seed is None and self._stream.device.type != self._param_device.type:
            # the module was moved (.to(device)): continue the stream there, seeded from where it stands
            self._stream = _device.generator(_device.seed_sequence(self._stream), self._param_device)
        gen = self._stream if seed is None else _device.generator(seed, self._param_device)
        k_iter = self.iterations
        batch, n_t, n = tuple(y_t.shape[:-2]), int(y_t.shape[-2]), self.state_size
        bsz = int(np.prod(batch)) if batch else 1
        if self.training and bsz * n_t < 2:
            raise ShapeError("y", "at least 2 states (times x sequences) in training mode (BatchNorm statistics)",
                             f"shape {tuple(y_t.shape)}")
        if history:
            check_memory(8 * k_iter * bsz * n_t * n, "iterations", f"{k_iter} iterations kept (history=True)")
        # the activations: about 32 hidden-wide vectors per state node and iteration (measured: 1.1 GB for
        # one 1000-step sequence, K = 100, hidden = 48, float64), all K kept for the backward pass when
        # autograd records
        per_iter = torch.finfo(self._param_dtype).bits // 8 * 32 * bsz * n_t * self.hidden
        check_memory(per_iter, "y", f"shape {tuple(y_t.shape)} with hidden={self.hidden}", self._param_device)
        if torch.is_grad_enabled():
            check_memory(per_iter * k_iter, "iterations", f"{k_iter} iterations of activations kept for the "
                         f"backward pass (y of shape {tuple(y_t.shape)}, hidden={self.hidden}; or call under "
                         "torch.no_grad())", self._param_device)
        if init is not None:
            init = as_real_tensor(init, "init").to(dtype=self._param_dtype, device=self._param_device)
            if tuple(init.shape) != (*batch, n_t, n):
                raise ShapeError("init", f"states of shape {(*batch, n_t, n)} (y's batch and times, the state size)",
                                 f"shape {tuple(init.shape)}")
            if not bool(torch.isfinite(init).all()):
                raise NonFiniteError("init", "finite states", "NaN or infinite entries")
        if self.mode == "hybrid":
            chain = self._chain(y_t, self.prior if prior is None else prior, init)
            mask, y0, x = chain.mask, chain.y0, chain.x0
        else:
            if prior is not None:
                raise InputError("prior", "None in network mode (no physics, no prior)", "a prior")
            chain = None
            mask = torch.isfinite(y_t)
            y0 = torch.where(mask, y_t, torch.zeros((), dtype=y_t.dtype, device=y_t.device))
            x = (self._pinv_h @ y0.unsqueeze(-1)).squeeze(-1) if init is None else init

        flat = (bsz, n_t)
        mask_f, y0_f = mask.reshape(*flat, -1), y0.reshape(*flat, -1)
        u = self.encode_y(self._observation_features(y0_f, mask_f))
        up_on = mask_f.any(dim=-1, keepdim=True).to(u.dtype)          # no observation node where nothing is seen
        h = self._initial_hidden((*flat, self.hidden), gen)
        base = x
        kept = []
        eps = x.new_zeros(x.shape)
        g0 = None
        for it in range(k_iter):
            if chain is not None:
                try:
                    m1, m2, m3 = chain.messages(x)
                except NonFiniteError as exc:     # the estimate overflowed: the Jacobian at it is not finite
                    raise self._diverged(it, math.inf, g0) from exc
                if it == 0 or (it + 1) % CHECK_EVERY == 0 or it + 1 == k_iter:
                    gmax = float((m1 + m2 + m3).detach().abs().max())
                    if g0 is None:      # the scale: the first messages, or the observations' message at x = 0
                        obs = chain.h_m.transpose(-1, -2) @ (chain.r_inv @ chain.y0.unsqueeze(-1))
                        g0 = max(gmax, float(obs.abs().max()))
                    if not math.isfinite(gmax) or (g0 > 0 and gmax > DIVERGENCE_FACTOR * g0):
                        raise self._diverged(it, gmax, g0)
                if self.detach_messages:
                    m1, m2, m3 = m1.detach(), m2.detach(), m3.detach()
                msgs = tuple(m.reshape(*flat, n) for m in (m1, m2, m3))
                h = self._gnn_step(h, u, up_on, msgs)
                eps = self._decode(h).reshape(x.shape)
                x = x + self.gamma * (m1 + m2 + m3 + eps)
            else:
                h = self._gnn_step(h, u, up_on, None)
                eps = self._decode(h).reshape(x.shape)
                x = base + eps
            if history:
                kept.append(x)
        if not bool(torch.isfinite(x).all()):
            what = f"gamma={self.gamma!r} too large or corrections that blew up" if self.mode == "hybrid" \
                else "a network whose output blew up"
            raise DivergenceError(f"HybridSmoother: the estimate is not finite after {k_iter} iterations ({what})")
        return HybridResult(x, torch.stack(kept) if history else None, eps)

    def _diverged(self, it: int, gmax: float, g0: float | None) -> DivergenceError:
        return DivergenceError(
            f"HybridSmoother: the iteration diverged by iteration {it + 1} (largest entry of the summed messages "
            f"{gmax:.3g}, from {g0 if g0 is not None else math.nan:.3g} at the start): gamma={self.gamma!r} too "
            "large for the model, or corrections that drive the estimate away")

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, state_size={self.state_size}, obs_size={self.obs_size}, hidden={self.hidden}, "
                f"iterations={self.iterations}, gamma={self.gamma}")


# -- training ----------------------------------------------------------------------------------------------


class HybridFit(NamedTuple):
    """What :func:`fit_hybrid` returns.

    Attributes
    ----------
    smoother : HybridSmoother
        The smoother trained in place, with the parameters (and BatchNorm statistics) of the best epoch by
        validation error restored, in evaluation mode.
    train_loss : ndarray (epochs,)
        The mean training loss of each epoch (the loss of each batch before its update, averaged).
    val_mse : ndarray (epochs + 1,)
        The validation mean squared error before training (index 0) and after each epoch; empty without a
        validation set.
    best_epoch : int
        The epoch whose state was kept (0: the initial state); without a validation set, the last.
    seconds_per_epoch : ndarray (epochs,)
        Wall time of each epoch's training (validation excluded).
    converged : bool
        ``False`` when the monitored error was still improving at the end (see :func:`fit_hybrid`).
    message : str
        A sentence on the convergence check.
    """

    smoother: HybridSmoother
    train_loss: np.ndarray
    val_mse: np.ndarray
    best_epoch: int
    seconds_per_epoch: np.ndarray
    converged: bool
    message: str


def _iteration_weights(k_iter: int, weight: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if weight == "last":
        w = torch.zeros(k_iter, dtype=dtype, device=device)
        w[-1] = 1.0
        return w
    return torch.arange(1, k_iter + 1, dtype=dtype, device=device) * (2.0 / (k_iter * k_iter))


def _scored_errors(smoother: HybridSmoother, est: torch.Tensor, x: torch.Tensor,
                   metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The errors of ``est`` (``(..., T, n)``) against the true states ``x`` in the chosen ``metric``, zero
    where nothing is scored, and the mask of the scored entries. NaN in ``x`` is an unknown state: not
    scored, and with ``metric="observed"`` neither is a row of ``H x`` that uses it."""
    known = torch.isfinite(x)
    err = est - torch.where(known, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if metric == "observed":
        h = smoother.operator.matrix.to(dtype=err.dtype, device=err.device)
        err = (h @ err.unsqueeze(-1)).squeeze(-1)
        uses = (h != 0).to(err.dtype)
        known = (uses @ (~known).to(err.dtype).unsqueeze(-1)).squeeze(-1) == 0
    return err * known, known


def _hybrid_loss(smoother: HybridSmoother, y: torch.Tensor, x: torch.Tensor, *, weight: str, metric: str,
                 seed: _device.Seed, init: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of one batch: ``sum_k w_k MSE(x^(k), x)`` with ``w_k = 2k/K^2`` (``"linear"``,
    the paper's) or only the last iteration (``"last"``); the MSE over the scored entries of the state
    (``"state"``) or of ``H x`` (``"observed"``); a batch with nothing scored gives zero."""
    res = smoother(y, history=weight == "linear", seed=seed, init=init)
    est = res.history if weight == "linear" else res.mean.unsqueeze(0)
    err, known = _scored_errors(smoother, est, x, metric)
    count = max(int(known.sum()), 1)
    per_iter = (err * err).flatten(1).sum(dim=1) / count
    w = _iteration_weights(smoother.iterations, weight, per_iter.dtype, per_iter.device)
    return (w * per_iter).sum()


def _mse(smoother: HybridSmoother, y: torch.Tensor, x: torch.Tensor, metric: str, seed: _device.Seed,
         init: torch.Tensor | None = None) -> float:
    """The mean squared error of the smoother's estimates of ``x`` over the scored entries (no gradient;
    chunks of sequences). The same SeedSequence gives the same hidden-state draws at every call."""
    total, count = 0.0, 0
    if isinstance(seed, np.random.SeedSequence):     # a fresh copy: spawning advances a sequence
        seed = np.random.SeedSequence(seed.entropy, spawn_key=seed.spawn_key, pool_size=seed.pool_size)
    seeds = _device.spawn(seed, math.ceil(y.shape[0] / VAL_CHUNK))
    with torch.no_grad():
        for i, s in zip(range(0, y.shape[0], VAL_CHUNK), seeds):
            est = smoother(y[i:i + VAL_CHUNK], seed=s, init=None if init is None else init[i:i + VAL_CHUNK]).mean
            err, known = _scored_errors(smoother, est, x[i:i + VAL_CHUNK], metric)
            total += float((err * err).sum())
            count += int(known.sum())
    return total / count


def _still_improving(series: np.ndarray, tol: float) -> tuple[bool, str]:
    """The convergence rule of :func:`fit_hybrid` on the monitored series (``converged``, message)."""
    size = series.size
    if size < 2:
        return False, "only one value of the monitored error: cannot judge convergence"
    k = max(1, math.ceil(0.2 * (size - 1)))
    before, last = float(np.min(series[:-k])), float(np.min(series[-k:]))
    gain = (before - last) / before if before > 0 else 0.0
    ok = gain <= tol
    return ok, (f"the best error of the last {k} epoch(s) ({last:.4g}) is {100 * gain:.3g} % below the best before "
                f"({before:.4g}); allowed {100 * tol:.3g} %")


def _as_states(x: Any, name: str, shape: tuple, dtype: torch.dtype, device: torch.device, *,
               what: str = "true states", unknown_nan: bool = True) -> torch.Tensor:
    """States ``shape`` in the run's dtype and device; NaN marks an unknown true state (``unknown_nan``),
    anything else non-finite is refused."""
    t = as_real_tensor(x, name).to(dtype=dtype, device=device)
    if tuple(t.shape) != shape:
        raise ShapeError(name, f"{what} of shape {shape} (the observations' sequences and times, the state size)",
                         f"shape {tuple(t.shape)}")
    bad = torch.isinf(t) if unknown_nan else ~torch.isfinite(t)
    if bool(bad.any()):
        raise NonFiniteError(name, f"finite {what}" + (" (NaN marks an unknown one, not scored)" if unknown_nan else ""),
                             "infinite entries" if unknown_nan else "NaN or infinite entries")
    return t


def _check_scored(smoother: HybridSmoother, x: torch.Tensor, name: str, metric: str) -> None:
    _, known = _scored_errors(smoother, torch.zeros((), dtype=x.dtype, device=x.device), x, metric)
    if not bool(known.any()):
        nothing = metric == "state" or not bool(torch.isfinite(x).any())
        raise NonFiniteError(name, f"some known true states to score with metric={metric!r}",
                             "NaN everywhere (every state unknown)" if nothing
                             else "no row of H x whose states are all known")


def _as_sequences(y: Any, name: str, smoother: HybridSmoother) -> torch.Tensor:
    try:
        t = _as_y(y, smoother.obs_size)
    except InputError as err:
        if err.argument == "y" and name != "y":
            raise type(err)(name, err.expected, err.got) from err
        raise
    if t.ndim != 3:
        raise ShapeError(name, f"sequences of observations (S, T, {smoother.obs_size})", f"shape {tuple(t.shape)}")
    return t.to(dtype=smoother._param_dtype, device=smoother._param_device)


def fit_hybrid(smoother: HybridSmoother, y: Any, x: Any, *, y_val: Any = None, x_val: Any = None, epochs: int = 10,
               lr: float = 1e-3, batch_size: int = 1, weight: str = "linear", metric: str = "state",
               seed: _device.Seed = None, clip: float | None = None, tol: float = 0.01,
               verbose: bool = False, init: Any = None, init_val: Any = None) -> HybridFit:
    r"""Train a :class:`HybridSmoother` on sequences with known states.

    Each epoch visits the training sequences once, in an order shuffled from ``seed``, in minibatches of
    ``batch_size``; each minibatch is one Adam step on the loss

    .. math::

        L = \frac{2}{K} \sum_{k=1}^{K} \frac{k}{K}\, \mathrm{MSE}(x^{(k)}, x)

    (``weight="linear"``, the reference's; ``"last"``: only :math:`\mathrm{MSE}(x^{(K)}, x)`), with the
    MSE over every state entry (``metric="state"``) or over the observed combinations ``H x``
    (``metric="observed"``: what the reference trains on and reports, the positions in its drag
    experiment). After each epoch the smoother is evaluated (evaluation mode, no gradient) on the
    validation sequences with the same ``metric`` and the last iteration only; the state with the lowest
    validation error, the untrained one included, is restored at the end.

    Parameters
    ----------
    smoother : HybridSmoother
        Trained in place (its prior mean must be one ``(n,)`` vector or ``None``).
    y : array (S, T, m)
        Training observations, NaN where missing (chunks of a long series, or independent sequences).
    x : array (S, T, n)
        The true states; NaN marks an unknown one (for example under NaN padding of a shorter sequence),
        which is not scored (nor, with ``metric="observed"``, is any entry of ``H x`` that uses it).
    y_val, x_val : arrays (S_val, T_val, m) and (S_val, T_val, n), optional
        The validation set (both or neither). Without it nothing is selected (the last state is kept)
        and convergence is judged on the training loss.
    epochs : int
        Passes over the training set, ``>= 1``.
    lr : float
        Adam's learning rate. The reference uses ``1e-3`` and halves it for its Lorenz-63 runs with a
        Taylor order ``J > 0``; this function does not change the value it is given.
    batch_size : int
        Sequences per Adam step, ``1 <= batch_size <= S`` (the reference: 1). The last minibatch of an
        epoch may be smaller.
    weight : {"linear", "last"}
        The weights over iterations of the loss.
    metric : {"state", "observed"}
        What the loss and the validation error measure.
    seed : int, SeedSequence, torch.Generator or None
        The order of the minibatches and the GNN's initial hidden states in training and in validation
        (validation uses the same draws after every epoch, so that the epochs are compared on equal terms).
    clip : float, optional
        Clip the gradient's global norm to this value before each step.
    tol : float
        The convergence rule: ``converged`` is ``False`` (and a :class:`~daml.errors.ConvergenceWarning`
        says so) when the best monitored error of the last ``max(1, ceil(20 %))`` of the epochs is more
        than ``tol`` (relative, default 1 %) below the best of the epochs before them (validation: the
        untrained state counts as epoch 0): the error was still falling, more epochs would help.
    verbose : bool
        Print one line per epoch.
    init, init_val : arrays (S, T, n) and (S_val, T_val, n), optional
        Starting estimates of the training and validation sequences (:meth:`HybridSmoother.forward`'s
        ``init``; both or neither when there is a validation set), for a hybrid that refines another
        smoother's estimate.

    Returns
    -------
    HybridFit

    Raises
    ------
    InputError, ShapeError, NonFiniteError
        Naming the argument.
    DivergenceError
        At the first minibatch whose loss or gradient is not finite (or whose smoother diverged), naming
        the epoch and the batch, or on the validation set; the best state so far is restored first (without
        a validation set: the state after the last good step), and ``partial`` holds the
        :class:`HybridFit` of the epochs before.

    Warns
    -----
    ConvergenceWarning
        When ``converged`` is ``False``.
    """
    if not isinstance(smoother, HybridSmoother):
        raise InputError("smoother", "a HybridSmoother", type(smoother).__name__)
    epochs = check_int(epochs, "epochs", 1, "an int >= 1")
    lr = check_real(lr, "lr", positive=True, expected="a positive learning rate")
    tol = check_real(tol, "tol", positive=True, expected="a positive relative tolerance")
    if not isinstance(weight, str) or weight not in WEIGHTS:
        raise InputError("weight", f"one of {list(WEIGHTS)}", repr(weight))
    if not isinstance(metric, str) or metric not in METRICS:
        raise InputError("metric", f"one of {list(METRICS)}", repr(metric))
    if clip is not None:
        clip = check_real(clip, "clip", positive=True, expected="None or a positive gradient norm")
    if not isinstance(verbose, bool):
        raise InputError("verbose", "True or False", repr(verbose))
    if smoother.mode == "hybrid" and smoother._prior_batch(smoother.prior) != ():
        raise InputError("smoother", "a smoother whose prior mean is one (n,) vector or None (one prior for every "
                         "training sequence)", f"a prior mean of batch shape {smoother._prior_batch(smoother.prior)}")
    dtype, device = smoother._param_dtype, smoother._param_device
    y_t = _as_sequences(y, "y", smoother)
    s_train, n_t = int(y_t.shape[0]), int(y_t.shape[1])
    x_t = _as_states(x, "x", (s_train, n_t, smoother.state_size), dtype, device)
    _check_scored(smoother, x_t, "x", metric)
    batch_size = check_int(batch_size, "batch_size", 1, f"an int in [1, {s_train}] (sequences per step)")
    if batch_size > s_train:
        raise InputError("batch_size", f"an int in [1, {s_train}] (sequences per step)", repr(batch_size))
    if (y_val is None) != (x_val is None):
        missing = "x_val" if x_val is None else "y_val"
        raise InputError(missing, "given together with " + ("y_val" if missing == "x_val" else "x_val"), "None")
    if y_val is not None:
        yv = _as_sequences(y_val, "y_val", smoother)
        xv = _as_states(x_val, "x_val", (*yv.shape[:2], smoother.state_size), dtype, device)
        _check_scored(smoother, xv, "x_val", metric)
    else:
        yv = xv = None
    init_t = init_v = None
    if init is not None:
        init_t = _as_states(init, "init", (s_train, n_t, smoother.state_size), dtype, device,
                            what="starting estimates", unknown_nan=False)
    if init_val is not None:
        if yv is None:
            raise InputError("init_val", "None without a validation set (y_val, x_val)", "an array")
        init_v = _as_states(init_val, "init_val", (*yv.shape[:2], smoother.state_size), dtype, device,
                            what="starting estimates", unknown_nan=False)
    if (init is None) != (init_val is None) and yv is not None:
        raise InputError("init_val" if init_val is None else "init",
                         "starting estimates for both the training and the validation sequences, or for neither",
                         "one of them")

    streams = _device.seed_sequence(seed).spawn(3)
    order_rng = np.random.default_rng(streams[0])
    train_gen = _device.generator(streams[1], device)
    val_seed = streams[2]
    optimiser = torch.optim.Adam(smoother.parameters(), lr=lr)
    params = list(smoother.parameters())

    def state_copy() -> dict:
        return {k: v.detach().clone() for k, v in smoother.state_dict().items()}

    train_loss: list[float] = []
    seconds: list[float] = []
    val_mse: list[float] = []
    best_state, best_epoch = None, 0

    def report(converged: bool, message: str) -> HybridFit:
        return HybridFit(smoother, np.asarray(train_loss), np.asarray(val_mse), best_epoch, np.asarray(seconds),
                         converged, message)

    def validate(epoch: int) -> float:
        smoother.eval()
        try:
            return _mse(smoother, yv, xv, metric, val_seed, init_v)
        except (DivergenceError, NonFiniteError) as exc:
            when = "before training" if epoch == 0 else f"after epoch {epoch} of {epochs}"
            if best_state is not None and epoch > 0:
                smoother.load_state_dict(best_state)
            err = DivergenceError(f"fit_hybrid: the smoother diverged on the validation set {when} ({exc})")
            err.partial = report(False, f"stopped at the validation {when}")
            raise err from exc

    if yv is not None:
        val_mse.append(validate(0))
        best_state = state_copy()

    def diverged(what: str, epoch: int, batch: int, n_batches: int, cause: Exception | None = None) -> DivergenceError:
        if best_state is not None:
            smoother.load_state_dict(best_state)
        else:               # the last good step: undo the failed forward's updates of the BatchNorm statistics
            with torch.no_grad():
                for buf, old in zip(smoother.buffers(), buffers_before):
                    buf.copy_(old)
        smoother.eval()
        err = DivergenceError(f"fit_hybrid: {what} at epoch {epoch} of {epochs}, batch {batch} of {n_batches}"
                              + (f" ({cause})" if cause is not None else "")
                              + "; lower lr, set clip, or check gamma")
        err.partial = report(False, f"stopped at epoch {epoch}, batch {batch}")
        return err

    n_batches = math.ceil(s_train / batch_size)
    for epoch in range(1, epochs + 1):
        smoother.train()
        t0 = time.perf_counter()
        perm = order_rng.permutation(s_train)
        total = 0.0
        for b in range(n_batches):
            idx = torch.as_tensor(perm[b * batch_size:(b + 1) * batch_size], device=device)
            buffers_before = [buf.detach().clone() for buf in smoother.buffers()]
            try:
                loss = _hybrid_loss(smoother, y_t[idx], x_t[idx], weight=weight, metric=metric, seed=train_gen,
                                    init=None if init_t is None else init_t[idx])
            except (DivergenceError, NonFiniteError) as exc:
                raise diverged("the smoother diverged", epoch, b + 1, n_batches, exc) from exc
            value = float(loss.detach())
            if not math.isfinite(value):
                raise diverged(f"non-finite loss {value}", epoch, b + 1, n_batches)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
                raise diverged("non-finite gradient", epoch, b + 1, n_batches)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimiser.step()
            total += value * len(idx)
        seconds.append(time.perf_counter() - t0)
        train_loss.append(total / s_train)
        line = f"fit_hybrid: epoch {epoch}/{epochs} train loss {train_loss[-1]:.5g} ({seconds[-1]:.3g} s)"
        if yv is not None:
            val_mse.append(validate(epoch))
            line += f", validation MSE {val_mse[-1]:.5g}"
            if val_mse[-1] < min(val_mse[:-1]):
                best_state, best_epoch = state_copy(), epoch
        if verbose:
            print(line)
    for p in params:
        p.grad = None
    if yv is not None:
        smoother.load_state_dict(best_state)
    else:
        best_epoch = epochs
    smoother.eval()
    converged, message = _still_improving(np.asarray(val_mse if yv is not None else train_loss), tol)
    if not converged:
        warnings.warn(f"fit_hybrid: the {'validation error' if yv is not None else 'training loss'} was still "
                      f"improving ({message}); train for more epochs", ConvergenceWarning, stacklevel=2)
    return report(converged, message)
