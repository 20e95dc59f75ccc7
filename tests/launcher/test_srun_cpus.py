"""A stage's cpus_per_task reaches its srun step (Slurm 22.05+ no longer passes the job's value on)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from .conftest import chla, wait_for_chain

RECIPE = f"""\
name: cpus
stages:
  probe:
    kind: command
    resources: {{cpus_per_task: 2, mem: 1G}}
    params:
      argv: [{sys.executable}, -c, "import json, os; json.dump({{k: os.environ.get(k) for k in ('SRUN_CPUS_PER_TASK', 'SLURM_STEP_ID')}}, open(os.environ['CHLA_OUT_DIR'] + '/env.json', 'w'))"]
"""


@pytest.mark.slurm
def test_srun_step_gets_the_stages_cpus(tmp_path, slurm_cluster):
    (tmp_path / "r.yaml").write_text(textwrap.dedent(RECIPE))
    dry = chla("submit", "r.yaml", "--executor", "slurm", "--dry-run", cwd=tmp_path, check=True).stdout
    assert "export SRUN_CPUS_PER_TASK=2" in dry
    chla("submit", "r.yaml", "--executor", "slurm", cwd=tmp_path, check=True)
    run_dir = tmp_path / "runs" / "cpus"
    assert wait_for_chain(run_dir)["probe"]["state"] == "COMPLETED"
    seen = json.loads((run_dir / "probe" / "out" / "env.json").read_text())
    assert seen["SRUN_CPUS_PER_TASK"] == "2" and seen["SLURM_STEP_ID"] == "0"
    job_id = json.loads((run_dir / "chain.json").read_text())["stages"]["probe"]["job_ids"][0]
    # --dry-run renders the batch script itself (submitit has no public call for it): it is the
    # script submitit handed to sbatch, line for line.
    submitted = (run_dir / "probe" / "logs" / f"{job_id}_submission.sh").read_text()
    rendered = dry.split("# --- probe (command, 1 node(s) x 1 task(s)) ---\n")[1].split("\ndry run: ")[0]
    assert "#SBATCH --cpus-per-task=2" in submitted  # the control: the file is that stage's script
    assert rendered.rstrip("\n") == submitted.rstrip("\n")
    steps = subprocess.run(
        ["sacct", "-j", job_id, "-P", "-n", "--format=JobID,AllocCPUS"], capture_output=True, text=True, check=True
    ).stdout.split()
    allocated = dict(line.split("|") for line in steps)
    assert allocated[f"{job_id}.0"] == "2", allocated  # the task's step, not 1


def test_distributed_steps_end_when_one_rank_fails(tmp_path):
    """srun --kill-on-bad-exit=1 on a distributed stage's step (a rank that fails ends the step
    instead of leaving the others in a collective), and only there. The 2-rank run on Slurm:
    tests/train/test_multi_rank.py."""
    (tmp_path / "r.yaml").write_text(
        textwrap.dedent(f"""\
        name: ranks
        stages:
          one: {{kind: command, params: {{argv: [{sys.executable}, -c, "pass"]}}}}
          two:
            kind: command
            resources: {{nodes: 2, tasks_per_node: 2}}
            params: {{argv: [{sys.executable}, -c, "pass"]}}
        """)
    )
    dry = chla("submit", "r.yaml", "--executor", "slurm", "--dry-run", cwd=tmp_path, check=True).stdout
    scripts = dict(zip(["one", "two"], dry.split("# --- ")[1:], strict=True))
    srun = {
        name: next(line for line in text.splitlines() if line.startswith("srun ")) for name, text in scripts.items()
    }
    assert "--kill-on-bad-exit=1" in srun["two"], srun
    assert "--kill-on-bad-exit" not in srun["one"], srun
