"""The published data and evaluation protocols of Hamiltonian and Lagrangian neural networks.

This module reproduces, number for number where the peers' code allows, how the reference papers made
their training data and how they scored a learned vector field, so that daml's networks
(:mod:`daml.models.hamiltonian`) can be compared with the published tables.

**Greydanus, Dzamba & Yosinski (2019), Hamiltonian Neural Networks** (code: greydanus/hamiltonian-nn).

* :func:`greydanus_spring` -- ``experiment-spring/data.py``: the ideal mass-spring with
  ``H = q^2 + p^2`` (daml's ``MassSpring(mass=0.5, stiffness=2.0)``). 50 trajectories on ``t in [0, 3]``
  sampled at ``linspace(0, 3, 30)``; the initial state is a uniform point of ``[-1, 1]^2`` rescaled to
  a radius drawn from ``U(0.1, 1.0)``; each trajectory is solved by SciPy's ``solve_ivp`` (RK45,
  ``rtol=1e-10``, default ``atol``); Gaussian noise of standard deviation 0.1 is added to ``q`` and ``p``;
  the labels are the exact time derivatives at the noise-free states; the first half of the points
  (the first 25 trajectories) is the training set, the second half the test set.
* :func:`greydanus_pendulum` -- ``experiment-pend/data.py``: ``H = 3 (1 - cos q) + p^2`` (daml's
  ``Pendulum(mass=2.0, length=0.5, gravity=3.0)``), 45 points per trajectory (``linspace(0, 3, 45)``),
  radius ``U(1.3, 2.3)``, noise 0.1, the same split.
* :func:`greydanus_two_body` -- ``experiment-2body/data.py``: two unit masses, ``G = 1``; 1000 orbits of
  50 points on ``t in [0, 20]`` (RK45, ``rtol=1e-9``); body 1 at a uniform point of
  ``[0.5, 1.5]^2``, body 2 opposite it, both with the circular-orbit speed multiplied by
  ``1 + 0.05 n`` (``n`` standard normal), no observation noise; the **first** 20 % of the points are the
  test set. The peer orders the coordinates ``(x1, x2, y1, y2, vx1, vx2, vy1, vy2)``; here they are in
  daml's :class:`~daml.models.mechanics.TwoBody` order ``(x1, y1, x2, y2, p1x, p1y, p2x, p2y)`` (the
  momenta equal the velocities because the masses are 1).

The random draws use ``numpy.random.RandomState(seed)`` in the peers' order (per trajectory: the
initial direction, the radius, then the ``q`` noise and the ``p`` noise; per orbit: the position, then
the speed factor), which is the stream of their ``np.random.seed(seed)`` + ``np.random.rand`` /
``randn`` calls (a local generator here: daml seeds nothing globally), so the data sets equal theirs up
to floating-point rounding of the right-hand side.

:func:`energy_mse` is the evaluation of the ``analyze-spring`` / ``analyze-pend`` notebooks: 15
initial states ``x0 = u + 0.2 sign(u)`` with ``u ~ U(-0.8, 0.8)^2`` (so ``|x0_i| in [0.2, 1.0]``); the
true and the learned vector fields are integrated by ``solve_ivp`` (RK45, ``rtol=1e-12``, default
``atol``) over ``t in [0, 20]`` and evaluated at 100 points; the learned field's time axis is stretched
by ``1 + 0.9 * 0.1`` (the notebooks' compensation for the training noise: its span and evaluation times
are both multiplied, so model point ``k`` is at time ``1.09 t_k``); the score of a trial is the mean
over the 100 points of ``(E(true state) - E(model state))^2`` with the true energy ``E``; the result is
the mean over the trials and the notebooks' "bootstrap" spread, the standard deviation of the means of
5 consecutive groups of 3 trials divided by ``sqrt(5)``.

Two details of the notebooks are recorded rather than copied: (i) their ``integrate_models`` multiplies
the caller's ``t_span`` list and ``t_eval`` array **in place**, so in a loop over trials the horizon
grows by the factor 1.09 from one trial to the next (``compound_stretch=True`` reproduces that; the
default applies the stretch once per trial, the protocol as described); (ii) the notebooks draw the 15
initial states from numpy's global stream after earlier cells; here they come from a fresh
``RandomState(seed)``.

**Cranmer et al. (2020), Lagrangian Neural Networks** (code: MilesCranmer/lagrangian_nns).

* :func:`cranmer_double_pendulum` -- training states ``theta ~ U(0, 2 pi)^2``, ``omega ~ U(-10, 10)^2``
  (fresh ones every epoch in the paper's notebook) with the analytic accelerations of
  ``experiment_dblpend/physics.py`` (``m1 = m2 = l1 = l2 = 1``, ``g = 9.8``) as labels.
* :func:`cranmer_energy_error` -- 40 starts ``theta ~ U(0, 2 pi)^2``, ``omega ~ U(0, 0.1)^2``,
  integrated to ``t = 100``; the error of a start is ``|E(model state at t_end) - E(true state at
  t_end)| / 29.4``, 29.4 being the largest potential energy ``(m1 + 2 m2) g l``. The peer draws with
  JAX's PRNG, which numpy cannot replay, so the states here come from a torch generator seeded by
  ``seed``.

All functions return float64 unless ``dtype`` says otherwise and raise :mod:`daml.errors` on bad input.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from .. import _device
from ..errors import (DivergenceError, InputError, NonFiniteError, SeedError, ShapeError, check_fits, check_int,
                      check_real)

__all__ = [
    "MechanicsData",
    "EnergyMSE",
    "EnergyError",
    "greydanus_spring",
    "greydanus_pendulum",
    "greydanus_two_body",
    "greydanus_initial_states",
    "energy_mse",
    "bootstrap_spread",
    "system_field",
    "cranmer_double_pendulum",
    "cranmer_initial_states",
    "double_pendulum_acceleration",
    "double_pendulum_energy",
    "cranmer_energy_error",
    "DOUBLE_PENDULUM_MAX_POTENTIAL",
]

#: Largest potential energy of Cranmer's double pendulum, ``(m1 + 2 m2) g l`` with ``m = l = 1``,
#: ``g = 9.8``: the normaliser of :func:`cranmer_energy_error`.
DOUBLE_PENDULUM_MAX_POTENTIAL = 29.4

_G_DBL = 9.8


class MechanicsData(NamedTuple):
    """A (state, time derivative) data set of a published protocol.

    Attributes
    ----------
    x, dxdt : Tensor ``(N, 2d)``
        Training states (with the protocol's noise) and exact time derivatives at the noise-free states.
    test_x, test_dxdt : Tensor ``(N_test, 2d)``
        The held-out part, made the same way.
    t : Tensor ``(T,)``
        Sampling times of one trajectory.
    trajectories : Tensor ``(S, T, 2d)``
        The noise-free trajectories, in the order their points appear in ``x`` then ``test_x`` (for the
        two-body set: ``test_x`` first, as the peer splits it).
    system : object
        The true daml system (:mod:`daml.models.mechanics`).
    config : dict
        The protocol's settings (seed, sizes, noise, source file).
    """

    x: torch.Tensor
    dxdt: torch.Tensor
    test_x: torch.Tensor
    test_dxdt: torch.Tensor
    t: torch.Tensor
    trajectories: torch.Tensor
    system: Any
    config: dict


class EnergyMSE(NamedTuple):
    """The result of :func:`energy_mse`.

    Attributes
    ----------
    mse : float
        Mean over the trials of the per-trial energy MSE.
    spread : float
        The notebooks' "bootstrap" spread (:func:`bootstrap_spread`).
    per_trial : ndarray ``(trials,)``
        Energy MSE of each trial.
    x0 : ndarray ``(trials, 2d)``
        The initial states.
    t : ndarray ``(trials, points)``
        Evaluation times of the true trajectories (the model's are ``stretch`` times these).
    true_states, model_states : ndarray ``(trials, points, 2d)``
        The two trajectories of each trial.
    true_energy, model_energy : ndarray ``(trials, points)``
        The true energy along each.
    stretch : float
        The time-axis factor applied to the model, ``1 + 0.9 noise_std``.
    failed : int
        Trials whose model integration stopped early (their remaining points are filled with the last
        state reached; ``solve_ivp``'s message is warned).
    """

    mse: float
    spread: float
    per_trial: np.ndarray
    x0: np.ndarray
    t: np.ndarray
    true_states: np.ndarray
    model_states: np.ndarray
    true_energy: np.ndarray
    model_energy: np.ndarray
    stretch: float
    failed: int


class EnergyError(NamedTuple):
    """The result of :func:`cranmer_energy_error`.

    Attributes
    ----------
    mean : float
        Mean over the (non-diverged) starts of the normalised final energy error.
    per_start : ndarray ``(starts,)``
        ``|E_model(t_end) - E_true(t_end)| / 29.4`` per start.
    x0 : ndarray ``(starts, 4)``
        The initial states ``(theta1, theta2, omega1, omega2)``.
    t : ndarray ``(frames,)``
        Times at which the trajectories are recorded.
    true_energy, model_energy : ndarray ``(starts, frames)``
        Energy along the true and the model trajectories.
    diverged : int
        Model trajectories that turned non-finite or left ``|state| < 1e6`` (frozen there; their
        ``per_start`` is ``inf`` and ``mean`` leaves them out; ``mean`` is ``inf`` when all diverged).
    """

    mean: float
    per_start: np.ndarray
    x0: np.ndarray
    t: np.ndarray
    true_energy: np.ndarray
    model_energy: np.ndarray
    diverged: int


# ----------------------------------------------------------------------------------------------------------
# input checks


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**32:
        raise SeedError("seed", "an int in [0, 2**32) (numpy RandomState, as the peers seed)", repr(seed))
    return int(seed)


def _check_fraction(value: object, name: str) -> float:
    v = check_real(value, name)
    if not 0.0 < v < 1.0:
        raise InputError(name, "a number strictly between 0 and 1", repr(value))
    return v


def _check_nonneg(value: object, name: str) -> float:
    v = check_real(value, name)
    if v < 0:
        raise InputError(name, "a finite number >= 0", repr(value))
    return v


def _check_range(value: object, name: str, *, positive: bool = True) -> tuple[float, float]:
    try:
        lo, hi = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InputError(name, "a pair (low, high)", repr(value)) from None
    lo = check_real(lo, f"{name}[0]")
    hi = check_real(hi, f"{name}[1]")
    if not hi > lo or (positive and lo < 0):
        raise InputError(name, "a pair with 0 <= low < high" if positive else "a pair with low < high",
                         repr(value))
    return lo, hi


def _greydanus_system(kind: str) -> Any:
    """Greydanus' task Hamiltonian as a daml system: spring ``H = q^2 + p^2``, pendulum
    ``H = 3 (1 - cos q) + p^2``."""
    from .mechanics import MassSpring, Pendulum

    return MassSpring(mass=0.5, stiffness=2.0) if kind == "spring" else Pendulum(mass=2.0, length=0.5, gravity=3.0)


def _greydanus_1d(kind: str, *, seed: object, samples: object, test_split: object, noise_std: object,
                  t_end: object, timescale: object, radius: object, dtype: Any) -> MechanicsData:
    from scipy.integrate import solve_ivp

    seed = _check_seed(seed)
    samples = check_int(samples, "samples", 2)
    test_split = _check_fraction(test_split, "test_split")
    noise_std = _check_nonneg(noise_std, "noise_std")
    t_end = check_real(t_end, "t_end", positive=True)
    timescale = check_real(timescale, "timescale", positive=True)
    r_lo, r_hi = _check_range(radius, "radius")
    if r_lo <= 0:
        raise InputError("radius", "a pair with 0 < low < high (a zero radius has no direction)", repr(radius))
    check_fits("samples", 64.0 * samples, what=f"samples={samples}")
    n_pts = timescale * t_end
    check_fits("timescale" if timescale / 10.0 >= t_end / 3.0 else "t_end", 64.0 * samples * n_pts,
               what=f"timescale * t_end = {n_pts:g} points per trajectory")
    n_t = int(n_pts)
    if n_t < 2:
        raise InputError("timescale", "timescale * t_end >= 2 (points per trajectory)", f"{timescale} * {t_end}")
    dt = _device.resolve_dtype(dtype)
    system = _greydanus_system(kind)
    field = _numpy_field(system_field(system), 2, torch.float64, "system")     # the system's own field
    t_eval = np.linspace(0.0, t_end, n_t)
    rs = np.random.RandomState(seed)
    xs, dxs, clean = [], [], []
    for _ in range(samples):
        y0 = rs.rand(2) * 2.0 - 1.0
        r = rs.rand() * (r_hi - r_lo) + r_lo
        y0 = y0 / np.sqrt((y0 ** 2).sum()) * r
        sol = solve_ivp(field, (0.0, t_end), y0, t_eval=t_eval, rtol=1e-10)
        if sol.status != 0 or sol.y.shape[1] != n_t:  # pragma: no cover - smooth 1-d fields do not fail
            raise DivergenceError(f"solve_ivp failed on a {kind} trajectory: {sol.message}")
        states = sol.y.T.copy()                                        # (T, 2), noise free
        deriv = _labels(system, states)                                # labels at the clean states
        noisy = states.copy()
        noisy[:, 0] += rs.randn(n_t) * noise_std
        noisy[:, 1] += rs.randn(n_t) * noise_std
        xs.append(noisy), dxs.append(deriv), clean.append(states)
    x, dx = np.concatenate(xs), np.concatenate(dxs)
    split = int(len(x) * test_split)
    source = "experiment-spring/data.py" if kind == "spring" else "experiment-pend/data.py"

    def tt(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dt)

    config = {"protocol": f"greydanus_{kind}", "source": f"greydanus/hamiltonian-nn:{source}", "seed": seed,
              "samples": samples, "test_split": test_split, "noise_std": noise_std, "t_end": t_end,
              "timescale": timescale, "radius": (r_lo, r_hi), "points_per_trajectory": n_t,
              "solver": "scipy solve_ivp RK45, rtol=1e-10", "split_index": split}
    return MechanicsData(tt(x[:split]), tt(dx[:split]), tt(x[split:]), tt(dx[split:]), tt(t_eval),
                         tt(np.stack(clean)), system, config)


def greydanus_spring(seed: int = 0, *, samples: int = 50, test_split: float = 0.5, noise_std: float = 0.1,
                     t_end: float = 3.0, timescale: float = 10.0, radius: tuple[float, float] = (0.1, 1.0),
                     dtype: Any = None) -> MechanicsData:
    """The ideal mass-spring data set of greydanus/hamiltonian-nn ``experiment-spring/data.py``.

    ``H = q^2 + p^2``; ``samples`` trajectories of ``int(timescale * t_end)`` points on ``[0, t_end]``,
    radius ``U(radius)``, noise ``noise_std`` on ``q`` and ``p``, labels at the noise-free states, the first
    ``test_split`` of the points for training. The defaults are the peer's (seed 0 as its train.py).

    Parameters
    ----------
    seed : int
        Seed of ``numpy.random.RandomState`` (the peer's ``np.random.seed``).
    samples, test_split, noise_std, t_end, timescale, radius
        The peer's ``get_dataset`` / ``get_trajectory`` arguments.
    dtype : optional
        Dtype of the returned tensors (float64 by default; the peer trains in float32).

    Returns
    -------
    MechanicsData
        ``x``, ``dxdt`` of shape ``(750, 2)`` and ``test_x``, ``test_dxdt`` ``(750, 2)`` with the defaults;
        ``trajectories`` ``(50, 30, 2)``; ``system`` is ``MassSpring(mass=0.5, stiffness=2.0)``.

    Raises
    ------
    SeedError, InputError
        Naming the argument.

    Examples
    --------
    >>> d = greydanus_spring(seed=0)
    >>> tuple(d.x.shape), tuple(d.test_x.shape)
    ((750, 2), (750, 2))
    """
    return _greydanus_1d("spring", seed=seed, samples=samples, test_split=test_split, noise_std=noise_std,
                         t_end=t_end, timescale=timescale, radius=radius, dtype=dtype)


def greydanus_pendulum(seed: int = 0, *, samples: int = 50, test_split: float = 0.5, noise_std: float = 0.1,
                       t_end: float = 3.0, timescale: float = 15.0, radius: tuple[float, float] = (1.3, 2.3),
                       dtype: Any = None) -> MechanicsData:
    """The ideal pendulum data set of greydanus/hamiltonian-nn ``experiment-pend/data.py``.

    ``H = 3 (1 - cos q) + p^2`` (daml's ``Pendulum(mass=2.0, length=0.5, gravity=3.0)``); 45 points per
    trajectory with the defaults, radius ``U(1.3, 2.3)``, noise 0.1; otherwise as :func:`greydanus_spring`.

    Returns
    -------
    MechanicsData
        ``x`` ``(1125, 2)``, ``test_x`` ``(1125, 2)``, ``trajectories`` ``(50, 45, 2)`` with the defaults.

    Examples
    --------
    >>> d = greydanus_pendulum(seed=0)
    >>> tuple(d.trajectories.shape)
    (50, 45, 2)
    """
    return _greydanus_1d("pendulum", seed=seed, samples=samples, test_split=test_split, noise_std=noise_std,
                         t_end=t_end, timescale=timescale, radius=radius, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Greydanus: two bodies

# daml order (x1, y1, x2, y2, p1x, p1y, p2x, p2y) <- peer order (x1, x2, y1, y2, vx1, vx2, vy1, vy2)
_PEER_TO_DAML = np.array([0, 2, 1, 3, 4, 6, 5, 7])


def _two_body_field(y: np.ndarray) -> np.ndarray:
    """``TwoBody(1, 1, 1)``'s field of one state in numpy, for ``solve_ivp``'s scalar right-hand side only:
    the torch system costs about ten times more per call, and the peer's 1000 orbits make a million calls.
    The labels come from the torch system; a test checks that the two agree."""
    q1, q2, v1, v2 = y[0:2], y[2:4], y[4:6], y[6:8]
    d = q2 - q1
    a1 = d / float(np.sqrt(d @ d)) ** 3
    return np.concatenate([v1, v2, a1, -a1])


def _labels(system: Any, states: np.ndarray) -> np.ndarray:
    """The system's time derivative at every state ``(T, 2d)``, one batched torch call."""
    with torch.no_grad():
        return system_field(system)(torch.as_tensor(states, dtype=torch.float64)).numpy()


def _two_body_start(rs: np.random.RandomState, orbit_noise: float, r_lo: float, r_hi: float) -> np.ndarray:
    pos = rs.rand(2) * (r_hi - r_lo) + r_lo
    r = np.sqrt(np.sum(pos ** 2))
    vel = np.flipud(pos) / (2.0 * r ** 1.5)
    vel[0] *= -1.0
    vel = vel * (1.0 + orbit_noise * rs.randn())
    # body 2 mirrors body 1 through the origin
    return np.concatenate([pos, -pos, vel, -vel])


def greydanus_two_body(seed: int = 0, *, trials: int = 1000, timesteps: int = 50, t_end: float = 20.0,
                       orbit_noise: float = 0.05, radius: tuple[float, float] = (0.5, 1.5),
                       test_split: float = 0.2, dtype: Any = None) -> MechanicsData:
    """The two-body data set of greydanus/hamiltonian-nn ``experiment-2body/data.py`` (``sample_orbits``).

    ``trials`` orbits of ``timesteps`` points on ``[0, t_end]`` (``solve_ivp`` RK45, ``rtol=1e-9``), near
    circular (speed factor ``1 + orbit_noise * n``); no observation noise; the **first** ``test_split`` of
    the points is the test set, as in the peer. States in daml's TwoBody order (module docstring).
    Generating the full 1000 orbits takes tens of seconds (one ``solve_ivp`` per orbit, as the peer).

    Returns
    -------
    MechanicsData
        ``x`` ``(40000, 8)``, ``test_x`` ``(10000, 8)``, ``trajectories`` ``(1000, 50, 8)`` with the defaults;
        ``system`` is ``TwoBody(m1=1, m2=1, gravity=1)``.

    Examples
    --------
    >>> d = greydanus_two_body(seed=0, trials=4, timesteps=10)
    >>> tuple(d.x.shape), tuple(d.test_x.shape)
    ((32, 8), (8, 8))
    """
    from scipy.integrate import solve_ivp

    seed = _check_seed(seed)
    trials = check_int(trials, "trials", 1)
    timesteps = check_int(timesteps, "timesteps", 2)
    t_end = check_real(t_end, "t_end", positive=True)
    orbit_noise = _check_nonneg(orbit_noise, "orbit_noise")
    r_lo, r_hi = _check_range(radius, "radius")
    if r_lo <= 0:
        raise InputError("radius", "a pair with 0 < low < high", repr(radius))
    test_split = _check_fraction(test_split, "test_split")
    check_fits("trials", 256.0 * trials, what=f"trials={trials}")
    check_fits("timesteps", 256.0 * trials * timesteps, what=f"timesteps={timesteps}")
    dt = _device.resolve_dtype(dtype)
    t_eval = np.linspace(0.0, t_end, timesteps)
    from .mechanics import TwoBody

    system = TwoBody(m1=1.0, m2=1.0, gravity=1.0)
    rs = np.random.RandomState(seed)
    orbits, derivs = [], []
    for _ in range(trials):
        y0 = _two_body_start(rs, orbit_noise, r_lo, r_hi)
        sol = solve_ivp(lambda _t, y: _two_body_field(y), (0.0, t_end), y0, t_eval=t_eval, rtol=1e-9)
        if sol.status != 0 or sol.y.shape[1] != timesteps:  # pragma: no cover
            raise DivergenceError(f"solve_ivp failed on a two-body orbit: {sol.message}")
        states = sol.y.T.copy()
        orbits.append(states)
        derivs.append(_labels(system, states))
    x, dx = np.concatenate(orbits), np.concatenate(derivs)
    split = int(len(x) * test_split)

    def tt(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dt)

    config = {"protocol": "greydanus_two_body", "source": "greydanus/hamiltonian-nn:experiment-2body/data.py",
              "seed": seed, "trials": trials, "timesteps": timesteps, "t_end": t_end, "orbit_noise": orbit_noise,
              "radius": (r_lo, r_hi), "test_split": test_split, "solver": "scipy solve_ivp RK45, rtol=1e-9",
              "order": "daml TwoBody (x1, y1, x2, y2, p1x, p1y, p2x, p2y)", "split_index": split,
              "test_first": True}
    return MechanicsData(tt(x[split:]), tt(dx[split:]), tt(x[:split]), tt(dx[:split]), tt(t_eval),
                         tt(np.stack(orbits)), system, config)


# ----------------------------------------------------------------------------------------------------------
# the energy-MSE evaluation


def greydanus_initial_states(trials: int = 15, seed: int = 0, *, dim: int = 1) -> np.ndarray:
    """The notebooks' test initial states.

    For ``dim = 1`` (spring, pendulum): ``x0 = u + 0.2 sign(u)``, ``u ~ U(-0.8, 0.8)^2``, drawn from
    ``RandomState(seed)`` one trial after the other. For ``dim = 4`` (two bodies): the training set's
    orbit sampler (``orbit_noise=0.05``, radius ``U(0.5, 1.5)``), in daml's TwoBody order.

    Returns
    -------
    ndarray ``(trials, 2 dim)``

    Examples
    --------
    >>> x0 = greydanus_initial_states(15, seed=0)
    >>> x0.shape, bool((abs(x0) >= 0.2).all() and (abs(x0) <= 1.0).all())
    ((15, 2), True)
    """
    trials = check_int(trials, "trials", 1)
    seed = _check_seed(seed)
    check_fits("trials", 64.0 * trials, what=f"trials={trials}")
    rs = np.random.RandomState(seed)
    if dim == 1:
        out = []
        for _ in range(trials):
            u = rs.rand(2) * 1.6 - 0.8
            out.append(u + 0.2 * np.sign(u) * np.ones_like(u))
        return np.stack(out)
    if dim == 4:
        return np.stack([_two_body_start(rs, 0.05, 0.5, 1.5) for _ in range(trials)])
    raise InputError("dim", "1 (spring, pendulum) or 4 (two bodies)", repr(dim))


def bootstrap_spread(values: Any, splits: int = 5) -> float:
    """The notebooks' "bootstrap" spread: ``std(means of splits consecutive groups) / sqrt(splits)``.

    Parameters
    ----------
    values : array-like ``(n,)``
        Per-trial scores; ``n`` must be a multiple of ``splits``.
    splits : int
        Number of groups (5 in the notebooks).

    Examples
    --------
    >>> round(bootstrap_spread([1.0, 1.0, 3.0, 3.0], splits=2), 6)
    0.707107
    """
    splits = check_int(splits, "splits", 1)
    v = _device.to_numpy(_device.as_tensor(values, "values", dtype=torch.float64)).reshape(-1)
    if v.size == 0 or v.size % splits:
        raise ShapeError("values", f"a length that is a positive multiple of splits={splits}", f"length {v.size}")
    if not np.isfinite(v).all():
        raise NonFiniteError("values", "finite scores", "NaN or infinite entries")
    means = [float(np.mean(g)) for g in np.split(v, splits)]
    return float(np.std(means) / math.sqrt(splits))


def system_field(system: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The time derivative of a partitioned system as a function of the concatenated state.

    ``system_field(system)(x)`` with ``x`` of shape ``(..., 2d)`` is ``concat(system.dq(q, p),
    system.dp(q, p))``: the field the data labels are made of, and the "model" that scores zero in
    :func:`energy_mse`.

    Examples
    --------
    >>> from daml.models.mechanics import MassSpring
    >>> f = system_field(MassSpring(mass=0.5, stiffness=2.0))
    >>> f(torch.tensor([[1.0, 0.0]], dtype=torch.float64)).tolist()
    [[0.0, -2.0]]
    """
    if not (hasattr(system, "dq") and hasattr(system, "dp") and hasattr(system, "dim")):
        raise InputError("system", "a partitioned system with dim, dq(q, p) and dp(q, p)", type(system).__name__)
    d = int(system.dim)

    def field(x: torch.Tensor) -> torch.Tensor:
        q, p = x[..., :d], x[..., d:]
        return torch.cat([system.dq(q, p), system.dp(q, p)], dim=-1)

    return field


def _field_dtype(field_fn: Any, dtype: Any) -> torch.dtype:
    if dtype is not None:
        return _device.resolve_dtype(dtype)
    if isinstance(field_fn, torch.nn.Module):
        for p in field_fn.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float64


def _numpy_field(field_fn: Callable, dim2: int, dtype: torch.dtype, name: str) -> Callable:
    def f(_t: float, y: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(y, dtype=dtype).reshape(1, dim2)
        with torch.no_grad():
            out = field_fn(x)
        if not isinstance(out, torch.Tensor) or out.shape[-1] != dim2:
            raise ShapeError(name, f"a function returning a tensor (..., {dim2})",
                             type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape))
        return out.detach().to(torch.float64).reshape(dim2).cpu().numpy()

    return f


def _energy_np(system: Any, states: np.ndarray, energy: Callable | None = None) -> np.ndarray:
    d = int(system.dim)
    s = torch.as_tensor(states, dtype=torch.float64)
    with torch.no_grad():
        e = system.hamiltonian(s[..., :d], s[..., d:]) if energy is None else energy(s)
    if not isinstance(e, torch.Tensor) or tuple(e.shape) != tuple(s.shape[:-1]):
        raise ShapeError("energy", f"a function returning a tensor of shape {tuple(s.shape[:-1])}",
                         tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__)
    return e.detach().cpu().numpy().astype(np.float64)


def energy_mse(field_fn: Callable[[torch.Tensor], torch.Tensor], system: Any, *, trials: int = 15,
               splits: int = 5, t_end: float | None = None, points: int | None = None,
               noise_std: float | None = None, rtol: float = 1e-12, seed: int = 0, x0: Any = None,
               dtype: Any = None, compound_stretch: bool = False,
               energy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EnergyMSE:
    """Energy MSE of a learned vector field against the true system, as greydanus' notebooks score it.

    For each trial the true field (``system``) and ``field_fn`` are integrated from the same initial
    state with ``scipy.integrate.solve_ivp`` (RK45, ``rtol``, default ``atol``); the model's span and
    evaluation times are multiplied by ``stretch = 1 + 0.9 noise_std``; the score is the mean over the
    ``points`` evaluation points of the squared difference of the true energy ``system.hamiltonian`` along
    the two trajectories. See the module docstring for the protocol and its two recorded quirks.

    Parameters
    ----------
    field_fn : callable
        Maps a tensor ``(1, 2d)`` to its time derivative ``(1, 2d)`` (a network's ``forward``, or
        :func:`system_field`). It is called under ``torch.no_grad()``.
    system : partitioned system
        The true system (``dim``, ``dq``, ``dp``, ``hamiltonian``), e.g. ``MassSpring(0.5, 2.0)``.
    trials, splits : int
        Number of initial states (15) and of groups of the spread (5); ``trials`` must be a multiple of
        ``splits``.
    t_end, points, noise_std : optional
        Horizon, evaluation points and the training noise of the stretch. Defaults: 20, 100, 0.1 for
        one-degree-of-freedom systems (the spring and pendulum notebooks); 25, 500, 0.0 for the two-body
        system (``analyze-2body``, whose data have no noise).
    rtol : float
        Relative tolerance of both integrations (1e-12).
    seed : int
        Seed of :func:`greydanus_initial_states` (ignored when ``x0`` is given).
    x0 : array-like ``(trials, 2d)``, optional
        Initial states to use instead.
    dtype : optional
        Dtype ``field_fn`` is called in (default: its parameters' dtype for a module, else float64).
    compound_stretch : bool
        Reproduce the notebooks' in-place mutation: trial ``i`` runs to ``t_end * stretch**i`` (true) and
        ``t_end * stretch**(i + 1)`` (model).
    energy : callable, optional
        The energy to compare, a function of float64 states ``(..., 2d)`` returning ``(...)``; default
        ``system.hamiltonian``. The spring notebook's ``energy_loss`` is ``(x**2).sum(-1)`` (``q^2 + p^2``,
        the spring's ``H``); ``energy=lambda x: (x**2).sum(-1)`` scores the pendulum that way (see
        docs/physics.md: it reproduces the README's pendulum numbers).

    Returns
    -------
    EnergyMSE

    Raises
    ------
    InputError, ShapeError, NonFiniteError, SeedError
        Naming the argument.

    Warns
    -----
    RuntimeWarning
        When ``solve_ivp`` stops early on a model trajectory (a field that blows up); such trials count
        in ``failed`` and keep their last state.

    Examples
    --------
    >>> from daml.models.mechanics import MassSpring
    >>> spring = MassSpring(mass=0.5, stiffness=2.0)
    >>> r = energy_mse(system_field(spring), spring, trials=5, splits=5, noise_std=0.0, points=20)
    >>> r.mse < 1e-10
    True
    """
    from scipy.integrate import solve_ivp

    if not callable(field_fn):
        raise InputError("field_fn", "a callable mapping a state tensor (..., 2d) to its time derivative",
                         type(field_fn).__name__)
    if not all(hasattr(system, a) for a in ("dim", "dq", "dp", "hamiltonian")):
        raise InputError("system", "a true system with dim, dq, dp and hamiltonian (daml.models.mechanics)",
                         type(system).__name__)
    d = int(system.dim)
    two = 2 * d
    trials = check_int(trials, "trials", 1)
    splits = check_int(splits, "splits", 1)
    if trials % splits:
        raise InputError("trials", f"a multiple of splits={splits}", trials)
    body = d == 4
    t_end = (25.0 if body else 20.0) if t_end is None else check_real(t_end, "t_end", positive=True)
    points = (500 if body else 100) if points is None else check_int(points, "points", 2)
    noise_std = (0.0 if body else 0.1) if noise_std is None else _check_nonneg(noise_std, "noise_std")
    rtol = check_real(rtol, "rtol", positive=True)
    check_fits("trials", 64.0 * trials * two, what=f"trials={trials}")
    check_fits("points", 64.0 * trials * points * two, what=f"points={points}")
    if not isinstance(compound_stretch, bool):
        raise InputError("compound_stretch", "True or False", repr(compound_stretch))
    if energy is not None and not callable(energy):
        raise InputError("energy", "None or a callable of states (..., 2d)", type(energy).__name__)
    if x0 is None:
        if d not in (1, 4):
            raise InputError("x0", f"initial states (trials, {two}) for a system of dim {d} (the notebooks "
                                   "sample only dim 1 and the two-body problem)", None)
        starts = greydanus_initial_states(trials, seed, dim=d)
    else:
        starts = _device.to_numpy(_device.as_tensor(x0, "x0", dtype=torch.float64))
        if starts.shape != (trials, two):
            raise ShapeError("x0", f"shape ({trials}, {two})", tuple(starts.shape))
        if not np.isfinite(starts).all():
            raise NonFiniteError("x0", "finite initial states", "NaN or infinite entries")
    fdt = _field_dtype(field_fn, dtype)
    true_f = _numpy_field(system_field(system), two, torch.float64, "system")
    model_f = _numpy_field(field_fn, two, fdt, "field_fn")
    stretch = 1.0 + 0.9 * noise_std
    per, ts, trues, models, e_t, e_m = [], [], [], [], [], []
    failed = 0
    horizon = t_end
    for i in range(trials):
        t_eval = np.linspace(0.0, horizon, points)
        tr = solve_ivp(true_f, (0.0, horizon), starts[i], t_eval=t_eval, rtol=rtol)
        if tr.status != 0 or tr.y.shape[1] != points:
            raise DivergenceError(f"solve_ivp failed on the true system from x0[{i}]: {tr.message}")
        m_span = horizon * stretch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow inside a diverging field
            md = solve_ivp(model_f, (0.0, m_span), starts[i], t_eval=t_eval * stretch, rtol=rtol)
        ys = md.y.T
        if ys.shape[0] != points or md.status != 0 or not np.isfinite(ys).all():
            failed += 1
            warnings.warn(f"energy_mse: the model trajectory from x0[{i}] stopped early ({md.message}); its "
                          "remaining points keep the last finite state", RuntimeWarning, stacklevel=2)
            good = ys[np.isfinite(ys).all(axis=1)] if ys.size else np.empty((0, two))
            last = good[-1] if len(good) else starts[i]
            ys = np.concatenate([good, np.repeat(last[None], points - len(good), axis=0)])[:points]
        et, em = _energy_np(system, tr.y.T, energy), _energy_np(system, ys, energy)
        per.append(float(np.mean((et - em) ** 2)))
        ts.append(t_eval), trues.append(tr.y.T), models.append(ys), e_t.append(et), e_m.append(em)
        if compound_stretch:
            horizon *= stretch
    per_a = np.asarray(per)
    if not np.isfinite(per_a).all():
        raise NonFiniteError("field_fn", "a field whose trajectories have finite energy", "a non-finite energy MSE")
    return EnergyMSE(float(per_a.mean()), bootstrap_spread(per_a, splits), per_a, starts, np.stack(ts),
                     np.stack(trues), np.stack(models), np.stack(e_t), np.stack(e_m), stretch, failed)


# ----------------------------------------------------------------------------------------------------------
# Cranmer: double pendulum


def _check_dbl_state(x: Any) -> torch.Tensor:
    x = _device.as_tensor(x, "x")
    if x.ndim < 1 or x.shape[-1] != 4:
        raise ShapeError("x", "shape (..., 4): (theta1, theta2, omega1, omega2)", tuple(x.shape))
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("x", "finite states", f"{int((~torch.isfinite(x)).sum())} NaN or infinite entries")
    return x


def _dbl_system() -> Any:
    """Cranmer's double pendulum as a daml system (``m = l = 1``, ``g = 9.8``)."""
    from .mechanics import DoublePendulum

    return DoublePendulum(m1=1.0, m2=1.0, l1=1.0, l2=1.0, gravity=_G_DBL)


def double_pendulum_acceleration(x: torch.Tensor) -> torch.Tensor:
    """Analytic angular accelerations of Cranmer's double pendulum (``m = l = 1``, ``g = 9.8``).

    The closed form of ``experiment_dblpend/physics.py`` (``analytical_fn``): that of
    :meth:`daml.models.mechanics.DoublePendulum.acceleration` with the peer's parameters.

    Parameters
    ----------
    x : Tensor ``(..., 4)``
        ``(theta1, theta2, omega1, omega2)``.

    Returns
    -------
    Tensor ``(..., 2)``

    Examples
    --------
    >>> x = torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    >>> bool(double_pendulum_acceleration(x)[0] < 0)   # gravity pulls the first arm back
    True
    """
    x = _check_dbl_state(x)
    return _dbl_system().acceleration(x[..., :2], x[..., 2:])


def double_pendulum_energy(x: Any) -> torch.Tensor:
    """Total energy ``T + V`` of Cranmer's double pendulum in ``(theta, omega)`` coordinates.

    ``T = w1^2 / 2 + (w1^2 + w2^2 + 2 w1 w2 cos(t1 - t2)) / 2``, ``V = -2 g cos t1 - g cos t2``
    (``m = l = 1``, ``g = 9.8``; ``experiment_dblpend/physics.py``): the Hamiltonian of
    :class:`daml.models.mechanics.DoublePendulum` at the momenta ``p = M(q) omega``.

    Examples
    --------
    >>> round(float(double_pendulum_energy(torch.zeros(4, dtype=torch.float64))), 6)
    -29.4
    """
    x = _check_dbl_state(x)
    q, v = x[..., :2], x[..., 2:]
    system = _dbl_system()
    return system.hamiltonian(q, system.momentum(q, v))


def cranmer_double_pendulum(n: int, *, seed: Any = None, omega_max: float = 10.0,
                            dtype: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of Cranmer's double-pendulum training data.

    States ``theta ~ U(0, 2 pi)^2``, ``omega ~ U(-omega_max, omega_max)^2`` (10 in the paper's notebook)
    and their time derivatives ``(omega, analytic acceleration)``.

    Parameters
    ----------
    n : int
        Batch size (512 in the paper).
    seed : int, SeedSequence, torch.Generator or None
        Randomness (a generator is advanced, so successive calls give fresh batches, as the paper's
        fresh-states-every-epoch training).
    omega_max : float
        Bound of the angular velocities.
    dtype : optional
        Float64 by default.

    Returns
    -------
    x : Tensor ``(n, 4)``
        ``(theta1, theta2, omega1, omega2)``.
    dxdt : Tensor ``(n, 4)``
        ``(omega1, omega2, alpha1, alpha2)``.

    Examples
    --------
    >>> x, dxdt = cranmer_double_pendulum(8, seed=0)
    >>> tuple(x.shape), bool(torch.equal(dxdt[:, :2], x[:, 2:]))
    ((8, 4), True)
    """
    n = check_int(n, "n", 1)
    omega_max = check_real(omega_max, "omega_max", positive=True)
    check_fits("n", 128.0 * n, what=f"n={n}")
    dt = _device.resolve_dtype(dtype)
    g = _device.generator(seed)
    u = torch.rand(n, 4, generator=g, dtype=torch.float64)
    theta = u[:, :2] * (2.0 * math.pi)
    omega = (u[:, 2:] * 2.0 - 1.0) * omega_max
    x = torch.cat([theta, omega], dim=-1)
    dxdt = torch.cat([omega, double_pendulum_acceleration(x)], dim=-1)
    return x.to(dt), dxdt.to(dt)


def cranmer_initial_states(starts: int = 40, seed: Any = 0, *, omega_max: float = 0.1) -> np.ndarray:
    """Cranmer's evaluation starts: ``theta ~ U(0, 2 pi)^2``, ``omega ~ U(0, omega_max)^2`` (float64).

    Examples
    --------
    >>> cranmer_initial_states(40, seed=0).shape
    (40, 4)
    """
    starts = check_int(starts, "starts", 1)
    omega_max = check_real(omega_max, "omega_max", positive=True)
    check_fits("starts", 64.0 * starts, what=f"starts={starts}")
    g = _device.generator(seed)
    u = torch.rand(starts, 4, generator=g, dtype=torch.float64)
    return torch.cat([u[:, :2] * (2.0 * math.pi), u[:, 2:] * omega_max], dim=-1).numpy()


def _rk4_batched(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, dt: float, steps: int,
                 every: int, limit: float = 1e6) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-step RK4 of all rows at once; a row whose state (or a stage's argument) turns non-finite or
    exceeds ``limit`` in magnitude is frozen at its last good state and marked diverged (the others go on;
    the field is never called on a non-finite state)."""
    x = x0.clone()
    alive = torch.ones(x.shape[0], dtype=torch.bool)
    out = [x.clone()]

    def sane(y: torch.Tensor, base: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        off = ~torch.isfinite(y).all(-1) | (y.abs().amax(-1) >= limit)
        bad |= off
        return torch.where(off[:, None], base, y)

    for k in range(1, steps + 1):
        idx = alive.nonzero().squeeze(1)
        if idx.numel():
            xa = x[idx]
            bad = torch.zeros(xa.shape[0], dtype=torch.bool)
            k1 = f(xa)
            k2 = f(sane(xa + 0.5 * dt * k1, xa, bad))
            k3 = f(sane(xa + 0.5 * dt * k2, xa, bad))
            k4 = f(sane(xa + dt * k3, xa, bad))
            new = sane(xa + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4), xa, bad)
            ok = ~bad
            x[idx[ok]] = new[ok]
            alive[idx[bad]] = False
        if k % every == 0:
            out.append(x.clone())
    return torch.stack(out, dim=1), ~alive


def cranmer_energy_error(field_fn: Callable[[torch.Tensor], torch.Tensor], *, starts: int = 40,
                         t_end: float = 100.0, fps: int = 10, seed: Any = 0, x0: Any = None,
                         dt: float = 0.01, dtype: Any = None) -> EnergyError:
    """Cranmer's double-pendulum energy error of a learned field.

    From each start the true system is integrated by ``solve_ivp`` (DOP853, ``rtol = atol = 1e-10``, as
    the peer's ``odeint`` tolerances) and the model, batched over the starts, by fixed-step RK4 of step
    ``dt`` (the peer uses JAX's adaptive ``odeint``; a fixed step keeps a network's evaluation affordable
    on a CPU and is accurate to ``O(dt^4)``). The error of a start is
    ``|E(model, t_end) - E(true, t_end)| / 29.4``.

    Parameters
    ----------
    field_fn : callable
        Maps ``(starts, 4)`` states ``(theta, omega)`` to their time derivatives ``(omega, alpha)``
        (a :class:`~daml.models.hamiltonian.LagrangianNet`'s ``forward``); called under ``no_grad``
        (daml's networks take their inner derivatives with ``torch.func``, which works there).
    starts, t_end, fps
        40 starts, horizon 100, 10 recorded frames per unit time in the paper.
    seed : optional
        Seed of :func:`cranmer_initial_states` (ignored when ``x0`` is given).
    x0 : array-like ``(starts, 4)``, optional
        Initial states.
    dt : float
        Model step; ``t_end / dt`` must be a whole number of frames' steps.
    dtype : optional
        Dtype ``field_fn`` is called in (default: its parameters' for a module, else float64).

    Returns
    -------
    EnergyError

    Warns
    -----
    RuntimeWarning
        When model trajectories diverge (counted in ``diverged``). Errors raised by ``field_fn`` itself
        (a :class:`~daml.models.hamiltonian.LagrangianNet` refusing a singular Hessian) propagate: switch
        its ``checks`` off to score a network whose trajectories may blow up.

    Examples
    --------
    >>> true = lambda x: torch.cat([x[..., 2:], double_pendulum_acceleration(x)], -1)
    >>> r = cranmer_energy_error(true, starts=4, t_end=1.0, dt=0.001)
    >>> r.mean < 1e-8
    True
    """
    from scipy.integrate import solve_ivp

    if not callable(field_fn):
        raise InputError("field_fn", "a callable mapping (starts, 4) states to their time derivatives",
                         type(field_fn).__name__)
    starts = check_int(starts, "starts", 1)
    t_end = check_real(t_end, "t_end", positive=True)
    fps = check_int(fps, "fps", 1)
    dt = check_real(dt, "dt", positive=True)
    steps_f = t_end / dt
    steps = int(round(steps_f))
    frames = int(round(t_end * fps))
    check_fits("starts", 64.0 * starts, what=f"starts={starts}")
    check_fits("fps", 64.0 * starts * t_end * fps, what=f"fps={fps}")
    if steps < 1 or abs(steps - steps_f) > 1e-9 * max(1.0, steps_f) or frames < 1 or steps % frames:
        raise InputError("dt", f"a step dividing t_end / frames = {t_end} / {frames}", dt)
    if x0 is None:
        start = cranmer_initial_states(starts, seed)
    else:
        start = _device.to_numpy(_device.as_tensor(x0, "x0", dtype=torch.float64))
        if start.shape != (starts, 4):
            raise ShapeError("x0", f"shape ({starts}, 4)", tuple(start.shape))
        if not np.isfinite(start).all():
            raise NonFiniteError("x0", "finite initial states", "NaN or infinite entries")
    t = np.linspace(0.0, t_end, frames + 1)

    def true_rhs(_t: float, y: np.ndarray) -> np.ndarray:
        s = torch.as_tensor(y, dtype=torch.float64)
        return torch.cat([s[2:], double_pendulum_acceleration(s)]).numpy()

    true_e = []
    for i in range(starts):
        sol = solve_ivp(true_rhs, (0.0, t_end), start[i], t_eval=t, method="DOP853", rtol=1e-10, atol=1e-10)
        if sol.status != 0:  # pragma: no cover
            raise DivergenceError(f"solve_ivp failed on the true double pendulum from x0[{i}]: {sol.message}")
        true_e.append(double_pendulum_energy(torch.as_tensor(sol.y.T)).numpy())
    fdt = _field_dtype(field_fn, dtype)
    xs = torch.as_tensor(start, dtype=fdt)

    def f(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = field_fn(x)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
            raise ShapeError("field_fn", f"a function returning a tensor of shape {tuple(x.shape)}",
                             tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__)
        return out.detach()

    traj, diverged = _rk4_batched(f, xs, dt, steps, steps // frames)
    model_e = double_pendulum_energy(traj.to(torch.float64)).numpy()           # (starts, frames + 1)
    te = np.stack(true_e)
    err = np.abs(model_e[:, -1] - te[:, -1]) / DOUBLE_PENDULUM_MAX_POTENTIAL
    bad = diverged.numpy() | ~np.isfinite(err)
    err = np.where(bad, np.inf, err)
    n_bad = int(bad.sum())
    if n_bad:
        warnings.warn(f"cranmer_energy_error: {n_bad} of {starts} model trajectories diverged (non-finite or "
                      "|state| > 1e6); their error is inf and the mean is over the others", RuntimeWarning,
                      stacklevel=2)
    mean = float(err[~bad].mean()) if n_bad < starts else math.inf
    return EnergyError(mean, err, start, t, te, model_e, n_bad)
