"""Twin experiments: a seeded truth and synthetic observations of it, as one xarray Dataset.

:func:`simulate` integrates a model from a random initial state, observes the truth at the chosen
model steps through an :class:`~daml.models.Observation` with Gaussian noise, optionally hides a
random fraction of the entries (NaN), and returns everything a filter needs in one Dataset:

============== ============================ =================================================
variable        dims                          meaning
============== ============================ =================================================
``truth``       ``(*batch, time, variable)``  the true state at every model step
``y``           ``(*batch, time, obs)``       observations; NaN where nothing is observed
``prior_mean``  ``(variable,)``               mean of the initial distribution
``prior_cov``   ``(variable, variable_)``     its covariance
``H``           ``(obs, variable)``           the observation matrix (linear operators only)
``R``           ``(obs, obs_)``               the observation-noise covariance
============== ============================ =================================================

Coordinates: ``time`` (model time ``k dt``), ``step`` (``k``), ``observed`` (bool: an observation
time), ``variable`` and ``obs`` (indices). ``attrs`` record the model, the observation operator, the
seed and the daml version. With ``experiments=E`` a leading dim ``experiment`` holds ``E`` independent
truths and observation sets (the same model and operator), for batched filtering.

The same seed gives the same Dataset bit for bit; the random streams for the initial state, the
model noise, the observation noise and the missing entries are spawned independently from it, so
changing, say, the fraction of missing entries leaves the truth unchanged.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr

from . import _device
from ._version import __version__
from .errors import InputError, NonFiniteError, check_int
from .models.base import (Model, _propagate, as_covariance, check_memory, check_state, covariance_root,
                          model_config)
from .models.observations import Observation

__all__ = ["simulate", "observation_steps"]


def observation_steps(steps: int, every: int | None = 1, at: Sequence[int] | None = None) -> np.ndarray:
    """Model steps (in ``1..steps``) at which observations are taken: every ``every`` steps, or the
    steps listed in ``at`` (sorted, unique).

    Raises
    ------
    InputError
        Naming ``steps`` for anything but a positive int (a float such as ``5.5`` is refused, not
        rounded) or a count whose array of steps cannot fit in memory; ``every`` or ``at`` for
        non-int steps, both given, or no observation time in ``1..steps``.
    """
    steps = check_int(steps, "steps", expected="a positive int (model steps)")
    if at is not None:
        if every not in (None, 1):
            raise InputError("every/at", "one of every or at", "both")
        import numbers

        if isinstance(at, (str, bytes)) or not hasattr(at, "__iter__"):
            raise InputError("at", "a sequence of int model steps", repr(at))
        values = list(np.asarray(at).reshape(-1).tolist()) if isinstance(at, np.ndarray) else list(at)
        bad = [v for v in values if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Integral, np.integer))]
        if bad:
            raise InputError("at", "int model steps", f"{bad[0]!r} ({type(bad[0]).__name__})")
        idx = np.unique(np.asarray(values, dtype=np.int64))
        if idx.size == 0 or idx.min() < 1 or idx.max() > steps:
            raise InputError("at", f"steps in [1, {steps}]", list(idx))
        return idx
    every = check_int(every, "every", expected="a positive int (model steps between observations)")
    if every > steps:
        raise InputError("every", f"an int <= steps = {steps} (at least one observation time)", repr(every),
                         hint="observe more often or simulate more steps")
    check_memory(8.0 * (steps // every), "steps", f"steps={steps} with every={every} (one int64 per observation time)")
    return np.arange(every, steps + 1, every, dtype=np.int64)


def simulate(
    model: Model,
    steps: int,
    observe: Observation,
    *,
    every: int | None = 1,
    at: Sequence[int] | None = None,
    x0: Any = None,
    x0_cov: Any = 0.0,
    missing: float = 0.0,
    experiments: int | None = None,
    seed: _device.Seed = None,
    dtype: Any = None,
) -> xr.Dataset:
    """Simulate a truth and its observations.

    Parameters
    ----------
    model : Model
        The dynamics (see :mod:`daml.models.base`); its ``noise_cov`` perturbs the truth.
    steps : int
        Number of model steps after the initial state (the truth has ``steps + 1`` times).
    observe : Observation
        Observation operator and noise.
    every : int
        Observe every ``every`` model steps (steps ``every, 2 every, ...``); at most ``steps``.
    at : sequence of int, optional
        Irregular observation steps instead of ``every``.
    x0 : array (n,), optional
        Mean of the initial state (default zeros). The truth starts at ``x0 + L xi`` with
        ``L L^T = x0_cov``; filters start from the same distribution by default.
    x0_cov : scalar, (n,) or (n, n)
        Covariance of the initial state (0: the truth starts at ``x0``).
    missing : float in [0, 1)
        Fraction of observation entries replaced by NaN at random.
    experiments : int, optional
        Number of independent twin experiments (leading dim ``experiment``).
    seed : int, SeedSequence, torch.Generator or None
        The random stream.
    dtype : optional
        Floating dtype (default float64).

    Raises
    ------
    InputError
        Naming the argument, for wrong types or values: ``every`` beyond ``steps`` (no observation
        time at all), non-int ``at`` steps, ``experiments`` or ``steps`` whose arrays cannot fit in
        the free memory (refused before anything is allocated, with the bytes needed), ``x0`` with
        NaN or infinite entries (:class:`~daml.errors.NonFiniteError`), a ``model`` whose truth leaves
        the finite numbers.
    """
    steps = check_int(steps, "steps", expected="a positive int")
    if not callable(getattr(model, "step", None)) or not isinstance(getattr(model, "state_size", None), int) \
            or isinstance(getattr(model, "state_size", None), bool):
        raise InputError("model", "a model with state_size and step(x) (see daml.models)", type(model).__name__)
    if not isinstance(observe, Observation):
        raise InputError("observe", "an Observation (see daml.models.observe_all)", type(observe).__name__)
    if observe.state_size != model.state_size:
        raise InputError("observe", f"an operator on states of size {model.state_size}",
                         f"one on size {observe.state_size}")
    if isinstance(missing, bool) or not isinstance(missing, (int, float, np.integer, np.floating)) \
            or not 0 <= missing < 1:
        raise InputError("missing", "a fraction in [0, 1)", repr(missing))
    if experiments is not None:
        experiments = check_int(experiments, "experiments", expected="a positive int or None")
    dt = _device.resolve_dtype(dtype)
    n, m = model.state_size, observe.size
    itemsize = torch.empty((), dtype=dt).element_size()
    # truth and y at every step, the observed values and their noise, and the numpy views: ~2 copies
    nbytes = 2 * (experiments or 1) * (steps + 1) * (n + 2 * m) * itemsize + 8 * (steps + 1)
    check_memory(nbytes, "experiments" if (experiments or 1) > 1 else "steps",
                 f"experiments={experiments}, steps={steps}, state size {n}, {m} observations")
    mean = torch.zeros(n, dtype=dt) if x0 is None else check_state(model, x0, "x0", dtype=dt)
    if mean.ndim != 1:
        raise InputError("x0", f"a single state of shape ({n},)", f"shape {tuple(mean.shape)}")
    if not bool(torch.isfinite(mean).all()):
        raise NonFiniteError("x0", "a finite initial state", "NaN or infinite entries")
    cov = as_covariance(x0_cov, n, "x0_cov", dtype=dt)
    batch = () if experiments is None else (experiments,)
    obs_steps = observation_steps(int(steps), every, at)
    g_init, g_model, g_obs, g_missing = _device.spawn_generators(seed, 4)

    x = mean + torch.randn(*batch, n, generator=g_init, dtype=dt) @ covariance_root(cov).T
    r_root = covariance_root(observe.noise_cov.to(dt))
    truth = torch.empty(*batch, steps + 1, n, dtype=dt)
    truth[..., 0, :] = x
    with torch.no_grad():
        for k in range(1, steps + 1):
            x = _propagate(model, x, 1, g_model)
            truth[..., k, :] = x
        if not torch.isfinite(truth).all():
            bad = int(torch.nonzero((~torch.isfinite(truth)).reshape(-1, steps + 1, n).any(-1).any(0))[0])
            raise InputError("model", "a truth that stays finite", f"non-finite states from step {bad}",
                             hint="reduce dt or check the initial state")
        idx = torch.as_tensor(obs_steps)
        clean = observe.apply(truth[..., idx, :])
        noise = torch.randn(clean.shape, generator=g_obs, dtype=dt) @ r_root.T
        y_obs = clean + noise
        if missing > 0:
            hide = torch.rand(y_obs.shape, generator=g_missing, dtype=dt) < missing
            y_obs = torch.where(hide, torch.full((), float("nan"), dtype=dt), y_obs)
    y = torch.full((*batch, steps + 1, m), float("nan"), dtype=dt)
    y[..., idx, :] = y_obs
    observed = np.zeros(steps + 1, dtype=bool)
    observed[obs_steps] = True

    bdims = ("experiment",) if batch else ()
    coords = {
        "time": np.arange(steps + 1) * model.dt,
        "step": ("time", np.arange(steps + 1)),
        "observed": ("time", observed),
        "variable": np.arange(n),
        "obs": np.arange(m),
    }
    if batch:
        coords["experiment"] = np.arange(batch[0])
    data = {
        "truth": ((*bdims, "time", "variable"), truth.numpy()),
        "y": ((*bdims, "time", "obs"), y.numpy()),
        "prior_mean": (("variable",), mean.numpy()),
        "prior_cov": (("variable", "variable_"), cov.numpy()),
        "R": (("obs", "obs_"), observe.noise_cov.to(dt).numpy()),
    }
    if observe.linear:
        data["H"] = (("obs", "variable"), observe.matrix.to(dt).numpy())
    attrs = {
        "model": json.dumps(model_config(model), sort_keys=True),
        "observation": json.dumps(observe.config(), sort_keys=True),
        "every": int(every) if at is None else -1,
        "missing": float(missing),
        "seed": _device.seed_to_attr(seed),
        "daml_version": __version__,
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)
