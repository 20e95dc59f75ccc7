"""The run directory, shared by both executors and by the jobs:

    runs/<name>/
      recipe.yaml            resolved and frozen
      chain.json             stage -> job ids, fingerprints, submission time, executor
      summary.json/.md       headline figures, when the chain has a `summarize` stage
      <stage>/
        state.json           status, attempts, timings, headline metrics
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

# Stage states as chla reports them (Slurm's own states are mapped onto these in slurm.py).
PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, SKIPPED, UNKNOWN = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "SKIPPED", "UNKNOWN")


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

    def exists(self) -> bool:
        return self.recipe_file.exists()

    # --- DONE markers ---------------------------------------------------------------------------
    def done_fingerprint(self, stage: str) -> str | None:
        data = atomic.read_json(self.done_file(stage))
        return data.get("fingerprint") if isinstance(data, dict) else None

    def mark_done(self, stage: str, fingerprint: str) -> None:
        atomic.write_json(self.done_file(stage), {"fingerprint": fingerprint, "finished_at": _now()})

    def clear_done(self, stage: str) -> None:
        """Before a stage runs again, it must stop looking finished."""
        self.done_file(stage).unlink(missing_ok=True)
        task_dir = self.tasks_dir(stage)
        if task_dir.is_dir():
            for marker in task_dir.glob("*.done"):
                marker.unlink(missing_ok=True)

    def task_done(self, stage: str, task: int) -> Path:
        return self.tasks_dir(stage) / f"{task}.done"

    # --- state.json -----------------------------------------------------------------------------
    def read_state(self, stage: str) -> dict[str, Any]:
        return atomic.read_json(self.state_file(stage), {}) or {}

    def update_state(self, stage: str, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into state.json. Writers are the one process that runs or finalizes a stage
        (rank 0) and the executor, never concurrently for the same stage."""
        state = self.read_state(stage)
        state.update(changes)
        state["updated_at"] = _now()
        atomic.write_json(self.state_file(stage), state)
        return state

    def task_state_file(self, stage: str, task: int) -> Path:
        return self.tasks_dir(stage) / f"{task}.json"

    # --- chain.json -----------------------------------------------------------------------------
    def read_chain(self) -> dict[str, Any]:
        return atomic.read_json(self.chain_file, {}) or {}

    def write_chain(self, chain: dict[str, Any]) -> None:
        atomic.write_json(self.chain_file, chain)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def now() -> str:
    return _now()


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
