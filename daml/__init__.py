"""daml: Bayesian uncertainty quantification and data assimilation on weighted ensembles."""

from ._version import __version__
from . import errors

__all__ = ["__version__", "errors"]
