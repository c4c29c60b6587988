"""Issue 26: the posterior, its files, diagnostics and resampling give a right result or refuse loudly.

Each test pins one defect found by the review (or by the fuzz of this module's public names): a
crash, a silent NaN, another library's internal error, or a plausible wrong answer.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import xarray as xr

import daml
from daml import _device, diagnostics, resampling
from daml.errors import (DamlError, DtypeError, InputError, NonFiniteError, PosteriorError, SeedError,
                         ShapeError)


@pytest.fixture
def post(rng):
    x = rng.normal(size=(4, 50, 3))
    return daml.from_members(x, rng.normal(size=(4, 50)), dims=("time", "member", "variable"),
                             method="test", seed=1)


# -- item 1: empty dimensions ------------------------------------------------------------------------

def test_validate_refuses_an_empty_time_dimension_naming_it(post):
    empty = post.isel(time=slice(0, 0))          # what `daml run` made with burn-in >= the run
    with pytest.raises(PosteriorError, match=r"'time' of size 0"):
        daml.validate(empty)
    with pytest.raises(PosteriorError, match=r"'time' of size 0"):
        daml.from_members(np.zeros((0, 5, 2)), dims=("time", "member", "variable"))
    with pytest.raises(PosteriorError, match=r"'variable' of size 0"):
        daml.from_members(np.zeros((5, 0)))


@pytest.mark.parametrize("name", ["rmse", "crps", "spread_skill", "pit", "rank_histogram", "energy_score"])
def test_diagnostics_refuse_an_empty_time_dimension(post, name):
    empty = post.isel(time=slice(0, 0))
    truth = xr.DataArray(np.zeros((0, 3)), dims=("time", "variable"))
    with pytest.raises(PosteriorError, match=r"'time' of size 0"):
        getattr(diagnostics, name)(empty, truth)


@pytest.mark.parametrize("call", ["ess", "spread", "psis", "describe", "mean", "quantile", "resample"])
def test_weights_and_accessor_refuse_an_empty_time_dimension(post, call):
    empty = post.isel(time=slice(0, 0))
    f = {"ess": lambda: diagnostics.ess(empty), "spread": lambda: diagnostics.spread(empty),
         "psis": lambda: diagnostics.psis(empty), "describe": lambda: diagnostics.describe(empty),
         "mean": lambda: empty.daml.mean(), "quantile": lambda: empty.daml.quantile(0.5),
         "resample": lambda: empty.daml.resample(seed=0)}[call]
    with pytest.raises(PosteriorError, match=r"'time' of size 0"):
        f()


# -- item 3: silent wrong results ----------------------------------------------------------------------

@pytest.mark.parametrize("call", ["mean", "var", "std", "quantile", "ess"])
def test_accessor_refuses_nan_members_instead_of_skipping_them(post, call):
    bad = post.copy(deep=True)
    bad["x"][0, 3, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"x: expected finite members, got 1 NaN or infinite"):
        {"mean": lambda: bad.daml.mean(), "var": lambda: bad.daml.var(), "std": lambda: bad.daml.std(),
         "quantile": lambda: bad.daml.quantile([0.1, 0.9]), "ess": lambda: bad.daml.ess()}[call]()


@pytest.mark.parametrize("call", ["mean", "var", "quantile", "weights"])
def test_accessor_refuses_unnormalised_log_weights_giving_the_logsumexp(post, call):
    bad = post.assign(log_weight=post["log_weight"] + 0.25)
    with pytest.raises(PosteriorError, match=r"log_weight: expected weights normalised.*up to 2\.500e-01"):
        {"mean": lambda: bad.daml.mean(), "var": lambda: bad.daml.var(),
         "quantile": lambda: bad.daml.quantile(0.5), "weights": lambda: bad.daml.weights}[call]()


def test_accessor_moments_still_match_a_direct_weighted_computation(post):
    w = np.exp(post["log_weight"].values)[..., None]
    x = post["x"].values
    mean = (w * x).sum(1)
    np.testing.assert_allclose(post.daml.mean()["x"].values, mean, rtol=1e-12)
    np.testing.assert_allclose(post.daml.var()["x"].values, (w * (x - mean[:, None]) ** 2).sum(1), rtol=1e-12)


@pytest.mark.parametrize("seed", [-1, -(2**40), np.int64(-3)])
def test_negative_seeds_are_refused_everywhere_a_seed_is_recorded(seed):
    with pytest.raises(SeedError, match="seed: expected a non-negative int"):
        daml.from_members(np.zeros((3, 2)) + np.arange(3.0)[:, None], seed=seed)
    with pytest.raises(SeedError, match="seed: expected a non-negative int"):
        _device.seed_to_attr(seed)


def test_spread_skill_of_a_perfect_forecast_is_defined_and_warned(rng):
    a = rng.uniform(0.5, 2.0, size=(4, 1, 3))
    x = a * (-1.0) ** np.arange(30)[None, :, None]  # +a, -a, +a, ...: weighted mean exactly 0 = the truth
    truth = xr.DataArray(np.zeros((4, 3)), dims=("time", "variable"))
    spread_post = daml.from_members(x, dims=("time", "member", "variable"))
    with pytest.warns(UserWarning, match="RMSE is 0"):
        r = diagnostics.spread_skill(spread_post, truth)
    assert float(r) == math.inf
    collapsed = daml.from_members(np.zeros((4, 30, 3)), dims=("time", "member", "variable"))
    with pytest.warns(UserWarning, match="RMSE is 0"):
        r = diagnostics.spread_skill(collapsed, truth)
    assert float(r) == 1.0                        # no spread and no error: they agree exactly
    # per time: only the points with RMSE 0 take the convention, the others are the plain ratio
    y = truth.copy()
    y[0] = 1.0
    with pytest.warns(UserWarning, match="RMSE is 0 at 3 of 4"):
        r = diagnostics.spread_skill(spread_post, y, dim="variable")
    s2 = x[0].var(0, ddof=1).mean() * (1 + 1 / 30)
    np.testing.assert_allclose(float(r[0]), math.sqrt(s2 / 1.0), rtol=1e-12)
    assert np.all(np.isinf(r.values[1:]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.5, "10", None, True, 1])
def test_pareto_khat_threshold_refuses_what_is_not_a_draw_count(bad):
    with pytest.raises(InputError, match="^n: expected"):
        diagnostics.pareto_khat_threshold(bad)
    assert diagnostics.pareto_khat_threshold(np.int64(100)) == 0.5


# -- item 2: ArviZ reads the posterior, not the proposal ------------------------------------------------

@pytest.fixture
def importance_post():
    """Prior draws N(0, I) of 2 variables at 2 times, weighted by a likelihood N(y; x, 0.5^2) with y far
    out: the weighted mean (about 0.8 y) is tens of Monte Carlo errors away from the prior mean 0."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 4000, 2))
    y = np.array([[2.0, 1.5], [1.0, 2.5]])
    lw = -0.5 * (((x - y[:, None, :]) / 0.5) ** 2).sum(-1)
    return daml.from_members(x, lw, dims=("time", "member", "variable"), method="importance", seed=5)


def test_to_arviz_default_shows_the_weighted_posterior_and_never_a_larger_ess(importance_post):
    import arviz as az

    kish = diagnostics.ess(importance_post)
    assert float(kish.max()) < 0.2 * 4000                       # strongly unequal weights
    idata = importance_post.daml.to_arviz(seed=0)
    n = idata.posterior.sizes["draw"]
    assert n == daml.io.arviz_draws(float(kish.min())) and n < float(kish.min())
    wmean = importance_post.daml.mean()["x"]                    # (time, variable)
    wsd = importance_post.daml.std()["x"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(idata, var_names=["x"], kind="stats")
        for t in range(2):
            for v in range(2):
                shown = summary.loc[f"x[{t}, {v}]", "mean"]
                # 4 Monte Carlo standard errors of a mean of n draws (ArviZ rounds to 2 decimals)
                assert abs(shown - float(wmean[t, v])) < 4 * float(wsd[t, v]) / math.sqrt(n) + 0.005
                assert abs(shown - 0.0) > 10 * float(wsd[t, v]) / math.sqrt(n)    # not the prior mean
        for m in ("bulk", "tail", "mean", "sd", "quantile"):
            kw = {"prob": 0.9} if m == "quantile" else {}
            e = az.ess(idata, var_names=["x"], method=m, **kw)["x"]       # (time, variable)
            assert np.all(e.values <= kish.values[:, None] + 1e-9), (m, e.values, kish.values)
    assert np.all(idata.sample_stats["log_weight"].values == -math.log(n))
    anc = idata.sample_stats["ancestor"].isel(chain=0)                  # draws trace back to members
    np.testing.assert_array_equal(idata.posterior["x"].isel(chain=0, time=1).values,
                                  importance_post["x"].isel(time=1).values[anc.isel(time=1).values])
    again = importance_post.daml.to_arviz(seed=0)
    np.testing.assert_array_equal(again.posterior["x"].values, idata.posterior["x"].values)


def test_to_arviz_keeps_equal_weight_members_and_warns_when_told_not_to_resample(importance_post, rng):
    eq = daml.from_members(rng.normal(size=(30, 2)))
    idata = daml.to_arviz(eq)
    np.testing.assert_array_equal(idata.posterior["x"].values[0], eq["x"].values)
    with pytest.warns(UserWarning, match="ArviZ ignores"):
        raw = daml.to_arviz(importance_post, resample=False)
    assert raw.posterior.sizes["draw"] == 4000
    with pytest.raises(InputError, match="resample: expected True or False"):
        daml.to_arviz(eq, resample="yes")
    with pytest.raises(InputError, match="^n: expected a positive int"):
        daml.to_arviz(eq, n=0)


@pytest.mark.parametrize("e, n", [(1.0, 1), (1.9, 1), (10.0, 10), (10.5, 10), (200.0, 100), (1000.0, 386), (1e6, 189_481)])
def test_arviz_draws_is_the_largest_n_whose_arviz_ess_bound_fits(e, n):
    assert daml.io.arviz_draws(e) == n
    bound = lambda k: k * max(1.0, math.log10(k))  # noqa: E731
    assert bound(n) <= e and (n + 1 > e or bound(n + 1) > e)


# -- item 5: files that are not posteriors -------------------------------------------------------------

def test_open_posterior_names_the_file_and_the_fault_of_corrupt_files(post, tmp_path):
    good = tmp_path / "good.nc"
    post.daml.to_netcdf(good)
    truncated = tmp_path / "truncated.nc"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.nc"
    text.write_text("time,x\n0,1.5\n")
    empty = tmp_path / "empty.nc"
    empty.write_bytes(b"")
    for path in (truncated, text, empty):
        with pytest.raises(InputError, match=rf"path: expected a readable netCDF4/HDF5 posterior file, "
                                             rf"got {path.name!r}.*cannot be read") as info:
            daml.open_posterior(path)
        assert info.value.__cause__ is not None          # the reader's own error is chained, not lost
        assert str(path) in str(info.value)
    no_weights = tmp_path / "no_weights.nc"
    post.drop_vars("log_weight").to_netcdf(no_weights, engine="h5netcdf")
    with pytest.raises(PosteriorError, match=r"no_weights\.nc.*expected a 'log_weight' variable"):
        daml.open_posterior(no_weights)
    with pytest.raises(InputError, match="path: expected an existing netCDF file"):
        daml.open_posterior(tmp_path)                      # a folder
    with pytest.raises(InputError, match="path: expected a str or os.PathLike"):
        daml.open_posterior(None)
    with pytest.raises(InputError, match="path: expected a str or os.PathLike"):
        daml.to_netcdf(post, 3)


# -- item 4: sizes that cannot fit are refused at once ------------------------------------------------------

def test_sizes_that_cannot_fit_are_refused_before_any_work(rng):
    import time

    if daml.errors.available_memory() is None:
        pytest.skip("this system does not report its memory")
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"members: expected a size whose arrays fit in memory"):
        _device.spawn(0, 10**9 * 1000, name="members")
    with pytest.raises(InputError, match=r"members: expected a size whose arrays fit in memory"):
        _device.spawn_generators(0, 10**9 * 1000, name="members")
    with pytest.raises(InputError, match=r"^n: expected a size whose arrays fit in memory"):
        resampling.systematic(torch.ones(3, 5), n=10**15, seed=0)
    with pytest.raises(InputError, match=r"^n: expected a size whose arrays fit in memory"):
        daml.from_members(rng.normal(size=(5, 2))).daml.resample(seed=0, n=10**15)
    big = daml.from_members(np.zeros((10**6, 2)) + np.arange(10**6)[:, None])
    with pytest.raises(InputError, match=r"^post: expected a size whose arrays fit in memory"):
        diagnostics.energy_score(big, xr.DataArray(np.zeros(2), dims="variable"))
    with pytest.raises(InputError, match=r"^bins: expected a size whose arrays fit in memory"):
        diagnostics.rank_histogram(big, xr.DataArray(np.zeros(2), dims="variable"), bins=10**14,
                                   dim=[])
    assert time.perf_counter() - start < 5.0
    assert len(_device.spawn(0, 3)) == 3                # small sizes are untouched


# -- item 6: wrong types into every public name of posterior, io, diagnostics, resampling ----------------

_BAD = {"str": "abc", "None": None, "list of str": ["a", "b"], "complex": np.ones((3, 20, 2)) * (1 + 1j),
        "bool": np.ones((3, 20, 2), bool), "float16": torch.ones(3, 20, 2, dtype=torch.float16),
        "bfloat16": torch.ones(3, 20, 2, dtype=torch.bfloat16),
        "object": np.array([1.0, "a", None], dtype=object), "nan": float("nan"), "dict": {"a": 1},
        "complex scalar": 1 + 2j, "empty": np.zeros((0,))}


def _public_calls(tmp_path):
    from daml import io as IO
    from daml import posterior as P

    rng = np.random.default_rng(0)
    post = daml.from_members(rng.normal(size=(3, 20, 2)), rng.normal(size=(3, 20)),
                             dims=("time", "member", "variable"))
    truth = xr.DataArray(np.zeros((3, 2)), dims=("time", "variable"))
    w = torch.rand(3, 10, dtype=torch.float64)
    nc = str(tmp_path / "a.nc")
    post.daml.to_netcdf(nc)
    D, R = diagnostics, resampling
    x5, w5 = torch.randn(3, 5, dtype=torch.float64), torch.full((3, 5), 0.2, dtype=torch.float64)
    y3 = torch.zeros(3, dtype=torch.float64)
    xp, lwp = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    net = daml.models.MixtureTransition(2, hidden=(3,), seed=0)
    saved = str(tmp_path / "saved.pt")
    IO.save_network(net, saved)
    return {
        "from_members": (P.from_members, dict(members=rng.normal(size=(20, 2)), log_weight=rng.normal(size=20),
                                              name="x", method="m", config={}, seed=0, dtype=None, dims=None,
                                              weight_dims=None, coords=None, attrs=None)),
        "validate": (P.validate, dict(ds=post)),
        "member_vars": (P.member_vars, dict(ds=post)),
        "normalise_log_weight": (P.normalise_log_weight, dict(log_weight=torch.zeros(3), dim=-1)),
        "weighted_var": (P.weighted_var, dict(x=post["x"], weights=np.exp(post["log_weight"]), ddof=0)),
        ".daml.var": (lambda ddof: post.daml.var(ddof=ddof), dict(ddof=0)),
        ".daml.quantile": (lambda q: post.daml.quantile(q), dict(q=0.5)),
        ".daml.psis": (lambda r_eff: post.daml.psis(r_eff=r_eff), dict(r_eff=1.0)),
        ".daml.resample": (lambda seed, method, n: post.daml.resample(seed=seed, method=method, n=n),
                           dict(seed=0, method="systematic", n=None)),
        "to_arviz": (IO.to_arviz, dict(ds=post, resample=True, seed=0, method="systematic", n=None)),
        "to_netcdf": (IO.to_netcdf, dict(ds=post, path=str(tmp_path / "b.nc"), compression=1, dtype=None)),
        "open_posterior": (IO.open_posterior, dict(path=nc)),
        "open_dataset": (IO.open_dataset, dict(path=nc, lazy=False)),
        "write_json": (IO.write_json, dict(obj={"a": [1.0, math.nan]}, path=str(tmp_path / "r.json"), indent=2)),
        "arviz_draws": (IO.arviz_draws, dict(kish_ess=10.0)),
        "atomic_write_path": (IO.atomic_write_path, dict(path=str(tmp_path / "c"))),
        "ess": (D.ess, dict(post=post, dim="member")),
        "psis": (D.psis, dict(post=post["log_weight"], dim="member", r_eff=1.0)),
        "pareto_khat_threshold": (D.pareto_khat_threshold, dict(n=100)),
        "rmse": (D.rmse, dict(post=post, truth=truth, var=None, dim=None)),
        "spread": (D.spread, dict(post=post, var=None, dim=None)),
        "crps": (D.crps, dict(post=post, truth=truth, var=None, estimator="exact")),
        "energy_score": (D.energy_score, dict(post=post, truth=truth, var=None, dim="variable", estimator="exact")),
        "pit": (D.pit, dict(post=post, truth=truth, var=None, seed=None)),
        "rank_histogram": (D.rank_histogram, dict(post=post, truth=truth, var=None, bins=None, dim=None, seed=None)),
        "rank_histogram_flatness": (D.rank_histogram_flatness, dict(hist=D.rank_histogram(post, truth), dim="rank")),
        "spread_skill": (D.spread_skill, dict(post=post, truth=truth, var=None, dim=None)),
        "describe": (D.describe, dict(post=post)),
        "ess_kernel": (D.ess_kernel, dict(log_weight=torch.zeros(3, 5))),
        "psis_kernel": (D.psis_kernel, dict(log_ratio=torch.randn(3, 50, dtype=torch.float64), r_eff=1.0)),
        "crps_kernel": (D.crps_kernel, dict(x=x5, w=w5, y=y3, fair=False)),
        "energy_score_kernel": (D.energy_score_kernel, dict(x=torch.randn(3, 5, 2, dtype=torch.float64), w=w5,
                                                            y=torch.zeros(3, 2, dtype=torch.float64), fair=False)),
        "pit_kernel": (D.pit_kernel, dict(x=x5, w=w5, y=y3, u=None)),
        **{name: (getattr(R, name), dict(weights=w, n=None, seed=0))
           for name in ("multinomial", "systematic", "stratified", "residual")},
        "resample": (R.resample, dict(weights=w, method="systematic", n=None, seed=0)),
        "offspring_counts": (R.offspring_counts, dict(ancestors=torch.zeros(3, 4, dtype=torch.long), n_particles=10)),
        "stop_gradient": (R.stop_gradient, dict(x=xp, log_weight=lwp, scheme="multinomial", seed=0)),
        "soft": (R.soft, dict(x=xp, log_weight=lwp, alpha=0.5, scheme="multinomial", normalise=True, seed=0)),
        "optimal_transport": (R.optimal_transport, dict(x=xp, log_weight=lwp, epsilon=0.1, tol=1e-6, max_iter=200)),
        "differentiable": (R.differentiable, dict(name="soft", x=xp, log_weight=lwp, seed=0)),
        "save_network": (IO.save_network, dict(network=net, path=str(tmp_path / "n.pt"))),
        "load_network": (IO.load_network, dict(path=saved, kind="MixtureTransition", dtype=None, device=None)),
    }


def _has_nan(r) -> bool:
    if isinstance(r, xr.Dataset):
        return any(v.dtype.kind == "f" and bool(np.isnan(v.values).any()) for v in r.data_vars.values())
    if isinstance(r, xr.DataArray):
        return r.dtype.kind == "f" and bool(np.isnan(r.values).any())
    if isinstance(r, torch.Tensor):
        return r.is_floating_point() and bool(torch.isnan(r).any())
    if isinstance(r, tuple):
        return any(_has_nan(v) for v in r)
    return isinstance(r, float) and math.isnan(r)


def test_wrong_types_into_every_public_name_give_daml_errors_never_leaks_or_nan(tmp_path, monkeypatch):
    """Every argument of every name in the __all__ of posterior, io, diagnostics and resampling, given
    each wrong type: a daml error naming the argument (or a posterior-level name), or a finite result;
    never another library's error, never NaN."""
    monkeypatch.chdir(tmp_path)     # a path given as the string "abc" is a valid path: written here
    from daml import io as IO
    from daml import posterior as P

    calls = _public_calls(tmp_path)
    import inspect

    functions = {name for module in (P, IO, diagnostics, resampling) for name in module.__all__
                 if inspect.isfunction(getattr(module, name))}
    assert functions - set(calls) == {"save_figure"}, functions - set(calls)   # save_figure takes a figure
    leaks, nans, counts = [], [], {"calls": 0, "daml errors": 0, "finite results": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, (f, base) in calls.items():
            for arg in base:
                for bad_name, bad in _BAD.items():
                    kwargs = dict(base, **{arg: bad})
                    counts["calls"] += 1
                    try:
                        result = f(**kwargs)
                    except DamlError:
                        counts["daml errors"] += 1
                        continue
                    except Exception as exc:  # noqa: BLE001 - what this test hunts for
                        leaks.append(f"{label}({arg}={bad_name}): {type(exc).__name__}: {str(exc)[:100]}")
                        continue
                    if _has_nan(result):
                        nans.append(f"{label}({arg}={bad_name})")
                    else:
                        counts["finite results"] += 1
    assert not leaks, "\n".join(leaks[:40]) + f"\n... {len(leaks)} leaks"
    assert not nans, nans
    assert counts["daml errors"] > 0.9 * counts["calls"], counts
