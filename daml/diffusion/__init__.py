"""Score-based diffusion data assimilation with analytic ensemble scores (no network).

* :mod:`~daml.diffusion.schedules`: noise schedules (VP linear, VP cosine, VE).
* :mod:`~daml.diffusion.scores`: noised Gaussian-mixture prior scores from the ensemble and the
  likelihood forcings (exact Gaussian gain, exact weighted ensemble, the seed's joint-Gaussian
  ensemble forcing, the EnSF likelihood score).
* :mod:`~daml.diffusion.samplers`: reverse SDE, probability-flow ODE, exponential integrator,
  stochastic-interpolant stepping, Langevin corrector.
* :mod:`~daml.diffusion.analysis`: :func:`analysis` and the filters ``diffusion`` and ``ensf``.
"""

from .analysis import ENSF_CLIP, FORCINGS, analysis, diffusion, ensf, ensf_growth, posterior_score
from .samplers import (DIVERGENCE_FACTOR, SAMPLERS, DivergenceBound, check_sampler, divergence_bound, reverse,
                       terminal_sample, time_grid)
from .schedules import SCHEDULES, VE, Schedule, VPCosine, VPLinear, make_schedule
from .scores import (Linearisation, Mixture, ensemble_forcing, exact_forcing, fitted_mixture, gaussian_mixture,
                     gaussian_prior,
                     kernel_mixture, likelihood_score, linearise, local_mixture, mixture_score)

__all__ = [
    "analysis", "posterior_score", "diffusion", "ensf", "ensf_growth", "ENSF_CLIP", "FORCINGS",
    "SAMPLERS", "check_sampler", "reverse", "terminal_sample", "time_grid",
    "DivergenceBound", "divergence_bound", "DIVERGENCE_FACTOR",
    "SCHEDULES", "Schedule", "VPLinear", "VPCosine", "VE", "make_schedule",
    "Mixture", "kernel_mixture", "local_mixture", "fitted_mixture", "gaussian_prior", "gaussian_mixture", "mixture_score",
    "Linearisation", "linearise", "exact_forcing", "ensemble_forcing", "likelihood_score",
]
