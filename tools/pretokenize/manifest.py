"""Finalize: check every task's shards and write manifest.json, last."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from chla_launcher.contract.atomic import read_json, write_json
from chla_launcher.contract.errors import ChlaError

from .documents import new_bad_counts
from .hashing import blake
from .options import FORMAT_VERSION, MANIFEST
from .tokenizer import TokenizerInfo


def finalize_corpus(out_dir: str | Path, num_tasks: int, log: Callable[[str], None] = print) -> dict:
    out_dir = Path(out_dir)
    records = []
    for task in range(num_tasks):
        record = read_json(out_dir / "tasks" / f"task-{task:05d}-of-{num_tasks:05d}.json")
        if record is None:
            raise ChlaError(
                f"pretokenize: task {task} of {num_tasks} has not finished in {out_dir}; "
                f"run the missing task, then finalize"
            )
        records.append(record)
    head = records[0]
    info = head["tokenizer"]
    dtype = np.dtype(TokenizerInfo(**info).dtype)
    shards = sorted((s for r in records for s in r["shards"]), key=lambda s: (s["source_index"], s["piece"]))
    for shard in shards:
        if shard["tokens"]:
            size = (out_dir / shard["file"]).stat().st_size
            if size != shard["tokens"] * dtype.itemsize:
                raise ChlaError(
                    f"pretokenize: {out_dir / shard['file']} has {size} bytes, expected "
                    f"{shard['tokens'] * dtype.itemsize}; re-run the pretokenize stage"
                )
    shards = [s for s in shards if s["tokens"]] + [s for s in shards if not s["tokens"]]
    shards.sort(key=lambda s: (s["source_index"], s["piece"]))
    sources = []
    bad_total = new_bad_counts()
    empty_files = 0
    for index, path in enumerate(head["inputs"]):
        own = [s for s in shards if s["source_index"] == index]
        tree = blake()
        for shard in own:
            if shard["blake2b"]:
                tree.update(f"{shard['byte_range'][0]}:{shard['byte_range'][1]}:{shard['blake2b']}\n".encode())
        bad = new_bad_counts()
        for shard in own:
            for name, count in shard["bad"].items():
                bad[name] += count
                bad_total[name] += count
        size = os.path.getsize(path)
        empty_files += size == 0
        sources.append(
            {
                "path": path,
                "size": size,
                "hash": f"blake2b-pieces:{tree.hexdigest()}",
                "documents": sum(s["documents"] for s in own),
                "tokens": sum(s["tokens"] for s in own),
                "bad": {k: v for k, v in bad.items() if v},
                "bad_where": {k: v for s in own for k, v in s.get("bad_where", {}).items()},
            }
        )
    published = [s for s in shards if s["tokens"]]
    total_tokens = sum(s["tokens"] for s in published)
    if total_tokens == 0:
        raise ChlaError(
            f"pretokenize: the inputs ({len(sources)} files, {empty_files} empty) hold no text; "
            f"check --input and text_key"
        )
    manifest = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "byteorder": "little",
        "vocab_size": info["vocab_size"],
        "eos_id": info["eos_id"],
        "bos_id": info["bos_id"],
        "block_size": head.get("block_size"),
        "tokenizer": {
            "path": info["path"],
            "fingerprint": info["fingerprint"],
            "encoder": head["encoder"],
            "encoder_check": info["encoder_check"],
        },
        "options": head["options"],
        "layout": head["layout"],
        "num_tasks": num_tasks,
        "sources": sources,
        "shards": [
            {
                "file": s["file"],
                "tokens": s["tokens"],
                "documents": s["documents"],
                "source_index": s["source_index"],
                "byte_range": s["byte_range"],
                "task": s["task"],
                "encoder": s["encoder"],
            }
            for s in published
        ],
        "totals": {
            "files": len(sources),
            "empty_files": empty_files,
            "bytes": sum(s["size"] for s in sources),
            "documents": sum(s["documents"] for s in sources),
            "tokens": total_tokens,
            "shards": len(published),
            "bad": bad_total,
        },
    }
    # Shards of earlier runs that this corpus no longer has, and leftovers of killed writers.
    keep = {s["file"] for s in published} | {s["file"][:-4] + ".json" for s in published}
    for stale in list(out_dir.glob("shard-*")) + list(out_dir.glob(".*.tmp")):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    write_json(out_dir / MANIFEST, manifest)
    log(
        f"manifest: {len(published)} shards, {total_tokens:,} tokens, {manifest['totals']['documents']:,} "
        f"documents, dtype {dtype.name}"
    )
    return manifest
