"""`chla logs` and `chla cancel`: reading a stage's job output and stopping a chain."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .contract.errors import ChlaError
from .contract.rundir import RunDir
from .executors import executor_named
from .lock import RunLock
from .transaction import recover


def log_files(run: RunDir, stage: str, task: int, rank: int) -> list[Path]:
    """The log files of one task (and rank) as the run's executor names them, oldest first."""
    chain = run.read_chain()
    if chain is None:
        return []
    return executor_named(chain.executor)(run).log_files(chain, stage, task, rank)


def show_logs(run_dir: str, stage: str, *, task: int = 0, rank: int = 0, follow: bool = False) -> int:
    run = RunDir(run_dir)
    if not run.exists():
        raise ChlaError(f"{run_dir}: not a chla run directory (no recipe.yaml)")
    if not run.stage_dir(stage).is_dir():
        raise ChlaError(f"{run_dir}: no stage {stage!r} has run here")
    files = log_files(run, stage, task, rank)
    if not files and not follow:
        raise ChlaError(f"no log yet for stage {stage} task {task} rank {rank} (is it still queued?)")
    offsets: dict[Path, int] = {}
    while True:
        for path in log_files(run, stage, task, rank):
            with open(path, "rb") as handle:
                handle.seek(offsets.get(path, 0))
                data = handle.read()
                offsets[path] = handle.tell()
            if data:
                if len(offsets) > 1 and not follow:
                    print(f"==> {path} <==")
                sys.stdout.write(data.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        if not follow or run.done_file(stage).exists() and _stage_ended(run, stage):
            return 0
        time.sleep(1.0)


def _stage_ended(run: RunDir, stage: str) -> bool:
    return run.read_state(stage).get("status") in ("COMPLETED", "FAILED", "CANCELLED")


def cancel_run(run_dir: str) -> int:
    run = RunDir(run_dir)
    if not run.exists():
        raise ChlaError(f"{run_dir}: not a chla run directory (no recipe.yaml)")
    with RunLock(run.path, "cancel"):
        recover(run)
        chain = run.read_chain()
        stopped = executor_named(chain.executor)(run).cancel(chain) if chain else []
    if not stopped:
        print(f"{run.path}: nothing queued or running")
    else:
        print(f"cancelled {', '.join(stopped)}")
    return 0
