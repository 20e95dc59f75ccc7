"""MASTER_PORT: which port the ranks of a job rendezvous on, outside the node's ephemeral range.
Shared by the executors' two sides: a job side computes the port of a multi-node job from its id,
the local executor picks a free one for the processes it starts. No torch here.
"""

from __future__ import annotations

import errno
import socket

from .errors import ChlaError

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
