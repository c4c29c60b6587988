import pytest

from daml import cli


def test_daml_run_self_check_passes_and_writes_the_posterior(tmp_path, capsys):
    assert cli.main(["run", "--out", str(tmp_path)]) == 0
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


def test_info_on_a_missing_file_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        cli.main(["info", str(tmp_path / "nope.nc")])
