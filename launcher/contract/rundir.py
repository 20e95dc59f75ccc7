"""The run directory, shared by every executor and by the jobs:

runs/<name>/
  recipe.yaml            resolved and frozen
  chain.json             stage -> job ids, fingerprints, submission time, executor (chla_launcher.contract.chain)
  summary.json/.md       headline figures, when the chain has a `summarize` stage
  .chla/                 the run-directory lock and a submission in progress (chla_launcher.lock,
                         chla_launcher.transaction); tracking.json (chla_train.tracking)
  <stage>/
    state.json           status, attempts, timings, headline metrics
    progress/            what its running tasks have done so far (chla_launcher.contract.progress)
    logs/                job stdout/stderr (one file per task)
    out/                 the stage's artifacts
    work/                what survives retries: checkpoints, caches
    tasks/               per-task markers of an array stage
    DONE                 written last, atomically; holds the fingerprint
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from . import atomic
from .chain import Chain

# Stage states as chla reports them (Slurm's own states are mapped onto these in slurm.py). STALE: what
# ran or tried to run in the stage was submitted for an earlier version of the recipe. INTERRUPTED:
# the chla-submit running a local chain ended (was killed) before the stage finished.
PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, SKIPPED, STALE, UNKNOWN, INTERRUPTED = (
    "PENDING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "SKIPPED",
    "STALE",
    "UNKNOWN",
    "INTERRUPTED",
)

# Names at the top of a run directory that are not stages: a stage may not take one.
RESERVED_NAMES = frozenset({"recipe.yaml", "chain.json", "summary.json", "summary.md", ".chla"})


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()

    # --- paths ---------------------------------------------------------------------------------
    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def chain_file(self) -> Path:
        return self.path / "chain.json"

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def out_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "out"

    def work_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "work"

    def logs_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "logs"

    def tasks_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "tasks"

    def done_file(self, stage: str) -> Path:
        return self.stage_dir(stage) / "DONE"

    def state_file(self, stage: str) -> Path:
        return self.stage_dir(stage) / "state.json"

    @property
    def control_dir(self) -> Path:
        """chla's own bookkeeping: the lock, a submission in progress."""
        return self.path / ".chla"

    def array_staging_dir(self, stage: str, fingerprint: str) -> Path:
        """Where the tasks of an array stage write; it becomes out/ at finalize, so a downstream
        stage never sees a part of an unfinished or earlier (larger) array."""
        return self.stage_dir(stage) / f"out.tmp-array-{fingerprint}"

    def exists(self) -> bool:
        return self.recipe_file.exists()

    # --- DONE markers ---------------------------------------------------------------------------
    def done_fingerprint(self, stage: str) -> str | None:
        data = atomic.read_json(self.done_file(stage))
        return data.get("fingerprint") if isinstance(data, dict) else None

    def mark_done(self, stage: str, fingerprint: str) -> None:
        atomic.write_json(self.done_file(stage), {"fingerprint": fingerprint, "finished_at": _now()})

    def task_done(self, stage: str, task: int) -> Path:
        return self.tasks_dir(stage) / f"{task}.done"

    # --- state.json (a stage's) and tasks/<i>.json (an array task's) ----------------------------
    def read_state(self, stage: str, task: int | None = None) -> dict[str, Any]:
        path = self.state_file(stage) if task is None else self.task_state_file(stage, task)
        return atomic.read_json(path, {}) or {}

    def update_state(self, stage: str, task: int | None = None, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the stage's state.json (or array task `task`'s). The one writer of
        state files; callers are the one process that runs or finalizes a stage (rank 0; another
        rank only to record that it failed first, as the step's other ranks are killed) and the
        local executor, never concurrently for the same file. A submission writes the first state
        (initial_state) through its switch."""
        path = self.state_file(stage) if task is None else self.task_state_file(stage, task)
        state = self.read_state(stage, task)
        state.update(changes)
        state["updated_at"] = _now()
        atomic.write_json(path, state)
        return state

    @staticmethod
    def initial_state() -> dict[str, Any]:
        """state.json of a stage just submitted: a new submission restarts the count of attempts
        (requeues show as restarts)."""
        return {"status": PENDING, "attempts": 0, "submitted_at": _now()}

    def task_state_file(self, stage: str, task: int) -> Path:
        return self.tasks_dir(stage) / f"{task}.json"

    # --- chain.json -----------------------------------------------------------------------------
    def read_chain(self) -> Chain | None:
        return Chain.read(self.chain_file)

    def write_chain(self, chain: Chain) -> None:
        chain.write(self.chain_file)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def now() -> str:
    return _now()


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
