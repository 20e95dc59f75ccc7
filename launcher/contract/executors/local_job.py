"""The local executor's job side: a task started by chla_launcher.executors.local, which sets
torch.distributed's own variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
MASTER_ADDR, MASTER_PORT) and ATTEMPT_VARIABLE in each rank's environment. Also the job side of a
process that no executor started (benchmarks, tests' ranks, torchrun), which sets the same ones.

A stop signal comes from chla-submit cancelling or from a test preempting: either way the task
saves and asks to run again by exiting with REQUEUE_EXIT_CODE; the local executor restarts it
unless the run is being cancelled."""

from __future__ import annotations

import os

from ..job_environment import JobEnvironment

# Names one attempt of a task (local-<chla-submit pid>-<task>-<requeues>), set by the login side.
ATTEMPT_VARIABLE = "CHLA_LOCAL_ATTEMPT"


class LocalJobEnvironment(JobEnvironment):
    name = "local"

    def _int(self, key: str, default: int) -> int:
        return int(self.environ.get(key, default))

    @property
    def rank(self) -> int:
        return self._int("RANK", 0)

    @property
    def world_size(self) -> int:
        return self._int("WORLD_SIZE", 1)

    @property
    def local_rank(self) -> int:
        return self._int("LOCAL_RANK", 0)

    @property
    def local_world_size(self) -> int:
        return self._int("LOCAL_WORLD_SIZE", 1)

    @property
    def node_rank(self) -> int:
        return self._int("GROUP_RANK", 0)

    @property
    def num_nodes(self) -> int:
        # The "nodes" of a local run all share this machine: as many as the ranks fill.
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def master_addr(self) -> str:
        return self.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def master_port(self) -> int:
        return self._int("MASTER_PORT", 29500)

    @property
    def job_id(self) -> str | None:
        return None

    @property
    def attempt(self) -> str:
        return self.environ.get(ATTEMPT_VARIABLE) or f"local-{os.getppid()}"

    def being_preempted(self) -> bool | None:
        return True  # the local executor restarts whatever asks, unless it is cancelling the run

    def requeue(self) -> None:
        pass  # the exit status asks for it
