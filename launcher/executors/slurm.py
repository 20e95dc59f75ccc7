"""Slurm executor: every stage of the plan queued up front through submitit, each with `afterok` on
its parents' jobs and kill-on-invalid-dependency, arrays through map_array (split when the count
exceeds MaxArraySize) plus a one-task finalize job, multi-node stages as nodes x tasks_per_node.
`chla-submit` returns as soon as the chain is queued."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import submitit

from ..errors import ChlaError
from ..graph import Plan
from ..recipe import ResolvedRecipe, ResolvedStage, Resources
from ..rundir import RunDir, now
from .. import slurm


class _SlurmExecutor(submitit.SlurmExecutor):
    """submitit's executor without its check for `srun` on PATH, so `--dry-run` can render the exact
    batch scripts on a machine without Slurm. Real submission checks for sbatch first."""

    @classmethod
    def affinity(cls) -> int:
        return 2


@dataclass
class StageSubmission:
    """The jobs of one stage: `job_ids` (one per submission; an array may be split in several),
    `finalize_job_id` for arrays; dependents wait for `final_ids`."""

    job_ids: list[str] = field(default_factory=list)
    finalize_job_id: str | None = None

    @property
    def final_ids(self) -> list[str]:
        return [self.finalize_job_id] if self.finalize_job_id else list(self.job_ids)


class SlurmChainSubmitter:
    def __init__(self, recipe: ResolvedRecipe, run: RunDir, *, dry_run: bool = False,
                 out: TextIO = sys.stdout) -> None:
        self.recipe, self.run, self.dry_run, self.out = recipe, run, dry_run, out
        self.settings = recipe.model.slurm
        self._submitted: list[str] = []

    def _executor(self, stage: ResolvedStage, dependency: list[str] | None, *, finalize: bool = False) -> _SlurmExecutor:
        resources = stage.resources
        if finalize:
            # Aggregation is light: one task, one CPU, the stage's time limit.
            resources = Resources(nodes=1, tasks_per_node=1, cpus_per_task=1, gpus_per_node=0,
                                  mem="2G", time=stage.resources.time)
        executor = _SlurmExecutor(folder=self.run.logs_dir(stage.name), python=self.settings.python,
                                  max_num_timeout=self.settings.max_requeues)
        name = f"chla/{self.recipe.name}/{stage.name}"
        executor.update_parameters(**slurm.sbatch_parameters(name, resources, self.settings, dependency))
        return executor

    def _script(self, executor: _SlurmExecutor, map_count: int | None) -> str:
        if map_count is not None:
            executor.parameters["map_count"] = map_count
        try:
            return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
        finally:
            executor.parameters.pop("map_count", None)

    def submit(self, plan: Plan, active: dict[str, StageSubmission] | None = None) -> dict[str, StageSubmission]:
        """Queue every stage of `plan.run`; `active` holds stages still queued or running from an
        earlier submission with the same fingerprint: they are waited on, not submitted again."""
        from chla_train.entry import StageJob  # light: the job entry imports no torch

        if not self.dry_run:
            slurm.require_slurm()
        active = active or {}
        submitted: dict[str, StageSubmission] = {}
        job = StageJob()
        run_dir = str(self.run.path)
        try:
            for name in plan.run:
                stage = self.recipe.stages[name]
                fingerprint = plan.fingerprints[name]
                if name in active:
                    submitted[name] = active[name]
                    self._say(f"{name}: still queued from the earlier submission (jobs "
                              f"{', '.join(active[name].job_ids)}), not submitted again")
                    continue
                dependency: list[str] = []
                for parent in stage.after:
                    if parent in submitted:
                        dependency += submitted[parent].final_ids
                    elif self.dry_run and parent in plan.run:
                        dependency.append(f"<{parent}>")
                record = StageSubmission()
                executor = self._executor(stage, dependency)
                if self.dry_run:
                    self._print_script(name, executor, stage)
                    record.job_ids = [f"<{name}>"]
                    if stage.array is not None:
                        record.finalize_job_id = f"<{name}:finalize>"
                        fin = self._executor(stage, [f"<{name}>"], finalize=True)
                        self._say(f"# --- {name}: finalize (after every task) ---")
                        self._say(self._script(fin, None))
                    submitted[name] = record
                    continue
                if stage.array is None:
                    record.job_ids = [executor.submit(job, run_dir, name, 0, fingerprint).job_id]
                    self._submitted += record.job_ids
                else:
                    chunk = self._array_chunk()
                    for start in range(0, stage.array, chunk):
                        indices = list(range(start, min(stage.array, start + chunk)))
                        executor.update_parameters(array_parallelism=min(len(indices), 1000))
                        jobs = executor.map_array(job, [run_dir] * len(indices), [name] * len(indices),
                                                  indices, [fingerprint] * len(indices))
                        record.job_ids.append(jobs[0].job_id.split("_")[0])
                        self._submitted.append(record.job_ids[-1])
                    fin = self._executor(stage, record.job_ids, finalize=True)
                    record.finalize_job_id = fin.submit(job, run_dir, name, -1, fingerprint, True).job_id
                    self._submitted.append(record.finalize_job_id)
                submitted[name] = record
                deps = f" after {', '.join(dependency)}" if dependency else ""
                self._say(f"queued {name}: job {', '.join(record.job_ids)}"
                          + (f" (+ finalize {record.finalize_job_id})" if record.finalize_job_id else "") + deps)
        except submitit.core.utils.FailedJobError as error:
            self._rollback()
            raise ChlaError(f"sbatch refused a job: {str(error).strip().splitlines()[-1]}") from None
        except Exception as error:
            if self.dry_run or isinstance(error, ChlaError):
                raise
            self._rollback()
            lines = str(error).strip().splitlines()
            raise ChlaError(f"submission failed, nothing left queued: {lines[-1] if lines else error!r}") from None
        return submitted

    def _rollback(self) -> None:
        """A chain is queued whole or not at all."""
        if self._submitted:
            try:
                slurm.cancel_jobs(self._submitted)
            except ChlaError:
                pass

    def _print_script(self, name: str, executor: _SlurmExecutor, stage: ResolvedStage) -> None:
        shape = (f"array of {stage.array}" if stage.array is not None
                 else f"{stage.resources.nodes} node(s) x {stage.resources.tasks_per_node} task(s)")
        self._say(f"# --- {name} ({stage.kind.name}, {shape}) ---")
        if stage.array is None:
            self._say(self._script(executor, None))
            return
        chunk = self._array_chunk()
        for start in range(0, stage.array, chunk):
            count = min(stage.array, start + chunk) - start
            executor.parameters["array_parallelism"] = min(count, 1000)
            self._say(self._script(executor, count))

    def _array_chunk(self) -> int:
        return max(1, min(self.settings.array_chunk or slurm.max_array_size(), slurm.max_array_size()))

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def chain_records(submitted: dict[str, StageSubmission], plan: Plan) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for name in plan.order:
        if name in submitted:
            record = submitted[name]
            stages[name] = {"fingerprint": plan.fingerprints[name], "job_ids": record.job_ids,
                            "finalize_job_id": record.finalize_job_id, "submitted_at": now(),
                            "skipped": False}
    return stages


def active_submissions(run: RunDir, plan: Plan) -> dict[str, StageSubmission]:
    """Stages of the previous Slurm submission that are still queued or running with the same
    fingerprint, so resubmitting does not queue them twice."""
    chain = run.read_chain()
    if chain.get("executor") != "slurm":
        return {}
    previous = {name: rec for name, rec in chain.get("stages", {}).items()
                if not rec.get("skipped") and rec.get("job_ids") and name in plan.run}
    ids = [i for rec in previous.values() for i in rec["job_ids"] + ([rec["finalize_job_id"]] if rec.get("finalize_job_id") else [])]
    if not ids:
        return {}
    table = slurm.query_jobs(ids)
    active: dict[str, StageSubmission] = {}
    for name, rec in previous.items():
        job_ids = rec["job_ids"] + ([rec["finalize_job_id"]] if rec.get("finalize_job_id") else [])
        states = [r.state for job_id in job_ids for r in table.for_job(job_id)]
        if not any(s in slurm.ACTIVE_STATES for s in states):
            continue
        if rec.get("fingerprint") != plan.fingerprints[name] or any(s in {"FAILED", "CANCELLED"} for s in states):
            raise ChlaError(f"stage {name} still has queued or running jobs ({', '.join(job_ids)}) from an "
                            f"earlier submission; wait for them or `chla cancel {run.path}` first")
        active[name] = StageSubmission(job_ids=rec["job_ids"], finalize_job_id=rec.get("finalize_job_id"))
    return active


def submission_files(run: RunDir, stage: str) -> list[Path]:
    return sorted(run.logs_dir(stage).glob("*_submission.sh"))
