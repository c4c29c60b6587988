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

import math
import os
import threading
import uuid
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import xarray as xr

from . import _device
from .errors import InputError, ShapeError, check_int, check_real

__all__ = ["connect", "check_client", "workers", "fit", "local_analysis", "run_methods", "LOCAL_METHODS"]

LOCAL_METHODS = ("letkf", "letpf")
"""The local analyses :func:`local_analysis` runs in blocks."""

_TASK_LOCK = threading.Lock()       # one daml task at a time per worker process (torch threads are global)


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
        with the client); anything else is the address of a running scheduler
        (``tcp://host:8786``, a scheduler file's address; dask-jobqueue and dask-mpi print or write it).
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
                "dashboard_address": None, **kwargs}
        cluster = distributed.LocalCluster(**opts)
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


def _token() -> str:
    return uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- sweeps

def _method_on_worker(run: dict, job: Any, env_threads: str | None) -> Any:
    """A method of an experiment, as a task: the client's DAML_THREADS, one daml task at a time."""
    from . import experiment

    with _TASK_LOCK:
        saved = os.environ.get("DAML_THREADS")
        try:
            if env_threads is None:
                os.environ.pop("DAML_THREADS", None)
            else:
                os.environ["DAML_THREADS"] = env_threads
            return experiment.method_task(run, job, False)
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
    shared = []
    for r in runs:
        payload = {k: r[k] for k in ("exp", "plan", "model", "op", "data", "clim")}
        shared.append(client.scatter([payload], hash=False)[0])
    token = _token()
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
            score = fut.result()                        # a task's own error is raised here, unchanged
            finished.add(fut.key)
            fut.release()                               # its posterior now lives here only
            yield position[fut.key], score
    finally:
        leftover = [f for f in futures if f.key not in finished]
        if leftover:
            client.cancel(leftover)
        client.cancel(shared)
