"""File I/O the merge hands to the kernel: positioned reads and writes, copies between files that
never pass through this process, and early write-back of what was written."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from chla_launcher.contract.errors import ChlaError

# A copy between files that copy_file_range cannot make goes through a buffer of this size.
_COPY_BUFFER_BYTES = 16 * 2**20


def pread_into(fd: int, view: memoryview, offset: int, what: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise ChlaError(f"{what}: file ended early (truncated while merging?); re-copy it")
        done += got


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def _load_sync_file_range():
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return function
    except (OSError, AttributeError):  # not Linux/glibc: the final fsync does all the work
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()


class Flusher:
    """Asks the kernel to start writing just-written bytes to disk now (Linux sync_file_range
    with SYNC_FILE_RANGE_WRITE), so the disk works while the merge goes on and the one fsync per
    file at the end (which alone makes the output durable) has little left to do. The call can
    block while the disk's queue is full, so a thread of its own makes it."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="chla-merge-flush") if _SYNC_FILE_RANGE else None

    def start(self, fd: int, offset: int, nbytes: int) -> None:
        if self.pool is not None and nbytes:
            self.pool.submit(_SYNC_FILE_RANGE, fd, offset, nbytes, 2)  # 2: SYNC_FILE_RANGE_WRITE

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def copy_range(src_fd: int, dst_fd: int, nbytes: int, src_offset: int, dst_offset: int, what: str) -> None:
    """Byte-for-byte copy between files inside the kernel (no trip through this process)."""
    done = 0
    while done < nbytes:
        try:
            got = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError:  # e.g. across file systems on old kernels: copy through a buffer
            got = _copy_through_buffer(
                src_fd, dst_fd, min(nbytes - done, _COPY_BUFFER_BYTES), src_offset + done, dst_offset + done, what
            )
        if not got:
            raise ChlaError(f"{what}: file ended early (truncated while merging?); re-copy it")
        done += got


def _copy_through_buffer(src_fd: int, dst_fd: int, nbytes: int, src_offset: int, dst_offset: int, what: str) -> int:
    buffer = bytearray(nbytes)
    pread_into(src_fd, memoryview(buffer), src_offset, what)
    pwrite_all(dst_fd, memoryview(buffer), dst_offset)
    return nbytes
