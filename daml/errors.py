"""Exception types of daml.

Every error raised for bad input names the offending argument, what was expected and what was
given, so that a message alone tells the user what to change::

    >>> raise ShapeError("log_weight", "a 'member' dimension of size 24", "dims ('time',)")
    Traceback (most recent call last):
    ...
    daml.errors.ShapeError: log_weight: expected a 'member' dimension of size 24, got dims ('time',)

The types subclass the built-in ``ValueError`` / ``TypeError`` / ``RuntimeError`` they refine, so code
that already catches those keeps working.
"""

from __future__ import annotations

__all__ = [
    "DamlError",
    "InputError",
    "ShapeError",
    "NonFiniteError",
    "DtypeError",
    "DeviceError",
    "SeedError",
    "PosteriorError",
    "ModuleError",
    "DivergenceError",
    "ConvergenceWarning",
    "DroppedRowsWarning",
    "PaddingWarning",
    "check_int",
    "check_real",
    "available_memory",
    "check_fits",
]


class DamlError(Exception):
    """Base class of every error daml raises on purpose."""


class InputError(DamlError, ValueError):
    """An argument has a value outside what the function accepts.

    Parameters
    ----------
    argument : str
        Name of the argument (as the user wrote it in the call).
    expected : str
        What would have been accepted.
    got : object
        What was given (formatted with ``str``).
    hint : str, optional
        One sentence on how to fix it.
    """

    def __init__(self, argument: str, expected: str, got: object, hint: str | None = None):
        self.argument = argument
        self.expected = expected
        self.got = got
        self.hint = hint
        message = f"{argument}: expected {expected}, got {got}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __reduce__(self):  # keep errors picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.argument, self.expected, self.got, self.hint))


class ShapeError(InputError):
    """Wrong shape, wrong or missing named dimension, or an empty dimension."""


class NonFiniteError(InputError):
    """NaN or infinite values where finite ones are required."""


class DtypeError(InputError, TypeError):
    """Wrong or mismatched dtype (also a ``TypeError``)."""


class DeviceError(InputError):
    """A device that does not exist here, or tensors on different devices."""


class SeedError(InputError, TypeError):
    """A ``seed`` argument of a type daml cannot turn into a random stream."""


class PosteriorError(InputError):
    """A Dataset that breaks the posterior invariants (see :func:`daml.posterior.validate`)."""


class ModuleError(InputError, TypeError):
    """A torch module that an operation cannot handle (for example buffers that ``vmap`` cannot batch)."""


class DivergenceError(DamlError, RuntimeError):
    """An algorithm produced non-finite or exploding states.

    Parameters
    ----------
    message : str
        What diverged.
    step : int, optional
        The time step (index) where it was detected.
    """

    partial = None
    """What was computed before the divergence (for :func:`daml.filters.run`: the analysis posterior
    up to the last good step), or ``None``."""

    def __init__(self, message: str, step: int | None = None):
        self.step = step
        if step is not None:
            message = f"{message} (at time step {step})"
        super().__init__(message)

    def __reduce__(self):
        return (_rebuild_divergence, (self.args[0], self.step))


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at its iteration limit before reaching its tolerance.

    The result is still returned (with per-problem ``converged`` flags and errors); the warning makes
    sure the shortfall is never silent.
    """


class DroppedRowsWarning(UserWarning):
    """Rows with missing values were dropped before fitting; the message names the count, per input.

    Raised as a warning (the fit goes on with the complete rows) so the loss is never silent; the count
    is also kept in the result's ``attrs["n_dropped"]``.
    """


class PaddingWarning(UserWarning):
    """A batch looks zero-padded (some problems, not all, end in an all-zero row or column) and the
    padding would change the result; :func:`daml.transport.sinkhorn` says to pass ``sizes=``."""


def _rebuild_divergence(message: str, step: int | None) -> DivergenceError:
    err = DivergenceError.__new__(DivergenceError)
    err.step = step
    Exception.__init__(err, message)
    return err


def check_int(value: object, name: str, minimum: int = 1, expected: str | None = None) -> int:
    """``value`` as an ``int`` ``>= minimum`` (bools refused), else an :class:`InputError` naming ``name``."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(name, expected or f"an int >= {minimum}", repr(value))
    return int(value)


def check_real(value: object, name: str, positive: bool = False, expected: str | None = None) -> float:
    """``value`` as a finite ``float`` (strictly positive if asked), else an :class:`InputError` naming ``name``."""
    import math
    import numbers

    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or (positive and not value > 0):
        raise InputError(name, expected or ("a positive real number" if positive else "a finite real number"),
                         repr(value))
    return float(value)


def available_memory(device: object = None) -> int | None:
    """Bytes of memory that can still be allocated on ``device`` without swapping, as the system reports it.

    On the CPU (the default): ``psutil.virtual_memory().available`` where psutil is installed, else
    ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the free physical pages of ``os.sysconf``. On a
    CUDA device: the driver's free memory (``torch.cuda.mem_get_info``). ``None`` where none of these can
    be read (then :func:`check_fits` checks nothing).
    """
    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cpu")
    if kind == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError, AttributeError):
            return None
    if kind != "cpu":
        return None
    try:
        import psutil  # optional
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.virtual_memory().available)
        except Exception:  # pragma: no cover - psutil unable to read the system
            pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os

    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            n, size = os.sysconf(pages), os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            continue
        if n > 0 and size > 0:
            return int(n) * int(size)
    return None


def check_fits(name: str, nbytes: float, what: str | None = None, device: object = None) -> None:
    """Refuse up front a size whose arrays cannot fit in memory.

    Call it before allocating (or before spawning one random stream per member), with the bytes the
    call will need at least, so that an impossible size is refused at once with a message naming the
    argument, instead of minutes of work ending in a ``MemoryError`` (or the machine swapping).

    Parameters
    ----------
    name : str
        The argument whose value sets the size (for example ``"n_members"``).
    nbytes : int or float
        A lower bound of the bytes needed (a float is fine for products that overflow ``int64``).
    what : str, optional
        The size as the user gave it, for the message (for example ``"n_members=1000000000"``).
    device : str or torch.device, optional
        Where the arrays will live (default the CPU; a CUDA device is checked against its free memory).

    Raises
    ------
    InputError
        Naming ``name`` when ``nbytes`` exceeds :func:`available_memory` (nothing is checked where
        that is unknown) or is NaN; naming ``nbytes`` when it is not a real number.

    Examples
    --------
    >>> check_fits("n_members", 10**9 * 8 * 40, what="n_members=10**9")  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    daml.errors.InputError: n_members: expected a size whose arrays fit in memory (about 22.9 GiB
    available), got n_members=10**9, needing 298.0 GiB
    """
    import math
    import numbers

    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Real):
        raise InputError("nbytes", "a real number of bytes", f"{type(nbytes).__name__} {nbytes!r}"[:120])
    need = float(nbytes)
    if math.isnan(need):
        raise InputError(name, "a size whose arrays fit in memory", f"{what or 'a size'} needing NaN bytes")
    avail = available_memory(device)
    if avail is None or need <= avail:
        return
    gib = 1024.0 ** 3
    got = f"{what}, needing {need / gib:.1f} GiB" if what else f"a size needing {need / gib:.1f} GiB"
    raise InputError(name, f"a size whose arrays fit in memory (about {avail / gib:.1f} GiB available)", got)
