"""The job side of an executor: what a running task learns from the scheduler that started it, and
how it hands itself back (modelled on submitit's JobEnvironment, one per executor).

Each executor supplies a subclass of `JobEnvironment` (chla_launcher.contract.executor_registry
names it); chla_train asks `current_job_environment()` and never reads a scheduler's variables
itself. Which executor started the task travels in one variable, CHLA_EXECUTOR, set by the login
side (the local executor in each task's environment, Slurm's job through the pickled StageJob);
a process started some other way (a benchmark, a test's ranks, torchrun) gets the local
executor's, which reads torch.distributed's own variables.

A job environment imports nothing beyond the contract and the standard library: it is loaded in
every task, before torch, and must not pull in its login side (submitit, sacct's parsing).
"""

from __future__ import annotations

import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

from .executor_registry import DEFAULT_JOB_EXECUTOR, executor_plugin

# Exit status with which a task asks to be started again: the local executor restarts a task
# that ends with it, and a Slurm task that requeued its job leaves with it too.
REQUEUE_EXIT_CODE = 75

# The executor that started this task (its registered name), set by the login side.
EXECUTOR_VARIABLE = "CHLA_EXECUTOR"


class JobEnvironment(ABC):
    """One task of one job, as its executor describes it. Built from a mapping of environment
    variables (os.environ by default) so that tests can describe any task."""

    name: ClassVar[str]
    # The signals with which the scheduler asks a task to stop (preemption, time limit, cancel).
    stop_signals: ClassVar[tuple[signal.Signals, ...]] = (signal.SIGTERM, signal.SIGUSR2)
    # True where the other ranks must not leave before rank 0 has requeued the job (Slurm: srun
    # --kill-on-bad-exit kills a step when one rank exits non-zero, rank 0 with it); False where
    # each rank's own exit status asks for the restart (the local executor).
    ranks_wait_for_requeue: ClassVar[bool] = False
    # True where USR2 is the job runner's own signal to requeue (submitit's handler, installed
    # before the task starts, requeues the job and counts time-outs): the task then passes USR2
    # on to that handler instead of requeueing itself.
    runner_handles_usr2: ClassVar[bool] = False

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ: Mapping[str, str] = os.environ if environ is None else environ

    # --- who this task is ---------------------------------------------------------------------
    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def world_size(self) -> int: ...

    @property
    @abstractmethod
    def local_rank(self) -> int: ...

    @property
    @abstractmethod
    def local_world_size(self) -> int: ...

    @property
    @abstractmethod
    def node_rank(self) -> int: ...

    @property
    @abstractmethod
    def num_nodes(self) -> int: ...

    @property
    @abstractmethod
    def master_addr(self) -> str: ...

    @property
    @abstractmethod
    def master_port(self) -> int: ...

    @property
    @abstractmethod
    def job_id(self) -> str | None:
        """The scheduler's id of this job (None where the executor has no job ids)."""

    @property
    @abstractmethod
    def attempt(self) -> str:
        """Names this attempt of the task, the same on all its ranks and different after every
        requeue: what one attempt writes never mixes with the files of the one it replaces."""

    # --- being stopped ------------------------------------------------------------------------
    @abstractmethod
    def being_preempted(self) -> bool | None:
        """After a stop signal: does the scheduler want the job back (requeue it) rather than end
        it (cancelled, out of time)? None where that cannot be told now (the task then waits for
        the scheduler to end it)."""

    @abstractmethod
    def requeue(self) -> None:
        """Called on rank 0 once the task has saved what it can, when being_preempted() said so:
        put the job back into the queue (raise ChlaError where that failed). Every rank then ends
        with REQUEUE_EXIT_CODE."""


def current_job_environment(environ: Mapping[str, str] | None = None) -> JobEnvironment:
    """The job environment of the executor that started this task (CHLA_EXECUTOR)."""
    env = os.environ if environ is None else environ
    name = env.get(EXECUTOR_VARIABLE) or DEFAULT_JOB_EXECUTOR
    plugin = executor_plugin(name)
    environment = plugin.job_environment_class()
    if not (isinstance(environment, type) and issubclass(environment, JobEnvironment)):
        raise TypeError(f"{plugin.job_environment} is {environment!r}, not a JobEnvironment")
    return environment(env)
