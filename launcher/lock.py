"""The run-directory lock: held by `chla submit` (also --resume) and `chla cancel` while they
change a run directory, so that two of them never interleave.

Where the file system supports it, the lock is flock() on RUN_DIR/.chla/lock: the kernel (or the
NFS lock manager) drops it when its holder dies, however it dies. Some cluster file systems refuse
flock (Lustre mounted without `flock`, NFS mounted with `nolock` answer ENOLCK or EOPNOTSUPP);
there the lock is RUN_DIR/.chla/lock.held, created with O_EXCL (atomic on NFS too), naming the
holder's host, pids and their start times, and refreshed every few seconds. A lock file whose
holders are all gone (same host: no listed process alive with its recorded start time) or that
has not been refreshed for STALE_AFTER_S (a holder on another host) is stale and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .contract.errors import ChlaError
from .contract.processes import alive, start_time

WAIT_S = 120.0  # how long a second submit or cancel waits for the holder to finish
HEARTBEAT_S = 5.0  # lock-file mode: how often the holder refreshes the file
STALE_AFTER_S = 60.0  # lock-file mode: a file not refreshed for this long has lost its holder
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    def __init__(self, run_path: Path, purpose: str, *, wait_s: float = WAIT_S) -> None:
        self.control = Path(run_path) / ".chla"
        self.purpose, self.wait_s = purpose, wait_s
        self.flock_path = self.control / "lock"
        self.file_path = self.control / "lock.held"
        self._fd: int | None = None
        self._no_flock = False
        self._holder: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------
    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.control.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        told = False
        while True:
            if self._try_acquire():
                return
            holder = self.holder()
            if time.monotonic() > deadline:
                raise ChlaError(
                    f"{self.control.parent} is locked by {describe(holder)}; try again when it has finished"
                )
            if not told:
                print(
                    f"chla: waiting for {describe(holder)} to finish with {self.control.parent}",
                    file=sys.stderr,
                    flush=True,
                )
                told = True
            time.sleep(0.2)

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
        if self._holder is not None:
            if _read_json(self.file_path) == self._holder:
                self.file_path.unlink(missing_ok=True)
            self._holder = None

    def inheritable_fd(self) -> int | None:
        """The flock descriptor, for a helper process that must keep the lock held after this
        process dies (the submission guardian); None in lock-file mode (use add_holder)."""
        return self._fd

    def add_holder(self, pid: int) -> None:
        """Lock-file mode: the lock stays held while `pid` lives, even after this process died."""
        if self._holder is not None:
            self._holder["pids"].append([pid, start_time(pid)])
            _write_json(self.file_path, self._holder)

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock, as the holder wrote it (None when unknown)."""
        data = _read_json(self.file_path) or _read_json(self.flock_path)
        return data if isinstance(data, dict) else None

    # ------------------------------------------------------------------------------------------
    def _me(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pids": [[os.getpid(), start_time(os.getpid())]],
            "purpose": self.purpose,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _try_acquire(self) -> bool:
        if not self._no_flock:
            try:
                return self._try_flock()
            except OSError as error:
                if error.errno not in _NO_FLOCK:
                    raise
                self._no_flock = True
        return self._try_lock_file()

    def _try_flock(self) -> bool:
        fd = os.open(self.flock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(self.flock_path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # removed (an aborted first submission removes its run directory) while we waited
            os.close(fd)
            self.control.mkdir(parents=True, exist_ok=True)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self._me()).encode())
        self._fd = fd
        return True

    def _try_lock_file(self) -> bool:
        me = self._me()
        try:
            fd = os.open(self.file_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            self._take_over_if_stale()
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        self._holder = me
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._refresh, name="chla-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return True

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.file_path)
            except OSError:
                pass

    def _take_over_if_stale(self) -> None:
        try:
            stat = self.file_path.stat()
        except FileNotFoundError:
            return
        holder = _read_json(self.file_path)
        if not _stale(holder, stat.st_mtime):
            return
        # Move the stale file aside under a name of our own; if what we moved is not the file we
        # judged (its holder replaced it meanwhile), put it back.
        aside = self.file_path.with_name(f"lock.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.file_path, aside)
        except FileNotFoundError:
            return
        if os.stat(aside).st_ino != stat.st_ino:
            try:
                os.link(aside, self.file_path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)


def _stale(holder: Any, mtime: float) -> bool:
    if time.time() - mtime > STALE_AFTER_S:
        return True
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return False
    return not any(alive(int(pid), start) for pid, start in holder.get("pids") or [])


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another chla process"
    pids = ", ".join(str(pid) for pid, _ in holder.get("pids") or [])
    return (
        f"`chla {holder.get('purpose', '?')}` (host {holder.get('host', '?')}, pid {pids}, "
        f"since {holder.get('since', '?')})"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
