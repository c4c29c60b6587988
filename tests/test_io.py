import math

import numpy as np
import pytest
import xarray as xr

import daml
from daml.errors import InputError, PosteriorError


def _assert_bit_identical(a: xr.Dataset, b: xr.Dataset) -> None:
    xr.testing.assert_identical(a, b)
    for name in a.variables:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].values.tobytes() == b[name].values.tobytes(), name


def test_netcdf_round_trip_is_bit_identical(weighted_post, tmp_path):
    path = tmp_path / "post.nc"
    weighted_post.daml.to_netcdf(path)
    back = daml.open_posterior(path)
    _assert_bit_identical(weighted_post, back)
    assert back.attrs == weighted_post.attrs


def test_round_trip_of_float32_and_resampled_posteriors(rng, tmp_path):
    ds = daml.from_members(rng.normal(size=(7, 2)).astype(np.float32), rng.normal(size=7).astype(np.float32),
                           attrs={"note": "float32", "levels": np.array([1.0, 2.5])})
    res = ds.daml.resample(seed=3)
    for i, post in enumerate([ds, res]):
        path = tmp_path / f"p{i}.nc"
        daml.to_netcdf(post, path)
        _assert_bit_identical(post, daml.open_posterior(path))


def test_unstorable_attrs_raise_before_writing(weighted_post, tmp_path):
    bad = weighted_post.copy()
    bad.attrs["flags"] = {"a": 1}
    with pytest.raises(InputError, match=r"ds.attrs\['flags'\]: expected a netCDF-storable attribute"):
        daml.to_netcdf(bad, tmp_path / "x.nc")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(weighted_post, tmp_path, monkeypatch):
    path = tmp_path / "post.nc"
    daml.to_netcdf(weighted_post, path)
    before = path.read_bytes()

    def broken(self, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", broken)
    changed = weighted_post.assign(log_weight=weighted_post["log_weight"] * 0 - math.log(200))
    with pytest.raises(KeyboardInterrupt):
        daml.to_netcdf(changed, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["post.nc"]


def test_open_posterior_refuses_other_netcdf_files(tmp_path):
    path = tmp_path / "plain.nc"
    xr.Dataset({"a": ("x", np.arange(3.0))}).to_netcdf(path, engine="h5netcdf")
    with pytest.raises(PosteriorError, match=r"ds in '.*plain\.nc': expected a 'member' dimension"):
        daml.open_posterior(path)
    with pytest.raises(FileNotFoundError, match="path"):
        daml.open_posterior(tmp_path / "missing.nc")


def test_write_into_missing_folder_raises(weighted_post, tmp_path):
    with pytest.raises(InputError, match="path: expected a file in an existing folder"):
        daml.to_netcdf(weighted_post, tmp_path / "no" / "such.nc")


def test_to_arviz_keeps_weights_in_sample_stats(weighted_post):
    with pytest.warns(UserWarning, match="ArviZ ignores"):
        idata = weighted_post.daml.to_arviz(resample=False)
    post = idata.posterior
    assert post["x"].dims == ("chain", "draw", "time", "variable")
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == 200
    lw = idata.sample_stats["log_weight"]
    assert lw.dims == ("chain", "draw", "time")
    np.testing.assert_array_equal(lw.isel(chain=0).transpose("time", "draw").values,
                                  weighted_post["log_weight"].values)
    np.testing.assert_array_equal(post["x"].isel(chain=0).transpose("time", "draw", "variable").values,
                                  weighted_post["x"].values)


def test_to_arviz_resampled_is_equal_weight_and_usable_by_arviz(weighted_post):
    import arviz as az

    idata = weighted_post.daml.to_arviz(resample=True, seed=0)
    n = idata.posterior.sizes["draw"]
    assert n == daml.io.arviz_draws(float(weighted_post.daml.ess().min()))
    assert np.all(idata.sample_stats["log_weight"].values == -math.log(n))
    summary = az.summary(idata, var_names=["x"], kind="stats")
    assert len(summary) == 3 * 4
    ess = az.ess(idata, var_names=["x"])
    assert np.all(np.isfinite(ess["x"].values))


def test_save_figure_writes_a_png_atomically_and_closes_the_figure(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = daml.io.save_figure(fig, tmp_path / "new" / "f.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.png"]     # no temporary left behind

    class Broken:
        def savefig(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        daml.io.save_figure(Broken(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"                # the old file is kept
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.png"]
