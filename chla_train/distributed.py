"""The torch.distributed environment of a task, as the job environment of the executor that
started it describes it (chla_launcher.contract.job_environment: Slurm's variables, the local
executor's; this module reads none of them).

Exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (see
chla_launcher.contract.ports). No torch here.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.job_environment import JobEnvironment, current_job_environment
from chla_launcher.contract.ports import free_master_port, port_is_free

__all__ = ["DistributedEnv", "cuda_device_index", "free_master_port", "local_cuda_device", "require_port_free"]


def require_port_free(port: int, where: str) -> None:
    """Rank 0 checks, before torch.distributed binds MASTER_PORT, that nothing else holds it: a
    clear error naming the port instead of a rendezvous that times out."""
    if not port_is_free(port):
        raise ChlaError(
            f"{where}: MASTER_PORT {port} on {socket.gethostname()} is already in use by "
            f"another process; requeue or resubmit the job (a restart moves to another port)"
        )


def cuda_device_index(device_count: int, local_rank: int, local_world_size: int, visible: str | None = None) -> int:
    """The CUDA device a rank uses among those its process sees (`device_count`, what
    torch.cuda.device_count() says under CUDA_VISIBLE_DEVICES=`visible`).

    One visible device is this rank's own when CUDA_VISIBLE_DEVICES names it (a site's
    `--gpu-bind=single:1`, the local executor): device 0. Otherwise the task sees the node's GPUs
    and takes the one at its local rank; more ranks on the node than GPUs is one clear error,
    raised before anything is loaded, instead of a CUDA error (or two ranks sharing a GPU)."""
    if device_count == 1 and (visible is not None or local_world_size == 1):
        return 0
    if 0 <= local_rank < device_count:
        return local_rank
    shown = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no CUDA_VISIBLE_DEVICES"
    raise ChlaError(
        f"local rank {local_rank} has no GPU of its own: the stage runs {local_world_size} task(s) per node "
        f"(resources.tasks_per_node) but this task sees {device_count} GPU(s) ({shown}); set "
        f"tasks_per_node to at most the GPUs per node, or have Slurm bind one GPU per task (--gpu-bind)"
    )


def local_cuda_device(device_count: int) -> int:
    """cuda_device_index for this process, from its environment (LOCAL_RANK, LOCAL_WORLD_SIZE as
    DistributedEnv exports them)."""
    env = os.environ
    return cuda_device_index(
        device_count,
        int(env.get("LOCAL_RANK", 0)),
        int(env.get("LOCAL_WORLD_SIZE", 1)),
        env.get("CUDA_VISIBLE_DEVICES"),
    )


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

    @classmethod
    def on_this_machine(cls, rank: int, world_size: int, master_port: int) -> DistributedEnv:
        """Rank `rank` of `world_size` processes started on this machine (benchmarks, tests)."""
        return cls(
            rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size, master_port=master_port
        )

    def variables(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous reads, for this rank's process."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def export(self) -> None:
        """Set them in this process."""
        os.environ.update(self.variables())

    @classmethod
    def from_environment(cls) -> DistributedEnv:
        """This task's, from the job environment of the executor that started it."""
        return cls.from_job(current_job_environment())

    @classmethod
    def from_job(cls, job: JobEnvironment) -> DistributedEnv:
        return cls(
            rank=job.rank,
            world_size=job.world_size,
            local_rank=job.local_rank,
            local_world_size=job.local_world_size,
            node_rank=job.node_rank,
            num_nodes=job.num_nodes,
            master_addr=job.master_addr,
            master_port=job.master_port,
        )
