"""StageContext: everything a stage runner gets, and nothing it has to work out for itself."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from chla_train.distributed import DistributedEnv

# Exit status with which a task asks the local executor to run it again (as Slurm's requeue does).
REQUEUE_EXIT_CODE = 75


@dataclass
class StageContext:
    run_dir: Path
    stage: str
    kind: str
    params: BaseModel
    stage_dir: Path
    # Where the stage writes its results. For a single (non-array) stage this is a directory
    # private to this attempt that becomes <stage>/out only after every rank returned; for an
    # array stage it is shared by all tasks (each must write its files atomically, under names
    # of its own) and becomes <stage>/out at finalize.
    out_dir: Path
    # Survives requeues and retries (checkpoints, caches); never cleaned by chla.
    work_dir: Path
    task_index: int
    num_tasks: int
    dist: DistributedEnv
    fingerprint: str
    recipe: Any = None  # the frozen chla_launcher.recipe.ResolvedRecipe
    _preempt_requested: bool = field(default=False, repr=False)
    _cooperative: bool = field(default=False, repr=False)
    _requeue: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def is_array_task(self) -> bool:
        return self.num_tasks > 1

    def stage_out(self, stage: str) -> Path:
        """The finished output directory of another stage of this run."""
        return self.run_dir / stage / "out"

    def log(self, message: str) -> None:
        """A periodic progress line in the job log (one per call, flushed)."""
        stamp = time.strftime("%H:%M:%S")
        prefix = f"[{stamp} {self.stage}"
        if self.num_tasks > 1:
            prefix += f" task {self.task_index}/{self.num_tasks}"
        if self.dist.world_size > 1:
            prefix += f" rank {self.dist.rank}/{self.dist.world_size}"
        print(f"{prefix}] {message}", flush=True)

    # --- preemption -------------------------------------------------------------------------
    # By default a preempted or timed-out task is requeued at once by submitit (Slurm) and runs
    # again from the start. A stage that checkpoints calls enable_cooperative_preemption(): the
    # signal then only sets `preempt_requested`; the stage saves at its next step boundary and
    # calls requeue_and_exit().

    def enable_cooperative_preemption(self) -> None:
        self._cooperative = True

    @property
    def preempt_requested(self) -> bool:
        return self._preempt_requested

    def requeue_and_exit(self) -> None:
        """Requeue this job (Slurm) or ask the local executor to restart the task, then exit."""
        self.log("requeueing after preemption")
        sys.stdout.flush()
        sys.stderr.flush()
        if self._requeue is not None:
            self._requeue()  # Slurm rank 0: scontrol requeue through submitit; does not return
        if os.environ.get("SLURM_JOB_ID") and self.dist.rank != 0:
            # Rank 0 requeues the whole job; Slurm then ends this process. Exiting with an error
            # first could mark the job failed, so wait to be stopped.
            while True:
                signal.pause()
        os._exit(REQUEUE_EXIT_CODE)
