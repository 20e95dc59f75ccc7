"""One task of a pretokenize stage: tokenize its share of the pieces (from the cache where it can)
and publish them as shards; and `pretokenize`, every task in turn on this machine, then the
manifest (`chla pretokenize`)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chla_launcher.contract.atomic import write_json
from chla_launcher.contract.errors import ChlaError

from .cache import cache_key, link_or_copy, remove_dead_tmp, valid_entry
from .documents import new_bad_counts
from .encoder import EncoderSpec
from .hashing import hash_file
from .manifest import finalize_corpus
from .options import MANIFEST, Layout, PretokenizeOptions, default_cache_dir
from .pieces import Piece, assign_pieces, expand_inputs, next_document_start, plan_pieces, work_items
from .tokenizer import choose_encoder, load_tokenizer_info
from .workers import WorkerPool

if TYPE_CHECKING:
    from chla_launcher.contract.kinds.pretokenize import PretokenizeParams


def run_task(
    inputs: list[str],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    task_index: int = 0,
    num_tasks: int = 1,
    options: PretokenizeOptions | None = None,
    layout: Layout | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    block_size: int | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Tokenize this task's share of the pieces (from the cache where possible) and publish them
    as shards in out_dir, plus tasks/task-T-of-N.json for finalize. `progress(done, total=...)`
    is told after every piece."""
    started = time.perf_counter()
    options, layout = options or PretokenizeOptions(), layout or Layout()
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    (out_dir / "tasks").mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the corpus is being rebuilt: not complete now
    files = expand_inputs(inputs)
    info = load_tokenizer_info(tokenizer_dir, cache_dir)
    if options.append_eos and info.eos_id is None:
        raise ChlaError(f"pretokenize: tokenizer {tokenizer_dir} has no eos token; set append_eos: false")
    encoder = choose_encoder(info, options)
    pieces = assign_pieces(plan_pieces(files, options, layout), num_tasks)[task_index]
    workers = workers or len(os.sched_getaffinity(0))
    spec = EncoderSpec(encoder, str(info.path), info.sp_model, options, info.eos_id, info.bos_id, info.dtype.str)
    pool = WorkerPool(spec, workers)
    shards, tokenized, reused, text_bytes = [], 0, 0, 0
    try:
        for number, piece in enumerate(pieces):
            with open(piece.path, "rb") as handle:
                end = piece.nominal_end
                size = os.fstat(handle.fileno()).st_size
                start = next_document_start(handle, piece.nominal_start, size, piece.fmt, options.txt_documents)
                if end < size:
                    end = next_document_start(handle, end, size, piece.fmt, options.txt_documents)
            record: dict[str, Any] = {
                "file": piece.name + ".bin",
                "source_index": piece.file_index,
                "source": piece.path,
                "piece": piece.piece_index,
                "byte_range": [start, end],
                "task": task_index,
            }
            if end <= start:  # a document that began in an earlier piece covers this one
                record.update(tokens=0, documents=0, blake2b=None, encoder=encoder, bad=new_bad_counts())
                shards.append(record)
                continue
            content_hash = hash_file(Path(piece.path), start, end)
            key = cache_key(info, options, encoder, piece.fmt, end - start, content_hash)
            counts = valid_entry(cache_dir, key, info.dtype.itemsize)
            if counts is None:
                counts = _tokenize_piece(piece, start, end, key, cache_dir, pool, spec, layout, log)
                tokenized += 1
                text_bytes += end - start
            else:
                reused += 1
            link_or_copy(cache_dir / f"{key}.bin", out_dir / f"{piece.name}.bin")
            link_or_copy(cache_dir / f"{key}.json", out_dir / f"{piece.name}.json")
            record.update(
                tokens=counts["tokens"],
                documents=counts["documents"],
                blake2b=content_hash,
                encoder=counts["encoder"],
                bad=counts["bad"],
                bad_where=counts.get("bad_where", {}),
                cache_key=key,
            )
            shards.append(record)
            if progress is not None:
                progress(number + 1, total=len(pieces))
            if tokenized and (number + 1) % 10 == 0:
                log(f"{number + 1}/{len(pieces)} pieces ({tokenized} tokenized, {reused} from cache)")
    except BaseException:
        pool.close(finished=False)
        raise
    pool.close(finished=True)
    summary = {
        "task": task_index,
        "num_tasks": num_tasks,
        "tokenizer": asdict(info),
        "encoder": encoder,
        "options": options.key_fields(),
        "layout": asdict(layout),
        "block_size": block_size,
        "inputs": [str(f) for f in files],
        "shards": shards,
        "pieces_tokenized": tokenized,
        "pieces_cached": reused,
    }
    write_json(out_dir / "tasks" / f"task-{task_index:05d}-of-{num_tasks:05d}.json", summary)
    seconds = time.perf_counter() - started
    tokens = sum(s["tokens"] for s in shards)
    log(
        f"task {task_index}/{num_tasks}: {len(shards)} pieces, {tokenized} tokenized, {reused} from cache, "
        f"{tokens:,} tokens in {seconds:.1f} s"
    )
    return {
        "pieces": len(shards),
        "pieces_tokenized": tokenized,
        "pieces_cached": reused,
        "tokens": tokens,
        "text_bytes_tokenized": text_bytes,
        "seconds": round(seconds, 3),
    }


def _tokenize_piece(
    piece: Piece,
    start: int,
    end: int,
    key: str,
    cache_dir: Path,
    pool: WorkerPool,
    spec: EncoderSpec,
    layout: Layout,
    log: Callable[[str], None],
) -> dict:
    remove_dead_tmp(cache_dir, f"{key}.bin")
    tmp = cache_dir / f".{key}.bin.{socket.gethostname()}.{os.getpid()}.tmp"
    bad, where, tokens, documents = new_bad_counts(), dict[str, str](), 0, 0
    items = work_items(
        piece.path, piece.fmt, spec.options.txt_documents, start, end, layout.batch_bytes, spec.options.chunk_bytes
    )
    try:
        with open(tmp, "wb") as out:
            for ids, docs, item_bad, item_where in pool.map_ordered(items):
                out.write(ids)
                tokens += len(ids) // np.dtype(spec.dtype).itemsize
                documents += docs
                for name, count in item_bad.items():
                    bad[name] += count
                for name, location in item_where.items():
                    where.setdefault(name, location)
            out.flush()
            os.fsync(out.fileno())
        if documents == 0 and any(
            bad[k] for k in ("invalid_json", "not_an_object", "missing_text_key", "non_string_text")
        ):
            first = next(f"{k}: {where[k]}" for k in where)
            raise ChlaError(
                f"pretokenize: {piece.path} (bytes {start}-{end}): no usable record "
                f"({first}); check text_key (now {spec.options.text_key!r}) and the format"
            )
        os.replace(tmp, cache_dir / f"{key}.bin")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    located = {name: f"{piece.path}: {location}" for name, location in where.items()}
    counts = {
        "key": key,
        "tokens": tokens,
        "documents": documents,
        "encoder": spec.encoder,
        "dtype": spec.dtype,
        "bad": bad,
        "bad_where": located,
        "source": {"path": piece.path, "byte_range": [start, end]},
    }
    write_json(cache_dir / f"{key}.json", counts)  # last: the commit marker of the entry
    for name, location in located.items():
        log(f"warning: {name} in {location} (counted in the manifest)")
    return counts


def run_task_with_params(
    params: PretokenizeParams,
    out_dir: str | Path,
    task_index: int = 0,
    num_tasks: int = 1,
    log: Callable[[str], None] = print,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """`run_task` as the stage kind's params describe it: one task of the stage."""
    return run_task(
        list(params.inputs),
        params.tokenizer,
        out_dir,
        task_index,
        num_tasks,
        PretokenizeOptions.from_params(params),
        Layout.from_params(params),
        params.cache_dir,
        params.workers,
        params.block_size,
        log,
        progress,
    )


def pretokenize(
    inputs: list[str],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    num_shards: int = 1,
    workers: int | None = None,
    options: PretokenizeOptions | None = None,
    layout: Layout | None = None,
    cache_dir: str | Path | None = None,
    block_size: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """All tasks one after the other on this machine (each on all cores), then the manifest."""

    def one_task(task: int) -> dict[str, Any]:
        return run_task(
            inputs, tokenizer_dir, out_dir, task, num_shards, options, layout, cache_dir, workers, block_size, log
        )

    return _every_task(one_task, out_dir, num_shards, log)


def pretokenize_with_params(
    params: PretokenizeParams, out_dir: str | Path, num_shards: int = 1, log: Callable[[str], None] = print
) -> dict:
    """`pretokenize` as the stage kind's params describe it (`chla pretokenize`)."""

    def one_task(task: int) -> dict[str, Any]:
        return run_task_with_params(params, out_dir, task, num_shards, log)

    return _every_task(one_task, out_dir, num_shards, log)


def _every_task(
    one_task: Callable[[int], dict[str, Any]], out_dir: str | Path, num_shards: int, log: Callable[[str], None]
) -> dict:
    totals = {"pieces_tokenized": 0, "pieces_cached": 0}
    for task in range(num_shards):
        result = one_task(task)
        totals["pieces_tokenized"] += result["pieces_tokenized"]
        totals["pieces_cached"] += result["pieces_cached"]
    manifest = finalize_corpus(out_dir, num_shards, log)
    return {
        **totals,
        "tokens": manifest["totals"]["tokens"],
        "documents": manifest["totals"]["documents"],
        "shards": manifest["totals"]["shards"],
    }
