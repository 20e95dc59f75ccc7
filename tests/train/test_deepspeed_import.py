"""DeepSpeed imported through chla_train.deepspeed_import: the set-up of a ZeRO engine and one
step leave MLflow (the autotuner's optional import) unimported, and importable after, and
TorchInductor's compiler unimported (DeepSpeed's Muon module, imported by ZeRO on every run, wraps
its kernels in `torch.compile`, now at their first call); a Muon kernel called afterwards is
wrapped then and computes. The control is the same run after a plain `import deepspeed`, which
imports both: when a DeepSpeed release stops doing so, the control fails and
chla_train.deepspeed_import can go."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ZERO_STEP_THEN_REPORT = """
import json, sys
{import_line}
import torch
import deepspeed.ops
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as chla's trainer: no JIT build
model = torch.nn.Linear(4, 4)
config = {{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 2}}}}
engine, *_ = deepspeed.initialize(
    model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config, dist_init_required=True
)
engine.backward(engine(torch.ones(1, 4)).sum())
engine.step()
loaded = {{name: name in sys.modules for name in ("mlflow", "torch._inductor.compile_fx")}}
import mlflow  # noqa: F401  (still importable)
from deepspeed.runtime.zero.muon.original_muon import zeropower_via_newtonschulz5
torch._dynamo.config.disable = True  # torch.compile wraps, then runs eagerly: no C++ build here
orthogonal = zeropower_via_newtonschulz5(torch.eye(3), steps=5)  # wrapped at this first call
muon = {{"muon_runs": bool(torch.isfinite(orthogonal).all()), "compiled": "torch._inductor.compile_fx" in sys.modules}}
print(json.dumps({{**muon, **loaded}}))
"""


def run_one_zero_step(import_line: str) -> dict[str, bool]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    one_rank = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    script = ZERO_STEP_THEN_REPORT.format(import_line=import_line)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ) | one_rank, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "import_line, imported",
    [
        ("from chla_train.deepspeed_import import import_deepspeed; import_deepspeed()", False),
        ("import deepspeed", True),  # control
    ],
)
def test_a_zero_step_imports_neither_mlflow_nor_inductors_compiler(import_line, imported):
    report = run_one_zero_step(import_line)
    assert report == {"muon_runs": True, "compiled": True, "mlflow": imported, "torch._inductor.compile_fx": imported}
