"""Local processes: whether one is alive (and still the same process), the tasks of a local run,
and children that die with their parent. Linux; elsewhere the checks degrade to "alive"."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def start_time(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot), so a reused pid is not taken for the
    process recorded earlier; None when it does not exist (or there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def alive(pid: int, started: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or start_time(pid) in (None, started)


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def stage_tasks(run_dir: Path) -> list[tuple[int, str]]:
    """(pid, stage) of every job-entry process of the run directory on this host, whoever started
    it (`python -m chla_train.entry RUN_DIR STAGE ...`, the local executor's tasks)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        argv = command_line(int(entry.name))
        if "chla_train.entry" in argv:
            at = argv.index("chla_train.entry")
            if len(argv) > at + 2 and argv[at + 1] == str(run_dir):
                found.append((int(entry.name), argv[at + 2]))
    return found


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn for subprocess.Popen: the child gets `signum` when the process that started
    it dies, however it dies (SIGKILL, the OOM killer included), so no task outlives its executor.
    Call it from the thread that lives as long as the child should: Linux sends the signal when
    the creating thread exits. None where prctl is unavailable."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signum)

    return preexec
