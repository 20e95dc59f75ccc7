"""The job side of the executors: a task gets the job environment of the executor named by
CHLA_EXECUTOR, which reads that executor's variables (and nothing else does)."""

from __future__ import annotations

import pytest

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.executors.local_job import LocalJobEnvironment
from chla_launcher.contract.executors.slurm_job import SlurmJobEnvironment
from chla_launcher.contract.job_environment import current_job_environment

SLURM_TASK = {
    "CHLA_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "node1,node2",
    "SLURM_RESTART_COUNT": "1",
}


def test_a_slurm_task_is_described_by_slurms_variables():
    job = current_job_environment(SLURM_TASK)
    assert isinstance(job, SlurmJobEnvironment)
    described = (job.rank, job.world_size, job.local_rank, job.local_world_size, job.node_rank, job.num_nodes)
    assert described == (3, 4, 1, 2, 1, 2)
    assert (job.job_id, job.attempt, job.master_addr) == ("4242", "4242-1", "node1")
    # The control: the same variables without CHLA_EXECUTOR are not read (the local executor's
    # job side reads torch.distributed's, absent here).
    other = current_job_environment({k: v for k, v in SLURM_TASK.items() if k != "CHLA_EXECUTOR"})
    assert isinstance(other, LocalJobEnvironment)
    assert (other.rank, other.world_size, other.job_id) == (0, 1, None)


def test_a_local_task_counts_its_nodes_from_its_ranks():
    env = {"CHLA_EXECUTOR": "local", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    job = current_job_environment({**env, "CHLA_LOCAL_ATTEMPT": "local-7-0-1"})
    assert (job.rank, job.world_size, job.num_nodes, job.node_rank, job.attempt) == (5, 8, 2, 1, "local-7-0-1")
    assert job.being_preempted() is True


def test_an_unknown_executor_is_one_line():
    with pytest.raises(ChlaError, match=r"unknown executor 'nope' \(known: local, slurm\)"):
        current_job_environment({"CHLA_EXECUTOR": "nope"})
