"""MASTER_PORT: outside the node's ephemeral range, distinct for jobs that share a node, fresh after a
requeue, the same on every rank, and a busy port is one clear line naming it."""

from __future__ import annotations

import random
import socket

import pytest

from chla_launcher.contract.errors import ChlaError
from chla_train.distributed import (
    DistributedEnv,
    ephemeral_port_range,
    free_master_port,
    master_port,
    port_candidates,
    require_port_free,
)

LINUX_DEFAULT = (32768, 60999)


def test_no_port_in_the_ephemeral_range_over_a_thousand_job_ids():
    # The old rule, 20000 + job id mod 15000, put about 15% of job ids into Linux's default range.
    assert sum(LINUX_DEFAULT[0] <= 20000 + j % 15000 <= LINUX_DEFAULT[1] for j in range(1000, 16000)) > 2000
    rng = random.Random(15)
    job_ids = rng.sample(range(1, 50_000_000), 1000)
    for ephemeral in (LINUX_DEFAULT, (1024, 65535 - 2000), (49152, 65535), ephemeral_port_range()):
        for job_id in job_ids:
            for restarts in range(3):
                port = master_port(job_id, restarts, ephemeral)
                assert not ephemeral[0] <= port <= ephemeral[1], (job_id, restarts, port, ephemeral)
                assert 1024 <= port <= 65535


def test_jobs_that_can_share_a_node_never_share_a_port():
    # Jobs running at the same time have nearby ids; each may have been requeued a few times.
    candidates = sum(len(piece) for piece in port_candidates(LINUX_DEFAULT))
    for start in (1, 14_999, 123_456_789):
        ports = {}
        for job_id in range(start, start + 1000):
            for restarts in range(4):
                port = master_port(job_id, restarts, LINUX_DEFAULT)
                assert port not in ports, f"jobs {ports[port]} and {(job_id, restarts)} share port {port}"
                ports[port] = (job_id, restarts)
    # ...and ids a whole window apart as well, as long as they are closer than candidates / 4.
    window = candidates // 4
    assert master_port(10, 0, LINUX_DEFAULT) != master_port(10 + window - 1, 0, LINUX_DEFAULT)


def test_a_requeued_job_gets_a_fresh_port_and_every_rank_the_same():
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "node1",
    }
    first = {
        DistributedEnv._from_slurm(dict(env, SLURM_PROCID=str(r), SLURM_NODEID=str(r // 2))).master_port
        for r in range(4)
    }
    assert len(first) == 1
    again = DistributedEnv._from_slurm(dict(env, SLURM_PROCID="0", SLURM_RESTART_COUNT="1")).master_port
    assert again not in first
    assert not LINUX_DEFAULT[0] <= again <= LINUX_DEFAULT[1]


def test_a_busy_port_is_one_line_naming_it_and_a_lone_process_steps_past_it():
    port = free_master_port(7)
    with socket.socket() as holder:
        holder.bind(("", port))
        holder.listen()
        with pytest.raises(ChlaError) as caught:
            require_port_free(port, "stage train")
        message = str(caught.value)
        assert "\n" not in message and f"MASTER_PORT {port}" in message and "stage train" in message
        assert free_master_port(7) != port
    require_port_free(port, "stage train")  # free again


@pytest.mark.slurm
def test_concurrent_jobs_on_the_real_cluster_get_distinct_ports(tmp_path, slurm_cluster):
    """Four array tasks (four jobs) running at once on the two nodes: each sees its own MASTER_PORT,
    the one its job id gives, outside the node's ephemeral range."""
    import json
    import sys

    from ..helpers import chla, wait_for_chain

    probe = (
        "import json, os, time; time.sleep(2); json.dump({k: os.environ.get(k) for k in "
        "('MASTER_PORT', 'SLURM_JOB_ID', 'SLURMD_NODENAME')}, "
        "open(os.environ['CHLA_OUT_DIR'] + '/port-' + os.environ['CHLA_TASK_INDEX'] + '.json', 'w'))"
    )
    recipe = {
        "name": "ports",
        "stages": {"probe": {"kind": "command", "array": 4, "params": {"argv": [sys.executable, "-c", probe]}}},
    }
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    chla("submit", "r.yaml", "--executor", "slurm", cwd=tmp_path, check=True)
    run_dir = tmp_path / "runs" / "ports"
    assert wait_for_chain(run_dir)["probe"]["state"] == "COMPLETED"
    seen = [json.loads(p.read_text()) for p in sorted((run_dir / "probe" / "out").glob("port-*.json"))]
    ports = [int(s["MASTER_PORT"]) for s in seen]
    assert len(seen) == 4 and len(set(ports)) == 4, seen
    assert len({s["SLURMD_NODENAME"] for s in seen}) == 2  # two tasks shared each node
    low, high = ephemeral_port_range()
    for record, port in zip(seen, ports):
        assert port == master_port(int(record["SLURM_JOB_ID"]), 0) and not low <= port <= high
