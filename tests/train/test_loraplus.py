"""`loraplus_lr_ratio` (LoRA+): the LoRA B matrices get learning_rate x ratio in a param group of
their own, beside the vocabulary's own rate; the recipe check; and that the optimizer really moves
B that much faster (one AdamW step on a PEFT model, against the same step without it)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from chla_launcher.contract.kinds import get_kind

from ..helpers import TINY_LLAMA


def test_loraplus_ratio_recipe_check():
    pretrain = get_kind("pretrain").params
    assert pretrain(tokenizer="/t", corpus="/c", model="/m").loraplus_lr_ratio is None
    assert pretrain(tokenizer="/t", corpus="/c", model="/m", loraplus_lr_ratio=16).loraplus_lr_ratio == 16
    with pytest.raises(ValidationError, match="loraplus_lr_ratio only applies to mode: lora"):
        pretrain(tokenizer="/t", corpus="/c", model="/m", mode="embeddings", loraplus_lr_ratio=16)
    with pytest.raises(ValidationError, match="loraplus_lr_ratio"):
        get_kind("sft").params(tokenizer="/t", model="/m", train_file="/f", loraplus_lr_ratio=0)


def _lora_model(target_modules=("q_proj", "v_proj"), modules_to_save=("embed_tokens", "lm_head")):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    config = LoraConfig(r=4, target_modules=list(target_modules), modules_to_save=list(modules_to_save) or None)
    return get_peft_model(model, config)


def _sft_params(**settings):
    return get_kind("sft").params(tokenizer="/t", model="/m", train_file="/f", learning_rate=1e-3, **settings)


def test_loraplus_gives_the_b_matrices_their_own_rate():
    from chla_train.trainer import build_optimizer, lora_b_parameter_ids, vocabulary_parameter_ids

    model = _lora_model()
    params = _sft_params(embedding_learning_rate=1e-5, loraplus_lr_ratio=16, weight_decay=0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    b_ids = lora_b_parameter_ids(model)
    assert b_ids and all(".lora_B." in names[i] for i in b_ids)
    assert len(b_ids) == sum(".lora_A." in name for name in names.values())  # one B per A

    groups = build_optimizer(model, params).param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.1), (1.6e-2, 0.1), (1e-5, 0.1)]
    assert {id(p) for p in groups[1]["params"]} == b_ids
    assert {id(p) for p in groups[2]["params"]} == vocabulary_parameter_ids(model) & {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    # Control: without the ratio the B matrices learn at the base rate, in the base group.
    plain = build_optimizer(model, params.model_copy(update={"loraplus_lr_ratio": None})).param_groups
    assert [g["lr"] for g in plain] == [1e-3, 1e-5]
    assert b_ids <= {id(p) for p in plain[0]["params"]}


def _b_step(ratio: float | None) -> tuple[float, float]:
    """Mean |change| of the B and A matrices after one AdamW step on the same batch."""
    from chla_train.trainer import build_optimizer, lora_b_parameter_ids

    model = _lora_model()
    with torch.no_grad():  # B starts at zero; give it values so that A gets a gradient too
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.02)
    params = _sft_params(loraplus_lr_ratio=ratio, weight_decay=0.0)
    optimizer = build_optimizer(model, params)
    b_ids = lora_b_parameter_ids(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved = {"B": [], "A": []}
    for name, p in model.named_parameters():
        if name in before:
            moved["B" if id(p) in b_ids else "A"].append((p.detach() - before[name]).abs().mean().item())
    return sum(moved["B"]) / len(moved["B"]), sum(moved["A"]) / len(moved["A"])


def test_loraplus_step_moves_b_ratio_times_as_far():
    b_plain, a_plain = _b_step(None)
    b_plus, a_plus = _b_step(16)
    # AdamW's first step moves every entry by about its learning rate, whatever the gradient's size.
    assert b_plus / b_plain == pytest.approx(16, rel=0.05)
    assert a_plus == pytest.approx(a_plain, rel=1e-6)  # A is untouched by the ratio


def test_loraplus_leaves_a_lora_inside_the_vocabulary_at_the_vocabulary_rate():
    """LoRA on lm_head itself: its B matrix belongs to the vocabulary's group only (a parameter in
    two groups is an error in torch), and the other B matrices still get the ratio."""
    from chla_train.trainer import build_optimizer

    model = _lora_model(target_modules=("q_proj", "lm_head"), modules_to_save=())
    params = _sft_params(embedding_learning_rate=1e-5, loraplus_lr_ratio=16)
    groups = build_optimizer(model, params).param_groups
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(rate)  # each parameter in one group
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            assert rate[id(param)] == (1e-5 if "lm_head" in name else 1.6e-2), name
