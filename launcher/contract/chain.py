"""chain.json: what the last committed submission of a run queued, typed.

    {"name", "executor", "submitted_at", "recipe_source", "run_dir",
     "pid", "host",            the process that submitted (for a local run: the one running it)
     "pid_started",            its start time (clock ticks since boot), so a reused pid is not it
     "finished_at",            a local run that has ended
     "stages": {stage: {"fingerprint", "skipped", "job_ids", "finalize_job_id", "submitted_at"}}}

Only a submission's switch (chla_launcher.transaction) and the local executor that runs the chain
write it; jobs never do. Stages appear in the plan's order.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import atomic


@dataclass
class StageRecord:
    """One stage of a submission. `skipped`: already finished with this fingerprint when the chain
    was submitted (its job ids, if any, are those of the submission that ran it)."""

    fingerprint: str
    skipped: bool = False
    job_ids: list[str] = field(default_factory=list)
    finalize_job_id: str | None = None  # an array stage's one-task aggregation job
    submitted_at: str | None = None

    @property
    def all_job_ids(self) -> list[str]:
        return self.job_ids + ([self.finalize_job_id] if self.finalize_job_id else [])

    @property
    def final_ids(self) -> list[str]:
        """The jobs that dependents wait for."""
        return [self.finalize_job_id] if self.finalize_job_id else list(self.job_ids)


@dataclass
class Chain:
    name: str
    executor: str
    run_dir: str
    submitted_at: str | None = None
    recipe_source: str | None = None
    pid: int | None = None
    host: str | None = None
    pid_started: int | None = None
    finished_at: str | None = None
    stages: dict[str, StageRecord] = field(default_factory=dict)

    # --- reading and writing ------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Chain:
        known = {"fingerprint", "skipped", "job_ids", "finalize_job_id", "submitted_at"}
        stages = {}
        for name, record in (data.get("stages") or {}).items():
            record = {key: value for key, value in record.items() if key in known}
            record.setdefault("fingerprint", "")
            record["job_ids"] = [str(job_id) for job_id in record.get("job_ids") or []]
            stages[name] = StageRecord(**record)
        return cls(
            name=data.get("name", ""),
            executor=data.get("executor", "local"),
            run_dir=data.get("run_dir", ""),
            submitted_at=data.get("submitted_at"),
            recipe_source=data.get("recipe_source"),
            pid=data.get("pid"),
            host=data.get("host"),
            pid_started=data.get("pid_started"),
            finished_at=data.get("finished_at"),
            stages=stages,
        )

    def to_json(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if value is not None}
        data["stages"] = {name: asdict(record) for name, record in self.stages.items()}
        return data

    @classmethod
    def read(cls, path: Path) -> Chain | None:
        data = atomic.read_json(path)
        return cls.from_json(data) if isinstance(data, dict) else None

    def write(self, path: Path) -> None:
        atomic.write_json(path, self.to_json())

    # --- questions callers ask ----------------------------------------------------------------
    def submitted(self) -> dict[str, StageRecord]:
        """The stages this submission queued or ran (not the skipped ones)."""
        return {name: record for name, record in self.stages.items() if not record.skipped}

    def job_ids(self) -> list[str]:
        return [job_id for record in self.submitted().values() for job_id in record.all_job_ids]

    @property
    def on_this_host(self) -> bool:
        return self.host in (None, socket.gethostname())
