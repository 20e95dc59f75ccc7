"""Stopping when the scheduler says so: save what can be saved, requeue, never look finished.

How Slurm says it (seen on the local cluster: Slurm 22.05, PreemptType=preempt/partition_prio,
PreemptMode=REQUEUE, GraceTime=30, jobs submitted by submitit through srun):
- A job chosen for preemption gets SIGCONT and SIGTERM in every task (not in the batch shell), and
  SIGKILL once the partition's GraceTime has passed. A job that ends by itself within the grace
  time is recorded COMPLETED or FAILED like any other and is NOT requeued. So, after saving, rank 0
  requeues the job itself (`scontrol requeue`), but only when slurmctld says the job is being
  preempted: scancel and the time limit send the same SIGTERM, and those jobs must end. Slurm then
  signals the tasks again and kills them after KillWait, so everything is saved before the requeue.
  The other ranks leave only after rank 0 has requeued (a barrier): a distributed step is killed
  when one of its ranks exits non-zero (srun --kill-on-bad-exit), which would take rank 0 with it.
- USR2 comes some minutes before the time limit (sbatch --signal, which submitit always sets) or
  from `scancel --signal=USR2`. submitit's own handler then requeues the job and counts time-outs.
- The local executor sends SIGTERM to a task's process group (and the tests send SIGTERM or USR2 to
  its processes); a task that exits with REQUEUE_EXIT_CODE is started again, as Slurm would.

A stage that checkpoints (training) calls ctx.enable_cooperative_preemption(): the handler then
only sets a flag, which every rank learns at its next optimizer step through an all-reduce (ranks
get their signals at different moments, or only some of them get one), so all ranks save the same
step together and no rank leaves a collective half-way. A stage that does not checkpoint is
interrupted at once by chla_train.context.Preempted and runs again from its start.

The handlers never print: printing from a handler while the main thread prints raises
"reentrant call"; what happened is logged once the task acts on it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from chla_launcher import slurm
from chla_launcher.contract.errors import ChlaError
from chla_train.context import REQUEUE_EXIT_CODE, Preempted, StageContext


class StopSignals:
    """The task's SIGTERM and SIGUSR2 handlers. Install after submitit has installed its own (the job
    entry runs inside submitit's process), so that submitit's USR2 handler can be called from ours."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.on_slurm = "SLURM_JOB_ID" in os.environ
        previous = signal.getsignal(signal.SIGUSR2)
        # submitit's: pickle the call again, `scontrol requeue`, sys.exit (or, once the job has run
        # out of requeues, raise submitit's UncompletedJobError).
        self.submitit_requeue: Callable[[int, Any], None] | None = (
            previous if self.on_slurm and callable(previous) else None
        )
        # True while the stage's runner runs: a stop then interrupts a stage that does not checkpoint.
        self.interruptible = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        ctx = self.ctx
        if ctx.stop_signal is not None:
            return  # already stopping; Slurm repeats SIGTERM when it ends the job
        ctx.stop_signal = signal.Signals(signum).name
        if ctx._cooperative:
            ctx._preempt_requested = True
        elif not self.interruptible:
            return  # the stage has finished: the task is about to end well
        elif signum == signal.SIGUSR2 and self.submitit_requeue is not None:
            if ctx.dist.rank == 0:
                self.submitit_requeue(signum, frame)  # requeues the whole job and exits
            # Other ranks go on until the requeue stops them (submitit's rule: never exit first).
        else:
            raise Preempted(ctx.stop_signal)

    def leave_for_requeue(self) -> NoReturn:
        """After the stage has saved (or unwound): hand the task back to the scheduler and end."""
        ctx = self.ctx
        sys.stdout.flush()
        sys.stderr.flush()
        if not self.on_slurm:
            os._exit(REQUEUE_EXIT_CODE)
        if ctx.stop_signal == "SIGUSR2":
            if ctx.dist.rank == 0 and self.submitit_requeue is not None:
                self.submitit_requeue(signal.SIGUSR2, None)  # requeues and raises SystemExit
            _wait_to_be_stopped()  # rank 0 requeues the whole job; Slurm then ends this process
        if ctx.dist.rank == 0:
            self._requeue_if_preempted(os.environ["SLURM_JOB_ID"])
        # No rank leaves before rank 0 has requeued the job: srun --kill-on-bad-exit kills the
        # step when one rank exits non-zero, and a job whose rank 0 died before `scontrol requeue`
        # ends FAILED (Slurm requeues a preempted job itself only when the grace time runs out).
        _after_rank_zero(ctx.dist.rank, ctx.dist.world_size)
        sys.stdout.flush()
        os._exit(REQUEUE_EXIT_CODE)

    def _requeue_if_preempted(self, job_id: str) -> None:
        ctx = self.ctx
        preempted = slurm.being_preempted(job_id)
        if preempted is None:
            ctx.log(f"slurmctld did not say why job {job_id} got SIGTERM; waiting for Slurm to end it")
            _wait_to_be_stopped()
        if not preempted:
            ctx.log(f"job {job_id} got SIGTERM without being preempted (cancelled or at its time limit): not requeued")
            return
        try:
            slurm.requeue_job(job_id)
        except ChlaError as error:
            # Slurm still requeues a preempted job when it kills it at the end of the grace time.
            ctx.log(f"{error}; waiting for Slurm to requeue job {job_id} at the end of the grace time")
            _wait_to_be_stopped()
        ctx.log(f"preempted: job {job_id} requeued")


def _after_rank_zero(rank: int, world_size: int) -> None:
    """Return on every rank only once rank 0 has reached this point too: a barrier of the process
    group where the stage started one (a training stage, which checkpointed together just
    before), else the other ranks wait for Slurm to end them (once rank 0 has requeued the job, or
    at the time limit or cancellation)."""
    if world_size <= 1:
        return
    torch_dist = sys.modules.get("torch.distributed")  # no torch import here for stages without it
    if torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        return
    if rank != 0:
        _wait_to_be_stopped()


def _wait_to_be_stopped() -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    while True:
        signal.pause()
