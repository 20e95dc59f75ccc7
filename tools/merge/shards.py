"""Writing the output shards: headers laid out first, then unchanged bytes copied file to file,
LoRA-changed tensors streamed in row chunks through a ring of buffers, converted tensors whole."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from .adapters import Adapter
from .checkpoint import FLOAT_CODES, Checkpoint, torch_dtype
from .kernel_io import Flusher, copy_range, pread_into, pwrite_all
from .lora import (
    LoraDelta,
    RowPatch,
    Scratch,
    TensorSource,
    apply_loras,
    apply_row_patches,
    load_lora,
    load_row_patch,
    merged_tensor,
    tensor_source,
)
from .plan import PlannedTensor, header_bytes

Log = Callable[[str], None]

# Bytes of one chunk read, merged and written as a unit, and how many chunk buffers exist:
# while one chunk is merged, the next is being read and earlier ones written, in threads
# (file reads and writes, and torch's arithmetic, release the GIL).
_CHUNK_BYTES = 16 * 2**20
_CHUNK_BUFFERS = 4
_READ_AHEAD = 2


@dataclass
class Chunk:
    """Rows [first_row, first_row + rows) of a streamed tensor."""

    item: PlannedTensor
    source: TensorSource
    deltas: list[LoraDelta]
    patches: list[RowPatch]
    first_row: int
    rows: int
    row_bytes: int
    out_fd: int
    out_offset: int  # where the tensor starts in the output file

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def _chunks(
    item: PlannedTensor,
    source: TensorSource,
    deltas: list[LoraDelta],
    patches: list[RowPatch],
    out_fd: int,
    out_offset: int,
):
    rows = item.shape[0]
    row_bytes = item.nbytes // max(1, rows)
    step = max(1, _CHUNK_BYTES // max(1, row_bytes))
    for first in range(0, rows, step):
        yield Chunk(item, source, deltas, patches, first, min(step, rows - first), row_bytes, out_fd, out_offset)


def write_shards(
    tmp_dir: Path,
    names: list[str],
    groups: list[list[PlannedTensor]],
    base: Checkpoint,
    adapters: list[Adapter],
    total_bytes: int,
    log: Log,
    report: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Write every output shard into tmp_dir; returns the weight map (tensor name -> file name).

    Each tensor goes one of three ways. Bytes no adapter changes are copied file to file inside
    the kernel (copy_file_range), in a thread of their own. Tensors that LoRA changes in place
    are streamed in row chunks through a few reused buffers: a thread reads the next chunks while
    this thread merges one and another thread writes the previous ones, each at its final offset
    (the header fixed every offset in advance). Tensors whose dtype changes (--dtype) are merged
    whole in memory. Each file is fsynced once, at the end."""
    weight_map: dict[str, str] = {}
    raw_copies: list[list] = []  # [src_fd, out_fd, nbytes, src_offset, out_offset, what]
    streamed: list[tuple[PlannedTensor, TensorSource, int, int]] = []
    whole: list[tuple[PlannedTensor, int, int]] = []
    with ExitStack() as stack:
        in_fds: dict[Path, int] = {}

        def in_fd(path: Path) -> int:
            if path not in in_fds:
                in_fds[path] = os.open(path, os.O_RDONLY)
                stack.callback(os.close, in_fds[path])
            return in_fds[path]

        out_fds = []
        for file_name, group in zip(names, groups):
            out_fd = os.open(tmp_dir / file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            stack.callback(os.close, out_fd)
            out_fds.append(out_fd)
            header = header_bytes(group)
            pwrite_all(out_fd, memoryview(header), 0)
            offset = len(header)
            for item in group:
                weight_map[item.name] = file_name
                source = tensor_source(item, base, adapters)
                entry = source.file.tensors[source.key]
                unchanged_layout = entry.dtype == item.dtype and tuple(entry.shape) == item.shape
                # token rows may grow a matrix: its rows stream, the grown ones come from the adapter
                row_layout = (
                    entry.dtype == item.dtype
                    and len(item.shape) == 2
                    and tuple(entry.shape[1:]) == item.shape[1:]
                    and entry.shape[0] <= item.shape[0]
                )
                if unchanged_layout and not source.loras and not source.token_rows:
                    src_fd = in_fd(source.file.path)
                    last = raw_copies[-1] if raw_copies else None
                    if (
                        last
                        and last[0] == src_fd
                        and last[1] == out_fd
                        and last[3] + last[2] == entry.start
                        and last[4] + last[2] == offset
                    ):
                        last[2] += item.nbytes  # neighbours in both files: one copy
                    else:
                        raw_copies.append([src_fd, out_fd, item.nbytes, entry.start, offset, str(source.file.path)])
                elif row_layout and item.dtype in FLOAT_CODES:
                    streamed.append((item, source, out_fd, offset))
                else:
                    whole.append((item, out_fd, offset))
                offset += item.nbytes

        flusher = Flusher()
        stack.callback(flusher.close)  # runs before the files are closed

        def copy(src_fd: int, out_fd: int, nbytes: int, src_offset: int, out_offset: int, what: str) -> None:
            copy_range(src_fd, out_fd, nbytes, src_offset, out_offset, what)
            flusher.start(out_fd, out_offset, nbytes)

        with (
            ThreadPoolExecutor(1, thread_name_prefix="chla-merge-copy") as copier,
            ThreadPoolExecutor(2, thread_name_prefix="chla-merge-io") as io_pool,
        ):
            copies = [copier.submit(copy, *job) for job in raw_copies]
            import torch  # the copies run meanwhile

            # One torch thread: the arithmetic comes in cache-sized blocks, too small to share
            # out, and OpenMP threads that spin while the I/O threads want the same cores made a
            # merge 50 times slower on a busy 2-core machine (measured).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                progress = _Progress(total_bytes, log, report)
                scratch = Scratch()
                for item, out_fd, offset in whole:
                    tensor = merged_tensor(item, base, adapters, scratch)
                    if tuple(tensor.shape) != item.shape or tensor.dtype != torch_dtype(item.dtype):
                        raise RuntimeError(
                            f"bug: {item.name} came out {tensor.dtype} {tuple(tensor.shape)}, "
                            f"planned {item.dtype} {item.shape}"
                        )
                    pwrite_all(out_fd, tensor.reshape(-1).view(torch.uint8).numpy().data, offset)
                    flusher.start(out_fd, offset, item.nbytes)
                    progress.add(item.nbytes)
                    del tensor
                _stream_chunks(streamed, in_fd, io_pool, flusher, scratch, progress)
                for pending in copies:
                    pending.result()
                flusher.close()
                for out_fd in out_fds:
                    os.fsync(out_fd)
            finally:
                torch.set_num_threads(threads)
    return weight_map


class _Progress:
    def __init__(self, total_bytes: int, log: Log, report: Callable[[int], None] | None = None) -> None:
        self.total, self.done, self.log, self.last = total_bytes, 0, log, time.monotonic()
        self.report = report  # merged bytes so far, for the live bars (chla_launcher.contract.progress)

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.report is not None:
            self.report(self.done)
        if time.monotonic() - self.last > 10:
            self.log(f"merge: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB merged")
            self.last = time.monotonic()


def _stream_chunks(
    streamed, in_fd, io_pool: ThreadPoolExecutor, flusher: Flusher, scratch: Scratch, progress: _Progress
) -> None:
    """Read, merge and write every chunk of the streamed tensors, pipelined over a ring of buffers."""
    import torch

    def chunk_list():
        for item, source, out_fd, offset in streamed:
            deltas = [load_lora(adapter, lora) for adapter, lora in source.loras]
            patches = [load_row_patch(adapter, rows, torch_dtype(item.dtype)) for adapter, rows in source.token_rows]
            yield from _chunks(item, source, deltas, patches, out_fd, offset)

    chunks = chunk_list()
    buffers = [torch.empty(_CHUNK_BYTES, dtype=torch.uint8) for _ in range(_CHUNK_BUFFERS)]
    writes: list[Future | None] = [None] * _CHUNK_BUFFERS
    reads: deque[tuple[Chunk, int, Future]] = deque()
    count = 0

    def read(chunk: Chunk, slot: int, fd: int) -> None:
        src = chunk.source
        entry = src.file.tensors[src.key]
        stored = max(0, min(chunk.rows, entry.shape[0] - chunk.first_row)) * chunk.row_bytes
        view = buffers[slot].numpy().data[: chunk.nbytes]
        pread_into(
            fd, view[:stored], entry.start + chunk.first_row * chunk.row_bytes, f"{src.file.path} (tensor {src.key})"
        )
        if stored < chunk.nbytes:  # rows the token rows grow the matrix by: every one is patched
            buffers[slot][stored : chunk.nbytes].zero_()

    def write(chunk: Chunk, slot: int) -> None:
        offset = chunk.out_offset + chunk.first_row * chunk.row_bytes
        pwrite_all(chunk.out_fd, buffers[slot].numpy().data[: chunk.nbytes], offset)
        flusher.start(chunk.out_fd, offset, chunk.nbytes)

    def start_read() -> bool:
        nonlocal count
        chunk = next(chunks, None)
        if chunk is None:
            return False
        slot = count % _CHUNK_BUFFERS
        count += 1
        last_write = writes[slot]
        if last_write is not None:
            last_write.result()  # the buffer is free once its last chunk is written
            writes[slot] = None
        if buffers[slot].numel() < chunk.nbytes:  # one row larger than a chunk
            buffers[slot] = torch.empty(chunk.nbytes, dtype=torch.uint8)
        reads.append((chunk, slot, io_pool.submit(read, chunk, slot, in_fd(chunk.source.file.path))))
        return True

    for _ in range(_READ_AHEAD):
        start_read()
    while reads:
        chunk, slot, pending = reads.popleft()
        pending.result()
        start_read()
        rows = buffers[slot][: chunk.nbytes].view(torch_dtype(chunk.item.dtype)).view(chunk.rows, *chunk.item.shape[1:])
        apply_loras(rows, chunk.first_row, chunk.deltas, scratch)
        apply_row_patches(rows, chunk.first_row, chunk.patches)
        writes[slot] = io_pool.submit(write, chunk, slot)
        progress.add(chunk.nbytes)
    for last_write in writes:
        if last_write is not None:
            last_write.result()
