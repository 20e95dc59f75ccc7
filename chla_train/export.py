"""Writing a trained model or adapter into the stage's out dir: built in a temporary directory
beside the target and renamed, so `adapter/` or `model/` is complete or absent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from chla_launcher.atomic import replace_dir, write_text
from chla_tools.hf_tokenizer import save_tokenizer
from chla_train.model import merge_new_rows_state_dict


def save_adapter(trainer, tokenizer, out_dir: Path, facts: dict[str, Any]) -> Path | None:
    """Stock PEFT directory (adapter_config.json + adapter_model.safetensors) plus the tokenizer.
    Collective: every rank must call it."""
    state_dict = trainer.full_state_dict()
    target = Path(out_dir) / "adapter"
    if trainer.rank == 0:
        tmp = _fresh_tmp(target)
        peft_model = trainer.engine.module
        peft_model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        _check_not_empty(tmp / "adapter_model.safetensors")
        save_tokenizer(tokenizer, tmp)
        write_text(tmp / "chla_training.json", json.dumps(facts, indent=2) + "\n")
        replace_dir(tmp, target)
    dist.barrier()
    return target if trainer.rank == 0 else None


def save_model(trainer, tokenizer, out_dir: Path, facts: dict[str, Any]) -> Path | None:
    """HF save_pretrained (safetensors) of the whole model plus the tokenizer. Collective."""
    state_dict = trainer.full_state_dict()
    target = Path(out_dir) / "model"
    if trainer.rank == 0:
        tmp = _fresh_tmp(target)
        state_dict = merge_new_rows_state_dict(state_dict)
        trainer.engine.module.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        write_text(tmp / "chla_training.json", json.dumps(facts, indent=2) + "\n")
        replace_dir(tmp, target)
    dist.barrier()
    return target if trainer.rank == 0 else None


def _fresh_tmp(target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _check_not_empty(weights: Path) -> None:
    """The original project's ZeRO bug: adapters full of 0-element tensors. Refuse to ship one."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        empty = [name for name in handle.keys() if handle.get_slice(name).get_shape() in ([], [0])
                 or 0 in handle.get_slice(name).get_shape()]
        if not list(handle.keys()) or empty:
            raise RuntimeError(f"adapter {weights} has empty tensors {empty[:3]}: the weights were not "
                               "gathered from their ZeRO partitions")
