"""Files others can open and not misuse (issue 27, items 2-4): compression and float32 storage, summary
files, umask-respecting modes, strict JSON, temporary files that never outlive their write, Ctrl-C that
propagates, self-describing log-weights and a ``daml info`` that reads only the log-weights."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import weakref

import h5py
import numpy as np
import pytest
import xarray as xr

import daml
from daml import diagnostics, io
from daml.errors import DtypeError, InputError, PosteriorError
from daml.posterior import LOG_WEIGHT, LOG_WEIGHT_ATTRS


def _bit_identical(a: xr.Dataset, b: xr.Dataset) -> None:
    xr.testing.assert_identical(a, b)
    for name in a.variables:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].values.tobytes() == b[name].values.tobytes(), name


def _post(rng, t=20, n=24, d=40):
    x = rng.normal(size=(t, n, d))
    lw = rng.normal(scale=1.0, size=(t, n))
    return daml.from_members(x, lw, dims=("time", "member", "variable"),
                             coords={"time": np.arange(t) * 0.05, "variable": np.arange(d)},
                             method="etkf", config={"members": n}, seed=3)


def _summary(rng, t=20, d=40):
    q = [0.05, 0.5, 0.95]
    return xr.Dataset(
        {"mean": (("time", "variable"), rng.normal(size=(t, d))),
         "sd": (("time", "variable"), rng.uniform(0.5, 1.0, size=(t, d))),
         "quantile": (("q", "time", "variable"), np.sort(rng.normal(size=(3, t, d)), axis=0)),
         "ess": (("time",), rng.uniform(5.0, 24.0, size=t))},
        coords={"time": np.arange(t) * 0.05, "variable": np.arange(d), "q": q},
        attrs={"method": "etkf", "config": "{}", "seed": "3", "daml_version": daml.__version__,
               "daml_kind": "summary"})


def _temps(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".daml-tmp." in p.name or p.name.endswith("tmp"))


# -- compression and float32 -----------------------------------------------------------------------------

def test_default_write_is_compressed_and_round_trips_bit_for_bit(rng, tmp_path):
    post = _post(rng)
    for i, ds in enumerate([post, post.daml.resample(seed=1)]):
        path = tmp_path / f"p{i}.nc"
        io.to_netcdf(ds, path)
        _bit_identical(ds, daml.open_posterior(path))
        with h5py.File(path, "r") as f:
            assert f["x"].compression == "gzip" and f["x"].compression_opts == io.DEFAULT_COMPRESSION
            assert f["x"].shuffle


def test_compressed_files_are_smaller_and_every_level_reads_back_the_same(rng, tmp_path):
    post = _post(rng, t=50)
    # a resampled posterior (as a particle filter stores) repeats members: zlib removes the repeats
    resampled = post.assign(log_weight=post.log_weight * 8).pipe(
        lambda d: d.assign(log_weight=d.log_weight - np.log(np.exp(d.log_weight).sum("member"))))
    resampled = resampled.daml.resample(seed=0)
    for name, ds, most in (("normal", post, 0.999), ("resampled", resampled, 0.6)):
        sizes = {}
        for level in (None, 0, 1, 9):
            path = tmp_path / f"{name}{level}.nc"
            ds.daml.to_netcdf(path, compression=level)
            sizes[level] = path.stat().st_size
            _bit_identical(ds, daml.open_posterior(path))
        assert sizes[None] == sizes[0]
        assert sizes[1] < most * sizes[0] and sizes[9] <= sizes[1], (name, sizes)
        with h5py.File(tmp_path / f"{name}0.nc", "r") as f:
            assert f["x"].compression is None


@pytest.mark.parametrize("bad", [-1, 10, 1.5, "high", True])
def test_bad_compression_is_refused_naming_it(rng, tmp_path, bad):
    with pytest.raises(InputError, match="compression: expected a zlib level 0-9"):
        io.to_netcdf(_post(rng, t=2), tmp_path / "x.nc", compression=bad)
    assert list(tmp_path.iterdir()) == []


def test_float32_storage_halves_the_members_and_keeps_log_weight_exact(rng, tmp_path):
    post = _post(rng)
    full, half = tmp_path / "f64.nc", tmp_path / "f32.nc"
    io.to_netcdf(post, full, compression=0)
    io.to_netcdf(post, half, compression=0, dtype="float32")
    with h5py.File(full, "r") as f64, h5py.File(half, "r") as f32:
        assert f32["x"].dtype == np.float32
        assert f32["x"].id.get_storage_size() * 2 == f64["x"].id.get_storage_size()
    back = daml.open_posterior(half)       # validate() passes: log_weight kept float64, normalised
    assert back["x"].dtype == np.float32 and back[LOG_WEIGHT].dtype == np.float64
    assert back[LOG_WEIGHT].values.tobytes() == post[LOG_WEIGHT].values.tobytes()
    # the stored values are exactly the float32 rounding: relative error <= 2**-24
    np.testing.assert_array_equal(back["x"].values, post["x"].values.astype(np.float32))
    rel = np.abs(back["x"].values.astype(np.float64) - post["x"].values) / np.abs(post["x"].values)
    assert rel.max() <= 2.0**-24
    assert "float32" in back.attrs["daml_storage"] and "x" in back.attrs["daml_storage"]
    assert float(np.abs(back.daml.mean()["x"] - post.daml.mean()["x"]).max()) < 1e-6
    xr.testing.assert_identical(back.daml.ess(), post.daml.ess())
    # float32 posterior of float32 members: nothing converted, nothing recorded
    small = daml.from_members(rng.normal(size=(5, 2)).astype(np.float32))
    io.to_netcdf(small, tmp_path / "s.nc", dtype="float32")
    _bit_identical(small, daml.open_posterior(tmp_path / "s.nc"))


def test_float32_refuses_other_dtypes_and_values_it_cannot_hold(rng, tmp_path):
    post = _post(rng, t=2)
    for bad in ("float16", "int32", np.float64, "fast", 32):
        with pytest.raises(DtypeError, match="dtype: expected None"):
            io.to_netcdf(post, tmp_path / "x.nc", dtype=bad)
    huge = post.assign(x=post["x"] * 1e300)
    with pytest.raises(InputError, match="dtype: expected float32 storage"):
        io.to_netcdf(huge, tmp_path / "x.nc", dtype="float32")
    assert list(tmp_path.iterdir()) == []


# -- summaries -----------------------------------------------------------------------------------------

def test_summary_round_trips_and_only_open_dataset_opens_it(rng, tmp_path):
    summary = _summary(rng)
    path = tmp_path / "s.nc"
    io.to_netcdf(summary, path)
    _bit_identical(summary, io.open_dataset(path))
    with io.open_dataset(path, lazy=True) as lazy:
        xr.testing.assert_identical(lazy.load(), summary)
    with pytest.raises(PosteriorError, match=r"path: expected a posterior file.*summary file.*open_dataset"):
        daml.open_posterior(path)
    text = diagnostics.describe(io.open_dataset(path))
    assert "kind: summary" in text and "method: etkf" in text and "time=20" in text
    assert f"mean {summary['ess'].values.mean():.2f}" in text
    # a posterior through open_dataset: validated as by open_posterior
    post = _post(rng, t=3)
    io.to_netcdf(post, tmp_path / "p.nc")
    _bit_identical(post, io.open_dataset(tmp_path / "p.nc"))


def test_the_summary_of_filters_run_round_trips_and_is_described(tmp_path):
    from daml import filters, models

    model = models.Lorenz96(n=8, forcing=8.0, dt=0.05)
    data = daml.simulate(model, 6, models.observe_all(8, sd=1.0), x0=model.default_x0(), x0_cov=0.01,
                         experiments=2, seed=0)
    summary = filters.run(filters.make_filter("bootstrap", members=30), model, data, seed=1, progress=False,
                          keep="summary").analysis
    assert summary.attrs["daml_kind"] == "summary"
    io.to_netcdf(summary, tmp_path / "s.nc")
    back = io.open_dataset(tmp_path / "s.nc")
    _bit_identical(summary, back)
    with io.open_dataset(tmp_path / "s.nc", lazy=True) as lazy:
        text = diagnostics.describe(lazy)
    assert text == diagnostics.describe(summary) and "method: bootstrap" in text
    assert f"mean {float(summary['ess'].mean()):.2f}" in text


def test_bad_summaries_are_refused(rng, tmp_path):
    with_members = _summary(rng).expand_dims(member=2)
    with pytest.raises(PosteriorError, match="ds: expected a summary .* without a 'member' dimension"):
        io.to_netcdf(with_members, tmp_path / "s.nc")
    no_method = _summary(rng)
    del no_method.attrs["method"]
    with pytest.raises(PosteriorError, match="ds.attrs: expected a string attribute 'method'"):
        io.to_netcdf(no_method, tmp_path / "s.nc")
    # a summary file with bad attrs, written by plain xarray: refused naming the file
    no_method.to_netcdf(tmp_path / "plain.nc", engine="h5netcdf")
    with pytest.raises(PosteriorError, match=r"ds.attrs in '.*plain\.nc'"):
        io.open_dataset(tmp_path / "plain.nc", lazy=True)
    with pytest.raises(InputError, match="lazy: expected True or False"):
        io.open_dataset(tmp_path / "plain.nc", lazy="yes")


# -- modes follow the umask ------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_0666_less_the_umask(rng, tmp_path, umask):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old = os.umask(umask)
    try:
        (tmp_path / "p.nc").write_bytes(b"old")
        os.chmod(tmp_path / "p.nc", 0o600)                 # replacing a private file gives the new mode
        io.to_netcdf(_post(rng, t=2), tmp_path / "p.nc")
        io.write_json({"a": 1}, tmp_path / "r.json")
        io.save_figure(plt.figure(), tmp_path / "f.png")
    finally:
        os.umask(old)
    for name in ("p.nc", "r.json", "f.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert _temps(tmp_path) == []


# -- strict JSON ---------------------------------------------------------------------------------------

def _refuse_constant(token):
    raise AssertionError(f"non-standard JSON token {token}")


def test_write_json_is_strict_json_with_null_for_nan_and_inf(tmp_path):
    obj = {"rmse": math.nan, "scores": [1.5, math.inf, -math.inf, np.float32("nan"), np.float64(2.25)],
           "nested": {"a": (np.int64(3), np.bool_(True), None), 7: "int key"},
           "array": np.array([[1.0, np.nan], [np.inf, 4.0]]), "ints": np.arange(3), "text": "Ï ok"}
    path = io.write_json(obj, tmp_path / "r.json")
    back = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    assert back == {"rmse": None, "scores": [1.5, None, None, None, 2.25],
                    "nested": {"a": [3, True, None], "7": "int key"},
                    "array": [[1.0, None], [None, 4.0]], "ints": [0, 1, 2], "text": "Ï ok"}
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_write_json_refuses_what_json_cannot_hold_and_writes_nothing(tmp_path):
    loop: list = []
    loop.append(loop)
    for obj, where in [({"a": [1, {"p": tmp_path}]}, r"obj\['a'\]\[1\]\['p'\]"), ({1.5: 1}, "obj"),
                       ({"s": {1, 2}}, r"obj\['s'\]"), (loop, r"obj\[0\]"),
                       ({"c": np.array(["a"])}, r"obj\['c'\]")]:
        with pytest.raises(InputError, match=f"^{where}: expected"):
            io.write_json(obj, tmp_path / "r.json")
    with pytest.raises(InputError, match="indent"):
        io.write_json({}, tmp_path / "r.json", indent=-1)
    assert list(tmp_path.iterdir()) == []


# -- temporary files -----------------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_files_of_dead_writers_are_removed_by_the_next_write(rng, tmp_path):
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    dead = _dead_pid()
    stale = tmp_path / f".p.nc.daml-tmp.{host}.{dead}.0123456789abcdef.nc.tmp"
    alive = tmp_path / f".p.nc.daml-tmp.{host}.{os.getppid()}.0123456789abcdef.nc.tmp"
    other_target = tmp_path / f".q.nc.daml-tmp.{host}.{dead}.0123456789abcdef.nc.tmp"
    other_host = tmp_path / f".p.nc.daml-tmp.{host}x.{dead}.0123456789abcdef.nc.tmp"
    for p in (stale, alive, other_target, other_host):
        p.write_bytes(b"x" * 100)
    io.to_netcdf(_post(rng, t=2), tmp_path / "p.nc")
    assert not stale.exists()
    assert alive.exists() and other_target.exists() and other_host.exists()


def test_a_failed_rename_removes_the_temporary_file(rng, tmp_path, monkeypatch):
    def failing(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(PermissionError):
        io.to_netcdf(_post(rng, t=2), tmp_path / "p.nc")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PermissionError):
        io.write_json({"a": 1}, tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def _swallowing_writer(original):
    """Write, then let SIGINT arrive while a weakref callback runs, as it does when h5py finishes writing a
    large array and xarray's lock registry (a WeakValueDictionary) drops a lock: the KeyboardInterrupt is
    raised inside the callback, where Python prints "Exception ignored" and goes on."""
    def writer(self, target, **kwargs):
        original(self, target, **kwargs)

        class Lock:
            pass

        lock = Lock()

        def callback(ref):
            signal.raise_signal(signal.SIGINT)
            for _ in range(100):           # the handler runs here; its KeyboardInterrupt is ignored
                pass

        ref = weakref.ref(lock, callback)  # noqa: F841
        del lock
    return writer


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_swallowed_inside_the_writer_still_propagates_and_leaves_nothing(rng, tmp_path, monkeypatch):
    post = _post(rng, t=2)
    writer = _swallowing_writer(xr.Dataset.to_netcdf)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    writer(post, tmp_path / "plain.nc", engine="h5netcdf")     # unguarded, the interrupt is lost
    (tmp_path / "plain.nc").unlink()
    monkeypatch.setattr(xr.Dataset, "to_netcdf", writer)
    with pytest.raises(KeyboardInterrupt):
        io.to_netcdf(post, tmp_path / "p.nc")
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored


@pytest.mark.slow   # a fresh interpreter importing torch: 5 s on a quiet machine, 20 s on a loaded one
def test_ctrl_c_during_a_real_write_exits_with_an_interrupt_and_no_files(tmp_path):
    """SIGINT to a process while h5py writes a 150 MB posterior: before the guard it printed "Exception
    ignored", finished the file and exited 0."""
    script = textwrap.dedent(f"""
        import numpy as np, xarray as xr, daml
        post = daml.from_members(np.full((1000, 100, 190), 1.5), dims=("time", "member", "variable"))
        original = xr.Dataset.to_netcdf
        def announced(self, *args, **kwargs):
            print("writing", flush=True)
            return original(self, *args, **kwargs)
        xr.Dataset.to_netcdf = announced
        daml.io.to_netcdf(post, {str(tmp_path / 'big.nc')!r}, compression=0)
        print("finished", flush=True)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "finished" not in out, (proc.returncode, out, err[-2000:])
    assert "KeyboardInterrupt" in err
    assert list(tmp_path.iterdir()) == []


# -- log_weight explains itself --------------------------------------------------------------------------

def test_log_weight_attrs_say_how_to_weight_and_survive_files_and_resampling(rng, tmp_path):
    post = _post(rng, t=3)
    for ds in (post, post.daml.resample(seed=0)):
        attrs = ds[LOG_WEIGHT].attrs
        assert attrs == dict(LOG_WEIGHT_ATTRS) and attrs["units"] == "1"
        assert "np.exp(ds.log_weight)" in attrs["how_to_weight"] and "natural logarithm" in attrs["long_name"]
        io.to_netcdf(ds, tmp_path / "p.nc")
        back = daml.open_posterior(tmp_path / "p.nc")
        assert back[LOG_WEIGHT].attrs == dict(LOG_WEIGHT_ATTRS)
    # following the attribute with plain xarray gives daml's weighted mean; the log-weights themselves do not
    plain = post["x"].weighted(np.exp(post.log_weight)).mean("member")
    np.testing.assert_allclose(plain.values, post.daml.mean()["x"].values, rtol=1e-12, atol=1e-14)
    assert daml.validate(post) is post


# -- daml info reads lazily ------------------------------------------------------------------------------

def test_describe_of_a_lazy_file_reads_only_log_weight_and_says_the_same(rng, tmp_path):
    post = _post(rng, t=30)
    path = tmp_path / "p.nc"
    io.to_netcdf(post, path)
    with io.open_dataset(path, lazy=True) as lazy:
        text = diagnostics.describe(lazy)
        assert not lazy["x"].variable._in_memory           # the members were never read
        assert lazy[LOG_WEIGHT].variable._in_memory
    assert text == diagnostics.describe(post)
    # a NaN member is found by the full check, not by the lazy one (which does not read members)
    bad = post.copy(deep=True)
    bad["x"].values[0, 0, 0] = np.nan
    bad.to_netcdf(tmp_path / "bad.nc", engine="h5netcdf")
    with io.open_dataset(tmp_path / "bad.nc", lazy=True) as lazy:
        assert "ESS" in diagnostics.describe(lazy)
    with pytest.raises(daml.errors.NonFiniteError, match=r"x in '.*bad\.nc'"):
        io.open_dataset(tmp_path / "bad.nc")
