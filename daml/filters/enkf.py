"""Ensemble Kalman filters: the stochastic (perturbed-observations) EnKF and the ETKF.

Both filters represent the forecast distribution by ``N`` equally weighted members ``x_i`` (rows of
the ensemble, shape ``(*batch, N, n)``) and apply the Kalman update with the covariances replaced by
sample covariances. Write

.. math::

    \\bar x = \\tfrac1N \\sum_i x_i, \\qquad A = X - 1 \\bar x^T \\;(N \\times n), \\qquad
    Y = h(X) - 1 \\overline{h(x)}^T \\;(N \\times m), \\qquad d = y - \\overline{h(x)},

so that the sample covariance is ``P = A^T A / (N-1)`` and ``Y`` holds the observation-space anomalies
(``h`` is applied to each member, which is what makes nonlinear operators work). Everything is
*whitened* by the noise covariance first: with ``R = L L^T`` (a Cholesky factor, or the square root
of the diagonal when ``R`` is diagonal), ``Y <- Y L^{-T}`` and ``d <- L^{-1} d``, after which the noise
is the identity. Unobserved entries (``mask`` False) are removed exactly by
:func:`~daml.filters.masked_observation`: their rows of ``Y`` and entries of ``d`` become zero.

**Stochastic EnKF** (Burgers, van Leeuwen & Evensen 1998; Evensen 2009). Each member assimilates its
own perturbed observation ``y_i = y + e_i``, ``e_i ~ N(0, R)``; the perturbations are drawn from the
filter's generator and centred to mean zero across members, as DAPPER does, so that the analysis mean
is exactly the Kalman update of the forecast mean with the ensemble gain. With ``a = N - 1`` and the
whitened member innovations ``D`` (rows ``y_i - h(x_i)``),

.. math::

    X^a = X + D\\, (a I_m + Y^T Y)^{-1} Y^T A = X + D\\, Y^T (a I_N + Y Y^T)^{-1} A,

the two forms being equal by the push-through identity. Both matrices to factor are at least ``a``
times the identity, so a Cholesky solve is always well conditioned.

**ETKF** (Bishop, Etherton & Majumdar 2001; Hunt, Kostelich & Szunyogh 2007), the deterministic
square-root filter. In ensemble space, with ``C = a I_N + Y Y^T = V \\Lambda V^T``,

.. math::

    w = C^{-1} Y d = V \\Lambda^{-1} V^T Y d, \\qquad
    T = \\sqrt{a}\\; V \\Lambda^{-1/2} V^T, \\qquad
    X^a = 1 (\\bar x + A^T w)^T + T A .

``T`` is the *symmetric* square root of ``a C^{-1}`` (Sakov & Oke 2008 show that it is the one that
keeps the analysis ensemble centred): because ``Y^T 1 = 0``, ``1`` is an eigenvector of ``C`` with
eigenvalue ``a``, so ``T 1 = 1`` and the analysis mean is ``\\bar x + A^T w``, the Kalman update of the
mean; the analysis anomalies ``T A`` have sample covariance ``A^T T^2 A/a = A^T C^{-1} A``, the Kalman
analysis covariance. For a linear operator the ETKF therefore reproduces the Kalman update of the
ensemble's own mean and sample covariance exactly.

When the ensemble is larger than the number of observations (``N > m``) the same transform is
computed in observation space, from the eigendecomposition ``Y^T Y = W S W^T`` (``m x m``):

.. math::

    w = Y W (a + S)^{-1} W^T d, \\qquad
    T = I + Y W\\, G\\, W^T Y^T, \\quad
    G = \\operatorname{diag}\\Big(\\frac{-1}{\\sqrt{a + s_k}\\,(\\sqrt a + \\sqrt{a + s_k})}\\Big),

which is the same symmetric ``T`` (on the span of ``Y`` its eigenvalues are
``\\sqrt{a / (a + s_k)} = 1 + s_k G_k``, elsewhere 1) without ever forming an ``N x N`` matrix, so that
very large ensembles stay cheap. Neither route inverts an ill-conditioned matrix: all eigenvalues
divided by are at least ``a``.

``rotate=True`` multiplies the transform by a random orthogonal matrix ``Q`` with ``Q 1 = 1`` (a
*mean-preserving* rotation, DAPPER's ``rot``), drawn afresh from the filter's generator at every
analysis: ``Q = H diag(1, Q_0) H`` where ``H`` is the Householder reflection exchanging ``e_1`` and
``1/\\sqrt N`` and ``Q_0`` is Haar-distributed on ``O(N - 1)`` (the QR factor of a Gaussian matrix
with the signs of ``R``'s diagonal fixed, Mezzadri 2007). In Hunt's column convention this is
``T Q``; with members as rows the anomalies become ``Q^T T A``. The mean and the sample covariance are
unchanged; only the labelling of the members mixes, which helps against ensemble collapse onto a
few members in long runs. Drawing ``Q_0`` costs a QR factorisation of an ``(N-1) x (N-1)`` matrix per
analysis, negligible for the usual tens to hundreds of members but prohibitive for ``N`` in the
thousands, where a rotation is pointless anyway.

Inflation is not part of these filters: wrap them, ``inflate(etkf(24), 1.02)``, which scales the
analysis anomalies as DAPPER's ``infl`` does. Both filters keep equal weights (``log_weight = -log N``).

References
----------
* G. Burgers, P. J. van Leeuwen and G. Evensen (1998), Analysis scheme in the ensemble Kalman
  filter. *Mon. Wea. Rev.* 126, 1719-1724.
* G. Evensen (2009), *Data Assimilation: The Ensemble Kalman Filter*, 2nd ed., Springer.
* C. H. Bishop, B. J. Etherton and S. J. Majumdar (2001), Adaptive sampling with the ensemble
  transform Kalman filter. Part I. *Mon. Wea. Rev.* 129, 420-436.
* B. R. Hunt, E. J. Kostelich and I. Szunyogh (2007), Efficient data assimilation for
  spatiotemporal chaos: a local ensemble transform Kalman filter. *Physica D* 230, 112-126.
* P. Sakov and P. R. Oke (2008), Implications of the form of the ensemble transformation in the
  ensemble square root filters. *Mon. Wea. Rev.* 136, 1042-1053.
* F. Mezzadri (2007), How to generate random matrices from the classical compact groups.
  *Notices AMS* 54, 592-604.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..models.base import covariance_root
from ..models.observations import Observation
from .base import (EnsembleState, Filter, check_members, ensemble_forecast, ensemble_init, ensemble_members,
                   masked_observation, register)

__all__ = ["enkf", "etkf"]


# -- shared pieces (also used by letkf.py) -------------------------------------------------------------

def _check_rotate(rotate: object) -> bool:
    if not isinstance(rotate, bool):
        raise InputError("rotate", "True or False", repr(rotate))
    return rotate


def _ensemble_anomalies(x: torch.Tensor, operator: Observation):
    """Mean ``(*batch, 1, n)``, anomalies ``(*batch, N, n)``, mean of ``h(x_i)`` ``(*batch, 1, m)`` and
    observation anomalies ``(*batch, N, m)``."""
    xm = x.mean(-2, keepdim=True)
    hx = operator.apply(x)
    hm = hx.mean(-2, keepdim=True)
    return xm, x - xm, hm, hx - hm


def _spread(x: torch.Tensor) -> torch.Tensor:
    """Root-mean ensemble variance (ddof 1) ``(*batch,)``."""
    return x.var(-2, correction=1).mean(-1).sqrt()


def _is_diagonal(matrix: torch.Tensor) -> bool:
    return bool(torch.count_nonzero(matrix - torch.diag_embed(torch.diagonal(matrix, dim1=-2, dim2=-1))) == 0)


def _whiten(rows: torch.Tensor, operator: Observation, mask: torch.Tensor) -> torch.Tensor:
    """Rows ``(*batch, k, m)`` in observation space, masked and whitened: ``rows L^{-T}`` with
    ``L L^T = R`` restricted to the observed entries; unobserved columns come out exactly zero."""
    noise_cov = operator.noise_cov.to(rows)
    zero = torch.zeros(rows.shape[:-2] + rows.shape[-1:], dtype=rows.dtype, device=rows.device)
    _, rows, r = masked_observation(zero, rows, noise_cov, mask)
    if _is_diagonal(noise_cov):
        return rows * torch.diagonal(r, dim1=-2, dim2=-1).rsqrt().unsqueeze(-2)
    chol = torch.linalg.cholesky(r)
    return torch.linalg.solve_triangular(chol.mT, rows, upper=True, left=False)


def _mean_preserving_rotation(rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``Q rows`` for a random orthogonal ``Q`` ``(*batch, N, N)`` with ``Q 1 = 1`` (see the module
    docstring); ``rows`` has shape ``(*batch, N, k)``. One ``Q`` per batch element."""
    n_mem = rows.shape[-2]
    batch = rows.shape[:-2]
    z = torch.randn(*batch, n_mem - 1, n_mem - 1, generator=g, dtype=rows.dtype, device=rows.device)
    q0, r0 = torch.linalg.qr(z)
    sign = torch.where(torch.diagonal(r0, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(rows)
    q0 = q0 * sign.unsqueeze(-2)
    # Householder reflection H = I - beta v v^T with H e_1 = 1/sqrt(N), v = e_1 - 1/sqrt(N)
    v = torch.full((n_mem,), -1.0 / math.sqrt(n_mem), dtype=rows.dtype, device=rows.device)
    v[0] += 1.0
    beta = 2.0 / (2.0 - 2.0 / math.sqrt(n_mem))                 # 2 / (v . v), no device sync

    def reflect(m: torch.Tensor) -> torch.Tensor:
        return m - beta * v.unsqueeze(-1) * (v.unsqueeze(-2) @ m)

    h = reflect(rows)
    h = torch.cat([h[..., :1, :], q0 @ h[..., 1:, :]], dim=-2)
    return reflect(h)


def _sqrt_transform(anom: torch.Tensor, yw: torch.Tensor, dw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ETKF update of whitened quantities: mean increment ``A^T w`` ``(*batch, 1, n)`` and analysis
    anomalies ``T A`` ``(*batch, N, n)``; ensemble space when ``N <= m``, observation space otherwise."""
    n_mem, m = yw.shape[-2], yw.shape[-1]
    a = float(n_mem - 1)
    if n_mem <= m:
        eye = torch.eye(n_mem, dtype=yw.dtype, device=yw.device)
        lam, vec = torch.linalg.eigh(a * eye + yw @ yw.mT)                        # C = V diag(lam) V^T
        w = vec @ ((vec.mT @ (yw @ dw.unsqueeze(-1))) / lam.unsqueeze(-1))         # (*b, N, 1)
        t_anom = math.sqrt(a) * (vec @ (lam.rsqrt().unsqueeze(-1) * (vec.mT @ anom)))
    else:
        s, wvec = torch.linalg.eigh(yw.mT @ yw)                                    # Y^T Y = W diag(s) W^T
        s = s.clamp_min(0.0)
        w = yw @ (wvec @ ((wvec.mT @ dw.unsqueeze(-1)) / (a + s).unsqueeze(-1)))
        root = torch.sqrt(a + s)
        gain = -1.0 / (root * (math.sqrt(a) + root))
        t_anom = anom + yw @ (wvec @ (gain.unsqueeze(-1) * (wvec.mT @ (yw.mT @ anom))))
    return w.mT @ anom, t_anom


def _perturbations(noise_cov: torch.Tensor, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Observation perturbations ``e_i ~ N(0, R)`` of shape ``(*batch, N, m)``, centred across members
    (axis ``-2``)."""
    root = covariance_root(noise_cov)
    e = torch.randn(*shape, generator=g, dtype=noise_cov.dtype, device=noise_cov.device) @ root.mT
    return e - e.mean(-2, keepdim=True)


def _stochastic_update(anom: torch.Tensor, yw: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """``D (a I + Y^T Y)^{-1} Y^T A`` for whitened member innovations ``D`` ``(*batch, N, m)``."""
    n_mem, m = yw.shape[-2], yw.shape[-1]
    a = float(n_mem - 1)
    if n_mem <= m:
        c = a * torch.eye(n_mem, dtype=yw.dtype, device=yw.device) + yw @ yw.mT
        chol = torch.linalg.cholesky(c)
        weights = torch.cholesky_solve(yw @ dw.mT, chol).mT                       # D Y^T C^{-1}  (N, N)
        return weights @ anom
    s = a * torch.eye(m, dtype=yw.dtype, device=yw.device) + yw.mT @ yw
    chol = torch.linalg.cholesky(s)
    return dw @ torch.cholesky_solve(yw.mT @ anom, chol)


# -- the filters ----------------------------------------------------------------------------------------

@register("enkf")
def enkf(members: int) -> Filter:
    """The stochastic (perturbed-observations) ensemble Kalman filter.

    Parameters
    ----------
    members : int
        Ensemble size ``N`` (at least 2).

    Returns
    -------
    Filter
        Named ``"enkf"``. The state is an :class:`~daml.filters.EnsembleState` with ``x`` of shape
        ``(*batch, N, n)``; ``info`` holds ``"spread"`` ``(*batch,)``, the root-mean ensemble variance
        (ddof 1) after the analysis.

    Notes
    -----
    Each member assimilates ``y + e_i`` with ``e_i ~ N(0, R)`` drawn from the generator and centred
    across members (as DAPPER does); ``h`` is applied to every member, so nonlinear operators work.
    See the module docstring for the update.
    """
    n_mem = check_members(members)

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator) -> tuple[EnsembleState, dict]:
        x = state.x
        _, anom, hm, yanom = _ensemble_anomalies(x, operator)
        e = _perturbations(operator.noise_cov.to(x), tuple(yanom.shape), g)
        # member innovations y + e_i - h(x_i), with h(x_i) = mean + anomaly
        d = torch.where(mask.unsqueeze(-2), (y.unsqueeze(-2) - hm) + (e - yanom), 0.0)
        white = _whiten(torch.cat([d, yanom], dim=-2), operator, mask)
        dw, yw = white[..., :n_mem, :], white[..., n_mem:, :]
        xa = x + _stochastic_update(anom, yw, dw)
        return EnsembleState(xa, state.log_weight), {"spread": _spread(xa)}

    return Filter("enkf", {"members": n_mem}, ensemble_init(n_mem), ensemble_forecast, analysis,
                  ensemble_members, inference=True)


@register("etkf")
def etkf(members: int, rotate: bool = False) -> Filter:
    """The ensemble transform Kalman filter with the symmetric square root.

    Parameters
    ----------
    members : int
        Ensemble size ``N`` (at least 2).
    rotate : bool
        Apply a random mean-preserving orthogonal rotation to the analysis anomalies at every
        analysis (DAPPER's ``rot=True``).

    Returns
    -------
    Filter
        Named ``"etkf"``; ``info`` holds ``"spread"`` ``(*batch,)`` after the analysis.

    Notes
    -----
    For a linear operator one analysis equals the exact Kalman update of the ensemble's own mean and
    sample covariance. The transform is computed in ensemble space (``N <= m``) or observation space
    (``N > m``), whichever is smaller; see the module docstring.
    """
    n_mem = check_members(members)
    rot = _check_rotate(rotate)

    def analysis(state: EnsembleState, y: torch.Tensor, operator: Observation, mask: torch.Tensor,
                 g: torch.Generator) -> tuple[EnsembleState, dict]:
        x = state.x
        xm, anom, hm, yanom = _ensemble_anomalies(x, operator)
        d = torch.where(mask.unsqueeze(-2), y.unsqueeze(-2) - hm, 0.0)
        white = _whiten(torch.cat([d, yanom], dim=-2), operator, mask)
        dw, yw = white[..., 0, :], white[..., 1:, :]
        increment, t_anom = _sqrt_transform(anom, yw, dw)
        if rot:
            t_anom = _mean_preserving_rotation(t_anom, g)
        xa = xm + increment + t_anom
        return EnsembleState(xa, state.log_weight), {"spread": _spread(xa)}

    return Filter("etkf", {"members": n_mem, "rotate": rot}, ensemble_init(n_mem), ensemble_forecast, analysis,
                  ensemble_members, inference=True)
