"""Filters: one protocol (:class:`Filter`), one time loop (:func:`run`), one file per family.

>>> import daml
>>> filt = daml.filters.make_filter("etkf", members=24, inflation=1.02)
>>> result = daml.filters.run(filt, model, data, seed=1)       # result.analysis is a posterior
"""

from .base import (REGISTRY, EnsembleState, Filter, GaussianState, ensemble_forecast, ensemble_init,
                   ensemble_members, gaussian_members, inflate, make_filter, masked_observation, register,
                   Upcoming, gaussian_loglik)
from .run import RunResult, operator_from_data, run
from .summary import summarise, summary_scores
from .climatology import climatology, climatology_from_truth
from . import kalman  # noqa: F401  (the module, for daml.filters.kalman.*)
from .kalman import extended_kalman_filter, kalman_filter, kalman_smoother
from . import enkf as _enkf_module, letkf as _letkf_module  # noqa: F401  (the public names are the constructors)
from .enkf import enkf, etkf
from .letkf import gaspari_cohn, letkf
from . import particle as _particle_module, ewpf as _ewpf_module  # noqa: F401
from .particle import auxiliary, bootstrap, iapf, optimal
from .ewpf import equivalent_weights_step, ewpf, iewpf
from . import etpf as _etpf_module  # noqa: F401
from .etpf import etpf, letpf
from . import dpf as _dpf_module  # noqa: F401
from .dpf import Evidence, dpf, log_evidence
from .proposals import MixtureProposal, Proposal

__all__ = [
    "Filter", "EnsembleState", "GaussianState", "REGISTRY", "register", "make_filter", "inflate",
    "ensemble_init", "ensemble_forecast", "ensemble_members", "gaussian_members", "masked_observation",
    "run", "RunResult", "operator_from_data", "summarise", "summary_scores", "climatology", "climatology_from_truth",
    "kalman_filter", "extended_kalman_filter", "kalman_smoother",
    "enkf", "etkf", "letkf", "gaspari_cohn",
    "bootstrap", "optimal", "auxiliary", "iapf", "ewpf", "iewpf", "equivalent_weights_step", "Upcoming", "gaussian_loglik",
    "etpf", "letpf", "dpf", "log_evidence", "Evidence", "Proposal", "MixtureProposal",
]
