"""Property-based and mutation fuzzing of every public name of daml (issue 26, item 5).

Each call with a bad input must give a daml error (``daml.errors.DamlError``) or a correct finite
answer: never another library's internal error, never a silent NaN/inf, never a hang. The harness is
``tests/_fuzz.py``; ``benchmarks/fuzz_report.py`` runs it over everything and writes the counts.

Pairs that still fail are listed, with a reason, in ``_fuzz.KNOWN``; the sweep fails on a failure
outside that list and on a listed pair that now passes (remove it: the list only shrinks).
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

sys.path.insert(0, os.path.dirname(__file__))
import _fuzz  # noqa: E402

import daml  # noqa: E402
from daml import diagnostics as dg, errors as er, posterior as P, resampling as R  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def specs():
    return _fuzz.build_specs()


def _check_against_known(outcomes, known):
    failing = {(o.func, o.mutation): o for o in outcomes if o.category in _fuzz.FAILURES}
    ran = {(o.func, o.mutation) for o in outcomes}
    new = [f"{o.category:9s} {o.func} [{o.mutation}] {o.detail}" for k, o in failing.items() if k not in known]
    fixed = [f"{k[0]} [{k[1]}]" for k in known if k in ran and k not in failing and not known[k].startswith("hang")]
    # a known hang that finishes now may only have been slow under load once: say so, without failing
    slow = [f"{k[0]} [{k[1]}]" for k in known if k in ran and k not in failing and known[k].startswith("hang")]
    if slow:
        warnings.warn("pairs listed in _fuzz.KNOWN as hangs finish now (remove them if they do so reliably): "
                      + ", ".join(slow))
    msg = []
    if new:
        msg.append("calls that give another library's error, a silent NaN/inf or hang (not in _fuzz.KNOWN):\n  "
                   + "\n  ".join(new))
    if fixed:
        msg.append("these pairs in _fuzz.KNOWN pass now; remove them from KNOWN in tests/_fuzz.py:\n  "
                   + "\n  ".join(fixed))
    assert not msg, "\n".join(msg)


def test_every_public_name_is_fuzzed_or_listed_as_not_callable(specs):
    assert _fuzz.uncovered(specs) == []
    public = {f"{m}.{n}" for m, n in _fuzz.public_names()}
    stale = sorted(set(_fuzz.NOT_CALLABLE) - public)
    assert not stale, f"NOT_CALLABLE names that are no longer public: {stale}"
    for modname, n in _fuzz.public_names():
        if f"{modname}.{n}" in _fuzz.NOT_CALLABLE and n != "PosteriorAccessor":
            obj = getattr(__import__(modname, fromlist=[n]), n)
            # a name listed as not callable is a constant, a module, an exception/warning or a result type
            assert (not callable(obj) or isinstance(obj, type) or type(obj).__name__ == "module"), (modname, n)


def test_mutation_sweep_light(specs):
    """The baseline and every mutation of every light spec: failures only where KNOWN says so, and every KNOWN
    one still fails."""
    outcomes = _fuzz.sweep(specs, seconds=5.0, include_heavy=False)
    _check_against_known(outcomes, _fuzz.KNOWN)


@pytest.mark.slow
def test_mutation_sweep_heavy(specs):
    outcomes = _fuzz.sweep([s for s in specs if s.heavy], seconds=20.0, include_heavy=True)
    _check_against_known(outcomes, _fuzz.KNOWN)


@pytest.mark.parametrize("key", sorted(_fuzz.FIXED_WRONG))
def test_wrong_answers_found_by_the_hunt_stay_fixed(key):
    reason, is_right = _fuzz.FIXED_WRONG[key]
    assert is_right(), f"{key} gives the wrong answer again: {reason}"


def test_classifier_tells_the_categories_apart():
    """The classifier itself: a named daml error, a leaked internal error, a silent NaN, a hang."""
    def named():
        raise er.InputError("weights", "finite", "nan")

    def leaked():
        return torch.ones(2) @ torch.ones(3)

    def spin():
        while True:
            pass
    assert _fuzz.classify(named, "weights")[0] == "clear"
    assert _fuzz.classify(named, "seed")[0] == "unnamed"
    assert _fuzz.classify(leaked, "x")[0] == "other"
    assert _fuzz.classify(lambda: torch.tensor([1.0, math.nan]), "x")[0] == "nonfinite"
    assert _fuzz.classify(lambda: torch.tensor([1.0, math.nan]), "x", baseline_nonfinite=1)[0] == "ok"
    assert _fuzz.classify(spin, "x", seconds=0.2)[0] == "hang"
    assert _fuzz.classify(lambda: np.empty(_fuzz.HUGE), "n")[0] in ("hang", "other")


# ----------------------------------------------------------------------------------------------------
# hypothesis: random arrays (any dtype, shape, NaN/inf) into the array kernels, with oracles when finite
# ----------------------------------------------------------------------------------------------------

DTYPES = st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.complex128, np.bool_])


def _elements(dt):
    if dt in (np.float64, np.float32):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if dt == np.float64 else 32)
    return None


def arrays(min_dims=0, max_dims=2, max_side=5):
    return DTYPES.flatmap(lambda dt: hnp.arrays(
        dt, hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=max_side),
        elements=_elements(dt)))


def _kinds(a) -> set:
    """The harness's mutation labels that describe array ``a`` (to look failures up in KNOWN)."""
    a = np.asarray(a)
    out = set()
    if a.size == 0:
        out.add("empty")
    if a.ndim == 0:
        out.add("scalar")
    if np.issubdtype(a.dtype, np.inexact):
        if np.isnan(a).any():
            out.add("nan")
        if np.isinf(a).any():
            out |= {"inf", "posinf"} if (a == np.inf).any() else {"inf"}
            if np.all(a == -np.inf):
                out.add("all_neginf")
    out.add({np.dtype(np.int64): "int", np.dtype(np.float16): "float16", np.dtype(np.complex128): "complex",
             np.dtype(np.bool_): "int"}.get(a.dtype, "float"))
    if a.ndim >= 1 and a.shape[0] == 1:
        out.add("one_member")
    return out


def _run(thunk, func, argument, a=None):
    """Classify; a failure is allowed only where the sweep's KNOWN already lists it for this kind of input."""
    cat, detail, result = _fuzz.classify(thunk, argument, 0, 10.0)
    if cat in _fuzz.FAILURES:
        known = [k for k in _kinds(a) if (func, f"{argument}={k}") in _fuzz.KNOWN] if a is not None else []
        assert known, f"{func}({argument}={a!r}): {cat}: {detail} (not in _fuzz.KNOWN)"
        return "known", None
    return cat, result


@SETTINGS
@given(arrays(min_dims=1, max_dims=1, max_side=8))
def test_ess_kernel_is_an_error_or_between_one_and_n(a):
    cat, ess = _run(lambda: dg.ess_kernel(torch.as_tensor(a)), "daml.diagnostics.ess_kernel", "log_weight", a)
    if cat == "ok":
        n = a.shape[-1]
        assert 1.0 - 1e-5 <= float(ess) <= n * (1 + 1e-5)


@SETTINGS
@given(arrays(min_dims=1, max_dims=1, max_side=8))
def test_normalise_log_weight_sums_to_one(a):
    cat, lw = _run(lambda: P.normalise_log_weight(torch.as_tensor(a)), "daml.posterior.normalise_log_weight",
                   "log_weight", a)
    if cat == "ok":
        assert abs(float(torch.logsumexp(lw.double(), -1))) < 1e-3


@SETTINGS
@given(arrays(min_dims=1, max_dims=1, max_side=8), st.sampled_from(sorted(R.METHODS)))
def test_resampling_gives_valid_ancestors(w, method):
    cat, idx = _run(lambda: R.resample(w, method, seed=0), "daml.resampling.resample", "weights", w)
    if cat == "ok":
        wf = np.asarray(w, dtype=float)
        assert idx.shape == (len(w),)
        assert bool(((idx >= 0) & (idx < len(w))).all())
        assert np.all(wf[idx.numpy()] > 0), "an ancestor of zero weight was drawn"


@SETTINGS
@given(arrays(min_dims=1, max_dims=3, max_side=4), arrays(min_dims=0, max_dims=1, max_side=4))
def test_from_members_valid_posterior_or_error(m, lw):
    arg = "members" if _kinds(m) - {"float", "one_member"} else "log_weight"
    cat, ds = _run(lambda: daml.from_members(m, lw if lw.ndim else None), "daml.posterior.from_members", arg,
                   m if arg == "members" else lw)
    if cat == "ok":
        daml.validate(ds)
        assert np.isfinite(ds["x"].values).all() and np.isfinite(ds["log_weight"].values).all()
        tol = 1e-9 if ds["log_weight"].dtype == np.float64 else 1e-3
        assert abs(float(np.logaddexp.reduce(ds["log_weight"].values.astype(float)))) < tol


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 3), st.floats(-1e3, 1e3), st.data())
def test_crps_kernel_matches_the_sorted_formula(m, _, y, data):
    x = np.asarray(data.draw(hnp.arrays(np.float64, m, elements=st.floats(-1e3, 1e3))))
    w = np.full(m, 1.0 / m)
    cat, got = _run(lambda: dg.crps_kernel(torch.as_tensor(x), torch.as_tensor(w), torch.tensor(y, dtype=torch.float64)),
                    "daml.diagnostics.crps_kernel", "x")
    assert cat == "ok"
    want = np.mean(np.abs(x - y)) - 0.5 * np.mean(np.abs(x[:, None] - x[None, :]))
    assert abs(float(got) - want) <= 1e-9 * (1 + abs(want)) + 1e-9 * np.abs(x).max()


@SETTINGS
@given(st.one_of(st.integers(-5, 10 ** 13), st.floats(allow_nan=True), st.none(), st.text(max_size=3),
                 st.booleans()), st.integers(-2, 3))
def test_check_int_refuses_with_the_name_or_returns_an_int(value, minimum):
    cat, got = _run(lambda: er.check_int(value, "n", minimum), "daml.errors.check_int", "n")
    if cat == "ok":
        assert isinstance(got, int) and got >= minimum and got == value
    else:
        assert cat == "clear"


@SETTINGS
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.none(), st.text(max_size=2),
                 st.complex_numbers()), st.booleans())
def test_check_real_refuses_with_the_name_or_returns_a_finite_float(value, positive):
    cat, got = _run(lambda: er.check_real(value, "x", positive), "daml.errors.check_real", "x")
    if cat == "ok":
        assert math.isfinite(got) and (got > 0 or not positive)
    else:
        assert cat == "clear"


@SETTINGS
@given(arrays(min_dims=1, max_dims=1, max_side=6), st.floats(allow_nan=True, allow_infinity=True))
def test_gaspari_cohn_is_a_taper_in_zero_one(d, support):
    from daml.filters import gaspari_cohn
    cat, taper = _run(lambda: gaspari_cohn(torch.as_tensor(d), support), "daml.filters.gaspari_cohn", "distance", d)
    if cat == "ok":
        t = taper.double()
        assert bool(((t >= -1e-12) & (t <= 1 + 1e-12)).all())


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 5), st.floats(1e-3, 10.0), st.data())
def test_sinkhorn_marginals_or_error(m, n, eps, data):
    from daml.transport import sinkhorn
    cost = data.draw(hnp.arrays(np.float64, (m, n), elements=st.floats(0, 10)))
    cat, res = _run(lambda: sinkhorn(torch.as_tensor(cost), epsilon=eps, max_iter=2000, tol=1e-9, warn=False),
                    "daml.transport.sinkhorn", "cost")
    if cat == "ok" and bool(res.converged.all()):
        p = res.plan()
        assert torch.allclose(p.sum(-1), torch.full((m,), 1.0 / m, dtype=p.dtype), atol=1e-6)
        assert torch.allclose(p.sum(-2), torch.full((n,), 1.0 / n, dtype=p.dtype), atol=1e-6)


WEIGHTS = hnp.arrays(np.float64, st.integers(1, 8), elements=st.floats(0, 1e3))


@SETTINGS
@given(WEIGHTS, st.sampled_from(["systematic", "residual"]))
def test_systematic_and_residual_counts_round_n_times_the_weight(w, method):
    """Systematic resampling gives floor or ceil of n w_i copies of member i; residual at least the floor."""
    cat, idx = _run(lambda: R.resample(w, method, seed=1), "daml.resampling.resample", "weights", w)
    if cat != "ok":
        return
    n = len(w)
    counts = np.bincount(idx.numpy(), minlength=n)
    expect = n * w / w.sum()
    assert counts.sum() == n
    assert np.all(counts >= np.floor(expect - 1e-9))
    if method == "systematic":
        assert np.all(counts <= np.ceil(expect + 1e-9))


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 3), st.data())
def test_posterior_mean_and_var_match_numpy(m, d, data):
    x = data.draw(hnp.arrays(np.float64, (m, d), elements=st.floats(-1e6, 1e6)))
    lw = data.draw(hnp.arrays(np.float64, m, elements=st.floats(-30, 30)))
    cat, post = _run(lambda: daml.from_members(x, lw), "daml.posterior.from_members", "members", x)
    if cat != "ok":
        return
    w = np.exp(lw - np.logaddexp.reduce(lw))
    mean = np.average(x, axis=0, weights=w)
    var = np.average((x - mean) ** 2, axis=0, weights=w)
    scale = 1 + np.abs(x).max()
    assert np.allclose(post.daml.mean()["x"].values, mean, rtol=1e-9, atol=1e-9 * scale)
    assert np.allclose(post.daml.var()["x"].values, var, rtol=1e-6, atol=1e-9 * scale ** 2)


# ----------------------------------------------------------------------------------------------------
# oracles for finite, valid inputs: the answer must be right, not only finite
# ----------------------------------------------------------------------------------------------------

@SETTINGS
@given(hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(-10, 10)), st.floats(0.1, 5.0))
def test_gaspari_cohn_matches_its_formula(d, support):
    from daml.filters import gaspari_cohn
    z = np.abs(d) / (support / 2)
    inner = 1 - 5 / 3 * z**2 + 5 / 8 * z**3 + 1 / 2 * z**4 - 1 / 4 * z**5
    with np.errstate(divide="ignore"):
        outer = 4 - 5 * z + 5 / 3 * z**2 + 5 / 8 * z**3 - 1 / 2 * z**4 + 1 / 12 * z**5 - 2 / (3 * z)
    want = np.where(z <= 1, inner, np.where(z < 2, outer, 0.0))
    got = gaspari_cohn(torch.as_tensor(d), support).double().numpy()
    assert np.allclose(got, want, atol=1e-12)


@SETTINGS
@given(st.integers(1, 10 ** 6))
def test_pareto_khat_threshold_formula(n):
    cat, got = _run(lambda: dg.pareto_khat_threshold(n), "daml.diagnostics.pareto_khat_threshold", "n")
    if cat == "ok":
        want = min(1 - 1 / math.log10(n), 0.7) if n > 1 else None
        assert want is not None, f"pareto_khat_threshold({n}) = {got}: 1 - 1/log10(1) is -inf"
        assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12)


@SETTINGS
@given(st.integers(1, 7), st.floats(0.01, 10.0), st.floats(0.0, 5.0))
def test_periodic_covariance_is_symmetric_positive_definite(n, variance, length):
    from daml.models import periodic_covariance
    c = periodic_covariance(n, variance, length, dtype=torch.float64)
    assert torch.allclose(c, c.T)
    assert torch.allclose(torch.diagonal(c), torch.full((n,), variance, dtype=torch.float64), rtol=1e-6)
    ev = torch.linalg.eigvalsh(c)
    assert float(ev.min()) >= -1e-12 * float(ev.max())      # a covariance, up to rounding


@SETTINGS
@given(st.integers(1, 50), st.floats(1e-6, 0.5), st.sampled_from(["log", "uniform"]))
def test_time_grid_runs_from_one_down_to_t_min(steps, t_min, spacing):
    from daml.diffusion import time_grid
    t = np.asarray(time_grid(steps, t_min, spacing))
    assert len(t) == steps + 1
    assert math.isclose(t[0], 1.0) and math.isclose(t[-1], t_min, rel_tol=1e-9)
    assert np.all(np.diff(t) < 0)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 3), st.data())
def test_gaussian_loglik_matches_scipy(k, m, data):
    from scipy.stats import multivariate_normal
    from daml.filters import gaussian_loglik
    d = data.draw(hnp.arrays(np.float64, (k, m), elements=st.floats(-5, 5)))
    a = data.draw(hnp.arrays(np.float64, (m, m), elements=st.floats(-1, 1)))
    cov = a @ a.T + 0.5 * np.eye(m)
    got = gaussian_loglik(torch.as_tensor(d), torch.as_tensor(cov), torch.ones(m, dtype=torch.bool)).numpy()
    want = multivariate_normal(np.zeros(m), cov).logpdf(d)
    assert np.allclose(got, np.atleast_1d(want), atol=1e-9)


@SETTINGS
@given(st.integers(2, 6), st.data())
def test_posterior_quantiles_are_ordered_and_inside_the_members(m, data):
    x = data.draw(hnp.arrays(np.float64, (m, 2), elements=st.floats(-100, 100)))
    lw = data.draw(hnp.arrays(np.float64, m, elements=st.floats(-5, 5)))
    qs = sorted(data.draw(st.lists(st.floats(0, 1), min_size=2, max_size=4)))
    post = daml.from_members(x, lw)
    q = post.daml.quantile(qs)["x"].values          # (quantile, variable)
    assert np.all(np.diff(q, axis=0) >= -1e-9)
    assert np.all(q >= x.min(0) - 1e-9) and np.all(q <= x.max(0) + 1e-9)


@SETTINGS
@given(hnp.arrays(np.float64, st.integers(1, 8), elements=st.floats(0, 1)), st.data())
def test_offspring_counts_are_a_bincount(w, data):
    n = len(w)
    anc = np.asarray(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8)))
    got = R.offspring_counts(anc, n).numpy()
    assert np.array_equal(got, np.bincount(anc, minlength=n))


@SETTINGS
@given(hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(-60, 60)))
def test_saturation_vapour_pressure_is_positive_and_increasing(ta):
    from daml.causal import saturation_vapour_pressure
    ta = np.sort(ta)
    es = np.asarray(saturation_vapour_pressure(ta), dtype=float)
    assert np.all(es > 0) and np.all(np.diff(es) >= 0)


def _weighted_case(data, max_m=6, d=2):
    m = data.draw(st.integers(2, max_m))
    x = data.draw(hnp.arrays(np.float64, (m, d), elements=st.floats(-50, 50)))
    lw = data.draw(hnp.arrays(np.float64, m, elements=st.floats(-4, 4)))
    y = data.draw(hnp.arrays(np.float64, d, elements=st.floats(-50, 50)))
    w = np.exp(lw - np.logaddexp.reduce(lw))
    post = daml.from_members(x, lw)
    return x, w, y, post, xr.DataArray(y, dims=("variable",))


@SETTINGS
@given(st.data())
def test_weighted_scores_match_their_closed_forms(data):
    """CRPS, PIT, RMSE, spread and ESS of a weighted ensemble against the formulas in their docstrings."""
    x, w, y, post, truth = _weighted_case(data)
    crps = w @ np.abs(x - y) - 0.5 * np.einsum("i,j,ijk->k", w, w, np.abs(x[:, None] - x[None]))
    assert np.allclose(dg.crps(post, truth)["x"].values if hasattr(dg.crps(post, truth), "data_vars")
                       else dg.crps(post, truth).values, crps, rtol=1e-9, atol=1e-9)
    pit = w @ (x < y) + 0.5 * (w @ (x == y))
    got = dg.pit(post, truth)
    assert np.allclose(got["x"].values if hasattr(got, "data_vars") else got.values, pit, atol=1e-12)
    mean = w @ x
    rmse = dg.rmse(post, truth)
    assert np.allclose(float(rmse["x"] if hasattr(rmse, "data_vars") else rmse),
                       np.sqrt(np.mean((mean - y) ** 2)), rtol=1e-9, atol=1e-9)
    s2 = w @ (x - mean) ** 2 / (1 - np.sum(w**2))
    spread = dg.spread(post)
    if np.sum(w**2) < 1 - 1e-6:
        assert np.allclose(float(spread["x"] if hasattr(spread, "data_vars") else spread), np.sqrt(np.mean(s2)),
                           rtol=1e-6, atol=1e-9)
    assert np.isclose(float(dg.ess(post)), 1 / np.sum(w**2), rtol=1e-9)


@SETTINGS
@given(st.integers(2, 6), st.data())
def test_ensemble_transform_keeps_the_weighted_mean(m, data):
    """The ETPF transform is a Markov matrix with the weights as stationary row sums: the new equal-weight
    mean is the old weighted mean (to the solver's tolerance); with second_order also the covariance."""
    from daml.transport import ensemble_transform
    x = data.draw(hnp.arrays(np.float64, (m, 2), elements=st.floats(-10, 10)))
    lw = data.draw(hnp.arrays(np.float64, m, elements=st.floats(-3, 3)))
    second = data.draw(st.booleans())
    cat, res = _run(lambda: ensemble_transform(torch.as_tensor(x), torch.as_tensor(lw), max_iter=5000, tol=1e-10,
                                               second_order=second), "daml.transport.ensemble_transform", "x", x)
    if cat != "ok" or not bool(res.converged.all()):
        return
    w = np.exp(lw - np.logaddexp.reduce(lw))
    scale = 1 + np.abs(x).max()
    assert np.allclose(res.x.numpy().mean(0), w @ x, atol=1e-6 * scale)
    if second:
        c_new = np.cov(res.x.numpy().T, bias=True)
        c_w = np.cov(x.T, aweights=w, bias=True)
        assert np.allclose(c_new, c_w, atol=1e-5 * scale**2)


@settings(SETTINGS, max_examples=12)
@given(st.integers(1, 5), st.floats(0.02, 1.0), st.data())
def test_sinkhorn_linear_cost_is_at_least_the_exact_optimum(n, eps, data):
    """<P, C> of any plan with uniform marginals is >= the assignment optimum / n (Birkhoff)."""
    from scipy.optimize import linear_sum_assignment
    from daml.transport import sinkhorn
    c = data.draw(hnp.arrays(np.float64, (n, n), elements=st.floats(0, 10)))
    res = sinkhorn(torch.as_tensor(c), epsilon=eps, max_iter=5000, tol=1e-10, warn=False)
    if not bool(res.converged.all()):
        return
    r, k = linear_sum_assignment(c)
    assert float(res.value_linear) >= c[r, k].sum() / n - 1e-6 * (1 + c.max())


def test_resampling_schemes_are_unbiased():
    """E[offspring of i] = n w_i for every scheme: mean counts over 500 seeds within 5 standard errors."""
    w = np.array([0.05, 0.4, 0.15, 0.3, 0.1])
    n, runs = len(w), 500
    for method in sorted(R.METHODS):
        counts = np.stack([np.bincount(R.resample(w, method, seed=s).numpy(), minlength=n) for s in range(runs)])
        se = counts.std(0) / np.sqrt(runs) + 1e-12
        assert np.all(np.abs(counts.mean(0) - n * w) <= 5 * se + 1e-9), (method, counts.mean(0), n * w)


FILTER_PARAMS = {"climatology": dict(mean=np.zeros(3), cov=np.eye(3) * 50, members=6), "kf": {}, "ekf": {},
                 "enkf": dict(members=6), "etkf": dict(members=6), "letkf": dict(members=6, radius=2.0),
                 "bootstrap": dict(members=20), "optimal": dict(members=20), "auxiliary": dict(members=20),
                 "ewpf": dict(members=20), "iewpf": dict(members=20), "etpf": dict(members=20),
                 "letpf": dict(members=20, radius=2.0), "diffusion": dict(members=6, steps=20),
                 "ensf": dict(members=6, steps=20), "iapf": dict(members=20), "dpf": dict(members=20)}
PF_NOISE = {"bootstrap", "optimal", "auxiliary", "iapf", "ewpf", "iewpf", "etpf", "letpf"}


@pytest.mark.slow
@pytest.mark.parametrize("sd", [0.01, 1.0, 10.0])
@pytest.mark.parametrize("name", sorted(FILTER_PARAMS))
def test_every_filter_is_bounded_or_refuses(name, sd):
    """Lorenz-63 stays within |x| < 60: an analysis beyond 1e3 is a blow-up that must raise, not be returned."""
    from daml import filters as F, models as M
    if name == "kf":
        pytest.skip("needs a linear model")
    params = dict(FILTER_PARAMS[name])
    if name in PF_NOISE:
        params["model_noise"] = 0.5 * np.eye(3)
    data = daml.simulate(M.Lorenz63(), 15, M.observe_all(3, sd=sd), x0=np.ones(3), x0_cov=1.0, seed=0)
    cat, detail, res = _fuzz.classify(lambda: F.run(F.make_filter(name, **params), M.Lorenz63(), data, seed=0),
                                      None, 0, 120.0)
    assert cat in ("ok", "clear", "unnamed"), f"{name} sd={sd}: {cat} {detail}"
    if cat == "ok":
        big = float(np.abs(res.analysis["x"].values).max())
        assert big < 1e3, f"{name} sd={sd}: analysis members up to {big:.3g} returned without an error"


@settings(SETTINGS, max_examples=10)
@given(st.integers(1, 5), st.sampled_from([np.float64, np.float32]), st.data())
def test_netcdf_round_trip_is_exact(tmp_path_factory, m, dtype, data):
    x = data.draw(hnp.arrays(dtype, (m, 2), elements=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False).filter(lambda v: abs(v) < 1e30)))
    lw = data.draw(hnp.arrays(np.float64, m, elements=st.floats(-20, 20))).astype(dtype)
    post = daml.from_members(x, lw)
    path = tmp_path_factory.mktemp("nc") / "p.nc"
    daml.to_netcdf(post, path)
    back = daml.open_posterior(path)
    for name in ("x", "log_weight"):
        assert back[name].dtype == post[name].dtype
        assert np.array_equal(back[name].values, post[name].values)


@pytest.mark.parametrize("xi", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_psis_khat_recovers_a_known_pareto_tail(xi):
    """Importance ratios drawn from a generalised Pareto of shape xi: the mean k-hat over 8 seeds of 4000
    draws is within 0.1 of xi (k-hat fits the largest 190 ratios: its sd is about 0.1, so 3 se of the mean)."""
    ks = []
    for seed in range(8):
        u = np.random.default_rng(seed).uniform(size=4000)
        ratio = (u ** -xi - 1) / xi + 1e-3
        ks.append(float(dg.psis_kernel(torch.as_tensor(np.log(ratio)))[1]))
    assert abs(np.mean(ks) - xi) < 0.1, (xi, ks)
