"""Dynamical models and observation operators.

A model is anything with ``state_size``, ``dt``, ``step(x)`` and ``noise_cov`` (the :class:`Model`
protocol of :mod:`daml.models.base`); :class:`ODEModel` turns a tendency ``f(x)`` into RK4 steps.
The models shipped here:

============================= ======================== ==========================================================
class                         name (``MODELS``)        what
============================= ======================== ==========================================================
:class:`Lorenz63`             ``lorenz63``             3-variable chaotic convection (Lorenz 1963)
:class:`Lorenz96`             ``lorenz96``             ``n``-variable chaotic ring (Lorenz 1996)
:class:`Kuramoto`             ``kuramoto``             ``n`` coupled phase oscillators (Kuramoto 1975)
:class:`LinearDrag`           ``linear_drag``          particle with drag (Satorras et al. 2019)
:class:`Identity`             ``identity``             random walk ``x_{k+1} = x_k + noise``
:class:`MixtureTransition`    ``mixture_transition``   learned Gaussian-mixture transition (``file=``: trained)
:class:`LinearModel`                                   any linear map or linear ODE
:class:`Mechanical`           ``mechanical``           a partitioned (q, p) system stepped by a fixed-step
                                                       (symplectic) integrator: a true system of
                                                       :data:`~daml.models.mechanics.SYSTEMS` (``system =
                                                       "pendulum"``) or a learned network (``file=``)
============================= ======================== ==========================================================

Physics priors (:mod:`daml.models.mechanics`, :mod:`daml.models.hamiltonian`,
:mod:`daml.models.mechanics_data`; docs/physics.md): symplectic Euler, Stormer-Verlet and implicit-midpoint
integrators of partitioned systems, the true mass-spring, pendulum, double pendulum and two-body systems,
Hamiltonian, Lagrangian and plain networks of the time derivative with their training, and the published
data protocols of Greydanus et al. (2019) and Cranmer et al. (2020).

:func:`make_model` builds one by name (``make_model("lorenz96", n=40)``), which is how experiment
configuration files name their model; ``make_model(m.name, **m.config())`` rebuilds a model.
Observation operators (:func:`observe_all` and friends) are in :mod:`daml.models.observations`.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import DamlError, InputError
from .base import Model, ODEModel, model_config, periodic_covariance, propagate, rk4_step, tangent_linear
from .kuramoto import Kuramoto
from .linear import Identity, LinearDrag, LinearModel
from .hamiltonian import (DerivativeNet, FitResult, HamiltonianNet, LagrangianNet, fit_derivatives, fit_trajectories,
                          lagrangian_acceleration)
from .lorenz import Lorenz63, Lorenz96
from .mechanics import DoublePendulum, MassSpring, Mechanical, Pendulum, Trajectory, TwoBody, integrate, make_mechanical
from .mixture import GaussianMixtureNet, MixtureParams, MixtureTransition
from .observations import (
    Observation,
    observe_all,
    observe_every,
    observe_indices,
    observe_linear,
    observe_nonlinear,
    observe_transformed,
)

__all__ = [
    "Model",
    "ODEModel",
    "rk4_step",
    "propagate",
    "tangent_linear",
    "model_config",
    "periodic_covariance",
    "Observation",
    "observe_all",
    "observe_every",
    "observe_indices",
    "observe_linear",
    "observe_nonlinear",
    "observe_transformed",
    "Lorenz63",
    "Lorenz96",
    "Kuramoto",
    "LinearDrag",
    "LinearModel",
    "Identity",
    "GaussianMixtureNet",
    "MixtureParams",
    "MixtureTransition",
    "MODELS",
    "make_model",
    "Mechanical",
    "make_mechanical",
    "integrate",
    "Trajectory",
    "MassSpring",
    "Pendulum",
    "DoublePendulum",
    "TwoBody",
    "HamiltonianNet",
    "LagrangianNet",
    "DerivativeNet",
    "lagrangian_acceleration",
    "fit_derivatives",
    "fit_trajectories",
    "FitResult",
]

MODELS: dict[str, type] = {
    "lorenz63": Lorenz63,
    "lorenz96": Lorenz96,
    "kuramoto": Kuramoto,
    "linear_drag": LinearDrag,
    "identity": Identity,
    "mixture_transition": MixtureTransition,
    "mechanical": Mechanical,
}
"""The models that configuration files can name, by their ``name``."""


def make_model(name: str, **params: Any) -> Model:
    """Build the model called ``name`` (a key of :data:`MODELS`) with keyword parameters.

    Parameters
    ----------
    name : str
        One of ``MODELS`` (``"lorenz63"``, ``"lorenz96"``, ``"kuramoto"``, ``"linear_drag"``,
        ``"identity"``).
    **params
        The model's constructor arguments.

    Raises
    ------
    InputError
        For an unknown name (naming ``model`` and listing the choices) or parameters the model does
        not take (naming the model and listing its parameters). The models' own validation errors
        (e.g. ``n`` out of range) pass through unchanged.
    """
    cls = MODELS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InputError("model", f"one of {sorted(MODELS)}", repr(name))
    try:
        if "file" in params and callable(getattr(cls, "from_file", None)):
            return cls.from_file(**params)          # a trained network (daml.io.save_network)
        return cls(**params)
    except DamlError:
        raise
    except TypeError as exc:
        signature = inspect.signature(cls.__init__)
        accepted = [p for p in signature.parameters if p != "self"]
        raise InputError(name, f"parameters among {accepted}", f"{sorted(params)} ({exc})") from exc
