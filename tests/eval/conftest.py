"""Tiny LLaMA models and real peft adapters for the merge / chat / evaluate tests.

The base uses the real demo tokenizer (32,000 pieces); the pretraining-style adapter grows the
vocabulary with Chinese words (LoRA + modules_to_save embed_tokens/lm_head, as in the original),
the SFT-style adapter adds one more token ([PAD]). LoRA B matrices and the saved embeddings are
randomised so that every part of an adapter changes the logits (peft initialises B to zero).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_WORDS = ["长江", "英雄", "天下", "人民", "报道", "丰收", "评论", "正面", "负面"]


def tiny_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    from chla_train.model_config import llama_config

    settings = llama_config(vocab=vocab_size, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, positions=256)
    settings.update(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def randomise_adapter(peft_model, seed: int) -> None:
    """Give every trainable tensor (LoRA A/B, modules_to_save copies) random values."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * 0.05
                param.copy_(param + noise if "modules_to_save" in name else noise)


def make_base(directory: Path, tokenizer_dir: str, seed: int = 0, **config_overrides) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), **config_overrides))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_adapter(
    directory: Path, base_dir: Path, tokenizer, seed: int, *, modules_to_save=None, lora_kwargs=None, save_kwargs=None
) -> Path:
    """A LoRA adapter over `base_dir` resized to len(tokenizer); tokenizer saved beside it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    settings = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    settings.update(lora_kwargs or {})
    config = LoraConfig(**settings)
    peft_model = get_peft_model(model, config)
    randomise_adapter(peft_model, seed)
    peft_model.save_pretrained(directory, **(save_kwargs or {}))
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(demo_assets) -> str:
    return str(demo_assets["base_tokenizer"])


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory, tokenizer_dir):
    """base -> pretraining adapter (vocab grows, modules_to_save) -> SFT adapter (+[PAD])."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tiny_chain")
    base = make_base(root / "base", tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(NEW_WORDS)
    pretrain = make_adapter(
        root / "pretrain_lora", base, tokenizer, seed=1, modules_to_save=["embed_tokens", "lm_head"]
    )
    # the SFT adapter trains on the pretraining-merged model, one token larger
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    merged_once = root / "merged_pretrain"
    _stock_merge(base, [pretrain], merged_once)
    sft = make_adapter(root / "sft_lora", merged_once, tokenizer, seed=2, modules_to_save=["embed_tokens", "lm_head"])
    return {
        "root": root,
        "base": base,
        "pretrain": pretrain,
        "sft": sft,
        "sizes": (len(AutoTokenizer.from_pretrained(base)), len(tokenizer) - 1, len(tokenizer)),
    }


def _stock_merge(base_dir: Path, adapter_dirs: list[Path], out_dir: Path | None = None):
    """The reference: stock peft load + merge_and_unload per adapter, in order."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for adapter in adapter_dirs:
        with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as handle:
            key = "base_model.model.model.embed_tokens.weight"
            rows = handle.get_slice(key).get_shape()[0] if key in handle.keys() else None
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def stock_merge():
    return _stock_merge
