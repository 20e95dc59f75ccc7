"""Executors: where a chain's stages run. An executor has two sides and its own settings, each a
part that chla_launcher.contract.executor_registry names ("module:attribute") and imports only
when wanted, so submit, status, logs, cancel and a running task never ask which executor they hold:

    login side       a subclass of `Executor` (below): queue the plan, release, follow, cancel,
                     statuses, log files (this package: local.py; slurm.py with slurm_commands.py,
                     Slurm's vocabulary: sacct, squeue, scancel, sbatch parameters, batch script)
    job side         a subclass of chla_launcher.contract.job_environment.JobEnvironment: rank,
                     world size, master address and port, attempt, whether a stop signal means
                     requeue, and how to requeue (chla_launcher.contract.executors: local_job.py,
                     slurm_job.py). chla_train asks current_job_environment(), which loads the one
                     named by CHLA_EXECUTOR, set by the login side (the local executor in each
                     task's environment, Slurm's job through the pickled StageJob)
    settings         a subclass of chla_launcher.contract.executor_settings.ExecutorSettings, or
                     none: the recipe's top-level block named after the executor (`slurm:`)

Adding an executor: a package of your own with the three parts (the job side and the settings may
import only the contract: every task loads them, before torch) and a module that declares them as
an ExecutorPlugin, registered under the `chla.executors` entry-point group:

    [project.entry-points."chla.executors"]
    myexec = "myexec:PLUGIN"    # PLUGIN = ExecutorPlugin(name="myexec", login=..., job_environment=..., settings=...)

No file of chla changes (tests/plugins/dist/chla_test_executor is one, which subclasses the local
executor and adds its own task variables through LocalExecutor.task_environment). A built-in one
is the same three parts, listed in the registry's BUILT_IN.

A submission (chla_launcher.submit) goes: `submit` queues the plan's stages so that none starts yet
and records every job id in the transaction as it exists; the run directory is switched to the new
chain; `release` lets the jobs start; `follow` is what chla-submit does then (the local executor
runs the chain, Slurm's returns at once). `live`, `cancel`, `statuses` and `log_files` read a committed chain.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, TextIO

from ..contract.chain import Chain, StageRecord
from ..contract.executor_registry import executor_plugin

if TYPE_CHECKING:
    from ..contract.recipe import ResolvedRecipe
    from ..contract.rundir import RunDir
    from ..graph import Plan


class JobRecorder(Protocol):
    """Where an executor records each job id as soon as it exists (the submission transaction,
    chla_launcher.transaction, which sits above the executors and cancels them if it fails)."""

    def record_jobs(self, job_ids: list[str]) -> None: ...


@dataclass
class JobStatus:
    """What an executor knows about one stage of a chain beyond the run directory."""

    state: str
    job_ids: list[str] = field(default_factory=list)
    restarts: int = 0
    elapsed: str = ""
    reason: str = ""


class Executor(ABC):
    name: ClassVar[str]
    # True when the chain runs without chla-submit (Slurm): jobs queued by a submission that dies
    # half-way must be found and cancelled by someone else (the transaction's guardian).
    detached: ClassVar[bool]

    def __init__(self, run: RunDir, out: TextIO | None = None) -> None:
        self.run = run
        self.out = out if out is not None else sys.stdout

    # --- submission ---------------------------------------------------------------------------
    @abstractmethod
    def dry_run(self, recipe: ResolvedRecipe, plan: Plan) -> None:
        """Print what submit() would queue, exactly; queue and write nothing."""

    @abstractmethod
    def submit(self, recipe: ResolvedRecipe, plan: Plan, transaction: JobRecorder) -> dict[str, StageRecord]:
        """Queue every stage of plan.run so that none starts before release(), calling
        transaction.record_jobs() with each job id as soon as it exists; the stages' records of
        the chain to commit."""

    def release(self, chain: Chain) -> None:  # noqa: B027 (optional hook: a no-op where nothing is held)
        """Let the jobs of a committed chain start (nothing to do where nothing was queued)."""

    @abstractmethod
    def follow(self, recipe: ResolvedRecipe, plan: Plan, chain: Chain) -> int:
        """What chla-submit does once the chain is committed and the lock released: the local
        executor runs the chain here; Slurm's says how to follow it. chla-submit's exit status."""

    # --- a committed chain --------------------------------------------------------------------
    @abstractmethod
    def live(self, chain: Chain) -> dict[str, list[str]]:
        """Stage -> what of it is still queued or running (job ids, or a process description)."""

    @abstractmethod
    def cancel(self, chain: Chain, *, wait_s: float = 0) -> list[str]:
        """Stop whatever of the chain is queued or running; with wait_s, wait until it is gone."""

    def cancel_uncommitted(self, job_ids: list[str], chain: Chain | None) -> list[str]:
        """Cancel the jobs of a submission that was never committed: `job_ids` it recorded, and
        any other job it queued that is not part of the committed `chain`."""
        return []

    @abstractmethod
    def statuses(self, chain: Chain) -> dict[str, JobStatus]:
        """Stage -> its state as the executor sees it; stages it knows nothing about are left out."""

    @abstractmethod
    def log_files(self, chain: Chain, stage: str, task: int, rank: int) -> list[Path]:
        """The log files of one task (task -1: an array's finalize) and rank, oldest first."""

    def _say(self, text: str) -> None:
        try:
            print(text, file=self.out, flush=True)
        except OSError:  # the terminal went away (SIGHUP): the run goes on without it
            pass


@cache
def executor_named(name: str) -> type[Executor]:
    """The login side of the executor called `name`; only its module is imported (Slurm's imports
    submitit)."""
    executor = executor_plugin(name).login_class()
    if not (isinstance(executor, type) and issubclass(executor, Executor) and executor.name == name):
        raise TypeError(f"{executor_plugin(name).login} is {executor!r}, not the Executor named {name!r}")
    return executor
