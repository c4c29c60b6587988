"""Double machine learning for the partially linear model.

The partially linear regression (PLR) model (Robinson 1988; Chernozhukov et al. 2018)::

    Y = theta * D + g(X) + eps,        E[eps | X, D] = 0
    D = m(X) + v,                      E[v | X] = 0

has one causal parameter ``theta`` (the effect of the treatment ``D`` on the outcome ``Y``) and an
unknown nuisance ``g`` of the controls ``X``. Double machine learning (DML) estimates ``theta`` from a
*Neyman-orthogonal* score, linear in ``theta``,

    psi(W; theta, eta) = psi_a(W; eta) * theta + psi_b(W; eta),

whose expectation is insensitive to first-order errors in the nuisance functions ``eta``; these are
learned by any regression method on *other* folds of the data (cross-fitting), so that their
over-fitting does not leak into ``theta``. Two scores are offered:

``"partialling out"``
    ``psi_a = -(D - m(X))^2``, ``psi_b = (D - m(X)) (Y - l(X))`` with ``l(X) = E[Y | X]``: regress the
    outcome residual on the treatment residual (Frisch-Waugh-Lovell with learned projections).
``"IV-type"``
    ``psi_a = -(D - m(X)) D``, ``psi_b = (D - m(X)) (Y - g(X))``; ``g`` is learned on
    ``Y - theta_0 D`` with ``theta_0`` the partialling-out estimate (as DoubleML does).

With ``K`` folds and the out-of-fold nuisance predictions, ``theta`` solves ``mean(psi) = 0`` over all
``n`` observations (the "DML2" estimator), ``theta = -mean(psi_b) / mean(psi_a)``, and its standard
error is the sandwich ``se^2 = mean(psi^2) / (J^2 n)`` with ``J = mean(psi_a)``.

Repeated sample splitting (``repetitions = R``) redraws the folds ``R`` times; the estimate is the
median of the ``R`` estimates. With ``aggregation="interval"`` (the default, DoubleML's) the interval
is the median of their intervals and the standard error is read back from its upper end. With
``aggregation="variance"`` the variance is the median of ``se_r^2 + (theta_r - theta)^2``
(Chernozhukov et al. 2018, section 3.4): it adds how far each split's estimate lies from the median,
so the interval also carries the variation due to the sample split. Intervals are
normal (``theta +/- z se``) or from the multiplier bootstrap: for ``B`` draws of weights ``xi``
(``"normal"``: N(0, 1); ``"bayes"``: Exp(1) - 1; ``"wild"``: Mammen's two-point-free variant
``N/sqrt(2) + (N'^2 - 1)/2``) the bootstrap t-statistic is ``t* = sum_i xi_i psi_i / (J n se)``, and
the interval is ``theta +/- q se`` with ``q`` the level-quantile of ``|t*|``. The bootstrap draws
``theta + se t*`` are the ``member`` dimension of the result, so a DML result is a daml posterior
(equal weights).

Everything here is checked against ``doubleml.DoubleMLPLR`` on the same sample splits and the same
learners (``tests/test_causal.py``, tolerance 1e-8) and against a hand-written reference.

References
----------
Chernozhukov, Chetverikov, Demirer, Duflo, Hansen, Newey & Robins (2018), Double/debiased machine
learning for treatment and structural parameters, The Econometrics Journal 21(1), C1-C68.
Bach, Chernozhukov, Kurz & Spindler (2022), DoubleML: an object-oriented implementation of double
machine learning in Python, JMLR 23(53).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
import xarray as xr

from .. import _device
from ..errors import (DivergenceError, DroppedRowsWarning, DtypeError, InputError, NonFiniteError, ShapeError,
                      check_fits, check_int, check_real)
from ..posterior import LOG_WEIGHT, LOG_WEIGHT_ATTRS, MEMBER, _method_attrs

__all__ = [
    "SCORES",
    "BOOTSTRAP_WEIGHTS",
    "DroppedRowsWarning",
    "sample_splits",
    "cross_fit",
    "solve_linear_score",
    "multiplier_bootstrap",
    "aggregate_repetitions",
    "AGGREGATIONS",
    "plr",
    "summary",
    "check_learner",
]

SCORES = ("partialling out", "IV-type")
BOOTSTRAP_WEIGHTS = ("normal", "bayes", "wild")
AGGREGATIONS = ("interval", "variance")
_RESIDUAL_FLOOR = 1e-7    # treatment residual RMS / treatment sd below which plr refuses (float32 rounding level)

Splits = list[list[tuple[np.ndarray, np.ndarray]]]


# ----------------------------------------------------------------------------------------------
# input checks


def _numeric(value: Any, name: str) -> np.ndarray:
    """``value`` as a float array, or a daml error naming ``name`` (None, text, complex numbers, ragged lists)."""
    if value is None:
        raise InputError(name, "an array of numbers", "None")
    if isinstance(value, (str, bytes)):
        raise DtypeError(name, "an array of numbers", f"the string {value[:40]!r}")
    if hasattr(value, "values") and not isinstance(value, np.ndarray) and not callable(value.values):
        value = value.values                        # pandas / xarray objects (not a dict's .values method)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy() if value.dtype != torch.bfloat16 else value.detach().cpu().double().numpy()
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ShapeError(name, "a rectangular array of numbers", f"{type(value).__name__} ({exc})") from exc
    if raw.dtype.kind == "c":
        raise DtypeError(name, "real numbers", f"dtype {raw.dtype}")
    if raw.dtype.kind in "fiub":
        return raw.astype(float)
    try:
        return raw.astype(float)
    except (ValueError, TypeError):
        flat = raw.reshape(-1)
        for i, v in enumerate(flat):
            try:
                float(v)
            except (ValueError, TypeError):
                where = tuple(int(k) for k in np.unravel_index(i, raw.shape)) if raw.ndim > 1 else i
                raise DtypeError(name, "numbers", f"{v!r} at index {where} (dtype {raw.dtype})") from None
        raise DtypeError(name, "numbers", f"dtype {raw.dtype}") from None


def _as_1d(value: Any, name: str) -> np.ndarray:
    arr = _numeric(value, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ShapeError(name, "a 1-d array (one value per observation)", f"shape {arr.shape}")
    return arr


def _as_2d(value: Any, name: str, n: int) -> np.ndarray:
    arr = _numeric(value, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ShapeError(name, "a 2-d array (observations, features)", f"shape {arr.shape}")
    if arr.shape[0] != n:
        raise ShapeError(name, f"{n} rows (one per observation of y)", f"{arr.shape[0]} rows")
    if arr.shape[1] < 1:
        raise ShapeError(name, "at least one column", "0 columns")
    return arr


def _check_memory(nbytes: float, name: str, what: str) -> None:
    """Refuse, before allocating, an array of ``nbytes`` (``what``) that cannot fit in free memory."""
    check_fits(name, nbytes, what=what)


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(name, "True or False", repr(value))
    return bool(value)


def drop_missing(arrays: Mapping[str, np.ndarray], nan: str = "drop") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Drop the rows where any array holds NaN; never silently.

    Returns the filtered arrays and the boolean mask of kept rows. With ``nan="drop"`` a
    :class:`DroppedRowsWarning` names the count; with ``nan="raise"`` a :class:`~daml.errors.NonFiniteError`
    is raised instead. Infinite values always raise.
    """
    if nan not in ("drop", "raise"):
        raise InputError("nan", "'drop' or 'raise'", repr(nan))
    keep = None
    for name, arr in arrays.items():
        if np.isinf(arr).any():
            raise NonFiniteError(name, "finite values or NaN for missing", f"{int(np.isinf(arr).sum())} infinite entries")
        ok = ~np.isnan(arr) if arr.ndim == 1 else ~np.isnan(arr).any(axis=1)
        keep = ok if keep is None else keep & ok
    assert keep is not None
    dropped = int((~keep).sum())
    if dropped:
        where = ", ".join(f"{k} {int(np.isnan(v).any(axis=-1).sum() if v.ndim > 1 else np.isnan(v).sum())}"
                          for k, v in arrays.items())
        if nan == "raise":
            raise NonFiniteError("data", "no missing values (or nan='drop')", f"{dropped} rows with NaN ({where})")
        warnings.warn(f"dropped {dropped} of {keep.size} rows with NaN ({where})", DroppedRowsWarning, stacklevel=3)
    return {k: v[keep] for k, v in arrays.items()}, keep


def check_learner(learner: Any, name: str) -> Any:
    """A learner must be an *instance* with ``fit(X, y)`` and ``predict(X)`` (scikit-learn's protocol)."""
    if isinstance(learner, type):
        raise InputError(name, "a regressor instance with fit(X, y) and predict(X)", f"the class {learner.__name__}",
                         hint=f"pass an instance, {name}={learner.__name__}(), not the class")
    if learner is None or not (callable(getattr(learner, "fit", None)) and callable(getattr(learner, "predict", None))):
        raise InputError(name, "a regressor with fit(X, y) and predict(X) (scikit-learn protocol), "
                         "e.g. sklearn.ensemble.RandomForestRegressor() or daml.causal.MLPRegressor()",
                         type(learner).__name__)
    return learner


def _construct(cls: type, options: dict[str, Any]) -> Any:
    """``cls(**options)``, with an unknown option reported as an :class:`InputError` naming it."""
    try:
        return cls(**options)
    except TypeError as exc:
        raise InputError("options", f"keyword arguments of {cls.__name__}", sorted(options), hint=str(exc)) from exc


def _fit_predict(learner: Any, name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                 **fit_kw: Any) -> np.ndarray:
    """Fit a fresh clone of ``learner`` and predict ``x_test``; a learner's own failure (bad settings,
    data it cannot take) comes back as an :class:`InputError` naming the learner argument."""
    try:
        est = _clone(learner)
        est.fit(x_train, y_train, **fit_kw)
        pred = np.asarray(est.predict(x_test), dtype=float).reshape(-1)
    except InputError:
        raise
    except DivergenceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any learner's internal error is reported against its argument
        raise InputError(name, "a learner that can be fitted to these data",
                         f"{type(learner).__name__} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                         hint="check the learner's settings") from exc
    if pred.shape[0] != x_test.shape[0]:
        raise ShapeError(name, f"{x_test.shape[0]} predictions from predict", f"{pred.shape[0]}")
    return pred


def _clone(learner: Any) -> Any:
    try:
        from sklearn.base import clone
    except ImportError:  # pragma: no cover - sklearn is in the causal extra
        return copy.deepcopy(learner)
    try:
        return clone(learner)
    except TypeError:  # not a scikit-learn estimator (no get_params): copy it as it is
        return copy.deepcopy(learner)


# ----------------------------------------------------------------------------------------------
# sample splitting


def sample_splits(n: int, folds: int = 5, repetitions: int = 1, *, seed: _device.Seed = None,
                  groups: Any = None) -> Splits:
    """Shuffled K-fold sample splits, ``repetitions`` times, seeded.

    Parameters
    ----------
    n : int
        Number of observations.
    folds : int
        ``K >= 2``. With ``groups`` at most the number of distinct groups.
    repetitions : int
        Independent redraws of the split.
    seed : int, SeedSequence, torch.Generator or None
        Each repetition uses its own child stream (``SeedSequence.spawn``).
    groups : array-like of shape (n,), optional
        Blocked folds: observations with the same group label (a day, a week, a site) always fall in
        the same fold. Flux data are autocorrelated, so random folds leak information between
        neighbouring half-hours; blocking by day is the usual remedy. Groups are shuffled and dealt to
        folds greedily by size, so folds are balanced in observations.

    Returns
    -------
    list (repetitions) of list (folds) of (train_indices, test_indices)
        DoubleML's format (``DoubleMLPLR.set_sample_splitting``). Test sets partition ``0..n-1``.
    """
    n = check_int(n, "n", minimum=2)
    folds = check_int(folds, "folds", minimum=2)
    repetitions = check_int(repetitions, "repetitions", minimum=1)
    if n < folds:
        raise InputError("folds", f"at most the number of observations ({n})", folds,
                         hint="use fewer folds or more data")
    _check_memory(32.0 * n, "n", f"index arrays of n={n} observations (16 bytes per observation and repetition)")
    _check_memory(16.0 * n * (repetitions + 1), "repetitions",
                  f"index arrays of repetitions={repetitions} x n={n} (16 bytes per observation and repetition)")
    if groups is not None:
        if isinstance(groups, torch.Tensor):       # numpy has no half-precision types of torch (bfloat16)
            groups = groups.detach().cpu()
            groups = (groups.double() if groups.is_floating_point() and groups.dtype != torch.float64 else groups).numpy()
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ShapeError("groups", f"one label per observation, shape ({n},)", f"shape {groups.shape}")
        if groups.dtype.kind == "f" and np.isnan(groups).any():
            raise NonFiniteError("groups", "a label for every observation", f"{int(np.isnan(groups).sum())} NaN labels")
        try:
            labels, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
        except TypeError as exc:
            raise DtypeError("groups", "labels of one comparable type (numbers, strings or dates)",
                             f"mixed labels ({exc})") from exc
        if labels.size < folds:
            raise InputError("groups", f"at least folds={folds} distinct groups", f"{labels.size} groups")
    out: Splits = []
    for child in _device.spawn(seed, repetitions, name="repetitions"):
        rng = np.random.default_rng(child)
        if groups is None:
            perm = rng.permutation(n)
            sizes = np.full(folds, n // folds)
            sizes[: n % folds] += 1
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            tests = [np.sort(perm[bounds[k]:bounds[k + 1]]) for k in range(folds)]
        else:
            order = rng.permutation(labels.size)
            load = np.zeros(folds)
            fold_of = np.empty(labels.size, dtype=int)
            for g in order:                       # greedy: next group to the lightest fold
                k = int(np.argmin(load))
                fold_of[g] = k
                load[k] += counts[g]
            obs_fold = fold_of[inverse]
            tests = [np.flatnonzero(obs_fold == k) for k in range(folds)]
        all_idx = np.arange(n)
        out.append([(np.setdiff1d(all_idx, t, assume_unique=True), t) for t in tests])
    return out


def _check_splits(splits: Any, n: int) -> Splits:
    if not isinstance(splits, (list, tuple)) or not splits:
        raise InputError("splits", "a non-empty list (repetitions) of lists (folds) of (train, test) index pairs",
                         type(splits).__name__)
    if isinstance(splits[0], tuple) and len(splits[0]) == 2 and np.ndim(splits[0][0]) == 1:
        splits = [list(splits)]              # one repetition given as a flat list of pairs
    out: Splits = []
    for r, rep in enumerate(splits):
        seen = np.zeros(n, dtype=int)
        pairs = []
        for k, pair in enumerate(rep):
            try:
                train, test = (np.asarray(p, dtype=np.int64) for p in pair)
            except (TypeError, ValueError) as exc:
                raise InputError(f"splits[{r}][{k}]", "a (train, test) pair of integer index arrays",
                                 repr(pair)[:80]) from exc
            if train.size == 0 or test.size == 0 or train.min() < 0 or test.min() < 0 or max(train.max(), test.max()) >= n:
                raise InputError(f"splits[{r}][{k}]", f"non-empty index arrays within 0..{n - 1}",
                                 f"train {train.size} / test {test.size} indices")
            if np.intersect1d(train, test).size:
                raise InputError(f"splits[{r}][{k}]", "disjoint train and test indices",
                                 f"{np.intersect1d(train, test).size} shared")
            seen[test] += 1
            pairs.append((train, test))
        if len(pairs) < 2 or not (seen == 1).all():
            raise InputError(f"splits[{r}]", "at least two folds whose test sets partition all observations",
                             f"{len(pairs)} folds, {int((seen != 1).sum())} observations not tested exactly once")
        out.append(pairs)
    return out


# ----------------------------------------------------------------------------------------------
# cross-fitting


def _splits_size(splits: Any) -> int | None:
    """The number of observations that ``splits`` partition (the sizes of the test sets of its first
    repetition), or ``None`` when that cannot be read (``_check_splits`` then says what is wrong)."""
    try:
        rep = splits[0]
        if isinstance(rep, tuple) and len(rep) == 2 and np.ndim(rep[0]) == 1:
            rep = splits                     # one repetition given as a flat list of pairs
        return int(sum(np.size(test) for _, test in rep))
    except Exception:  # noqa: BLE001 - any malformed splits: no size to compare with
        return None


def cross_fit(learner: Any, x: np.ndarray, target: np.ndarray, splits: Splits, *, name: str = "learner",
              batched: bool = True) -> np.ndarray:
    """Out-of-fold predictions of ``target`` from ``x``, one array per repetition.

    For each repetition and fold a fresh copy of ``learner`` (``sklearn.base.clone``) is fitted on the
    training indices and predicts the test indices. A learner with a ``fit_many`` method (such as
    :class:`daml.causal.MLPRegressor`) fits all repetitions and folds at once, batched, when
    ``batched=True``.

    Returns
    -------
    numpy.ndarray, shape (repetitions, n)
    """
    check_learner(learner, name)
    batched = _check_flag(batched, "batched")
    target = _as_1d(target, "target")
    n = target.shape[0]
    x = _numeric(x, "x")
    if x.ndim in (1, 2) and x.shape[0] != n and x.shape[0] == _splits_size(splits):
        # the splits index the rows of x: the target is the one of the wrong length
        raise ShapeError("target", f"{x.shape[0]} values, one per row of x (and of the splits)", f"{n} values")
    x = _as_2d(x, "x", n)
    if not (np.isfinite(x).all() and np.isfinite(target).all()):
        raise NonFiniteError("x" if not np.isfinite(x).all() else "target", "finite values (drop missing rows first)",
                             f"{int((~np.isfinite(x)).sum() + (~np.isfinite(target)).sum())} NaN or infinite entries")
    splits = _check_splits(splits, n)
    out = np.full((len(splits), n), np.nan)
    problems = [(r, train, test) for r, rep in enumerate(splits) for train, test in rep]
    if batched and callable(getattr(learner, "fit_many", None)):
        preds = learner.fit_many(x, target, [(train, test) for _, train, test in problems])
        for (r, _, test), p in zip(problems, preds):
            out[r, test] = p
    else:
        for r, train, test in problems:
            out[r, test] = _fit_predict(learner, name, x[train], target[train], x[test])
    if not np.isfinite(out).all():
        raise NonFiniteError(name, "finite predictions", f"{int((~np.isfinite(out)).sum())} NaN or infinite predictions",
                             hint="check the learner's settings and the scale of the data")
    return out


# ----------------------------------------------------------------------------------------------
# the linear score


class LinearScore(NamedTuple):
    """Solution of a linear score per repetition (torch tensors, leading dimension = repetition)."""

    theta: torch.Tensor      # (R,)
    se: torch.Tensor         # (R,)
    psi: torch.Tensor        # (R, n) score at theta
    J: torch.Tensor          # (R,) mean(psi_a)


def solve_linear_score(psi_a: Any, psi_b: Any) -> LinearScore:
    """Solve ``mean(psi_a theta + psi_b) = 0`` per row, with the sandwich standard error.

    ``psi_a``, ``psi_b`` have shape ``(..., n)``; returns ``theta = -mean(psi_b)/mean(psi_a)`` and
    ``se = sqrt(mean(psi^2) / (J^2 n))``, batched over the leading dimensions.
    """
    a = torch.from_numpy(_numeric(psi_a, "psi_a"))
    b = torch.from_numpy(_numeric(psi_b, "psi_b"))
    if a.ndim < 1:
        raise ShapeError("psi_a", "an array of shape (..., n) with one score value per observation", "a scalar")
    if a.shape != b.shape:
        raise ShapeError("psi_b", f"the shape of psi_a {tuple(a.shape)}", tuple(b.shape))
    if a.numel() == 0:
        raise ShapeError("psi_a", "at least one observation in every row (shape (..., n) with n >= 1)",
                         f"shape {tuple(a.shape)}")
    for key, t in (("psi_a", a), ("psi_b", b)):
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(key, "finite score values", f"{int((~torch.isfinite(t)).sum())} NaN or infinite entries")
    n = a.shape[-1]
    J = a.mean(-1)
    if bool((J.abs() <= 1e-12 * b.abs().mean(-1).clamp_min(1e-300)).any()) or bool((J == 0).any()):
        raise InputError("psi_a", "a score whose mean(psi_a) is not zero",
                         "mean(psi_a) = 0 (for the PLR scores: the treatment is constant or fully explained by x)")
    theta = -b.mean(-1) / J
    psi = a * theta[..., None] + b
    se = torch.sqrt((psi**2).mean(-1) / (J**2 * n))
    return LinearScore(theta, se, psi, J)


def _bootstrap_weights(method: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    if method == "normal":
        return rng.standard_normal(shape)
    if method == "bayes":
        return rng.exponential(1.0, shape) - 1.0
    if method == "wild":
        a = rng.standard_normal(shape)
        b = rng.standard_normal(shape)
        return a / math.sqrt(2.0) + (b**2 - 1.0) / 2.0
    raise InputError("bootstrap", f"one of {BOOTSTRAP_WEIGHTS}", repr(method))


def aggregate_repetitions(theta_r: Any, se_r: Any, aggregation: str = "interval") -> tuple[float, float]:
    """Estimate and standard error from ``R`` repeated sample splits (``theta_r``, ``se_r`` of shape
    ``(R,)``): the median estimate and, for ``"interval"``, the standard error read back from the
    median of the upper 95 % bounds (DoubleML); for ``"variance"``, the root of the median of
    ``se_r^2 + (theta_r - theta)^2`` (Chernozhukov et al. 2018, section 3.4)."""
    if aggregation not in AGGREGATIONS:
        raise InputError("aggregation", f"one of {AGGREGATIONS}", repr(aggregation))
    theta_r, se_r = _numeric(theta_r, "theta_r"), _numeric(se_r, "se_r")
    if theta_r.ndim != 1 or theta_r.size == 0:
        raise ShapeError("theta_r", "a non-empty 1-d array (one estimate per repetition)", f"shape {theta_r.shape}")
    if se_r.shape != theta_r.shape:
        raise ShapeError("se_r", f"the shape of theta_r {theta_r.shape}", f"shape {se_r.shape}")
    for key, arr in (("theta_r", theta_r), ("se_r", se_r)):
        if not np.isfinite(arr).all():
            raise NonFiniteError(key, "finite values", f"{int((~np.isfinite(arr)).sum())} NaN or infinite entries")
    if (se_r < 0).any():
        raise InputError("se_r", "non-negative standard errors", f"minimum {float(se_r.min()):.4g}")
    theta = float(np.median(theta_r))
    if aggregation == "interval":
        return theta, float((np.median(theta_r + 1.96 * se_r) - theta) / 1.96)
    return theta, float(np.sqrt(np.median(se_r**2 + (theta_r - theta) ** 2)))


def multiplier_bootstrap(score: LinearScore, weights: Any) -> torch.Tensor:
    """Bootstrap t-statistics ``t*_b = sum_i xi_bi psi_i / (J n se)``.

    ``weights`` has shape ``(R, B, n)`` (or ``(B, n)`` for one repetition); returns ``(R, B)``.
    """
    if not all(isinstance(getattr(score, k, None), torch.Tensor) for k in ("psi", "J", "se")):
        raise InputError("score", "the LinearScore returned by solve_linear_score", type(score).__name__)
    w = torch.from_numpy(_numeric(weights, "weights"))
    if w.ndim == 2:
        w = w[None]
    n = score.psi.shape[-1]
    if w.ndim != 3 or w.shape[0] != score.psi.shape[0] or w.shape[-1] != n or w.shape[1] < 1:
        raise ShapeError("weights", f"shape (R={score.psi.shape[0]}, B >= 1, n={n})", tuple(w.shape))
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError("weights", "finite multiplier weights", f"{int((~torch.isfinite(w)).sum())} NaN or infinite")
    if not bool((score.se > 0).all()):
        raise InputError("score", "a score with a positive standard error in every repetition",
                         f"se = {score.se.tolist()}",
                         hint="the score is zero at every observation: nothing is left to resample")
    scaled = score.psi / score.J[:, None]
    return torch.einsum("rbn,rn->rb", w, scaled) / (n * score.se[:, None])


# ----------------------------------------------------------------------------------------------
# the estimator


def _normal_quantile(p: float) -> float:
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def plr(
    y: Any,
    d: Any,
    x: Any,
    *,
    ml_l: Any,
    ml_m: Any,
    ml_g: Any = None,
    score: str = "partialling out",
    folds: int = 5,
    repetitions: int = 1,
    splits: Any = None,
    groups: Any = None,
    level: float = 0.95,
    bootstrap: str = "normal",
    n_boot: int = 500,
    aggregation: str = "interval",
    predictions: Mapping[str, Any] | None = None,
    nan: str = "drop",
    batched: bool = True,
    seed: _device.Seed = None,
    coords: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Double machine learning estimate of ``theta`` in ``Y = theta D + g(X) + eps``.

    Parameters
    ----------
    y, d : array-like, shape (n,)
        Outcome and treatment.
    x : array-like, shape (n, p)
        Controls (confounders). Must not contain the treatment.
    ml_l, ml_m : regressor
        Learners for ``l(X) = E[Y | X]`` and ``m(X) = E[D | X]``: any scikit-learn-compatible regressor
        (cloned for every fold) or :class:`daml.causal.MLPRegressor` (a torch network; its folds are
        trained together in one batched pass).
    ml_g : regressor, optional
        Learner for ``g(X)``, needed by ``score="IV-type"`` (default: a clone of ``ml_l``).
    score : {"partialling out", "IV-type"}
    folds : int
        Number of cross-fitting folds ``K``.
    repetitions : int
        Independent sample splits ``R``; estimates are aggregated by the median.
    splits : list, optional
        Explicit splits in DoubleML's format (list over repetitions of lists of (train, test)); overrides
        ``folds``, ``repetitions`` and ``groups``.
    groups : array-like, optional
        Group labels for blocked folds (see :func:`sample_splits`).
    level : float
        Confidence level of the intervals.
    bootstrap : {"normal", "bayes", "wild"}
        Multiplier weights of the bootstrap interval and of the ``member`` draws.
    n_boot : int
        Bootstrap draws ``B`` (the size of the ``member`` dimension).
    aggregation : {"interval", "variance"}
        How ``R > 1`` repetitions are combined (module docstring): the median of the intervals
        (DoubleML's ``n_rep``) or the median of ``se_r^2 + (theta_r - theta)^2`` (Chernozhukov et al.
        2018), which widens the interval by the spread over sample splits. The same for ``R = 1``.
    predictions : mapping, optional
        External out-of-fold nuisance predictions ``{"ml_l": (R, n) or (n,), "ml_m": ..., "ml_g": ...}``;
        the given ones are used instead of fitting that learner.
    nan : {"drop", "raise"}
        Rows with NaN in ``y``, ``d`` or ``x`` are dropped with a :class:`DroppedRowsWarning` naming the
        count (also in ``attrs["n_dropped"]``), or refused.
    batched : bool
        Let learners with ``fit_many`` fit all folds in one pass.
    seed : int, SeedSequence, torch.Generator or None
        Seeds the sample splits and the bootstrap (two independent child streams).
    coords : mapping, optional
        Coordinates for the ``obs`` dimension of the stored predictions (for example ``{"time": t}``).

    Returns
    -------
    xarray.Dataset
        A daml posterior: ``theta`` (estimate), ``se``, ``ci`` and ``ci_boot`` (``bound``: lower, upper),
        ``theta_rep`` and ``se_rep`` (``repetition``), ``theta_draw`` (``member``, ``repetition``: the
        multiplier-bootstrap draws ``theta_r + se_r t*``) with equal ``log_weight``, ``nuisance_rmse``
        (``nuisance``, ``repetition``; out-of-fold RMSE of each learner), the out-of-fold predictions
        ``l_hat``, ``m_hat`` (and ``g_hat``) and the data ``y``, ``d`` over ``(repetition, obs)``. ``attrs``
        hold the method, configuration, seed, ``level``, ``n_obs`` and ``n_dropped``. Print it with
        :func:`summary`.
    """
    if score not in SCORES:
        raise InputError("score", f"one of {SCORES}", repr(score))
    level = check_real(level, "level", expected="a confidence level strictly between 0 and 1")
    if not 0.0 < level < 1.0:
        raise InputError("level", "a confidence level strictly between 0 and 1", level)
    n_boot = check_int(n_boot, "n_boot", minimum=1)
    if bootstrap not in BOOTSTRAP_WEIGHTS:
        raise InputError("bootstrap", f"one of {BOOTSTRAP_WEIGHTS}", repr(bootstrap))
    if aggregation not in AGGREGATIONS:
        raise InputError("aggregation", f"one of {AGGREGATIONS}", repr(aggregation))
    batched = _check_flag(batched, "batched")
    if predictions is not None and not isinstance(predictions, Mapping):
        raise InputError("predictions", "a mapping such as {'ml_m': array}", type(predictions).__name__)
    if coords is not None and not isinstance(coords, Mapping):
        raise InputError("coords", "a mapping such as {'time': array}", type(coords).__name__)
    predictions = dict(predictions or {})
    unknown = set(predictions) - {"ml_l", "ml_m", "ml_g"}
    if unknown:
        raise InputError("predictions", "keys among 'ml_l', 'ml_m', 'ml_g'", sorted(unknown))
    if "ml_l" not in predictions:
        check_learner(ml_l, "ml_l")
    if "ml_m" not in predictions:
        check_learner(ml_m, "ml_m")
    if score == "IV-type" and "ml_g" not in predictions:
        ml_g = check_learner(ml_g if ml_g is not None else ml_l, "ml_g")

    y_arr = _as_1d(y, "y")
    n_all = y_arr.shape[0]
    d_arr = _as_1d(d, "d")
    if d_arr.shape[0] != n_all:
        raise ShapeError("d", f"{n_all} values (one per observation of y)", f"{d_arr.shape[0]} values")
    x_arr = _as_2d(x, "x", n_all)
    if groups is not None and splits is None:
        groups = np.asarray(groups)
        if groups.shape != (n_all,):
            raise ShapeError("groups", f"one label per observation, shape ({n_all},)", f"shape {groups.shape}")
    clean, keep = drop_missing({"y": y_arr, "d": d_arr, "x": x_arr}, nan)
    y_arr, d_arr, x_arr = clean["y"], clean["d"], clean["x"]
    n = y_arr.shape[0]
    n_dropped = n_all - n
    folds_n = check_int(folds, "folds", minimum=2)
    if splits is None and n < 2 * folds_n:
        raise InputError("y", f"at least 2 x folds = {2 * folds_n} observations (after dropping NaN rows)",
                         f"{n} observations")
    if np.ptp(d_arr) == 0.0:
        raise InputError("d", "a treatment that varies across observations", f"the constant {d_arr[0]:g}")
    if np.ptp(y_arr) == 0.0:
        raise InputError("y", "an outcome that varies across observations", f"the constant {y_arr[0]:g}",
                         hint="a constant outcome has no effect to estimate and a zero score: check the column")
    _check_memory(8.0 * 2 * n_boot * n * (repetitions if splits is None and isinstance(repetitions, int) else 1),
                  "n_boot", "bootstrap weights (8 bytes x 2 x n_boot x n x repetitions)")

    split_seed, boot_seed = _device.spawn(seed, 2)
    explicit_splits = splits is not None
    if splits is None:
        splits = sample_splits(n, folds_n, repetitions, seed=split_seed, groups=None if groups is None else
                               np.asarray(groups)[keep])
    else:
        splits = _check_splits(splits, n)
    R = len(splits)

    def _preds(key: str, learner: Any, target: np.ndarray) -> np.ndarray:
        if key in predictions:
            p = _numeric(predictions[key], f"predictions[{key!r}]")
            if p.ndim == 1:
                p = np.broadcast_to(p, (R, p.shape[0]))
            if p.shape == (R, n_all) and n_dropped:
                p = p[:, keep]
            if p.shape != (R, n):
                raise ShapeError(f"predictions[{key!r}]", f"shape ({R}, {n}) or ({n},)", p.shape)
            if not np.isfinite(p).all():
                raise NonFiniteError(f"predictions[{key!r}]", "finite predictions", "NaN or infinite values")
            return np.array(p)
        return cross_fit(learner, x_arr, target, splits, name=key, batched=batched)

    m_hat = _preds("ml_m", ml_m, d_arr)
    v_hat = d_arr[None, :] - m_hat
    # the effect is identified by the treatment's variation left after the controls; a residual at the
    # rounding level of the learners (or none) leaves nothing to estimate from: refuse, never divide by it
    resid = np.sqrt((v_hat**2).mean(axis=1))
    d_sd = float(d_arr.std())
    if (resid <= _RESIDUAL_FLOOR * d_sd).any():
        raise InputError("d", "a treatment with variation left after the controls (out-of-fold residual RMS above "
                         f"{_RESIDUAL_FLOOR:g} x its standard deviation)",
                         f"residual RMS {float(resid.min()):.3g} for a treatment sd {d_sd:.3g}",
                         hint="the controls x (nearly) determine the treatment d: its effect is not identified")
    l_hat = _preds("ml_l", ml_l, y_arr)
    g_hat = None
    if score == "partialling out":
        psi_a = -v_hat * v_hat
        psi_b = v_hat * (y_arr[None, :] - l_hat)
    else:
        if "ml_g" in predictions:
            g_hat = _preds("ml_g", None, y_arr)
        else:
            g_hat = np.empty_like(l_hat)
            for r in range(R):
                pa = -v_hat[r] * v_hat[r]
                pb = v_hat[r] * (y_arr - l_hat[r])
                theta0 = -pb.mean() / pa.mean()
                g_hat[r] = cross_fit(ml_g, x_arr, y_arr - theta0 * d_arr, [splits[r]], name="ml_g", batched=batched)[0]
        psi_a = -v_hat * d_arr[None, :]
        psi_b = v_hat * (y_arr[None, :] - g_hat)
    sol = solve_linear_score(psi_a, psi_b)
    if not bool((sol.se > 0).all()) or not bool(torch.isfinite(sol.theta).all() & torch.isfinite(sol.se).all()):
        raise InputError("y", "an outcome with variation left after the treatment and the controls",
                         f"a score that is zero at every observation (se_rep = {sol.se.tolist()})",
                         hint="the learners reproduce y exactly: no standard error or bootstrap can be computed")

    # multiplier bootstrap, one weight matrix per repetition
    rng = np.random.default_rng(boot_seed)
    w = np.stack([_bootstrap_weights(bootstrap, (n_boot, n), rng) for _ in range(R)])
    t_boot = multiplier_bootstrap(sol, w)                                     # (R, B)

    theta_r = sol.theta.numpy()
    se_r = sol.se.numpy()
    z = _normal_quantile(0.5 + level / 2.0)
    q_boot = torch.quantile(t_boot.abs(), level, dim=1).numpy()               # (R,)
    theta, se = aggregate_repetitions(theta_r, se_r, aggregation)
    if aggregation == "interval":                                             # medians of the intervals
        ci = np.median(np.stack([theta_r - z * se_r, theta_r + z * se_r]), axis=1)
        ci_boot = np.median(np.stack([theta_r - q_boot * se_r, theta_r + q_boot * se_r]), axis=1)
    else:
        ci = np.array([theta - z * se, theta + z * se])
        ci_boot = theta + np.array([-1.0, 1.0]) * float(np.median(q_boot)) * se
    draws = (theta_r[:, None] + se_r[:, None] * t_boot.numpy()).T             # (B, R)

    rmse = [np.sqrt(((y_arr[None] - l_hat) ** 2).mean(1)), np.sqrt(((d_arr[None] - m_hat) ** 2).mean(1))]
    nuis = ["ml_l", "ml_m"]
    if g_hat is not None:
        nuis.append("ml_g")
        rmse.append(np.sqrt(((y_arr[None] - sol.theta.numpy()[:, None] * d_arr[None] - g_hat) ** 2).mean(1)))

    obs_coords = {}
    for key, val in (coords or {}).items():
        val = np.asarray(val)
        if val.shape[0] == n_all and n_dropped:
            val = val[keep]
        if val.shape[0] != n:
            raise ShapeError(f"coords[{key!r}]", f"{n} values", val.shape[0])
        obs_coords[key] = ("obs", val)
    data_vars: dict[str, Any] = {
        "theta": ((), theta, {"long_name": "causal parameter (median over repetitions)"}),
        "se": ((), se, {"long_name": "standard error"}),
        "ci": (("bound",), ci, {"long_name": f"normal {level:.0%} confidence interval"}),
        "ci_boot": (("bound",), ci_boot, {"long_name": f"multiplier-bootstrap ({bootstrap}) {level:.0%} interval"}),
        "theta_rep": (("repetition",), theta_r),
        "se_rep": (("repetition",), se_r),
        "theta_draw": ((MEMBER, "repetition"), draws,
                       {"long_name": "multiplier-bootstrap draws theta_r + se_r t*"}),
        LOG_WEIGHT: ((MEMBER,), np.full(n_boot, -math.log(n_boot)), dict(LOG_WEIGHT_ATTRS)),
        "nuisance_rmse": (("nuisance", "repetition"), np.stack(rmse)),
        "y": (("obs",), y_arr),
        "d": (("obs",), d_arr),
        "l_hat": (("repetition", "obs"), l_hat),
        "m_hat": (("repetition", "obs"), m_hat),
    }
    if g_hat is not None:
        data_vars["g_hat"] = (("repetition", "obs"), g_hat)
    config = {
        "score": score, "folds": len(splits[0]), "repetitions": R, "aggregation": aggregation, "level": level,
        "bootstrap": bootstrap,
        "n_boot": n_boot, "ml_l": _describe(ml_l, "ml_l" in predictions), "ml_m": _describe(ml_m, "ml_m" in predictions),
        "ml_g": _describe(ml_g, "ml_g" in predictions) if score == "IV-type" else None,
        "blocked": groups is not None and not explicit_splits, "explicit_splits": explicit_splits,
    }
    attrs = _method_attrs("dml_plr", config, seed)
    attrs.update({"level": level, "n_obs": n, "n_dropped": n_dropped})
    ds = xr.Dataset(data_vars, coords={"bound": ["lower", "upper"], "nuisance": nuis,
                                       "repetition": np.arange(R), MEMBER: np.arange(n_boot), **obs_coords},
                    attrs=attrs)
    return ds


def _describe(learner: Any, external: bool) -> str:
    if external:
        return "external predictions"
    if learner is None:
        return "none"
    text = repr(learner)
    return " ".join(text.split())[:300]


def summary(ds: xr.Dataset, name: str = "theta") -> str:
    """A printable summary of a DML result (:func:`plr` or :func:`daml.causal.q10`)."""
    needed = ("theta", "se", "ci", "ci_boot", "nuisance_rmse")
    if not isinstance(ds, xr.Dataset) or any(k not in ds.variables for k in needed):
        raise InputError("ds", f"a result of daml.causal.plr or daml.causal.q10 (variables {', '.join(needed)})",
                         type(ds).__name__ if not isinstance(ds, xr.Dataset) else f"variables {list(ds.data_vars)[:12]}")
    if not isinstance(name, str):
        raise InputError("name", "a label (str)", repr(name))
    cfg = json.loads(ds.attrs.get("config", "{}"))
    level = float(ds.attrs.get("level", 0.95))
    lines = [f"Double machine learning, partially linear model ({cfg.get('score', '?')} score)",
             f"  observations {int(ds.attrs.get('n_obs', 0))}"
             + (f" ({int(ds.attrs['n_dropped'])} rows with NaN dropped)" if int(ds.attrs.get("n_dropped", 0)) else "")
             + f", {cfg.get('folds')} folds x {cfg.get('repetitions')} repetition(s)"
             + (f" ({cfg.get('aggregation', 'interval')} aggregation)" if (cfg.get("repetitions") or 1) > 1 else "")
             + (", blocked folds" if cfg.get("blocked") else ""),
             f"  ml_l: {cfg.get('ml_l')}", f"  ml_m: {cfg.get('ml_m')}"]
    if cfg.get("ml_g"):
        lines.append(f"  ml_g: {cfg.get('ml_g')}")
    th, se = float(ds["theta"]), float(ds["se"])
    lo, hi = (float(v) for v in ds["ci"].values)
    blo, bhi = (float(v) for v in ds["ci_boot"].values)
    lines.append(f"  {name:<6} {th: .6g}  se {se:.4g}  {level:.0%} CI [{lo:.6g}, {hi:.6g}]  "
                 f"bootstrap ({cfg.get('bootstrap')}) [{blo:.6g}, {bhi:.6g}]")
    if "q10" in ds:
        qlo, qhi = (float(v) for v in ds["q10_ci"].values)
        lines.append(f"  Q10    {float(ds['q10']): .6g}  {level:.0%} CI [{qlo:.6g}, {qhi:.6g}] (exp of the theta interval)")
    rm = ds["nuisance_rmse"].mean("repetition")
    lines.append("  out-of-fold nuisance RMSE: " + ", ".join(f"{k} {float(rm.sel(nuisance=k)):.4g}"
                                                          for k in ds["nuisance"].values))
    return "\n".join(lines)
