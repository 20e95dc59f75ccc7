"""The torch.distributed environment of a task, from Slurm's variables or the local executor's.

Exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the first host of the job) and
MASTER_PORT (see `master_port`). No torch here.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
from dataclasses import dataclass

from chla_launcher.contract.errors import ChlaError

# MASTER_PORT is chosen among the ports from _PORT_FLOOR to 65535 that lie outside the node's
# ephemeral range (Linux hands those out to outgoing connections, so a port there can be taken by
# any process between our choice and rank 0's bind). Below _PORT_FLOOR live the well-known
# services (ssh, Slurm's 6817-6819, databases, X11).
_PORT_FLOOR = 10000
_EPHEMERAL_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_LINUX_DEFAULT_EPHEMERAL = (32768, 60999)
# A job's port moves on with each restart, through this many slots before it comes round again: a
# requeued job never waits for its previous attempt's socket to leave TIME_WAIT, and jobs whose ids
# differ by less than (candidates / _RESTART_SLOTS), about 6,800 with Linux's default range, never
# share a port whatever their restart counts.
_RESTART_SLOTS = 4


def ephemeral_port_range(path: str = _EPHEMERAL_FILE) -> tuple[int, int]:
    """The node's ephemeral port range (Linux's default where /proc does not say)."""
    try:
        low, high = (int(part) for part in open(path).read().split()[:2])
    except (OSError, ValueError):
        return _LINUX_DEFAULT_EPHEMERAL
    return low, high


def port_candidates(ephemeral: tuple[int, int]) -> list[range]:
    """The port ranges MASTER_PORT is chosen from: _PORT_FLOOR..65535 minus the ephemeral range."""
    low, high = ephemeral
    pieces = [range(_PORT_FLOOR, min(low, 65536)), range(max(high + 1, _PORT_FLOOR), 65536)]
    pieces = [piece for piece in pieces if len(piece)]
    if not pieces:  # an ephemeral range covering everything above the floor: use what is left
        pieces = [range(1024, max(1025, min(low, _PORT_FLOOR)))]
    return pieces


def master_port(job_id: int, restart_count: int = 0, ephemeral: tuple[int, int] | None = None) -> int:
    """MASTER_PORT of a Slurm job: a pure function of its job id and restart count (and the node's
    ephemeral range, which a cluster sets alike on every node), so that every rank of a multi-node
    job computes the same port without talking to the others.

    Jobs with nearby ids (the ones that run at the same time) get neighbouring ports; each restart
    moves the port by a fixed stride, so a requeued job binds a fresh one."""
    pieces = port_candidates(ephemeral or ephemeral_port_range())
    total = sum(len(piece) for piece in pieces)
    stride = max(1, total // _RESTART_SLOTS)
    index = (job_id % stride + (restart_count % _RESTART_SLOTS) * stride) % total
    for piece in pieces:
        if index < len(piece):
            return piece[index]
        index -= len(piece)
    raise AssertionError("unreachable: index < total")


def port_is_free(port: int, host: str = "") -> bool:
    """Whether a listening socket could bind `port` now (as torch's TCPStore does: SO_REUSEADDR,
    so a port held only by connections in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_master_port(key: int, attempt: int = 0) -> int:
    """A MASTER_PORT for processes that all run on this machine (the local executor, a one-process
    job): the first free candidate from master_port(key, attempt) on. Only the chooser needs to
    know it, so it may step past busy ports."""
    ephemeral = ephemeral_port_range()
    total = sum(len(piece) for piece in port_candidates(ephemeral))
    for step in range(min(total, 1000)):
        port = master_port(key + step, attempt, ephemeral)
        if port_is_free(port):
            return port
    raise ChlaError(f"no free port for MASTER_PORT among 1,000 candidates from {master_port(key, attempt, ephemeral)}")


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
    def _from_slurm(cls, env: os._Environ[str] | dict[str, str]) -> DistributedEnv:
        world = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", 1)))
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1)))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", str(max(1, world // max(1, nodes)))).split("(")[0])
        # An array task's own id is SLURM_JOB_ID; use it so tasks of one array do not collide.
        job_id = int(env["SLURM_JOB_ID"])
        restarts = int(env.get("SLURM_RESTART_COUNT", 0) or 0)
        return cls(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_world,
            node_rank=int(env.get("SLURM_NODEID", 0)),
            num_nodes=nodes,
            master_addr=first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))),
            master_port=master_port(job_id, restarts),
        )


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
