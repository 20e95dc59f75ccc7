"""`deterministic: true`: the recipe key reaches the params, the stage switches torch to its
deterministic algorithms and sets the CUDA libraries' variables (the job entry before torch is
imported), and the choice is recorded like torch_compile's. On this CPU-only machine what can be
checked is that the switches are set (and left alone without the key); that two GPU runs are
bitwise equal is the GPU layer's check (tests/gpu, `pytest -m gpu`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from chla_launcher.contract.kinds import get_kind

from ..helpers import TINY_LLAMA, chla, status_json

# A fresh interpreter per mode: torch's switches are process-wide.
APPLIED = r"""
import json, os, sys
from chla_train.determinism import apply_determinism
choice = apply_determinism(sys.argv[1] == "on")
import torch
state = {
    "record": choice.record(),
    "algorithms": torch.are_deterministic_algorithms_enabled(),
    "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    "cudnn_deterministic": torch.backends.cudnn.deterministic,
    "cudnn_benchmark": torch.backends.cudnn.benchmark,
    "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    "flash": os.environ.get("FLASH_ATTENTION_DETERMINISTIC"),
    # Under deterministic algorithms torch fills new tensors' memory (NaN for floats).
    "empty_is_nan": bool(torch.isnan(torch.empty(4096)).all()),
}
print(json.dumps(state))
"""


def _applied(mode: str, **env: str) -> dict:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC")
    }
    result = subprocess.run(
        [sys.executable, "-c", APPLIED, mode], env={**clean, **env}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_deterministic_mode_sets_the_switches_and_is_off_by_default():
    on = _applied("on")
    assert on["algorithms"] and not on["warn_only"]
    assert on["cudnn_deterministic"] and not on["cudnn_benchmark"]
    assert on["cublas"] == ":4096:8" and on["flash"] == "1"
    assert on["empty_is_nan"]
    assert on["record"]["deterministic"] is True
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in on["record"]["deterministic_reason"]
    # Control: without the key nothing is switched (torch's defaults: benchmark off on a fresh process).
    off = _applied("off")
    assert not off["algorithms"] and not off["cudnn_deterministic"]
    assert off["cublas"] is None and off["flash"] is None
    assert off["record"] == {"deterministic": False, "deterministic_reason": off["record"]["deterministic_reason"]}


def test_a_users_deterministic_cublas_setting_is_kept(monkeypatch):
    from chla_train.determinism import prepare_environment

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # cuBLAS's other deterministic setting
    prepare_environment(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")  # not deterministic: replaced
    prepare_environment(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    prepare_environment(False)  # off: left alone
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"


def test_the_job_entry_sets_the_cuda_variables_before_torch_is_imported():
    script = (
        "import os, sys\n"
        "import chla_train.entry\n"
        "from chla_train.determinism import prepare_environment\n"
        "assert 'torch' not in sys.modules, 'the job entry imported torch'\n"
        "names = ('CUBLAS_WORKSPACE_CONFIG', 'FLASH_ATTENTION_DETERMINISTIC')\n"
        "prepare_environment(False)\n"
        "print(*(os.environ.get(n) for n in names))\n"
        "prepare_environment(True)\n"
        "assert 'torch' not in sys.modules\n"
        "print(*(os.environ.get(n) for n in names))\n"
    )
    clean = {
        k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC")
    }
    result = subprocess.run([sys.executable, "-c", script], env=clean, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["None None", ":4096:8 1"]  # off: nothing set (the control)


def test_deterministic_is_a_training_param_off_by_default():
    for kind, required in (
        ("pretrain", {"tokenizer": "/t", "corpus": "/c", "init": {}}),
        ("sft", {"tokenizer": "/t", "train_file": "/f", "init": {}}),
    ):
        params = get_kind(kind).params
        assert params(**required).deterministic is False
        assert params(**required, deterministic=True).deterministic is True
        with pytest.raises(ValidationError, match="deterministic"):
            params(**required, deterministic="sometimes")


@pytest.mark.slow
def test_a_recipe_turns_it_on_and_the_stage_records_it(train_assets, tmp_path):
    """Two 2-step pretraining stages through the local executor and the real job entry, one with
    `deterministic: true` in the recipe: its stage log, train summary and state.json say so, the
    other's (the control) say it was off. ~35 s on 2 cores (two stage processes)."""
    base = {
        "tokenizer": train_assets["merged_tokenizer"],
        "corpus": train_assets["corpus"],
        "init": TINY_LLAMA,
        "mode": "embeddings",
        "new_rows_only": True,
        "block_size": 32,
        "valid_count": 4,
        "micro_batch_size": 2,
        "max_steps": 2,
        "eval_steps": 0,
        "save_steps": 0,
        "precision": "fp32",
    }
    recipe = {
        "name": "det",
        "resources": {"cpus_per_task": 1},
        "stages": {
            "on": {"kind": "pretrain", "params": {**base, "deterministic": True}},
            "off": {"kind": "pretrain", "params": base, "after": ["on"]},
        },
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    chla("submit", "r.yaml", "--executor", "local", cwd=tmp_path, check=True, timeout=600)
    run_dir = tmp_path / "runs" / "det"
    assert {name: row["state"] for name, row in status_json(run_dir).items()} == {"on": "COMPLETED", "off": "COMPLETED"}
    for stage, enabled in (("on", True), ("off", False)):
        state = json.loads((run_dir / stage / "state.json").read_text())
        summary = json.loads((run_dir / stage / "out" / "train_summary.json").read_text())
        assert state["metrics"]["deterministic"] is enabled and summary["deterministic"] is enabled, stage
        log = "".join(path.read_text() for path in (run_dir / stage / "logs").glob("*"))
        assert ("deterministic: true: torch deterministic algorithms on" in log) is enabled, stage
        assert ("deterministic: false" in log) is not enabled, stage
    assert (
        "CUBLAS_WORKSPACE_CONFIG=:4096:8"
        in json.loads((run_dir / "on" / "out" / "train_summary.json").read_text())["deterministic_reason"]
    )
