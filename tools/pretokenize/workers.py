"""The worker processes of a task: each holds an Encoder and turns work items into ids; the pool
keeps a few items in flight and returns results in stream order."""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .documents import documents_of, new_bad_counts
from .encoder import Encoder, EncoderSpec

if TYPE_CHECKING:
    import multiprocessing.pool

_WORKER: Encoder | None = None


def _init_worker(spec: EncoderSpec) -> None:
    global _WORKER
    # A forked worker inherits the job's stop handlers (chla_train.preemption), which ignore a
    # repeated SIGTERM: with them, the pool could not terminate its workers.
    for signum in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    _WORKER = Encoder(spec)


def encode_item(item: tuple) -> tuple[bytes, int, dict, dict]:
    """Worker: one work item -> (ids as bytes, documents ended, bad counts, first-bad locations)."""
    assert _WORKER is not None
    spec = _WORKER.spec
    kind, path, fmt, start, end, first, last = item
    with open(path, "rb") as handle:
        handle.seek(start)
        raw = handle.read(end - start)
    bad, where = new_bad_counts(), dict[str, str]()
    if kind == "docs":
        docs = documents_of(raw, fmt, spec.options, bad, where, path)
        ids = _WORKER.encode_documents(docs) if docs else np.zeros(0, spec.dtype)
        # Line numbers count from the start of this item's byte range.
        where = {name: f"{location} counting from byte {start}" for name, location in where.items()}
        return ids.tobytes(), len(docs), bad, where
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    if last:
        text = text.rstrip() if spec.options.txt_documents == "paragraph" else text.rstrip("\r\n")
    encode = _WORKER.encode if first else _WORKER.encode_continued
    ids = _WORKER.flatten(encode([text]) if text else [[]], bos_first=first, eos_last=last)
    return ids.tobytes(), 1 if last else 0, bad, where


class WorkerPool:
    """Worker processes, started on first use only (a warm re-run starts none)."""

    def __init__(self, spec: EncoderSpec, workers: int) -> None:
        self.spec, self.workers = spec, workers
        self.pool: multiprocessing.pool.Pool | None = None

    def map_ordered(self, items: Iterator[tuple]) -> Iterator[tuple]:
        if self.pool is None:
            import multiprocessing

            # SentencePiece workers touch nothing of the parent but files, so fork (fast start) is
            # safe; HF tokenizers hold thread pools that do not survive a fork, so spawn for them.
            method = "fork" if self.spec.encoder == "sentencepiece" and os.name == "posix" else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(
                self.workers, initializer=_init_worker, initargs=(self.spec,)
            )
        window: deque = deque()
        for item in items:
            window.append(self.pool.apply_async(encode_item, (item,)))
            if len(window) >= 3 * self.workers:  # bounded memory: a few batches in flight
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def close(self, *, finished: bool) -> None:
        """After the work is done, let the workers finish; after an error or a stop, end them at once
        (a worker killed by the same SIGTERM leaves a task that would never complete)."""
        if self.pool is not None:
            if finished:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
