"""The run directory on this machine: the lock (flock, and the lock file where flock is refused),
a live local run refused or replaced, a local run that dies as one even when chla-submit is killed
outright, array outputs visible only whole, --from starting a finished stage afresh, files a
project group can read, and a frozen recipe that --resume does not interpolate again."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from chla_launcher.contract.errors import ChlaError

from ..helpers import write_recipe
from .conftest import chla, status_json, wait_until

PY = sys.executable


# --- the lock ---------------------------------------------------------------------------------


def test_flock_lets_one_holder_in(tmp_path):
    from chla_launcher.lock import RunLock

    with RunLock(tmp_path, "submit"):
        with pytest.raises(ChlaError, match=rf"is locked by `chla submit` \(host .*, pid {os.getpid()}"):
            RunLock(tmp_path, "cancel", wait_s=0.3).acquire()
    with RunLock(tmp_path, "cancel"):  # released on exit
        pass


def test_lock_file_where_flock_is_refused_and_stale_holders_are_taken_over(tmp_path, monkeypatch):
    from chla_launcher import lock as locking
    from chla_launcher.lock import RunLock

    def no_flock(fd, operation):  # what Lustre without `-o flock` or an NFS `nolock` mount answer
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    held = tmp_path / ".chla" / "lock.held"
    with RunLock(tmp_path, "submit"):
        holder = json.loads(held.read_text())
        assert holder["pids"][0][0] == os.getpid() and holder["purpose"] == "submit"
        with pytest.raises(ChlaError, match="is locked by `chla submit`"):
            RunLock(tmp_path, "cancel", wait_s=0.3).acquire()
    assert not held.exists()

    # A holder that died without releasing: its process is gone.
    gone = subprocess.Popen(["true"])
    gone.wait()
    held.write_text(
        json.dumps({"host": os.uname().nodename, "pids": [[gone.pid, None]], "purpose": "submit", "since": "then"})
    )
    with RunLock(tmp_path, "cancel", wait_s=2):
        assert json.loads(held.read_text())["purpose"] == "cancel"
    # A holder on another host that stopped refreshing the file.
    held.write_text(json.dumps({"host": "elsewhere", "pids": [[1, None]], "purpose": "submit", "since": "then"}))
    with pytest.raises(ChlaError):
        RunLock(tmp_path, "cancel", wait_s=0.3).acquire()  # fresh: another host's, so held
    old = time.time() - locking.STALE_AFTER_S - 5
    os.utime(held, (old, old))
    with RunLock(tmp_path, "cancel", wait_s=2):
        assert json.loads(held.read_text())["purpose"] == "cancel"


# --- a live local run -------------------------------------------------------------------------

NAPPER = f"""\
name: napper
stages:
  nap:
    kind: command
    params:
      argv: [{PY}, -c, "import os, time; open(os.environ['CHLA_WORK_DIR'] + '/child.pid', 'w').write(str(os.getpid())); time.sleep(300)"]
"""


@pytest.fixture
def start_local(tmp_path):
    """Start `chla submit r.yaml EXTRA...` in the background; whatever is left is ended afterwards."""
    started: list[subprocess.Popen] = []

    def start(*extra: str) -> subprocess.Popen:
        started.append(
            subprocess.Popen(
                [PY, "-m", "chla_launcher", "submit", "r.yaml", *extra],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()  # it stops its tasks
            process.wait(timeout=30)


@pytest.mark.slow
def test_live_local_run_is_refused_replaced_and_dies_with_a_killed_submit(tmp_path, start_local):
    from chla_launcher.contract.processes import alive, stage_tasks

    write_recipe(tmp_path, NAPPER)
    run_dir = tmp_path / "runs" / "napper"
    child_pid = run_dir / "nap" / "work" / "child.pid"
    first = start_local()
    wait_until(child_pid.exists, 60, "the first run's program")
    refused = chla("submit", "r.yaml", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and f"still queued or running: nap (pid {first.pid}" in refused.stderr

    # --replace stops the first run (it records its stage as cancelled) and runs again.
    child_pid.unlink()
    second = start_local("--replace")
    assert first.wait(timeout=60) == 1
    wait_until(child_pid.exists, 60, "the replacing run's program")
    tasks = stage_tasks(run_dir)
    program = int(child_pid.read_text())
    assert len(tasks) == 1 and alive(program)

    # kill -9 of chla-submit (an OOM kill): its task and the task's program die with it.
    second.kill()
    second.wait()
    wait_until(lambda: not any(alive(pid) for pid in [tasks[0][0], program]), 20, "the orphans to die")
    assert stage_tasks(run_dir) == []
    # ... and the chain is not live any more: a new submission is accepted.
    child_pid.unlink()
    third = start_local()
    wait_until(child_pid.exists, 60, "the third run's program")
    chla("cancel", str(run_dir), check=True)
    assert third.wait(timeout=60) == 1


# --- outputs and files ------------------------------------------------------------------------

ARRAY = f"""\
name: parts
stages:
  shard:
    kind: command
    array: {{n}}
    params:
      argv: [{PY}, -c, "import os; open(os.environ['CHLA_OUT_DIR'] + '/part-' + os.environ['CHLA_TASK_INDEX'], 'w').write('x')"]
  count:
    kind: command
    params:
      argv: [{PY}, -c, "import glob, os; open(os.environ['CHLA_OUT_DIR'] + '/n', 'w').write(str(len(glob.glob('${{stages.shard.out}}/part-*'))))"]
"""


@pytest.mark.slow
def test_shrinking_an_array_leaves_no_stale_parts(tmp_path):
    write_recipe(tmp_path, ARRAY.replace("{n}", "4"))
    chla("submit", "r.yaml", cwd=tmp_path, check=True)
    out = tmp_path / "runs" / "parts" / "count" / "out" / "n"
    assert out.read_text() == "4"
    write_recipe(tmp_path, ARRAY.replace("{n}", "2"))
    chla("submit", "r.yaml", cwd=tmp_path, check=True)
    assert out.read_text() == "2"
    assert sorted(p.name for p in (tmp_path / "runs" / "parts" / "shard" / "out").iterdir()) == ["part-0", "part-1"]


RESUMABLE = f"""\
name: resumable
stages:
  work:
    kind: command
    params:
      argv: [{PY}, -c, "import os; w = os.environ['CHLA_WORK_DIR'] + '/ckpt'; found = os.path.exists(w); open(w, 'w').write('state'); open(os.environ['CHLA_OUT_DIR'] + '/resumed', 'w').write(str(found))"]
"""


@pytest.mark.slow  # runs a chain (twice)
def test_from_starts_a_finished_stage_afresh(tmp_path):
    write_recipe(tmp_path, RESUMABLE)
    chla("submit", "r.yaml", cwd=tmp_path, check=True)
    resumed = tmp_path / "runs" / "resumable" / "work" / "out" / "resumed"
    assert resumed.read_text() == "False"
    forced = chla("submit", "r.yaml", "--from", "work", cwd=tmp_path, check=True)
    assert "1 stage(s) to run" in forced.stdout
    assert resumed.read_text() == "False"  # its old work/ (checkpoints) was not picked up


def test_run_files_are_readable_as_the_umask_allows(tmp_path):
    write_recipe(tmp_path, RESUMABLE)
    subprocess.run(
        [PY, "-m", "chla_launcher", "submit", "r.yaml"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        preexec_fn=lambda: os.umask(0o027),
    )
    run_dir = tmp_path / "runs" / "resumable"
    files = [
        run_dir / "recipe.yaml",
        run_dir / "chain.json",
        run_dir / "work" / "state.json",
        run_dir / "work" / "DONE",
        run_dir / "work" / "out" / "resumed",
    ]
    assert {str(p.relative_to(run_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        str(p.relative_to(run_dir)): "0o640" for p in files
    }
    assert oct(stat.S_IMODE((run_dir / "work" / "out").stat().st_mode)) == "0o750"


@pytest.mark.slow  # runs a chain (twice)
def test_resume_keeps_a_literal_dollar_brace(tmp_path):
    write_recipe(
        tmp_path,
        f"""\
        name: literal
        stages:
          say:
            kind: command
            params:
              argv: [{PY}, -c, "import os, sys; open(os.environ['CHLA_OUT_DIR'] + '/arg', 'w').write(sys.argv[1])", "$${{HOME}}"]
    """,
    )
    chla("submit", "r.yaml", cwd=tmp_path, check=True)
    run_dir = tmp_path / "runs" / "literal"
    arg = run_dir / "say" / "out" / "arg"
    assert arg.read_text() == "${HOME}"
    again = chla("submit", "--resume", str(run_dir), "--from", "say", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert arg.read_text() == "${HOME}"
    assert status_json(run_dir)["say"]["state"] == "COMPLETED"
