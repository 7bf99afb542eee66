"""Small C kernels, compiled once per machine and loaded with ctypes.

A kernel's source is compiled with the system's C compiler (``$CC``, else ``cc`` or ``gcc``) into
``$SURGEON_CACHE/kernels`` (default ``~/.cache/surgeon/kernels``), named by a hash of the source and the flags, so
an edited kernel is rebuilt and concurrent first uses never load a half-written file. Without a compiler, or when
the build fails, the caller gets ``None`` and runs its torch or numba path instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

_LOADED: dict[str, ctypes.CDLL | None] = {}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((x for x in fh if x.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def kernel_folder() -> Path:
    return Path(os.environ.get("SURGEON_CACHE", Path.home() / ".cache" / "surgeon")) / "kernels"


def compiled_library(stem: str, source: str, flags: Sequence[str],
                     declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """``source`` built as a shared library with ``cc flags`` and loaded, ``declare`` setting its functions'
    argument types; cached on disk and in this process. None without a working compiler. Hashes the source on
    every call: callers on a hot path keep the result (``functools.cache`` on their accessor)."""
    digest = hashlib.sha256("\0".join([source, *flags]).encode()).hexdigest()[:16]
    key = f"{stem}_{digest}"
    if key in _LOADED:
        return _LOADED[key]
    so = kernel_folder() / f"{key}.so"
    lib = None
    try:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not so.is_file() and cc:
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / f"{stem}.c"
                src.write_text(source)
                out = so.with_name(f".{so.name}.{os.getpid()}.tmp")  # same folder: the rename is atomic
                try:
                    subprocess.run([cc, *flags, "-shared", "-fPIC", str(src), "-o", str(out)], check=True,
                                   capture_output=True, timeout=120)
                    os.replace(out, so)
                finally:
                    out.unlink(missing_ok=True)
        if so.is_file():
            lib = ctypes.CDLL(str(so))
            declare(lib)
    except (OSError, subprocess.SubprocessError, AttributeError):
        lib = None
    _LOADED[key] = lib
    return lib
