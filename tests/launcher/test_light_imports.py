"""The launcher and the CLI stay light on a login node: `chla --help`, `chla status` and
`chla-submit --dry-run` never import the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import chla

HEAVY = ["torch", "transformers", "peft", "deepspeed", "datasets", "sentencepiece", "numpy", "safetensors"]

# One interpreter runs the commands in turn and lists the heavy modules loaded after each. Modules
# stay loaded from one command to the next, so a heavy import shows in its own command's list and
# every later one: sharing the interpreter can fail a light command, never pass a heavy one.
PROBE = (
    textwrap.dedent("""
    import json, sys
    from chla_launcher.cli import main
    heavy = %r
    for argv in json.loads(sys.argv[1]):
        try:
            main(argv)
        except SystemExit:
            pass
        print("HEAVY=" + json.dumps(sorted(m for m in heavy if m in sys.modules)), flush=True)
""")
    % HEAVY
)

RECIPE = f"""\
name: light
stages:
  a:
    kind: command
    params: {{argv: [{sys.executable}, -c, "print(1)"]}}
  b:
    kind: command
    array: 3
    params: {{argv: [echo, "${{stages.a.out}}"]}}
"""


def heavy_modules(*commands: list[str], cwd: Path) -> list[list[str]]:
    """The heavy modules loaded after each command, run in order in one fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(commands))], cwd=cwd, capture_output=True, text=True
    )
    lines = [text for text in result.stdout.splitlines() if text.startswith("HEAVY=")]
    assert len(lines) == len(commands), result.stdout + result.stderr
    return [json.loads(line[len("HEAVY=") :]) for line in lines]


def test_help_dry_run_status_and_kinds_import_no_training_stack(tmp_path: Path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    assert heavy_modules(["--help"], ["submit", "r.yaml", "--dry-run"], cwd=tmp_path) == [[], []]
    assert not (tmp_path / "runs").exists()
    chla("submit", "r.yaml", cwd=tmp_path, check=True)  # a real (local) run to look at
    assert heavy_modules(["status", "runs/light"], ["kinds", "command"], cwd=tmp_path) == [[], []]


# Slurm's dry run asks the cluster for its MaxArraySize (the array stage b); with no controller up,
# scontrol retries for ~9 s before chla falls back to Slurm's default, so this runs with the cluster.
@pytest.mark.slurm
def test_slurm_dry_run_imports_no_training_stack(tmp_path: Path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    assert heavy_modules(["submit", "r.yaml", "--executor", "slurm", "--dry-run"], cwd=tmp_path) == [[]]
    assert not (tmp_path / "runs").exists()
