"""A torch network as a scikit-learn regressor, trained for many cross-fitting folds at once.

:class:`MLPRegressor` is a small fully connected network (default: two hidden layers of 16 tanh
units, the nuisance network of Cohrs et al. 2024) with the scikit-learn protocol (``fit``,
``predict``, ``get_params``), so it can be handed to DoubleML or EconML as it is. Inputs and the
target are standardised on the training rows; training is full-batch Adam on the mean squared error
with an exponentially decaying learning rate, optional dropout on the hidden units and an L2 penalty
(``weight_decay``) on the weights.

Its :meth:`MLPRegressor.fit_many` trains one network per (train, test) problem, all in one batched
pass: parameters are stacked along a leading problem dimension, the training sets are gathered into a
padded batch with a mask, and the loss is the sum of the problems' own losses, so every problem gets
exactly its own gradient and its own Adam moments. :func:`daml.causal.plr` uses it for the ``K x R``
cross-fitting fits of a nuisance. A problem trained alone (``fit``) and the same problem inside a batch
start from the same initial weights (drawn from ``random_state``, as a cloned scikit-learn estimator
would) and agree to rounding; with ``dropout > 0`` the dropout masks differ between the two paths.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin

from .. import _device
from ..errors import DivergenceError, InputError, NonFiniteError, ShapeError, check_int, check_real

__all__ = ["MLPRegressor", "glorot_stack", "stacked_forward"]

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
                "softplus": torch.nn.functional.softplus}


def glorot_stack(widths: Sequence[int], generator: torch.Generator, prefix: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """Weights (Glorot normal, float64 on the CPU) and zero biases of a stack of dense layers.

    ``widths = [inputs, hidden..., outputs]``; every tensor has the leading dimensions ``prefix`` (one
    independent draw per leading index). Returns ``[W1, b1, W2, b2, ...]`` with ``W: (*prefix, a, b)``
    and ``b: (*prefix, 1, b)``.
    """
    params = []
    for a, b in zip(widths[:-1], widths[1:]):
        w = torch.randn(*prefix, a, b, generator=generator, dtype=torch.float64) * math.sqrt(2.0 / (a + b))
        params += [w, torch.zeros(*prefix, 1, b, dtype=torch.float64)]
    return params


def stacked_forward(params: Sequence[torch.Tensor], x: torch.Tensor, activation: Any = torch.tanh,
                    hidden_hook: Any = None) -> torch.Tensor:
    """A batch of dense networks at once: ``x (P, n, inputs)`` through ``params`` from :func:`glorot_stack`.

    ``hidden_hook(h, i)``, if given, is applied to the activated output of hidden layer ``i`` (dropout).
    Returns the first output unit, shape ``(P, n)``.
    """
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = torch.baddbmm(params[2 * i + 1], h, params[2 * i])
        if i < n_layers - 1:
            h = activation(h)
            if hidden_hook is not None:
                h = hidden_hook(h, i)
    return h[..., 0]


class MLPRegressor(RegressorMixin, BaseEstimator):
    """Fully connected torch regressor with the scikit-learn protocol.

    Parameters
    ----------
    hidden : tuple of int
        Hidden layer widths.
    activation : {"tanh", "relu", "gelu", "softplus"}
    dropout : float
        Dropout probability on every hidden layer during training (0 = none).
    weight_decay : float
        L2 penalty ``weight_decay/2 * sum(W^2)`` on the weight matrices (standardised units, per
        training point).
    lr : float
        Initial Adam learning rate; it decays exponentially to ``lr * final_lr_fraction``.
    iterations : int
        Full-batch Adam steps.
    final_lr_fraction : float
    random_state : int or None
        Seed of the initial weights (Glorot normal) and of the dropout masks.
    dtype, device : optional
        Resolved by :mod:`daml._device` (float64 on the CPU by default).
    """

    def __init__(self, hidden: Sequence[int] = (16, 16), activation: str = "tanh", dropout: float = 0.0,
                 weight_decay: float = 0.0, lr: float = 0.01, iterations: int = 2000,
                 final_lr_fraction: float = 0.1, random_state: int | None = 0, dtype: Any = None,
                 device: Any = None):
        self.hidden = hidden
        self.activation = activation
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.iterations = iterations
        self.final_lr_fraction = final_lr_fraction
        self.random_state = random_state
        self.dtype = dtype
        self.device = device

    # -- helpers ---------------------------------------------------------------------------------
    def _check(self) -> None:
        if not isinstance(self.activation, str) or self.activation not in _ACTIVATIONS:
            raise InputError("activation", f"one of {sorted(_ACTIVATIONS)}", repr(self.activation))
        dropout = check_real(self.dropout, "dropout", expected="a probability in [0, 1)")
        if not 0.0 <= dropout < 1.0:
            raise InputError("dropout", "a probability in [0, 1)", self.dropout)
        if check_real(self.weight_decay, "weight_decay", expected="a non-negative penalty") < 0:
            raise InputError("weight_decay", "a non-negative penalty", self.weight_decay)
        check_real(self.lr, "lr", positive=True, expected="a positive learning rate")
        flr = check_real(self.final_lr_fraction, "final_lr_fraction", positive=True, expected="a fraction in (0, 1]")
        if flr > 1.0:
            raise InputError("final_lr_fraction", "a fraction in (0, 1]", self.final_lr_fraction)
        check_int(self.iterations, "iterations", minimum=1)
        try:
            _device.seed_sequence(self.random_state)
        except InputError as exc:
            raise InputError("random_state", "an int >= 0 or None", repr(self.random_state)) from exc
        hidden = self.hidden
        if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
            raise InputError("hidden", "a sequence of positive layer widths such as (16, 16)", repr(hidden))
        for h in hidden:
            check_int(h, "hidden", minimum=1, expected="positive integer layer widths such as (16, 16)")

    @staticmethod
    def _as_x(X: Any, name: str = "X") -> np.ndarray:
        from .dml import _numeric

        X = _numeric(X, name)
        X = X[:, None] if X.ndim == 1 else X
        if X.ndim != 2:
            raise ShapeError(name, "a 2-d array (rows, features)", f"shape {X.shape}")
        return X

    @staticmethod
    def _problems(problems: Any, n: int, name: str) -> list[np.ndarray]:
        if isinstance(problems, (str, bytes)) or not hasattr(problems, "__len__") or len(problems) == 0:
            raise InputError("problems", "a non-empty list of (train, test) index arrays", repr(problems)[:80])
        out = []
        for k, idx in enumerate(problems):
            try:
                a = np.asarray(idx)
            except (ValueError, TypeError) as exc:
                raise InputError(f"problems[{k}]", "integer index arrays", repr(idx)[:80]) from exc
            if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
                raise InputError(f"problems[{k}]", "1-d integer index arrays", f"shape {a.shape}, dtype {a.dtype}")
            if a.size and (a.min() < 0 or a.max() >= n):
                raise InputError(f"problems[{k}]", f"{name} indices within 0..{n - 1}", f"{a.min()}..{a.max()}")
            out.append(a.astype(np.int64))
        return out

    def _init(self, p: int, problems: int, dev: torch.device, dt: torch.dtype) -> list[torch.Tensor]:
        g = _device.generator(self.random_state, "cpu")
        one = glorot_stack([p, *[int(h) for h in self.hidden], 1], g)     # the same start for every problem
        return [t.to(dev, dt).expand(problems, *t.shape).clone() for t in one]

    def _forward(self, params: list[torch.Tensor], x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        hook = None if masks is None else (lambda h, i: h * masks[i])
        return stacked_forward(params, x, _ACTIVATIONS[self.activation], hook)

    # -- scikit-learn protocol ---------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> "MLPRegressor":
        X = self._as_x(X)
        y = self._as_y(y, X.shape[0])
        self._fit(X, y, [np.arange(X.shape[0])])
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: Any) -> np.ndarray:
        if not hasattr(self, "params_"):
            raise InputError("MLPRegressor", "a fitted regressor (call fit first)", "an unfitted one")
        X = self._as_x(X)
        if X.shape[1] != self.n_features_in_:
            raise ShapeError("X", f"{self.n_features_in_} features", X.shape[1])
        if not np.isfinite(X).all():
            raise NonFiniteError("X", "finite inputs", f"{int((~np.isfinite(X)).sum())} NaN or infinite entries")
        return self._predict(X, [np.arange(X.shape[0])])[0]

    def fit_many(self, X: Any, y: Any, problems: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Train one network per ``(train, test)`` pair in one batched pass; predict each test set.

        Returns a list of prediction arrays, one per problem (the network stays fitted to all
        problems: ``params_`` has a leading problem dimension).
        """
        X = self._as_x(X)
        y = self._as_y(y, X.shape[0])
        try:
            pairs = [(tr, te) for tr, te in problems]
        except (TypeError, ValueError) as exc:
            raise InputError("problems", "a non-empty list of (train, test) index-array pairs", repr(problems)[:80]) from exc
        trains = self._problems([tr for tr, _ in pairs], X.shape[0], "train")
        tests = self._problems([te for _, te in pairs], X.shape[0], "test")
        self._fit(X, y, trains)
        self.n_features_in_ = X.shape[1]
        return self._predict(X, tests)

    @staticmethod
    def _as_y(y: Any, n: int) -> np.ndarray:
        from .dml import _numeric

        y = _numeric(y, "y")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or y.shape[0] != n:
            raise ShapeError("y", f"{n} values (one per row of X)", f"shape {y.shape}")
        return y

    # -- the batched core --------------------------------------------------------------------------
    def _fit(self, X: np.ndarray, y: np.ndarray, trains: list[np.ndarray]) -> None:
        self._check()
        if X.shape[0] != y.shape[0]:
            raise ShapeError("y", f"{X.shape[0]} values (one per row of X)", y.shape[0])
        if not (np.isfinite(X).all() and np.isfinite(y).all()):
            raise NonFiniteError("X, y", "finite training data", "NaN or infinite values")
        dev = _device.resolve_device(self.device)
        dt = _device.resolve_dtype(self.dtype, dev)
        P = len(trains)
        sizes = np.array([t.size for t in trains])
        if sizes.min() < 2:
            raise InputError("X", "at least 2 training rows per problem", int(sizes.min()))
        n_max = int(sizes.max())
        idx = np.zeros((P, n_max), dtype=np.int64)
        mask = np.zeros((P, n_max))
        for k, t in enumerate(trains):
            idx[k, : t.size] = t
            mask[k, : t.size] = 1.0
        Xt = torch.as_tensor(X, dtype=dt, device=dev)
        yt = torch.as_tensor(y, dtype=dt, device=dev)
        it = torch.as_tensor(idx, device=dev)
        mk = torch.as_tensor(mask, dtype=dt, device=dev)
        cnt = mk.sum(1, keepdim=True)
        xb = Xt[it]                                                    # (P, n_max, p)
        yb = yt[it]                                                    # (P, n_max)
        x_mean = (xb * mk[..., None]).sum(1, keepdim=True) / cnt[..., None]
        x_sd = torch.sqrt(((xb - x_mean) ** 2 * mk[..., None]).sum(1, keepdim=True) / cnt[..., None]).clamp_min(1e-12)
        y_mean = (yb * mk).sum(1, keepdim=True) / cnt
        y_sd = torch.sqrt(((yb - y_mean) ** 2 * mk).sum(1, keepdim=True) / cnt).clamp_min(1e-12)
        xs = (xb - x_mean) / x_sd
        ys = (yb - y_mean) / y_sd
        params = [p.requires_grad_(True) for p in self._init(X.shape[1], P, dev, dt)]
        with torch.no_grad():
            start = ((self._forward(params, xs) - ys) ** 2 * mk).sum(1) / cnt[:, 0]
        opt = torch.optim.Adam(params, lr=float(self.lr))
        T = int(self.iterations)
        gamma = float(self.final_lr_fraction) ** (1.0 / T)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
        drop = float(self.dropout)
        gen = _device.generator(_device.spawn(self.random_state, 1)[0], dev) if drop > 0 else None
        wd = float(self.weight_decay)
        for _ in range(T):
            opt.zero_grad(set_to_none=True)
            masks = None
            if drop > 0:
                masks = [torch.bernoulli(torch.full((P, n_max, int(h)), 1.0 - drop, device=dev, dtype=dt), generator=gen)
                         / (1.0 - drop) for h in self.hidden]
            pred = self._forward(params, xs, masks)
            loss = (((pred - ys) ** 2 * mk).sum(1) / cnt[:, 0]).sum()
            if wd > 0:
                loss = loss + 0.5 * wd * sum((w**2).sum() for w in params[0::2])
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():                  # the trained networks on their own training rows, no dropout
            final = ((self._forward(params, xs) - ys) ** 2 * mk).sum(1) / cnt[:, 0]
        # diverged: non-finite, or worse than both the untrained start and the training mean (error 1) by half
        if not bool(torch.isfinite(final).all()) or bool((final > 1.5 * torch.clamp(start, min=1.0)).any()):
            worst = float(final.max()) if bool(torch.isfinite(final).all()) else float("nan")
            raise DivergenceError(f"MLPRegressor training diverged: the standardised training error is {worst:.3g} "
                                  f"(untrained {float(start.max()):.3g}, the mean gives 1); lower lr, or use float64")
        self.params_ = [p.detach() for p in params]
        self.scale_ = (x_mean, x_sd, y_mean, y_sd)

    def _predict(self, X: np.ndarray, tests: list[np.ndarray]) -> list[np.ndarray]:
        x_mean, x_sd, y_mean, y_sd = self.scale_
        dev, dt = x_mean.device, x_mean.dtype
        P = len(tests)
        if P != self.params_[0].shape[0]:
            raise ShapeError("tests", f"{self.params_[0].shape[0]} test sets", P)
        n_max = max(int(t.size) for t in tests)
        idx = np.zeros((P, n_max), dtype=np.int64)
        for k, t in enumerate(tests):
            idx[k, : t.size] = t
        Xt = torch.as_tensor(X, dtype=dt, device=dev)[torch.as_tensor(idx, device=dev)]
        with torch.no_grad():
            out = self._forward(self.params_, (Xt - x_mean) / x_sd) * y_sd + y_mean
        out_np = _device.to_numpy(out).astype(np.float64)
        return [out_np[k, : t.size] for k, t in enumerate(tests)]
