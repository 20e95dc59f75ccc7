"""The Slurm executor's job side: a task of a job that chla_launcher.executors.slurm queued through
submitit, described by Slurm's SLURM_* variables, and the scontrol calls a task makes to requeue
its job when slurmctld preempts it.

How Slurm stops a job (seen on the local cluster: Slurm 22.05, PreemptType=preempt/partition_prio,
PreemptMode=REQUEUE, GraceTime=30, jobs submitted by submitit through srun): a job chosen for
preemption gets SIGCONT and SIGTERM in every task, and SIGKILL once the partition's GraceTime has
passed; a job that ends by itself within the grace time is recorded COMPLETED or FAILED and is NOT
requeued, so rank 0 requeues it itself (`scontrol requeue`), but only when slurmctld says it is
being preempted: scancel and the time limit send the same SIGTERM, and those jobs must end. USR2
comes some minutes before the time limit (sbatch --signal, which submitit sets); submitit's own
handler then requeues the job and counts time-outs.
"""

from __future__ import annotations

import re
import subprocess
from typing import ClassVar

from ..errors import ChlaError
from ..job_environment import JobEnvironment
from ..ports import master_port


def run_slurm_command(argv: list[str], timeout: float = 60) -> str:
    """A Slurm command's output; one ChlaError line when it is missing, slow or fails."""
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


def being_preempted(job_id: str) -> bool | None:
    """Whether slurmctld has chosen the running job for preemption: its SIGTERM then means "requeue",
    whereas the SIGTERM of scancel (JobState COMPLETING) or of the time limit means "end". During a
    partition's GraceTime the job is still RUNNING, with PreemptTime set (Slurm 22.05). None when
    slurmctld does not answer."""
    try:
        out = run_slurm_command(["scontrol", "show", "job", "-o", job_id], timeout=20)
    except ChlaError:
        return None
    state = re.search(r"\bJobState=(\S+)", out)
    preempt_time = re.search(r"\bPreemptTime=(\S+)", out)
    if not state or not preempt_time:
        return None
    return state.group(1) == "RUNNING" and preempt_time.group(1) not in ("None", "Unknown")


def requeue_job(job_id: str) -> None:
    """Put a running job back into the queue now (slurmctld then ends its processes)."""
    run_slurm_command(["scontrol", "requeue", job_id], timeout=20)


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list ("node[3-5,7],gpu1" -> "node3")."""
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Fallback parser for the common forms when scontrol is not on PATH in the job.
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not head:
        return nodelist
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


class SlurmJobEnvironment(JobEnvironment):
    name = "slurm"
    ranks_wait_for_requeue: ClassVar[bool] = True
    runner_handles_usr2: ClassVar[bool] = True

    def _int(self, key: str, default: int) -> int:
        return int(self.environ.get(key) or default)

    @property
    def rank(self) -> int:
        return self._int("SLURM_PROCID", 0)

    @property
    def world_size(self) -> int:
        return int(self.environ.get("SLURM_NTASKS", self.environ.get("SLURM_NPROCS", 1)))

    @property
    def local_rank(self) -> int:
        return self._int("SLURM_LOCALID", 0)

    @property
    def local_world_size(self) -> int:
        default = str(max(1, self.world_size // max(1, self.num_nodes)))
        # "2(x3)": two tasks on each of three nodes.
        return int(self.environ.get("SLURM_NTASKS_PER_NODE", default).split("(")[0])

    @property
    def node_rank(self) -> int:
        return self._int("SLURM_NODEID", 0)

    @property
    def num_nodes(self) -> int:
        return int(self.environ.get("SLURM_JOB_NUM_NODES", self.environ.get("SLURM_NNODES", 1)))

    @property
    def master_addr(self) -> str:
        return first_host(self.environ.get("SLURM_JOB_NODELIST", self.environ.get("SLURM_NODELIST", "")))

    @property
    def master_port(self) -> int:
        # An array task's own id is SLURM_JOB_ID; use it so tasks of one array do not collide.
        return master_port(int(self.environ["SLURM_JOB_ID"]), self.restart_count)

    @property
    def restart_count(self) -> int:
        return self._int("SLURM_RESTART_COUNT", 0)

    @property
    def job_id(self) -> str | None:
        return self.environ.get("SLURM_JOB_ID")

    @property
    def attempt(self) -> str:
        return f"{self.job_id}-{self.restart_count}"

    def being_preempted(self) -> bool | None:
        return being_preempted(self.environ["SLURM_JOB_ID"])

    def requeue(self) -> None:
        requeue_job(self.environ["SLURM_JOB_ID"])
