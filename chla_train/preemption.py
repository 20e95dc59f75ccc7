"""Stopping when the scheduler says so: save what can be saved, requeue, never look finished.

How a stop arrives and how a job goes back into the queue are the executor's (its job environment,
chla_launcher.contract.job_environment; Slurm's in chla_launcher.contract.executors.slurm_job):
- A stop signal (SIGTERM, SIGUSR2) reaches every task, or only some of them. After saving, rank 0
  asks the job environment whether the scheduler wants the job back (`being_preempted`: Slurm's
  scancel and time limit send the same SIGTERM as a preemption, and those jobs must end) and, if
  so, requeues it (`requeue`); every rank then ends with REQUEUE_EXIT_CODE.
- Where the scheduler kills a whole step when one rank exits non-zero (Slurm: srun
  --kill-on-bad-exit), no rank leaves before rank 0 has requeued (`ranks_wait_for_requeue`).
- Where USR2 is the job runner's own requeue signal (submitit's handler on Slurm:
  `runner_handles_usr2`), the task hands USR2 to that handler instead.
- The local executor sends SIGTERM to a task's process group (and the tests send SIGTERM or USR2
  to its processes); a task that exits with REQUEUE_EXIT_CODE is started again.

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

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.job_environment import REQUEUE_EXIT_CODE, JobEnvironment
from chla_train.context import Preempted, StageContext


class StopSignals:
    """The task's handlers of its job environment's stop signals. Install after the job's runner has
    installed its own (on Slurm the job entry runs inside submitit's process), so that the runner's
    USR2 handler can be called from ours."""

    def __init__(self, ctx: StageContext, job: JobEnvironment) -> None:
        self.ctx = ctx
        self.job = job
        previous = signal.getsignal(signal.SIGUSR2)
        # submitit's on Slurm: pickle the call again, `scontrol requeue`, sys.exit (or, once the job
        # has run out of requeues, raise submitit's UncompletedJobError).
        self.runner_requeue: Callable[[int, Any], None] | None = (
            previous if job.runner_handles_usr2 and callable(previous) else None
        )
        # True while the stage's runner runs: a stop then interrupts a stage that does not checkpoint.
        self.interruptible = False

    def install(self) -> None:
        for signum in self.job.stop_signals:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        ctx = self.ctx
        if ctx.stop_signal is not None:
            return  # already stopping; Slurm repeats SIGTERM when it ends the job
        ctx.stop_signal = signal.Signals(signum).name
        if ctx._cooperative:
            ctx._preempt_requested = True
        elif not self.interruptible:
            # Before the runner starts (`runner_starts` then stops the task) or after it finished
            # (the task is about to end well).
            return
        elif signum == signal.SIGUSR2 and self.runner_requeue is not None:
            if ctx.dist.rank == 0:
                self.runner_requeue(signum, frame)  # requeues the whole job and exits
            # Other ranks go on until the requeue stops them (submitit's rule: never exit first).
        else:
            raise Preempted(ctx.stop_signal)

    def runner_starts(self) -> None:
        """The stage's runner is about to start: from now on a stop interrupts it. A stop that came
        earlier, while the task loaded its code (seconds for torch; a preemption or cancellation
        often lands there), stops the task now, before the runner does any work; before this, such
        a stop was only noted and the stage ran to its end (a cancelled command its full length)."""
        self.interruptible = True
        if self.ctx.stop_signal is not None and not self.ctx._cooperative:
            raise Preempted(self.ctx.stop_signal)

    def leave_for_requeue(self) -> NoReturn:
        """After the stage has saved (or unwound): hand the task back to the scheduler and end."""
        ctx, job = self.ctx, self.job
        sys.stdout.flush()
        sys.stderr.flush()
        if ctx.stop_signal == "SIGUSR2" and self.runner_requeue is not None:
            if ctx.dist.rank == 0:
                self.runner_requeue(signal.SIGUSR2, None)  # requeues and raises SystemExit
            _wait_to_be_stopped()  # rank 0 requeues the whole job; the scheduler then ends this process
        if ctx.dist.rank == 0:
            self._requeue_if_preempted()
        if job.ranks_wait_for_requeue:
            # No rank leaves before rank 0 has requeued the job: srun --kill-on-bad-exit kills the
            # step when one rank exits non-zero, and a job whose rank 0 died before `scontrol
            # requeue` ends FAILED (Slurm requeues a preempted job itself only when the grace time
            # runs out).
            _after_rank_zero(ctx.dist.rank, ctx.dist.world_size)
        sys.stdout.flush()
        os._exit(REQUEUE_EXIT_CODE)

    def _requeue_if_preempted(self) -> None:
        ctx, job = self.ctx, self.job
        what = f"job {job.job_id}" if job.job_id else f"attempt {job.attempt}"
        preempted = job.being_preempted()
        if preempted is None:
            ctx.log(f"the scheduler did not say why {what} got {ctx.stop_signal}; waiting for it to end the job")
            _wait_to_be_stopped()
        if not preempted:
            ctx.log(
                f"{what} got {ctx.stop_signal} without being preempted (cancelled or at its time limit): not requeued"
            )
            return
        try:
            job.requeue()
        except ChlaError as error:
            # Slurm still requeues a preempted job when it kills it at the end of the grace time.
            ctx.log(f"{error}; waiting for the scheduler to requeue {what}")
            _wait_to_be_stopped()
        ctx.log(f"preempted: {what} requeued")


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
