"""Start a stage as N local rank processes, the way the local executor does (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in the environment), through harness.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from chla_train.distributed import DistributedEnv

HARNESS = Path(__file__).with_name("harness.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(spec: dict[str, Any], *, world_size: int = 1, timeout: float = 240) -> list[int]:
    """Run every rank to its end; returns the exit codes (75 = requeue requested)."""
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file = run_dir / f"spec-{len(list(run_dir.glob('spec-*.json')))}.json"
    spec_file.write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, **DistributedEnv.on_this_machine(rank, world_size, port).variables()}
        env["OMP_NUM_THREADS"] = "1" if world_size > 1 else os.environ.get("OMP_NUM_THREADS", "2")
        env.pop("SLURM_JOB_ID", None)
        log = open(run_dir / f"{spec_file.stem}-rank{rank}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(HARNESS), str(spec_file)], env=env, stdout=log, stderr=subprocess.STDOUT
                ),
                log,
            )
        )
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                other.kill()
            raise
        finally:
            log.close()
    if any(code not in (0, 75) for code in codes):
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(run_dir.glob(f"{spec_file.stem}-rank*.log")))
        raise AssertionError(f"ranks exited with {codes}:\n{logs}")
    return codes
