"""Executors: where a chain's stages run. Each executor's module defines one subclass of `Executor` as
`EXECUTOR`; they are looked up by name (the recipe's `executor:`; chla_launcher.contract.executor_registry
lists the built-in ones and those installed through the `chla.executors` entry points), so submit,
status, logs and cancel never ask which executor they hold.

A submission (chla_launcher.submit) goes: `submit` queues the plan's stages so that none starts yet
and records every job id in the transaction as it exists; the run directory is switched to the new
chain; `release` lets the jobs start; `follow` is what chla-submit does then (the local executor
runs the chain, Slurm's returns at once). `live`, `cancel`, `statuses` and `log_files` read a committed chain.
"""

from __future__ import annotations

import importlib
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, TextIO

from ..contract.chain import Chain, StageRecord
from ..contract.errors import ChlaError
from ..contract.executor_registry import executor_modules

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
    """The executor class called `name`; only its module is imported (Slurm's imports submitit)."""
    modules = executor_modules()
    if name not in modules:
        raise ChlaError(f"unknown executor {name!r} (known: {', '.join(sorted(modules))})")
    executor = importlib.import_module(modules[name]).EXECUTOR
    if not (isinstance(executor, type) and issubclass(executor, Executor) and executor.name == name):
        raise TypeError(f"{modules[name]}.EXECUTOR is {executor!r}, not the Executor named {name!r}")
    return executor
