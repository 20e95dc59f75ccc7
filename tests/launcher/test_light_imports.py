"""The launcher and the CLI stay light on a login node: `chla --help`, `chla status` and
`chla-submit --dry-run` never import the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import chla

HEAVY = ["torch", "transformers", "peft", "deepspeed", "datasets", "sentencepiece", "numpy", "safetensors"]

PROBE = (
    textwrap.dedent("""
    import json, sys
    from chla_launcher.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
    heavy = %r
    print("HEAVY=" + json.dumps(sorted(m for m in heavy if m in sys.modules)))
""")
    % HEAVY
)


def heavy_modules(*args: str, cwd: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True)
    line = [text for text in result.stdout.splitlines() if text.startswith("HEAVY=")]
    assert line, result.stdout + result.stderr
    return json.loads(line[-1][len("HEAVY=") :])


def test_help_status_and_dry_run_import_no_training_stack(tmp_path: Path):
    (tmp_path / "r.yaml").write_text(
        textwrap.dedent(f"""\
        name: light
        stages:
          a:
            kind: command
            params: {{argv: [{sys.executable}, -c, "print(1)"]}}
          b:
            kind: command
            array: 3
            params: {{argv: [echo, "${{stages.a.out}}"]}}
    """)
    )
    assert heavy_modules("--help", cwd=tmp_path) == []
    assert heavy_modules("submit", "r.yaml", "--executor", "slurm", "--dry-run", cwd=tmp_path) == []
    assert not (tmp_path / "runs").exists()
    chla("submit", "r.yaml", cwd=tmp_path, check=True)  # a real (local) run to look at
    assert heavy_modules("status", "runs/light", cwd=tmp_path) == []
    assert heavy_modules("kinds", "command", cwd=tmp_path) == []
