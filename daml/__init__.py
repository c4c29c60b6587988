"""daml: Bayesian uncertainty quantification and data assimilation on weighted ensembles.

The public API is small: build or load a posterior, then diagnose, resample and export it.

>>> import daml
>>> post = daml.from_members(members, log_weight)          # an xarray.Dataset
>>> post.daml.ess(); post.daml.mean(); post.daml.resample(seed=0)
>>> daml.diagnostics.crps(post, truth)

Twin experiments and filters:

>>> model = daml.models.Lorenz96(n=40, forcing=8.0, dt=0.05)
>>> data = daml.simulate(model, 1000, daml.models.observe_all(40, sd=1.0), x0=x0, x0_cov=0.001, seed=0)
>>> result = daml.filters.run(daml.filters.make_filter("etkf", members=24, inflation=1.02), model, data, seed=1)
>>> daml.diagnostics.rmse(result.analysis, data["truth"])

Modules: :mod:`daml.posterior`, :mod:`daml.diagnostics`, :mod:`daml.resampling`, :mod:`daml.io`,
:mod:`daml.models`, :mod:`daml.filters`, :mod:`daml.transport`, :mod:`daml.diffusion`, :mod:`daml.ensembles`, :mod:`daml.learning`, :mod:`daml.smoothing`, :mod:`daml.twin`, :mod:`daml.experiment`, :mod:`daml.errors`;
:mod:`daml.causal` (double machine learning, needs scikit-learn: ``pip install 'daml[causal]'``) is
imported on its own, ``from daml import causal``.
"""

from ._version import __version__
from . import errors, posterior, resampling, diagnostics, io, models, transport, filters, diffusion, ensembles, learning, smoothing
from .posterior import from_members, validate
from .io import open_posterior, to_netcdf, to_arviz
from .twin import simulate

__all__ = [
    "__version__",
    "errors",
    "posterior",
    "resampling",
    "diagnostics",
    "io",
    "models",
    "filters",
    "transport",
    "diffusion",
    "ensembles",
    "learning",
    "smoothing",
    "simulate",
    "from_members",
    "validate",
    "open_posterior",
    "to_netcdf",
    "to_arviz",
]
