"""chla_launcher.sizing against the real thing: its activation bytes per token and layer are the
bytes autograd saves in a transformers LLaMA layer (counted with saved_tensors_hooks, each storage
once, parameters excluded), its parameter counts those of the models chla_train builds, and its
LoRA FLOPs below 6N for the reasons it gives."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chla_launcher.sizing import (
    PROJECTIONS,
    ModelShape,
    Trainable,
    TrainingSetup,
    _layer_saved_bytes,
    flops_per_token,
    parameter_counts,
)
from chla_train.model import apply_lora, count_parameters, setup_embeddings_training
from chla_train.model_config import LLAMA_7B, llama_config

BATCH, SEQ = 2, 32

CASES = [  # dtype, mode, LoRA dropout, modules_to_save, attention, masked, kv heads
    (torch.bfloat16, "lora", 0.05, ("embed_tokens", "lm_head"), "sdpa", False, 4),
    (torch.bfloat16, "lora", 0.05, (), "sdpa", False, 4),  # the first layer's input needs no grad
    (torch.float32, "lora", 0.0, ("embed_tokens", "lm_head"), "sdpa", False, 4),
    (torch.bfloat16, "lora", 0.05, ("embed_tokens", "lm_head"), "eager", False, 4),
    (torch.bfloat16, "lora", 0.05, ("embed_tokens", "lm_head"), "sdpa", True, 2),  # padding mask, GQA
    (torch.float32, "full", 0.0, (), "sdpa", False, 4),
]


def config(attention: str, kv_heads: int) -> LlamaConfig:
    shape = llama_config(vocab=500, hidden=64, intermediate=160, layers=2, heads=4, kv_heads=kv_heads, positions=128)
    return LlamaConfig(**shape, attn_implementation=attention)


@pytest.mark.parametrize("dtype, mode, dropout, modules_to_save, attention, masked, kv_heads", CASES)
def test_activation_bytes_are_what_autograd_saves(dtype, mode, dropout, modules_to_save, attention, masked, kv_heads):
    torch.manual_seed(0)
    model = LlamaForCausalLM(config(attention, kv_heads))
    if mode == "lora":
        model = apply_lora(
            model,
            r=4,
            alpha=8,
            dropout=dropout,
            target_modules=list(PROJECTIONS),
            modules_to_save=list(modules_to_save),
            init_adapter=None,
            key_prefix="t",
            seed=1,
        )
    model = model.to(dtype).train()  # as DeepSpeed casts it: adapters in the training dtype too
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    per_layer: list[dict[int, int]] = []
    inside = [False]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in parameters:
            per_layer[-1][storage.data_ptr()] = storage.nbytes()
        return tensor

    def enter(*_):
        per_layer.append({})
        inside[0] = True

    def leave(*_):
        inside[0] = False

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    for layer in model.get_decoder().layers:
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -3:] = 0
    with hooks:
        model(input_ids=torch.randint(0, 500, (BATCH, SEQ)), **({"attention_mask": mask} if masked else {}))
    # RoPE's cos/sin are made once per forward and saved by every layer: not a layer's own.
    shared = set(per_layer[0]) & set(per_layer[1])
    measured = [sum(n for ptr, n in saved.items() if ptr not in shared) / (BATCH * SEQ) for saved in per_layer]

    shape = ModelShape.from_config(model.config.to_dict())
    trainable = Trainable(
        mode=mode, lora_r=4, lora_targets=PROJECTIONS, lora_dropout=dropout, modules_to_save=modules_to_save
    )
    setup = TrainingSetup(
        precision="bf16" if dtype == torch.bfloat16 else "fp32",
        micro_batch=BATCH,
        seq_len=SEQ,
        attention=attention,
        masked=masked,
        cpu=True,
    )
    estimate = [
        _layer_saved_bytes(shape, trainable, setup, input_needs_grad=index > 0 or trainable.trains_embeddings)
        for index in range(2)
    ]
    assert estimate == measured
    # Control: the same model counted as fp32 where it runs in bf16 gives other bytes.
    if dtype == torch.bfloat16:
        other = TrainingSetup(
            precision="fp32", micro_batch=BATCH, seq_len=SEQ, attention=attention, masked=masked, cpu=True
        )
        assert _layer_saved_bytes(shape, trainable, other, input_needs_grad=True) != measured[1]


def test_parameter_counts_are_those_of_the_built_models():
    torch.manual_seed(0)
    shape = ModelShape.from_config(config("sdpa", 2).to_dict())
    lora = Trainable(mode="lora", lora_r=4, lora_targets=PROJECTIONS, modules_to_save=("embed_tokens", "lm_head"))
    model = apply_lora(
        LlamaForCausalLM(config("sdpa", 2)),
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=list(PROJECTIONS),
        modules_to_save=["embed_tokens", "lm_head"],
        init_adapter=None,
        key_prefix="t",
        seed=1,
    )
    trained, total = count_parameters(model)
    assert parameter_counts(shape, lora) == (total, trained)
    embeddings = LlamaForCausalLM(config("sdpa", 2))
    embeddings.resize_token_embeddings(560)
    setup_embeddings_training(embeddings, base_rows=500, new_rows_only=True, train_lm_head=True, where="t")
    counts = parameter_counts(shape.with_vocab(560), Trainable(mode="embeddings", new_rows=60, train_lm_head=True))
    assert counts == count_parameters(embeddings)[::-1]


def test_lora_flops_count_what_is_computed():
    shape = ModelShape.from_config(LLAMA_7B)
    lora = Trainable(mode="lora", lora_r=8, lora_targets=PROJECTIONS, modules_to_save=("embed_tokens", "lm_head"))
    full = Trainable(mode="full")
    n = shape.total_params
    lora_flops = flops_per_token(shape, lora, 512)
    full_flops = flops_per_token(shape, full, 512)
    # Full fine-tuning: 6N plus attention, less the embedding lookup's 4 x vocab x hidden.
    attention = 12 * shape.num_layers * shape.hidden_size * (512 + 1) / 2
    assert full_flops.total == pytest.approx(6 * n + attention - 6 * shape.embedding_params, rel=1e-3)
    # LoRA: no weight gradients for the frozen base (4N -> 2N in backward), LoRA's own matmuls,
    # and lm_head's weight gradient since it trains.
    assert lora_flops.forward == pytest.approx(full_flops.forward, rel=0.01)
    assert lora_flops.total / full_flops.total == pytest.approx(0.70, abs=0.03)
