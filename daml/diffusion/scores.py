"""Analytic scores of noised Gaussian-mixture priors and the likelihood forcings.

The prior at pseudo-time 0 is a Gaussian mixture ``sum_k w_k N(mu_k, Sigma_k)`` built from the
ensemble (:class:`Mixture`): Gaussian kernels of bandwidth ``h`` on the members
(:func:`kernel_mixture`, ``h = 0`` is the bare ensemble), kernels with the shrunk covariance of each
member's neighbours (:func:`local_mixture`), a mixture of a few Gaussians fitted by EM
(:func:`fitted_mixture`), or one Gaussian with the ensemble mean and (optionally
tapered) covariance (:func:`gaussian_prior`). Noised by ``p(x^t | x^0) = N(alpha x^0, sigma^2 I)`` it
stays a mixture with components ``N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``, so its score is a
responsibility-weighted sum of Gaussian scores (:func:`mixture_score`), evaluated with log-sum-exp.

Every covariance is held in spectral form ``Sigma = V diag(s) V^T + c (I - V V^T)``: ``V`` has
orthonormal columns (``r`` of them, possibly none) and ``c`` is the variance off their span (``h^2``
for isotropic kernels, ``0`` for a low-rank ensemble covariance). Any function of ``Sigma`` applied to
a vector then costs ``O(d r)``: ``f(Sigma) z = f(c) z + V diag(f(s) - f(c)) V^T z``.

The likelihood enters through Chapman-Kolmogorov, ``p(y | x^t) = int p(y | x^0) p(x^0 | x^t) dx^0``:

:func:`exact_forcing`
    For a mixture prior and a linear-Gaussian observation the integral is exact:
    ``p(y | x^t) = sum_k r_k(x) N(y; H m_k(x), R + H P_k H^T)`` with the per-component conditional
    ``x^0 | x^t, k ~ N(m_k(x), P_k)``, ``m_k = mu_k + K_k (x - alpha mu_k)``,
    ``K_k = alpha Sigma_k (alpha^2 Sigma_k + sigma^2)^-1`` and ``P_k = Sigma_k - alpha K_k Sigma_k``.
    Its gradient is ``sum_k (w'_k - r_k) s_k + sum_k w'_k K_k H^T S_k^-1 (y - H m_k)`` with
    ``w'_k ~ r_k N(y; H m_k, S_k)``. With one Gaussian component this is the **exact Gaussian gain
    forcing**; with zero-bandwidth kernels it is the **exact weighted-ensemble forcing** (the noised
    score of the likelihood-weighted ensemble). A nonlinear ``h`` is linearised at each ``mu_k``
    (Jacobians by automatic differentiation); with zero bandwidth no linearisation is needed.
:func:`ensemble_forcing`
    The seed's joint-Gaussian construction: ``(x^0, x^t)`` jointly Gaussian with the ensemble
    covariance ``P``, so ``x^0 | x^t ~ N(m_t(x), P_t)``, and ``p(y | x^0)`` represented by the
    members. The gradient of ``log sum_i p(y | x_i) N(x_i; m_t(x), P_t)`` is
    ``K_t^T P_t^-1 sum_i w_i (x_i - m_t(x)) = (alpha / sigma^2) (xbar_w - m_t(x))``. With
    ``conditional=False`` the weights are ``w_i ~ p(y | x_i)`` as in the seed; with ``True`` they also
    carry the Gaussian factor ``N(x_i; m_t(x), P_t)``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .. import _device
from ..errors import DtypeError, InputError, NonFiniteError, ShapeError, check_int, check_real
from ..filters.base import weighted_anomalies

__all__ = [
    "Mixture",
    "kernel_mixture",
    "local_mixture",
    "fitted_mixture",
    "gaussian_prior",
    "gaussian_mixture",
    "mixture_score",
    "Linearisation",
    "linearise",
    "exact_forcing",
    "ensemble_forcing",
    "likelihood_score",
]


_HALF = (torch.float16, torch.bfloat16)


class _MixtureFields(NamedTuple):
    mean: torch.Tensor
    log_weight: torch.Tensor
    floor: float = 0.0
    vecs: torch.Tensor | None = None
    vals: torch.Tensor | None = None


class Mixture(_MixtureFields):
    """A Gaussian mixture ``sum_k exp(log_weight_k) N(mean_k, V_k diag(vals_k) V_k^T + floor (I - V_k V_k^T))``.

    ``mean`` ``(*b, K, d)``, ``log_weight`` ``(*b, K)`` (normalised on construction), ``floor`` a float
    ``>= 0``, ``vecs`` ``(*b, K, d, r)`` and ``vals`` ``(*b, K, r)`` (``>= 0``), or both ``None`` for
    isotropic components.

    Checked on construction: real floating tensors of these shapes, finite (``log_weight`` may hold
    ``-inf`` for some components, not all), else a :mod:`daml.errors` error naming the field. Half
    precision (float16, bfloat16) is widened to float32, losslessly (as :func:`daml.posterior.from_members`
    does); the other fields take the dtype of ``mean``.
    """

    __slots__ = ()

    def __new__(cls, mean: torch.Tensor, log_weight: torch.Tensor, floor: float = 0.0,
                vecs: torch.Tensor | None = None, vals: torch.Tensor | None = None) -> "Mixture":
        mean = _check_points(mean, "mean", "K")
        log_weight = _log_weights(mean, log_weight, required=True, rows="component of mean")
        floor = check_real(floor, "floor", expected="a non-negative variance off the eigenvectors' span")
        if floor < 0:
            raise InputError("floor", "a non-negative variance off the eigenvectors' span", repr(floor))
        if (vecs is None) != (vals is None):
            raise InputError("vecs", "vecs and vals both given, or both None (isotropic components)",
                             f"vecs {type(vecs).__name__}, vals {type(vals).__name__}")
        if vecs is not None:
            d = mean.shape[-1]
            for name, value in (("vecs", vecs), ("vals", vals)):
                if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    raise DtypeError(name, "a real floating torch tensor",
                                     f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__)
            if vecs.ndim < 2 or vecs.shape[:-2] != mean.shape[:-1] or vecs.shape[-2] != d:
                raise ShapeError("vecs", f"shape {tuple(mean.shape)} + (r,) (eigenvectors per component of mean)",
                                 f"shape {tuple(vecs.shape)}")
            if vals.shape != vecs.shape[:-2] + vecs.shape[-1:]:
                raise ShapeError("vals", f"shape {tuple(vecs.shape[:-2] + vecs.shape[-1:])} (one per column of vecs)",
                                 f"shape {tuple(vals.shape)}")
            vecs, vals = vecs.to(mean), vals.to(mean)
            if not bool(torch.isfinite(vecs).all()):
                raise NonFiniteError("vecs", "finite eigenvectors", "NaN or infinite entries")
            if not bool(torch.isfinite(vals).all()) or bool((vals < 0).any()):
                raise NonFiniteError("vals", "finite non-negative eigenvalues", "NaN, infinite or negative entries")
        return super().__new__(cls, mean, log_weight, floor, vecs, vals)

    @property
    def isotropic(self) -> bool:
        return self.vecs is None


def _as_dtype(mix: Mixture, dtype: torch.dtype) -> Mixture:
    """``mix`` in ``dtype`` (no copy, no re-check when it already is)."""
    if mix.mean.dtype == dtype:
        return mix
    conv = lambda t: None if t is None else t.to(dtype)                   # noqa: E731
    return Mixture._make((conv(mix.mean), conv(mix.log_weight), mix.floor, conv(mix.vecs), conv(mix.vals)))


def _common(mix: Mixture, x: torch.Tensor) -> tuple[Mixture, torch.Tensor]:
    """The mixture and the particles in their common (promoted) floating dtype."""
    dtype = torch.promote_types(mix.mean.dtype, x.dtype)
    return _as_dtype(mix, dtype), x.to(dtype)


def check_bandwidth(value, name: str = "bandwidth", upper: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if ok and upper is not None:
        ok = value <= upper
    if not ok:
        expected = "a non-negative kernel standard deviation" if upper is None else f"a number in [0, {upper}]"
        raise InputError(name, expected, repr(value))
    return float(value)


def _check_points(value, name: str, rows: str = "N") -> torch.Tensor:
    """A real floating tensor ``(*b, rows, d)`` with at least one row and one column, all finite; half
    precision is returned widened to float32 (use the returned tensor)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise DtypeError(name, f"a real floating torch tensor (*b, {rows}, d)",
                         type(value).__name__ if not isinstance(value, torch.Tensor) else f"dtype {value.dtype}")
    if value.ndim < 2 or value.shape[-2] < 1 or value.shape[-1] < 1:
        raise ShapeError(name, f"shape (*b, {rows}, d) with {rows} >= 1 and d >= 1", f"shape {tuple(value.shape)}")
    if value.dtype in _HALF:
        value = value.float()
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(name, "finite values", f"{int((~torch.isfinite(value)).sum())} NaN or infinite entries")
    return value


def _check_mixture(mix, name: str = "mix") -> None:
    if not isinstance(mix, Mixture):
        raise InputError(name, "a daml.diffusion Mixture (kernel_mixture, fitted_mixture, ...)", type(mix).__name__)


def _check_taper(taper, members: torch.Tensor) -> torch.Tensor | None:
    """``None``, or a finite ``(d, d)`` taper in the members' dtype and device."""
    if taper is None:
        return None
    d = members.shape[-1]
    t = _device.as_tensor(taper, "taper", dtype=members.dtype, device=members.device)
    if t.shape != (d, d):
        raise ShapeError("taper", f"a ({d}, {d}) matrix (the state length of members)", f"shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError("taper", "finite taper weights", f"{int((~torch.isfinite(t)).sum())} NaN or infinite entries")
    return t


def _check_noise_level(alpha, sigma2) -> tuple[float, float]:
    alpha = check_real(alpha, "alpha", positive=True, expected="a positive signal scale alpha_t")
    sigma2 = check_real(sigma2, "sigma2", positive=True, expected="a positive noise variance sigma_t^2")
    return alpha, sigma2


def _log_weights(members: torch.Tensor, log_weight: torch.Tensor | None, required: bool = False,
                 rows: str = "member") -> torch.Tensor:
    """Normalised log-weights ``(*b, N)`` in the dtype of ``members`` (equal ones for ``None``)."""
    n = members.shape[-2]
    if log_weight is None and not required:
        return torch.full(members.shape[:-1], -math.log(n), dtype=members.dtype, device=members.device)
    if not isinstance(log_weight, torch.Tensor):
        raise DtypeError("log_weight", f"a real torch tensor of shape {tuple(members.shape[:-1])}",
                         type(log_weight).__name__)
    if log_weight.is_complex() or log_weight.dtype == torch.bool:
        raise DtypeError("log_weight", "real log-weights", f"dtype {log_weight.dtype}")
    if log_weight.shape != members.shape[:-1]:
        raise ShapeError("log_weight", f"shape {tuple(members.shape[:-1])} (one per {rows})",
                         f"shape {tuple(log_weight.shape)}")
    if bool(torch.isnan(log_weight).any()) or bool((log_weight == math.inf).any()) \
            or not bool(torch.isfinite(log_weight).any(-1).all()):
        raise NonFiniteError("log_weight", "finite log-weights (-inf allowed for some members, not all)",
                             "NaN, +inf, or every member -inf")
    return torch.log_softmax(log_weight.to(members), dim=-1)


def kernel_mixture(members: torch.Tensor, log_weight: torch.Tensor | None = None, bandwidth: float = 0.0) -> Mixture:
    """Gaussian kernels ``N(x_i, h^2 I)`` on the members ``(*b, N, d)``; ``h = 0``: the ensemble itself."""
    h = check_bandwidth(bandwidth)
    members = _check_points(members, "members")
    return Mixture(members, _log_weights(members, log_weight), h * h)


def _spectral(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
    return vecs, vals.clamp_min(0.0)


def gaussian_mixture(means: torch.Tensor, covs: torch.Tensor, log_weight: torch.Tensor | None = None) -> Mixture:
    """A general mixture from means ``(*b, K, d)`` and covariances ``(*b, K, d, d)`` (eigendecomposed once)."""
    means = _check_points(means, "means", "K")
    if not isinstance(covs, torch.Tensor) or covs.ndim < 2 or covs.shape[-2:] != (means.shape[-1], means.shape[-1]):
        raise ShapeError("covs", f"(..., {means.shape[-1]}, {means.shape[-1]}) matrices",
                         f"shape {tuple(getattr(covs, 'shape', ()))}")
    if not bool(torch.isfinite(covs).all()):
        raise NonFiniteError("covs", "finite covariances", "NaN or infinite entries")
    try:
        covs = covs.to(means).expand(*means.shape, means.shape[-1])
    except RuntimeError as exc:
        raise ShapeError("covs", f"one matrix per component, shape {tuple(means.shape) + (means.shape[-1],)}",
                         f"shape {tuple(covs.shape)}") from exc
    sym = 0.5 * (covs + covs.transpose(-1, -2))
    lowest = torch.linalg.eigvalsh(sym).amin(-1)
    scale = torch.diagonal(sym, dim1=-2, dim2=-1).abs().amax(-1).clamp_min(torch.finfo(means.dtype).tiny)
    if bool((lowest < -1e-10 * scale).any()):
        raise InputError("covs", "positive semi-definite covariances",
                         f"a smallest eigenvalue of {float(lowest.min()):.3g}")
    vecs, vals = _spectral(covs)
    return Mixture(means, _log_weights(means, log_weight), 0.0, vecs, vals)


def gaussian_prior(members: torch.Tensor, log_weight: torch.Tensor | None = None,
                   taper: torch.Tensor | None = None) -> Mixture:
    """One Gaussian with the (weighted) ensemble mean and covariance of ``members`` ``(*b, N, d)``.

    Without ``taper`` the covariance is kept in the rank-``N`` ensemble subspace (an SVD of the
    anomalies, ``O(N^2 d)``); with a ``(d, d)`` ``taper`` it is the Schur product ``taper o P``, full
    rank and dense (``O(d^3)`` once per analysis).
    """
    members = _check_points(members, "members")
    taper = _check_taper(taper, members)
    mean, anom = weighted_anomalies(members, _log_weights(members, log_weight).exp())   # P = anom^T anom
    zero = torch.zeros(members.shape[:-2] + (1,), dtype=members.dtype, device=members.device)
    if taper is None:
        _, sv, vt = torch.linalg.svd(anom, full_matrices=False)
        return Mixture(mean, zero, 0.0, vt.transpose(-1, -2).unsqueeze(-3), (sv**2).unsqueeze(-2))
    cov = (anom.transpose(-1, -2) @ anom) * taper
    vecs, vals = _spectral(cov)
    return Mixture(mean, zero, 0.0, vecs.unsqueeze(-3), vals.unsqueeze(-2))


def local_mixture(members: torch.Tensor, log_weight: torch.Tensor | None = None, neighbours: int = 10,
                  bandwidth: float = 0.5, taper: torch.Tensor | None = None) -> Mixture:
    """Kernels shaped by each member's neighbourhood, shrunk to keep the local spread.

    For member ``i`` let ``m_i`` and ``C_i`` be the mean and covariance of its ``neighbours`` nearest
    members (itself included). Kernel ``i`` is ``N(m_i + sqrt(1 - beta) (x_i - m_i), beta C_i)`` with
    ``beta = bandwidth`` in ``[0, 1]``: the kernels keep the neighbourhood's mean and covariance
    (Liu-West shrinkage, done locally so separate modes stay separate). ``beta = 0`` is the bare
    ensemble, ``beta = 1`` replaces each member by its neighbourhood's Gaussian. A ``(d, d)`` ``taper``
    localises every neighbourhood covariance (Schur product ``taper o C_i``).
    """
    beta = check_bandwidth(bandwidth, upper=1.0)
    members = _check_points(members, "members")
    taper = _check_taper(taper, members)
    n_mem = members.shape[-2]
    k = check_int(neighbours, "neighbours", 2)
    if k > n_mem:
        raise InputError("neighbours", f"at most the ensemble size {n_mem}", repr(neighbours))
    dist = torch.cdist(members, members)                                  # (*b, N, N)
    idx = dist.topk(k, dim=-1, largest=False).indices                     # (*b, N, k)
    nb = torch.gather(members.unsqueeze(-3).expand(*members.shape[:-2], n_mem, n_mem, members.shape[-1]), -2,
                      idx.unsqueeze(-1).expand(*idx.shape, members.shape[-1]))        # (*b, N, k, d)
    local_mean = nb.mean(-2)
    anom = nb - local_mean.unsqueeze(-2)
    cov = anom.transpose(-1, -2) @ anom / (k - 1)
    if taper is not None:
        cov = cov * taper
    centre = local_mean + math.sqrt(1.0 - beta) * (members - local_mean)
    vecs, vals = _spectral(beta * cov)
    return Mixture(centre, _log_weights(members, log_weight), 0.0, vecs, vals)


def fitted_mixture(members: torch.Tensor, log_weight: torch.Tensor | None = None, components: int = 2,
                   iterations: int = 200, tol: float = 1e-10, ridge: float = 1e-6,
                   taper: torch.Tensor | None = None) -> Mixture:
    """A ``components``-Gaussian mixture fitted to the (weighted) members by expectation-maximisation.

    Batched over leading dims, deterministic: the centres start at farthest-point picks (the heaviest
    member first, then repeatedly the member farthest from the chosen ones). Covariances get
    ``ridge * (trace / d)`` on the diagonal so a component with fewer members than dimensions stays
    proper. Stops after ``iterations`` or when the mean log-likelihood gains less than ``tol``. A
    ``(d, d)`` ``taper`` localises the covariances in every M-step (Schur product ``taper o Sigma_k``,
    then the ridge): the fitted model is then the one with localised covariances, and with a
    diagonal taper the components are axis-aligned.
    """
    k = check_int(components, "components", 1)
    members = _check_points(members, "members")
    n_mem, d = members.shape[-2], members.shape[-1]
    if k > n_mem:
        raise InputError("components", f"at most the ensemble size {n_mem}", repr(components))
    iterations = check_int(iterations, "iterations", 1)
    tol = check_real(tol, "tol", expected="a non-negative tolerance")
    if tol < 0:
        raise InputError("tol", "a non-negative tolerance", repr(tol))
    ridge = check_real(ridge, "ridge", positive=True, expected="a positive ridge (fraction of the mean variance)")
    taper = _check_taper(taper, members)
    lw = _log_weights(members, log_weight)
    w = lw.exp()
    # farthest-point initialisation
    first = lw.argmax(-1)
    idx = [first]
    mind = ((members - _take(members, first)) ** 2).sum(-1)
    for _ in range(1, k):
        nxt = mind.argmax(-1)
        idx.append(nxt)
        mind = torch.minimum(mind, ((members - _take(members, nxt)) ** 2).sum(-1))
    mean = torch.cat([_take(members, i) for i in idx], dim=-2)                    # (*b, K, d)
    anom = members - (w.unsqueeze(-1) * members).sum(-2, keepdim=True)
    total = (w.unsqueeze(-1) * anom**2).sum((-1, -2)) / d                         # mean variance (*b,)
    eye = torch.eye(d, dtype=members.dtype, device=members.device)
    cov = (total[..., None, None, None] * eye).expand(*mean.shape, d).clone()
    logpi = torch.full(mean.shape[:-1], -math.log(k), dtype=members.dtype, device=members.device)
    previous = None
    for _ in range(iterations):
        chol, info = torch.linalg.cholesky_ex(cov)                                 # (*b, K, d, d)
        if bool((info != 0).any()):
            raise InputError("ridge", "a ridge that keeps every fitted covariance positive definite",
                             f"ridge={ridge!r}" + (" with this taper" if taper is not None else ""),
                             hint="raise ridge" + (", or use a positive semi-definite taper" if taper is not None else ""))
        diff = members.unsqueeze(-3) - mean.unsqueeze(-2)                          # (*b, K, N, d)
        white = torch.linalg.solve_triangular(chol, diff.transpose(-1, -2), upper=False)   # (*b, K, d, N)
        logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        logp = logpi.unsqueeze(-1) - 0.5 * (white**2).sum(-2) - logdet.unsqueeze(-1)     # (*b, K, N)
        norm = torch.logsumexp(logp, dim=-2)                                       # (*b, N)
        score = (w * norm).sum(-1)
        resp = torch.exp(logp - norm.unsqueeze(-2)) * w.unsqueeze(-2)               # (*b, K, N)
        mass = resp.sum(-1).clamp_min(torch.finfo(members.dtype).tiny)
        logpi = torch.log(mass)
        mean = (resp @ members) / mass.unsqueeze(-1)
        diff = members.unsqueeze(-3) - mean.unsqueeze(-2)
        cov = (diff * resp.unsqueeze(-1)).transpose(-1, -2) @ diff / mass[..., None, None]
        if taper is not None:
            cov = cov * taper
        cov = cov + (ridge * total.clamp_min(torch.finfo(members.dtype).tiny))[..., None, None, None] * eye
        if previous is not None and bool(((score - previous).abs() < tol).all()):
            break
        previous = score
    vecs, vals = _spectral(cov)
    return Mixture(mean, torch.log_softmax(logpi, -1), 0.0, vecs, vals)


def _take(members: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``members[..., index, :]`` for a batch of indices ``(*b,)``; returns ``(*b, 1, d)``."""
    return torch.gather(members, -2, index[..., None, None].expand(*index.shape, 1, members.shape[-1]))


# -- evaluation ----------------------------------------------------------------------------------------------

def _fapply(mix: Mixture, f: Callable, z: torch.Tensor) -> torch.Tensor:
    """``f(Sigma_k) z_k`` for ``z`` ``(*b, M, K, d)``."""
    fc = f(torch.as_tensor(mix.floor, dtype=z.dtype, device=z.device))
    out = fc * z
    if mix.vecs is None:
        return out
    v = mix.vecs.unsqueeze(-4)                                             # (*b, 1, K, d, r)
    coef = (z.unsqueeze(-2) @ v).squeeze(-2)                               # (*b, M, K, r)
    coef = coef * (f(mix.vals) - fc).unsqueeze(-3)
    return out + (coef.unsqueeze(-2) @ v.transpose(-1, -2)).squeeze(-2)


def _logdet(mix: Mixture, f: Callable, d: int, like: torch.Tensor) -> torch.Tensor:
    """``log det f(Sigma_k)`` ``(*b, K)`` (or a scalar for isotropic components)."""
    fc = f(torch.as_tensor(mix.floor, dtype=like.dtype, device=like.device))
    if mix.vecs is None:
        return d * torch.log(fc)
    r = mix.vals.shape[-1]
    return torch.log(f(mix.vals)).sum(-1) + (d - r) * torch.log(fc)


class _Noised(NamedTuple):
    log_prior: torch.Tensor      # (*b, M, K) unnormalised log-responsibility logits
    z: torch.Tensor | None       # (*b, M, K, d) x - alpha mu_k (None on the isotropic fast path)
    scores: torch.Tensor | None  # (*b, M, K, d) per-component scores
    prior_score: torch.Tensor    # (*b, M, d)


def _noised(mix: Mixture, x: torch.Tensor, alpha: float, s2: float, per_component: bool) -> _Noised:
    d = x.shape[-1]
    if mix.isotropic and not per_component:
        v = alpha * alpha * mix.floor + s2
        mu = mix.mean
        cross = x @ mu.transpose(-1, -2)                                   # (*b, M, K)
        dist2 = ((x * x).sum(-1, keepdim=True) - 2 * alpha * cross
                 + alpha * alpha * (mu * mu).sum(-1).unsqueeze(-2)).clamp_min(0.0)
        logits = mix.log_weight.unsqueeze(-2) - 0.5 * dist2 / v
        resp = torch.softmax(logits, dim=-1)
        return _Noised(logits, None, None, -(x - alpha * (resp @ mu)) / v)
    z = x.unsqueeze(-2) - alpha * mix.mean.unsqueeze(-3)                   # (*b, M, K, d)
    prec_z = _fapply(mix, lambda s: 1.0 / (alpha * alpha * s + s2), z)
    logdet = _logdet(mix, lambda s: alpha * alpha * s + s2, d, x)
    logits = mix.log_weight.unsqueeze(-2) - 0.5 * (z * prec_z).sum(-1) - 0.5 * (logdet.unsqueeze(-2) if logdet.ndim else logdet)
    resp = torch.softmax(logits, dim=-1)
    return _Noised(logits, z, -prec_z, -(resp.unsqueeze(-1) * prec_z).sum(-2))


def mixture_score(mix: Mixture, x: torch.Tensor, alpha: float, sigma2: float) -> torch.Tensor:
    """Score ``grad log sum_k w_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)`` at ``x`` ``(*b, M, d)``."""
    _check_mixture(mix)
    mix, x = _common(mix, _check_particles(x, mix))
    alpha, sigma2 = _check_noise_level(alpha, sigma2)
    return _noised(mix, x, alpha, sigma2, per_component=False).prior_score


def _check_particles(x, mix: Mixture) -> torch.Tensor:
    x = _check_points(x, "x", "M")
    if x.shape[-1] != mix.mean.shape[-1]:
        raise ShapeError("x", f"particles of length {mix.mean.shape[-1]} (the mixture's)", f"shape {tuple(x.shape)}")
    return x


def _check_operator(operator, y, state_size: int) -> None:
    from ..models.observations import Observation

    if not isinstance(operator, Observation):
        raise InputError("operator", "a daml.models Observation", type(operator).__name__)
    if operator.state_size != state_size:
        raise ShapeError("operator", f"an operator on states of length {state_size}",
                         f"one on states of length {operator.state_size}")
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.ndim < 1:
        raise InputError("y", f"a real floating torch tensor (*b, {operator.size})", type(y).__name__)
    if y.shape[-1] != operator.size:
        raise ShapeError("y", f"{operator.size} observations (the operator's size)", f"shape {tuple(y.shape)}")
    if bool(torch.isinf(y).any()):
        raise NonFiniteError("y", "finite observations (NaN marks a missing one)", "infinite entries")


def _broadcasts_to(shape, target) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without enlarging it."""
    try:
        return tuple(torch.broadcast_shapes(shape, target)) == tuple(target)
    except RuntimeError:
        return False


def _check_mask(mask, y) -> torch.Tensor:
    if mask is None:
        return torch.isfinite(y)
    if not isinstance(mask, torch.Tensor) or not _broadcasts_to(mask.shape, y.shape):
        raise ShapeError("mask", f"a boolean tensor shaped like y {tuple(y.shape)}",
                         f"{type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}")
    mask = mask.to(torch.bool).expand(y.shape)
    if bool((mask & torch.isnan(y)).any()):
        raise NonFiniteError("y", "finite observations where mask is True (NaN only where unobserved)",
                             f"{int((mask & torch.isnan(y)).sum())} NaN entries marked observed")
    return mask


class Linearisation(NamedTuple):
    """An observation linearised at each component mean: ``h(x) ~ h(mu_k) + H_k (x - mu_k)``.

    ``innovation`` ``(*b, K, p)`` is ``y - h(mu_k)`` (zero where unobserved), ``matrix`` ``(*b, K, p, d)``
    or ``(p, d)`` (zero rows where unobserved), ``noise_cov`` ``(*b, p, p)`` or ``(p, p)`` with identity
    rows and columns where unobserved, ``loglik`` ``(*b, K)`` the exact ``log p(y | mu_k)``.
    """

    innovation: torch.Tensor
    matrix: torch.Tensor | None
    noise_cov: torch.Tensor
    loglik: torch.Tensor


def linearise(mix: Mixture, y: torch.Tensor, operator, mask: torch.Tensor | None = None,
              jacobians: bool = True) -> Linearisation:
    """:class:`Linearisation` of a :class:`~daml.models.Observation` at the means of ``mix``.

    ``y`` ``(*b, p)`` (NaN allowed where ``mask`` is ``False``; ``mask=None`` observes the finite
    entries). ``jacobians=False`` skips the Jacobian (zero-bandwidth kernels never need it).
    """
    from ..filters.base import gaussian_loglik

    _check_mixture(mix)
    mu = mix.mean
    _check_operator(operator, y, mu.shape[-1])
    mask = _check_mask(mask, y)
    innov = operator.residual(y.unsqueeze(-2).to(mu), mu)                    # (*b, K, p)
    loglik = gaussian_loglik(innov, operator.noise_cov, mask)
    zero = torch.zeros((), dtype=mu.dtype, device=mu.device)
    innov = torch.where(mask.unsqueeze(-2), innov, zero)
    hmat = None
    if jacobians:
        hmat = operator.matrix.to(mu) if operator.linear else operator.jacobian(mu)
    r = operator.noise_cov.to(mu)
    if not bool(mask.all()):
        eye = torch.eye(r.shape[-1], dtype=mu.dtype, device=mu.device)
        r = torch.where(mask.unsqueeze(-1) & mask.unsqueeze(-2), r, eye)
        if hmat is not None:
            hmat = torch.where(mask[..., None, :, None], _per_k(hmat, mix), zero)
    return Linearisation(innov, hmat, r, loglik)


def exact_forcing(mix: Mixture, lin: Linearisation, x: torch.Tensor, alpha: float, sigma2: float,
                  forcing: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The exact Chapman-Kolmogorov likelihood forcing ``grad_x log p(y | x^t)`` for the mixture prior.

    Returns ``(forcing, posterior_score)``, both ``(*b, M, d)``; the posterior score is the prior
    score plus the forcing, computed without cancellation. ``forcing=False`` skips the prior score
    and returns ``None`` for the forcing (what a sampler needs).
    """
    _check_mixture(mix)
    if not isinstance(lin, Linearisation):
        raise InputError("lin", "a Linearisation from linearise()", type(lin).__name__)
    mix, x = _common(mix, _check_particles(x, mix))
    lin = _lin_as(lin, x.dtype)
    alpha, sigma2 = _check_noise_level(alpha, sigma2)
    zero_width = mix.isotropic and mix.floor == 0.0
    if zero_width:                      # P_k = 0 and K_k = 0: only the weights change
        mu = mix.mean
        cross = x @ mu.transpose(-1, -2)
        dist2 = ((x * x).sum(-1, keepdim=True) - 2 * alpha * cross
                 + alpha * alpha * (mu * mu).sum(-1).unsqueeze(-2)).clamp_min(0.0)
        logits = (mix.log_weight + lin.loglik).unsqueeze(-2) - 0.5 * dist2 / sigma2
        post = -(x - alpha * (torch.softmax(logits, dim=-1) @ mu)) / sigma2
        if not forcing:
            return None, post
        return post - mixture_score(mix, x, alpha, sigma2), post
    if lin.matrix is None:
        raise InputError("lin", "a Linearisation with Jacobians for kernels of positive width", "jacobians=False")
    pri = _noised(mix, x, alpha, sigma2, per_component=True)
    gain = lambda s: alpha * s / (alpha * alpha * s + sigma2)               # noqa: E731
    cond = lambda s: s * sigma2 / (alpha * alpha * s + sigma2)             # noqa: E731
    hmat = lin.matrix
    kz = _fapply(mix, gain, pri.z)                                         # K_k (x - alpha mu_k)  (*b, M, K, d)
    innov = lin.innovation.unsqueeze(-3) - torch.einsum("...mkd,...kpd->...mkp", kz, _per_k(hmat, mix))
    s_mat = lin.noise_cov.unsqueeze(-3) + _h_cov_ht(mix, cond, hmat, x)    # (*b, K, p, p)
    chol = torch.linalg.cholesky(s_mat)
    white = torch.linalg.solve_triangular(chol.unsqueeze(-4), innov.unsqueeze(-1), upper=False).squeeze(-1)
    log_l = -0.5 * (white**2).sum(-1) - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1).unsqueeze(-2)
    w = torch.softmax(pri.log_prior + log_l, dim=-1)                       # (*b, M, K)
    sinv_d = torch.linalg.solve_triangular(chol.unsqueeze(-4).transpose(-1, -2), white.unsqueeze(-1),
                                           upper=True).squeeze(-1)         # S_k^-1 innovation
    ht = torch.einsum("...mkp,...kpd->...mkd", sinv_d, _per_k(hmat, mix))
    comp = pri.scores + _fapply(mix, gain, ht)                             # s_k + K_k H^T S^-1 d
    post = (w.unsqueeze(-1) * comp).sum(-2)
    return (post - pri.prior_score if forcing else None), post


def _lin_as(lin: Linearisation, dtype: torch.dtype) -> Linearisation:
    if lin.innovation.dtype == dtype:
        return lin
    return Linearisation(*(None if t is None else t.to(dtype) for t in lin))


def _per_k(hmat: torch.Tensor, mix: Mixture) -> torch.Tensor:
    """``H`` with a component axis: ``(*b, K, p, d)`` (a view for a shared matrix)."""
    if hmat.ndim == 2:
        return hmat.expand(*mix.mean.shape[:-1], *hmat.shape)
    return hmat


def _h_cov_ht(mix: Mixture, f: Callable, hmat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``H_k f(Sigma_k) H_k^T`` ``(*b, K, p, p)``."""
    hk = _per_k(hmat, mix)
    fc = f(torch.as_tensor(mix.floor, dtype=like.dtype, device=like.device))
    out = fc * (hk @ hk.transpose(-1, -2))
    if mix.vecs is not None:
        hv = hk @ mix.vecs                                                  # (*b, K, p, r)
        out = out + (hv * (f(mix.vals) - fc).unsqueeze(-2)) @ hv.transpose(-1, -2)
    return out


def ensemble_forcing(gauss: Mixture, members: torch.Tensor, loglik: torch.Tensor, x: torch.Tensor, alpha: float,
                     sigma2: float, conditional: bool = False) -> torch.Tensor:
    """The seed's ensemble likelihood forcing ``(alpha / sigma^2) (xbar_w - m_t(x))`` ``(*b, M, d)``.

    ``gauss`` is a one-component :func:`gaussian_prior` (the joint-Gaussian statistics), ``members``
    ``(*b, N, d)`` with ``loglik`` ``(*b, N)`` ``= log p(y | x_i)``; see the module docstring.
    """
    _check_mixture(gauss, "gauss")
    if gauss.vecs is None or gauss.mean.shape[-2] != 1:
        raise InputError("gauss", "a one-component gaussian_prior()", f"{gauss.mean.shape[-2]} components")
    members = _check_points(members, "members")
    if members.shape[-1] != gauss.mean.shape[-1] or members.shape[:-2] != gauss.mean.shape[:-2]:
        raise ShapeError("members", f"shape {tuple(gauss.mean.shape[:-2])} + (N, {gauss.mean.shape[-1]}) "
                         "(the batch and state length of gauss)", f"shape {tuple(members.shape)}")
    x = _check_particles(x, gauss)
    if not isinstance(loglik, torch.Tensor):
        raise DtypeError("loglik", f"a real torch tensor of shape {tuple(members.shape[:-1])}", type(loglik).__name__)
    loglik = _device.as_tensor(loglik, "loglik")
    if loglik.shape != members.shape[:-1]:
        raise ShapeError("loglik", f"shape {tuple(members.shape[:-1])} (one per member)", f"shape {tuple(loglik.shape)}")
    if bool(torch.isnan(loglik).any()) or bool((loglik == math.inf).any()) \
            or not bool(torch.isfinite(loglik).any(-1).all()):
        raise NonFiniteError("loglik", "log-likelihoods that are finite or -inf (not -inf for every member)",
                             "NaN, +inf, or every member -inf")
    alpha, sigma2 = _check_noise_level(alpha, sigma2)
    dtype = torch.promote_types(torch.promote_types(gauss.mean.dtype, x.dtype), members.dtype)
    gauss, x, members, loglik = _as_dtype(gauss, dtype), x.to(dtype), members.to(dtype), loglik.to(dtype)
    m = gauss.mean                                                          # (*b, 1, d)
    gain = lambda s: alpha * s / (alpha * alpha * s + sigma2)               # noqa: E731
    z = (x - alpha * m).unsqueeze(-2)                                       # (*b, M, 1, d)
    m_t = m + _fapply(gauss, gain, z).squeeze(-2)                           # (*b, M, d)
    logits = loglik.unsqueeze(-2).expand(*x.shape[:-1], loglik.shape[-1])
    if conditional:
        v = gauss.vecs[..., 0, :, :]                                        # (*b, d, r)
        p_t = gauss.vals[..., 0, :] * sigma2 / (alpha * alpha * gauss.vals[..., 0, :] + sigma2)   # (*b, r)
        keep = p_t > p_t.amax(-1, keepdim=True) * 1e-12
        inv = torch.where(keep, 1.0 / torch.where(keep, p_t, 1.0), 0.0)
        diff = (members @ v).unsqueeze(-3) - (m_t @ v).unsqueeze(-2)        # (*b, M, N, r)
        logits = logits - 0.5 * (diff**2 * inv.unsqueeze(-2).unsqueeze(-2)).sum(-1)
    w = torch.softmax(logits, dim=-1)
    return (alpha / sigma2) * (w @ members - m_t)


def likelihood_score(x: torch.Tensor, y: torch.Tensor, operator, mask: torch.Tensor) -> torch.Tensor:
    """``grad_x log p(y | x)`` ``(*b, M, d)`` at the particles themselves (automatic differentiation
    through ``operator.residual``; the EnSF likelihood term)."""
    from ..filters.base import gaussian_loglik

    x = _check_points(x, "x", "M")
    _check_operator(operator, y, x.shape[-1])
    mask = _check_mask(mask, y)
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        innov = operator.residual(y.unsqueeze(-2), xr)
        ll = gaussian_loglik(torch.where(mask.unsqueeze(-2), innov, 0.0), operator.noise_cov, mask)
        (grad,) = torch.autograd.grad(ll.sum(), xr)
    return grad
