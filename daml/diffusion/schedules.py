"""Noise schedules: the forward noising kernel ``p(x^t | x^0) = N(alpha_t x^0, sigma_t^2 I)``.

A schedule is the pair ``(alpha_t, sigma_t^2)`` on pseudo-time ``t in [0, 1]``. It fixes the linear
forward SDE ``dx = f(t) x dt + g(t) dW`` with ``f = d log(alpha_t)/dt`` and
``g^2 = d(sigma_t^2)/dt - 2 f sigma_t^2``, and the log signal-to-noise ratio
``lambda_t = log(alpha_t / sigma_t)`` used by the exponential integrator. All values are plain floats
of a scalar ``t``: every particle of a reverse run shares its pseudo-time.

Three families:

* :class:`VPLinear` (variance preserving, linear in ``t``; EnSF's schedule):
  ``alpha_t = 1 - (1 - eps_alpha) t`` and ``sigma_t^2 = eps_sigma + (1 - eps_sigma) t``.
* :class:`VPCosine` (SDA's cosine schedule): ``alpha_t = cos^2(acos(sqrt(eta)) t)`` and
  ``sigma_t^2 = 1 - alpha_t^2 + eta^2``.
* :class:`VE` (variance exploding, Brownian): ``alpha_t = 1`` and ``sigma_t^2 = s^2 t``.
"""

from __future__ import annotations

import abc
import math
import numbers
from typing import Any

from ..errors import InputError, check_real

__all__ = ["Schedule", "VPLinear", "VPCosine", "VE", "make_schedule", "SCHEDULES"]


class Schedule(abc.ABC):
    """Base class: subclasses define :meth:`alpha`, :meth:`sigma2` and their time derivatives."""

    name = "schedule"

    @abc.abstractmethod
    def alpha(self, t: float) -> float:
        """``alpha_t``."""

    @abc.abstractmethod
    def sigma2(self, t: float) -> float:
        """``sigma_t^2``."""

    @abc.abstractmethod
    def dalpha(self, t: float) -> float:
        """``d alpha_t / dt``."""

    @abc.abstractmethod
    def dsigma2(self, t: float) -> float:
        """``d sigma_t^2 / dt``."""

    def drift(self, t: float) -> float:
        """``f(t) = d log(alpha_t) / dt``."""
        return self.dalpha(t) / self.alpha(t)

    def diffusion2(self, t: float) -> float:
        """``g(t)^2 = d sigma_t^2 / dt - 2 f(t) sigma_t^2`` (non-negative for the schedules here)."""
        return self.dsigma2(t) - 2.0 * self.drift(t) * self.sigma2(t)

    def log_snr(self, t: float) -> float:
        """``lambda_t = log alpha_t - log sigma_t`` (refused where ``sigma_t = 0``: at ``t = 0`` of
        :class:`VE` and of :class:`VPLinear` with ``eps_sigma = 0``)."""
        a, s2 = self.alpha(t), self.sigma2(t)
        if not (a > 0 and s2 > 0):
            raise InputError("t", f"a pseudo-time where alpha_t > 0 and sigma_t^2 > 0 for {self!r}",
                             f"t = {t!r} (alpha_t = {a:g}, sigma_t^2 = {s2:g})")
        return math.log(a) - 0.5 * math.log(s2)

    def config(self) -> dict:
        return {"schedule": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "schedule")
        return f"{type(self).__name__}({args})"


class VPLinear(Schedule):
    """Variance preserving, linear: ``alpha_t = 1 - (1 - eps_alpha) t``, ``sigma_t^2 = eps_sigma +
    (1 - eps_sigma) t``. EnSF's legacy setting is ``(0.05, 0)``, its tuned one ``(0.5, 0.025)``;
    ``eps_sigma > 0`` means the ``t = 0`` marginal is already noised (the target is then the noised
    posterior)."""

    name = "vp-linear"

    def __init__(self, eps_alpha: float = 0.05, eps_sigma: float = 0.0):
        self.eps_alpha = _fraction(eps_alpha, "eps_alpha", open_left=True)
        self.eps_sigma = _fraction(eps_sigma, "eps_sigma", open_left=False)

    def alpha(self, t):
        t = _check_t(t)
        return 1.0 - (1.0 - self.eps_alpha) * t

    def dalpha(self, t):
        t = _check_t(t)
        return -(1.0 - self.eps_alpha)

    def sigma2(self, t):
        t = _check_t(t)
        return self.eps_sigma + (1.0 - self.eps_sigma) * t

    def dsigma2(self, t):
        t = _check_t(t)
        return 1.0 - self.eps_sigma

    def config(self):
        return {"schedule": self.name, "eps_alpha": self.eps_alpha, "eps_sigma": self.eps_sigma}


class VPCosine(Schedule):
    """Cosine: ``alpha_t = cos^2(omega t)`` with ``omega = acos(sqrt(eta))``, so ``alpha_1 = eta``,
    and ``sigma_t^2 = 1 - alpha_t^2 + eta^2`` (SDA uses ``eta = 1e-3``)."""

    name = "vp-cosine"

    def __init__(self, eta: float = 1e-3):
        self.eta = _fraction(eta, "eta", open_left=True)
        self.omega = math.acos(math.sqrt(self.eta))

    def alpha(self, t):
        t = _check_t(t)
        return math.cos(self.omega * t) ** 2

    def dalpha(self, t):
        t = _check_t(t)
        return -2.0 * self.omega * math.cos(self.omega * t) * math.sin(self.omega * t)

    def sigma2(self, t):
        t = _check_t(t)
        return 1.0 - self.alpha(t) ** 2 + self.eta**2

    def dsigma2(self, t):
        t = _check_t(t)
        return -2.0 * self.alpha(t) * self.dalpha(t)

    def config(self):
        return {"schedule": self.name, "eta": self.eta}


class VE(Schedule):
    """Variance exploding (Brownian noising): ``alpha_t = 1``, ``sigma_t^2 = sigma_max^2 t``. Choose
    ``sigma_max`` well above the prior's spread so the terminal law forgets the prior."""

    name = "ve"

    def __init__(self, sigma_max: float = 10.0):
        self.sigma_max = check_real(sigma_max, "sigma_max", positive=True, expected="a positive terminal sd")

    def alpha(self, t):
        t = _check_t(t)
        return 1.0

    def dalpha(self, t):
        t = _check_t(t)
        return 0.0

    def sigma2(self, t):
        t = _check_t(t)
        return self.sigma_max**2 * t

    def dsigma2(self, t):
        t = _check_t(t)
        return self.sigma_max**2

    def config(self):
        return {"schedule": self.name, "sigma_max": self.sigma_max}


SCHEDULES = {"vp-linear": VPLinear, "vp-cosine": VPCosine, "ve": VE}


def make_schedule(schedule: Any) -> Schedule:
    """A :class:`Schedule` from an instance, a name in :data:`SCHEDULES`, or a dict
    ``{"schedule": name, **parameters}`` (the form recorded in configs)."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return SCHEDULES[schedule]()
    if isinstance(schedule, dict) and schedule.get("schedule") in SCHEDULES:
        params = {k: v for k, v in schedule.items() if k != "schedule"}
        try:
            return SCHEDULES[schedule["schedule"]](**params)
        except TypeError as exc:
            raise InputError("schedule", "the schedule's own parameters", sorted(params), hint=str(exc)) from exc
    raise InputError("schedule", f"a Schedule, one of {sorted(SCHEDULES)} or a dict with 'schedule'", repr(schedule))


def _fraction(value: Any, name: str, open_left: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (0.0 < value < 1.0 if open_left else 0.0 <= value < 1.0)
    if not ok:
        raise InputError(name, "a number in (0, 1)" if open_left else "a number in [0, 1)", repr(value))
    return float(value)


def _check_t(t: Any) -> float:
    """A pseudo-time: a real number in ``[0, 1]`` (every schedule method refuses anything else, so a NaN
    or out-of-range ``t`` never turns into a silent NaN or a ``math domain error``)."""
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= t <= 1.0:
        raise InputError("t", "a pseudo-time in [0, 1]", repr(t))
    return float(t)
