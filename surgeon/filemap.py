"""Tensor bytes of a source file as a private (copy-on-write) memory map, unmapped when the last view dies.

Reading a tensor with ``preadv`` into a fresh buffer costs a page fault and a copy per 4 KiB page: 0.6 GB/s on
this project's VM, where a mapping of the page cache reads at memory speed (7 GB/s, numbers in docs/cluster.md).
The map is private and writable, so a consumer that changes a loaded tensor in place gets its own copy of the
pages it writes and never touches the file. It lives exactly as long as the arrays and tensors that view it, so
memory still holds only the tensors in use, never the model. ``mmap(2)`` is called through ctypes because Python's
``mmap`` module keeps a duplicate file descriptor open per map (until Python 3.13), and a materialised model can
hold thousands of tensors.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import numpy as np

_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc():
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int64]
    lib.munmap.restype = ctypes.c_int
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    if hasattr(lib, "fallocate"):  # Linux
        lib.fallocate.restype = ctypes.c_int
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return lib


_LIBC = _libc() if hasattr(mmap, "MAP_PRIVATE") else None


_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def preallocate(fd: int, nbytes: int) -> None:
    """Reserve the first ``nbytes`` of the file ``fd`` (``fallocate(2)``, which also sets its size): ext4 then
    takes the writes 15-20 % faster (measured on 2 GiB of copies, docs/cluster.md), and a disk too full for the
    output is found before a tensor is written. Nothing happens where the file system cannot reserve (no
    zero-filling fallback, unlike ``posix_fallocate``); no room raises ``OSError``."""
    if _LIBC is None or not hasattr(_LIBC, "fallocate") or nbytes <= 0:
        return
    if _LIBC.fallocate(fd, 0, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err in _NO_ROOM:
            raise OSError(err, os.strerror(err))


def truncated(path: Path, at: int, expected: int) -> SurgeonError:
    return SurgeonError(f"{path}: file ends at byte {at}, expected {expected} bytes")


def map_bytes(path: Path, offset: int, nbytes: int) -> np.ndarray | None:
    """``nbytes`` bytes of ``path`` from ``offset`` as a writable uint8 array over a private map; None where
    the system cannot map the file (the caller reads it instead). A file shorter than the range is an error."""
    import numpy as np

    if _LIBC is None or nbytes == 0:
        return None
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset + nbytes - start
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < offset + nbytes:  # mapped pages past the end would raise SIGBUS when read
            raise truncated(path, size, offset + nbytes)
        addr = _LIBC.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, start)
    finally:
        os.close(fd)  # the map does not need the descriptor
    if addr in (None, _MAP_FAILED):
        return None
    region = (ctypes.c_uint8 * length).from_address(addr)
    weakref.finalize(region, _LIBC.munmap, addr, length)  # after the last array/tensor over it is gone
    return np.frombuffer(region, dtype=np.uint8, count=nbytes, offset=offset - start)
