"""Double machine learning (DML) causal hybrids (seed 003: Cohrs et al. 2024).

A hybrid model's physical parameter is estimated as a causal effect: the parameter is the
coefficient of a treatment in a partially linear model, the machine-learned part is a nuisance
learned by cross-fitting, and a Neyman-orthogonal score makes the estimate insensitive to the
nuisances' regularisation at first order. Results are daml posteriors (the ``member`` dimension holds
bootstrap draws or trained networks) with a printable :func:`summary`.

* :mod:`~daml.causal.dml`: :func:`plr` (partialling-out and IV-type scores, repeated and blocked
  sample splits, normal and multiplier-bootstrap intervals), :func:`sample_splits`, :func:`cross_fit`,
  :func:`solve_linear_score`, :func:`multiplier_bootstrap`.
* :mod:`~daml.causal.learners`: :class:`MLPRegressor`, a torch network with the scikit-learn protocol
  whose cross-fitting folds train in one batched pass.
* :mod:`~daml.causal.q10`: :func:`q10` (Q10 of ecosystem respiration with its interval and the fitted
  base respiration) and the end-to-end baseline :func:`q10_end_to_end`.
* :mod:`~daml.causal.partition`: :func:`partition`, NEE into GPP and RECO with the light-use efficiency
  as a heterogeneous effect (R-learner), with bootstrap members.
* :mod:`~daml.causal.site`: :func:`synthetic_site` (half-hourly drivers and fluxes with a known truth),
  :func:`to_fluxnet_csv` and :func:`read_fluxnet_csv` (FLUXNET2015 columns, unit checks).

scikit-learn is required (the ``causal`` extra).
"""

from .dml import (AGGREGATIONS, BOOTSTRAP_WEIGHTS, SCORES, DroppedRowsWarning, aggregate_repetitions, cross_fit,
                  multiplier_bootstrap, plr, sample_splits, solve_linear_score, summary)
from .learners import MLPRegressor
from .partition import DEFAULT_MODIFIERS, default_boosting, default_final, partition
from .q10 import DEFAULT_CONTROLS, LEARNERS, default_learner, q10, q10_end_to_end
from .site import (FLUXNET_REQUIRED, potential_radiation, read_fluxnet_csv, saturation_vapour_pressure,
                   smoothed_potential_radiation, synthetic_site, to_fluxnet_csv)

__all__ = [
    "plr", "summary", "sample_splits", "cross_fit", "solve_linear_score", "multiplier_bootstrap",
    "aggregate_repetitions", "AGGREGATIONS", "SCORES", "BOOTSTRAP_WEIGHTS", "DroppedRowsWarning", "MLPRegressor",
    "q10", "q10_end_to_end", "default_learner", "LEARNERS", "DEFAULT_CONTROLS",
    "partition", "default_boosting", "default_final", "DEFAULT_MODIFIERS",
    "synthetic_site", "to_fluxnet_csv", "read_fluxnet_csv", "potential_radiation", "smoothed_potential_radiation",
    "saturation_vapour_pressure", "FLUXNET_REQUIRED",
]
