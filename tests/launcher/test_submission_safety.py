"""A run directory runs one chain, and a submission changes it all at once or not at all, on the
real local Slurm cluster: two concurrent chla-submit queue one chain (the other is refused,
--replace takes over); a submission refused by sbatch at its third stage, interrupted (Ctrl-C,
SIGTERM, SIGHUP) or killed (kill -9) half-way leaves chain.json, every state.json and DONE
marker and recipe.yaml byte for byte as they were and no job of it in the queue, and the next
submission completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import chla, wait_for_chain, wait_until

pytestmark = pytest.mark.slurm
PY = sys.executable


def queued_under(run_dir: Path) -> set[str]:
    """Base ids of this user's queued jobs whose batch script lies in `run_dir`."""
    out = subprocess.run(["squeue", "--me", "-h", "-o", "%F|%o"], capture_output=True, text=True, check=True).stdout
    return {line.split("|")[0] for line in out.splitlines() if line.split("|", 1)[1].startswith(f"{run_dir}/")}


def chain_ids(run_dir: Path) -> set[str]:
    chain = json.loads((run_dir / "chain.json").read_text())
    return {
        i
        for rec in chain["stages"].values()
        if not rec.get("skipped")
        for i in rec["job_ids"] + ([rec["finalize_job_id"]] if rec.get("finalize_job_id") else [])
    }


SLEEPER = f"""\
name: busy
stages:
  nap:
    kind: command
    params: {{argv: [{PY}, -c, "import time; time.sleep(120)"]}}
  after_nap:
    kind: command
    params: {{argv: [echo, "${{stages.nap.out}}"]}}
"""


def test_concurrent_submits_queue_one_chain_and_replace_takes_over(tmp_path, slurm_cluster):
    (tmp_path / "r.yaml").write_text(SLEEPER)
    run_dir = tmp_path / "runs" / "busy"
    argv = [PY, "-m", "chla_launcher", "submit", "r.yaml", "--executor", "slurm"]
    both = [
        subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), *p.communicate()) for p in both]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    winner = chain_ids(run_dir)
    assert len(winner) == 2
    said = next(err for code, _, err in results if code == 2).strip().splitlines()
    refused = [line for line in said if not line.startswith("chla: waiting for")]  # if it had to wait
    assert len(refused) == 1, said
    line = refused[0]
    assert "still queued or running" in line and "--replace" in line
    assert all(job_id in line for job_id in winner) and "nap" in line
    # Exactly one chain in the queue: the winner's (squeue knows at once; sacct lags).
    assert queued_under(run_dir) == winner

    replaced = chla("submit", "r.yaml", "--executor", "slurm", "--replace", cwd=tmp_path, check=True)
    assert "--replace: cancelled" in replaced.stdout
    new = chain_ids(run_dir)
    assert new and not new & winner
    assert queued_under(run_dir) == new
    chla("cancel", str(run_dir), check=True)
    wait_until(lambda: not queued_under(run_dir), 30, "the replacing chain to be cancelled")


FIVE = """\
name: five
vars: {{tag: "{tag}"}}
stages:
  s1: {{kind: command, params: {{argv: [echo, "${{vars.tag}}"]}}}}
  s2: {{kind: command, after: [s1], params: {{argv: [echo, "${{vars.tag}}"]}}}}
  s3: {{kind: command, after: [s2], resources: {{gpus_per_node: {s3_gpus}}}, params: {{argv: [echo, "${{vars.tag}}"]}}}}
  s4: {{kind: command, after: [s3], array: 2, params: {{argv: [echo, "${{vars.tag}}"]}}}}
  s5: {{kind: command, after: [s4], params: {{argv: [echo, "${{vars.tag}}"]}}}}
"""

# `sbatch` as chla-submit finds it on PATH: the real one, which then, on its N-th call, holds
# chla-submit's pipe open while the test interrupts it: the job exists, chla does not know its id.
SLOW_SBATCH = """\
#!/bin/sh
out=$(/usr/bin/sbatch "$@") || exit $?
echo "$out"
dir=$(dirname "$0")
n=$(( $(cat "$dir/count" 2>/dev/null || echo 0) + 1 ))
echo $n > "$dir/count"
if [ "$n" = "$(cat "$dir/pause_at")" ]; then
    touch "$dir/paused"
    exec sleep 60
fi
"""


def default_interrupt() -> None:
    """Ctrl-C must act as in a terminal even when the tests run as a background job, which starts
    with SIGINT ignored (inherited, and then Python installs no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """What a failed submission must leave exactly as it was."""
    files = [
        run_dir / "recipe.yaml",
        run_dir / "chain.json",
        *run_dir.glob("*/state.json"),
        *run_dir.glob("*/DONE"),
        *run_dir.glob("*/tasks/*"),
    ]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files if p.is_file()}


def test_failed_or_interrupted_submission_leaves_run_dir_as_it_was(tmp_path, slurm_cluster):
    recipe = tmp_path / "r.yaml"
    run_dir = tmp_path / "runs" / "five"
    recipe.write_text(FIVE.format(tag="first", s3_gpus=0))
    chla("submit", "r.yaml", "--executor", "slurm", cwd=tmp_path, check=True)
    rows = wait_for_chain(run_dir)
    assert all(row["state"] == "COMPLETED" for row in rows.values()), rows
    before = snapshot(run_dir)
    assert len([p for p in before if p.endswith("DONE")]) == 5

    # sbatch refuses the third stage (a GPU on a cluster that has none).
    recipe.write_text(FIVE.format(tag="second", s3_gpus=1))
    refused = chla("submit", "r.yaml", "--executor", "slurm", cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "queued s2" in refused.stdout  # two stages were queued before the refusal
    assert snapshot(run_dir) == before
    assert not queued_under(run_dir)
    assert refused.stderr.strip().splitlines()[-1].startswith("chla: sbatch refused stage s3")

    recipe.write_text(FIVE.format(tag="third", s3_gpus=0))
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "sbatch").write_text(SLOW_SBATCH)
    (fake / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    faults = [
        ("Ctrl-C", signal.SIGINT, True),
        ("SIGTERM", signal.SIGTERM, True),
        ("SIGHUP", signal.SIGHUP, True),
        ("kill -9", signal.SIGKILL, False),
    ]
    for what, signum, whole_group in faults:
        for name in ("count", "paused"):
            (fake / name).unlink(missing_ok=True)
        (fake / "pause_at").write_text("3")  # s1, s2 queued; s3 queued but its id not read yet
        process = subprocess.Popen(
            [PY, "-m", "chla_launcher", "submit", "r.yaml", "--executor", "slurm"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=default_interrupt,
        )
        wait_until(lambda: (fake / "paused").exists(), 60, f"the third sbatch ({what})")
        assert len(queued_under(run_dir)) == 3, what
        if whole_group:  # as a terminal does: the whole foreground group
            os.killpg(process.pid, signum)
        else:
            process.kill()
        out, err = process.communicate(timeout=60)
        if not whole_group:
            os.killpg(process.pid, signal.SIGKILL)  # the fake sbatch that outlived chla-submit
        assert process.returncode == (-9 if signum == signal.SIGKILL else 128 + signum), (what, out, err)
        # Its guardian (kill -9) or chla-submit itself cancels all three jobs, the unrecorded one too.
        wait_until(lambda: not queued_under(run_dir), 30, f"no job of the aborted submission ({what})")
        assert snapshot(run_dir) == before, what
        assert not (run_dir / ".chla" / "txn").exists() or signum == signal.SIGKILL

    # The next submission (after the kill -9's guardian let go of the lock) completes.
    chla("submit", "r.yaml", "--executor", "slurm", cwd=tmp_path, check=True)
    rows = wait_for_chain(run_dir)
    assert all(row["state"] == "COMPLETED" for row in rows.values()), rows
    assert "third" in (run_dir / "recipe.yaml").read_text()
    assert snapshot(run_dir) != before


def test_python_path_with_a_space_reaches_srun_quoted(tmp_path, slurm_cluster):
    venv = Path(sys.executable).parent.parent
    spaced = tmp_path / "my venv"
    spaced.symlink_to(venv)  # pyvenv.cfg is found beside bin/ through the link
    (tmp_path / "r.yaml").write_text(
        textwrap.dedent(f"""\
        name: spaced
        slurm: {{python: "{spaced}/bin/python"}}
        stages:
          hello:
            kind: command
            params: {{argv: ["{spaced}/bin/python", -c, "import os, sys; open(os.environ['CHLA_OUT_DIR'] + '/x', 'w').write(sys.prefix)"]}}
    """)
    )
    dry = chla("submit", "r.yaml", "--executor", "slurm", "--dry-run", cwd=tmp_path, check=True).stdout
    assert f"'{spaced}/bin/python' -u -m submitit.core._submit" in dry
    chla("submit", "r.yaml", "--executor", "slurm", cwd=tmp_path, check=True)
    rows = wait_for_chain(tmp_path / "runs" / "spaced")
    assert rows["hello"]["state"] == "COMPLETED", rows
