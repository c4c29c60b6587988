import math

import numpy as np
import pytest
import torch
import xarray as xr
from scipy.special import logsumexp

import daml
from daml import posterior
from daml.errors import DtypeError, InputError, NonFiniteError, PosteriorError, ShapeError


# -- construction ------------------------------------------------------------------------------------

def test_from_members_builds_a_valid_normalised_posterior(rng):
    x = rng.normal(size=(50, 3))
    lw = rng.normal(size=50) + 123.0
    ds = daml.from_members(x, lw, method="is", config={"a": 1.5}, seed=3)
    daml.validate(ds)
    assert ds["x"].dims == ("member", "variable") and ds.sizes["member"] == 50
    assert np.array_equal(ds["member"].values, np.arange(50))
    assert abs(logsumexp(ds["log_weight"].values)) < 1e-12
    np.testing.assert_allclose(ds["log_weight"].values, lw - logsumexp(lw), rtol=0, atol=1e-12)
    assert ds.attrs["method"] == "is" and ds.attrs["config"] == '{"a": 1.5}' and ds.attrs["seed"] == "3"
    assert ds.attrs["daml_version"] == daml.__version__
    assert ds["x"].dtype == np.float64


def test_default_weights_are_equal(rng):
    ds = daml.from_members(rng.normal(size=(8,)))
    assert ds["x"].dims == ("member",)
    assert np.all(ds["log_weight"].values == -math.log(8))


def test_torch_and_numpy_inputs_give_identical_posteriors(rng):
    x = rng.normal(size=(20, 2))
    lw = rng.normal(size=20)
    a = daml.from_members(x, lw)
    b = daml.from_members(torch.from_numpy(x), torch.from_numpy(lw))
    xr.testing.assert_identical(a, b)


def test_batched_weights_and_several_variables(rng):
    x = rng.normal(size=(4, 30, 5))
    theta = rng.normal(size=(4, 30))
    lw = rng.normal(size=(4, 30))
    ds = daml.from_members({"x": x, "theta": theta}, lw,
                           dims={"x": ("time", "member", "variable"), "theta": ("time", "member")})
    assert ds["log_weight"].dims == ("time", "member")
    np.testing.assert_allclose(np.exp(ds["log_weight"]).sum("member"), 1.0, atol=1e-12)
    assert set(posterior.member_vars(ds)) == {"x", "theta"}


def test_adding_a_constant_to_log_weights_changes_nothing(rng):
    x = rng.normal(size=(10, 2))
    lw = rng.normal(size=10)
    a = daml.from_members(x, lw)
    b = daml.from_members(x, lw - 700.0)
    np.testing.assert_allclose(a["log_weight"], b["log_weight"], rtol=0, atol=1e-12)


def test_explicit_dtype_casts_and_float32_is_kept(rng):
    x32 = rng.normal(size=(6, 2)).astype(np.float32)
    ds = daml.from_members(x32, rng.normal(size=6).astype(np.float32))
    assert ds["x"].dtype == np.float32 and ds["log_weight"].dtype == np.float32
    ds64 = daml.from_members(x32, rng.normal(size=6), dtype="float64")
    assert ds64["x"].dtype == np.float64 and ds64["log_weight"].dtype == np.float64


# -- bad input: one test per case -----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_log_weight_raises(rng, bad):
    lw = rng.normal(size=5)
    lw[2] = bad
    with pytest.raises(NonFiniteError, match="log_weight: expected finite log-weights, got 1 NaN or infinite"):
        daml.from_members(rng.normal(size=(5, 2)), lw)


def test_non_finite_members_raise(rng):
    x = rng.normal(size=(5, 2))
    x[0, 1] = np.nan
    with pytest.raises(NonFiniteError, match="members"):
        daml.from_members(x)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_finiteness_screen_agrees_with_the_entrywise_check(kind, dtype):
    from daml.posterior import _all_finite

    big = float(np.finfo(dtype).max)
    cases = [np.zeros((0, 3)), np.ones((4, 5)), np.array([big, big, -1.0]),      # empty, plain, sum overflows
             np.array([big, -big, 1.0]), np.array([1.0, np.nan]), np.array([np.inf, 2.0]),
             np.array([-np.inf, 0.0]), np.array([np.inf, -np.inf]), np.array([big, big, np.nan])]
    for values in cases:
        arr = values.astype(dtype)
        expected = bool(np.isfinite(arr).all())
        given = arr if kind == "numpy" else torch.from_numpy(arr)
        assert _all_finite(given) is expected, (values, dtype)
    assert _all_finite(np.arange(5)) and _all_finite(torch.arange(5))        # integers are finite


def test_non_finite_member_in_a_large_posterior_is_named(rng):
    x = rng.normal(size=(40, 200, 6))
    x[31, 150, 4] = np.inf
    with pytest.raises(NonFiniteError, match="1 NaN or infinite"):
        daml.from_members(x, dims=("time", "member", "variable"))


def test_dims_without_member_raise(rng):
    with pytest.raises(ShapeError, match="dims: expected a 'member' dimension"):
        daml.from_members(rng.normal(size=(5, 2)), dims=("sample", "variable"))


def test_dims_of_wrong_length_raise(rng):
    with pytest.raises(ShapeError, match="dims: expected 2 names"):
        daml.from_members(rng.normal(size=(5, 2)), dims=("member",))


def test_3d_members_need_dims(rng):
    with pytest.raises(ShapeError, match="dims: expected dimension names for the 3-d array"):
        daml.from_members(rng.normal(size=(2, 5, 2)))


def test_empty_member_dim_raises():
    with pytest.raises(ShapeError, match="members: expected a non-empty 'member' dimension"):
        daml.from_members(np.zeros((0, 3)))


def test_weights_for_wrong_number_of_members_raise(rng):
    with pytest.raises(ShapeError, match=r"log_weight: expected shape \(5,\)"):
        daml.from_members(rng.normal(size=(5, 2)), rng.normal(size=6))


def test_weight_dims_missing_from_a_variable_raise(rng):
    with pytest.raises(ShapeError, match="weight_dims"):
        daml.from_members({"x": rng.normal(size=(3, 5)), "y": rng.normal(size=5)}, rng.normal(size=(3, 5)),
                          dims={"x": ("time", "member"), "y": ("member",)}, weight_dims=("time", "member"))


def test_dtype_mismatch_raises(rng):
    with pytest.raises(DtypeError, match="log_weight: expected dtype torch.float64 like the members, got dtype torch.float32"):
        daml.from_members(rng.normal(size=(5, 2)), rng.normal(size=5).astype(np.float32))


def test_complex_members_raise(rng):
    with pytest.raises(DtypeError, match="members: expected real values"):
        daml.from_members(rng.normal(size=5) + 1j)


def test_unserialisable_config_raises(rng):
    with pytest.raises(InputError, match="config: expected a JSON-serialisable mapping"):
        daml.from_members(rng.normal(size=5), config={"f": object()})


def test_member_count_mismatch_between_variables_raises(rng):
    with pytest.raises(ShapeError, match="members: expected the same number of members"):
        daml.from_members({"a": rng.normal(size=5), "b": rng.normal(size=6)})


# -- validate --------------------------------------------------------------------------------------

def test_validate_rejects_non_datasets():
    with pytest.raises(PosteriorError, match="ds: expected an xarray.Dataset, got DataArray"):
        daml.validate(xr.DataArray([1.0]))


def test_validate_rejects_missing_log_weight(weighted_post):
    with pytest.raises(PosteriorError, match="'log_weight' variable"):
        daml.validate(weighted_post.drop_vars("log_weight"))


def test_validate_rejects_unnormalised_weights(weighted_post):
    bad = weighted_post.assign(log_weight=weighted_post["log_weight"] + 0.1)
    with pytest.raises(PosteriorError, match="log_weight: expected weights normalised"):
        daml.validate(bad)


def test_validate_rejects_missing_attrs(weighted_post):
    bad = weighted_post.copy()
    del bad.attrs["seed"]
    with pytest.raises(PosteriorError, match="'seed'"):
        daml.validate(bad)


def test_validate_rejects_nan_members(weighted_post):
    bad = weighted_post.copy(deep=True)
    bad["x"][0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="x: expected finite members"):
        daml.validate(bad)


def test_validate_rejects_variable_without_weight_dims(weighted_post):
    bad = weighted_post.assign(y=(("member",), np.zeros(200)))
    with pytest.raises(PosteriorError, match="y: expected the weight dimensions"):
        daml.validate(bad)


# -- accessor statistics (oracles: numpy) ----------------------------------------------------------

def test_weighted_moments_match_numpy(weighted_post):
    x = weighted_post["x"].values
    w = np.exp(weighted_post["log_weight"].values)
    mean = np.einsum("tm,tmv->tv", w, x)
    var0 = np.einsum("tm,tmv->tv", w, (x - mean[:, None]) ** 2)
    var1 = var0 / (1 - (w**2).sum(1))[:, None]
    acc = weighted_post.daml
    np.testing.assert_allclose(acc.mean()["x"], mean, rtol=1e-12)
    np.testing.assert_allclose(acc.var()["x"], var0, rtol=1e-12)
    np.testing.assert_allclose(acc.var(ddof=1)["x"], var1, rtol=1e-12)
    np.testing.assert_allclose(acc.std(ddof=1)["x"], np.sqrt(var1), rtol=1e-12)
    assert acc.n_members == 200
    np.testing.assert_allclose(acc.weights.sum("member"), 1.0, atol=1e-12)


def test_equal_weight_moments_and_quantiles_are_the_usual_ones(rng):
    x = rng.normal(size=(101, 3))
    acc = daml.from_members(x).daml
    np.testing.assert_allclose(acc.var(ddof=1)["x"], x.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(acc.quantile([0.1, 0.5, 0.9])["x"], np.quantile(x, [0.1, 0.5, 0.9], axis=0),
                               rtol=1e-12)


def test_weighted_quantile_of_a_point_mass_mixture():
    # 3 atoms with weights 0.2, 0.5, 0.3: the median is the middle atom
    ds = daml.from_members(np.array([1.0, 2.0, 3.0]), np.log([0.2, 0.5, 0.3]))
    assert float(ds.daml.quantile(0.5)["x"]) == pytest.approx(2.0)


def test_bad_quantile_and_ddof(weighted_post):
    with pytest.raises(InputError, match="q: expected probabilities"):
        weighted_post.daml.quantile(1.5)
    with pytest.raises(InputError, match="ddof"):
        weighted_post.daml.var(ddof=2)


# -- resampling through the accessor --------------------------------------------------------------

def test_resample_gathers_members_per_batch_index(weighted_post):
    res = weighted_post.daml.resample(seed=1)
    daml.validate(res)
    assert np.all(res["log_weight"].values == -math.log(200))
    anc = res["ancestor"].values  # (time, member)
    assert anc.shape == (3, 200)
    x = weighted_post["x"].values
    for t in range(3):
        np.testing.assert_array_equal(res["x"].values[t], x[t, anc[t]])
    assert res["x"].dims == weighted_post["x"].dims
    assert "resampling" in res.attrs and res.attrs["method"] == "test"


def test_resample_is_reproducible_and_scheme_dependent(weighted_post):
    a = weighted_post.daml.resample(seed=5, method="systematic")
    b = weighted_post.daml.resample(seed=5, method="systematic")
    c = weighted_post.daml.resample(seed=5, method="multinomial")
    xr.testing.assert_identical(a, b)
    assert not np.array_equal(a["ancestor"].values, c["ancestor"].values)


def test_resample_to_another_size_never_picks_zero_weight_members(rng):
    lw = np.where(np.arange(40) % 3 == 0, -1e6, rng.normal(size=40))  # every third member: weight ~ 0
    ds = daml.from_members(rng.normal(size=(40, 2)), lw)
    res = ds.daml.resample(seed=0, n=100)
    assert res.sizes["member"] == 100
    assert np.all(res["ancestor"].values % 3 != 0)


def test_resampled_mean_is_close_to_weighted_mean(rng):
    """Monte Carlo: systematic resampling of 20000 members; tolerance 5 standard errors."""
    x = rng.normal(size=20000)
    lw = -0.5 * (x - 1.0) ** 2 / 0.5
    ds = daml.from_members(x, lw)
    m = float(ds.daml.mean()["x"])
    se = math.sqrt(float(ds.daml.var()["x"]) / float(ds.daml.ess()))
    assert abs(float(ds.daml.resample(seed=2).daml.mean()["x"]) - m) < 5 * se
