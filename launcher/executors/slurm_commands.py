"""Slurm's vocabulary on the login side: job states, the sacct/squeue/scancel/scontrol calls of
submit, status and cancel, and the mapping of a recipe's resources and `slurm:` settings onto
sbatch parameters (through submitit). What a running job says to Slurm (requeue itself) is the job
side's: chla_launcher.contract.executors.slurm_job."""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..contract.errors import ChlaError
from ..contract.executors.slurm_job import run_slurm_command as _run
from ..contract.executors.slurm_settings import SlurmSettings
from ..contract.recipe import Resources, mem_to_mb, time_to_minutes
from ..contract.rundir import CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, UNKNOWN

# Slurm job states -> chla's.
_STATE_MAP = {
    "PENDING": PENDING,
    "REQUEUED": PENDING,
    "REQUEUE_HOLD": PENDING,
    "REQUEUE_FED": PENDING,
    "RESV_DEL_HOLD": PENDING,
    "SUSPENDED": PENDING,
    "CONFIGURING": RUNNING,
    "RUNNING": RUNNING,
    "COMPLETING": RUNNING,
    "STAGE_OUT": RUNNING,
    "RESIZING": RUNNING,
    "SIGNALING": RUNNING,
    "PREEMPTED": PENDING,
    "COMPLETED": COMPLETED,
    "FAILED": FAILED,
    "TIMEOUT": FAILED,
    "NODE_FAIL": FAILED,
    "OUT_OF_MEMORY": FAILED,
    "BOOT_FAIL": FAILED,
    "DEADLINE": FAILED,
    "CANCELLED": CANCELLED,
    "REVOKED": CANCELLED,
}
ACTIVE_STATES = {PENDING, RUNNING}


def chla_state(slurm_state: str) -> str:
    # "CANCELLED by 0" -> CANCELLED
    return _STATE_MAP.get(slurm_state.split()[0].rstrip("+") if slurm_state else "", UNKNOWN)


@dataclass
class JobRecord:
    """One allocation as sacct reports it (an array task is one record per task)."""

    job_id: str  # "123", "123_4", or "123_[5-9]" for array tasks not yet started
    state: str  # chla's state
    slurm_state: str
    exit_code: str = ""
    elapsed: str = ""
    nodes: str = ""
    reason: str = ""
    restarts: int = 0  # how often Slurm requeued it (preemption, time limit, node failure)

    @property
    def base_id(self) -> str:
        return self.job_id.split("_", 1)[0]


@dataclass
class JobTable:
    records: dict[str, JobRecord] = field(default_factory=dict)

    def for_job(self, job_id: str) -> list[JobRecord]:
        """Records of a plain job, or of every task of an array job."""
        return [r for r in self.records.values() if r.job_id == job_id or r.base_id == job_id]


def require_slurm() -> None:
    if shutil.which("sbatch") is None:
        raise ChlaError(
            "sbatch not found: submit from a Slurm login node, or use --executor local "
            "(or start the local test cluster: bash slurm/localcluster.sh start)"
        )


def query_jobs(job_ids: list[str]) -> JobTable:
    """One sacct call for every job of a chain, whatever their number. With -D every requeued run
    of a job is a record of its own, which is how restarts are counted."""
    table = JobTable()
    if not job_ids:
        return table
    out = _run(
        [
            "sacct",
            "-X",
            "-D",
            "-P",
            "-n",
            "-j",
            ",".join(sorted(set(job_ids))),
            "--format=JobID,State,ExitCode,Elapsed,NodeList,Reason",
        ]
    )
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 6:
            continue
        job_id, state, exit_code, elapsed, nodes, reason = parts[:6]
        previous = table.records.get(job_id)
        record = JobRecord(
            job_id=job_id,
            state=chla_state(state),
            slurm_state=state,
            exit_code=exit_code,
            elapsed=elapsed,
            nodes=nodes,
            reason=reason,
        )
        if previous is not None:
            # sacct lists the runs of a requeued job oldest first: the last one is current.
            record.restarts = previous.restarts + 1
        table.records[job_id] = record
    return table


def queued_jobs(job_ids: list[str]) -> dict[str, str]:
    """Base job id -> chla state of those of `job_ids` that squeue lists (pending, running,
    completing). squeue knows a job the moment sbatch returns; sacct can lag seconds behind."""
    if not job_ids:
        return {}
    try:
        out = _run(["squeue", "-h", "-o", "%F|%T", "-j", ",".join(sorted(set(job_ids)))])
    except ChlaError as error:
        if "Invalid job id" in str(error):  # none of them is known any more
            return {}
        raise
    queued: dict[str, str] = {}
    for line in out.splitlines():
        base, _, state = line.partition("|")
        if base.strip():
            queued[base.strip()] = chla_state(state)
    return queued


def queued_from(folder: str) -> list[str]:
    """Base ids of this user's queued jobs whose batch script lies under `folder` (submitit writes
    the script into the stage's logs directory): how the jobs of a submission that died before
    it could record them are found."""
    out = _run(["squeue", "--me", "-h", "-o", "%F|%o"])
    prefix = folder.rstrip("/") + "/"
    return sorted({line.partition("|")[0] for line in out.splitlines() if line.partition("|")[2].startswith(prefix)})


def release_jobs(job_ids: list[str]) -> None:
    """Let held jobs start (`sbatch --hold`)."""
    ids = sorted(set(job_ids))
    for start in range(0, len(ids), 500):
        _run(["scontrol", "release", ",".join(ids[start : start + 500])])


def cancel_jobs(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *sorted(set(job_ids))])


@lru_cache(maxsize=1)
def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices go up to MaxArraySize - 1)."""
    try:
        out = _run(["scontrol", "show", "config"], timeout=30)
    except ChlaError:
        return 1001
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(match.group(1)) if match else 1001


def sbatch_parameters(
    job_name: str, resources: Resources, settings: SlurmSettings, dependency: list[str] | None
) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one stage. Values reach the batch script only as
    `#SBATCH --key=value` lines, shell-quoted by submitit; newlines are refused by the schema."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": time_to_minutes(resources.time),
        "nodes": resources.nodes,
        "ntasks_per_node": resources.tasks_per_node,
        "cpus_per_task": resources.cpus_per_task,
        "mem": f"{mem_to_mb(resources.mem)}M",
        "signal_delay_s": settings.signal_delay_s,
        # Since Slurm 22.05 srun no longer takes --cpus-per-task from the job: without this, each
        # task of the job's srun gets one CPU whatever cpus_per_task says (submitit does not set
        # it). srun reads SRUN_CPUS_PER_TASK as its --cpus-per-task.
        "setup": [f"export SRUN_CPUS_PER_TASK={resources.cpus_per_task}", *settings.setup],
        "wckey": "chla",
        "stderr_to_stdout": False,
    }
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.world_size > 1:
        # One rank that fails (a CUDA out-of-memory error) ends the step: without this srun lets
        # the other ranks run, and they wait inside an NCCL collective for the process group's
        # 30-minute timeout, holding the whole allocation.
        params["srun_args"] = ["--kill-on-bad-exit=1"]
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(settings, key)
        if value:
            params[key] = value
    # Held until the submission is committed (chla_launcher.transaction): no job may start, and
    # read the run directory, before the whole chain is queued and the run directory switched.
    additional: dict[str, Any] = {"requeue": True, "hold": True}
    if dependency:
        # afterok on every parent; a parent that fails cancels this job instead of leaving it
        # pending forever (DependencyNeverSatisfied).
        additional["dependency"] = "afterok:" + ":".join(dependency)
        additional["kill-on-invalid-dep"] = "yes"
    additional.update(settings.sbatch)
    params["additional_parameters"] = additional
    return params


# submitit's SlurmExecutor parameters that are not `#SBATCH` options (submitit 1.5).
_NOT_SBATCH = {"map_count", "array_parallelism", "additional_parameters", "setup", "teardown", "signal_delay_s"}
_NOT_SBATCH |= {"stderr_to_stdout", "srun_args", "use_srun"}


def batch_script(folder: Path, python: str, parameters: dict[str, Any], map_count: int | None = None) -> str:
    """The batch script submitit's SlurmExecutor writes for a job with these parameters (its
    `parameters` after update_parameters) in `folder`, rendered here for `--dry-run` as submitit
    1.5 renders it (submitit has no public call for it). A real submission's script, which
    submitit writes into the logs directory, is compared with this one by
    tests/launcher/test_chains.py."""
    options = {key: value for key, value in parameters.items() if value is not None and key not in _NOT_SBATCH}
    options["signal"] = f"USR2@{parameters.get('signal_delay_s', 90)}"
    stdout = str(folder / "%j_%t_log.out")
    stderr = str(folder / "%j_%t_log.err")
    if map_count is not None:
        options["array"] = f"0-{map_count - 1}%{min(map_count, parameters.get('array_parallelism', 256))}"
        stdout, stderr = stdout.replace("%j", "%A_%a"), stderr.replace("%j", "%A_%a")
    options["output"] = stdout.replace("%t", "0")
    to_stdout = parameters.get("stderr_to_stdout", False)
    if not to_stdout:
        options["error"] = stderr.replace("%t", "0")
    options["open-mode"] = "append"
    options.update(parameters.get("additional_parameters") or {})
    lines = ["#!/bin/bash", "", "# Parameters"]
    for key in sorted(options):
        flag = key.replace("_", "-")
        lines.append(
            f"#SBATCH --{flag}" if options[key] is True else f"#SBATCH --{flag}={shlex.quote(str(options[key]))}"
        )
    if parameters.get("setup") is not None:
        lines += ["", "# setup", *parameters["setup"]]
    srun = ["srun", "--unbuffered", "--output", stdout, *([] if to_stdout else ["--error", stderr])]
    srun += list(parameters.get("srun_args") or [])
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    lines += [
        "",
        "# command",
        "export SUBMITIT_EXECUTOR=slurm",
        " ".join(shlex.quote(arg) for arg in srun) + " " + command,
        "",
    ]
    if parameters.get("teardown") is not None:
        lines += ["", "# teardown", *parameters["teardown"]]
    return "\n".join(lines)
