"""`chla logs` and `chla cancel`: reading a stage's job output and stopping a chain."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from .errors import ChlaError
from .rundir import RunDir


def log_files(run: RunDir, stage: str, task: int, rank: int) -> list[Path]:
    """The log files of one task (and rank), oldest first. Local runs write local_<task>_<rank>.log;
    submitit writes <job>_<rank>_log.out/.err, and <array job>_<task>_<rank>_log.out/.err."""
    logs = run.logs_dir(stage)
    if not logs.is_dir():
        return []
    chain = run.read_chain().get("stages", {}).get(stage, {})
    found = list(logs.glob(f"local_{task}_{rank}.log"))
    for job_id in chain.get("job_ids") or []:
        found += logs.glob(f"{job_id}_{rank}_log.*")          # plain job: task is always 0
        found += logs.glob(f"{job_id}_{task}_{rank}_log.*")   # array job
    if task == -1:
        found += logs.glob("local_finalize.log")
        if chain.get("finalize_job_id"):
            found += logs.glob(f"{chain['finalize_job_id']}_0_log.*")
    return sorted(set(found), key=lambda p: (p.stat().st_mtime, p.name))


def show_logs(run_dir: str, stage: str, *, task: int = 0, rank: int = 0, follow: bool = False) -> int:
    run = RunDir(run_dir)
    if not run.exists():
        raise ChlaError(f"{run_dir}: not a chla run directory (no recipe.yaml)")
    if not run.stage_dir(stage).is_dir():
        raise ChlaError(f"{run_dir}: no stage {stage!r} has run here")
    files = log_files(run, stage, task, rank)
    if not files and not follow:
        raise ChlaError(f"no log yet for stage {stage} task {task} rank {rank} (is it still queued?)")
    offsets: dict[Path, int] = {}
    while True:
        for path in log_files(run, stage, task, rank):
            with open(path, "rb") as handle:
                handle.seek(offsets.get(path, 0))
                data = handle.read()
                offsets[path] = handle.tell()
            if data:
                if len(offsets) > 1 and not follow:
                    print(f"==> {path} <==")
                sys.stdout.write(data.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        if not follow or run.done_file(stage).exists() and _stage_ended(run, stage):
            return 0
        time.sleep(1.0)


def _stage_ended(run: RunDir, stage: str) -> bool:
    return run.read_state(stage).get("status") in ("COMPLETED", "FAILED", "CANCELLED")


def cancel_run(run_dir: str) -> int:
    run = RunDir(run_dir)
    if not run.exists():
        raise ChlaError(f"{run_dir}: not a chla run directory (no recipe.yaml)")
    chain = run.read_chain()
    if chain.get("executor") == "slurm":
        from . import slurm

        ids = []
        for rec in chain.get("stages", {}).values():
            if rec.get("skipped"):
                continue
            ids += rec.get("job_ids") or []
            if rec.get("finalize_job_id"):
                ids.append(rec["finalize_job_id"])
        table = slurm.query_jobs(ids)
        # sacct lags a few seconds behind the queue: a job it does not list yet may be queued, so it
        # is cancelled too (scancel of a job that already ended does no harm).
        live = sorted({job_id for job_id in ids
                       if not table.for_job(job_id)
                       or any(r.state in slurm.ACTIVE_STATES for r in table.for_job(job_id))})
        if not live:
            print(f"{run.path}: no queued or running jobs")
            return 0
        slurm.cancel_jobs(live)
        print(f"cancelled {len(live)} job(s): {', '.join(live)}")
        return 0
    pid = chain.get("pid")
    if not pid:
        print(f"{run.path}: no local run in progress")
        return 0
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        print(f"{run.path}: the local run (pid {pid}) has already ended")
        return 0
    if "chla" not in cmdline:
        print(f"{run.path}: pid {pid} is no longer the chla run; nothing to cancel")
        return 0
    os.kill(pid, signal.SIGTERM)
    print(f"sent SIGTERM to the local run (pid {pid})")
    return 0
