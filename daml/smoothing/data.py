r"""The data of the hybrid-inference experiments (Garcia Satorras, Akata and Welling 2019), regenerated.

Two synthetic problems, drawn with the same generators, seeds and draw order as the authors' code
(``vgsatorras/hybrid-inference``, MIT), so that the numbers in the paper can be checked here.

**Linear motion with drag** (:func:`drag_data`, :func:`drag_models`). Per axis the state is
position, velocity and acceleration ``(p, v, a)``, stored per axis ``(p_x, v_x, a_x, p_y, v_y, a_y)``.
The truth moves with the second-order Taylor map of ``p' = v, v' = a - c v, a' = -tau v`` over
``T = 1`` (``c = 0.06``, ``tau = 0.17``),

.. math::

    x_k = F x_{k-1} + w_k, \quad F = I + A T + (A T)^2 / 2, \quad
    w_k \sim N(0, 0.1^2\,\mathrm{diag}(T/3, T, 3T)) \text{ per axis},

from ``x_0 = (0, 0.1, 0, 0, 0.1, 0)`` (held in float32 by the reference, so 0.1 is
``0.10000000149...``; kept so here), and the positions are observed with noise ``N(0, 0.5^2 I)``. The
first returned time is one step after ``x_0``. Randomness: numpy's legacy ``RandomState(seed)``,
``multivariate_normal`` (its SVD square root), the motion noise of a step drawn before the
measurement noise of that step. The reference uses seed 0 for the 10 000 test steps, seeds 50 (train)
and 51 (validation) after 1000 burn-in steps.

**Lorenz-63** (:func:`lorenz_data`): the deterministic Lorenz system (10, 28, 8/3) from ``(1, 1, 1)``,
sampled every ``sample_dt`` (the first sample is ``(1, 1, 1)`` itself), observed as
``y = x + N(0, 0.5^2 I)`` with ``RandomState(seed).multivariate_normal`` (seed 0 in the reference).
The reference integrates with ``odeint`` on a grid of ``1e-5`` and keeps every
``int(sample_dt / 1e-5)``-th point; in floating point ``int(0.01 / 1e-5) = 999``, so its
"``sample_dt = 0.01``" samples are ``0.00999`` apart (``0.05`` gives 5000 exactly).
``spacing="reference"`` (default) reproduces that spacing, ``spacing="exact"`` uses ``sample_dt``.
The truth here comes from SciPy's DOP853 at ``rtol`` (default ``1e-12``); on a chaotic attractor two
accurate integrators part after a few tens of time units, so beyond ``t ~ 30`` the truth is a
different (equally valid) trajectory from the reference's pickled one.

Splits, as the reference: :func:`lorenz_splits` (test = the first 4000 samples, then validation,
then training) and :func:`chunks` (sequences of 1000 steps).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from .. import _device
from ..errors import InputError, ShapeError, check_int, check_real
from ..models import LinearDrag, LinearModel, observe_indices
from ..models.observations import Observation

__all__ = ["DragData", "DragModels", "LorenzData", "Splits", "drag_data", "drag_models", "lorenz_data",
           "lorenz_splits", "chunks", "DRAG_X0"]

DRAG, TAU, DRAG_DT = 0.06, 0.17, 1.0
DRAG_Q_AXIS = 0.1 ** 2 * np.array([DRAG_DT / 3.0, DRAG_DT, 3.0 * DRAG_DT])
DRAG_R = 0.5 ** 2
DRAG_X0 = np.array([0.0, 0.1, 0.0, 0.0, 0.1, 0.0], dtype=np.float32).astype(np.float64)
LORENZ_X0 = (1.0, 1.0, 1.0)
REFERENCE_FINE_DT = 1e-5


class DragData(NamedTuple):
    """:func:`drag_data`: ``x`` the truth ``(steps, 6)`` per axis ``(p, v, a)``, ``y`` the observed
    positions ``(steps, 2)`` (numpy float64)."""

    x: np.ndarray
    y: np.ndarray


class DragModels(NamedTuple):
    """:func:`drag_models`: the true 6-state model and its position operator, and the mis-specified
    constant-velocity 4-state model ``(p_x, v_x, p_y, v_y)`` and its position operator."""

    truth: LinearDrag
    truth_operator: Observation
    constant_velocity: LinearModel
    constant_velocity_operator: Observation


class LorenzData(NamedTuple):
    """:func:`lorenz_data`: times ``t`` ``(samples,)``, truth ``x`` and observations ``y``
    ``(samples, 3)`` (numpy float64)."""

    t: np.ndarray
    x: np.ndarray
    y: np.ndarray


class Splits(NamedTuple):
    """:func:`lorenz_splits`: slices of the time axis."""

    test: slice
    val: slice
    train: slice


def _seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 32:
        from ..errors import SeedError
        raise SeedError("seed", "an int in [0, 2**32) (numpy's legacy RandomState, as the reference)", repr(seed))
    return int(seed)


def _mvn_root(cov: np.ndarray) -> np.ndarray:
    """The factor numpy's legacy ``multivariate_normal`` multiplies standard normals by (rows)."""
    _, s, vh = np.linalg.svd(cov)
    return np.sqrt(s)[:, None] * vh


def drag_models(sigma: float = 0.4, *, observation_sd: float = 0.5) -> DragModels:
    """The models of the linear-with-drag experiment.

    Parameters
    ----------
    sigma : float
        Standard deviation of the constant-velocity model's noise: ``Q = sigma^2 I_2`` per axis (the
        reference's grid is ``linspace(0.325, 0.5, 8)``; its hybrid uses 0.4).
    observation_sd : float
        ``lambda``: the position noise sd of both operators (0.5 in the reference).

    Returns
    -------
    DragModels
        ``truth``: ``LinearDrag(dims=2, drag=0.06, tau=0.17, dt=1, discretisation="taylor2",
        layout="axis", noise_cov=0.1^2 diag(1/3, 1, 3, 1/3, 1, 3))``; ``truth_operator``: positions
        (entries 0 and 3); ``constant_velocity``: a discrete :class:`~daml.models.LinearModel` with
        ``F = [[1, 1], [0, 1]]`` per axis; ``constant_velocity_operator``: entries 0 and 2.

    Raises
    ------
    InputError
        Naming ``sigma`` or ``observation_sd``.
    """
    sigma = check_real(sigma, "sigma", positive=True, expected="a positive noise sd")
    lam = check_real(observation_sd, "observation_sd", positive=True, expected="a positive noise sd")
    truth = LinearDrag(dims=2, drag=DRAG, tau=TAU, dt=DRAG_DT, discretisation="taylor2", layout="axis",
                       noise_cov=np.tile(DRAG_Q_AXIS, 2))
    cv = np.kron(np.eye(2), np.array([[1.0, DRAG_DT], [0.0, 1.0]]))
    constant_velocity = LinearModel(cv, dt=DRAG_DT, noise_cov=sigma ** 2 * DRAG_DT, continuous=False)
    return DragModels(truth, observe_indices(6, [0, 3], sd=lam), constant_velocity,
                      observe_indices(4, [0, 2], sd=lam))


def drag_data(steps: int, *, seed: int, burn_in: int = 0) -> DragData:
    """Truth and observations of the linear-with-drag experiment, as the reference draws them.

    Parameters
    ----------
    steps : int
        Number of times returned (``>= 1``; the reference's test set is 10 000 steps).
    seed : int
        Seed of numpy's legacy ``RandomState`` (the reference: 0 test, 50 train, 51 validation).
    burn_in : int
        Steps simulated and dropped before the first returned one (the reference: 0 test, 1000
        train and validation).

    Returns
    -------
    DragData
        ``x`` ``(steps, 6)``, ``y`` ``(steps, 2)``.

    Raises
    ------
    InputError, SeedError
        Naming ``steps``, ``burn_in`` or ``seed``.

    Examples
    --------
    >>> d = drag_data(5, seed=0)
    >>> d.x.shape, d.y.shape
    ((5, 6), (5, 2))
    """
    steps = check_int(steps, "steps", 1, "an int >= 1 (number of times)")
    burn_in = check_int(burn_in, "burn_in", 0, "an int >= 0 (steps dropped first)")
    seed = _seed(seed)
    total = steps + burn_in
    from ..models.base import check_memory
    check_memory(8 * 16 * total, "burn_in" if burn_in > steps else "steps", f"{total} steps ({burn_in} burn-in)")
    q = np.kron(np.eye(2), np.diag(DRAG_Q_AXIS))
    r = DRAG_R * np.eye(2)
    f = LinearDrag(dims=2, drag=DRAG, tau=TAU, dt=DRAG_DT, discretisation="taylor2",
                   layout="axis").step_matrix.numpy()
    # one stream of standard normals: per step 6 for the motion, then 2 for the measurement
    z = np.random.RandomState(seed).standard_normal((total, 8))
    w = z[:, :6] @ _mvn_root(q)
    v = z[:, 6:] @ _mvn_root(r)
    x = np.empty((total, 6))
    state = DRAG_X0.copy()
    for k in range(total):
        state = f @ state + w[k]
        x[k] = state
    y = x[:, [0, 3]] + v
    return DragData(x[burn_in:], y[burn_in:])


def lorenz_data(samples: int, *, sample_dt: float = 0.01, noise_sd: float = 0.5, seed: int = 0,
                rtol: float = 1e-12, spacing: str = "reference") -> LorenzData:
    """The Lorenz-63 series of the reference: truth from ``(1, 1, 1)`` and noisy full observations.

    Parameters
    ----------
    samples : int
        Number of samples (the reference stores 204 000; test = the first 4000).
    sample_dt : float
        Nominal time between samples (0.01 or 0.05 in the reference).
    noise_sd : float
        Observation noise sd ``lambda`` (0.5).
    seed : int
        Seed of numpy's legacy ``RandomState`` for the observation noise (0).
    rtol : float
        Relative tolerance of SciPy's DOP853 (``atol = 1e-3 rtol``).
    spacing : {"reference", "exact"}
        ``"reference"``: samples ``int(sample_dt / 1e-5) * 1e-5`` apart, as the reference's
        down-sampling of its ``1e-5`` grid gives (0.00999 for 0.01); ``"exact"``: ``sample_dt``.

    Returns
    -------
    LorenzData
        ``t`` ``(samples,)`` from 0, ``x`` and ``y`` ``(samples, 3)``.

    Raises
    ------
    InputError, SeedError
        Naming the argument.

    Examples
    --------
    >>> d = lorenz_data(100)
    >>> d.x[0].tolist(), d.y.shape
    ([1.0, 1.0, 1.0], (100, 3))
    """
    from scipy.integrate import solve_ivp

    samples = check_int(samples, "samples", 1, "an int >= 1 (number of samples)")
    sample_dt = check_real(sample_dt, "sample_dt", positive=True, expected="a positive time between samples")
    noise_sd = check_real(noise_sd, "noise_sd", positive=True, expected="a positive noise sd")
    rtol = check_real(rtol, "rtol", positive=True, expected="a relative tolerance in (0, 1e-3]")
    if rtol > 1e-3:
        raise InputError("rtol", "a relative tolerance in (0, 1e-3]", repr(rtol))
    seed = _seed(seed)
    if not isinstance(spacing, str):
        raise InputError("spacing", "'reference' or 'exact'", repr(spacing))
    if spacing == "reference":
        fine = int(sample_dt / REFERENCE_FINE_DT)
        if fine < 1:
            raise InputError("sample_dt", f"at least the reference's grid step {REFERENCE_FINE_DT} with "
                             "spacing='reference'", repr(sample_dt))
        step = fine * REFERENCE_FINE_DT
    elif spacing == "exact":
        step = sample_dt
    else:
        raise InputError("spacing", "'reference' or 'exact'", repr(spacing))
    from ..models.base import check_memory
    check_memory(8 * 8 * samples, "samples", f"{samples} samples")
    sigma, rho, beta = 10.0, 28.0, 8.0 / 3.0

    def f(_t: float, s: np.ndarray) -> np.ndarray:
        return np.array([sigma * (s[1] - s[0]), s[0] * (rho - s[2]) - s[1], s[0] * s[1] - beta * s[2]])

    t = np.arange(samples) * step
    if samples == 1:
        x = np.array([LORENZ_X0])
    else:
        sol = solve_ivp(f, (0.0, t[-1]), np.array(LORENZ_X0), method="DOP853", t_eval=t, rtol=rtol,
                        atol=1e-3 * rtol)
        if not sol.success:      # pragma: no cover - DOP853 on Lorenz-63 does not fail at these tolerances
            raise InputError("rtol", "a tolerance the integrator can reach", f"{rtol!r} ({sol.message})")
        x = sol.y.T.copy()
        x[0] = LORENZ_X0
    y = x + np.random.RandomState(seed).standard_normal((samples, 3)) @ _mvn_root(noise_sd ** 2 * np.eye(3))
    return LorenzData(t, x, y)


def lorenz_splits(n: int, *, test: int = 4000) -> Splits:
    """The reference's split of one Lorenz series: ``test`` first, then ``n // 2`` validation
    samples, then ``n // 2`` training samples (``n`` is the reference's "number of samples").

    Parameters
    ----------
    n : int
        Training plus validation samples, ``>= 2``.
    test : int
        Test samples at the start (4000; they include the transient from ``(1, 1, 1)``).

    Returns
    -------
    Splits
        Slices of the time axis; ``splits.train.stop`` samples are needed in all.

    Examples
    --------
    >>> lorenz_splits(1000)
    Splits(test=slice(0, 4000, None), val=slice(4000, 4500, None), train=slice(4500, 5000, None))
    """
    n = check_int(n, "n", 2, "an int >= 2 (training plus validation samples)")
    test = check_int(test, "test", 1, "an int >= 1 (test samples)")
    half = n // 2
    return Splits(slice(0, test), slice(test, test + half), slice(test + half, test + 2 * half))


def chunks(a: Any, length: int = 1000, *, tail: str = "pad") -> Any:
    """Cut a series along its first axis into sequences of ``length`` steps, ``(num, length, ...)``.

    The reference keeps a shorter last piece; an array cannot, so ``tail="pad"`` (default) pads it
    with NaN (missing observations to the smoothers, to be left out of errors too) and
    ``tail="drop"`` drops it.

    Parameters
    ----------
    a : numpy array or tensor (T, ...)
        A floating series (``T >= 1``).
    length : int
        Steps per sequence (1000 in the reference).
    tail : {"pad", "drop"}

    Returns
    -------
    numpy array or tensor (num, length, ...), the type of ``a``.

    Raises
    ------
    InputError, ShapeError
        Naming ``a``, ``length`` or ``tail``.

    Examples
    --------
    >>> chunks(np.zeros((2500, 3)), 1000).shape
    (3, 1000, 3)
    """
    length = check_int(length, "length", 1, "an int >= 1 (steps per sequence)")
    if not isinstance(tail, str) or tail not in ("pad", "drop"):
        raise InputError("tail", "'pad' or 'drop'", repr(tail))
    is_torch = isinstance(a, torch.Tensor)
    if not is_torch:
        if not isinstance(a, np.ndarray):
            from ..models.base import as_real_tensor
            a = _device.to_numpy(as_real_tensor(a, "a"))
        if a.dtype.kind not in "f":
            raise InputError("a", "a floating array (NaN pads the last sequence)", f"dtype {a.dtype}")
    elif not a.is_floating_point():
        raise InputError("a", "a floating tensor (NaN pads the last sequence)", f"dtype {a.dtype}")
    if a.ndim < 1 or a.shape[0] == 0:
        raise ShapeError("a", "a series (T, ...) with T >= 1", f"shape {tuple(a.shape)}")
    n_t = a.shape[0]
    num, rest = divmod(n_t, length)
    if tail == "drop":
        if num == 0:
            raise ShapeError("a", f"at least one full sequence of {length} steps (tail='drop')", f"{n_t} steps")
        return a[:num * length].reshape(num, length, *a.shape[1:])
    if rest:
        pad = length - rest
        from ..models.base import check_memory
        itemsize = a.element_size() if is_torch else a.itemsize
        check_memory(itemsize * (num + 1) * length * max(1, int(np.prod(a.shape[1:]))), "length",
                     f"sequences of {length} steps (the last one NaN-padded)")
        if is_torch:
            filler = torch.full((pad, *a.shape[1:]), float("nan"), dtype=a.dtype, device=a.device)
            a = torch.cat([a, filler])
        else:
            a = np.concatenate([a, np.full((pad, *a.shape[1:]), np.nan, dtype=a.dtype)])
        num += 1
    return a.reshape(num, length, *a.shape[1:])
