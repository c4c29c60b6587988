import pytest

from daml import cli


def test_daml_check_passes_and_writes_the_posterior(tmp_path, capsys):
    assert cli.main(["check", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "FAIL" not in out
    assert (tmp_path / "selfcheck.nc").is_file()
    assert cli.main(["info", str(tmp_path / "selfcheck.nc")]) == 0
    info = capsys.readouterr().out
    assert "method: importance" in info and "ESS min" in info


def test_self_check_rows_are_real_comparisons(tmp_path):
    rows = cli.self_check(tmp_path, seed=3)
    assert len(rows) >= 8
    for name, value, kind, target, tol, ok in rows:
        assert kind in ("±", "<=")
        assert ok == ((abs(value - target) <= tol) if kind == "±" else (value <= target)), name
    assert all(r[-1] for r in rows)


def test_info_on_a_missing_file_fails_clearly(tmp_path, capsys):
    # one line naming the file, exit status 2 (a traceback only with --debug)
    assert cli.main(["info", str(tmp_path / "nope.nc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("daml info: ") and "nope.nc" in err[0]
    with pytest.raises(FileNotFoundError, match="path"):
        cli.main(["--debug", "info", str(tmp_path / "nope.nc")])


TINY = """
[experiment]
name = "tiny"
steps = 40
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


def test_daml_run_with_a_toml_file_writes_table_posteriors_and_figure(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    from daml import experiment

    labels = experiment._labels(experiment.load_config(cfg).methods)      # short labels in the table
    assert "rmse.a" in text and all(label in text for label in labels)
    names = {p.name for p in out.iterdir()}
    assert {"tiny_climatology.nc", "tiny_etkf.nc", "tiny_scores.json", "tiny.png"} <= names
    import daml

    post = daml.open_posterior(out / "tiny_etkf.nc")
    assert post.sizes["experiment"] == 2 and post.attrs["method"] == "etkf"
    import json

    import numpy as np

    rows = json.loads((out / "tiny_scores.json").read_text())["scores"]
    for row in rows:                      # one rmse.a per truth, and the table's is their median
        assert len(row["rmse_a_per_experiment"]) == 2 and row["status"] == "done"
        assert row["rmse_a"] == np.median(row["rmse_a_per_experiment"])


def test_a_method_listed_twice_writes_two_posteriors(tmp_path, capsys):
    cfg = tmp_path / "twice.toml"
    cfg.write_text(TINY.replace('name = "tiny"', 'name = "twice"').replace("steps = 40", "steps = 10")
                   + '[[methods]]\nname = "etkf"\nmembers = 12\ninflation = 1.0\n')
    out = tmp_path / "out"
    assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    import daml

    first, second = (daml.open_posterior(out / f"twice_etkf-{k}.nc") for k in (1, 2))
    assert first.sizes["member"] == 8 and second.sizes["member"] == 12
    assert (out / "twice_climatology.nc").is_file()


def test_run_only_some_methods_gives_their_full_run_scores_and_names(tmp_path, capsys):
    # --only keeps each method's random stream and output name: the scores equal the full run's
    import json

    cfg = tmp_path / "some.toml"
    cfg.write_text(TINY.replace('name = "tiny"', 'name = "some"').replace("steps = 40", "steps = 12")
                   + '[[methods]]\nname = "enkf"\nmembers = 8\n[[methods]]\nname = "enkf"\nmembers = 10\n')
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.main(["run", str(cfg), "--out", str(full), "--no-progress"]) == 0
    assert cli.main(["run", str(cfg), "--out", str(part), "--no-progress", "--only", "enkf"]) == 0
    rows = {tag: json.loads((d / "some_scores.json").read_text())["scores"]
            for tag, d in (("full", full), ("part", part))}
    def strip(table):                                   # everything but the timing
        return [{k: v for k, v in r.items() if k not in ("cycles_per_second", "seconds")} for r in table]

    assert [r["status"] for r in rows["part"]] == ["not run", "not run", "done", "done"]
    assert [r["method"] for r in rows["part"]] == [r["method"] for r in rows["full"]]
    assert strip(rows["part"][2:]) == strip(rows["full"][2:])
    assert {p.name for p in part.glob("*.nc")} == {"some_enkf-1.nc", "some_enkf-2.nc"}
    from daml import experiment
    from daml.errors import InputError

    with pytest.raises(InputError, match="^only:.*climatology, etkf, enkf"):
        experiment.run_experiment(experiment.load_config(cfg), progress=False, only=["etfk"])


@pytest.mark.parametrize("bad, key", [
    ("[model]\nname = 'lorenz95'\n[[methods]]\nname = 'etkf'\n", "model.name"),
    ("[model]\nname = 'lorenz96'\n[[methods]]\nname = 'etfk'\n", "methods[0].name"),
    ("[model]\nname = 'lorenz96'\n[observations]\nsdd = 1\n[[methods]]\nname = 'etkf'\n", "observations.sdd"),
    ("[modle]\nname = 'lorenz96'\n", "modle"),
    ("[experiment]\nsteps = -3\n[model]\nname = 'lorenz96'\n[[methods]]\nname = 'etkf'\n", "experiment.steps"),
])
def test_bad_configs_name_the_key(tmp_path, bad, key):
    from daml import experiment
    from daml.errors import InputError

    with pytest.raises(InputError, match=f"config key '?{key.replace('[', '.').replace(']', '.')}"):
        experiment.load_config(bad)


def test_bad_inflation_and_observation_size_in_config():
    from daml import experiment
    from daml.errors import InputError

    # refused when the file is read, before any computing, naming the key path
    with pytest.raises(InputError, match=r"methods\[\d+\]\.inflation"):
        experiment.load_config(TINY.replace("inflation = 1.05", "inflation = -1.0"))
