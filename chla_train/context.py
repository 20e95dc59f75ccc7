"""StageContext: everything a stage runner gets, and nothing it has to work out for itself."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from chla_launcher.contract.kinds import StageParams
from chla_train.distributed import DistributedEnv

# The params model of the stage kind a runner implements: `def run(ctx: StageContext[SftParams])`.
ParamsT = TypeVar("ParamsT", bound=StageParams)

# Exit status with which a task asks the local executor to run it again (as Slurm's requeue does).
REQUEUE_EXIT_CODE = 75


class Preempted(BaseException):
    """The scheduler asked this task to stop (chla_train.preemption). Raised inside a stage that does
    not checkpoint, so that it unwinds at once (its `finally` blocks remove its temporaries), and by
    `StageContext.requeue_and_exit` in one that does, once it has saved. The job entry catches it and
    requeues the task. A BaseException, so that `except Exception` in a stage does not swallow it."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name


@dataclass
class StageContext(Generic[ParamsT]):
    run_dir: Path
    stage: str
    kind: str
    params: ParamsT
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
    recipe: Any = None  # the frozen chla_launcher.contract.recipe.ResolvedRecipe
    # Set by chla_train.preemption's signal handlers: the first stop signal received, if any.
    stop_signal: str | None = field(default=None, repr=False)
    _preempt_requested: bool = field(default=False, repr=False)
    _cooperative: bool = field(default=False, repr=False)

    @classmethod
    def standalone(
        cls,
        run_dir: Path,
        stage: str,
        kind: str,
        params: ParamsT,
        *,
        out_dir: Path | None = None,
        dist: DistributedEnv | None = None,
        fingerprint: str = "standalone",
    ) -> StageContext[ParamsT]:
        """A context for calling a runner directly, outside a job (benchmarks, tests): the one task
        of a stage in run_dir/<stage>/, with its work/ and out/ (or `out_dir`) made; one rank
        unless `dist` says otherwise."""
        stage_dir = Path(run_dir) / stage
        out_dir = Path(out_dir) if out_dir else stage_dir / "out"
        for path in (stage_dir / "work", out_dir):
            path.mkdir(parents=True, exist_ok=True)
        return cls(
            run_dir=Path(run_dir),
            stage=stage,
            kind=kind,
            params=params,
            stage_dir=stage_dir,
            out_dir=out_dir,
            work_dir=stage_dir / "work",
            task_index=0,
            num_tasks=1,
            dist=dist or DistributedEnv(),
            fingerprint=fingerprint,
        )

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
    # A stage that does not checkpoint is interrupted as soon as the stop signal arrives, and runs
    # again from the start once requeued. A stage that checkpoints calls
    # enable_cooperative_preemption(): the signal then only sets `preempt_requested`; the stage
    # saves at its next step boundary and calls requeue_and_exit().

    def enable_cooperative_preemption(self) -> None:
        self._cooperative = True

    @property
    def preempt_requested(self) -> bool:
        return self._preempt_requested

    def requeue_and_exit(self) -> None:
        """After saving: leave the stage; the job entry requeues the task (Slurm) or asks the local
        executor to start it again, and ends the process."""
        raise Preempted(self.stop_signal or "a stop request")
