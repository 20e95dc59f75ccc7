"""The torch.distributed environment of a task, from Slurm's variables or the local executor's.

Exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the first host of the job),
MASTER_PORT (derived from the job id, so two jobs sharing a node do not collide). No torch here.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

# Ports 20000-39999: above most ephemeral-port-free service ranges, below Linux's default
# ephemeral range (32768+ overlaps a little; collisions are caught by torch with a clear error).
_PORT_BASE, _PORT_SPAN = 20000, 15000


@dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Set the variables torch.distributed's env:// rendezvous reads."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            GROUP_RANK=str(self.node_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )

    @classmethod
    def from_environment(cls) -> "DistributedEnv":
        env = os.environ
        if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
            return cls._from_slurm(env)
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            node_rank=int(env.get("GROUP_RANK", 0)),
            num_nodes=int(env.get("CHLA_NUM_NODES", 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )

    @classmethod
    def _from_slurm(cls, env: os._Environ[str] | dict[str, str]) -> "DistributedEnv":
        world = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", 1)))
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1)))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", str(max(1, world // max(1, nodes)))).split("(")[0])
        # An array task's own id is SLURM_JOB_ID; use it so tasks of one array do not collide.
        job_id = int(env["SLURM_JOB_ID"])
        return cls(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_world,
            node_rank=int(env.get("SLURM_NODEID", 0)),
            num_nodes=nodes,
            master_addr=first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))),
            master_port=_PORT_BASE + job_id % _PORT_SPAN,
        )


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list ("node[3-5,7],gpu1" -> "node3")."""
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
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
