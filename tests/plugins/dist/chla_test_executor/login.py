"""The queuefile executor's login side: the local executor, whose tasks get this executor's own
variables and are started again only when their rank 0 asked this executor's queue for it
(chla_test_executor.job)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from chla_launcher.contract.job_environment import REQUEUE_EXIT_CODE
from chla_launcher.contract.recipe import ResolvedStage
from chla_launcher.executors.local import LocalExecutor

from .job import ATTEMPT_VARIABLE, QUEUE_VARIABLE
from .settings import QueueFileSettings


class QueueFileExecutor(LocalExecutor):
    name = "queuefile"

    def queue(self) -> Path:
        settings = self.recipe.model.executor_settings(self.name)
        assert isinstance(settings, QueueFileSettings)
        queue = self.run.path / settings.queue
        queue.mkdir(parents=True, exist_ok=True)
        return queue

    def task_environment(self, stage: ResolvedStage, *, attempt: str, **kwargs) -> dict[str, str]:
        env = super().task_environment(stage, attempt=attempt, **kwargs)
        self.attempt = f"{stage.name}.{attempt}"  # the same for every rank of one attempt
        return {**env, QUEUE_VARIABLE: str(self.queue()), ATTEMPT_VARIABLE: self.attempt}

    def _wait_all(self, ranks: list[subprocess.Popen[bytes]]) -> list[int]:
        codes = super()._wait_all(ranks)
        request = self.queue() / f"requeue-{self.attempt}"
        if codes and codes[0] == REQUEUE_EXIT_CODE:
            if not request.exists():
                return [1] * len(codes)  # asked to run again without asking this scheduler: a failure
            asked = request.read_text()
            request.unlink()
            (self.queue() / "preempt").unlink(missing_ok=True)
            with open(self.queue() / "requeued", "a") as log:
                log.write(f"{self.attempt}: {asked}")
        return codes
