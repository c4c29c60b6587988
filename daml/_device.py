"""Device, dtype and random streams: the one module that decides them.

Every public function of daml that takes ``device=``, ``dtype=`` or ``seed=`` resolves them here, so
the rules are the same everywhere:

* ``device=None`` means the device of the input tensors when they are torch tensors, else the CPU.
  ``"cuda"`` asks for the current CUDA device and fails clearly where there is none.
* ``dtype=None`` means ``torch.float64`` on the CPU and ``torch.float32`` on CUDA (double precision is
  slow on most GPUs); an explicit dtype always wins.
* ``seed`` may be an ``int``, a :class:`numpy.random.SeedSequence`, a :class:`torch.Generator` (used
  as it is, and advanced) or ``None`` (fresh entropy from the operating system, not reproducible).
  Independent streams come from :meth:`numpy.random.SeedSequence.spawn`, never from global state.

Same seed, same device, same result: bit for bit on the CPU.

Threads
-------
torch runs an operation on several CPU threads (its *intra-op* threads, ``torch.set_num_threads``)
through OpenMP. For a small operation that is a loss: the threads cost more to wake and to join
than the work they share, and when the machine is busy they wait for a core. torch's OpenMP
runtime (GNU libgomp) spin-waits by default, so a thread that waits for a partner which has no
core burns the very core the partner needs. Measured on a 2-core machine with other jobs running
(load average 7-10): 300 cycles of the Lorenz-96 ETKF (40 variables, 24 members) took a median
1.5 s at one thread and 60 s at two (12 s of CPU time), the issue-27 outliers.
``OMP_WAIT_POLICY=PASSIVE`` cures the spinning, but only when it is set before torch is imported
(libgomp reads it once, as it loads; setting it later changes nothing, which we checked).

So daml's loops run small problems on one thread, inside :func:`auto_threads`:

* ``work`` is the number of elements of the largest array one operation of the loop handles:
  for a filter, experiments x members x max(variables, members) (:func:`ensemble_work`); for
  training, members x the larger of the parameter count and batch size x widest layer
  (:func:`network_work`).
* ``work < SMALL_WORK`` (32768 elements, torch's own grain size: the smallest elementwise
  operation it splits between threads at all) runs the block on one thread; otherwise the
  caller's setting stands.
* ``DAML_THREADS=k`` in the environment (a positive integer) forces ``k`` threads in every such
  block, large or small; ``DAML_THREADS=auto`` (or unset) is the rule above. An explicit
  ``threads=k`` argument wins over both.

:func:`threads` sets the count for a block and :func:`auto_threads` chooses it; both restore the
caller's setting on exit, exceptions included, and nest. Switching costs a fraction of a
microsecond (``torch.set_num_threads``), nothing beside a filter cycle. torch's *inter-op* threads
(``torch.get_num_interop_threads``) serve only ``torch.jit.fork`` and the like, not these
operations, and are left alone.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch

from .errors import DeviceError, DtypeError, InputError, SeedError, check_fits, check_int

__all__ = [
    "Seed",
    "resolve_device",
    "resolve_dtype",
    "as_tensor",
    "to_numpy",
    "seed_sequence",
    "generator",
    "spawn",
    "spawn_generators",
    "seed_to_attr",
    "random_state",
    "scoped_global_stream",
    "working_set_bytes",
    "elementwise_rows",
    "smoothing_dtype",
    "smoothing_noise",
    "threads",
    "auto_threads",
    "choose_threads",
    "ensemble_work",
    "network_work",
    "SMALL_WORK",
    "SMALL_NETWORK_WORK",
]

Seed = Union[int, np.random.SeedSequence, torch.Generator, None]

_DTYPE_NAMES = {
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float": torch.float32,
    "single": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
}


def resolve_device(device: str | torch.device | None = None, like: Any = None) -> torch.device:
    """Turn ``device`` into a :class:`torch.device`.

    Parameters
    ----------
    device : str, torch.device or None
        ``None`` takes the device of ``like`` (a tensor or a sequence of tensors) and falls back to the
        CPU.
    like : torch.Tensor or sequence of them, optional
        Inputs whose device is used when ``device`` is ``None``.

    Raises
    ------
    DeviceError
        For an unknown device string, a CUDA device where none is available, or inputs that sit on
        different devices.
    """
    if device is None:
        devices = {t.device for t in _tensors(like)}
        if len(devices) > 1:
            raise DeviceError(
                "inputs", "tensors on one device", sorted(str(d) for d in devices),
                hint="move them with .to(device) first",
            )
        return devices.pop() if devices else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError("device", "'cpu', 'cuda', 'cuda:N' or a torch.device", repr(device)) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device", "a device that exists on this machine", repr(device),
                              hint="torch.cuda.is_available() is False here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError("device", f"a CUDA index below {torch.cuda.device_count()}", repr(device))
    return dev


def resolve_dtype(dtype: Any = None, device: torch.device | str | None = None) -> torch.dtype:
    """Turn ``dtype`` into a floating :class:`torch.dtype`.

    ``None`` gives float64 on the CPU and float32 on CUDA. Strings (``"float32"``), numpy dtypes and
    torch dtypes are accepted.
    """
    if dtype is None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return torch.float32 if dev.type == "cuda" else torch.float64
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif isinstance(dtype, str) and dtype in _DTYPE_NAMES:
        out = _DTYPE_NAMES[dtype]
    else:
        try:
            out = _DTYPE_NAMES[np.dtype(dtype).name]
        except (TypeError, KeyError, ValueError) as exc:
            raise DtypeError("dtype", "a floating dtype such as 'float64' or torch.float32",
                             repr(dtype)) from exc
    if not out.is_floating_point:
        raise DtypeError("dtype", "a floating dtype", repr(dtype))
    return out


def as_tensor(
    x: Any,
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: Any = None,
    floating: bool = True,
) -> torch.Tensor:
    """Convert ``x`` (tensor, numpy array, xarray object, scalar, nested list) to a torch tensor.

    Parameters
    ----------
    x : array-like
        The input.
    name : str
        Argument name used in error messages.
    device, dtype : optional
        Resolved with :func:`resolve_device` / :func:`resolve_dtype`. With ``dtype=None`` a floating
        input keeps its own precision and other inputs become the default floating dtype.
    floating : bool
        Require a real floating result (integers are converted, bool/complex/object refused).
    """
    if hasattr(x, "variable") and hasattr(x, "dims"):  # xarray DataArray / Variable
        x = x.values
    dev = resolve_device(device, like=x if isinstance(x, torch.Tensor) else None)
    if isinstance(x, torch.Tensor):
        t = x
    else:
        if x is None or isinstance(x, (str, bytes, dict)):
            raise DtypeError(name, "a numeric array or tensor", type(x).__name__)
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged nested lists and the like
            raise DtypeError(name, "a numeric array or tensor", f"{type(x).__name__} ({exc})") from exc
        if arr.dtype == object:
            raise DtypeError(name, "a numeric array", f"an array of dtype object (shape {arr.shape})")
        if arr.dtype.kind == "c":
            raise DtypeError(name, "real values", f"dtype {arr.dtype}")
        if arr.dtype.kind not in "biuf":
            raise DtypeError(name, "a numeric array", f"an array of dtype {arr.dtype} (shape {arr.shape})")
        t = torch.from_numpy(np.ascontiguousarray(arr)) if arr.ndim else torch.tensor(arr[()])
    if floating:
        if t.dtype == torch.bool or t.is_complex():
            raise DtypeError(name, "real floating values", f"dtype {t.dtype}")
        if dtype is None and not t.is_floating_point():
            dtype = resolve_dtype(None, dev)
    target_dtype = resolve_dtype(dtype, dev) if dtype is not None else t.dtype
    return t.to(device=dev, dtype=target_dtype)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detach, move to the CPU and return a numpy array (the dtype is kept)."""
    return t.detach().cpu().numpy()


def seed_sequence(seed: Seed) -> np.random.SeedSequence:
    """Turn any accepted ``seed`` into a :class:`numpy.random.SeedSequence`.

    A :class:`torch.Generator` is advanced: four 32-bit words are drawn from it as entropy, so the
    result depends on its current state.
    """
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, torch.Generator):
        words = torch.randint(0, 2**32, (4,), generator=seed, dtype=torch.int64, device=seed.device)
        return np.random.SeedSequence([int(w) for w in words.cpu()])
    if seed is None:
        return np.random.SeedSequence()
    if isinstance(seed, (bool, np.bool_)):
        raise SeedError("seed", "an int, numpy SeedSequence, torch.Generator or None", repr(seed))
    if isinstance(seed, (int, np.integer)):
        if seed < 0:
            raise SeedError("seed", "a non-negative int", seed)
        return np.random.SeedSequence(int(seed))
    raise SeedError("seed", "an int, numpy SeedSequence, torch.Generator or None", type(seed).__name__)


def generator(seed: Seed, device: str | torch.device | None = None) -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` for ``seed``.

    A generator given as ``seed`` is returned as it is (so successive calls continue its stream); it
    must live on ``device``. Integers and seed sequences give a fresh generator whose 64-bit seed is
    drawn from the sequence, so ``generator(0)`` and ``generator(SeedSequence(0))`` are the same stream.
    """
    dev = resolve_device(device)
    if isinstance(seed, torch.Generator):
        if seed.device.type != dev.type:
            raise DeviceError("seed", f"a torch.Generator on {dev}", f"one on {seed.device}")
        return seed
    ss = seed_sequence(seed)
    state = ss.generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=dev)
    g.manual_seed((int(state[0]) << 32 | int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


# Memory per spawned stream, measured on CPython 3.11 / numpy 2 / torch 2 (tracemalloc, ru_maxrss):
# a SeedSequence about 375 bytes, a CPU torch.Generator about 2.7 KiB more.
_SEED_SEQUENCE_BYTES = 400
_GENERATOR_BYTES = 3200


def spawn(seed: Seed, n: int, *, name: str = "n") -> list[np.random.SeedSequence]:
    """``n`` statistically independent child seed sequences of ``seed``.

    ``n`` streams whose objects cannot fit in memory (about 400 bytes each) are refused at once
    with an :class:`~daml.errors.InputError` naming ``name`` (pass the caller's argument, e.g.
    ``name="members"``), instead of minutes of spawning before a ``MemoryError``.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise SeedError(name, "a non-negative int", repr(n))
    check_fits(name, float(n) * _SEED_SEQUENCE_BYTES, what=f"{name}={int(n)} random streams")
    return seed_sequence(seed).spawn(int(n))


def spawn_generators(seed: Seed, n: int, device: str | torch.device | None = None, *,
                     name: str = "n") -> list[torch.Generator]:
    """``n`` independent torch generators derived from ``seed`` (see :func:`spawn`; sizes whose
    generators, about 3 KiB each, cannot fit in memory are refused naming ``name``)."""
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0:
        check_fits(name, float(n) * (_SEED_SEQUENCE_BYTES + _GENERATOR_BYTES),
                   what=f"{name}={int(n)} torch generators")
    return [generator(child, device) for child in spawn(seed, n, name=name)]


def smoothing_dtype(dtype: torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """The dtype in which smoothing noise (a kernel's jitter) is drawn and shaped for states of
    ``dtype`` on ``device``: float32 for float64 on the CPU, ``dtype`` elsewhere.

    The noise only smooths a sample: its scale is an estimate (a bandwidth times a sample
    covariance) whose Monte Carlo error, of order ``1/sqrt(N)``, dwarfs float32's relative rounding
    of about ``6e-8``. On the CPU, float32 draws are several times faster than float64 ones
    (``benchmarks/particle_filters.py --parts c`` times them), and float32 matrix products cheaper.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return torch.float32 if dev.type == "cpu" and dtype == torch.float64 else dtype


def smoothing_noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal draws of ``shape`` for smoothing noise (a kernel's jitter) of states of
    ``dtype``, reproducible from ``generator`` (which advances), drawn and returned in
    :func:`smoothing_dtype` (the caller shapes them there and widens the result if it needs to).

    On the CPU the draws for float64 states are made in float32 by torch's vectorised sampler:
    several times faster than float64 draws by ``torch.randn`` or by numpy's ziggurat
    (``benchmarks/particle_filters.py --parts c`` times all three). The draws then
    have float32 resolution (24 bits) and no value beyond about 5.8 (the largest radius a 24-bit
    uniform gives the Box-Muller transform; probability 8e-9 under N(0, 1)). Neither matters for
    noise that smooths a sample, which is what this is for; use ``torch.randn`` where the last bits or
    the far tails do. Elsewhere (CUDA, float32): ``torch.randn`` in ``dtype``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(int(s) for s in shape)
    return torch.randn(shape, generator=generator, dtype=smoothing_dtype(dtype, dev), device=dev)


def elementwise_rows(x: torch.Tensor) -> int | None:
    """How many rows (states along the last axis) of ``x`` a long chain of elementwise operations,
    such as an RK4 step, should take at a time; ``None``: all of them in one go.

    On the CPU a chain over arrays larger than the per-core cache runs from memory, and each new
    large temporary may cost fresh pages: an RK4 step of 16 x 1000 states of Lorenz-96 (40 variables,
    float64) is slower in one go than in pieces (``benchmarks/particle_filters.py --parts c`` times
    both), and more so inside a filter's loop, whose other work evicts the cache. So the CPU takes
    about 64Ki elements (512 KiB of float64) per piece. ``None`` on accelerators, and wherever ``x``
    is small enough already.
    """
    if x.device.type != "cpu" or x.ndim < 2:
        return None
    rows = max(1, _ELEMENTWISE_CHUNK // max(1, x.shape[-1]))
    return None if rows >= x.numel() // max(1, x.shape[-1]) else rows


_ELEMENTWISE_CHUNK = 1 << 16


def working_set_bytes(device: torch.device | str | None = None) -> int | None:
    """How many bytes a loop that re-reads the same arrays every pass should touch per pass.

    On the CPU: a third of the last-level cache as the operating system reports it (the rest is left
    to temporaries and to other processes sharing the cache), 8 MiB where it reports nothing. ``None``
    on accelerators, where one large batched pass is faster than cache-sized pieces.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        return None
    global _LLC_BYTES
    if _LLC_BYTES is None:
        _LLC_BYTES = _last_level_cache()
    return max(_LLC_BYTES // 3, 1 << 20)


_LLC_BYTES: int | None = None


def _last_level_cache() -> int:
    import glob
    import re

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            best = max(best, int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)])
    return best if best > 0 else 24 << 20


def random_state(seed: Seed) -> int | None:
    """A 32-bit integer seed drawn from ``seed`` for libraries that take one (scikit-learn's
    ``random_state``); ``None`` stays ``None`` (fresh entropy, not reproducible)."""
    return None if seed is None else int(seed_sequence(seed).generate_state(1)[0])


def seed_to_attr(seed: Seed) -> str:
    """A JSON-able string recording ``seed`` in a posterior's attrs.

    Integers are written as themselves, seed sequences by entropy and spawn key; a generator only by
    its initial seed (its current position cannot be recorded), and ``None`` as ``"none"``.
    """
    if seed is None:
        return "none"
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if seed < 0:  # the same rule as seed_sequence: a recorded seed must be one that can be replayed
            raise SeedError("seed", "a non-negative int", int(seed))
        return str(int(seed))
    if isinstance(seed, np.random.SeedSequence):
        return f"SeedSequence(entropy={seed.entropy}, spawn_key={tuple(seed.spawn_key)})"
    if isinstance(seed, torch.Generator):
        return f"torch.Generator(initial_seed={seed.initial_seed()}, advanced)"
    raise SeedError("seed", "an int, numpy SeedSequence, torch.Generator or None", type(seed).__name__)


def _tensors(like: Any) -> Sequence[torch.Tensor]:
    if like is None:
        return []
    if isinstance(like, torch.Tensor):
        return [like]
    if isinstance(like, (list, tuple)):
        return [t for t in like if isinstance(t, torch.Tensor)]
    return []


@contextlib.contextmanager
def scoped_global_stream(seed: Seed, device: str | torch.device | None = None) -> Iterator[None]:
    """Run a block whose torch layers draw from torch's *global* generator (``nn.Dropout`` has no
    ``generator=``) on a stream fixed by ``seed``, and restore the caller's global state afterwards.

    This is the one place in daml that touches the global generator. Inside
    :func:`torch.random.fork_rng`, the global state (CPU, and CUDA for a CUDA ``device``) is set to that
    of the explicit generator :func:`generator` builds from ``seed``; on exit ``fork_rng`` puts the
    caller's state back, so the caller never sees a difference.
    """
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        ss = seed_sequence(seed)
        torch.set_rng_state(generator(ss, "cpu").get_state())
        if dev.type == "cuda":
            torch.cuda.set_rng_state(generator(ss, dev).get_state(), dev)
        yield


# -- threads ---------------------------------------------------------------------------------------------

SMALL_WORK = 1 << 15
"""Elements per operation below which :func:`auto_threads` runs a block on one thread (torch's own
``at::internal::GRAIN_SIZE``: it splits no elementwise operation smaller than this between threads)."""

SMALL_NETWORK_WORK = 1 << 21
"""The threshold of :func:`auto_threads` for training the small dynamics networks of
:mod:`daml.models.hamiltonian` (2 097 152 elements per operation): their steps are chains of hundreds of
small kernels (a double backward through every layer), whose fork-join cost two threads do not repay.
On the 2-core machine of docs/benchmarks.md ("Physics priors") a Greydanus spring HNN step (750 points,
width 200: 150 000 elements per operation, above :data:`SMALL_WORK`) took several times longer with
torch's default of two threads than with one."""

THREADS_ENV = "DAML_THREADS"
"""The environment variable that forces the thread count of daml's loops (a positive integer, or
``auto``)."""


def _forced_threads() -> int | None:
    """The thread count forced by ``DAML_THREADS``; ``None`` when it is unset, empty or ``auto``."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw == "" or raw.lower() == "auto":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(THREADS_ENV, "a positive integer thread count or 'auto' (environment variable)", repr(raw))
    return value


def choose_threads(work: Any, threads: Any = None, small: int = SMALL_WORK) -> int | None:
    """The intra-op thread count :func:`auto_threads` uses for ``work`` elements per operation.

    Returns ``threads`` when given (a positive int), else the count forced by ``DAML_THREADS``, else
    1 when ``work < small`` (default :data:`SMALL_WORK`; :data:`SMALL_NETWORK_WORK` for the training of
    small dynamics networks), else ``None`` (keep the caller's setting). See the module docstring.

    Raises
    ------
    InputError
        Naming ``work`` (not a non-negative number), ``threads`` (not a positive int), ``small`` (not a
        positive int) or ``DAML_THREADS`` (neither a positive integer nor ``auto``).
    """
    if threads is not None:
        return check_int(threads, "threads", 1)
    small = check_int(small, "small", 1, "a positive threshold (elements per operation)")
    if isinstance(work, (bool, np.bool_)) or not isinstance(work, (int, float, np.integer, np.floating)):
        raise InputError("work", "a non-negative number of elements per operation", repr(work))
    if not work >= 0:                              # NaN and negative numbers
        raise InputError("work", "a non-negative number of elements per operation", repr(work))
    forced = _forced_threads()
    if forced is not None:
        return forced
    return 1 if work < small else None


def ensemble_work(shape: Sequence[int]) -> int:
    """Elements per operation of a filter's cycle on members of ``shape`` ``(*batch, N, n)``:
    ``prod(batch) * N * max(n, N)`` (the members, or the ``N x N`` transforms of every experiment,
    whichever is larger). A 1-d ``shape`` ``(n,)`` is one member."""
    dims = [int(v) for v in shape]
    if not dims:
        return 1
    n = dims[-1]
    members = dims[-2] if len(dims) >= 2 else 1
    batch = int(np.prod(dims[:-2])) if len(dims) > 2 else 1
    return batch * members * max(n, members)


def network_work(module: Any, members: int, batch_size: int) -> int:
    """Elements per operation of training ``members`` copies of ``module`` on batches of ``batch_size``:
    ``members * max(parameters, batch_size * widest layer)`` (the widest layer is the largest leading
    size of a parameter, e.g. a linear layer's output width)."""
    params = [p for p in module.parameters()]
    count = sum(int(p.numel()) for p in params)
    widest = max((int(p.shape[0]) for p in params if p.ndim >= 1), default=1)
    return int(members) * max(count, int(batch_size) * widest)


@contextlib.contextmanager
def threads(n: Any) -> Iterator[int]:
    """Run a block with ``n`` intra-op threads (``torch.set_num_threads``), then restore the caller's
    count, also when the block raises. ``n=None`` leaves the setting as it is. Nests. Yields the
    count in force inside the block.

    Raises
    ------
    InputError
        Naming ``threads`` when ``n`` is not a positive int (or ``None``).
    """
    previous = torch.get_num_threads()
    if n is None:
        yield previous
        return
    n = check_int(n, "threads", 1)
    if n != previous:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def auto_threads(work: Any, threads: Any = None, device: Any = None, small: int = SMALL_WORK) -> Iterator[int]:
    """Run a block on the intra-op thread count chosen for ``work`` elements per operation
    (:func:`choose_threads`: one thread for small problems, the caller's setting for large ones;
    ``threads=k`` or ``DAML_THREADS=k`` force ``k``), and restore the caller's count on exit, also
    when the block raises. On an accelerator (``device`` not the CPU) nothing changes unless
    ``threads`` is given. Yields the count in force inside the block.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    chosen = choose_threads(work, threads, small)
    if dev.type != "cpu" and threads is None:
        chosen = None
    with _threads_block(chosen) as n:
        yield n


_threads_block = threads
