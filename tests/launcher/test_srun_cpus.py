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
    steps = subprocess.run(
        ["sacct", "-j", job_id, "-P", "-n", "--format=JobID,AllocCPUS"], capture_output=True, text=True, check=True
    ).stdout.split()
    allocated = dict(line.split("|") for line in steps)
    assert allocated[f"{job_id}.0"] == "2", allocated  # the task's step, not 1
