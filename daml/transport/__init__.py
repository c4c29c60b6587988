"""Optimal transport: a batched log-domain Sinkhorn solver and the ensemble transforms built on it.

>>> import daml
>>> res = daml.transport.sinkhorn(cost, a, b, epsilon=0.05, relative=True)
>>> res.plan(), res.error, res.converged
"""

from .sinkhorn import SinkhornResult, sinkhorn, softmin

__all__ = ["sinkhorn", "SinkhornResult", "softmin"]
