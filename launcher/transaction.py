"""A submission as a transaction: the run directory changes all at once, or not at all.

Under the run-directory lock, a submission stages what it will change in RUN_DIR/.chla/txn/
(the new recipe.yaml, each stage's first state.json, chain.json; which DONE markers, task markers
and work directories go), queues every job held (they cannot start, nor read the old recipe), then
commits: one atomic file, COMMITTED, is the switch. Applying it moves the staged files into
place (chain.json last) and the removed ones aside, then the jobs are released.

Until COMMITTED exists, any failure or signal (sbatch refusing a stage, Ctrl-C, SIGTERM, SIGHUP)
rolls back: every job of the submission is cancelled and the run directory is as it was, byte for
byte. A submission that cannot roll back itself (kill -9, the OOM killer) is rolled back by its
guardian, a small process started with it that holds the lock on its behalf and notices its death
at once (the end of a pipe); or else by the next chla that takes the lock (`recover`). A
COMMITTED transaction found this way is applied instead, and its jobs released.

Jobs that a dying submission had queued but not yet recorded (sbatch still in flight) are found by
where their batch script lies: the executor's cancel_uncommitted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .contract import atomic
from .contract.chain import Chain
from .contract.rundir import RunDir, now
from .executors import Executor, executor_named
from .lock import RunLock

_INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# After the submitter died: look again for jobs that an sbatch still in flight then queued.
GUARDIAN_RESCANS_S = (1, 2, 4, 8)


class SubmissionInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a submission (SIGINT is Python's KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SubmissionTransaction:
    """`with SubmissionTransaction(...) as txn:` stage, queue, `txn.commit(chain)`. Leaving the
    block without commit() rolls back; so does a signal at any point before the commit."""

    def __init__(self, run: RunDir, executor: Executor, lock: RunLock, *, new_run: bool) -> None:
        self.run, self.executor, self.lock = run, executor, lock
        self.dir = transaction_dir(run)
        self.journal: dict[str, Any] = {
            "executor": executor.name,
            "pid": os.getpid(),
            "started_at": now(),
            "job_ids": [],
            "removals": [],
            # Paths this submission creates, removed again by a rollback ("" is the run directory).
            "created": [""] if new_run else [],
        }
        self.committed = False
        self._guardian: subprocess.Popen[bytes] | None = None
        self._handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------------
    def __enter__(self) -> SubmissionTransaction:
        self._handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        (self.dir / "staged").mkdir(parents=True)
        self._write_journal()
        if self.executor.detached:
            self._start_guardian()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if not self.committed:
                with _interrupts_blocked():
                    # A job whose sbatch was cut short by the signal may appear a moment later.
                    rollback(self.run, self.executor, self.journal, rescans_s=(1,) if self.executor.detached else ())
        finally:
            self._dismiss_guardian()
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)

    # --- staging ------------------------------------------------------------------------------
    def stage_file(self, target: Path, text: str) -> None:
        """`target` (inside the run directory) gets `text` at the switch."""
        atomic.write_text(self.dir / "staged" / self._relative(target), text)

    def stage_removal(self, target: Path) -> None:
        """`target` (a file or directory) goes at the switch."""
        self.journal["removals"].append(self._relative(target))

    def note_created(self, path: Path) -> None:
        """`path` does not exist yet and may be made by queueing (submitit's log folders)."""
        if not path.exists():
            self.journal["created"].append(self._relative(path))
            self._write_journal()

    def record_jobs(self, job_ids: list[str]) -> None:
        self.journal["job_ids"] += job_ids
        self._write_journal()

    def commit(self, chain: Chain) -> None:
        """The switch, then the jobs released. Signals wait until both are done."""
        with _interrupts_blocked():
            self.stage_file(self.run.chain_file, json.dumps(chain.to_json(), indent=2, ensure_ascii=False) + "\n")
            self._write_journal()
            atomic.write_text(self.dir / "COMMITTED", now() + "\n")
            self.committed = True
            finish_commit(self.run, self.executor, self.journal)

    # ------------------------------------------------------------------------------------------
    def _relative(self, target: Path) -> str:
        return str(Path(target).resolve().relative_to(self.run.path))

    def _write_journal(self) -> None:
        atomic.write_json(self.dir / "journal.json", self.journal)

    def _start_guardian(self) -> None:
        lock_fd = self.lock.inheritable_fd()
        self._guardian = subprocess.Popen(
            [sys.executable, "-m", "chla_launcher.transaction", str(self.run.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(lock_fd,) if lock_fd is not None else (),
            start_new_session=True,
        )  # not reached by the terminal's Ctrl-C or hang-up
        self.lock.add_holder(self._guardian.pid)

    def _dismiss_guardian(self) -> None:
        if self._guardian is None:
            return
        try:
            assert self._guardian.stdin is not None  # opened with stdin=PIPE
            self._guardian.stdin.write(b"done")
            self._guardian.stdin.close()
            self._guardian.wait(timeout=30)  # it shares the lock: gone before the lock is released
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._guardian = None


# --------------------------------------------------------------------------------------------
# Applying and rolling back; also what the guardian and the next lock holder do


def transaction_dir(run: RunDir) -> Path:
    return run.control_dir / "txn"


def finish_commit(run: RunDir, executor: Executor, journal: dict[str, Any]) -> None:
    """Apply a committed transaction (again, if a first try was cut short) and release its jobs."""
    directory = transaction_dir(run)
    aside = directory / "aside"
    aside.mkdir(exist_ok=True)
    for index, relative in enumerate(journal["removals"]):
        target = run.path / relative
        if target.exists() or target.is_symlink():
            os.replace(target, aside / str(index))
    staged = directory / "staged"
    files = sorted(
        (p for p in staged.rglob("*") if p.is_file() and not p.name.startswith(".")),
        key=lambda p: (p.relative_to(staged) == Path("chain.json"), str(p)),
    )
    for source in files:  # chain.json last: readers see the new chain once everything is in place
        target = run.path / source.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    chain = run.read_chain()
    if chain is not None:
        executor.release(chain)
    shutil.rmtree(directory, ignore_errors=True)


def rollback(run: RunDir, executor: Executor, journal: dict[str, Any], *, rescans_s: tuple[float, ...] = ()) -> None:
    """Cancel every job of an uncommitted transaction and undo what it created."""
    chain = run.read_chain()
    executor.cancel_uncommitted(list(journal["job_ids"]), chain)
    for delay in rescans_s:
        time.sleep(delay)
        executor.cancel_uncommitted([], chain)
    for relative in sorted(journal["created"], key=len, reverse=True):
        shutil.rmtree(run.path / relative, ignore_errors=True)
    shutil.rmtree(transaction_dir(run), ignore_errors=True)


def recover(run: RunDir, *, rescans_s: tuple[float, ...] = ()) -> str | None:
    """Finish what a submission that died left: apply it if it was committed, else roll it back.
    Call with the lock held. Returns what was done, or None if there was nothing to do."""
    directory = transaction_dir(run)
    if not directory.is_dir():
        return None
    journal = atomic.read_json(directory / "journal.json")
    if not isinstance(journal, dict):  # died before its first job: nothing was queued
        shutil.rmtree(directory, ignore_errors=True)
        return "removed an empty submission"
    executor = executor_named(journal["executor"])(run, out=sys.stderr)
    if (directory / "COMMITTED").exists():
        finish_commit(run, executor, journal)
        return "completed a committed submission"
    rollback(run, executor, journal, rescans_s=rescans_s)
    return "rolled back a submission that did not finish"


@contextmanager
def _interrupts_blocked() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends (they are then delivered)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise SubmissionInterrupted(signum)


def guardian_main(run_path: str) -> int:
    """`python -m chla_launcher.transaction RUN_DIR`: wait for the submitter to say it is done; if
    the pipe ends without that, it died: recover for it (the lock is still held through us)."""
    for sig in _INTERRUPTS:
        signal.signal(sig, signal.SIG_IGN)
    said = sys.stdin.buffer.read()
    if said == b"done":
        return 0
    recover(RunDir(run_path), rescans_s=GUARDIAN_RESCANS_S)
    return 0


if __name__ == "__main__":
    sys.exit(guardian_main(sys.argv[1]))
