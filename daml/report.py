"""The comparison of ``daml run`` as a table and a figure to read, not to decode (docs/report.md).

Three things serve every place a method is shown:

* :func:`labels`: a short label per ``[[methods]]`` entry (at most :data:`MAX_LABEL` characters),
  distinct even when a method is listed several times (``etkf infl=1.02``, ``etkf infl=1.1``,
  ``ewpf#2``); the full configuration goes to the JSON and the netCDF attributes, not to the labels.
* :func:`lost_truth`: the rule that flags a filter that lost the truth (see its docstring).
* :func:`format_table` and :func:`figure`: the table (at most :data:`WIDTH` columns) and the figure
  (a grid of panels readable on a page).

The scores are objects with attributes (``daml.experiment.Score``): ``method``, ``label``,
``rmse_a``, ``rmv_a``, ``crps``, ``cycles_per_second``, ``diverged`` (``""`` or ``"step k"``) and,
optionally, ``flag``, ``note``, ``rmse_t``, ``rank_counts``, ``rank_pvalue`` and ``index``.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InputError, check_int, check_real

__all__ = ["labels", "lost_truth", "format_table", "figure", "MAX_LABEL", "WIDTH", "SPREAD_FACTOR",
           "ABBREVIATIONS"]

MAX_LABEL = 20
"""The longest label :func:`labels` gives."""

WIDTH = 100
"""The widest line of :func:`format_table`."""

SPREAD_FACTOR = 3.0
""":func:`lost_truth` flags ``rmse.a > SPREAD_FACTOR * rmv.a`` (error far above the spread)."""

ABBREVIATIONS = {
    "members": "N", "inflation": "infl", "radius": "r", "rotate": "rot", "threshold": "thr",
    "resampling": "resamp", "jitter": "jit", "model_noise": "Q", "keep": "keep", "nudging": "nudge",
    "uniform": "unif", "gaussian_prob": "gprob", "gaussian_scale": "gscale", "epsilon": "eps",
    "second_order": "2nd", "rejuvenation": "rejuv", "max_iter": "iter", "bandwidth": "bw",
    "neighbours": "nbrs", "components": "comp", "conditional": "cond", "schedule": "sched",
    "corrector_steps": "corr", "corrector_size": "corrsz", "max_distance": "maxd", "eps_alpha": "eps_a",
    "eps_sigma": "eps_s", "damping": "damp", "max_growth": "maxg", "resampler": "res", "proposal": "prop", "record": "rec",
    "positions": "pos", "domain": "dom", "variance": "var", "length": "len", "ensemble": "ens",
    "forcing": "force", "spacing": "spac", "sampler": "smp", "solver": "solver", "steps": "steps",
    "t_min": "tmin", "noise": "noise", "clip": "clip", "beta": "beta", "tol": "tol",
    "localization": "loc", "localisation": "loc",
}
"""Parameter names as :func:`labels` shows them (others are cut to 6 characters)."""

_IGNORED = ("name", "note")          # keys of a [[methods]] entry that are not parameters
_MISSING = object()
CLIMATOLOGY = "climatology"


# ------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------

def _check_methods(methods: Any) -> list[dict]:
    if isinstance(methods, (str, bytes, dict)) or not isinstance(methods, Sequence):
        raise InputError("methods", "a list of [[methods]] tables (dicts with a 'name')", type(methods).__name__)
    out = []
    for i, m in enumerate(methods):
        if not isinstance(m, dict):
            raise InputError(f"methods[{i}]", "a dict with a 'name'", type(m).__name__)
        name = m.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"methods[{i}].name", "a non-empty str", repr(name)[:80])
        out.append(m)
    return out


def _flatten(params: dict, prefix: str = "") -> dict:
    """``{'model_noise': {'variance': 0.1}}`` -> ``{'model_noise.variance': 0.1}`` (order kept)."""
    flat = {}
    for k, v in params.items():
        if not prefix and k in _IGNORED:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _abbr(key: str) -> str:
    return ".".join(ABBREVIATIONS.get(part, str(part)[:6]) for part in key.split("."))


def _value(v: Any) -> str:
    """A parameter value, compact: ``1.02``, ``1e-05``, ``on``/``off``, ``emd``."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return f"{float(v):g}"
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return "".join(str(v).split())


def _group_labels(name: str, entries: list[dict]) -> list[str]:
    """Distinct labels of the entries of one method name (two or more)."""
    flats = [_flatten(m) for m in entries]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    shown = [[_value(f[k]) if k in f else _MISSING for k in keys] for f in flats]
    differing = [j for j in range(len(keys)) if len({s[j] for s in shown}) > 1]

    def make(subset: tuple[int, ...]) -> list[str]:
        out = []
        for s in shown:
            parts = [f"{_abbr(keys[j])}={s[j]}" for j in subset if s[j] is not _MISSING]
            out.append(f"{name} {','.join(parts)}" if parts else name)
        return out

    for size in range(1, min(len(differing), 3) + 1):          # the fewest parameters that tell them apart
        for subset in itertools.combinations(differing, size):
            cand = make(subset)
            if len(set(cand)) == len(cand) and all(len(c) <= MAX_LABEL for c in cand):
                return cand
    # identical entries (or labels too long): the parameters where they fit, '#k' where they collide
    cand = make(tuple(differing)) if differing else [name] * len(entries)
    counts = {c: cand.count(c) for c in cand}
    out = [c if counts[c] == 1 else _fit(c, f"#{k + 1}") for k, c in enumerate(cand)]
    if len(set(out)) == len(out) and all(len(c) <= MAX_LABEL for c in out):
        return out
    return [_fit(name, f"#{k + 1}") for k in range(len(entries))]


def _fit(text: str, suffix: str = "") -> str:
    """``text + suffix`` cut to :data:`MAX_LABEL` characters (the suffix kept)."""
    return text[:MAX_LABEL - len(suffix)] + suffix


def labels(methods: Sequence[dict]) -> list[str]:
    """Short, distinct labels of the ``[[methods]]`` entries of an experiment.

    A method listed once is labelled by its name (``etkf``). Entries of the same method get their
    name followed by the fewest parameters that tell them apart, abbreviated (:data:`ABBREVIATIONS`:
    ``members`` -> ``N``, ``inflation`` -> ``infl``, ``radius`` -> ``r``, nested tables as
    ``Q.var``): ``etkf infl=1.02`` and ``etkf infl=1.1``; an entry that leaves such a parameter
    at its default shows only the others (``etkf``). Identical entries, or entries whose labels
    would be too long, are numbered by their place among the entries of that method: ``ewpf#1``,
    ``ewpf#2`` (the numbers of the ``<name>-k.nc`` files). The keys ``name`` and ``note`` are not
    parameters. The result depends on the list only (deterministic).

    Parameters
    ----------
    methods : list of dict
        The ``[[methods]]`` tables, each with a ``name`` (``Experiment.methods``).

    Returns
    -------
    list of str
        One label per entry, in order, each at most :data:`MAX_LABEL` characters, all distinct.

    Raises
    ------
    InputError
        Naming ``methods`` (not a list) or ``methods[i]`` / ``methods[i].name``.

    Examples
    --------
    >>> labels([{"name": "etkf", "inflation": 1.02}, {"name": "etkf", "inflation": 1.1},
    ...         {"name": "enkf"}, {"name": "ewpf"}, {"name": "ewpf"}])
    ['etkf infl=1.02', 'etkf infl=1.1', 'enkf', 'ewpf#1', 'ewpf#2']
    """
    methods = _check_methods(methods)
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(methods):
        groups.setdefault(m["name"], []).append(i)
    out = [""] * len(methods)
    for name, where in groups.items():
        short = _fit(name)
        if len(where) == 1:
            out[where[0]] = short
            continue
        for i, lab in zip(where, _group_labels(short, [methods[i] for i in where])):
            out[i] = lab
    # names longer than MAX_LABEL that share their first characters: number them by position
    seen: dict[str, int] = {}
    for lab in out:
        seen[lab] = seen.get(lab, 0) + 1
    if len(seen) < len(out):
        out = [lab if seen[lab] == 1 else _fit(lab, f"#{i + 1}") for i, lab in enumerate(out)]
    if len(set(out)) < len(out):          # a last resort, distinct by construction: name#position
        out = [_fit(m["name"], f"#{i + 1}") for i, m in enumerate(methods)]
    return out


# ------------------------------------------------------------------------------------------------
# the scores
# ------------------------------------------------------------------------------------------------

class _Row:
    """What the report needs of one score, checked."""

    __slots__ = ("method", "label", "rmse_a", "rmv_a", "crps", "cycles_per_second", "diverged", "flag",
                 "note", "index", "score")


def _real(value: Any, name: str) -> float:
    """A float (NaN allowed: it marks a missing score); ``None`` is NaN."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(name, "a real number (NaN where there is none)", f"{type(value).__name__} {value!r}"[:80])
    return float(value)


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(name, "a str", f"{type(value).__name__} {value!r}"[:80])
    return value


def _rows(scores: Any, name: str = "scores") -> list[_Row]:
    if isinstance(scores, (str, bytes, dict)) or not isinstance(scores, Sequence):
        raise InputError(name, "a list of scores (daml.experiment.Score)", type(scores).__name__)
    rows = []
    for i, s in enumerate(scores):
        where = f"{name}[{i}]"
        if not hasattr(s, "method") or not hasattr(s, "rmse_a"):
            raise InputError(where, "a score with attributes method, rmse_a, rmv_a, crps, cycles_per_second",
                             type(s).__name__)
        r = _Row()
        r.score = s
        r.method = _text(getattr(s, "method"), f"{where}.method")
        if not r.method:
            raise InputError(f"{where}.method", "a non-empty str", repr(getattr(s, "method")))
        r.label = _text(getattr(s, "label", ""), f"{where}.label")
        r.rmse_a = _real(getattr(s, "rmse_a"), f"{where}.rmse_a")
        r.rmv_a = _real(getattr(s, "rmv_a", math.nan), f"{where}.rmv_a")
        r.crps = _real(getattr(s, "crps", math.nan), f"{where}.crps")
        r.cycles_per_second = _real(getattr(s, "cycles_per_second", math.nan), f"{where}.cycles_per_second")
        r.diverged = _text(getattr(s, "diverged", ""), f"{where}.diverged")
        r.flag = _text(getattr(s, "flag", ""), f"{where}.flag")
        r.note = _text(getattr(s, "note", ""), f"{where}.note")
        index = getattr(s, "index", -1)
        r.index = int(index) if isinstance(index, numbers.Integral) and not isinstance(index, bool) else -1
        rows.append(r)
    return rows


def _lost(rows: list[_Row], spread_factor: float) -> list[str]:
    clim = [r.rmse_a for r in rows if r.method == CLIMATOLOGY and not r.diverged and math.isfinite(r.rmse_a)]
    ref = min(clim) if clim else math.nan
    out = []
    for r in rows:
        if r.method == CLIMATOLOGY or r.diverged:
            out.append("")
            continue
        if not math.isfinite(r.rmse_a):
            out.append(f"rmse.a is {r.rmse_a} (no finite error to score)")
            continue
        why = []
        if math.isfinite(ref) and r.rmse_a >= ref:
            why.append(f"rmse.a {r.rmse_a:.4g} >= climatology's {ref:.4g}")
        if math.isfinite(r.rmv_a) and r.rmse_a > spread_factor * r.rmv_a:
            why.append(f"rmse.a {r.rmse_a:.4g} > {spread_factor:g} x rmv.a {r.rmv_a:.4g}")
        out.append("; ".join(why))
    return out


def lost_truth(scores: Sequence[Any], spread_factor: float = SPREAD_FACTOR) -> list[str]:
    """Per score, ``""`` or the reason its filter lost the truth.

    The rule (docs/report.md): a row is flagged when

    * its ``rmse.a`` is at or above the ``rmse.a`` of the experiment's climatology row (the lowest
      one if there are several), that is, the filter does no better than ignoring every
      observation; or
    * its ``rmse.a`` is above ``spread_factor`` (default 3) times its ``rmv.a``: the error is far
      above the spread the ensemble claims, an overconfident (collapsed) ensemble that no longer
      follows the truth; or
    * its ``rmse.a`` is not a finite number although the run did not diverge.

    Climatology rows are never flagged, and diverged rows (``diverged`` not empty) are not flagged
    here: the table marks them as diverged. In the default experiment this flags the global ETPF
    (rmse.a 5.05 against climatology's 3.66, rmv.a 0.07) and none of the working filters, whose
    error/spread ratios lie between 0.75 and 1.3.

    Parameters
    ----------
    scores : list of Score
        Objects with ``method``, ``rmse_a``, ``rmv_a`` and ``diverged`` (see the module docstring).
    spread_factor : float, optional
        The error/spread ratio above which a row is flagged (a positive number).

    Returns
    -------
    list of str
        One reason per score, ``""`` where none.

    Raises
    ------
    InputError
        Naming ``scores``, ``scores[i].<attribute>`` or ``spread_factor``.
    """
    rows = _rows(scores)
    spread_factor = check_real(spread_factor, "spread_factor", positive=True,
                               expected="a positive error/spread ratio")
    return _lost(rows, spread_factor)


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------

def _check_exp(exp: Any) -> None:
    for key in ("name", "steps", "burn_in", "experiments"):
        if not hasattr(exp, key):
            raise InputError("exp", "an Experiment (see daml.experiment.load_config)", type(exp).__name__)
    if not isinstance(exp.name, str) or not exp.name:
        raise InputError("exp.name", "a non-empty str", repr(exp.name)[:80])


def _row_labels(exp: Any, rows: list[_Row]) -> list[str]:
    """The rows' labels: their own when short and distinct, else :func:`labels` of the experiment's
    methods at the rows' indices, else :func:`labels` of the method names."""
    own = [r.label for r in rows]
    if all(own) and all(len(x) <= MAX_LABEL for x in own) and len(set(own)) == len(own):
        return own
    methods = getattr(exp, "methods", None)
    if isinstance(methods, list) and methods and all(0 <= r.index < len(methods) for r in rows) \
            and len({r.index for r in rows}) == len(rows):
        try:
            full = labels(methods)
        except InputError:
            full = None
        if full is not None:
            return [full[r.index] for r in rows]
    return labels([{"name": r.method} for r in rows])


def _num(v: float, width: int = 8) -> str:
    if not math.isfinite(v):
        return f"{'-' if math.isnan(v) else v:>{width}}"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:>{width}.2e}"
    return f"{v:>{width}.3f}"


def _rate(v: float) -> str:
    if not math.isfinite(v):
        return f"{'-':>9}"
    if abs(v) >= 1e7:
        return f"{v:>9.2e}"
    return f"{v:>9.0f}" if abs(v) >= 100 else f"{v:>9.3g}"


def _wrap(text: str, indent: str = "", first: str = "") -> list[str]:
    return textwrap.wrap(text, width=WIDTH, initial_indent=first, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False) or [""]


LOST_MARK = "LOST"
DIVERGED_MARK = "DIVERGED"


def format_table(exp: Any, scores: Sequence[Any]) -> str:
    """The comparison as a text table of at most :data:`WIDTH` (100) columns.

    A header line names the experiment; then one row per score: its short label (see
    :func:`labels`), ``rmse.a``, ``rmv.a``, ``crps``, ``cycles/s`` and a flag column, which says
    ``LOST`` where :func:`lost_truth` (or the score's own ``flag``) says the filter lost the truth,
    and ``DIVERGED`` where the run diverged (the numbers then give the step). Legend lines under
    the table explain each mark and the reason of each flagged row, list the notes of the rows
    (a score's ``note``), and point to ``<name>_scores.json`` for the full configurations.

    Parameters
    ----------
    exp : daml.experiment.Experiment
        The experiment (its ``name``, ``experiments``, ``steps``, ``burn_in`` and ``methods``).
    scores : list of Score
        One per method run, in the order to show.

    Returns
    -------
    str
        The lines, joined by newlines (no trailing newline).

    Raises
    ------
    InputError
        Naming ``exp``, ``scores`` (not a list, or empty) or ``scores[i].<attribute>``.
    """
    _check_exp(exp)
    rows = _rows(scores)
    if not rows:
        raise InputError("scores", "at least one score", "an empty list")
    names = _row_labels(exp, rows)
    lost = _lost(rows, SPREAD_FACTOR)
    reasons = [r.flag or why for r, why in zip(rows, lost)]
    width = max(6, *(len(n) for n in names))
    output = getattr(exp, "output", None)
    thin = output.get("thin", 1) if isinstance(output, dict) else 1
    scored = f", scored on every {thin}-th analysis only" if isinstance(thin, int) and thin > 1 else ""
    lines = _wrap(f"{exp.name}: {exp.experiments} experiment(s), {exp.steps} model steps, "
                  f"burn-in {exp.burn_in}{scored} (medians over experiments)", indent="  ")
    lines.append(f"{'method':<{width}}  {'rmse.a':>8}  {'rmv.a':>8}  {'crps':>8}  {'cycles/s':>9}  flag")
    for name, r, why in zip(names, rows, reasons):
        if r.diverged:
            cells = f"{'diverged at ' + r.diverged:<{8 * 3 + 4}}  {_rate(r.cycles_per_second)}"
            mark = DIVERGED_MARK
        else:
            cells = f"{_num(r.rmse_a)}  {_num(r.rmv_a)}  {_num(r.crps)}  {_rate(r.cycles_per_second)}"
            mark = LOST_MARK if why else ""
        lines.append(f"{name:<{width}}  {cells}  {mark}".rstrip())
    legend = []
    if any(reasons[i] and not rows[i].diverged for i in range(len(rows))):
        legend += _wrap(f"{LOST_MARK}: the filter lost the truth: rmse.a at or above climatology's, above "
                        f"{SPREAD_FACTOR:g} x rmv.a (error far above the spread), or not finite; see docs/report.md",
                        indent="  ")
        for name, r, why in zip(names, rows, reasons):
            if why and not r.diverged:
                legend += _wrap(why, first=f"  {name}: ", indent="    ")
    if any(r.diverged for r in rows):
        legend += _wrap(f"{DIVERGED_MARK}: the run stopped with non-finite or exploding states at the "
                        "step shown; its partial results are kept and marked", indent="  ")
    notes = [(name, r.note) for name, r in zip(names, rows) if r.note.strip()]
    if notes:
        legend.append("notes:")
        for name, note in notes:
            legend += _wrap(" ".join(note.split()), first=f"  {name}: ", indent="    ")
    legend += _wrap(f"full configuration of each row in {exp.name}_scores.json", indent="  ")
    out = []
    for line in lines + legend:                       # a last guard: nothing wider than WIDTH
        out += [line] if len(line) <= WIDTH else _wrap(line, indent="  ")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# the figure
# ------------------------------------------------------------------------------------------------

_LINESTYLES = ["-", "--", ":", "-."]
_LEGEND_BESIDE = 14          # legend entries that fit beside the RMSE panel
_MARKERS = [None, "o", "s", "^", "v", "D"]


def _style(k: int) -> dict:
    """Colour, line style and marker of the ``k``-th curve: 10 colours x 4 line styles x 6 markers."""
    colour = f"C{k % 10}"
    ls = _LINESTYLES[(k // 10) % len(_LINESTYLES)]
    marker = _MARKERS[(k // 40) % len(_MARKERS)]
    style = {"color": colour, "linestyle": ls}
    if marker:
        style.update(marker=marker, markevery=0.1, markersize=3)
    return style


def _minor_label(v: float, lim: tuple[float, float]) -> str:
    """Minor log ticks labelled 2, 3 and 5 times a power of ten where the axis spans under a decade."""
    lo, hi = sorted(lim)
    if not (v > 0 and lo > 0 and hi / lo < 10):
        return ""
    lead = round(v / 10 ** math.floor(math.log10(v)), 6)
    return f"{v:g}" if lead in (2.0, 3.0, 5.0) else ""


def _counts(counts: Any, where: str) -> np.ndarray | None:
    if counts is None:
        return None
    values = np.asarray(getattr(counts, "values", counts))
    dims = getattr(counts, "dims", None)
    if dims is not None and "rank" in dims and len(dims) > 1:      # other dims: summed (pooled)
        values = np.asarray(counts.sum([d for d in dims if d != "rank"]).values)
    if values.dtype.kind not in "iuf" or values.ndim != 1 or values.size < 2:
        raise InputError(where, "rank-histogram counts over a 'rank' dimension of 2 or more bins",
                         f"dtype {values.dtype}, shape {values.shape}")
    values = values.astype(float)
    if not np.isfinite(values).all() or (values < 0).any():
        raise InputError(where, "finite non-negative counts", "negative or non-finite values")
    return values


def _regroup(counts: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adjacent bins merged into at most ``bins`` groups: (left edge, width, density relative to
    flat) on the [0, 1] scale of the original bins, so a flat histogram stays at 1."""
    n = counts.size
    groups = np.array_split(np.arange(n), min(bins, n))
    total = counts.sum()
    left = np.array([g[0] / n for g in groups])
    width = np.array([g.size / n for g in groups])
    mean = np.array([counts[g].mean() for g in groups])
    density = mean / (total / n) if total > 0 else np.zeros_like(mean)
    return left, width, density


def _pvalue(row: _Row, counts: np.ndarray) -> float:
    p = getattr(row.score, "rank_pvalue", math.nan)
    if isinstance(p, numbers.Real) and not isinstance(p, bool) and math.isfinite(p):
        return float(p)
    if counts.sum() <= 0:
        return math.nan
    try:                                  # scipy is a core dependency; the test thins nothing here
        import xarray as xr

        from .diagnostics import rank_histogram_flatness

        return float(rank_histogram_flatness(xr.DataArray(counts, dims=["rank"])).pvalue)
    except (ImportError, InputError):
        return math.nan


def _curve(rmse_t: Any, where: str):
    if rmse_t is None:
        return None
    dims = getattr(rmse_t, "dims", None)
    if dims is None or "time" not in dims:
        raise InputError(where, "a DataArray with a 'time' dimension", type(rmse_t).__name__)
    other = [d for d in dims if d != "time"]
    r = rmse_t.median(other) if other else rmse_t
    t = np.asarray(r["time"].values) if "time" in r.coords else np.arange(r.sizes["time"])
    y = np.asarray(r.values, dtype=float)
    return t, np.where(y > 0, y, np.nan)


def figure(exp: Any, scores: Sequence[Any], out: str | os.PathLike, rank_bins: int = 20) -> Path | None:
    """Draw the comparison as a grid of panels readable on a page and write it as PNG.

    Layout (docs/report.md), 4 columns, 9.8 inches wide: the first row holds the analysis RMSE over
    time (the median over the experiments, log scale, a dotted line at the burn-in); its legend is
    outside the axes, so that it hides no curve: beside the panel for up to 13 methods, below it
    for more. Every method has its distinct label (:func:`labels`) and a distinct colour and line
    style (10 colours, then the same colours dashed, dotted, ...); flagged and diverged methods say
    so in the legend. The following rows hold one rank histogram per score that has
    ``rank_counts``, up to 4 per row, with shared x and y axes: at most ``rank_bins`` bars (adjacent
    ranks merged), the height relative to a flat histogram (a line at 1) over the rank on a 0-1
    scale, and the flatness p-value (``rank_pvalue``, else the chi-square test of
    :func:`daml.diagnostics.rank_histogram_flatness` on the counts) in the title; a flagged or
    diverged method's title says so in red.

    Parameters
    ----------
    exp : daml.experiment.Experiment
        The experiment (its ``name`` and ``burn_in``; ``methods`` for the labels).
    scores : list of Score
        As for :func:`format_table`; ``rmse_t`` (a DataArray over ``time`` and other dimensions,
        whose median is drawn) and ``rank_counts`` (a DataArray over ``rank``) may be ``None``.
    out : str or path-like
        The folder to write ``<name>.png`` into, or the file itself when it ends in ``.png``.
    rank_bins : int, optional
        The most bars per rank histogram (2 or more).

    Returns
    -------
    pathlib.Path or None
        The file written (atomically, :func:`daml.io.save_figure`), or ``None`` when matplotlib is
        not installed.

    Raises
    ------
    InputError
        Naming ``exp``, ``scores``, ``scores[i].<attribute>``, ``out`` or ``rank_bins``.
    """
    _check_exp(exp)
    rows = _rows(scores)
    if not rows:
        raise InputError("scores", "at least one score", "an empty list")
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise InputError("out", "a folder or a .png file name (str or os.PathLike)", type(out).__name__)
    rank_bins = check_int(rank_bins, "rank_bins", minimum=2)
    burn_in = _real(getattr(exp, "burn_in"), "exp.burn_in")
    out = Path(out)
    path = out if out.suffix.lower() == ".png" else out / f"{exp.name}.png"
    if path is not out and out.exists() and not out.is_dir():
        raise InputError("out", "a folder or a .png file name", f"{str(out)!r}, an existing file that is not a folder")
    if path.exists() and path.is_dir():
        raise InputError("out", "a folder or a .png file name", f"{str(path)!r}, an existing folder")
    names = _row_labels(exp, rows)
    lost = _lost(rows, SPREAD_FACTOR)
    reasons = [r.flag or why for r, why in zip(rows, lost)]
    curves = [_curve(getattr(r.score, "rmse_t", None), f"scores[{i}].rmse_t") for i, r in enumerate(rows)]
    hists = [(i, c) for i, r in enumerate(rows)
             if (c := _counts(getattr(r.score, "rank_counts", None), f"scores[{i}].rank_counts")) is not None]
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.gridspec import GridSpec

    from . import io

    ncols = 4                                   # a page: about 9.8 inches wide at most
    col_w = 2.35
    hist_rows = math.ceil(len(hists) / ncols)
    entries = len(rows) + 1                     # the methods and the burn-in line
    beside = entries <= _LEGEND_BESIDE          # a short legend beside the panel, a long one below it
    legend_h = 0.0 if beside else 0.16 * math.ceil(entries / 3) + 0.15
    top = max(2.6, 0.16 * entries + 0.6) if beside else 2.6
    heights = [top] + ([legend_h] if not beside else []) + [2.2] * hist_rows
    fig = plt.figure(figsize=(col_w * ncols + 0.4, sum(heights)), layout="constrained")
    grid = GridSpec(len(heights), ncols, figure=fig, height_ratios=heights)
    ax = fig.add_subplot(grid[0, :ncols - 1] if beside else grid[0, :])
    handles = []
    for k, (name, r, curve, why) in enumerate(zip(names, rows, curves, reasons)):
        tag = f"{name} (diverged at {r.diverged})" if r.diverged else (f"{name} (LOST)" if why else name)
        if curve is None:
            (h,) = ax.plot([], [], lw=1.0, label=tag, **_style(k))
        else:
            (h,) = ax.plot(curve[0], curve[1], lw=0.9, label=tag, **_style(k))
        handles.append(h)
    if math.isfinite(burn_in):
        handles.append(ax.axvline(burn_in, color="k", lw=0.7, ls=":", label="burn-in"))
    if any(c is not None and np.isfinite(c[1]).any() for c in curves):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: _minor_label(v, ax.get_ylim())))
    else:                                 # every method diverged at once: say so, draw no axis scale
        ax.text(0.5, 0.5, "no finite positive RMSE to draw", transform=ax.transAxes, ha="center",
                va="center", fontsize=9, color="red")
    ax.set_xlabel("time", fontsize=8)
    ax.set_ylabel("RMSE of the mean", fontsize=8)
    ax.set_title(f"{exp.name}: analysis RMSE, median over experiments", fontsize=9)
    ax.tick_params(which="both", labelsize=7)
    lax = fig.add_subplot(grid[0, ncols - 1] if beside else grid[1, :])
    lax.axis("off")
    lax.legend(handles=handles, loc="center left" if beside else "upper left", fontsize=7,
               ncol=1 if beside else 3, frameon=False, handlelength=2.5, borderaxespad=0.0)
    first = None
    offset = 1 if beside else 2
    for j, (i, counts) in enumerate(hists):
        row, col = offset + j // ncols, j % ncols
        hax = fig.add_subplot(grid[row, col], sharex=first, sharey=first)
        first = first or hax
        left, width, density = _regroup(counts, rank_bins)
        hax.bar(left, density, width=width, align="edge", color="C0", edgecolor="white", linewidth=0.3)
        hax.axhline(1.0, color="k", lw=0.8)
        p = _pvalue(rows[i], counts)
        ptext = f"p = {p:.2g}" if math.isfinite(p) else "p n/a"
        flagged = bool(reasons[i]) or bool(rows[i].diverged)
        mark = " DIVERGED" if rows[i].diverged else (" LOST" if reasons[i] else "")
        hax.set_title(f"{names[i]}{mark}\nrank histogram, flatness {ptext}", fontsize=8,
                      color="red" if flagged else "black")
        hax.tick_params(labelsize=7)
        if col == 0:
            hax.set_ylabel("frequency / flat", fontsize=7)
        if j + ncols >= len(hists):
            hax.set_xlabel("rank of the truth (0-1)", fontsize=7)
    if first is not None:
        first.set_xlim(0.0, 1.0)
        first.set_ylim(bottom=0.0)
    return io.save_figure(fig, path, dpi=110)
