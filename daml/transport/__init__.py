"""Optimal transport: a batched log-domain Sinkhorn solver and the ensemble transforms built on it.

>>> import daml
>>> res = daml.transport.sinkhorn(cost, a, b, epsilon=0.05, relative=True)
>>> res.plan(), res.error, res.converged
"""

from .sinkhorn import SinkhornResult, sinkhorn, softmin
from .transform import TransformResult, ensemble_transform, second_order_correction

__all__ = ["sinkhorn", "SinkhornResult", "softmin", "ensemble_transform", "TransformResult",
           "second_order_correction"]
