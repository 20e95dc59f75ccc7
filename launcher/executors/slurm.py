"""Slurm executor: every stage of the plan queued up front through submitit, held, each with
`afterok` on its parents' jobs and kill-on-invalid-dependency, arrays through map_array (split when
the count exceeds MaxArraySize) plus a one-task finalize job, multi-node stages as nodes x
tasks_per_node. The jobs are released once the submission is committed; `chla-submit` returns as
soon as the chain is queued."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import submitit

from .. import slurm
from ..contract.chain import Chain, StageRecord
from ..contract.errors import ChlaError
from ..contract.recipe import ResolvedRecipe, ResolvedStage, Resources
from ..contract.rundir import CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, UNKNOWN, now
from ..graph import Plan
from . import Executor, JobRecorder, JobStatus


class _SubmititExecutor(submitit.SlurmExecutor):
    """submitit's executor without its check for `srun` on PATH, so `--dry-run` can render the exact
    batch scripts on a machine without Slurm. Real submission checks for sbatch first."""

    @classmethod
    def affinity(cls) -> int:
        return 2


class SlurmExecutor(Executor):
    name = "slurm"
    detached = True

    # --- submission ---------------------------------------------------------------------------
    def dry_run(self, recipe: ResolvedRecipe, plan: Plan) -> None:
        self._say("\n# Batch scripts exactly as they would be submitted (job ids of parents shown as <stage>):")
        for name in plan.run:
            stage = recipe.stages[name]
            dependency = [
                f"<{parent}:finalize>" if recipe.stages[parent].array is not None else f"<{parent}>"
                for parent in stage.after
                if parent in plan.run
            ]
            self._print_script(recipe, stage, self._submitit(recipe, stage, dependency))
            if stage.array is not None:
                self._say(f"# --- {name}: finalize (after every task) ---")
                self._say(self._script(self._submitit(recipe, stage, [f"<{name}>"], finalize=True), None))

    def submit(self, recipe: ResolvedRecipe, plan: Plan, transaction: JobRecorder) -> dict[str, StageRecord]:
        from chla_train.entry import StageJob  # light: the job entry imports no torch

        slurm.require_slurm()
        records: dict[str, StageRecord] = {}
        job = StageJob()
        run_dir = str(self.run.path)
        for name in plan.run:
            stage = recipe.stages[name]
            fingerprint = plan.fingerprints[name]
            dependency = [job_id for parent in stage.after if parent in records for job_id in records[parent].final_ids]
            record = StageRecord(fingerprint=fingerprint, submitted_at=now())
            records[name] = record
            executor = self._submitit(recipe, stage, dependency)
            try:
                if stage.array is None:
                    record.job_ids = [executor.submit(job, run_dir, name, 0, fingerprint).job_id]
                    transaction.record_jobs(record.job_ids)
                else:
                    chunk = self._array_chunk(recipe)
                    for start in range(0, stage.array, chunk):
                        indices = list(range(start, min(stage.array, start + chunk)))
                        executor.update_parameters(array_parallelism=min(len(indices), 1000))
                        jobs = executor.map_array(
                            job, [run_dir] * len(indices), [name] * len(indices), indices, [fingerprint] * len(indices)
                        )
                        record.job_ids.append(jobs[0].job_id.split("_")[0])
                        transaction.record_jobs(record.job_ids[-1:])
                    finalize = self._submitit(recipe, stage, record.job_ids, finalize=True)
                    record.finalize_job_id = finalize.submit(job, run_dir, name, -1, fingerprint, True).job_id
                    transaction.record_jobs([record.finalize_job_id])
            except submitit.core.utils.FailedJobError as error:
                lines = str(error).strip().splitlines()
                raise ChlaError(
                    f"sbatch refused stage {name}: {lines[-1] if lines else error!r}; the submission was rolled back"
                ) from None
            except OSError as error:
                raise ChlaError(f"submitting stage {name} failed: {error}; the submission was rolled back") from None
            deps = f" after {', '.join(dependency)}" if dependency else ""
            self._say(
                f"queued {name}: job {', '.join(record.job_ids)}"
                + (f" (+ finalize {record.finalize_job_id})" if record.finalize_job_id else "")
                + deps
            )
        return records

    def release(self, chain: Chain) -> None:
        slurm.release_jobs(chain.job_ids())

    def follow(self, recipe: ResolvedRecipe, plan: Plan, chain: Chain) -> int:
        self._say(f"queued. Follow it with: chla status {self.run.path} --watch")
        return 0

    # --- a committed chain --------------------------------------------------------------------
    def live(self, chain: Chain) -> dict[str, list[str]]:
        ids = chain.job_ids()
        if not ids:
            return {}
        queued = slurm.queued_jobs(ids)
        table = slurm.query_jobs(ids)
        live: dict[str, list[str]] = {}
        for name, record in chain.submitted().items():
            for job_id in record.all_job_ids:
                records = table.for_job(job_id)
                # sacct lags the queue by seconds: a job it does not list yet may well be queued.
                if job_id in queued or not records or any(r.state in slurm.ACTIVE_STATES for r in records):
                    live.setdefault(name, []).append(job_id)
        return live

    def cancel(self, chain: Chain, *, wait_s: float = 0) -> list[str]:
        ids = sorted({job_id for ids in self.live(chain).values() for job_id in ids})
        if not ids:
            return []
        slurm.cancel_jobs(ids)
        deadline = time.monotonic() + wait_s
        while wait_s and slurm.queued_jobs(ids):
            if time.monotonic() > deadline:
                raise ChlaError(
                    f"jobs {', '.join(slurm.queued_jobs(ids))} are still queued {wait_s:.0f}s after scancel"
                )
            time.sleep(0.5)
        return ids

    def cancel_uncommitted(self, job_ids: list[str], chain: Chain | None) -> list[str]:
        committed = set(chain.job_ids()) if chain else set()
        found = set(job_ids) | set(slurm.queued_from(str(self.run.path)))
        doomed = sorted(found - committed)
        if doomed:
            try:
                slurm.cancel_jobs(doomed)
            except ChlaError:
                pass  # some had already gone
        for logs in self.run.path.glob("*/logs"):
            for job_id in doomed:
                for path in logs.glob(f"{job_id}_*"):
                    path.unlink(missing_ok=True)
            # submitit's files of an sbatch it never saw return: the script it left under its
            # temporary name (a symlink once the job id is known) and the call's pickle.
            for path in logs.glob(".submission_file_*.sh"):
                if not path.is_symlink() or not path.exists():
                    path.unlink()
            for path in logs.glob("*.pkl"):
                if re.fullmatch(r"[0-9a-f]{32}\.pkl", path.name):
                    path.unlink()
        return doomed

    def statuses(self, chain: Chain) -> dict[str, JobStatus]:
        ids = chain.job_ids()
        table = slurm.query_jobs(ids)
        queued = slurm.queued_jobs(ids) if ids else {}
        result: dict[str, JobStatus] = {}
        for name, record in chain.submitted().items():
            if record.job_ids:
                result[name] = _stage_status(record, table, queued)
        return result

    def log_files(self, chain: Chain, stage: str, task: int, rank: int) -> list[Path]:
        """submitit writes <job>_<rank>_log.out/.err, and <array job>_<task>_<rank>_log.out/.err."""
        logs = self.run.logs_dir(stage)
        record = chain.stages.get(stage)
        if record is None or not logs.is_dir():
            return []
        found: list[Path] = []
        for job_id in record.job_ids:
            found += logs.glob(f"{job_id}_{rank}_log.*")  # plain job: task is always 0
            found += logs.glob(f"{job_id}_{task}_{rank}_log.*")  # array job
        if task == -1 and record.finalize_job_id:
            found += logs.glob(f"{record.finalize_job_id}_0_log.*")
        return sorted(set(found), key=lambda p: (p.stat().st_mtime, p.name))

    # ------------------------------------------------------------------------------------------
    def _submitit(
        self, recipe: ResolvedRecipe, stage: ResolvedStage, dependency: list[str], *, finalize: bool = False
    ) -> _SubmititExecutor:
        settings = recipe.model.slurm
        resources = stage.resources
        if finalize:
            # Aggregation is light: one task, one CPU, the stage's time limit.
            resources = Resources(
                nodes=1, tasks_per_node=1, cpus_per_task=1, gpus_per_node=0, mem="2G", time=stage.resources.time
            )
        # submitit puts `python` on the srun line as it is: a path with a space must be quoted.
        python = shlex.quote(settings.python) if settings.python else None
        executor = _SubmititExecutor(
            folder=self.run.logs_dir(stage.name), python=python, max_num_timeout=settings.max_requeues
        )
        name = f"chla/{recipe.name}/{stage.name}"
        executor.update_parameters(**slurm.sbatch_parameters(name, resources, settings, dependency))
        return executor

    def _script(self, executor: _SubmititExecutor, map_count: int | None) -> str:
        if map_count is not None:
            executor.parameters["map_count"] = map_count
        try:
            return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
        finally:
            executor.parameters.pop("map_count", None)

    def _print_script(self, recipe: ResolvedRecipe, stage: ResolvedStage, executor: _SubmititExecutor) -> None:
        shape = (
            f"array of {stage.array}"
            if stage.array is not None
            else f"{stage.resources.nodes} node(s) x {stage.resources.tasks_per_node} task(s)"
        )
        self._say(f"# --- {stage.name} ({stage.kind.name}, {shape}) ---")
        if stage.array is None:
            self._say(self._script(executor, None))
            return
        chunk = self._array_chunk(recipe)
        for start in range(0, stage.array, chunk):
            count = min(stage.array, start + chunk) - start
            executor.parameters["array_parallelism"] = min(count, 1000)
            self._say(self._script(executor, count))

    @staticmethod
    def _array_chunk(recipe: ResolvedRecipe) -> int:
        chunk = recipe.model.slurm.array_chunk or slurm.max_array_size()
        return max(1, min(chunk, slurm.max_array_size()))


def _stage_status(record: StageRecord, table: slurm.JobTable, queued: dict[str, str]) -> JobStatus:
    """One stage's state from sacct, or from squeue for jobs sacct does not list yet."""
    records = [r for job_id in record.job_ids for r in table.for_job(job_id)]
    finalize = table.for_job(record.finalize_job_id) if record.finalize_job_id else []
    every = records + finalize
    status = JobStatus(state=UNKNOWN, job_ids=list(record.job_ids))
    states = {r.state for r in every} | {queued[i] for i in record.all_job_ids if i in queued}
    for candidate in (FAILED, CANCELLED, RUNNING, PENDING, COMPLETED):
        if candidate in states:
            status.state = candidate
            break
    status.restarts = max((r.restarts for r in every), default=0)
    elapsed = [r.elapsed for r in records if r.elapsed]
    status.elapsed = max(elapsed) if elapsed else ""
    if status.state == COMPLETED:
        status.state = RUNNING  # every job ended well but the DONE marker is not there (yet)
    bad = [r for r in every if r.state in (FAILED, CANCELLED)]
    if bad:
        first = bad[0]
        status.job_ids = sorted({*status.job_ids, first.job_id})
        status.reason = f"job {first.job_id} {first.slurm_state} exit {first.exit_code}".strip()
        if first.reason and first.reason not in ("None", ""):
            status.reason += f" ({first.reason})"
    elif status.state == PENDING:
        reasons = [r.reason for r in every if r.state == PENDING and r.reason and r.reason != "None"]
        if reasons:
            status.reason = reasons[0]
    return status


EXECUTOR = SlurmExecutor
