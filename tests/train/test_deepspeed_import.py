"""DeepSpeed imported through chla_train.deepspeed_import leaves MLflow (its autotuner's optional
import, seconds of every training process's start-up) unimported, and importable after. The
control is a plain `import deepspeed`, which does import it: when a DeepSpeed release stops doing
so, the control fails and chla_train.deepspeed_import can go."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

IMPORT_THEN_REPORT = """
import json, sys
{import_line}
loaded = "mlflow" in sys.modules
import mlflow  # noqa: F401  (still importable)
print(json.dumps({{"deepspeed": "deepspeed" in sys.modules, "mlflow": loaded}}))
"""


@pytest.mark.parametrize(
    "import_line, imports_mlflow",
    [
        ("from chla_train.deepspeed_import import import_deepspeed; import_deepspeed()", False),
        ("import deepspeed", True),  # control
    ],
)
def test_deepspeed_comes_without_mlflow(import_line, imports_mlflow):
    script = IMPORT_THEN_REPORT.format(import_line=import_line)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"deepspeed": True, "mlflow": imports_mlflow}
