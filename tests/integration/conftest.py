"""The shrunk demo chain, run once per test session on both executors, for the tests that check
the chain (test_demo_chain.py) and the artifacts it leaves (test_demo_artifacts.py)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from ..helpers import REPO, chla

DEMO = REPO / "recipes" / "demo_scratch.yaml"

# Items of each task (and of lm-eval's sentiment task) the shrunk demo evaluates.
TASK_ITEMS = 16

# A few optimizer steps of small micro-batches per training stage and a slice of every
# evaluation set: the chain, its data and its code paths are the real demo's; only the amount of
# work is cut (the two runs of it were a third of the suite's CPU time at micro-batches 8 and 16,
# 40 task items and every SFT record: tokenizing 100,343 examples took the SFT stage 90 s).
SHRINK = {
    # A 2-layer, 64-wide stand-in base instead of the recipe's 4-layer, 256-wide one: every
    # stage's model work shrinks with it (the stages' summed time alone on a 2-core EPYC: 149 s ->
    # 125 s).
    "vars.base_config.hidden_size": "64",
    "vars.base_config.intermediate_size": "128",
    "vars.base_config.num_hidden_layers": "2",
    "stages.base_model.params.max_steps": "4",
    "stages.base_model.params.micro_batch_size": "2",
    "stages.base_model.params.eval_steps": "0",
    "stages.pt_embeddings.params.max_steps": "3",
    "stages.pt_embeddings.params.micro_batch_size": "2",
    "stages.pt_embeddings.params.eval_steps": "0",
    "stages.pt_lora.params.max_steps": "3",
    "stages.pt_lora.params.micro_batch_size": "2",
    "stages.pt_lora.params.eval_steps": "0",
    "stages.sft.params.max_steps": "4",
    "stages.sft.params.micro_batch_size": "4",
    "stages.sft.params.max_records": "400",
    "stages.sft.params.eval_steps": "0",
    "stages.eval_base.params.max_items": "16",
    "stages.eval_pt.params.max_items": "16",
    "stages.eval_sft.params.max_items": "16",
    "stages.eval_sft.params.max_new_tokens": "8",
    "stages.eval_task.params.max_items": str(TASK_ITEMS),
    "stages.eval_task.params.max_new_tokens": "8",
    "stages.eval_task.params.lm_eval.limit": str(TASK_ITEMS),
}


def submit_demo(tmp_path: Path, executor: str) -> Path:
    run_dir = tmp_path / executor
    overrides = [arg for key, value in SHRINK.items() for arg in ("--set", f"{key}={value}")]
    chla(
        "submit",
        str(DEMO),
        "--executor",
        executor,
        "--run-dir",
        str(run_dir),
        *overrides,
        cwd=tmp_path,
        check=True,
        timeout=900,
    )
    return run_dir


@pytest.fixture(scope="session")
def demo_local_run(tmp_path_factory, demo_assets) -> Path:
    """The shrunk demo on the local executor, run once per test session even across pytest-xdist
    workers: its tests need no Slurm, so they run on the worker beside the Slurm group, and the
    Slurm group's comparison (test_demo_chain.py) finds the run done instead of doing it again.
    The workers share the session's base temporary directory's parent; the first one to take
    the lock runs the chain, a later one waits for it and reads the same run."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "demo-local"
    root.mkdir(exist_ok=True)
    with open(shared / "demo-local.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "chain-ran"
        if not done.exists():
            submit_demo(root, "local")
            done.touch()
    return root / "local"


@pytest.fixture(scope="session")
def demo_slurm_run(tmp_path_factory, slurm_cluster, demo_assets) -> Path:
    """The shrunk demo queued on the real local Slurm cluster (the tests wait for it themselves)."""
    return submit_demo(tmp_path_factory.mktemp("demo"), "slurm")
