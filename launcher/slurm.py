"""The one place that speaks Slurm: job states, sacct/squeue/scancel/scontrol calls and the
mapping of a recipe's resources onto sbatch parameters (through submitit)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .contract.errors import ChlaError
from .contract.recipe import Resources, SlurmSettings, mem_to_mb, time_to_minutes
from .contract.rundir import CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, UNKNOWN

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


def _run(argv: list[str], timeout: float = 60) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ChlaError(f"{argv[0]} not found: is this a Slurm login node?") from None
    except subprocess.TimeoutExpired:
        raise ChlaError(f"{argv[0]} did not answer within {timeout:.0f}s (is slurmctld up?)") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise ChlaError(f"{' '.join(argv[:2])} failed: {message[-1] if message else done.returncode}")
    return done.stdout


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


def being_preempted(job_id: str) -> bool | None:
    """Whether slurmctld has chosen the running job for preemption: its SIGTERM then means "requeue",
    whereas the SIGTERM of scancel (JobState COMPLETING) or of the time limit means "end". During a
    partition's GraceTime the job is still RUNNING, with PreemptTime set (Slurm 22.05). None when
    slurmctld does not answer."""
    try:
        out = _run(["scontrol", "show", "job", "-o", job_id], timeout=20)
    except ChlaError:
        return None
    state = re.search(r"\bJobState=(\S+)", out)
    preempt_time = re.search(r"\bPreemptTime=(\S+)", out)
    if not state or not preempt_time:
        return None
    return state.group(1) == "RUNNING" and preempt_time.group(1) not in ("None", "Unknown")


def requeue_job(job_id: str) -> None:
    """Put a running job back into the queue now (slurmctld then ends its processes)."""
    _run(["scontrol", "requeue", job_id], timeout=20)


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
