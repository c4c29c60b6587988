"""daml beyond one machine, on Dask distributed: sweeps, member blocks and blocked local analyses.

This is the only module of daml that imports dask (the ``distributed`` extra:
``pip install 'daml[distributed]'``). The same code runs on a laptop (a ``LocalCluster``), on a batch
system (dask-jobqueue) and under ``mpirun`` (dask-mpi): everything here takes a
:class:`dask.distributed.Client`, however it was started. See ``docs/distributed.md``.

Three workloads, each cut into tasks that are long against Dask's overhead (a few milliseconds per
task measured here, ``docs/benchmarks.md``):

* **Sweeps** (:func:`daml.experiment.run_experiment` / ``run_experiments`` with ``client=``, and
  ``daml run CONFIG... --scheduler ADDRESS``): one task per method of each experiment. A task gets the
  method's own random stream and the intra-op thread count it would have in one process, so the
  Datasets, scores and files are bit for bit those of a run in one process.
* **Member blocks** (:func:`fit`): blocks of members of :func:`daml.ensembles.fit`, each trained in one
  vmapped pass on a worker (:func:`daml.ensembles.fit_block`) and gathered into one ensemble
  (:func:`daml.ensembles.gather`), bit for bit the ensemble trained in one process.
* **Local analyses** (:func:`local_analysis`): the LETKF or the LETPF of a large one-dimensional periodic
  grid (Lorenz-96 with 10^5 variables and more), the grid cut into blocks that each carry a halo of the
  neighbours their local analyses see (:func:`daml.filters.local.halo`); ``member`` is never chunked.

Workers run one daml task at a time (a process-wide lock), because torch's intra-op thread count is
a property of the process: start workers with one Dask thread each (``--nthreads 1``;
:func:`connect` does for ``local:N``) and let torch use the cores.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings
import uuid
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import xarray as xr

from . import _device
from .errors import ConvergenceWarning, InputError, ShapeError, check_int, check_real

__all__ = ["connect", "check_client", "workers", "fit", "local_analysis", "member_blocks", "LOCAL_METHODS"]

LOCAL_METHODS = ("letkf", "letpf")
"""The local analyses :func:`local_analysis` runs in blocks."""

_TASK_LOCK = threading.Lock()       # one daml task at a time per worker process (torch threads are global)


# TRIM: Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (to return freed memory to the
# system sooner), which also freezes glibc's mmap threshold at 128 kB. torch allocates and frees many
# such buffers per step, and the training of a small ensemble ran 2.2 times slower with it here (10.9 s
# against 23.5 s, benchmarks/malloc_trim.py); connect("local:N") starts its workers without it, and
# docs/distributed.md says what to do elsewhere (MALLOC_MMAP_THRESHOLD_ in the workers' environment).


def _dask():
    """Import dask.distributed, or say which extra to install."""
    try:
        import dask
        import dask.array  # noqa: F401
        import distributed
    except ImportError as exc:                         # pragma: no cover - the test extra installs it
        raise ImportError("daml.distributed needs Dask distributed: pip install 'daml[distributed]' "
                          f"({exc})") from exc
    return dask, distributed


def check_client(client: Any, name: str = "client") -> Any:
    """``client`` if it is a :class:`dask.distributed.Client`; an :class:`~daml.errors.InputError` naming
    ``name`` otherwise (also for a closed client)."""
    _, distributed = _dask()
    if not isinstance(client, distributed.Client):
        raise InputError(name, "a dask.distributed.Client (daml.distributed.connect('local:2') starts one)",
                         type(client).__name__)
    if client.status not in ("running", "connecting", "newly-created"):
        raise InputError(name, "a running dask.distributed.Client", f"a client whose status is {client.status!r}")
    return client


def connect(scheduler: str, **kwargs: Any) -> Any:
    """A :class:`dask.distributed.Client` for ``scheduler``.

    Parameters
    ----------
    scheduler : str
        ``"local:N"``: a new ``LocalCluster`` of ``N`` worker processes with one thread each (closed
        with the client); a path ending in ``.json``: a scheduler file (``dask-mpi --scheduler-file``,
        ``dask scheduler --scheduler-file``); anything else is the address of a running scheduler
        (``tcp://host:8786``, as dask-jobqueue's ``cluster.scheduler_address`` gives it).
    **kwargs
        Passed on to ``LocalCluster`` (``local:N``) or to ``Client`` (an address).

    Returns
    -------
    dask.distributed.Client
        Close it (``client.close()``, or use it as a context manager) when done; for ``local:N`` this
        also stops the cluster.
    """
    _, distributed = _dask()
    if not isinstance(scheduler, str) or not scheduler.strip():
        raise InputError("scheduler", "'local:N' (N worker processes here) or a scheduler address "
                         "(tcp://host:8786)", repr(scheduler))
    text = scheduler.strip()
    if text.startswith("local"):
        count = text[len("local"):].lstrip(":")
        if not count.isdigit() or int(count) < 1:
            raise InputError("scheduler", "'local:N' with N a positive number of worker processes", repr(scheduler))
        opts = {"n_workers": int(count), "threads_per_worker": 1, "processes": True,
                "dashboard_address": ":0", **kwargs}
        dask, _ = _dask()
        environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
                   if k != "MALLOC_TRIM_THRESHOLD_"}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = distributed.LocalCluster(**opts)          # see TRIM below
        client = distributed.Client(cluster, set_as_default=False)
        client._daml_cluster = cluster                         # noqa: SLF001 - closed with the client
        _close = client.close

        def close(*args: Any, **kw: Any) -> Any:
            try:
                return _close(*args, **kw)
            finally:
                cluster.close()

        client.close = close
        return client
    if text.endswith(".json"):
        if not os.path.isfile(text):
            raise FileNotFoundError(2, "no such scheduler file (--scheduler)", text)
        return distributed.Client(scheduler_file=text, set_as_default=False, **kwargs)
    return distributed.Client(text, set_as_default=False, **kwargs)


def workers(client: Any) -> int:
    """The number of workers of ``client`` now (at least 1: waits for the first)."""
    check_client(client)
    info = client.scheduler_info()
    n = len(info.get("workers", {}))
    if n == 0:
        client.wait_for_workers(1)
        n = len(client.scheduler_info().get("workers", {}))
    return n


def _identity(value: Any) -> Any:
    return value


def _token() -> str:
    return uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- sweeps

def _method_on_worker(run: dict, job: Any, env_threads: str | None) -> tuple[Any, list]:
    """A method of an experiment, as a task: the client's DAML_THREADS, one daml task at a time; returns
    the Score and the warnings it issued (category, message), which the client issues again."""
    from . import experiment

    with _TASK_LOCK:
        saved = os.environ.get("DAML_THREADS")
        try:
            if env_threads is None:
                os.environ.pop("DAML_THREADS", None)
            else:
                os.environ["DAML_THREADS"] = env_threads
            with _recording() as caught:
                score = experiment.method_task(run, job, False)
            return score, caught
        finally:
            if saved is None:
                os.environ.pop("DAML_THREADS", None)
            else:
                os.environ["DAML_THREADS"] = saved


def run_methods(client: Any, runs: Sequence[dict], jobs: Sequence[Any],
                started: Callable[[int, Any], None] | None = None) -> Iterator[tuple[int, Any]]:
    """Submit every job of :func:`daml.experiment.run_experiments` to ``client`` and yield
    ``(position, Score)`` as each finishes (the caller writes the files). Each experiment's data,
    model and operator are sent to the cluster once. Closing the generator early (an error, Ctrl-C)
    cancels the tasks still queued. A worker lost during a task (killed, out of memory) makes the
    scheduler run the task again on another worker, from the same inputs: the result is unchanged.
    """
    _, distributed = _dask()
    check_client(client)
    env_threads = os.environ.get("DAML_THREADS")
    token = _token()
    shared = []
    for e, r in enumerate(runs):
        # a task, not scattered data: if the worker holding it is lost, the scheduler makes it again
        payload = {k: r[k] for k in ("exp", "plan", "model", "op", "data", "clim")}
        shared.append(client.submit(_identity, payload, pure=False, key=f"daml-inputs-{e}-{token}"))
    futures, position = [], {}
    for k, job in enumerate(jobs):
        if started is not None:
            started(k, job)
        name = runs[job.run]["exp"].name
        fut = client.submit(_method_on_worker, shared[job.run], job, env_threads, pure=False,
                            key=f"daml-method-{name}-{job.index}-{token}")
        futures.append(fut)
        position[fut.key] = k
    finished: set = set()
    try:
        for fut in distributed.as_completed(futures, loop=client.loop):
            score, caught = fut.result()                # a task's own error is raised here, unchanged
            _replay(caught)                             # its warnings, as one process would have issued them
            finished.add(fut.key)
            fut.release()                               # its posterior now lives here only
            yield position[fut.key], score
    finally:
        leftover = [f for f in futures if f.key not in finished]
        if leftover:
            client.cancel(leftover)
        client.cancel(shared)


# --------------------------------------------------------------------------- member blocks

def member_blocks(members: int, block: int) -> list[tuple[int, int]]:
    """``(first, count)`` of consecutive blocks of at most ``block`` members covering ``0 .. members-1``."""
    members = check_int(members, "members")
    block = check_int(block, "block")
    count = -(-members // block)
    if count > 1_000_000:
        raise InputError("block", f"a block size giving at most a million tasks for members={members}",
                         f"block={block} ({count} tasks)", hint="each task costs the scheduler about a millisecond")
    return [(s, min(block, members - s)) for s in range(0, members, block)]


def fit(module: Any, x: Any, y: Any, *, client: Any, members: int = 5, block: int | None = None,
        threads: int | None = None, **kwargs: Any) -> Any:
    """:func:`daml.ensembles.fit` with blocks of members trained on ``client``'s workers.

    Each block is one task that trains its members in one vmapped pass
    (:func:`daml.ensembles.fit_block`), with the intra-op thread count the whole fit would use here;
    the blocks are gathered (:func:`daml.ensembles.gather`) into one ensemble that is bit for bit the
    ensemble ``daml.ensembles.fit(module, x, y, members=members, **kwargs)`` trains in one process
    (parameters, prior draws, training history, convergence diagnostics), so its weights
    (:func:`~daml.ensembles.weigh`) and predictive distributions follow unchanged.

    Parameters
    ----------
    module, x, y, **kwargs
        As for :func:`daml.ensembles.fit` (``seed=`` included: the blocks draw member ``i``'s streams
        from the same seed as one process does; ``seed=None`` draws one fresh seed for all blocks).
    client : dask.distributed.Client
    members : int
        Ensemble size.
    block : int, optional
        Members per task. Default: the members shared evenly over the workers (one block each). A
        block should train for a second or more (``docs/distributed.md``): much smaller blocks spend
        their time in Dask's overhead and in sending the data, and lose the vmapped batch. Blocks that
        start at multiples of 8 cost nothing extra; another start trains up to 7 throw-away copies
        beside the block (:func:`daml.ensembles.fit_block`: it keeps the memory alignment of one process).
    threads : int, optional
        Intra-op threads of every block. Default: the count ``ensembles.fit`` uses here for the whole
        ensemble (:func:`daml.ensembles.fit_threads`: one thread for small networks). The blocks equal
        the one-process fit bit for bit on one thread; a large network trained on several threads can
        round differently in blocks (products are split by their shapes), so pass ``threads=1`` and
        compare with a one-thread fit where bitwise agreement matters.

    Returns
    -------
    Ensemble
    """
    from .ensembles import training

    check_client(client)
    members = check_int(members, "members")
    if block is None:
        block = max(1, math.ceil(members / workers(client)))
    blocks = member_blocks(members, block)
    if kwargs.get("seed") is None:                  # one fresh stream for all blocks, not one per block
        kwargs["seed"] = np.random.SeedSequence()
    if threads is not None:                         # checked here, before any task is sent
        threads = check_int(threads, "threads", 1)
        if threads > 4096:
            raise InputError("threads", "an intra-op thread count of at most 4096", threads)
    if threads is None:
        threads = training.fit_threads(module, x, members=members, **{k: v for k, v in kwargs.items()
                                                                       if k in ("batch_size", "vectorize")})
    data = client.submit(_identity, (module, x, y), pure=False, key=f"daml-fit-inputs-{_token()}")
    futures = [client.submit(_fit_block_task, data, first, count, members, threads, kwargs, pure=False,
                             key=f"daml-fit-{first}-{count}-{_token()}") for first, count in blocks]
    try:
        parts = client.gather(futures)
    finally:
        client.cancel(futures + [data])
    for _, caught in parts:
        _replay(caught)                                 # what the blocks warned about on their workers
    return training.gather([ens for ens, _ in parts])


def _fit_block_task(data: tuple, first: int, count: int, members: int, threads: int | None, kwargs: dict) -> Any:
    from .ensembles import training

    module, x, y = data
    with _TASK_LOCK, _recording() as caught:
        ens = training.fit_block(module, x, y, first=first, count=count, members=members, threads=threads,
                                 **kwargs)
    return ens, caught


# --------------------------------------------------------------------------- blocked local analyses

def _grid_inputs(forecast: Any, y: Any, variance: Any, dim: str | None) -> tuple[str, np.ndarray, np.ndarray,
                                                                                  np.ndarray]:
    """The checked inputs of :func:`local_analysis` as arrays: grid dim, x (N, n), y (n,), precision (n,)."""
    from .posterior import MEMBER

    if not isinstance(forecast, xr.DataArray):
        raise InputError("forecast", "an xarray.DataArray with dims ('member', <grid>)", type(forecast).__name__)
    if MEMBER not in forecast.dims or forecast.ndim != 2:
        raise ShapeError("forecast", "a DataArray with two dims: 'member' and the grid", f"dims {forecast.dims}")
    grid = next(d for d in forecast.dims if d != MEMBER)
    if dim is not None and dim != grid:
        raise InputError("dim", f"the grid dim of forecast ({grid!r})", repr(dim))
    chunks = forecast.chunksizes.get(MEMBER) if forecast.chunks is not None else None
    if chunks is not None and len(chunks) > 1:
        raise InputError("forecast", "'member' in one chunk (a local analysis needs every member of a grid point; "
                         "member is never chunked)", f"{len(chunks)} chunks along member")
    x = np.asarray(forecast.transpose(MEMBER, grid).values)
    if x.dtype.kind != "f":
        raise InputError("forecast", "floating-point values", str(x.dtype))
    if not np.isfinite(x).all():
        raise InputError("forecast", "finite values", "NaN or infinite entries")
    n = x.shape[1]
    if not isinstance(y, xr.DataArray) or y.dims != (grid,) or y.sizes[grid] != n:
        raise ShapeError("y", f"a DataArray over ({grid!r},) of size {n} (NaN where not observed)",
                         f"{type(y).__name__} with dims {getattr(y, 'dims', None)}")
    yv = np.asarray(y.values, dtype=x.dtype)
    if np.isinf(yv).any():
        raise InputError("y", "finite observations (NaN where not observed)", "infinite entries")
    observed = np.isfinite(yv)
    if not observed.any():
        raise InputError("y", "at least one observation", "NaN everywhere")
    if isinstance(variance, xr.DataArray):
        if variance.dims != (grid,) or variance.sizes[grid] != n:
            raise ShapeError("variance", f"a number or a DataArray over ({grid!r},) of size {n}",
                             f"dims {variance.dims}")
        r = np.asarray(variance.values, dtype=x.dtype)
    else:
        r = np.full(n, check_real(variance, "variance", positive=True), dtype=x.dtype)
    bad = observed & ~(np.isfinite(r) & (r > 0))
    if bad.any():
        raise InputError("variance", "positive finite observation-error variances where y is observed",
                         f"{int(bad.sum())} entries that are not")
    precision = np.where(observed, 1.0 / np.where(observed, r, 1.0), 0.0).astype(x.dtype)
    return grid, x, np.where(observed, yv, 0.0).astype(x.dtype), precision


def _window_kernel(block: np.ndarray, method: str, radius: float, h: int, options: dict) -> np.ndarray:
    """One grid block with its halo (rows: the members, then y, then the precision) -> its analysis, with
    one more row that says what the block warned about (a warning on a worker would otherwise be lost):
    0 nothing, 1 a ConvergenceWarning (unconverged transport problems), 2 another warning."""
    from .filters import local

    window = local.letkf_window if method == "letkf" else local.letpf_window
    x = torch.from_numpy(np.ascontiguousarray(block[:-2]))
    y = torch.from_numpy(np.ascontiguousarray(block[-2]))
    p = torch.from_numpy(np.ascontiguousarray(block[-1]))
    with _TASK_LOCK, torch.inference_mode(), _recording() as caught:
        xa = window(x, y, p, radius, h, **options).numpy()
    code = 0.0
    if caught:
        code = 1.0 if any(issubclass(category, ConvergenceWarning) for category, _ in caught) else 2.0
    return np.concatenate([xa, np.full((1, xa.shape[1]), code, dtype=xa.dtype)], axis=0)


@contextlib.contextmanager
def _recording() -> Iterator[list]:
    """Record the warnings of a block (on a worker, where they would be lost) as ``(category, message)``."""
    out: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield out
    out.extend((w.category, str(w.message)) for w in caught)


def _replay(caught: Sequence[tuple[type, str]]) -> None:
    """Issue, in the caller's process, the warnings a task recorded on its worker."""
    for category, message in caught:
        warnings.warn(message, category, stacklevel=3)


def local_analysis(forecast: Any, y: Any, variance: Any, radius: float, *, method: str = "letkf",
                   client: Any = None, block: int | None = None, dim: str | None = None,
                   **options: Any) -> xr.Dataset:
    """The local analysis (LETKF or LETPF) of a one-dimensional periodic grid, in blocks of grid points.

    The grid is cut into blocks of ``block`` consecutive points; each block is one task that receives
    its points and a halo of :func:`daml.filters.local.halo` ``(radius)`` neighbours on either side
    (periodically: ``dask.array.map_overlap``), all members of each, and returns the analysis of its own
    points. ``member`` is never chunked. Each local analysis only sees observations within the
    Gaspari-Cohn support, so the blocks are independent and the result is the analysis of the whole
    grid in one process (:func:`daml.filters.local.letkf_local`), equal to the dense
    :func:`daml.filters.letkf` analysis of small grids.

    Parameters
    ----------
    forecast : xarray.DataArray, dims ("member", grid)
        The forecast ensemble (a Lorenz-96 state of 10^5 variables, say). Equal weights.
    y : xarray.DataArray, dims (grid,)
        Observations of grid points, NaN where a point is not observed.
    variance : float or xarray.DataArray over grid
        Observation-error variances (a diagonal R).
    radius : float
        Localisation radius in grid points, as :func:`daml.filters.letkf`'s.
    method : {"letkf", "letpf"}
        The local ensemble transform Kalman filter or the local ensemble transform particle filter
        (no rejuvenation; ``options`` such as ``epsilon``, ``solver`` go to
        :func:`daml.filters.local.letpf_window`).
    client : dask.distributed.Client, optional
        Run the blocks on its workers. Without one the whole grid is analysed in this process.
    block : int, optional
        Grid points per task (at least the halo). Default: two blocks per worker. Blocks under about
        100 ms of work lose more to Dask's overhead and the halo than they gain (docs/distributed.md).
    dim : str, optional
        The grid dim, checked against ``forecast``'s.

    Returns
    -------
    xarray.Dataset
        A posterior (:func:`daml.posterior.validate`): the analysis ensemble (named as ``forecast``, or
        ``"x"``) over ``forecast``'s dims and coordinates, equal ``log_weight``, attrs ``method``,
        ``radius``, ``halo``, ``blocks`` and ``warned_blocks`` (blocks that warned, for example about
        unconverged transport problems: the warning is issued here too, also when it was raised on a
        worker).
    """
    from .filters import local
    from .posterior import MEMBER, from_members

    if method not in LOCAL_METHODS:
        raise InputError("method", f"one of {LOCAL_METHODS}", repr(method))
    radius = check_real(radius, "radius", positive=True, expected="a positive localisation radius in grid points")
    grid, x, yv, prec = _grid_inputs(forecast, y, variance, dim)
    h = local.halo(radius)
    n_mem, n = x.shape
    if client is None:
        with torch.inference_mode():
            fn = local.letkf_local if method == "letkf" else local.letpf_local
            with _recording() as caught:
                xa = fn(torch.from_numpy(x), torch.from_numpy(yv), torch.from_numpy(prec), radius, **options).numpy()
        blocks, warned = 1, int(bool(caught))
        _replay(caught)
    else:
        dask, _ = _dask()
        check_client(client)
        if block is None:
            block = max(h, math.ceil(n / (2 * workers(client))))
        block = check_int(block, "block")
        if block < h or n < 2 * h + 1:
            raise InputError("block", f"at least the halo of {h} grid points (radius {radius:g}) on a grid of at "
                             f"least {2 * h + 1} points", f"block={block} on {n} points")
        sizes = tuple(min(block, n - s) for s in range(0, n, block))
        if sizes[-1] < h:                                       # a last block thinner than the halo: merge it
            sizes = sizes[:-2] + (sizes[-2] + sizes[-1],)
        stacked = np.concatenate([x, yv[None], prec[None]], axis=0)
        arr = dask.array.from_array(stacked, chunks=((n_mem + 2,), sizes))
        kernel = functools.partial(_window_kernel, method=method, radius=radius, h=h, options=options)
        out = dask.array.map_overlap(kernel, arr, depth={0: 0, 1: h},
                                     boundary={0: "none", 1: "periodic"}, trim=False, chunks=((n_mem + 1,), sizes),
                                     dtype=x.dtype, meta=np.empty((0, 0), dtype=x.dtype))
        both = client.compute(out).result()
        xa, codes = both[:-1], both[-1][np.cumsum((0,) + sizes[:-1])]       # one code per block
        blocks = len(sizes)
        warned = int((codes > 0).sum())
        if (codes == 1).any():
            warnings.warn(f"local_analysis: {int((codes == 1).sum())} of {blocks} blocks had local transport "
                          "problems that did not converge (raise max_iter or epsilon; see the workers' logs)",
                          ConvergenceWarning, stacklevel=2)
        if (codes == 2).any():
            warnings.warn(f"local_analysis: {int((codes == 2).sum())} of {blocks} blocks warned on their workers "
                          "(run without client= to see the warnings)", UserWarning, stacklevel=2)
    name = forecast.name if isinstance(forecast.name, str) and forecast.name else "x"
    order = forecast.dims
    values = xa if order[0] == MEMBER else xa.T
    coords = dict(forecast.coords)
    return from_members(values, name=name, dims=order, coords=coords, method=f"local_{method}",
                        config={"radius": radius, "halo": h, "blocks": blocks, **options},
                        attrs={"radius": radius, "halo": h, "blocks": blocks, "warned_blocks": warned})
