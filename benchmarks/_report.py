"""Shared helpers of the benchmark scripts: machine description and atomic result writing.

Every benchmark records :func:`machine_info` next to its numbers, writes its raw results with
:func:`write_json` to ``benchmarks/results/{name}.json`` and its table with :func:`write_section`
into its own delimited block of ``docs/benchmarks.md``, leaving the other benchmarks' blocks alone.
Files are replaced atomically (temporary file in the same folder, then :func:`os.replace`), so an
interrupted run never leaves a half-written table; a lock file (in the temporary folder) serialises
concurrent writers of ``docs/benchmarks.md`` where the platform has :mod:`fcntl`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from daml.io import atomic_write_path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

_INTRO = (
    "# Benchmarks\n\n"
    "Measured speed and accuracy of daml against reference implementations. Each section below is "
    "written by one script in `benchmarks/` (the command that produced it is given with it) and "
    "records the machine it ran on; the raw numbers are in `benchmarks/results/*.json`. Numbers from "
    "different machines are not comparable.\n"
)

__all__ = ["machine_info", "machine_line", "write_section", "write_json", "command_line", "git_commit"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: platform, Python, torch and numpy versions, CPUs, threads, device."""
    import numpy as np
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": _cpu_name(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One markdown line describing ``info`` (from :func:`machine_info`)."""
    line = (f"Machine: {info['device']}, {info['cpu_count']} CPUs ({info['torch_threads']} torch "
            f"threads), {info['platform']}; Python {info['python']}, torch {info['torch']}, "
            f"numpy {info['numpy']}")
    if "cuda_device" in info:
        line += f"; GPU {info['cuda_device']}"
    return line + "."


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    # The lock file lives in the temporary folder, not next to the page, to keep the repository clean.
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"daml-benchmarks-{key}.lock", "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_section(name: str, markdown: str, path: str | os.PathLike = "docs/benchmarks.md") -> Path:
    """Replace (or append) the block of benchmark ``name`` in the benchmarks page.

    The block runs from ``<!-- begin:{name} -->`` to ``<!-- end:{name} -->``. A missing page is
    created with a ``# Benchmarks`` heading and a short introduction. A relative ``path`` is taken
    from the repository root.

    Parameters
    ----------
    name : str
        Block name: letters, digits, ``-``, ``_`` and ``.``.
    markdown : str
        The block's content (without the markers).
    path : str or path-like
        The page to edit.

    Returns
    -------
    Path
        The page written.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"name: expected letters, digits, '-', '_' or '.', got {name!r}")
    page = Path(path)
    if not page.is_absolute():
        page = ROOT / page
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    with _locked(page):
        text = page.read_text(encoding="utf-8") if page.exists() else _INTRO
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        _atomic_write(page, text)
    return page


def write_json(name: str, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``benchmarks/results/{name}.json`` (atomically)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"name: expected letters, digits, '-', '_' or '.', got {name!r}")
    path = RESULTS / f"{name}.json"
    _atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")
    return path


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return " ".join(["python", str(script), *sys.argv[1:]])


def git_commit() -> str | None:
    """The checked-out commit of the repository (with ``+changes`` when the tree is dirty), or ``None``
    where git or the repository is not available."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def carry_over(res: dict[str, Any], sections: tuple[str, ...], all_sections: tuple[str, ...], name: str,
               stamp: bool = False) -> None:
    """Keep the sections of ``results/<name>.json`` that this run did not redo (``--only``): each of
    ``all_sections`` not in ``sections`` is copied into ``res`` from the saved file, with the saved run's
    ``command`` and ``daml_commit`` added when ``stamp`` (for sections that do not record their own)."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for sec in all_sections:
        if sec not in sections and isinstance(old.get(sec), dict):
            res[sec] = ({"command": old.get("command"), "daml_commit": old.get("daml_commit"), **old[sec]}
                        if stamp else old[sec])
