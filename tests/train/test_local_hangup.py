"""A local run dies as one: SIGHUP to chla-submit (a closed terminal or SSH connection) during a
training stage ends every process of the run, and the resubmission resumes from the checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..helpers import chla, status_json
from .test_training import pretrain_params


def alive(pid: int) -> bool:
    """Running (a zombie has ended: it only waits for its parent to collect its status)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


@pytest.mark.slow
def test_hangup_ends_the_local_run_and_resubmit_resumes_from_the_checkpoint(train_assets, tmp_path):
    # 80 steps: the hang-up comes right after the step-10 checkpoint (~8 steps a second here); 200
    # only lengthened the resumed run.
    params = pretrain_params(train_assets, max_steps=80, save_steps=10, eval_steps=0, logging_steps=10)
    (tmp_path / "r.yaml").write_text(
        json.dumps({"name": "hup", "stages": {"train": {"kind": "pretrain", "params": params}}})
    )
    run_dir = tmp_path / "runs" / "hup"
    checkpoints = run_dir / "train" / "work" / "checkpoints"
    # A session of its own, like a login shell's: the hang-up reaches chla-submit, the tasks (in
    # sessions of their own) only through it.
    submit = subprocess.Popen(
        [sys.executable, "-m", "chla_launcher", "submit", "r.yaml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not (checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())):
            assert time.time() < deadline and submit.poll() is None, "no checkpoint before the run ended"
            time.sleep(0.1)
        pids = descendants([submit.pid])  # chla-submit, the task, whatever the task started
        assert len(pids) > 1
        os.killpg(submit.pid, signal.SIGHUP)
        output, _ = submit.communicate(timeout=60)
    finally:
        if submit.poll() is None:
            submit.kill()
    # chla-submit ends its tasks before it exits; a moment for the kernel to finish them off.
    deadline = time.time() + 3
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if alive(pid)] == [], "processes of the run outlived the hang-up"
    assert submit.returncode == 1, output  # it stopped its tasks and recorded the stage cancelled
    assert status_json(run_dir)["train"]["state"] == "CANCELLED"

    chla("submit", "r.yaml", cwd=tmp_path, check=True, timeout=300)
    summary = json.loads((run_dir / "train" / "out" / "train_summary.json").read_text())
    assert len(summary["resumed_from_steps"]) == 1 and summary["resumed_from_steps"][0] >= 10
    assert status_json(run_dir)["train"]["state"] == "COMPLETED"
