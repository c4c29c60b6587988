"""Importance-weighted ensembles of trained neural networks (seed 001).

Training a network from a prior draw is a proposal density, so the members of deep ensembles, bagging
or MC dropout deserve importance weights, not ``1/M``; weighted properly they are degenerate, and data
assimilation fixes that.

* :mod:`~daml.ensembles.training`: :func:`fit` trains ``M`` members of any torch module in one
  vmapped pass, from prior draws, with anchoring and perturbed targets (randomised maximum likelihood).
* :mod:`~daml.ensembles.weights`: :func:`weigh` computes ``log p(D|w)``, ``log p(w)`` and ``log q(w|D)``
  (RML change of variables with Gauss-Newton Jacobians, or a Laplace mixture), with ESS and PSIS k-hat.
* :mod:`~daml.ensembles.correction`: :func:`equal_weight`, resample-move with MALA rejuvenation.
* :mod:`~daml.ensembles.predictive`: :func:`predict` (the Gaussian-mixture predictive with a variance
  decomposition by source), :func:`scores`, :func:`model_error`, :func:`estimate_noise`,
  :func:`loo_variance_scale` and :func:`scale_variance` (a leave-one-out calibration factor for the
  predictive's spread, and its application),
  :func:`uncertainty_sources` (the five sources one at a time).
* :mod:`~daml.ensembles.dynamics`: :func:`fit_dynamics` trains ensembles of learned dynamics (Hamiltonian,
  Lagrangian or plain networks of :mod:`daml.models.hamiltonian`) so that they can be weighted, and
  :class:`EnsembleDynamics` runs the weighted members as one forecast model (a mixture transition).
* :mod:`~daml.ensembles.baselines`: :func:`deep_ensemble` and :func:`mc_dropout` in the same API.
"""

from .baselines import deep_ensemble, mc_dropout
from .correction import CorrectionInfo, equal_weight
from .dynamics import ComponentRegression, EnsembleDynamics, dynamics_data, fit_dynamics
from .predictive import (SOURCES, VARIANCE_PARTS, VarianceScale, estimate_noise, loo_variance_scale,
                         mixture_quantile, model_error, predict, scale_variance, scores, uncertainty_sources)
from .training import LIKELIHOODS, Ensemble, fit, fit_block, fit_threads, flat_params, forward, gather, mlp, prior_sd
from .weights import ESTIMATORS, Fisher, GaussNewton, MemberWeights, fisher, gauss_newton, log_likelihood, log_prior, weigh

__all__ = [
    "Ensemble", "fit", "fit_block", "gather", "fit_threads", "mlp", "forward", "prior_sd", "flat_params", "LIKELIHOODS",
    "weigh", "MemberWeights", "GaussNewton", "gauss_newton", "Fisher", "fisher", "log_likelihood", "log_prior", "ESTIMATORS",
    "equal_weight", "CorrectionInfo",
    "predict", "scores", "mixture_quantile", "model_error", "estimate_noise", "uncertainty_sources",
    "loo_variance_scale", "VarianceScale", "scale_variance",
    "SOURCES", "VARIANCE_PARTS",
    "deep_ensemble", "mc_dropout",
    "fit_dynamics", "dynamics_data", "ComponentRegression", "EnsembleDynamics",
]
