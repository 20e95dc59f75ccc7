"""An executor defined outside chla (tests/plugins/dist/chla_test_executor, registered through the
`chla.executors` entry point of a distribution on PYTHONPATH, nothing installed) runs a chain with
a 2-rank training stage, is preempted once through its own scheduler (a notice file, then SIGTERM;
rank 0 requeues through the plugin's job environment, whose request the plugin's login side
honours) and resumes from the checkpoint; a SIGTERM without the notice is a cancellation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .test_training import logged_steps, metrics, pretrain_params, rank_processes, summary, wait_until

PLUGINS = Path(__file__).parents[1] / "plugins" / "dist"


def submit(work: Path, stages: dict) -> subprocess.Popen:
    """`chla-submit` of a recipe for the queuefile executor, in the background, with the plugin's
    distribution on PYTHONPATH (its ranks inherit it)."""
    work.mkdir(parents=True, exist_ok=True)
    recipe = {
        "name": "t",
        "executor": "queuefile",
        "queuefile": {"queue": "scheduler"},  # the plugin's own settings block
        "resources": {"cpus_per_task": 1},
        "stages": stages,
    }
    (work / "r.yaml").write_text(json.dumps(recipe))
    path = os.pathsep.join(part for part in (str(PLUGINS), os.environ.get("PYTHONPATH")) if part)
    return subprocess.Popen(
        [sys.executable, "-m", "chla_launcher", "submit", "r.yaml"],
        cwd=work,
        env={**os.environ, "PYTHONPATH": path},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_a_plugin_executor_runs_a_two_rank_chain_preempted_once(train_assets, tmp_path):
    # Slow: two attempts of a 2-rank training stage (12 steps; the preemption must land mid-run),
    # 174 s on the 2-core machine while other tests ran beside it.
    params = pretrain_params(train_assets, mode="lora", micro_batch_size=1, max_steps=12, eval_steps=6)
    check = "import os, sys; os.stat(sys.argv[1]); open(os.environ['CHLA_OUT_DIR'] + '/ok', 'w').write('ok')"
    stages = {
        "train": {"kind": "pretrain", "resources": {"tasks_per_node": 2}, "params": params},
        "check": {"kind": "command", "params": {"argv": [sys.executable, "-c", check, "${stages.train.out}/adapter"]}},
    }
    executor = submit(tmp_path, stages)
    run_dir = tmp_path / "runs" / "t"
    work = run_dir / "train" / "work"
    ranks = rank_processes(executor, 2)
    wait_until(lambda: max(logged_steps(work), default=0) >= 4, 120, "training steps")
    (run_dir / "scheduler" / "preempt").write_text("")  # the plugin scheduler's notice, then its signal
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    output, _ = executor.communicate(timeout=300)
    assert executor.returncode == 0, output
    assert output.count("train: requeued") == 1, output

    # The requeue went through the plugin's own mechanism: its job side's request, taken by its login side.
    assert (run_dir / "scheduler" / "requeued").read_text() == "train.0-0: job qf-train rank 0\n"
    assert not (run_dir / "scheduler" / "preempt").exists()
    log = (run_dir / "train" / "logs" / "local_0_0.log").read_text()
    # The job side the ranks used is the plugin's (its attempt names), not the local executor's.
    assert "attempt train.0-0," in log and "attempt train.0-1," in log, log
    assert "preempted: job qf-train requeued" in log, log
    # Resumed from the step it saved: every step once, none lost or repeated.
    reached = summary(run_dir)["resumed_from_steps"]
    assert len(reached) == 1 and reached[0] >= 4
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, 13))
    assert json.loads((run_dir / "train" / "state.json").read_text())["attempts"] == 2
    assert (run_dir / "check" / "out" / "ok").read_text() == "ok"


def test_a_plugin_executor_ends_a_job_stopped_without_its_preemption_notice(tmp_path):
    """The control: the same SIGTERM without the plugin scheduler's notice is a cancellation; the
    plugin's job side says it is not preempted, and its login side does not start it again."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    executor = submit(tmp_path, {"wait": {"kind": "command", "params": {"argv": sleeper}}})
    run_dir = tmp_path / "runs" / "t"
    (rank,) = rank_processes(executor, 1)
    wait_until(lambda: (run_dir / "wait" / "logs" / "local_0_0.log").exists(), 60, "the task's log")
    wait_until(lambda: "start (command" in (run_dir / "wait" / "logs" / "local_0_0.log").read_text(), 60, "start")
    rank.send_signal(signal.SIGTERM)
    output, _ = executor.communicate(timeout=120)
    assert executor.returncode != 0, output
    assert "wait: requeued" not in output and "wait: FAILED" in output, output
    log = (run_dir / "wait" / "logs" / "local_0_0.log").read_text()
    assert "job qf-wait got SIGTERM without being preempted" in log, log
    assert not (run_dir / "scheduler" / "requeued").exists()
