"""The local ensemble transform Kalman filter (LETKF) with R-localisation.

With few members the sample covariance of a large system is rank deficient and full of spurious
long-range correlations: a global ETKF then lets an observation at one end of the domain move the
state at the other. The LETKF (Hunt, Kostelich & Szunyogh 2007) removes this by doing one ETKF
analysis *per state variable* ``j``, in which each observation ``k`` counts with its precision
``1 / r_k`` multiplied by a taper ``rho(d_jk)`` of the distance between the variable and the
observation ("R-localisation"). With the notation of :mod:`daml.filters.enkf` (``a = N - 1``,
observation anomalies ``Y`` ``(N x m)``, innovation ``d = y - mean h(x)``),

.. math::

    C_j = a I + Y \\operatorname{diag}(\\rho_{j\\cdot} / r)\\, Y^T = V_j \\Lambda_j V_j^T, \\qquad
    w_j = C_j^{-1} Y \\operatorname{diag}(\\rho_{j\\cdot} / r)\\, d, \\qquad
    T_j = \\sqrt a\\, V_j \\Lambda_j^{-1/2} V_j^T,

and variable ``j`` of the analysis is ``\\bar x_j + a_j^T w_j + T_j a_j``, where ``a_j`` is column ``j``
of the ensemble anomalies. Observations beyond the taper's support do not enter ``C_j`` or ``w_j`` at
all, so they cannot affect variable ``j``; with an infinite radius every ``C_j`` is the global ``C``
and the LETKF is the ETKF. The ``N x N`` problems of all ``n`` variables are built at once as a
``(*batch, n, N, N)`` tensor and solved by one batched symmetric eigendecomposition: there is no
Python loop over grid points. Unobserved entries (``mask`` False) get taper weight zero.

The taper is the compactly supported fifth-order piecewise rational function of Gaspari & Cohn
(1999, eq. 4.10), :func:`gaspari_cohn`, which is 1 at distance 0 and exactly 0 from ``2 c`` on (``c``
is its half-width). Following DAPPER (and Sakov's EnKF-Matlab before it), ``radius`` is a length in
grid points and ``c = 1.82 radius``, so the taper reaches zero at ``3.64 radius``: near the origin
``1 - (5/3)(d/c)^2`` matches the Gaussian ``exp(-d^2 / (2 radius^2))`` when ``c = sqrt(10/3) radius``
(``sqrt(10/3) = 1.826``), which makes ``radius`` the Gaussian-equivalent length scale and the values
directly comparable with DAPPER's ``loc_rad``.

Positions: state variable ``j`` sits at ``j`` (``0 .. n-1``). Observation positions are given by
``positions`` or, by default, read off a linear operator that selects one variable per observation
(each row of ``H`` has exactly one nonzero entry), which covers :func:`~daml.models.observe_all`,
``observe_every`` and ``observe_indices``. ``domain`` makes distances periodic,
``min(|p - q|, domain - |p - q|)`` after reducing modulo ``domain``; it defaults to ``n`` with the
default positions (a ring, such as Lorenz-96) and to non-periodic with explicit ``positions``. Pass
``domain=math.inf`` for a non-periodic line with the default positions.

``rotate=True`` applies one random mean-preserving rotation per analysis (and per batch element),
shared by all grid points: a different rotation at each variable would give neighbouring variables
unrelated member labels and make each member's field rough.

The taper matrix ``(n, m)`` (times ``1 / r``) depends only on the operator, so it is computed on
first use and reused while the same operator comes back.

References
----------
* B. R. Hunt, E. J. Kostelich and I. Szunyogh (2007), Efficient data assimilation for
  spatiotemporal chaos: a local ensemble transform Kalman filter. *Physica D* 230, 112-126.
* G. Gaspari and S. E. Cohn (1999), Construction of correlation functions in two and three
  dimensions. *Q. J. R. Meteorol. Soc.* 125, 723-757.
* P. Sakov and L. Bertino (2011), Relation between two common localisation methods for the EnKF.
  *Comput. Geosci.* 15, 225-237.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .. import _device
from ..errors import InputError, NonFiniteError, ShapeError
from ..models.observations import Observation, selection_positions
from .base import (EnsembleState, Filter, check_members, ensemble_forecast, ensemble_init, ensemble_members,
                   register)
from .enkf import (_check_rotate, _ensemble_anomalies, _is_diagonal, _mean_preserving_rotation, _spread,
                   _sqrt_transform)

__all__ = ["letkf", "gaspari_cohn", "ring_taper", "HALF_WIDTH_PER_RADIUS"]

HALF_WIDTH_PER_RADIUS = 1.82
"""The Gaspari-Cohn half-width ``c`` per unit of ``radius`` (DAPPER's convention, about
``sqrt(10/3)``); the taper's support (where it reaches zero) is ``2 c = 3.64 radius``."""


def gaspari_cohn(distance: Any, support: float) -> torch.Tensor:
    """The Gaspari-Cohn (1999) taper: 1 at distance 0, decreasing smoothly to exactly 0 at ``support``.

    With ``c = support / 2`` and ``z = |distance| / c``,

    * ``z <= 1``: ``1 - 5/3 z^2 + 5/8 z^3 + 1/2 z^4 - 1/4 z^5``;
    * ``1 < z < 2``: ``4 - 5 z + 5/3 z^2 + 5/8 z^3 - 1/2 z^4 + 1/12 z^5 - 2 / (3 z)``;
    * ``z >= 2``: 0.

    The function is positive definite as a correlation in up to three dimensions and twice
    continuously differentiable.

    Parameters
    ----------
    distance : tensor or array-like
        Distances, any shape (the sign is ignored; NaN is refused with a
        :class:`~daml.errors.NonFiniteError`, ``inf`` gives 0).
    support : float
        Where the taper reaches zero (positive; ``inf`` gives 1 everywhere).

    Returns
    -------
    torch.Tensor
        The taper, same shape as ``distance`` (its dtype if floating, else float64).
    """
    if isinstance(support, bool) or not isinstance(support, (int, float)) or not support > 0:
        raise InputError("support", "a positive distance", repr(support))
    d = _device.as_tensor(distance, "distance")
    if bool(torch.isnan(d).any()):             # a NaN distance is no distance: never a zero taper
        raise NonFiniteError("distance", "distances that are not NaN (inf gives 0)", "NaN entries")
    z = d.abs() / (float(support) / 2.0)
    inner = 1.0 + z**2 * (-5.0 / 3.0 + z * (5.0 / 8.0 + z * (0.5 - 0.25 * z)))
    zo = z.clamp(1.0, 2.0)  # keeps 1/z finite in the branch that torch.where discards
    outer = 4.0 - 5.0 * zo + zo**2 * (5.0 / 3.0 + zo * (5.0 / 8.0 + zo * (-0.5 + zo / 12.0))) - 2.0 / (3.0 * zo)
    return torch.where(z <= 1.0, inner, torch.where(z < 2.0, outer, torch.zeros((), dtype=d.dtype, device=d.device)))


def _check_radius(radius: Any) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise InputError("radius", "a positive localisation radius in grid points (math.inf: no localisation)",
                         repr(radius))
    return float(radius)


def _check_positions(positions: Any) -> torch.Tensor | None:
    if positions is None:
        return None
    pos = _device.as_tensor(positions, "positions", dtype=torch.float64, device="cpu")
    if pos.ndim != 1 or pos.numel() == 0:
        raise ShapeError("positions", "a 1-d sequence with one position per observation", f"shape {tuple(pos.shape)}")
    if not torch.isfinite(pos).all():
        raise InputError("positions", "finite positions", "NaN or infinite entries")
    return pos


def _check_domain(domain: Any) -> float | None:
    if domain is None:
        return None
    if isinstance(domain, bool) or not isinstance(domain, (int, float, np.integer, np.floating)) or not domain > 0:
        raise InputError("domain", "None or a positive period (math.inf: not periodic)", repr(domain))
    return float(domain)


def _default_positions(operator: Observation) -> torch.Tensor:
    """The observed variable of each row of a selection operator (or the ``positions`` a transformed
    selection carries, see :func:`daml.models.observe_transformed`)."""
    if operator.positions is not None:
        return operator.positions.to(torch.float64).cpu()
    pos = None if operator.matrix is None else selection_positions(operator.matrix)
    if pos is None:
        raise InputError("positions", f"{operator.size} observation positions",
                         "None for an operator that is not a selection of state variables",
                         hint="the default positions need a linear operator with one nonzero per row of H")
    return pos


def _local_precision(operator: Observation, n: int, radius: float, positions: torch.Tensor | None,
                     domain: float | None) -> torch.Tensor:
    """``rho(d_jk) / r_k`` for every state variable ``j`` and observation ``k``: shape ``(n, m)``, float64."""
    r = operator.noise_cov
    if not _is_diagonal(r):
        raise InputError("operator", "an observation operator with a diagonal noise covariance R",
                         "an R with nonzero off-diagonal entries",
                         hint="LETKF needs uncorrelated observation errors")
    if positions is None:
        obs_pos = _default_positions(operator)
        period = float(n) if domain is None else domain
    else:
        if positions.numel() != operator.size:
            raise ShapeError("positions", f"{operator.size} positions (one per observation)",
                             f"{positions.numel()}")
        obs_pos = positions
        period = domain
    dist = (torch.arange(n, dtype=torch.float64).unsqueeze(-1) - obs_pos.unsqueeze(-2)).abs()
    if period is not None and math.isfinite(period):
        dist = torch.remainder(dist, period)
        dist = torch.minimum(dist, period - dist)
    rho = gaspari_cohn(dist, 2.0 * HALF_WIDTH_PER_RADIUS * radius)
    return rho / torch.diagonal(r).to(device="cpu", dtype=torch.float64).unsqueeze(-2)


def ring_taper(n: int, radius: float) -> torch.Tensor:
    """The ``(n, n)`` Gaspari-Cohn taper between the points of a ring of ``n`` grid points, with the
    :func:`letkf` ``radius`` convention (zero beyond ``3.64 radius``), float64."""
    pos = torch.arange(n, dtype=torch.float64)
    dist = (pos.unsqueeze(-1) - pos.unsqueeze(-2)).abs()
    dist = torch.minimum(dist, n - dist)
    return gaspari_cohn(dist, 2.0 * HALF_WIDTH_PER_RADIUS * radius)


@register("letkf")
def letkf(members: int, radius: float, positions: Any = None, domain: float | None = None,
          rotate: bool = False) -> Filter:
    """The local ETKF with Gaspari-Cohn R-localisation, vectorised over grid points.

    Parameters
    ----------
    members : int
        Ensemble size ``N`` (at least 2).
    radius : float
        Localisation radius in grid points, DAPPER's ``loc_rad``: the Gaspari-Cohn half-width is
        ``1.82 * radius`` and the taper is zero from ``3.64 * radius`` on. ``math.inf`` switches
        localisation off (the LETKF is then the ETKF).
    positions : sequence of float (m,), optional
        Observation positions in grid-point units. Default: the observed variable of each row of a
        linear selection operator (``InputError`` naming ``positions`` for any other operator).
    domain : float, optional
        Period of the domain for periodic distances. Default: ``n`` with the default positions (a
        ring), not periodic with explicit ``positions``.
    rotate : bool
        A random mean-preserving rotation of the analysis anomalies at each analysis, one for all
        grid points.

    Returns
    -------
    Filter
        Named ``"letkf"``; ``info`` holds ``"spread"`` ``(*batch,)`` after the analysis. The analysis
        raises :class:`~daml.errors.InputError` naming ``operator`` for a non-diagonal ``R`` and
        :class:`~daml.errors.ShapeError` naming ``positions`` if their number is not ``m``.
    """
    n_mem = check_members(members)
    rad = _check_radius(radius)
    pos = _check_positions(positions)
    dom = _check_domain(domain)
    rot = _check_rotate(rotate)
    cache: dict[str, Any] = {}

    def local_precision(operator: Observation, like: torch.Tensor) -> torch.Tensor:
        key = (id(operator), id(operator.noise_cov), id(operator.matrix), like.shape[-1], like.dtype, like.device)
        if cache.get("key") != key or cache.get("operator") is not operator:
            with torch.inference_mode(False):      # kept across runs: an ordinary tensor, not an inference one
                value = _local_precision(operator, like.shape[-1], rad, pos, dom).to(like)
            cache.update(key=key, operator=operator, value=value)
        return cache["value"]

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator) -> tuple[EnsembleState, dict]:
        x = state.x
        xm, anom, hm, yanom = _ensemble_anomalies(x, operator)
        # Grid point j is an ETKF whose observations are whitened by sqrt(rho_jk / r_k): the same
        # transform as etkf's, batched over the n grid points.
        root = (local_precision(operator, x) * mask.to(x).unsqueeze(-2)).sqrt()    # (*b, n, m)
        d = torch.where(mask, y - hm.squeeze(-2), 0.0)                              # (*b, m)
        yw = yanom.unsqueeze(-3) * root.unsqueeze(-2)                               # (*b, n, N, m)
        dw = d.unsqueeze(-2) * root                                                 # (*b, n, m)
        cols = anom.mT.unsqueeze(-1)                                                # a_j, (*b, n, N, 1)
        inc_cols, t_cols = _sqrt_transform(cols, yw, dw)                            # (*b, n, 1, 1), (*b, n, N, 1)
        increment = inc_cols.squeeze(-1).mT                                         # (*b, 1, n)
        t_anom = t_cols.squeeze(-1).mT                                              # (*b, N, n)
        if rot:
            t_anom = _mean_preserving_rotation(t_anom, g)
        xa = xm + increment + t_anom
        return EnsembleState(xa, state.log_weight), {"spread": _spread(xa)}

    config = {"members": n_mem, "radius": rad, "positions": None if pos is None else pos.tolist(),
              "domain": dom, "rotate": rot}
    return Filter("letkf", config, ensemble_init(n_mem), ensemble_forecast, analysis, ensemble_members, inference=True)
