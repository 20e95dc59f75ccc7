"""A local run whose chla-submit is killed outright (SIGKILL; its tasks die with it) shows as
INTERRUPTED with how to resume, not PENDING for ever; a live run still shows RUNNING/PENDING; a run
on another host says that this host cannot tell."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from chla_launcher.contract import processes

from ..helpers import chla, status_json, wait_until

PY = sys.executable

SLOW_CHAIN = f"""\
name: dies
stages:
  long:
    kind: command
    params:
      argv: [{PY}, -c, "import os, time; print(os.getpid(), file=open('pid', 'w')); time.sleep(120)"]
  after:
    kind: command
    after: [long]
    params:
      argv: [{PY}, -c, "pass"]
"""


def test_killed_local_run_is_interrupted_not_pending(tmp_path):
    (tmp_path / "r.yaml").write_text(textwrap.dedent(SLOW_CHAIN))
    run_dir = tmp_path / "runs" / "dies"
    submitter = subprocess.Popen(
        [PY, "-m", "chla_launcher", "submit", "r.yaml", "--executor", "local"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pid_file = run_dir / "long" / "pid"  # the stage's directory is its tasks' working directory
        task = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60, "the task to start"))
        # Control: while chla-submit lives, the chain looks alive.
        rows = status_json(run_dir)
        assert (rows["long"]["state"], rows["after"]["state"]) == ("RUNNING", "PENDING"), rows
        assert rows["long"]["reason"] == "" and rows["after"]["reason"] == "", rows
    finally:
        submitter.send_signal(signal.SIGKILL)
        submitter.wait()
    wait_until(lambda: not processes.alive(task), 30, "the task to die with chla-submit")

    rows = status_json(run_dir)
    for stage in ("long", "after"):
        assert rows[stage]["state"] == "INTERRUPTED", rows
        assert f"chla-submit (pid {submitter.pid}) ended" in rows[stage]["reason"], rows
        assert f"resume with: chla-submit --resume {run_dir} --executor local" in rows[stage]["reason"], rows
    shown = chla("status", str(run_dir))
    assert shown.returncode == 1 and "INTERRUPTED" in shown.stdout, shown.stdout

    # Run by a chla-submit on another host: this one cannot tell whether it lives.
    chain = json.loads((run_dir / "chain.json").read_text())
    chain["host"] = "elsewhere.example"
    (run_dir / "chain.json").write_text(json.dumps(chain))
    rows = status_json(run_dir)
    assert rows["long"]["state"] in ("PENDING", "RUNNING"), rows
    assert "on host elsewhere.example" in rows["long"]["reason"] and "cannot be told" in rows["long"]["reason"], rows
    assert os.uname().nodename in rows["long"]["reason"], rows
