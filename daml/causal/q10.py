"""The Q10 hybrid model of ecosystem respiration, estimated by DML or end to end.

Respiration follows ``RECO = Rb(x) * Q10^((T - Tref)/10)`` with ``Tref = 15 C`` and an unknown base
respiration ``Rb`` of drivers ``x`` (seasonal substrate and phenology proxies). Taking logarithms
gives a partially linear model,

    log RECO = theta * d + g(x) + eps,     d = (T - Tref)/10,  theta = log Q10,  g = log Rb,

so Q10 is a causal effect of temperature on log respiration that double machine learning estimates
with an honest interval (:func:`q10`): ``Q10 = exp(theta)`` and the interval is ``exp`` of the
interval of ``theta`` (asymmetric on the Q10 scale). Temperature is never a control, so ``Rb``
cannot absorb part of the temperature response (no equifinality), and the nuisance learners'
regularisation enters ``theta`` only at second order (Neyman orthogonality).

The fitted base respiration at the data points is ``Rb(x) = exp(l(x) - theta m(x)) * s`` from the
out-of-fold nuisances (averaged over repetitions), with Duan's smearing factor
``s = mean(exp(u - theta v))`` correcting the retransformation bias of the log model (the mean of
``log(1 + e)`` is about ``-sigma^2/2``, not 0).

The end-to-end baseline (:func:`q10_end_to_end`, the "GD-based hybrid model" of Cohrs et al. 2024)
trains ``RECO_hat = softplus(NN(x)) * Q10^d`` with a free scalar Q10 jointly by gradient descent (Adam,
minibatches, early stopping on a validation set), an ensemble of independent members in one batched
pass. Correctly specified (``x`` without temperature) it recovers Q10; with temperature among the
network's inputs (``include_ta=True``) Q10 is not identified and its value depends on the
initialisation and on the regularisation (dropout, weight decay).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr

from .. import _device
from ..errors import DtypeError, InputError, ShapeError, check_int, check_real
from ..posterior import LOG_WEIGHT, LOG_WEIGHT_ATTRS, MEMBER, _method_attrs
from .dml import _check_flag, _check_memory, _construct, check_learner, drop_missing, plr
from .learners import glorot_stack, stacked_forward

__all__ = ["q10", "q10_end_to_end", "default_learner", "LEARNERS", "DEFAULT_CONTROLS"]

LEARNERS = ("forest", "network")
DEFAULT_CONTROLS = ("SW_POT_sm", "SW_POT_sm_diff")


ABSOLUTE_ZERO_C = -273.15


def _names(data: Any) -> list[str]:
    """The column / variable names of ``data`` (DataFrame, Dataset or mapping), for messages."""
    if isinstance(data, xr.Dataset):
        return [str(k) for k in data.variables]
    for attr in ("data_vars", "columns"):
        names = getattr(data, attr, None)
        if names is not None:
            return [str(k) for k in names]
    return [str(k) for k in data.keys()] if hasattr(data, "keys") and callable(data.keys) else []


def _check_data(data: Any) -> None:
    if not (hasattr(data, "__getitem__") and (hasattr(data, "keys") or hasattr(data, "data_vars"))) or \
            isinstance(data, (str, bytes)):
        raise InputError("data", "an xarray.Dataset, a pandas.DataFrame or a mapping of column names to arrays",
                         type(data).__name__)


def _require_columns(data: Any, wanted: dict[str, Sequence[str]]) -> None:
    """Refuse, naming every missing column at once and the ones present, before any is read."""
    _check_data(data)
    have = _names(data)
    missing = []
    for arg, names in wanted.items():
        for name in names:
            if not isinstance(name, str):
                raise InputError(arg, "column names (str)", repr(name))
            if name not in have:
                missing.append(f"{name!r} ({arg})")
    if missing:
        raise InputError("data", f"the columns {', '.join(missing)}",
                         f"columns {have[:30]}" + (f" and {len(have) - 30} more" if len(have) > 30 else ""),
                         hint="name the columns with the reco=, ta=, x= (and nee=, sw_in=, w=) arguments")


def _column(data: Any, name: str, arg: str) -> np.ndarray:
    if not isinstance(name, str):
        raise InputError(arg, "a column name (str)", repr(name))
    _require_columns(data, {arg: [name]})
    col = data[name]
    raw = np.asarray(getattr(col, "values", col))
    if raw.dtype.kind == "c":
        raise DtypeError(arg, f"real numbers in column {name!r}", f"dtype {raw.dtype}")
    if raw.dtype.kind in "fiub":
        arr = raw.astype(float)
    else:
        num = pd.to_numeric(pd.Series(raw.reshape(-1)), errors="coerce").to_numpy(float)
        text = np.flatnonzero(np.isnan(num) & ~pd.isna(pd.Series(raw.reshape(-1))).to_numpy())
        if text.size:
            raise DtypeError(arg, f"numbers in column {name!r} of data",
                             f"{raw.reshape(-1)[text[0]]!r} in row {int(text[0])} ({text.size} non-numeric entries)")
        arr = num.reshape(raw.shape)
    if arr.ndim != 1:
        raise ShapeError(arg, f"a 1-d column {name!r}", f"shape {arr.shape}")
    return arr


def _time_coord(data: Any, n: int) -> dict[str, np.ndarray]:
    if isinstance(data, xr.Dataset) and "time" in data.coords and data["time"].size == n:
        return {"time": data["time"].values}
    if hasattr(data, "columns") and "time" in data.columns:
        return {"time": np.asarray(data["time"])}
    return {}


def default_learner(kind: str, seed: _device.Seed = None, **options: Any) -> Any:
    """The nuisance learners of Cohrs et al. (2024): ``"forest"`` (100 trees, min leaf 5) or ``"network"``
        (two hidden layers of 16 tanh units); ``options`` override their settings."""
    return _default_learner(kind, seed, "kind", **options)


def _default_learner(kind: str, seed: _device.Seed, argument: str, **options: Any) -> Any:
    """:func:`default_learner`, its errors naming ``argument`` (``learner`` when called by :func:`q10`)."""
    if not isinstance(kind, str) or kind not in LEARNERS:
        raise InputError(argument, f"one of {LEARNERS} or a regressor with fit/predict", repr(kind))
    state = _device.random_state(seed)
    if kind == "forest":
        from sklearn.ensemble import RandomForestRegressor

        kw = {"n_estimators": 100, "min_samples_leaf": 5, "random_state": state, **options}
        return _construct(RandomForestRegressor, kw)
    if kind == "network":
        from .learners import MLPRegressor

        kw = {"hidden": (16, 16), "activation": "tanh", "random_state": state, **options}
        return _construct(MLPRegressor, kw)
    raise InputError(argument, f"one of {LEARNERS} or a regressor with fit/predict", repr(kind))


def _respiration_arrays(data: Any, reco: str, ta: str, x: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(x, str):
        x = (x,)
    if x is None or not hasattr(x, "__iter__"):
        raise InputError("x", "a sequence of control column names", repr(x))
    x = tuple(x)
    if not x:
        raise InputError("x", "at least one control variable", "none")
    _require_columns(data, {"reco": [reco], "ta": [ta], "x": list(x)})
    if ta in x:
        raise InputError("x", "controls that exclude the temperature (it is the treatment)", f"{ta!r} among {list(x)}")
    r = _column(data, reco, "reco")
    t = _column(data, ta, "ta")
    xs = np.stack([_column(data, name, "x") for name in x], axis=1)
    if r.size != t.size or xs.shape[0] != r.size:
        raise ShapeError("data", "columns of one length", f"reco {r.size}, ta {t.size}, x {xs.shape[0]} rows")
    if r.size == 0:
        raise ShapeError("data", "at least one row", "0 rows")
    cold = np.isfinite(t) & (t < ABSOLUTE_ZERO_C)
    if cold.any():
        raise InputError("ta", f"air temperatures in degrees Celsius (>= {ABSOLUTE_ZERO_C}, absolute zero)",
                         f"{int(cold.sum())} values below it (first in row {int(np.argmax(cold))}: "
                         f"{float(t[cold][0]):.6g})")
    bad = np.isfinite(r) & (r <= 0)
    if bad.any():
        raise InputError("reco", "positive respiration (the model takes its logarithm)",
                         f"{int(bad.sum())} values <= 0 (minimum {float(np.nanmin(r)):.4g})",
                         hint="select night-time NEE > 0, as daml q10 does, or drop these rows")
    return r, t, xs


def q10(
    data: Any,
    *,
    reco: str = "RECO_obs",
    ta: str = "TA",
    x: Sequence[str] = DEFAULT_CONTROLS,
    tref: float = 15.0,
    learner: Any = "forest",
    ml_l: Any = None,
    ml_m: Any = None,
    folds: int = 5,
    repetitions: int = 1,
    groups: Any = None,
    splits: Any = None,
    level: float = 0.95,
    bootstrap: str = "normal",
    n_boot: int = 500,
    aggregation: str = "interval",
    nan: str = "drop",
    seed: _device.Seed = None,
) -> xr.Dataset:
    """Q10 of ecosystem respiration with a confidence interval, by double machine learning.

    Parameters
    ----------
    data : xarray.Dataset, pandas.DataFrame or mapping of arrays
        One row per observation (e.g. night-time half-hours).
    reco, ta : str
        Names of respiration (positive, any flux unit) and air temperature (C).
    x : sequence of str
        Controls of base respiration (default: smoothed potential radiation and its change, the
        seasonal proxies of Cohrs et al. 2024). Never the temperature.
    tref : float
        Reference temperature of ``Rb``.
    learner : {"forest", "network"} or regressor
        Nuisance learner for both ``E[log RECO | x]`` and ``E[d | x]`` (see :func:`default_learner`);
        ``ml_l`` / ``ml_m`` override it per nuisance.
    folds, repetitions, groups, splits, level, bootstrap, n_boot, aggregation, nan
        As in :func:`daml.causal.plr`.
    seed : int, SeedSequence, torch.Generator or None
        Seeds the splits, the bootstrap and the default learners.

    Returns
    -------
    xarray.Dataset
        Everything :func:`daml.causal.plr` returns (``theta = log Q10``), plus ``q10``, ``q10_ci``,
        ``q10_ci_boot``, ``q10_draw`` (``member``: bootstrap draws on the Q10 scale), ``rb`` and
        ``reco_fit`` over ``obs`` (with the ``time`` coordinate when ``data`` has one).
    """
    tref = check_real(tref, "tref")
    r, t, xs = _respiration_arrays(data, reco, ta, x)
    learn_seed, dml_seed = _device.spawn(seed, 2)
    if isinstance(learner, str):
        base = _default_learner(learner, learn_seed, "learner")
    else:
        base = check_learner(learner, "learner")
    y = np.log(r)
    d = (t - tref) / 10.0
    ds = plr(y, d, xs, ml_l=ml_l if ml_l is not None else base, ml_m=ml_m if ml_m is not None else base,
             folds=folds, repetitions=repetitions, groups=groups, splits=splits, level=level,
             bootstrap=bootstrap, n_boot=n_boot, aggregation=aggregation, nan=nan, seed=dml_seed, coords=_time_coord(data, r.size))
    theta_r = ds["theta_rep"].values[:, None]
    u = ds["y"].values[None] - ds["l_hat"].values
    v = ds["d"].values[None] - ds["m_hat"].values
    smear = np.exp(u - theta_r * v).mean(axis=1, keepdims=True)
    rb = (np.exp(ds["l_hat"].values - theta_r * ds["m_hat"].values) * smear).mean(axis=0)
    q = math.exp(float(ds["theta"]))
    ds["q10"] = ((), q, {"long_name": "Q10 = exp(theta)"})
    ds["q10_ci"] = (("bound",), np.exp(ds["ci"].values), {"long_name": "exp of the normal interval of theta"})
    ds["q10_ci_boot"] = (("bound",), np.exp(ds["ci_boot"].values))
    ds["q10_draw"] = ((MEMBER, "repetition"), np.exp(ds["theta_draw"].values))
    ds["rb"] = (("obs",), rb, {"long_name": f"fitted base respiration at {tref:g} C (out of fold, smearing-corrected)"})
    ds["reco_fit"] = (("obs",), rb * q ** ds["d"].values, {"long_name": "fitted respiration"})
    cfg = ds.attrs
    cfg["method"] = "dml_q10"
    cfg.update({"tref": tref, "reco": reco, "ta": ta, "controls": ",".join(x if not isinstance(x, str) else (x,)),
                "learner": learner if isinstance(learner, str) else type(learner).__name__,
                "seed": _device.seed_to_attr(seed)})
    return ds


# ----------------------------------------------------------------------------------------------
# the end-to-end baseline


def q10_end_to_end(
    data: Any,
    *,
    reco: str = "RECO_obs",
    ta: str = "TA",
    x: Sequence[str] = DEFAULT_CONTROLS,
    include_ta: bool = False,
    tref: float = 15.0,
    hidden: Sequence[int] = (16, 16),
    dropout: float = 0.0,
    weight_decay: float = 0.0,
    q10_init: float = 1.5,
    q10_init_sd: float = 0.1,
    members: int = 20,
    iterations: int = 4000,
    batch_size: int = 256,
    lr: float = 0.01,
    lr_q10: float = 0.1,
    validation: float = 0.2,
    subsample: int | None = None,
    check_every: int = 100,
    level: float = 0.95,
    nan: str = "drop",
    seed: _device.Seed = None,
    device: Any = None,
    dtype: Any = None,
) -> xr.Dataset:
    """The end-to-end (gradient-descent) Q10 hybrid: ``RECO = softplus(NN(x)) * Q10^((T - Tref)/10)``.

    ``members`` networks, each with its own free Q10, initial weights (Glorot normal), Q10 start
    ``q10_init + q10_init_sd * N(0, 1)``, random validation split and minibatch stream, are trained in
    one batched pass: Adam (``lr`` for the network, ``lr_q10`` for Q10, both decaying by 0.95 every 500
    steps) on the mean squared error of ``RECO / max|RECO|``, dropout ``dropout`` on the hidden units,
    L2 penalty ``weight_decay`` on the weights; every ``check_every`` steps the validation loss is
    computed and each member keeps its best parameters (early stopping).

    Parameters
    ----------
    data, reco, ta, x, tref
        As in :func:`q10`.
    include_ta : bool
        Give the network the temperature as an extra input (the equifinal set-up: Q10 is then not
        identified).
    subsample : int, optional
        Training points per member, drawn without replacement from the member's training part
        (default: all of it).
    validation : float
        Fraction of the rows each member holds out for early stopping.
    level : float
        Level of the ensemble interval (member quantiles; a spread, not a confidence interval).

    Returns
    -------
    xarray.Dataset
        A daml posterior over the trained ``member`` networks (equal weights): ``q10_draw`` (member), ``q10``
        (member mean), ``q10_sd``, ``q10_ci`` (member quantiles), ``val_loss`` and ``best_step`` (member),
        ``rb`` (member mean of the fitted base respiration over ``obs``).
    """
    tref = check_real(tref, "tref")
    members = check_int(members, "members", minimum=1)
    iterations = check_int(iterations, "iterations", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    check_every = check_int(check_every, "check_every", minimum=1)
    if not 0.0 < check_real(validation, "validation", expected="a fraction in (0, 1)") < 1.0:
        raise InputError("validation", "a fraction in (0, 1)", validation)
    if not 0.0 <= check_real(dropout, "dropout", expected="a probability in [0, 1)") < 1.0:
        raise InputError("dropout", "a probability in [0, 1)", dropout)
    if check_real(weight_decay, "weight_decay", expected="a non-negative penalty") < 0:
        raise InputError("weight_decay", "a non-negative penalty", weight_decay)
    if not 0.0 < check_real(level, "level", expected="a level strictly between 0 and 1") < 1.0:
        raise InputError("level", "a level strictly between 0 and 1", level)
    if check_real(q10_init_sd, "q10_init_sd", expected="a non-negative spread") < 0:
        raise InputError("q10_init_sd", "a non-negative spread", q10_init_sd)
    lr = check_real(lr, "lr", positive=True)
    lr_q10 = check_real(lr_q10, "lr_q10", positive=True)
    include_ta = _check_flag(include_ta, "include_ta")
    if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
        raise InputError("hidden", "a sequence of positive layer widths such as (16, 16)", repr(hidden))
    hidden = tuple(check_int(h, "hidden", minimum=1, expected="positive integer layer widths such as (16, 16)")
                   for h in hidden)
    q10_init = check_real(q10_init, "q10_init", positive=True)
    r, t, xs = _respiration_arrays(data, reco, ta, x)
    clean, keep = drop_missing({"reco": r, "ta": t, "x": xs}, nan)
    r, t, xs = clean["reco"], clean["ta"], clean["x"]
    n = r.size
    if n < 3:
        raise InputError("data", "at least 3 rows without NaN (training and validation)", f"{n} rows")
    _check_memory(8.0 * members * (n + 3 * min(batch_size, n) * (max(hidden, default=1) + 1)), "members",
                  "index and activation arrays")
    d = (t - tref) / 10.0
    feats = np.concatenate([xs, t[:, None]], axis=1) if include_ta else xs
    n_val = max(1, int(round(validation * n)))
    n_train_all = n - n_val
    n_train = n_train_all if subsample is None else check_int(subsample, "subsample", minimum=2)
    if n_train > n_train_all or n_train < 2:
        raise InputError("subsample", f"at most the {n_train_all} rows left after validation", subsample)

    dev = _device.resolve_device(device)
    dt = _device.resolve_dtype(dtype, dev)
    split_seed, init_seed, batch_seed = _device.spawn(seed, 3)
    rng = np.random.default_rng(split_seed)
    tr_idx = np.empty((members, n_train), dtype=np.int64)
    va_idx = np.empty((members, n_val), dtype=np.int64)
    for k in range(members):
        perm = rng.permutation(n)
        va_idx[k] = perm[:n_val]
        tr_idx[k] = perm[n_val:n_val + n_train]
    mu = feats.mean(0)
    sd = feats.std(0)
    sd[sd == 0] = 1.0
    F = torch.as_tensor((feats - mu) / sd, dtype=dt, device=dev)
    scale = float(np.abs(r).max())
    Y = torch.as_tensor(r / scale, dtype=dt, device=dev)
    D = torch.as_tensor(d, dtype=dt, device=dev)
    g = _device.generator(init_seed, "cpu")
    params = [t.to(dev, dt).requires_grad_(True)
              for t in glorot_stack([F.shape[1], *[int(h) for h in hidden], 1], g, prefix=(members,))]
    q0 = q10_init + q10_init_sd * torch.randn(members, generator=g, dtype=torch.float64)
    if bool((q0 <= 0).any()):
        raise InputError("q10_init_sd", "a spread that keeps every initial Q10 positive", q10_init_sd)
    log_q = torch.log(q0).to(dev, dt).requires_grad_(True)           # Q10 = exp(log_q) > 0
    opt = torch.optim.Adam([{"params": params, "lr": lr}, {"params": [log_q], "lr": lr_q10}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=500, gamma=0.95)
    bg = _device.generator(batch_seed, dev)
    tr_t = torch.as_tensor(tr_idx, device=dev)
    va_t = torch.as_tensor(va_idx, device=dev)

    def drop(h: torch.Tensor, i: int) -> torch.Tensor:
        return h * torch.bernoulli(torch.full_like(h, 1.0 - dropout), generator=bg) / (1.0 - dropout)

    def predict(ps: list[torch.Tensor], lq: torch.Tensor, idx: torch.Tensor, train: bool) -> torch.Tensor:
        out = stacked_forward(ps, F[idx], torch.tanh, drop if train and dropout > 0 else None)
        return torch.nn.functional.softplus(out) * torch.exp(lq[:, None] * D[idx])

    best_loss = torch.full((members,), float("inf"), dtype=dt, device=dev)
    best = [p.detach().clone() for p in params]
    best_q = log_q.detach().clone()
    best_step = torch.zeros(members, dtype=torch.int64)
    rows = torch.arange(members, device=dev)[:, None]

    def checkpoint(step: int) -> None:
        with torch.no_grad():
            vl = ((predict(params, log_q, va_t, False) - Y[va_t]) ** 2).mean(1)
            better = vl < best_loss
            best_loss[better] = vl[better]
            for b_, p_ in zip(best, params):
                b_[better] = p_.detach()[better]
            best_q[better] = log_q.detach()[better]
            best_step[better.cpu()] = step

    for step in range(1, iterations + 1):
        pick = torch.randint(0, n_train, (members, min(batch_size, n_train)), generator=bg, device=dev)
        idx = tr_t[rows, pick]
        opt.zero_grad(set_to_none=True)
        loss = ((predict(params, log_q, idx, True) - Y[idx]) ** 2).mean(1).sum()
        if weight_decay > 0:
            loss = loss + 0.5 * weight_decay * sum((w**2).sum() for w in params[0::2])
        loss.backward()
        opt.step()
        sched.step()
        if step % check_every == 0 or step == iterations:
            checkpoint(step)
    if not bool(torch.isfinite(best_loss).all()):
        from ..errors import DivergenceError

        raise DivergenceError("end-to-end Q10 training produced non-finite validation losses")

    q_members = _device.to_numpy(torch.exp(best_q)).astype(np.float64)
    rb_mean = np.empty(n)
    with torch.no_grad():                                  # Q10^0 = 1: the network's Rb itself, in chunks
        for lo in range(0, n, 4096):
            idx = torch.arange(lo, min(n, lo + 4096), device=dev).expand(members, -1)
            rb_mean[lo:lo + idx.shape[1]] = _device.to_numpy(
                (predict(best, torch.zeros_like(best_q), idx, False) * scale).mean(0)).astype(np.float64)
    alpha = (1.0 - level) / 2.0
    coords: dict[str, Any] = {MEMBER: np.arange(members), "bound": ["lower", "upper"]}
    tc = _time_coord(data, keep.size)
    if tc:
        coords["time"] = ("obs", tc["time"][keep])
    config = {"include_ta": include_ta, "hidden": list(map(int, hidden)), "dropout": dropout,
              "weight_decay": weight_decay, "q10_init": q10_init, "q10_init_sd": q10_init_sd,
              "members": members, "iterations": iterations, "batch_size": batch_size, "lr": lr,
              "lr_q10": lr_q10, "validation": validation, "subsample": subsample, "tref": tref,
              "controls": list(x) if not isinstance(x, str) else [x]}
    attrs = _method_attrs("end_to_end_q10", config, seed)
    attrs.update({"level": level, "n_obs": n, "n_dropped": int(keep.size - n), "tref": tref})
    ds = xr.Dataset({
        "q10_draw": ((MEMBER,), q_members, {"long_name": "Q10 of each trained member"}),
        LOG_WEIGHT: ((MEMBER,), np.full(members, -math.log(members)), dict(LOG_WEIGHT_ATTRS)),
        "q10": ((), float(q_members.mean()), {"long_name": "member mean of Q10"}),
        "q10_sd": ((), float(q_members.std(ddof=1)) if members > 1 else 0.0),
        "q10_ci": (("bound",), np.quantile(q_members, [alpha, 1.0 - alpha]),
                   {"long_name": f"{level:.0%} member interval (ensemble spread, not a confidence interval)"}),
        "val_loss": ((MEMBER,), _device.to_numpy(best_loss).astype(np.float64)),
        "best_step": ((MEMBER,), best_step.numpy()),
        "rb": (("obs",), rb_mean, {"long_name": "member mean of the fitted base respiration"}),
    }, coords=coords, attrs=attrs)
    return ds
