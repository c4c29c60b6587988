"""`daml run` and `daml info` as a user meets them: subprocesses on tiny TOMLs (issue 27).

Checked: everything is checked before anything is computed (a bad parameter in the last method fails
at once with one line naming ``methods[k]...``, exit status 2); every finished method's file is written
as it finishes and survives Ctrl-C (exit status 130, no temp files); strict JSON; file modes follow
the umask; ``daml info`` gives one line per bad file and goes on; the default experiment's files stay
under 100 MB; summary-only recording gives the scores of full recording.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from daml import cli, experiment, io
from daml.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[experiment]
name = "tiny"
steps = 30
experiments = 2
seed = 1
[model]
name = "lorenz96"
n = 10
[observations]
kind = "every"
k = 2
every = 2
[prior]
x0 = "default"
cov = 1.0
[[methods]]
name = "climatology"
members = 20
[[methods]]
name = "etkf"
members = 8
inflation = 1.05
"""

# the second method is slow (about a minute on a busy machine): time to interrupt it
SLOW = """
[experiment]
name = "slow"
steps = 300
experiments = 1
seed = 1
[model]
name = "lorenz96"
n = 10
[observations]
kind = "all"
[prior]
cov = 1.0
[[methods]]
name = "etkf"
members = 8
[[methods]]
name = "bootstrap"
members = 20000
"""

# the ETKF with inflation 3 on one observed variable of ten: the unobserved spread explodes
DIVERGING = """
[experiment]
name = "div"
steps = 60
experiments = 1
seed = 1
[model]
name = "lorenz96"
n = 10
[observations]
kind = "indices"
indices = [0]
[prior]
cov = 1.0
[[methods]]
name = "etkf"
members = 8
[[methods]]
name = "etkf"
members = 8
inflation = 3.0
"""



def _daml(*args: str, umask: int | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pre = None if umask is None else (lambda: os.umask(umask))
    return subprocess.run([sys.executable, "-m", "daml.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env=env, preexec_fn=pre, **kw)


def _write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _strict_json(path: Path) -> dict:
    def refuse(token):
        raise AssertionError(f"{path.name} holds {token}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# -- everything is checked first -----------------------------------------------------------------------

def test_a_bad_parameter_in_the_last_method_fails_at_once_with_one_line(tmp_path):
    bad = TINY + '[[methods]]\nname = "enkf"\nmembers = 10\n[[methods]]\nname = "letkf"\nmembers = 8\nradius = -2.0\n'
    cfg = _write(tmp_path, bad)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"methods\[3\]\.radius"):     # in-process: the check alone
        experiment.load_config(cfg)
    assert time.perf_counter() - t0 < 5.0
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = _daml("run", str(cfg), "--out", str(out), "--no-progress")
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("daml run: config key 'methods[3].radius'"), lines
    assert "Traceback" not in proc.stderr
    assert not out.exists()                               # nothing computed, nothing written
    assert elapsed < 60.0                                 # interpreter start included, on a busy machine


def test_debug_shows_the_traceback(tmp_path, capsys):
    cfg = _write(tmp_path, TINY.replace("inflation = 1.05", "inflation = -1.0"))
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(InputError, match=re.escape("methods[1].inflation")):
        cli.main(["--debug", "run", str(cfg), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("table, key", [
    ('[output]\nkeep = "everything"\n', "output.keep"),
    ("[output]\nthin = 0\n", "output.thin"),
    ("[output]\nthin = 2.0\n", "output.thin"),
    ('[output]\ndtype = "float16"\n', "output.dtype"),
    ("[output]\ncompression = 12\n", "output.compression"),
    ("[output]\ncompression = true\n", "output.compression"),
    ("[output]\nkep = 1\n", "output.kep"),
    ("output = 3\n", "output"),
])
def test_bad_output_tables_name_the_key(table, key):
    with pytest.raises(InputError, match=f"config key '{re.escape(key)}'"):
        experiment.load_config(table + TINY)


@pytest.mark.parametrize("old, new, key", [
    ("cov = 1.0", "cov = -1.0", "prior.cov"),
    ("cov = 1.0", 'cov = "big"', "prior.cov"),
    ('x0 = "default"', "x0 = [1.0, 2.0]", "prior.x0"),
    ('x0 = "default"', 'x0 = "default"\nspinup = -1', "prior.spinup"),
    ("every = 2", "every = 2\nmissing = 1.5", "observations.missing"),
    ('name = "tiny"', 'name = "a/b"', "experiment.name"),
    ('name = "tiny"', "name = 3", "experiment.name"),
    ("inflation = 1.05", "inflation = 1.05\nnote = 3", "methods[1].note"),
    ("members = 20", "members = 20\nradius = 2.0", "methods[0].radius"),
])
def test_prior_observation_and_method_keys_are_checked_before_computing(old, new, key):
    with pytest.raises(InputError, match=f"config key '{re.escape(key)}'"):
        experiment.load_config(TINY.replace(old, new))


def test_run_help_lists_models_and_methods_and_points_to_the_schema(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    from daml.filters import REGISTRY
    from daml.models import MODELS

    assert all(name in text for name in [*MODELS, *REGISTRY])
    assert "docs/cli.md" in text


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    cfg = _write(tmp_path, TINY)
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    assert cli.main(["run", str(cfg), "--out", str(blocker), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("daml run: ") and str(blocker) in lines[0], lines


# -- nothing finished is lost --------------------------------------------------------------------------

def test_each_method_is_written_as_it_finishes_with_log_lines_and_strict_json(tmp_path):
    cfg = _write(tmp_path, TINY.replace("inflation = 1.05", 'inflation = 1.05\nnote = "the reference"'))
    out = tmp_path / "out"
    proc = _daml("run", str(cfg), "--out", str(out), "--no-progress", umask=0o022)
    assert proc.returncode == 0, proc.stderr
    for p in out.iterdir():                               # files others can read: the umask's modes
        assert p.stat().st_mode & 0o777 == 0o644, (p.name, oct(p.stat().st_mode & 0o777))
    log = proc.stderr.strip().splitlines()                # no terminal: a line per method started and finished
    assert len(log) == 4 and "[1/2]" in log[0] and "started" in log[0]
    assert "[2/2]" in log[3] and "rmse.a" in log[3] and log[3].rstrip().endswith(" s")
    doc = _strict_json(out / "tiny_scores.json")
    rows = doc["scores"]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert rows[1]["note"] == "the reference" and rows[1]["config"] == "etkf(members=8, inflation=1.05)"
    assert rows[1]["file"] == "tiny_etkf.nc" and (out / rows[1]["file"]).is_file()
    post = io.open_posterior(out / "tiny_etkf.nc")
    assert post.attrs["note"] == "the reference"


def test_a_diverged_method_keeps_its_partial_result_and_json_has_null(tmp_path):
    exp = experiment.load_config(DIVERGING)
    data, scores = experiment.run_experiment(exp, progress=False, out=tmp_path)
    assert scores[0].status == "done" and scores[1].status == "diverged" and scores[1].diverged.startswith("step ")
    partial = tmp_path / "div_etkf-2_partial.nc"
    assert scores[1].path == partial and scores[1].posterior is None and scores[0].posterior is None
    import xarray as xr

    ds = xr.open_dataset(partial, engine="h5netcdf")
    try:
        assert ds.attrs["diverged_at_step"] == int(scores[1].diverged.split()[1])
        assert "diverged at model step" in ds.attrs["daml_partial"]
        assert ds.sizes["time"] < 60
    finally:
        ds.close()
    rows = _strict_json(tmp_path / "div_scores.json")["scores"]
    assert rows[1]["status"] == "diverged" and rows[1]["rmse_a"] is None and rows[1]["crps"] is None
    assert rows[0]["rmse_a"] == scores[0].rmse_a


def test_scores_json_is_strict_with_a_status_for_methods_not_run(tmp_path):
    exp = experiment.load_config(TINY)
    nan_score = experiment.Score("etkf", "etkf", math.nan, math.inf, -math.inf, math.nan, diverged="step 3",
                                 status="diverged", index=1, rmse_a_each=(math.nan, 1.0))
    path = experiment.write_scores(exp, [nan_score], tmp_path / "s.json")
    rows = _strict_json(path)["scores"]
    assert rows[0]["status"] == "not run" and "rmse_a" not in rows[0]
    assert rows[1]["rmse_a"] is None and rows[1]["rmv_a"] is None and rows[1]["crps"] is None
    assert rows[1]["rmse_a_per_experiment"] == [None, 1.0]


def test_ctrl_c_keeps_the_finished_methods_and_exits_130(tmp_path):
    cfg = _write(tmp_path, SLOW)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "daml.cli", "run", str(cfg), "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT), env=env)
    try:
        first = out / "slow_etkf.nc"
        deadline = time.monotonic() + 240
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), "the first method's file never appeared"
        time.sleep(0.5)
        assert proc.poll() is None, "the slow method finished before the interrupt"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("daml run: interrupted") and "slow_etkf.nc" in last
    assert "Traceback" not in stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["slow_etkf.nc", "slow_scores.json"], names          # no temp, no partial file
    post = io.open_posterior(first)
    assert post.attrs["method"] == "etkf"
    rows = _strict_json(out / "slow_scores.json")["scores"]
    assert [r["status"] for r in rows] == ["done", "not run"]


# -- files others can read ------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o027, 0o640)])     # 0o022: in the test above
def test_file_modes_follow_the_umask(tmp_path, umask, mode):
    cfg = _write(tmp_path, TINY.replace("steps = 30", "steps = 10"))
    out = tmp_path / "out"
    proc = _daml("run", str(cfg), "--out", str(out), "--no-progress", umask=umask)
    assert proc.returncode == 0, proc.stderr
    files = [p for p in out.iterdir() if p.is_file()]
    assert {p.suffix for p in files} >= {".nc", ".json"}
    for p in files:
        assert p.stat().st_mode & 0o777 == mode, (p.name, oct(p.stat().st_mode & 0o777))


# -- daml info ------------------------------------------------------------------------------------------

def test_info_gives_one_line_per_bad_file_and_goes_on(tmp_path):
    exp = experiment.load_config(TINY.replace("steps = 30", "steps = 10"))
    experiment.run_experiment(exp, progress=False, out=tmp_path)
    good = tmp_path / "tiny_etkf.nc"
    corrupt = tmp_path / "corrupt.nc"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    import xarray as xr

    plain = tmp_path / "plain.nc"
    xr.Dataset({"a": ("t", np.arange(3.0))}).to_netcdf(plain, engine="h5netcdf")
    missing = tmp_path / "missing.nc"
    proc = _daml("info", str(missing), str(corrupt), str(plain), str(good))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in proc.stderr, proc.stderr
    for line, path in zip(lines, (missing, corrupt, plain)):
        assert line.startswith(f"daml info: {path}: "), line
    assert f"== {good}" in proc.stdout and "method: etkf" in proc.stdout


# -- output size ----------------------------------------------------------------------------------------

def test_default_experiment_plan_stays_under_100_mb():
    exp = experiment.load_config(None)
    plan = experiment.output_plan(exp)
    assert len(plan) == len(exp.methods)
    by_name = {m["name"]: p for m, p in zip(exp.methods, plan)}
    # members where they fit in the budget, summaries where they do not
    for p in plan:
        assert p["keep"] == ("members" if p["members_bytes"] <= experiment.MEMBERS_BUDGET else "summary")
    assert by_name["bootstrap"]["keep"] == "summary" and by_name["letkf"]["keep"] == "members"
    # 3 experiments x 1000 analyses x 1000 particles x 41 values: 984 MB as members
    assert by_name["bootstrap"]["members_bytes"] == 8 * 3 * 1000 * 1000 * 41
    assert sum(p["bytes"] for p in plan) < 80e6                # room for the netCDF overhead and the figure
    # what "members" everywhere would cost (today's 1.3 GB)
    assert sum(p["members_bytes"] for p in plan) > 1e9


@pytest.mark.slow
def test_default_run_files_stay_under_100_mb(tmp_path):
    out = tmp_path / "out"
    proc = _daml("run", "--out", str(out), "--no-progress", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    total = sum(p.stat().st_size for p in out.iterdir())
    assert total < 100e6, total
    rows = _strict_json(out / "lorenz96_sakov2008_scores.json")["scores"]
    assert all(r["status"] == "done" for r in rows)


def test_summary_recording_gives_the_scores_of_member_recording(tmp_path, capsys):
    text = TINY + '[[methods]]\nname = "bootstrap"\nmembers = 50\n'      # weighted members too
    scores = {}
    for keep in ("members", "summary"):
        exp = experiment.load_config(f'[output]\nkeep = "{keep}"\n' + text)
        _, scores[keep] = experiment.run_experiment(exp, progress=False, out=tmp_path / keep)
        assert all(s.keep == keep for s in scores[keep])
    for a, b in zip(scores["members"], scores["summary"]):
        for name in ("rmse_a", "rmv_a", "crps"):
            assert abs(getattr(a, name) - getattr(b, name)) <= 1e-12 * max(1.0, abs(getattr(a, name))), name
        np.testing.assert_allclose(a.rmse_a_each, b.rmse_a_each, rtol=1e-12)
        ca, cb = a.rank_counts.values, b.rank_counts.values
        assert ca.sum() == cb.sum()
        if a.method == "bootstrap":
            # weighted PITs are sums of weights: a value on a bin edge (k/20) may fall either side by
            # rounding (the two paths add the weights in another order); at most one such value here
            assert np.abs(ca - cb).sum() <= 2
        else:
            np.testing.assert_array_equal(ca, cb)
    summary_file = tmp_path / "summary" / "tiny_etkf.nc"
    import xarray as xr

    with xr.open_dataset(summary_file, engine="h5netcdf") as ds:
        assert "member" not in ds.dims and ds.attrs["daml_kind"] == "summary"
    capsys.readouterr()
    assert cli.main(["info", str(summary_file)]) == 0                   # daml info reads summaries too
    text = capsys.readouterr().out
    assert "summary of a posterior (no members): method etkf, 8 members" in text and "ESS min 8.00" in text


def test_rank_counts_bin_the_pit_as_the_rank_histogram_does():
    from daml import diagnostics, posterior

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 7, 3))                        # (time, member, variable)
    post = posterior.from_members(x, None, dims=("time", "member", "variable"))
    import xarray as xr

    truth = xr.DataArray(rng.normal(size=(40, 3)), dims=("time", "variable"))
    u = diagnostics.pit(post, truth)
    expected = diagnostics.rank_histogram(post, truth)     # N + 1 = 8 bins
    got = experiment.rank_counts(u, 8)
    np.testing.assert_array_equal(got.values, expected.values)
    assert int(got.sum()) == 120
    with pytest.raises(InputError, match="bins"):
        experiment.rank_counts(u, 1)


# -- threads --------------------------------------------------------------------------------------------

def test_threads_argument_is_auto_or_a_positive_int_and_the_callers_setting_comes_back(tmp_path, capsys):
    import torch

    cfg = _write(tmp_path, TINY.replace("steps = 30", "steps = 6"))
    for bad in ("0", "-2", "many"):
        with pytest.raises(SystemExit) as info:
            cli.main(["run", str(cfg), "--out", str(tmp_path / "out"), "--threads", bad])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--threads" in err[0] and bad in err[0]
    assert not (tmp_path / "out").exists()
    before = torch.get_num_threads()
    exp = experiment.load_config(cfg)
    _, auto = experiment.run_experiment(exp, progress=False)
    assert torch.get_num_threads() == before
    _, one = experiment.run_experiment(exp, progress=False, threads=1)
    assert torch.get_num_threads() == before
    assert [s.rmse_a for s in auto] == [s.rmse_a for s in one]
    with pytest.raises(InputError, match="threads"):
        experiment.run_experiment(exp, progress=False, threads=0)


def test_explicit_threads_apply_inside_filters_run_and_the_environment_comes_back(tmp_path, monkeypatch):
    import torch

    from daml import _device

    seen = []
    real_run = experiment.run

    def spy(*args, **kw):       # what filters.run's own choice (auto_threads) will see, at its call
        seen.append((torch.get_num_threads(), os.environ.get("DAML_THREADS"),
                     _device.choose_threads(_device.ensemble_work((2, 8, 10)))))
        return real_run(*args, **kw)

    monkeypatch.setattr(experiment, "run", spy)
    monkeypatch.delenv("DAML_THREADS", raising=False)
    cfg = _write(tmp_path, TINY.replace("steps = 30", "steps = 6"))
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "two"), "--no-progress", "--threads", "2"]) == 0
    assert seen == [(2, "2", 2)] * 2                 # two methods, two threads each, also inside run
    assert "DAML_THREADS" not in os.environ
    seen.clear()
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "auto"), "--no-progress"]) == 0
    assert seen == [(1, None, 1)] * 2                # auto: small ensembles on one thread
