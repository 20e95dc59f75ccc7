"""Data prepared once per stage: rank 0 builds, the other ranks wait for it and then read what it
built; a failure on rank 0 stops every rank with rank 0's one-line message (none waits forever)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from chla_train.distributed import DistributedEnv

from .launch import free_port

SCRIPT = textwrap.dedent("""
    import json, os, sys, time, types
    from pathlib import Path
    from chla_launcher.contract.errors import ChlaError
    from chla_train.distributed import DistributedEnv
    from chla_train.trainer import rank_zero_first

    log, fail = Path(sys.argv[1]), sys.argv[2] == "fail"
    env = DistributedEnv.from_environment()
    ctx = types.SimpleNamespace(dist=env, stage="sft")

    def prepare():
        cache = log.with_name("cache.json")
        if env.rank == 0:
            time.sleep(1.0)  # a slow tokenization: rank 1 must not start before it ends
            if fail:
                raise ChlaError("train.json: record 3: missing key 'output'")
            cache.write_text(json.dumps({"built_by": env.rank}))
        with log.open("a") as out:
            out.write(json.dumps({"rank": env.rank, "t": time.time(), "cache": json.loads(cache.read_text())}) + "\\n")
        return json.loads(cache.read_text())

    try:
        result = rank_zero_first(ctx, prepare)
    except ChlaError as error:
        print(f"chla: {error}", file=sys.stderr)
        os._exit(2)
    print(json.dumps(result))
    os._exit(0)
""")


def run_two_ranks(tmp_path, mode: str) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "prepare.py"
    script.write_text(SCRIPT)
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, **DistributedEnv.on_this_machine(rank, 2, port).variables(), "OMP_NUM_THREADS": "1"}
        env.pop("SLURM_JOB_ID", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path / "log.jsonl"), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


@pytest.mark.slow
def test_rank_zero_builds_first_and_a_failure_stops_every_rank(tmp_path):
    done = run_two_ranks(tmp_path, "ok")
    assert [p.returncode for p in done] == [0, 0], [p.stderr[-2000:] for p in done]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in records] == [0, 1]  # rank 1 read only after rank 0 had built
    assert all(r["cache"] == {"built_by": 0} for r in records)

    failing = tmp_path / "failing"
    failing.mkdir()
    done = run_two_ranks(failing, "fail")
    assert [p.returncode for p in done] == [2, 2]
    assert all(p.stderr.strip().splitlines()[-1] == "chla: train.json: record 3: missing key 'output'" for p in done)
    assert not (failing / "log.jsonl").exists()
