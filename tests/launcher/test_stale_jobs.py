"""Jobs that know what they are for: a job queued by an earlier submission (requeued by Slurm, or a
local task that outlived its executor) refuses to run once a later submission changed its stage,
writes no DONE and no output, and `chla status` shows the stage STALE."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from ..helpers import python_stage, write_recipe
from .conftest import EXECUTORS, status_json, submit, wait_for_chain

PY = sys.executable


def recipe(gate_exit: int, version: int) -> dict:
    """Stage `work` writes `version`, after stage `gate` exits `gate_exit`."""
    gate = python_stage(f"import sys; sys.exit({gate_exit})")
    work = python_stage(
        f"import os; open(os.environ['CHLA_OUT_DIR'] + '/version', 'w').write('{version}')", after=["gate"]
    )
    return {"name": "stale", "stages": {"gate": gate, "work": work}}


def _sacct_states(job_id: str) -> list[str]:
    out = subprocess.run(
        ["sacct", "-X", "-D", "-P", "-n", "-j", job_id, "--format=State"], capture_output=True, text=True
    ).stdout
    return out.split()


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_job_of_an_earlier_submission_refuses_to_run(tmp_path, executor, cluster_if_slurm):
    run_dir = tmp_path / "runs" / "stale"
    work = run_dir / "work"
    # v1 runs to the end.
    write_recipe(tmp_path, recipe(gate_exit=0, version=1))
    submit(tmp_path, executor)
    assert wait_for_chain(run_dir)["work"]["state"] == "COMPLETED"
    v1 = json.loads((run_dir / "chain.json").read_text())["stages"]["work"]
    # v2 changes the chain, but its gate fails, so its own `work` job never runs.
    write_recipe(tmp_path, recipe(gate_exit=1, version=2))
    submit(tmp_path, executor, check=False)
    rows = wait_for_chain(run_dir)
    assert rows["gate"]["state"] == "FAILED" and rows["work"]["state"] == "CANCELLED", rows
    v2_fingerprint = json.loads((run_dir / "chain.json").read_text())["stages"]["work"]["fingerprint"]
    assert v2_fingerprint != v1["fingerprint"]

    # Now v1's `work` job runs again: Slurm requeues it (as after a node failure), or, locally, a
    # task of v1's executor that survived it.
    if executor == "slurm":
        job = v1["job_ids"][0]
        subprocess.run(["scontrol", "requeue", job], check=True)
        deadline = time.time() + 120
        while (
            len(_sacct_states(job)) < 2 or _sacct_states(job)[-1] in ("PENDING", "RUNNING", "REQUEUED")
        ) and time.time() < deadline:
            time.sleep(1)
        assert _sacct_states(job)[-1] == "FAILED", _sacct_states(job)
        log = "\n".join(p.read_text() for p in (work / "logs").glob(f"{job}_*.err"))
    else:
        job = subprocess.run(
            [PY, "-m", "chla_train.entry", str(run_dir), "work", "--task", "0", "--fingerprint", v1["fingerprint"]],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert job.returncode != 0
        log = job.stderr
    stale_lines = [line for line in log.splitlines() if line.startswith("chla: ") and "STALE" in line]
    assert len(stale_lines) == 1 and v1["fingerprint"] in stale_lines[0] and v2_fingerprint in stale_lines[0], log

    assert not (work / "DONE").exists(), "the stale job wrote DONE"
    assert (work / "out" / "version").read_text() == "1", "the stale job ran the later recipe"
    row = status_json(run_dir)["work"]
    assert row["state"] == "STALE" and "STALE" in row["reason"], row
