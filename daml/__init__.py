"""daml: Bayesian uncertainty quantification and data assimilation on weighted ensembles.

The public API is small: build or load a posterior, then diagnose, resample and export it.

>>> import daml
>>> post = daml.from_members(members, log_weight)          # an xarray.Dataset
>>> post.daml.ess(); post.daml.mean(); post.daml.resample(seed=0)
>>> daml.diagnostics.crps(post, truth)

Modules: :mod:`daml.posterior`, :mod:`daml.diagnostics`, :mod:`daml.resampling`, :mod:`daml.io`,
:mod:`daml.errors`.
"""

from ._version import __version__
from . import errors, posterior, resampling, diagnostics, io
from .posterior import from_members, validate
from .io import open_posterior, to_netcdf, to_arviz

__all__ = [
    "__version__",
    "errors",
    "posterior",
    "resampling",
    "diagnostics",
    "io",
    "from_members",
    "validate",
    "open_posterior",
    "to_netcdf",
    "to_arviz",
]
