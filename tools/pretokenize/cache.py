"""The content-addressed cache: one entry per piece, keyed by the tokenizer, the piece's bytes and
the options; entries are committed by their `.json`, written last, and published as hard links."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from chla_launcher.contract.atomic import read_json

from .options import FORMAT_VERSION, PretokenizeOptions

if TYPE_CHECKING:
    from .tokenizer import TokenizerInfo


def cache_key(
    info: TokenizerInfo, options: PretokenizeOptions, encoder: str, fmt: str, size: int, content_hash: str
) -> str:
    payload = json.dumps(
        {
            "v": FORMAT_VERSION,
            "tokenizer": info.fingerprint,
            "encoder": encoder,
            "dtype": info.dtype.str,
            "format": fmt,
            "options": options.key_fields(),
            "size": size,
            "blake2b": content_hash,
        },
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()


def valid_entry(cache_dir: Path, key: str, itemsize: int) -> dict | None:
    counts = read_json(cache_dir / f"{key}.json")
    if counts is None:
        return None
    try:
        size = (cache_dir / f"{key}.bin").stat().st_size
    except FileNotFoundError:
        return None
    return counts if size == counts["tokens"] * itemsize else None


def link_or_copy(src: Path, dst: Path) -> None:
    """Publish `src` as `dst` atomically (hard link, or a copy across filesystems)."""
    try:
        if dst.exists() and os.path.samefile(src, dst):
            return
    except OSError:
        pass
    tmp = dst.with_name(f".{dst.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial copy (a full disk, a stop) is not left behind
        raise


def remove_dead_tmp(directory: Path, prefix: str) -> None:
    """Remove temporary files of killed writers on this host (named .<prefix>.<host>.<pid>.tmp)."""
    host = socket.gethostname()
    for tmp in directory.glob(f".{prefix}.*.tmp"):
        parts = tmp.name[len(prefix) + 2 : -4].rsplit(".", 1)
        if len(parts) != 2 or parts[0] != host or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass
