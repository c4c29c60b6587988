"""Smoothing on the chain of a state-space model written as message passing (Satorras, Akata and
Welling 2019): the MAP of a linear(ised)-Gaussian chain by gradient ascent on the three messages each
state receives (from the past state, the future state and its observation). See docs/smoothing.md.

The learned correction on top of these messages (hybrid inference) is to come in ``hybrid.py``.
"""

from .messages import Smoothed, message_passing, taylor_transition

__all__ = ["Smoothed", "message_passing", "taylor_transition"]
