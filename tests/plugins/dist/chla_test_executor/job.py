"""The queuefile executor's job side: the local executor's ranks (torch.distributed's variables),
with this executor's own attempt names, preemption notice and requeue requests."""

from __future__ import annotations

from pathlib import Path

from chla_launcher.contract.executors.local_job import LocalJobEnvironment

QUEUE_VARIABLE = "QUEUEFILE_DIR"
ATTEMPT_VARIABLE = "QUEUEFILE_ATTEMPT"


class QueueFileJobEnvironment(LocalJobEnvironment):
    name = "queuefile"

    @property
    def queue(self) -> Path:
        return Path(self.environ[QUEUE_VARIABLE])

    @property
    def job_id(self) -> str | None:
        return f"qf-{self.attempt.split('.')[0]}"

    @property
    def attempt(self) -> str:
        return self.environ[ATTEMPT_VARIABLE]

    def being_preempted(self) -> bool | None:
        return (self.queue / "preempt").exists()

    def requeue(self) -> None:
        (self.queue / f"requeue-{self.attempt}").write_text(f"job {self.job_id} rank {self.rank}\n")
