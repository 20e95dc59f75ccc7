"""Progress of running tasks: written by the jobs, read by the local executor's live bars and by
`chla status --watch`.

A task that does long work (a training stage's optimizer steps, pre-tokenization's pieces, a
merge's bytes) reports `done` of `total` in its unit, with a few figures (loss, tokens/s), to
<stage>/progress/task-<index>.json: one small JSON file replaced atomically, at most twice a second,
so that a reader on the login node (or the local executor) never sees half a file and the job
spends nothing measurable on it. The job's log keeps its own periodic lines; this is for eyes.

Torch-free: jobs and the launcher both import it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from .atomic import write_json

PROGRESS_DIR = "progress"
MIN_INTERVAL_S = 0.5


@dataclass
class TaskProgress:
    stage: str
    task: int
    done: float
    total: float
    unit: str
    started: float  # epoch seconds when this attempt's counting began
    updated: float
    start_done: float = 0.0  # where a resumed attempt began (its rate counts from there)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds to go at this attempt's average rate so far."""
        counted, seconds = self.done - self.start_done, self.updated - self.started
        if counted <= 0 or seconds <= 0 or self.done >= self.total:
            return None
        return (self.total - self.done) * seconds / counted

    def describe(self) -> str:
        """ "step 120/240 loss 3.2100 4,512 tok/s ETA 0:01:02"."""
        unit = {"steps": "step", "bytes": "GB"}.get(self.unit, self.unit)
        if self.unit == "bytes":
            text = f"{self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB"
        else:
            text = f"{unit} {self.done:,.0f}/{self.total:,.0f}"
        if "loss" in self.figures:
            text += f" loss {self.figures['loss']:.4f}"
        if "tokens_per_s" in self.figures:
            text += f" {self.figures['tokens_per_s']:,.0f} tok/s"
        eta = self.eta_s
        if eta is not None:
            text += f" ETA {format_seconds(eta)}"
        return text


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressWriter:
    """One task's progress file. `update` is cheap to call every step: it writes at most every
    MIN_INTERVAL_S (and always the last update, on `close`)."""

    def __init__(
        self, stage_dir: str | Path, stage: str, task: int, *, total: float, unit: str, start_done: float = 0.0
    ) -> None:
        self.path = Path(stage_dir) / PROGRESS_DIR / f"task-{max(task, 0)}.json"
        now = time.time()
        self.progress = TaskProgress(
            stage=stage,
            task=max(task, 0),
            done=start_done,
            total=total,
            unit=unit,
            started=now,
            updated=now,
            start_done=start_done,
        )
        self._written = 0.0
        if total:  # a writer that learns its total later writes with its first update
            self._flush()

    def update(self, done: float, total: float | None = None, **figures: Any) -> None:
        self.progress.done = done
        if total is not None:
            self.progress.total = total
        self.progress.updated = time.time()
        self.progress.figures.update({k: v for k, v in figures.items() if v is not None})
        if self.progress.updated - self._written >= MIN_INTERVAL_S:
            self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        self._written = time.time()
        try:
            write_json(self.path, self.progress.__dict__)
        except OSError:
            pass  # progress is for eyes; a full or read-only disk must not stop the work


class _Rank(Protocol):
    @property
    def rank(self) -> int: ...


class RunningTask(Protocol):
    """What progress needs of a job's task (chla_train's StageContext is one)."""

    @property
    def stage_dir(self) -> Path: ...
    @property
    def stage(self) -> str: ...
    @property
    def task_index(self) -> int: ...
    @property
    def dist(self) -> _Rank: ...


def progress_writer(ctx: RunningTask, *, total: float, unit: str, start_done: float = 0.0) -> ProgressWriter | None:
    """The writer for a job's task (rank 0 only; None for the other ranks)."""
    if ctx.dist.rank != 0:
        return None
    return ProgressWriter(ctx.stage_dir, ctx.stage, ctx.task_index, total=total, unit=unit, start_done=start_done)


def read_progress(stage_dir: str | Path) -> list[TaskProgress]:
    """Every task's latest progress in a stage directory (files that do not parse are skipped:
    a reader may race a writer on a file system without atomic rename)."""
    found = []
    for path in sorted((Path(stage_dir) / PROGRESS_DIR).glob("task-*.json")):
        try:
            found.append(TaskProgress(**json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue
    return found


class ProgressDisplay:
    """Live rich bars for the tasks of one running stage (the local executor, on a terminal):
    `refresh()` from the executor's wait loop reads the stage's progress files (at most every
    MIN_INTERVAL_S) and redraws; `close()` leaves the last state on screen. Off a terminal it
    draws nothing: the job logs keep their own periodic lines."""

    def __init__(
        self, stage_dir: str | Path, stage: str, out: TextIO, *, array: bool = False, since: float | None = None
    ) -> None:
        self.stage_dir, self.stage, self.array = Path(stage_dir), stage, array
        self.since = time.time() if since is None else since  # older files are an earlier attempt's
        self._bars: dict[int, Any] = {}
        self._read = 0.0
        self._progress = None
        if getattr(out, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("    {task.description}"),
                BarColumn(bar_width=30),
                TextColumn("{task.fields[detail]}"),
                console=Console(file=out),
                transient=False,
                auto_refresh=False,
            )
            self._progress.start()

    def refresh(self, force: bool = False) -> None:
        if self._progress is None or (not force and time.time() - self._read < MIN_INTERVAL_S):
            return
        self._read = time.time()
        for task in read_progress(self.stage_dir):
            if task.updated < self.since:
                continue
            if task.task not in self._bars:
                name = f"{self.stage} task {task.task}" if self.array else self.stage
                self._bars[task.task] = self._progress.add_task(name, total=max(task.total, 1), detail="")
            self._progress.update(
                self._bars[task.task], completed=task.done, total=max(task.total, 1), detail=task.describe()
            )
        self._progress.refresh()

    def close(self) -> None:
        if self._progress is not None:
            self.refresh(force=True)
            self._progress.stop()
            self._progress = None
