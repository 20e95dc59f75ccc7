"""The job entry: one function runs one task of one stage, on Slurm (through submitit) or locally.

    run_task(run_dir, stage, task_index, fingerprint)   every task (each rank of a distributed stage)
    finalize(run_dir, stage, fingerprint)                once, after all tasks of an array stage

It checks that the run directory still wants what the job was submitted for (check_fresh), loads
the frozen recipe, sets up the distributed environment from the job environment of the executor
that started the task (chla_launcher.contract.job_environment), runs the stage's runner, makes the
outputs visible atomically, and writes the DONE marker last. A task that is killed, fails, is stale,
or is stopped and requeued (chla_train.preemption) leaves no DONE marker, so the stage never looks
finished when it is not.

This module imports no torch: submitit pickles `StageJob` by reference on the login node.
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chla_launcher.contract import atomic
from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.job_environment import EXECUTOR_VARIABLE, JobEnvironment, current_job_environment
from chla_launcher.contract.kinds import import_entry
from chla_launcher.contract.recipe import ResolvedRecipe, load_frozen
from chla_launcher.contract.rundir import COMPLETED, FAILED, PENDING, RUNNING, STALE, RunDir, now
from chla_train import tracking
from chla_train.context import Preempted, StageContext
from chla_train.determinism import prepare_environment
from chla_train.distributed import DistributedEnv
from chla_train.freed_memory import keep_freed_memory
from chla_train.preemption import StopSignals

# How long rank 0 waits for the other ranks to report after it finished its own part.
RANK_BARRIER_TIMEOUT_S = 600


class StaleJob(ChlaError):
    """The run directory no longer wants what this job was submitted for."""


def check_fresh(run: RunDir, stage: str, fingerprint: str) -> None:
    """Refuse to run a job that an earlier submission queued: a pending or requeued job, or a local
    task that outlived its executor, must not run the stage under the parameters of a later
    submission, resume that submission's checkpoints, or write DONE with its own fingerprint.

    The run directory's current fingerprint of the stage is the one in chain.json: a submission
    switches chain.json before it releases its jobs (chla_launcher.transaction)."""
    chain = run.read_chain()
    record = chain.stages.get(stage) if chain is not None else None
    if record is not None and record.fingerprint == fingerprint:
        return
    wanted = f"fingerprint {record.fingerprint}" if record is not None else "no such stage"
    raise StaleJob(
        f"stage {stage}: STALE: this job was submitted for fingerprint {fingerprint}, but the "
        f"run directory's current submission wants {wanted} (a later chla-submit changed "
        f"it); not run, nothing written"
    )


def _record_stale(run: RunDir, stage: str, error: StaleJob, job: JobEnvironment) -> None:
    """state.json says STALE, unless the current submission's attempt runs or has finished the stage
    (chla status then shows that, and the stale job as a note)."""
    changes: dict[str, Any] = {"stale_job": {"job_id": job.job_id, "at": now(), "error": str(error)}}
    if run.read_state(stage).get("status") not in (RUNNING, COMPLETED):
        changes.update(status=STALE, error=str(error))
    run.update_state(stage, **changes)


def _stage_context(
    run: RunDir,
    recipe: ResolvedRecipe,
    stage_name: str,
    task_index: int,
    fingerprint: str,
    out_dir: Path,
    dist: DistributedEnv,
) -> StageContext:
    stage = recipe.stages[stage_name]
    work_dir = run.work_dir(stage_name)
    work_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(
        run_dir=run.path,
        stage=stage_name,
        kind=stage.kind.name,
        params=stage.params,
        stage_dir=run.stage_dir(stage_name),
        out_dir=out_dir,
        work_dir=work_dir,
        task_index=task_index,
        num_tasks=stage.num_tasks,
        dist=dist,
        fingerprint=fingerprint,
        recipe=recipe,
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def run_task(run_dir: str, stage_name: str, task_index: int, fingerprint: str) -> dict[str, Any] | None:
    keep_freed_memory()
    run = RunDir(run_dir)
    job = current_job_environment()
    try:
        check_fresh(run, stage_name, fingerprint)
    except StaleJob as error:
        if job.rank == 0:
            _record_stale(run, stage_name, error, job)
        raise
    recipe = load_frozen(run.path)
    stage = recipe.stages[stage_name]
    # Before anything imports torch: cuBLAS reads its workspace setting when CUDA starts.
    prepare_environment(bool(getattr(stage.params, "deterministic", False)))
    dist = DistributedEnv.from_job(job)
    dist.export()
    # Names what this attempt writes, so that a requeued attempt never mixes with the files of the
    # one it replaces (all ranks of one attempt share it).
    token = job.attempt
    is_array = stage.array is not None
    if is_array:
        # Shared by the tasks; it becomes out/ at finalize.
        out_dir = run.array_staging_dir(stage_name, fingerprint)
        state_task: int | None = task_index
    else:
        out_dir = run.stage_dir(stage_name) / f"out.tmp-{token}"
        state_task = None
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _stage_context(run, recipe, stage_name, task_index, fingerprint, out_dir, dist)
    stop = StopSignals(ctx, job)
    stop.install()

    writes_state = dist.rank == 0
    if writes_state:
        attempts = int(run.read_state(stage_name, state_task).get("attempts", 0)) + 1
        run.update_state(
            stage_name,
            state_task,
            status=RUNNING,
            attempts=attempts,
            started_at=now(),
            host=socket.gethostname(),
            job_id=job.job_id,
            attempt=token,
            fingerprint=fingerprint,
            error=None,
            stopped_by=None,
            stale_job=None,
        )
    ctx.log(f"start ({stage.kind.name}, attempt {token}, world size {dist.world_size})")
    started = time.time()
    runner: Callable[[StageContext], Any] = import_entry(stage.kind.entry)
    barrier = run.stage_dir(stage_name) / f".ranks-{token}"
    try:
        stop.runner_starts()
        try:
            metrics = runner(ctx) or {}
        finally:
            stop.interruptible = False
    except BaseException as error:
        # A rank that failed first says so (below) before its process ends; what the others then
        # see (a collective whose peer left, the SIGTERM of srun or of the local executor) is
        # that failure, not a preemption, and the stage's error is that rank's.
        peer_failure = _peer_failure(barrier, dist.rank) if dist.world_size > 1 else None
        if peer_failure is None and _stopped_by_scheduler(ctx, error):
            _leave_preempted(ctx, stop, error, run, state_task, writes_state, out_dir, is_array, started)
        if isinstance(error, SystemExit) and error.code in (0, None):
            raise
        disk_full = disk_full_error(error, run.path, stage_name)
        if disk_full is not None and not is_array:
            shutil.rmtree(out_dir, ignore_errors=True)  # half-written, and it frees the space to say so
        message = str(disk_full) if disk_full else _one_line(error)
        try:
            if dist.world_size > 1:
                barrier.mkdir(parents=True, exist_ok=True)
                atomic.write_text(barrier / f"{dist.rank}.failed", message)
                message = peer_failure or f"rank {dist.rank}: {message}"
            # Any rank that fails first records it: srun --kill-on-bad-exit (and the local executor)
            # then kills the others at once, rank 0 included.
            if writes_state or (dist.world_size > 1 and peer_failure is None):
                run.update_state(
                    stage_name,
                    state_task,
                    status=FAILED,
                    finished_at=now(),
                    elapsed_s=round(time.time() - started, 3),
                    error=message,
                )
                if not is_array and writes_state:
                    tracking.stage_failed(ctx)
        except OSError:
            if disk_full is None:
                raise
        if disk_full is not None:
            raise disk_full from None
        raise

    hosts = [socket.gethostname()]
    if dist.world_size > 1:
        barrier.mkdir(parents=True, exist_ok=True)
        # Each rank reports its host, so reports can tell real nodes from "nodes" sharing a host.
        atomic.write_text(barrier / f"{dist.rank}.ok", socket.gethostname())
        if dist.rank != 0:
            return metrics
        _wait_for_ranks(barrier, dist.world_size)
        hosts = sorted({path.read_text().strip() for path in barrier.glob("*.ok")})
    if not is_array and stage.kind.finalize:
        # A kind that aggregates (manifest, results) does so after its single task too.
        ctx.log("finalizing")
        finalize_ctx = _stage_context(run, recipe, stage_name, -1, fingerprint, out_dir, dist)
        metrics.update(import_entry(stage.kind.finalize)(finalize_ctx) or {})
    elapsed = round(time.time() - started, 3)
    if is_array:
        atomic.write_json(run.task_done(stage_name, task_index), {"fingerprint": fingerprint, "finished_at": now()})
        run.update_state(
            stage_name, state_task, status=COMPLETED, finished_at=now(), elapsed_s=elapsed, metrics=metrics
        )
    else:
        atomic.replace_dir(out_dir, run.out_dir(stage_name))
        for stale in run.stage_dir(stage_name).glob("out.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(barrier, ignore_errors=True)
        run.update_state(
            stage_name, status=COMPLETED, finished_at=now(), elapsed_s=elapsed, metrics=metrics, hosts=hosts
        )
        run.mark_done(stage_name, fingerprint)  # last
        tracking.stage_finished(ctx, metrics)
    ctx.log(f"done in {elapsed:.1f}s")
    return metrics


def disk_full_error(error: BaseException, run_dir: Path, stage: str | None = None) -> ChlaError | None:
    """A full disk (or quota) anywhere in what the stage did, as one line naming the file system,
    instead of a traceback from deep inside a writer."""
    seen: BaseException | None = error
    while seen is not None and not (isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT)):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    where = f" writing {seen.filename}" if getattr(seen, "filename", None) else ""
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:,.0f} MiB free now"
    except OSError:
        free = "free space unknown"
    prefix = f"stage {stage}: " if stage else ""
    return ChlaError(
        f"{prefix}no space left on the file system of {run_dir}{where} ({free}); what the "
        f"attempt had half-written is removed: free space there (or move the run directory) "
        f"and resubmit"
    )


def _stopped_by_scheduler(ctx: StageContext, error: BaseException) -> bool:
    """Did the stage end because the scheduler asked it to stop? Then it is requeued, not failed:
    Preempted itself, submitit's exit after its own requeue (USR2), or anything a SIGTERM made fail
    (a killed child process, a rank whose peer left)."""
    if isinstance(error, Preempted):
        return True
    if isinstance(error, SystemExit):
        return ctx.stop_signal is not None and error.code not in (0, None)
    return ctx.stop_signal == "SIGTERM" and isinstance(error, Exception)


def _leave_preempted(
    ctx: StageContext,
    stop: StopSignals,
    error: BaseException,
    run: RunDir,
    state_task: int | None,
    writes_state: bool,
    out_dir: Path,
    is_array: bool,
    started: float,
) -> None:
    """Record the attempt as stopped (PENDING again, no DONE), drop its private output directory,
    and requeue. Re-raises submitit's SystemExit (the job is requeued already); otherwise does not
    return."""
    ctx.log(f"stopped by {ctx.stop_signal}: {'checkpointed, ' if ctx._cooperative else ''}requeueing")
    if not is_array:
        shutil.rmtree(out_dir, ignore_errors=True)  # half-written: the next attempt starts afresh
    if writes_state:
        run.update_state(
            ctx.stage,
            state_task,
            status=PENDING,
            finished_at=now(),
            elapsed_s=round(time.time() - started, 3),
            stopped_by=ctx.stop_signal,
            error=None,
        )
    if isinstance(error, SystemExit):
        raise error
    stop.leave_for_requeue()


def _peer_failure(barrier: Path, rank: int) -> str | None:
    """What the first other rank of this attempt that failed reported ("rank N: ..."), if any."""
    failed = sorted(
        (path for path in barrier.glob("*.failed") if path.stem != str(rank)), key=lambda p: p.stat().st_mtime
    )
    if not failed:
        return None
    return f"rank {failed[0].stem}: {failed[0].read_text().strip()}"


def _wait_for_ranks(barrier: Path, world_size: int) -> None:
    deadline = time.time() + RANK_BARRIER_TIMEOUT_S
    while True:
        failed = sorted(barrier.glob("*.failed"))
        if failed:
            raise RuntimeError(f"rank {failed[0].stem} failed: {failed[0].read_text().strip()}")
        if len(list(barrier.glob("*.ok"))) >= world_size:
            return
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {world_size} ranks to finish")
        time.sleep(0.2)


def finalize(run_dir: str, stage_name: str, fingerprint: str) -> dict[str, Any] | None:
    """After every task of an array stage succeeded: the kind's aggregation, then DONE."""
    run = RunDir(run_dir)
    job = current_job_environment()
    try:
        check_fresh(run, stage_name, fingerprint)
    except StaleJob as error:
        _record_stale(run, stage_name, error, job)
        raise
    recipe = load_frozen(run.path)
    stage = recipe.stages[stage_name]
    missing = [
        index
        for index in range(stage.num_tasks)
        if (atomic.read_json(run.task_done(stage_name, index), {}) or {}).get("fingerprint") != fingerprint
    ]
    if missing:
        raise RuntimeError(f"stage {stage_name}: tasks {missing[:10]} have not finished")
    task_states = [run.read_state(stage_name, i) for i in range(stage.num_tasks)]
    task_metrics = [state.get("metrics") or {} for state in task_states]
    metrics: dict[str, Any] = {"tasks": stage.num_tasks}
    staging = run.array_staging_dir(stage_name, fingerprint)
    # Without its staging directory, a finalize that was cut short has published the parts already.
    parts = staging if staging.is_dir() else run.out_dir(stage_name)
    if stage.kind.finalize:
        ctx = _stage_context(run, recipe, stage_name, -1, fingerprint, parts, DistributedEnv())
        stop = StopSignals(ctx, job)
        stop.install()
        ctx.log(f"finalizing {stage.num_tasks} tasks")
        try:
            stop.runner_starts()
            metrics.update(import_entry(stage.kind.finalize)(ctx) or {})
        except BaseException as error:
            if not _stopped_by_scheduler(ctx, error):
                raise
            ctx.log(f"stopped by {ctx.stop_signal}: requeueing")
            if isinstance(error, SystemExit):
                raise
            stop.leave_for_requeue()
        finally:
            stop.interruptible = False
    else:
        metrics["task_metrics"] = task_metrics
    if parts == staging:
        atomic.replace_dir(staging, run.out_dir(stage_name))  # every part visible at once, and only them
    run.update_state(
        stage_name,
        status=COMPLETED,
        finished_at=now(),
        metrics=metrics,
        fingerprint=fingerprint,
        elapsed_s=_span_seconds(task_states),
    )
    run.mark_done(stage_name, fingerprint)  # last
    if stage.kind.finalize:
        tracking.stage_finished(ctx, metrics)
    return metrics


def _span_seconds(task_states: list[dict[str, Any]]) -> float | None:
    """Wall time of an array stage: first task start to now."""
    from datetime import datetime

    starts = [datetime.strptime(s["started_at"], "%Y-%m-%dT%H:%M:%S%z") for s in task_states if s.get("started_at")]
    if not starts:
        return None
    return round(time.time() - min(starts).timestamp(), 3)


class StageJob:
    """What an executor that runs jobs through submitit (Slurm's) pickles. Checkpointable: on
    preemption or time limit submitit calls checkpoint() and requeues the same call; the stage
    resumes from its own checkpoints. `executor` (the registered name of the executor that
    submitted it) selects the job environment the task reads."""

    def __init__(self, executor: str) -> None:
        self.executor = executor

    def __call__(self, run_dir: str, stage: str, task_index: int, fingerprint: str, finalize_only: bool = False) -> Any:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        # A job queued before StageJob named its executor was always Slurm's.
        os.environ[EXECUTOR_VARIABLE] = getattr(self, "executor", "slurm")
        try:
            if finalize_only:
                return finalize(run_dir, stage, fingerprint)
            return run_task(run_dir, stage, task_index, fingerprint)
        except (ChlaError, OSError) as error:
            # One clear line in the job's log before submitit's traceback.
            line = error if isinstance(error, ChlaError) else disk_full_error(error, Path(run_dir), stage)
            if line is not None:
                print(f"chla: {line}", file=sys.stderr, flush=True)
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """`python -m chla_train.entry RUN_DIR STAGE (--task I | --finalize) --fingerprint FP`
    (the local executor's way in; Slurm goes through StageJob)."""
    parser = argparse.ArgumentParser(prog="python -m chla_train.entry")
    parser.add_argument("run_dir")
    parser.add_argument("stage")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--finalize", action="store_true")
    parser.add_argument("--fingerprint", required=True)
    args = parser.parse_args(argv)
    try:
        if args.finalize:
            finalize(args.run_dir, args.stage, args.fingerprint)
        else:
            run_task(args.run_dir, args.stage, args.task, args.fingerprint)
    except ChlaError as error:
        print(f"chla: {error}", file=sys.stderr, flush=True)
        return 2
    except Exception as error:
        disk_full = disk_full_error(error, Path(args.run_dir), args.stage)
        if disk_full is None:
            traceback.print_exc()
        else:
            print(f"chla: {disk_full}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: a training stage's leftover threads (DeepSpeed, gloo) must not hold the exit.
    os._exit(code)
