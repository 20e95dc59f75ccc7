"""Writing a trained model or adapter into the stage's out dir: built in a temporary directory
beside the target and renamed, so `adapter/` or `model/` is complete or absent."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from chla_launcher.contract.atomic import replace_dir, write_text
from chla_tools.hf_tokenizer import save_tokenizer
from chla_train.deepspeed_import import import_deepspeed
from chla_train.model import merge_new_rows_state_dict, without_tied_output


def save_adapter(trainer, tokenizer, out_dir: Path, facts: dict[str, Any]) -> Path | None:
    """Stock PEFT directory (adapter_config.json + adapter_model.safetensors) plus the tokenizer.
    Collective: every rank must call it."""
    state_dict = adapter_state_dict(trainer)
    target = Path(out_dir) / "adapter"
    if trainer.rank == 0:
        tmp = _fresh_tmp(target)
        peft_model = trainer.engine.module
        # Trainable token rows (vocab_rows: new) hold every row the base lacks, so the resized
        # embedding matrices need not be saved whole (PEFT would, because the vocabulary grew).
        token_rows = getattr(peft_model.peft_config["default"], "trainable_token_indices", None)
        peft_model.save_pretrained(
            str(tmp),
            state_dict=state_dict,
            safe_serialization=True,
            **({"save_embedding_layers": False} if token_rows else {}),
        )
        _check_not_empty(tmp / "adapter_model.safetensors")
        save_tokenizer(tokenizer, tmp)
        write_text(tmp / "chla_training.json", json.dumps(facts, indent=2) + "\n")
        replace_dir(tmp, target)
    dist.barrier()
    return target if trainer.rank == 0 else None


def adapter_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The tensors PEFT saves for the adapter (LoRA matrices, modules_to_save copies, and resized
    embeddings where PEFT keeps them), whole, on rank 0 (None elsewhere). Under ZeRO-3 each is
    gathered from its partitions on its own: no rank holds more than the adapter plus one tensor,
    where DeepSpeed's consolidated state dict would gather the whole model onto rank 0 (140 GB at
    70B, for an adapter of ~1 GB). Collective under ZeRO-3."""
    from peft import get_peft_model_state_dict

    model = trainer.engine.module
    # Which tensors PEFT keeps, asked with placeholders (a state dict of the partitioned model
    # holds empty tensors anyway): the values it returns are the placeholders it chose.
    placeholders = {name: torch.empty(0) for name in model.state_dict()}
    chosen = {id(value) for value in get_peft_model_state_dict(model, state_dict=placeholders).values()}
    names = [name for name, value in placeholders.items() if id(value) in chosen]
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    state_dict = {}
    for name in names:
        with gathered(tensors[name], trainer.engine.zero_optimization_partition_weights()):
            if trainer.rank == 0:
                state_dict[name] = tensors[name].detach().to("cpu", copy=True)
    return state_dict if trainer.rank == 0 else None


@contextmanager
def gathered(tensor: torch.Tensor, partitioned: bool):
    if not partitioned or not hasattr(tensor, "ds_id"):
        yield
        return
    import_deepspeed()
    import deepspeed

    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
        yield


def save_model(trainer, tokenizer, out_dir: Path, facts: dict[str, Any]) -> Path | None:
    """HF save_pretrained (safetensors) of the whole model plus the tokenizer. Collective."""
    state_dict = trainer.full_state_dict()
    target = Path(out_dir) / "model"
    if trainer.rank == 0:
        tmp = _fresh_tmp(target)
        state_dict = merge_new_rows_state_dict(without_tied_output(trainer.engine.module, state_dict))
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
        empty = [
            name
            for name in handle.keys()
            if handle.get_slice(name).get_shape() in ([], [0]) or 0 in handle.get_slice(name).get_shape()
        ]
        if not list(handle.keys()) or empty:
            raise RuntimeError(
                f"adapter {weights} has empty tensors {empty[:3]}: the weights were not "
                "gathered from their ZeRO partitions"
            )
