"""`torch_compile`: the choice and its reason, the recipe check, and that training with compiled
decoder layers computes what eager training computes (on CPU, TorchInductor's C++ backend; the GPU
gain is measured by benchmarks/gpu.py, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from chla_launcher.contract.kinds import get_kind


def test_torch_compile_choice_and_recipe_check():
    from chla_train.layer_compile import choose_compile

    pretrain = get_kind("pretrain").params
    assert pretrain(tokenizer="/t", corpus="/c", init={}).torch_compile == "auto"
    assert pretrain(tokenizer="/t", corpus="/c", init={}, torch_compile=True, zero_stage=2).torch_compile is True
    with pytest.raises(ValidationError, match="torch_compile: true needs zero_stage 0 or 2"):
        pretrain(tokenizer="/t", corpus="/c", init={}, torch_compile=True, zero_stage=3)
    with pytest.raises(ValidationError, match="torch_compile"):
        get_kind("sft").params(tokenizer="/t", model="/m", train_file="/f", torch_compile="sometimes")
    # auto under ZeRO-3 is allowed: it stays eager.
    assert pretrain(tokenizer="/t", corpus="/c", init={}, zero_stage=3).torch_compile == "auto"

    assert choose_compile(True, zero_stage=2, attention="sdpa").enabled
    assert not choose_compile(False, zero_stage=2, attention="sdpa").enabled
    auto = choose_compile("auto", zero_stage=2, attention="sdpa")  # this machine has no GPU
    assert not auto.enabled and auto.reason.startswith("auto: no CUDA GPU")
    assert auto.record() == {"torch_compile": False, "torch_compile_reason": auto.reason}


def test_torch_compile_auto_on_a_gpu(monkeypatch):
    """`auto`'s GPU branches, with the GPU and Triton faked (this machine has neither)."""
    import torch
    import torch.utils._triton

    from chla_train.layer_compile import choose_compile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    on = choose_compile("auto", zero_stage=2, attention="sdpa")
    assert on.enabled and on.reason == "auto: CUDA GPU NVIDIA H200 with Triton"
    assert choose_compile("auto", zero_stage=0, attention="eager").enabled
    assert not choose_compile("auto", zero_stage=3, attention="sdpa").enabled
    assert "flash_attention_2" in choose_compile("auto", zero_stage=2, attention="flash_attention_2").reason
    assert not choose_compile("auto", zero_stage=2, attention="flash_attention_2").enabled
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert "Triton" in choose_compile("auto", zero_stage=2, attention="sdpa").reason
    assert not choose_compile("auto", zero_stage=2, attention="sdpa").enabled


def test_decoder_layers_found_under_peft():
    import torch

    from chla_train import model as models
    from chla_train.layer_compile import decoder_layers

    from ..helpers import TINY_LLAMA

    params = get_kind("pretrain").params(tokenizer="/t", corpus="/c", init=TINY_LLAMA, mode="lora")
    base = models.build_base_model(None, TINY_LLAMA, dtype=torch.float32, attn_implementation="sdpa", seed=1)
    found = decoder_layers(base)
    assert [type(layer).__name__ for layer in found] == ["LlamaDecoderLayer"] * TINY_LLAMA["num_hidden_layers"]
    peft_model = models.apply_stage_lora(base, params, stage="train", log=lambda _m: None)
    assert decoder_layers(peft_model) == found
    assert decoder_layers(torch.nn.Linear(2, 2)) == []  # no `_no_split_modules`: nothing to compile


# Three optimizer steps of the pretrain stage's trainer (LoRA plus embed_tokens/lm_head, fp32) on
# the same blocks, once per variant, in one process (DeepSpeed and gloo as in a stage).
COMPILED_TRAINING = r"""
import json, os, sys
from pathlib import Path
import numpy as np, torch
from torch._dynamo.utils import counters
from chla_launcher.contract.kinds.pretrain import PretrainParams
from chla_train import model as models
from chla_train.context import StageContext
from chla_train.layer_compile import decoder_layers
from chla_train.stages.pretrain import collate_blocks
from chla_train.trainer import TrainData, Trainer, init_distributed

root, init = Path(sys.argv[1]), json.loads(sys.argv[2])
blocks = list(np.random.default_rng(0).integers(0, init["vocab_size"], size=(12, 32)))
outcome = {}
for name, compile_, checkpointing, lr in (
    ("eager", False, False, 2e-3),
    ("compiled", True, False, 2e-3),
    ("compiled_checkpointed", True, True, 2e-3),
    ("compiled_other_lr", True, False, 1e-1),
):
    params = PretrainParams(
        tokenizer="-", corpus="-", init=init, mode="lora", block_size=32, micro_batch_size=4, max_steps=3,
        save_steps=0, eval_steps=0, precision="fp32", learning_rate=lr, warmup_ratio=0.0, lr_scheduler="constant",
        lora_dropout=0.0, torch_compile=compile_, gradient_checkpointing=checkpointing, seed=5,
    )
    ctx = StageContext.standalone(root / name, "train", "pretrain", params)
    init_distributed(ctx)
    model = models.build_base_model(None, init, dtype=torch.float32, attn_implementation="sdpa", seed=5)
    model = models.apply_stage_lora(model, params, stage="train", log=lambda _m: None)
    data = TrainData(train_set=blocks, train_indices=range(12), valid_set=blocks, valid_indices=[],
                     collate=collate_blocks)
    graphs_before = counters["stats"]["unique_graphs"]
    trainer = Trainer(ctx, model, data, params, dtype=torch.float32)
    trainer.engine.train()
    samples = iter(range(12))
    losses = [trainer.optimizer_step(samples)[0] for _ in range(3)]
    outcome[name] = {
        "losses": losses,
        "compiled_layers": sum(layer._compiled_call_impl is not None for layer in decoder_layers(model)),
        "new_graphs": counters["stats"]["unique_graphs"] - graphs_before,
        "record": trainer.compile_choice.record(),
    }
print(json.dumps(outcome))
sys.stdout.flush()
os._exit(0)  # gloo can abort at interpreter exit after the work is done
"""


@pytest.mark.slow
def test_compiled_layers_train_as_eager_ones(tmp_path):
    from ..helpers import TINY_LLAMA

    script = tmp_path / "compiled.py"
    script.write_text(COMPILED_TRAINING)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), json.dumps(TINY_LLAMA)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.splitlines()[-1])  # the last line: after DeepSpeed's log

    eager = runs["eager"]
    assert eager["compiled_layers"] == 0 and eager["new_graphs"] == 0
    assert eager["record"]["torch_compile"] is False
    layers = TINY_LLAMA["num_hidden_layers"]
    for name in ("compiled", "compiled_checkpointed"):
        run = runs[name]
        assert run["compiled_layers"] == layers and run["new_graphs"] > 0, (name, run)
        assert run["record"] == {"torch_compile": True, "torch_compile_reason": "torch_compile: true set in the recipe"}
        # Same losses step by step: the first (same weights) and the later ones (same updates).
        assert run["losses"] == pytest.approx(eager["losses"], rel=1e-5), (name, run["losses"], eager["losses"])
    # The control: a compiled run that trains differently must not match.
    other = runs["compiled_other_lr"]["losses"]
    assert other[0] == pytest.approx(eager["losses"][0], rel=1e-5)
    assert abs(other[2] - eager["losses"][2]) > 1e-3 * abs(eager["losses"][2]), (other, eager["losses"])
