"""`chla status`: one table for a run, whichever executor ran it. For Slurm runs, one sacct call per
refresh covers every job of the chain; DONE markers and state.json fill in the rest."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from .contract.errors import ChlaError
from .contract.progress import read_progress
from .contract.rundir import (
    CANCELLED,
    COMPLETED,
    FAILED,
    INTERRUPTED,
    PENDING,
    RUNNING,
    SKIPPED,
    STALE,
    UNKNOWN,
    RunDir,
)
from .executors import executor_named

TERMINAL = {COMPLETED, FAILED, CANCELLED, SKIPPED, INTERRUPTED}


@dataclass
class StageStatus:
    stage: str
    kind: str
    state: str
    job_ids: list[str] = field(default_factory=list)
    tasks_done: int | None = None
    tasks_total: int | None = None
    elapsed: str = ""
    restarts: int = 0
    reason: str = ""
    log: str = ""
    log_tail: list[str] = field(default_factory=list)
    progress: str = ""  # a running stage's tasks: "step 120/240 loss 3.21 4,512 tok/s ETA 0:01:02"


def collect(run: RunDir) -> list[StageStatus]:
    if not run.exists():
        raise ChlaError(f"{run.path}: not a chla run directory (no recipe.yaml)")
    from .contract.recipe import load_frozen

    recipe = load_frozen(run.path)
    chain = run.read_chain()
    jobs = executor_named(chain.executor)(run).statuses(chain) if chain else {}

    result = []
    for name, stage in recipe.stages.items():
        record = chain.stages.get(name) if chain else None
        status = StageStatus(
            stage=name, kind=stage.kind.name, state=UNKNOWN, job_ids=list(record.job_ids) if record else []
        )
        array = stage.array
        if array:
            status.tasks_total = array
            status.tasks_done = sum(1 for i in range(array) if run.task_done(name, i).exists())
        state = run.read_state(name)
        job = jobs.get(name)
        if job is not None:  # job ids, restarts, elapsed; the state unless DONE says more
            status.state, status.restarts, status.elapsed, status.reason = (
                job.state,
                job.restarts,
                job.elapsed,
                job.reason,
            )
            status.job_ids = job.job_ids or status.job_ids
        else:
            status.state = state.get("status", PENDING)
            status.restarts = max(0, int(state.get("attempts", 1) or 1) - 1)
        if record is not None and run.done_fingerprint(name) == record.fingerprint:
            status.state = COMPLETED
        elif record is None:
            status.state = "NOT SUBMITTED"
        elif record.skipped:
            status.state = STALE  # finished once, but not with the recipe submitted last
        elif state.get("stale_job") and status.state not in (RUNNING, PENDING):
            # A job of an earlier submission refused to run (chla_train.entry.check_fresh), and no
            # job of the current one is queued or running.
            status.state = STALE
            status.reason = state["stale_job"].get("error", "")
        elif state.get("stale_job"):
            status.reason = status.reason or "a job of an earlier submission refused to run (stale)"
        if status.state == COMPLETED and array:
            status.tasks_done = array
        if state.get("elapsed_s") is not None and not status.elapsed:
            status.elapsed = _seconds(state["elapsed_s"])
        if status.state in (FAILED, CANCELLED):
            status.reason = status.reason or state.get("error") or ""
            status.log, status.log_tail = _failure_log(run, name, status)
        if status.state == RUNNING:
            status.progress = _progress(run, name, array is not None)
        result.append(status)
    return result


def _failure_log(run: RunDir, stage: str, status: StageStatus, lines: int = 8) -> tuple[str, list[str]]:
    logs = [p for p in run.logs_dir(stage).glob("*") if p.is_file() and p.suffix in (".err", ".log", ".out")]
    if not logs:
        return "", []
    # The most recently written error log is the failing task's.
    errs = [p for p in logs if p.suffix in (".err", ".log")] or logs
    newest = max(errs, key=lambda p: p.stat().st_mtime)
    text = [line for line in newest.read_text(errors="replace").splitlines() if line.strip()]
    # A Python traceback buries what the program said: show the lines before it and its last line.
    marker = "Traceback (most recent call last):"
    if marker in text:
        start = text.index(marker)
        head = [line for line in text[:start] if not line.startswith("submitit ")]
        return str(newest), head[-(lines - 1) :] + text[-1:]
    return str(newest), text[-lines:]


def _progress(run: RunDir, stage: str, array: bool) -> str:
    """What the stage's running tasks last reported (chla_launcher.contract.progress); a file older than the
    task's current attempt is an earlier attempt's and says nothing."""
    reports = []
    for task in read_progress(run.stage_dir(stage)):
        state = run.read_state(stage, task.task) if array else run.read_state(stage)
        started = _epoch(state.get("started_at"))
        if started is not None and task.updated < started:
            continue
        reports.append(f"task {task.task}: {task.describe()}" if array else task.describe())
    return "; ".join(reports)


def _epoch(stamp: str | None) -> float | None:
    from datetime import datetime

    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp() if stamp else None
    except ValueError:
        return None


def _seconds(value: float) -> str:
    value = int(round(float(value)))
    return f"{value // 3600:d}:{value % 3600 // 60:02d}:{value % 60:02d}"


def render_status(
    run: RunDir, out: TextIO = sys.stdout, statuses: list[StageStatus] | None = None
) -> list[StageStatus]:
    from rich.console import Console
    from rich.table import Table

    statuses = statuses if statuses is not None else collect(run)
    chain = run.read_chain()
    name, executor = (chain.name, chain.executor) if chain else (run.path.name, "?")
    console = Console(file=out, width=max(100, Console().width), highlight=False, soft_wrap=True)
    table = Table(title=f"{name} ({executor}) {run.path}", title_justify="left")
    columns = ["stage", "kind", "state", "jobs", "tasks", "elapsed", "restarts", "reason"]
    if any(status.progress for status in statuses):
        columns.append("progress")
    for column in columns:
        table.add_column(column, overflow="fold")
    colors = {COMPLETED: "green", FAILED: "red", CANCELLED: "yellow", RUNNING: "cyan", INTERRUPTED: "red"}
    for status in statuses:
        tasks = f"{status.tasks_done}/{status.tasks_total}" if status.tasks_total else ""
        style = colors.get(status.state, "")
        row = [
            status.stage,
            status.kind,
            f"[{style}]{status.state}[/]" if style else status.state,
            ",".join(status.job_ids),
            tasks,
            status.elapsed,
            str(status.restarts),
            status.reason,
        ]
        if "progress" in columns:
            row.append(status.progress)
        table.add_row(*row)
    console.print(table)
    for status in statuses:
        if status.log_tail:
            console.print(f"[red]{status.stage}[/] failed; last lines of {status.log}:")
            for line in status.log_tail:
                console.print(f"  | {line}", markup=False)
    return statuses


def as_json(statuses: list[StageStatus]) -> list[dict[str, Any]]:
    return [asdict(s) for s in statuses]


def all_terminal(statuses: list[StageStatus]) -> bool:
    return all(s.state in TERMINAL or s.state in ("NOT SUBMITTED", STALE) for s in statuses)
