"""Smoothing on the chain of a state-space model, and hybrid inference (Garcia Satorras, Akata and
Welling 2019).

* :func:`message_passing`: the MAP of a linear(ised)-Gaussian chain by gradient ascent on the three
  messages each state receives (from the past state, the future state and its observation);
  :func:`taylor_transition` linearises a nonlinear model. See docs/smoothing.md.
* :func:`extended_kalman_smoother` (batched Kalman filter and RTS smoother of a linear or linearised
  chain) and :func:`linearised_covariance` (the Laplace covariance of the chain at any estimate).
* :class:`HybridSmoother` and :func:`fit_hybrid`: message passing plus a graph network's learned
  correction (or the network alone), trained on sequences with known states. See docs/hybrid.md.
* Uncertainty for smoothed estimates (:mod:`daml.smoothing.uncertainty`): Gaussian-mixture
  posteriors, held-out member weights, a validation variance scale, calibration scores.
* The reference's data (:mod:`daml.smoothing.data`): linear motion with drag and Lorenz-63.
"""

from .data import chunks, drag_data, drag_models, lorenz_data, lorenz_splits
from .gaussian import GaussianSmoothed, extended_kalman_smoother, linearised_covariance
from .hybrid import HybridFit, HybridResult, HybridSmoother, fit_hybrid
from .messages import Smoothed, message_passing, taylor_transition
from .uncertainty import (HeldOutWeights, calibration, held_out_weights, hybrid_covariance, hybrid_posterior,
                          mixture_posterior, variance_scale)

__all__ = ["Smoothed", "message_passing", "taylor_transition",
           "GaussianSmoothed", "extended_kalman_smoother", "linearised_covariance",
           "HybridSmoother", "HybridResult", "HybridFit", "fit_hybrid",
           "HeldOutWeights", "calibration", "held_out_weights", "hybrid_covariance", "hybrid_posterior", "mixture_posterior",
           "variance_scale",
           "chunks", "drag_data", "drag_models", "lorenz_data", "lorenz_splits"]
