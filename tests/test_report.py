"""daml.report: short distinct labels, the lost-truth rule, a 100-column table, a page-sized figure.

The scores are stand-ins with the attributes of ``daml.experiment.Score``; the numbers of the
default experiment are those of a ``daml run`` of it (docs/cli.md, /tmp run of issue 27).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import xarray as xr

from daml import report
from daml.errors import InputError


@dataclass
class Exp:
    name: str = "lorenz96_sakov2008"
    steps: int = 1000
    burn_in: float = 20.0
    experiments: int = 3
    methods: list = field(default_factory=list)


@dataclass
class Score:
    method: str
    label: str = ""
    rmse_a: float = math.nan
    rmv_a: float = math.nan
    crps: float = math.nan
    cycles_per_second: float = math.nan
    diverged: str = ""
    flag: str = ""
    note: str = ""
    config_label: str = ""
    rmse_t: object = None
    rank_counts: object = None
    rank_pvalue: float = math.nan
    index: int = -1
    path: object = None


# the default run (rmse.a, rmv.a, crps, cycles/s), 3 experiments, 1000 steps
DEFAULT = {
    "climatology": (3.655, 3.631, 2.101, 1688), "enkf": (0.217, 0.242, 0.118, 315),
    "etkf": (0.183, 0.204, 0.098, 274), "letkf": (0.215, 0.245, 0.122, 350),
    "bootstrap": (0.326, 0.425, 0.183, 54), "ewpf": (0.304, 0.237, 0.174, 301),
    "etpf": (5.054, 0.074, 4.093, 45), "letpf": (0.334, 0.419, 0.194, 20),
}
DEFAULT_METHODS = [
    {"name": "climatology"}, {"name": "enkf", "members": 40, "inflation": 1.06},
    {"name": "etkf", "members": 24, "inflation": 1.02, "rotate": True},
    {"name": "letkf", "members": 7, "radius": 4.0, "inflation": 1.04, "rotate": True},
    {"name": "bootstrap", "members": 1000, "threshold": 0.5, "jitter": 1.0},
    {"name": "ewpf", "members": 24, "keep": 1.0, "uniform": 0.35,
     "model_noise": {"variance": 0.1, "length": 1.0, "ensemble": 4.0, "radius": 4.0}},
    {"name": "etpf", "members": 100, "solver": "emd", "second_order": True, "rejuvenation": 0.5},
    {"name": "letpf", "members": 20, "radius": 2.0, "second_order": True, "rejuvenation": 0.5, "tol": 1e-3},
]


def default_scores(with_arrays: bool = False, seed: int = 0) -> tuple[Exp, list[Score]]:
    rng = np.random.default_rng(seed)
    exp = Exp(methods=[dict(m) for m in DEFAULT_METHODS])
    time = np.arange(1, 201) * 0.25                      # 200 analysis times: enough to draw
    scores = []
    for i, m in enumerate(exp.methods):
        a = DEFAULT[m["name"]]
        s = Score(m["name"], "", *a, index=i)
        if with_arrays:
            s.rmse_t = xr.DataArray(a[0] * np.exp(rng.normal(0, 0.2, (200, 3))), dims=("time", "experiment"),
                                    coords={"time": time})
            s.rank_counts = xr.DataArray(rng.multinomial(5000, np.full(20, 1 / 20)), dims="rank")
        scores.append(s)
    return exp, scores


# ------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------

def test_labels_unique_methods_are_their_names():
    assert report.labels(DEFAULT_METHODS) == [m["name"] for m in DEFAULT_METHODS]
    assert report.labels([]) == []


def test_labels_of_duplicates_name_the_parameter_that_differs():
    methods = [{"name": "etkf", "members": 24, "inflation": 1.02, "rotate": True},
               {"name": "etkf", "members": 24, "inflation": 1.1, "rotate": True},
               {"name": "enkf", "members": 40}]
    assert report.labels(methods) == ["etkf infl=1.02", "etkf infl=1.1", "enkf"]
    # the fewest parameters that tell them apart: members alone does not, radius alone does
    letkf = [{"name": "letkf", "members": 7, "radius": 4.0}, {"name": "letkf", "members": 7, "radius": 2.0},
             {"name": "letkf", "members": 10, "radius": 4.0}]
    got = report.labels(letkf)
    assert got == ["letkf N=7,r=4", "letkf N=7,r=2", "letkf N=10,r=4"]
    # nested tables: the sub-key that differs
    ewpf = [{"name": "ewpf", "model_noise": {"variance": 0.1, "length": 1.0}},
            {"name": "ewpf", "model_noise": {"variance": 0.5, "length": 1.0}}]
    assert report.labels(ewpf) == ["ewpf Q.var=0.1", "ewpf Q.var=0.5"]


def test_labels_of_identical_entries_are_numbered():
    three = [{"name": "etkf", "members": 24}] * 3
    assert report.labels(three) == ["etkf#1", "etkf#2", "etkf#3"]
    # two identical and one that differs: the differing one shows its parameter
    mixed = [{"name": "ewpf"}, {"name": "ewpf"}, {"name": "ewpf", "keep": 0.8}]
    got = report.labels(mixed)
    assert len(set(got)) == 3 and got[2] == "ewpf keep=0.8"
    # a note is not a parameter
    noted = [{"name": "etpf", "note": "fails"}, {"name": "etpf", "note": "fails too"}]
    assert report.labels(noted) == ["etpf#1", "etpf#2"]


def test_labels_short_and_distinct_for_long_configs():
    long = [{"name": "diffusion", "members": 50, "bandwidth": 0.123456789, "schedule": "cosine",
             "corrector_steps": k, "model_noise": {"variance": 0.1 * k, "length": [1, 2, 3]}} for k in range(5)]
    long += [{"name": "diffusion", "members": 50, "bandwidth": 0.123456789 + k, "schedule": "a-very-long-name-" + str(k)}
             for k in range(3)]
    long += [{"name": "x" * 30}, {"name": "x" * 30 + "y"}, {"name": "z" * 30}, {"name": "z" * 30, "tol": 1e-3},
             {"name": "etkf"}, {"name": "etkf"}]
    got = report.labels(long)
    assert len(got) == len(long) and len(set(got)) == len(got)
    assert all(0 < len(g) <= report.MAX_LABEL for g in got), got
    assert report.labels(long) == got                        # deterministic
    assert got[-2:] == ["etkf#1", "etkf#2"]


def test_labels_refuse_bad_input():
    with pytest.raises(InputError, match="^methods:"):
        report.labels("etkf")
    with pytest.raises(InputError, match=r"^methods\[1\]:"):
        report.labels([{"name": "etkf"}, 3])
    with pytest.raises(InputError, match=r"^methods\[0\]\.name:"):
        report.labels([{"members": 3}])


# ------------------------------------------------------------------------------------------------
# the lost-truth rule
# ------------------------------------------------------------------------------------------------

def test_rule_flags_the_global_etpf_and_not_the_working_filters():
    exp, scores = default_scores()
    why = report.lost_truth(scores)
    flagged = {s.method for s, w in zip(scores, why) if w}
    assert flagged == {"etpf"}
    assert "climatology" in why[6] and "rmv.a" in why[6]


def test_rule_each_criterion_alone():
    clim = Score("climatology", rmse_a=3.6, rmv_a=3.6)
    above = Score("enkf", rmse_a=3.7, rmv_a=3.5)          # no better than climatology, honest spread
    overconfident = Score("etkf", rmse_a=1.0, rmv_a=0.3)  # below climatology, error 3.3 x spread
    honest = Score("etkf", rmse_a=1.0, rmv_a=0.34)        # 2.9 x spread: kept
    why = report.lost_truth([clim, above, overconfident, honest])
    assert why[0] == "" and "climatology" in why[1] and "rmv.a" not in why[1]
    assert "rmv.a" in why[2] and "climatology" not in why[2] and why[3] == ""
    # without a climatology row only the spread criterion applies
    assert report.lost_truth([above, overconfident, honest]) == ["", why[2], ""]
    # the factor is a parameter
    assert report.lost_truth([honest], spread_factor=2.0)[0] != ""
    # climatology itself is never flagged, even far above its spread
    assert report.lost_truth([Score("climatology", rmse_a=9.0, rmv_a=0.1)]) == [""]


def test_rule_diverged_rows_are_not_lost_and_nan_is_flagged():
    clim = Score("climatology", rmse_a=3.6, rmv_a=3.6)
    div = Score("etkf", diverged="step 12")
    nan = Score("etkf", rmse_a=math.nan, rmv_a=0.2)
    assert report.lost_truth([clim, div, nan]) == ["", "", report.lost_truth([nan])[0]]
    assert "not finite" in report.lost_truth([nan])[0] or "nan" in report.lost_truth([nan])[0]


def test_rule_refuses_bad_input():
    with pytest.raises(InputError, match="^scores:"):
        report.lost_truth(Score("etkf"))
    with pytest.raises(InputError, match=r"^scores\[0\]:"):
        report.lost_truth([object()])
    with pytest.raises(InputError, match=r"^scores\[0\]\.rmse_a:"):
        report.lost_truth([Score("etkf", rmse_a="0.2")])
    with pytest.raises(InputError, match="^spread_factor:"):
        report.lost_truth([Score("etkf", rmse_a=0.2)], spread_factor=0)


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------

def _rows(table: str) -> dict[str, str]:
    return {line.split("  ")[0].strip(): line for line in table.splitlines()}


def test_table_of_the_default_run_fits_and_flags_etpf():
    exp, scores = default_scores()
    scores[6].note = "the global ETPF degenerates in 40 dimensions: this row shows a failure"
    table = report.format_table(exp, scores)
    lines = table.splitlines()
    assert all(len(line) <= report.WIDTH for line in lines)
    assert lines[0].startswith("lorenz96_sakov2008: 3 experiment(s)")
    assert lines[1].split() == ["method", "rmse.a", "rmv.a", "crps", "cycles/s", "flag"]
    rows = _rows(table)
    assert rows["etpf"].split()[1:] == ["5.054", "0.074", "4.093", "45", "LOST"]
    assert rows["etkf"].split()[1:] == ["0.183", "0.204", "0.098", "274"]
    for name in ("climatology", "enkf", "letkf", "bootstrap", "ewpf", "letpf"):
        assert "LOST" not in rows[name]
    legend = "\n".join(lines[2 + len(scores):])
    assert "LOST:" in legend and "etpf: rmse.a 5.054 >= climatology's 3.655" in legend
    assert "the global ETPF degenerates" in legend
    assert legend.splitlines()[-1].strip() == "full configuration of each row in lorenz96_sakov2008_scores.json"


def test_table_is_100_columns_for_12_long_methods():
    methods = [{"name": "diffusion", "members": 50 + k, "bandwidth": 0.1, "schedule": "cosine-" + "x" * 40,
                "model_noise": {"variance": 0.1, "length": 1.0, "ensemble": 4.0, "radius": 4.0}} for k in range(10)]
    methods += [{"name": "etkf", "members": 24}, {"name": "etkf", "members": 24}]
    exp = Exp(name="a_rather_long_experiment_name_" * 3, methods=methods)
    scores = [Score(m["name"], rmse_a=10.0 ** (k - 6), rmv_a=1e6, crps=123456.789, cycles_per_second=1e9,
                    index=k, note="a long note " * 20, config_label=str(m)) for k, m in enumerate(methods)]
    scores[3].diverged = "step 123456789"
    table = report.format_table(exp, scores)
    assert max(len(line) for line in table.splitlines()) <= report.WIDTH
    labels = report.labels(methods)
    assert len(set(labels)) == 12
    body = table.splitlines()[2:]
    for lab in labels:                  # every row, under its own label
        assert sum(line.startswith(lab + " ") for line in body) == 1, lab
    assert "diverged at step 123456789" in table and "DIVERGED" in table


def test_table_uses_the_scores_labels_when_short_and_distinct_else_computes_them():
    exp = Exp(methods=[{"name": "etkf", "inflation": 1.02}, {"name": "etkf", "inflation": 1.1}])
    long = [Score("etkf", label="etkf(members=24, inflation=1.02, rotate=True)", rmse_a=0.2, rmv_a=0.2, index=0),
            Score("etkf", label="etkf(members=24, inflation=1.1, rotate=True)", rmse_a=0.2, rmv_a=0.2, index=1)]
    rows = _rows(report.format_table(exp, long))
    assert "etkf infl=1.02" in rows and "etkf infl=1.1" in rows
    own = [Score("etkf", label="first", rmse_a=0.2, rmv_a=0.2), Score("etkf", label="second", rmse_a=0.2, rmv_a=0.2)]
    rows = _rows(report.format_table(exp, own))
    assert "first" in rows and "second" in rows
    # no index and no usable label: numbered
    bare = [Score("etkf", rmse_a=0.2, rmv_a=0.2), Score("etkf", rmse_a=0.3, rmv_a=0.3)]
    rows = _rows(report.format_table(Exp(), bare))
    assert "etkf#1" in rows and "etkf#2" in rows


def test_table_diverged_row_says_where_and_score_flag_is_shown():
    exp, scores = default_scores()
    scores[2] = Score("etkf", diverged="step 312", index=2)
    scores[3].flag = "lost by the caller's own rule"
    rows = _rows(report.format_table(exp, scores))
    assert "diverged at step 312" in rows["etkf"] and rows["etkf"].endswith("DIVERGED")
    assert rows["letkf"].endswith("LOST")
    assert "lost by the caller's own rule" in report.format_table(exp, scores)


def test_table_refuses_bad_input():
    exp, scores = default_scores()
    with pytest.raises(InputError, match="^exp:"):
        report.format_table({"name": "x"}, scores)
    with pytest.raises(InputError, match="^scores:"):
        report.format_table(exp, [])
    with pytest.raises(InputError, match=r"^scores\[1\]\.cycles_per_second:"):
        report.format_table(exp, [scores[0], Score("etkf", rmse_a=0.2, cycles_per_second="fast")])


# ------------------------------------------------------------------------------------------------
# the figure
# ------------------------------------------------------------------------------------------------

def test_figure_is_a_png_on_a_page(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    exp, scores = default_scores(with_arrays=True)
    scores[5].diverged = "step 312"
    path = report.figure(exp, scores, tmp_path)
    assert path == tmp_path / "lorenz96_sakov2008.png" and path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert w <= 10.5 * 110 and h <= 1.6 * w          # at most about 10 inches wide at 110 dpi, page-shaped
    assert not list(tmp_path.glob(".*"))              # no temporary file left


def test_figure_many_methods_and_many_rank_bins(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    methods = [{"name": "etkf", "inflation": 1.0 + 0.01 * k} for k in range(14)]
    exp = Exp(methods=methods)
    time = np.arange(1, 51) * 0.05
    scores = [Score("etkf", rmse_a=0.2, rmv_a=0.2, index=k,
                    rmse_t=xr.DataArray(np.full(50, 0.2 + 0.01 * k), dims="time", coords={"time": time}),
                    rank_counts=xr.DataArray(np.full(101, 7), dims="rank") if k % 2 else None)
              for k in range(14)]
    path = report.figure(exp, scores, tmp_path / "sub" / "f.png", rank_bins=10)   # a named file, as is
    assert path == tmp_path / "sub" / "f.png"
    assert mpimg.imread(path).shape[1] <= 10.5 * 110
    # 14 curves, pairwise distinct in colour or line style
    styles = {(report._style(k)["color"], report._style(k)["linestyle"]) for k in range(14)}
    assert len(styles) == 14


def test_figure_when_every_method_diverged(tmp_path):
    # regression: with no positive RMSE to draw, the log scale made matplotlib raise ValueError
    pytest.importorskip("matplotlib")
    exp = Exp(methods=[{"name": "etkf"}, {"name": "enkf"}])
    scores = [Score("etkf", diverged="step 0", index=0),
              Score("enkf", index=1, rmse_t=xr.DataArray(np.full(10, np.nan), dims="time"),
                    rank_counts=xr.DataArray(np.zeros(5), dims="rank"))]
    path = report.figure(exp, scores, tmp_path)
    assert path.is_file() and path.stat().st_size > 0


def test_regroup_keeps_flat_at_one_and_bounds_the_bins():
    left, width, density = report._regroup(np.full(101, 7.0), 20)
    assert len(density) == 20 and np.allclose(density, 1.0)
    assert np.isclose(width.sum(), 1.0) and np.allclose(left[1:], left[:-1] + width[:-1])
    # a U-shaped histogram stays U-shaped, with mass conserved
    counts = np.r_[50.0, np.full(18, 5.0), 50.0]
    left, width, density = report._regroup(counts, 5)
    assert np.isclose((density * width).sum(), 1.0) and density[0] > 1 > density[2]


def test_figure_refuses_bad_input(tmp_path):
    exp, scores = default_scores(with_arrays=True)
    with pytest.raises(InputError, match="^out:"):
        report.figure(exp, scores, 3)
    with pytest.raises(InputError, match="^rank_bins:"):
        report.figure(exp, scores, tmp_path, rank_bins=1)
    scores[0].rank_counts = xr.DataArray([1.0, -2.0, 3.0], dims="rank")
    with pytest.raises(InputError, match=r"^scores\[0\]\.rank_counts:"):
        report.figure(exp, scores, tmp_path)
    scores[0].rank_counts = None
    scores[1].rmse_t = np.ones(3)
    with pytest.raises(InputError, match=r"^scores\[1\]\.rmse_t:"):
        report.figure(exp, scores, tmp_path)
    assert not list(tmp_path.iterdir())


def test_figure_out_that_is_an_existing_file_or_folder_is_refused_by_name(tmp_path):
    # found by the fuzz suite: a file where the output folder should be gave FileExistsError from mkdir
    exp, scores = default_scores(with_arrays=True)
    blocker = tmp_path / "f.nc"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="^out: "):
        report.figure(exp, scores, blocker)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InputError, match="^out: "):
        report.figure(exp, scores, tmp_path / "dir.png")
    assert blocker.read_text() == "not a folder"


def test_table_header_says_when_the_scores_come_from_thinned_analyses():
    # thin > 1 scores fewer, correlated analyses: the table must not look like a full-run table
    exp, scores = default_scores()
    assert "every" not in report.format_table(exp, scores).splitlines()[0]
    exp.output = {"thin": 4}
    head = " ".join(" ".join(report.format_table(exp, scores).splitlines()[:2]).split())
    assert "scored on every 4-th analysis only" in head
