"""Two ranks of a training stage, one of them faulty (made by tests/train/inject/sitecustomize.py,
first on the jobs' PYTHONPATH, which wraps a function of chla's on that rank; chla's code is the
real one):
- one rank fails (an exception, as a CUDA out-of-memory error raises): the whole step ends at once,
  on Slurm (srun --kill-on-bad-exit) and locally, recorded FAILED with that rank's error, and never
  requeued. Before, on Slurm the other rank waited inside a collective (NCCL); locally it was
  killed 10 s later (SIGTERM, then SIGKILL), could take the failure for a preemption (the SIGTERM
  before gloo's error: exit 75, the task requeued), and the state recorded rank 0's error or none;
- one rank's listing of the checkpoints is stale: both still resume the step rank 0 chose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..helpers import chla, status_json
from .test_training import pretrain_params

pytestmark = pytest.mark.slow  # two ranks start DeepSpeed (~25 s per run on 2 cores)

INJECT = Path(__file__).with_name("inject")
# How long a failed step may take to end after its rank raised (measured: see NOTES).
PROMPT_S = 45


def failing_rank_env(stamp: Path, *, hang: bool, rank: int = 1, step: int = 3) -> dict[str, str]:
    return {
        "CHLA_TEST_HANG": "1" if hang else "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])),
        "CHLA_TEST_FAIL_RANK": str(rank),
        "CHLA_TEST_FAIL_STEP": str(step),
        "CHLA_TEST_FAIL_STAMP": str(stamp),
    }


def two_rank_recipe(work: Path, params: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    recipe = {
        "name": "t",
        "resources": {"cpus_per_task": 1, "mem": "3G", "time": "00:20:00"},
        "stages": {"train": {"kind": "pretrain", "resources": {"tasks_per_node": 2}, "params": params}},
    }
    (work / "r.yaml").write_text(json.dumps(recipe))


def _job_gone(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return not out.strip()


@pytest.mark.parametrize(
    "executor, peer",
    [
        ("local", "notices"),  # gloo: the other rank's collective raises when the connection closes
        ("local", "hangs"),  # NCCL: the other rank's collective waits (emulated: it blocks)
        pytest.param("slurm", "hangs", marks=pytest.mark.slurm),
    ],
)
def test_a_failing_rank_ends_the_step_at_once(train_assets, tmp_path, executor, peer, request):
    if executor == "slurm":
        request.getfixturevalue("slurm_cluster")
    stamp = tmp_path / "raised-at"
    two_rank_recipe(tmp_path, pretrain_params(train_assets, max_steps=400, eval_steps=0, logging_steps=1))
    run_dir = tmp_path / "runs" / "t"
    env = failing_rank_env(stamp, hang=peer == "hangs")
    result = chla("submit", "r.yaml", "--executor", executor, cwd=tmp_path, env=env, timeout=600)
    if executor == "local":
        ended = time.time()
        assert result.returncode == 1, result.stdout + result.stderr
        assert "requeued" not in result.stdout, result.stdout  # a failure is not a preemption
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        job = json.loads((run_dir / "chain.json").read_text())["stages"]["train"]["job_ids"][0]
        deadline = time.time() + 180
        while not _job_gone(job) and time.time() < deadline:
            time.sleep(0.2)
        ended = time.time()
        if not _job_gone(job):
            subprocess.run(["scancel", job])
            raise AssertionError(f"job {job} still ran {ended - float(stamp.read_text()):.0f} s after rank 1 raised")
    seconds = ended - float(stamp.read_text())
    print(f"{executor}: {seconds:.1f} s from rank 1's raise to the end of the step")
    assert seconds < PROMPT_S, seconds

    rows = status_json(run_dir)
    assert rows["train"]["state"] == "FAILED" and rows["train"]["restarts"] == 0, rows
    state = json.loads((run_dir / "train" / "state.json").read_text())
    assert "rank 1" in state["error"] and "CUDA out of memory" in state["error"], state


def test_ranks_resume_the_checkpoint_rank_zero_chose(train_assets, tmp_path, monkeypatch):
    """Rank 1's listing of the checkpoints misses the newest (a stale NFS directory cache, made by
    the injector): both ranks still resume from the step rank 0 sees. Control: the two listings
    do differ. (Each rank choosing alone, rank 1 resumed two steps earlier and the ranks' steps
    went apart.)"""
    from .launch import launch

    params = pretrain_params(train_assets, micro_batch_size=2, max_steps=6, save_steps=2, eval_steps=0)
    launch({"kind": "pretrain", "run_dir": str(tmp_path), "params": params}, world_size=2)
    work = tmp_path / "train" / "work"
    assert sorted(path.name for path in (work / "checkpoints").iterdir()) == ["step-2", "step-4"]

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("CHLA_TEST_STALE_LISTING_RANK", "1")
    listing = "import sys, chla_train.checkpoint as c; print(c.latest_checkpoint(sys.argv[1]).name)"
    seen = [
        subprocess.run(
            [sys.executable, "-c", listing, str(work)],
            env={**os.environ, "RANK": str(rank)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for rank in (0, 1)
    ]
    assert seen == ["step-4", "step-2"]  # control: rank 1's own listing is stale

    launch({"kind": "pretrain", "run_dir": str(tmp_path), "params": {**params, "max_steps": 8}}, world_size=2)
    for rank in (0, 1):
        log = (tmp_path / f"spec-1-rank{rank}.log").read_text()
        assert "resumed from step-4: step 4" in log, log[-2000:]
    assert json.loads((tmp_path / "train" / "out" / "result.json").read_text())["tokens_seen"] == 8 * 4 * 64
