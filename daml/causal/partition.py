"""Carbon-flux partitioning as a heterogeneous causal effect (Cohrs et al. 2024, section on NEE).

Net ecosystem exchange is respiration minus photosynthesis, and photosynthesis is light times a
light-use efficiency that depends on the conditions::

    NEE = RECO(x, w) - LUE(x) * SW_IN,

so ``theta(x) = -LUE(x)`` is the *conditional* effect of the treatment ``SW_IN`` on ``NEE`` given the
effect modifiers ``x`` (temperature, VPD, season), and ``RECO`` is the nuisance. The model is partially
linear in ``SW_IN`` with a coefficient that varies with ``x``; double machine learning estimates it by
the R-learner (Nie & Wager 2021; EconML's ``NonParamDML``):

1. cross-fit ``l(x, w) = E[NEE | x, w]`` and ``m(x, w) = E[SW_IN | x, w]`` (extra controls ``w`` are
   confounders that do not modify LUE; a variable that drives the light but not the fluxes otherwise,
   such as the instantaneous potential radiation, is *not* a confounder and must stay out: as a
   control it removes most of the light's variation and with it most of the signal: GPP R^2 falls
   from 0.97 to 0.54 on the synthetic site, see docs/causal.md);
2. with the residuals ``u = NEE - l`` and ``v = SW_IN - m``, minimise ``sum (u - theta(x) v)^2`` over a
   flexible ``theta``; that is a regression of the pseudo-outcome ``u / v`` on ``x`` with sample
   weights ``v^2`` (night-time rows, where ``v`` is about 0, carry no weight);
3. ``GPP = LUE(x) SW_IN`` and ``RECO = l - theta(x) m`` (the "direct" respiration; ``NEE + GPP`` is
   returned as well).

Uncertainty: ``members`` bootstrap resamples give a posterior (equal weights) of LUE, GPP and RECO at
every time step. ``bootstrap="full"`` (default) reruns the whole pipeline on each resample (rows, or whole
groups when ``groups`` is given: a block bootstrap), cross-fitting the nuisances again with the copies
of a row (or group) kept in one fold, and predicts ``l`` and ``m`` at every row with the mean of the fold
models: ``2 * folds + 1`` fits per member. ``bootstrap="final"`` (fast: one fit per member) refits the
final stage only, on resampled residual rows: it carries the final stage's sampling error but not the
nuisances' estimation error, which dominates RECO, so its RECO intervals are far too narrow. Pointwise
coverage of both is measured in ``benchmarks/q10.py`` rather than assumed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import xarray as xr

from .. import _device
from ..errors import InputError, NonFiniteError, ShapeError, check_int, check_real
from ..posterior import LOG_WEIGHT, LOG_WEIGHT_ATTRS, MEMBER, _method_attrs
from .dml import _check_memory, _clone, _construct, _describe, _fit_predict, check_learner, cross_fit, drop_missing, sample_splits
from .q10 import _column, _require_columns, _time_coord

__all__ = ["partition", "DEFAULT_MODIFIERS", "default_boosting", "default_final"]

DEFAULT_MODIFIERS = ("TA", "VPD", "SW_POT_sm", "SW_POT_sm_diff")


def default_boosting(seed: _device.Seed = None, **options: Any) -> Any:
    """Histogram gradient boosting (scikit-learn), the default nuisance and final learner here."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    state = _device.random_state(seed)
    kw = {"max_iter": 300, "learning_rate": 0.1, "min_samples_leaf": 40, "early_stopping": False,
          "random_state": state, **options}
    return _construct(HistGradientBoostingRegressor, kw)


def default_final(seed: _device.Seed = None, **options: Any) -> Any:
    """Random forest (200 trees, min leaf 20), the default final stage of :func:`partition`."""
    from sklearn.ensemble import RandomForestRegressor

    state = _device.random_state(seed)
    return _construct(RandomForestRegressor, {"n_estimators": 200, "min_samples_leaf": 20, "random_state": state, **options})


def partition(
    data: Any,
    *,
    nee: str = "NEE_obs",
    sw_in: str = "SW_IN",
    x: Sequence[str] = DEFAULT_MODIFIERS,
    w: Sequence[str] = (),
    ml_l: Any = None,
    ml_m: Any = None,
    final: Any = None,
    folds: int = 5,
    groups: Any = None,
    members: int = 20,
    bootstrap: str = "full",
    level: float = 0.95,
    nan: str = "drop",
    seed: _device.Seed = None,
) -> xr.Dataset:
    """Partition NEE into GPP and RECO with a DML estimate of the light-use efficiency LUE(x).

    Parameters
    ----------
    data : xarray.Dataset, pandas.DataFrame or mapping of arrays
        Half-hourly (day and night) rows.
    nee, sw_in : str
        Names of net ecosystem exchange (positive = release) and incoming shortwave radiation (the
        treatment; pass a light-response transform of it to model saturation).
    x : sequence of str
        Effect modifiers of LUE (also controls of the nuisances).
    w : sequence of str
        Further controls of the nuisances only.
    ml_l, ml_m, final : regressor, optional
        Nuisance learners (default :func:`default_boosting`) and the final-stage regressor, which must
        accept ``sample_weight`` (default :func:`default_final`: a random forest, 200 trees, min leaf 20).
    folds, groups : optional
        Cross-fitting folds (``groups`` for blocked folds, e.g. the day of each row).
    members : int
        Bootstrap refits (the ``member`` dimension).
    bootstrap : {"full", "final"}
        What each member refits: the whole pipeline, nuisances included (default; ``2 * folds + 1``
        fits per member), or the final stage only (one fit per member; the nuisances' error is left
        out and the RECO intervals are too narrow).
    level : float
        Level of the pointwise intervals ``lue_ci``, ``gpp_ci``, ``reco_ci`` (member quantiles).
    nan : {"drop", "raise"}
        Rows with NaN are dropped (counted, with a warning) or refused.
    seed : int, SeedSequence, torch.Generator or None

    Returns
    -------
    xarray.Dataset
        A daml posterior over ``member`` with ``lue``, ``gpp``, ``reco`` (``member``, ``obs``); the
        point estimates ``lue_hat``, ``gpp_hat``, ``reco_hat``, ``reco_residual`` (= NEE + GPP) over
        ``obs``, their pointwise intervals (``bound``, ``obs``), the nuisance predictions and
        ``lue_mean`` (mean LUE over the rows).
    """
    members = check_int(members, "members", minimum=2)
    folds = check_int(folds, "folds", minimum=2)
    if bootstrap not in ("final", "full"):
        raise InputError("bootstrap", "'final' or 'full'", repr(bootstrap))
    if not 0.0 < check_real(level, "level", expected="a confidence level strictly between 0 and 1") < 1.0:
        raise InputError("level", "a confidence level strictly between 0 and 1", level)
    for arg, names in (("x", x), ("w", w)):
        if names is None or not (isinstance(names, str) or hasattr(names, "__iter__")):
            raise InputError(arg, "a sequence of column names", repr(names))
    x = (x,) if isinstance(x, str) else tuple(x)
    w = (w,) if isinstance(w, str) else tuple(w)
    _require_columns(data, {"nee": [nee], "sw_in": [sw_in], "x": list(x), "w": list(w)})
    if not x:
        raise InputError("x", "at least one effect modifier", "none")
    if sw_in in x or sw_in in w:
        raise InputError("x", f"modifiers and controls without the treatment {sw_in!r}", f"x={list(x)}, w={list(w)}")
    y_all = _column(data, nee, "nee")
    t_all = _column(data, sw_in, "sw_in")
    xm = np.stack([_column(data, c, "x") for c in x], axis=1)
    xw = np.stack([_column(data, c, "w") for c in w], axis=1) if w else np.empty((y_all.size, 0))
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (y_all.size,):
            raise ShapeError("groups", f"one label per row, shape ({y_all.size},)", f"shape {groups.shape}")
    clean, keep = drop_missing({"nee": y_all, "sw_in": t_all, "x": xm, **({"w": xw} if w else {})}, nan)
    y, t, xm = clean["nee"], clean["sw_in"], clean["x"]
    xw = clean.get("w", np.empty((y.size, 0)))
    n = y.size
    if n < 2 * folds:
        raise InputError("data", f"at least 2 x folds = {2 * folds} rows after dropping NaN", f"{n} rows")
    if np.ptp(t) == 0:
        raise InputError("sw_in", "a treatment that varies", f"the constant {t[0]:g}")
    if np.ptp(y) == 0:
        raise InputError("nee", "a flux that varies across rows", f"the constant {y[0]:g}",
                         hint="a constant NEE has nothing to partition: check the column")
    # the replicates hold theta, both nuisances, LUE, GPP and RECO (and their row draws) for every row
    _check_memory(8.0 * 7 * members * n, "members", f"members={members} bootstrap replicates of {n} rows")
    s_split, s_l, s_m, s_final, s_boot = _device.spawn(seed, 5)
    ml_l = check_learner(ml_l if ml_l is not None else default_boosting(s_l), "ml_l")
    ml_m = check_learner(ml_m if ml_m is not None else default_boosting(s_m), "ml_m")
    final = check_learner(final if final is not None else default_final(s_final), "final")
    controls = np.concatenate([xm, xw], axis=1)
    group_kept = None if groups is None else np.asarray(groups)[keep]
    splits = sample_splits(n, folds, 1, seed=s_split, groups=group_kept)
    l_hat = cross_fit(ml_l, controls, y, splits, name="ml_l")[0]
    m_hat = cross_fit(ml_m, controls, t, splits, name="ml_m")[0]
    pseudo, weight = _pseudo_outcome(y - l_hat, t - m_hat)
    if not weight.sum() > 0:
        raise InputError("sw_in", "light that varies given the controls", "zero residual variation")

    def fit_theta(rows: np.ndarray, rows_pseudo: np.ndarray, rows_weight: np.ndarray) -> np.ndarray:
        """Fit the final stage on the modifiers of ``rows`` and predict theta at every row."""
        est = _clone(final)
        try:
            est.fit(xm[rows], rows_pseudo, sample_weight=rows_weight)
        except TypeError as exc:
            if "sample_weight" not in str(exc):
                raise
            raise InputError("final", "a regressor whose fit accepts sample_weight (the R-learner weights)",
                             type(final).__name__) from exc
        except (InputError, NonFiniteError):
            raise
        except Exception as exc:  # noqa: BLE001 - the learner's own error, reported against its argument
            raise InputError("final", "a learner that can be fitted to these data",
                             f"{type(final).__name__} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                             hint="check the learner's settings") from exc
        theta = np.asarray(est.predict(xm), dtype=float).reshape(-1)
        if not np.isfinite(theta).all():
            raise NonFiniteError("final", "finite predictions", f"{int((~np.isfinite(theta)).sum())} NaN or infinite")
        return theta

    theta_hat = fit_theta(np.arange(n), pseudo, weight)
    rng = np.random.default_rng(s_boot)                # the rows (or groups) of each resample
    if bootstrap == "final":
        draws = [rng.integers(0, n, n) for _ in range(members)]
        theta_b = np.stack([fit_theta(rows, pseudo[rows], weight[rows]) for rows in draws])
        l_b, m_b = l_hat[None], m_hat[None]
    else:
        theta_b, l_b, m_b = np.empty((3, members, n))
        for b, fold_seed in enumerate(_device.spawn(s_boot, members, name="members")):   # children: the replicates' folds
            rows = _resample_rows(n, group_kept, rng)
            rep_splits = sample_splits(rows.size, folds, 1, seed=fold_seed,
                                       groups=rows if group_kept is None else group_kept[rows])
            l_oof, l_b[b] = _refit_nuisance(ml_l, controls, y, rows, rep_splits, "ml_l")
            m_oof, m_b[b] = _refit_nuisance(ml_m, controls, t, rows, rep_splits, "ml_m")
            theta_b[b] = fit_theta(rows, *_pseudo_outcome(y[rows] - l_oof, t[rows] - m_oof))
    lue_b = -theta_b
    gpp_b = lue_b * t[None]
    reco_b = l_b - theta_b * m_b
    lue_hat = -theta_hat
    gpp_hat = lue_hat * t
    alpha = (1.0 - level) / 2.0

    def band(a: np.ndarray) -> np.ndarray:
        return np.quantile(a, [alpha, 1.0 - alpha], axis=0)

    coords: dict[str, Any] = {MEMBER: np.arange(members), "bound": ["lower", "upper"]}
    tc = _time_coord(data, keep.size)
    if tc:
        coords["time"] = ("obs", tc["time"][keep])
    config = {"nee": nee, "sw_in": sw_in, "x": list(x), "w": list(w), "folds": folds, "members": members,
              "bootstrap": bootstrap, "level": level, "ml_l": _describe(ml_l, False), "ml_m": _describe(ml_m, False),
              "final": _describe(final, False), "blocked": groups is not None}
    attrs = _method_attrs("dml_partition", config, seed)
    attrs.update({"level": level, "n_obs": n, "n_dropped": int(keep.size - n)})
    unit = {"units": "umol m-2 s-1"}
    ds = xr.Dataset({
        "lue": ((MEMBER, "obs"), lue_b, {"long_name": f"light-use efficiency, bootstrap refits ({bootstrap})"}),
        "gpp": ((MEMBER, "obs"), gpp_b, unit),
        "reco": ((MEMBER, "obs"), reco_b, unit),
        LOG_WEIGHT: ((MEMBER,), np.full(members, -math.log(members)), dict(LOG_WEIGHT_ATTRS)),
        "lue_hat": (("obs",), lue_hat),
        "gpp_hat": (("obs",), gpp_hat, unit),
        "reco_hat": (("obs",), l_hat - theta_hat * m_hat, {**unit, "long_name": "direct respiration l - theta m"}),
        "reco_residual": (("obs",), y + gpp_hat, {**unit, "long_name": "NEE + GPP"}),
        "lue_ci": (("bound", "obs"), band(lue_b)),
        "gpp_ci": (("bound", "obs"), band(gpp_b), unit),
        "reco_ci": (("bound", "obs"), band(reco_b), unit),
        "lue_mean": ((), float(lue_hat.mean())),
        "l_hat": (("obs",), l_hat),
        "m_hat": (("obs",), m_hat),
        "nee": (("obs",), y, unit),
        "sw_in": (("obs",), t, {"units": "W m-2"}),
    }, coords=coords, attrs=attrs)
    return ds


def _pseudo_outcome(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The R-learner's pseudo-outcome ``u / v`` (0 where ``v`` is about 0) and its weight ``v^2``."""
    small = np.abs(v) < 1e-9
    return np.where(small, 0.0, u / np.where(small, 1.0, v)), v**2


def _resample_rows(n: int, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap row indices: ``n`` rows with replacement, or (with ``groups``) as many groups as there
    are, drawn with replacement, each contributing all its rows (a block bootstrap)."""
    if groups is None:
        return rng.integers(0, n, n)
    labels, inverse = np.unique(groups, return_inverse=True)
    members_of = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    return np.concatenate([members_of[k] for k in rng.integers(0, labels.size, labels.size)])


def _refit_nuisance(learner: Any, controls: np.ndarray, target: np.ndarray, rows: np.ndarray, splits: Any,
                    name: str) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fit ``learner`` on the resampled ``rows``: out-of-fold predictions for those rows, and the
    mean of the fold models' predictions at every original row."""
    oof = np.empty(rows.size)
    everywhere = np.zeros(controls.shape[0])
    n_rows = controls.shape[0]
    for train, test in splits[0]:
        both = _fit_predict(learner, name, controls[rows[train]], target[rows[train]],
                            np.concatenate([controls[rows[test]], controls]))
        oof[test] = both[:test.size]
        everywhere += both[test.size:test.size + n_rows] / len(splits[0])
    if not (np.isfinite(oof).all() and np.isfinite(everywhere).all()):
        raise NonFiniteError(name, "finite predictions", "NaN or infinite predictions in a bootstrap refit",
                             hint="check the learner's settings and the scale of the data")
    return oof, everywhere

