"""Progress you can watch: the jobs' progress files (chla_launcher.contract.progress), the local executor's
live bars on a terminal (a real pty, as a user's), and `chla status` showing a running training
stage's step and ETA on the real local Slurm cluster, whose job log keeps its periodic lines."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from chla_launcher.contract.progress import ProgressWriter, TaskProgress, read_progress

from ..helpers import chla, status_json, wait_for_chain
from .test_training import pretrain_params

pexpect = pytest.importorskip("pexpect")


def test_progress_files_eta_and_description(tmp_path):
    writer = ProgressWriter(tmp_path, "train", 0, total=200, unit="steps", start_done=50)
    writer.progress.started -= 10  # 10 s ago
    writer.update(100, loss=3.21, tokens_per_s=4512.4)
    writer.close()
    [read] = read_progress(tmp_path)
    assert (read.done, read.total, read.start_done) == (100, 200, 50)
    assert read.eta_s == pytest.approx(20, rel=0.05)  # 50 steps in 10 s, 100 to go
    assert re.fullmatch(r"step 100/200 loss 3\.2100 4,512 tok/s ETA 0:00:(19|20|21)", read.describe())
    merged = TaskProgress(stage="m", task=0, done=2.5e9, total=5e9, unit="bytes", started=0, updated=1)
    assert merged.describe().startswith("2.50/5.00 GB")
    (tmp_path / "progress" / "task-1.json").write_text("{not json")  # a torn file is skipped
    assert len(read_progress(tmp_path)) == 1


def recipe(work: Path, train_assets, demo_assets, **params) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    english = Path(demo_assets["en_text"]).read_text(encoding="utf-8").splitlines()[:200]
    (work / "en.txt").write_text("\n".join(english) + "\n", encoding="utf-8")
    stages = {
        "tokens": {
            "kind": "pretokenize",
            "params": {"tokenizer": train_assets["merged_tokenizer"], "inputs": [str(work / "en.txt")]},
        },
        "train": {"kind": "pretrain", "params": pretrain_params(train_assets, **params)},
    }
    path = work / "r.yaml"
    path.write_text(
        json.dumps({"name": "p", "resources": {"cpus_per_task": 1, "mem": "3G", "time": "00:20:00"}, "stages": stages})
    )
    return path


@pytest.mark.slow
def test_local_run_draws_live_bars_on_a_terminal(train_assets, demo_assets, tmp_path):
    path = recipe(tmp_path, train_assets, demo_assets, max_steps=60, logging_steps=10, eval_steps=0)
    run = pexpect.spawn(
        sys.executable,
        ["-m", "chla_launcher", "submit", str(path)],
        cwd=str(tmp_path),
        encoding="utf-8",
        timeout=300,
        dimensions=(40, 200),
    )
    run.expect(pexpect.EOF)
    run.close()
    screen = run.before
    assert run.exitstatus == 0, screen[-3000:]
    assert re.search(r"tokens\s.*pieces 1/1", screen), screen[-3000:]
    assert re.search(r"train\s.*step 60/60 loss \d+\.\d{4} [\d,]+ tok/s", screen), screen[-3000:]
    assert re.search(r"step \d+/60 loss .* ETA 0:\d\d:\d\d", screen), screen[-3000:]  # a bar while it ran


@pytest.mark.slurm
@pytest.mark.slow
def test_status_shows_a_running_slurm_stage_step_and_eta(train_assets, demo_assets, tmp_path, slurm_cluster):
    # 150 steps (0.13 s each here: 20 s of training to see it running; 600 took 80 s), 6 log lines
    path = recipe(tmp_path, train_assets, demo_assets, max_steps=150, logging_steps=25, eval_steps=0)
    chla("submit", str(path), "--executor", "slurm", cwd=tmp_path, check=True, timeout=300)
    run_dir = tmp_path / "runs" / "p"
    seen = None
    deadline = time.time() + 300
    while time.time() < deadline and seen is None:
        train = status_json(run_dir)["train"]
        if train["state"] == "RUNNING" and "ETA" in train["progress"]:
            seen = train["progress"]
        elif train["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.3)
    assert seen and re.fullmatch(r"step \d+/150( loss \S+ [\d,]+ tok/s)? ETA \d+:\d\d:\d\d", seen), seen
    rows = wait_for_chain(run_dir, timeout=300)
    assert rows["train"]["state"] == "COMPLETED" and rows["train"]["progress"] == ""
    log = "".join(p.read_text() for p in (run_dir / "train" / "logs").glob("*.out"))
    assert len(re.findall(r"\] step \d+/150 loss", log)) == 6  # the job's periodic lines
