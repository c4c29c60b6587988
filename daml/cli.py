"""Command line: ``daml run``, ``daml check``, ``daml info`` and ``daml q10``.

The CLI is thin: it calls the same public functions a user calls from Python.

``daml run [CONFIG.toml]``
    The main job. Without a file, the embedded default experiment (:data:`daml.experiment.DEFAULT_CONFIG`):
    the Lorenz-96 twin experiment of Sakov & Oke (2008) comparing Climatology, EnKF, ETKF and LETKF on
    the same truths. Prints a table (rmse.a, rmv.a, CRPS, cycles/s per method) and writes the analysis
    posteriors (netCDF), the scores (JSON) and a figure (RMSE over time, a rank histogram per method)
    to ``--out``. With a file, any experiment written as TOML (see :mod:`daml.experiment`).
``daml check``
    The library's self-check: a seeded importance-sampling problem whose posterior is known in closed
    form (Gaussian prior, Gaussian likelihood), run through the posterior type, PSIS, resampling,
    diagnostics and a netCDF round trip, each compared with its exact value within a stated number of
    Monte Carlo standard errors. Exit status 1 if a check fails.
``daml info FILE.nc``
    What a saved posterior holds, with its weight diagnostics.
``daml q10 FILE.csv``
    Q10 of ecosystem respiration with its confidence interval from a FLUXNET2015-style half-hourly
    file, by double machine learning on the night-time data (:func:`daml.causal.q10`); prints the
    summary and writes the result as netCDF to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from . import __version__, _device, diagnostics, io, posterior
from .errors import DamlError

USER_ERRORS = (DamlError, OSError, tomllib.TOMLDecodeError)
"""Errors of the user's input (files, keys, arguments, the output folder): one line on stderr and exit
status 2 (a traceback only with ``daml --debug``). ``FileNotFoundError`` is an ``OSError``."""


def one_line(exc: BaseException) -> str:
    """An error as one line: daml's message, or for an ``OSError`` its reason and file."""
    if isinstance(exc, OSError) and not isinstance(exc, DamlError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename!s}" if exc.filename is not None else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def self_check(out: Path, seed: int = 0, n: int = 20_000) -> list[tuple[str, float, str, float, float, bool]]:
    """Run the self-check; return rows ``(check, value, kind, target, tolerance, passed)``.

    ``kind`` is ``"±"`` (passed when ``|value - target| <= tolerance``) or ``"<="`` (passed when
    ``value <= target``; the tolerance is then 0).

    Prior ``x ~ N(0, 1)`` (2 independent components), observation ``y = x + e``, ``e ~ N(0, s^2)``
    with ``s = 0.7`` and ``y = (1, -0.5)``. The posterior is ``N(y / (1 + s^2), s^2 / (1 + s^2))``
    per component; its CRPS against a point ``z`` is known in closed form (Gneiting et al. 2005).
    """
    g = _device.generator(seed)
    s2 = 0.49
    y = torch.tensor([1.0, -0.5], dtype=torch.float64)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    log_lik = -0.5 * ((y - x) ** 2).sum(-1) / s2
    post = posterior.from_members(x, log_lik, coords={"variable": ["a", "b"]}, method="importance",
                                  config={"prior": "N(0,1)", "obs_sd": math.sqrt(s2), "y": y.tolist()}, seed=seed)
    mu = (y / (1 + s2)).numpy()
    var = s2 / (1 + s2)
    rows = []

    def check(name, value, exact, tol):
        rows.append((name, float(value), "±", float(exact), float(tol), bool(abs(value - exact) <= tol)))

    def at_most(name, value, bound):
        rows.append((name, float(value), "<=", float(bound), 0.0, bool(value <= bound)))

    n_eff = float(post.daml.ess())
    # large-N limit of Kish's ESS for prior-to-posterior importance sampling: N / E_q[w^2] with, per
    # component, E_q[w^2] = E_q[L^2] / E_q[L]^2 = (1 + s2) / sqrt(s2 (2 + s2)) exp(y^2 / ((1 + s2)(2 + s2)))
    second = np.prod((1 + s2) / math.sqrt(s2 * (2 + s2)) * np.exp(y.numpy() ** 2 / ((1 + s2) * (2 + s2))))
    ess_exact = n / second
    check("Kish ESS / N", n_eff / n, ess_exact / n, 0.03)
    mean = post.daml.mean()["x"].values
    se_mean = math.sqrt(var / n_eff)
    for i, name in enumerate("ab"):
        check(f"weighted mean {name} (4 MC se)", mean[i], mu[i], 4 * se_mean)
    v = post.daml.var(ddof=1)["x"].values
    se_var = var * math.sqrt(2.0 / n_eff)
    check("weighted variance a (4 MC se)", v[0], var, 4 * se_var)
    khat = float(post.daml.psis().khat)
    at_most("PSIS k-hat", khat, diagnostics.pareto_khat_threshold(n))
    z = xr.DataArray(np.zeros(2), dims="variable", coords={"variable": ["a", "b"]})
    crps = diagnostics.crps(post, z).values
    sd = math.sqrt(var)
    u = (0.0 - mu) / sd
    from scipy import stats

    crps_exact = sd * (u * (2 * stats.norm.cdf(u) - 1) + 2 * stats.norm.pdf(u) - 1 / math.sqrt(math.pi))
    check("CRPS at 0, component a (2%)", crps[0], crps_exact[0], 0.02 * crps_exact[0] + 4 * se_mean)
    res = post.daml.resample(seed=seed + 1)
    check("resampled mean a (4 MC se)", float(res.daml.mean()["x"][0]), mu[0], 4 * math.sqrt(2) * se_mean)
    check("resampled ESS = N", float(res.daml.ess()), n, 1e-6 * n)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "selfcheck.nc"
    io.to_netcdf(post, path)
    back = io.open_posterior(path)
    identical = back.identical(post) and all(back[k].dtype == post[k].dtype for k in post.variables)
    check("netCDF round trip identical", float(identical), 1.0, 0.0)
    return rows


def _cmd_run(args: argparse.Namespace) -> int:
    from . import experiment

    t0 = time.perf_counter()
    configs = list(args.config) or [None]
    exps = [experiment.load_config(c) for c in configs]   # every check before anything is computed or written
    threads = None if args.threads == "auto" else args.threads
    if threads is None:
        _device.choose_threads(0)                   # a bad DAML_THREADS: one line now, not after minutes
    if threads is not None:
        torch.set_num_threads(threads)
    how = (f"{threads} thread(s)" if threads is not None else
           f"threads chosen per method (1 for small ensembles, at most {torch.get_num_threads()})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(20, "the output folder (--out) is not a folder", str(out))
    what = ", ".join(f"{e.name} ({'default experiment' if c is None else c})" for e, c in zip(exps, configs))
    print(f"daml {__version__}: {what}, torch {torch.__version__}, {how}", flush=True)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    log = None if show else (lambda line: print(f"daml run: {line}", file=sys.stderr, flush=True))
    client = None
    if args.scheduler is not None:
        from . import distributed

        client = distributed.connect(args.scheduler)
        print(f"daml run: {distributed.workers(client)} Dask worker(s) at {client.scheduler.address}", flush=True)
    # --threads N: N everywhere, also inside filters.run's own choice (DAML_THREADS), for this run only
    saved = os.environ.get("DAML_THREADS")
    if threads is not None:
        os.environ["DAML_THREADS"] = str(threads)
    try:
        results = experiment.run_experiments(exps, progress=show, only=args.only, out=out, log=log,
                                             threads=threads, client=client)
    except KeyboardInterrupt:
        kept = sorted(p.name for e in exps for p in out.glob(f"{e.name}_*.nc")) if out.is_dir() else []
        print(f"daml run: interrupted; {len(kept)} finished file(s) kept in {out}"
              + (f" ({', '.join(kept)})" if kept else ""), file=sys.stderr, flush=True)
        return 130
    finally:
        if saved is None:
            os.environ.pop("DAML_THREADS", None)
        else:
            os.environ["DAML_THREADS"] = saved
        if client is not None:
            client.close()
    written = []
    for exp, (data, scores) in zip(exps, results):
        print(experiment.format_table(exp, scores))
        written += experiment.write_outputs(exp, data, scores, out)
    total = sum(p.stat().st_size for p in written if p.is_file())
    print(f"wrote {', '.join(str(p) for p in written)} ({total / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    print(f"daml {__version__} self-check (torch {torch.__version__}, xarray {xr.__version__}, "
          f"{torch.get_num_threads()} threads)")
    rows = self_check(Path(args.out), seed=args.seed)
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  {'value':>12}     {'target':>12}  {'tolerance':>10}  result")
    for name, value, kind, target, tol, ok in rows:
        print(f"{name:<{width}}  {value:>12.6g}  {kind:>2} {target:>12.6g}  {tol:>10.3g}  {'ok' if ok else 'FAIL'}")
    failed = sum(not r[-1] for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed in {time.perf_counter() - t0:.1f} s; "
          f"posterior written to {Path(args.out) / 'selfcheck.nc'}")
    return 1 if failed else 0


def _cmd_info(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            text = _describe_file(Path(path))
        except USER_ERRORS as exc:
            if args.debug:
                raise
            print(f"daml info: {path}: {one_line(exc)}", file=sys.stderr, flush=True)
            failed += 1
            continue
        print(f"== {path}")
        print(text, flush=True)
    return 2 if failed else 0


def _describe_file(path: Path) -> str:
    """What a saved posterior or summary holds (opened lazily where this daml's io can)."""
    ds = io.open_dataset(path, lazy=True)
    try:
        if ds.attrs.get("daml_kind") == "summary":
            return _describe_summary(ds)
        return diagnostics.describe(ds)
    finally:
        ds.close()


def _describe_summary(ds: xr.Dataset) -> str:
    """A few lines on a summary file (``keep = "summary"``): no members, their statistics."""
    lines = [f"summary of a posterior (no members): method {ds.attrs.get('method', '?')}, "
             f"{ds.attrs.get('members', '?')} members, one analysis in {ds.attrs.get('thin', 1)} recorded",
             f"config: {ds.attrs.get('config', '')}",
             "dims: " + ", ".join(f"{d}={s}" for d, s in ds.sizes.items()),
             "variables: " + ", ".join(f"{k}{tuple(ds[k].dims)} {ds[k].dtype}" for k in ds.data_vars)]
    if "ess" in ds:
        e = ds["ess"]
        lines.append(f"ESS min {float(e.min()):.2f}, mean {float(e.mean()):.2f}, max {float(e.max()):.2f}")
    return "\n".join(lines)


def _cmd_q10(args: argparse.Namespace) -> int:
    try:
        from . import causal
    except ImportError as exc:  # scikit-learn lives in the causal extra
        print(f"daml q10: needs the causal extra (pip install 'daml[causal]'): {one_line(exc)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    path = Path(args.file)            # a bad file, column or option: main prints one line, exit status 2
    data, report = causal.read_fluxnet_csv(path, max_qc=args.max_qc, latitude=args.latitude,
                                           min_night=args.min_night)
    print(f"{path}: {report['rows']} rows, {report['night']} night-time; dropped {report['bad_qc']} with "
          f"NEE_VUT_REF_QC > {args.max_qc}, {report['missing']} with missing values, {report['non_positive']} with "
          f"NEE <= 0; {report['kept']} night-time respiration values kept")
    controls = [c.strip() for c in args.controls.split(",") if c.strip()]
    groups = None
    if args.block == "day":
        groups = data["time"].dt.floor("D").to_numpy()
    elif args.block == "week":
        groups = data["time"].dt.to_period("W").astype(str).to_numpy()
    ds = causal.q10(data, reco="RECO", ta="TA", x=controls, tref=args.tref, learner=args.learner,
                    folds=args.folds, repetitions=args.repetitions, aggregation=args.aggregation,
                    groups=groups, seed=args.seed)
    ds.attrs.update({"source_file": str(path), "blocked_by": args.block,
                     **{f"rows_{k}": v for k, v in report.items()}})
    print(causal.summary(ds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{path.stem}_q10.nc"
    io.to_netcdf(ds, target)
    print(f"wrote {target} in {time.perf_counter() - t0:.1f} s")
    return 0


def _threads_arg(text: str) -> int | str:
    """``--threads``: ``auto`` or a positive int (argparse reports anything else as one line)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``daml run: argument --threads: ...``, exit status 2); ``-h``
    shows the usage."""

    def error(self, message: str):
        print(f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="daml", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"daml {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (default: one line naming the file, key or argument)")
    sub = parser.add_subparsers(dest="command", required=True)
    from .filters import REGISTRY
    from .models import MODELS

    run = sub.add_parser(
        "run", help="run an experiment (default: the Lorenz-96 Sakov 2008 comparison)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run an experiment written as TOML (default: the embedded Lorenz-96 comparison), print the "
                    "score table and write\neach method's file as soon as it finishes.",
        epilog="models ([model] name):\n  " + ", ".join(sorted(MODELS))
               + "\nmethods ([[methods]] name):\n  " + ", ".join(sorted(REGISTRY))
               + "\n\nThe TOML schema ([experiment], [model], [observations], [prior], [output], [[methods]]),"
                 "\nthe output files and the exit statuses (0 done, 2 a bad file, key or argument, 130"
                 "\ninterrupted): docs/cli.md, or python -c 'import daml.experiment as e; help(e)'.")
    run.add_argument("config", nargs="*", default=[],
                     help="experiment TOML file(s) (default: the embedded one); several make a sweep, their "
                          "experiment names must differ")
    run.add_argument("--out", default="daml-output", help="output folder (default: %(default)s)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bars (default: on a terminal only)")
    run.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                     help="run only the methods of these names, each with the random stream of its place in "
                          "the list (the same scores as in the full run)")
    run.add_argument("--scheduler", default=None, metavar="ADDRESS",
                     help="run the methods as tasks on Dask distributed (the 'distributed' extra): 'local:N' starts "
                          "N local worker processes, anything else is a scheduler address (tcp://host:8786); "
                          "the results are bit for bit those of one process (docs/distributed.md)")
    run.add_argument("--threads", type=_threads_arg, default="auto",
                     help="torch intra-op threads: a positive int, or 'auto' (default): one thread for a method "
                          "whose ensemble is small (several threads only add synchronisation there, which stalls "
                          "badly on a busy machine), torch's setting for large ones; DAML_THREADS=k forces k")
    run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check", help="the library self-check against closed forms")
    check.add_argument("--out", default="daml-output", help="output folder (default: %(default)s)")
    check.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    check.set_defaults(func=_cmd_check)
    info = sub.add_parser("info", help="summarise saved posteriors (netCDF)")
    info.add_argument("files", nargs="+", help="netCDF files written by daml")
    info.set_defaults(func=_cmd_info)
    q10 = sub.add_parser("q10", help="Q10 with a confidence interval from a FLUXNET2015-style CSV (night-time NEE)")
    q10.add_argument("file", help="half-hourly CSV with TIMESTAMP_START, TA_F, SW_IN_F, VPD_F, NEE_VUT_REF, "
                                  "NEE_VUT_REF_QC, NIGHT and SW_IN_POT (or --latitude)")
    q10.add_argument("--out", default="daml-output", help="output folder (default: %(default)s)")
    q10.add_argument("--learner", choices=["forest", "network"], default="network",
                     help="nuisance learner: a 16-16 tanh network, or a random forest of 100 trees with min leaf 5, "
                          "faster but biased low by about one standard error with day-blocked folds "
                          "(default: %(default)s)")
    q10.add_argument("--controls", default="SW_POT_sm,SW_POT_sm_diff",
                     help="controls of base respiration, comma separated, from SW_POT_sm, SW_POT_sm_diff, VPD "
                          "(default: %(default)s; VPD depends on the temperature itself, so as a control it "
                          "absorbs part of the temperature response)")
    q10.add_argument("--folds", type=int, default=5, help="cross-fitting folds (default: %(default)s)")
    q10.add_argument("--repetitions", type=int, default=1, help="repeated sample splits (default: %(default)s)")
    q10.add_argument("--aggregation", choices=["interval", "variance"], default="interval",
                     help="combining repeated splits: the median of their intervals (DoubleML) or the median of "
                          "se^2 + (theta_r - theta)^2, which adds the spread over splits (default: %(default)s)")
    q10.add_argument("--block", choices=["day", "week", "none"], default="day",
                     help="keep each day (or week) in one fold: half-hours are autocorrelated (default: %(default)s)")
    q10.add_argument("--tref", type=float, default=15.0, help="reference temperature in C (default: %(default)s)")
    q10.add_argument("--max-qc", type=int, default=0, help="highest NEE quality flag kept (default: %(default)s, measured)")
    q10.add_argument("--min-night", type=int, default=100, help="fewest night-time rows accepted (default: %(default)s)")
    q10.add_argument("--latitude", type=float, default=None, help="site latitude, used when SW_IN_POT is absent")
    q10.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    q10.set_defaults(func=_cmd_q10)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 a failed self-check, 2 a user error,
    130 interrupted). User errors print one line naming the file, key or argument; ``--debug``
    shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"daml {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"daml {args.command}: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
