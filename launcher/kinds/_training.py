"""Params shared by the training kinds (`pretrain`, `sft`). Defaults are the original
Chinese-LLaMA-Alpaca settings where it had one (see FACTS.md), chla's faster choices elsewhere.
Torch-free: this module is imported by the launcher."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from . import InputPath, StageParams

# The original project's LoRA targets (all attention and MLP projections of a LLaMA block).
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


class TrainingParams(StageParams):
    # Inputs
    tokenizer: Annotated[str, InputPath()] = Field(description="HF tokenizer dir (the merged one)")
    model: Annotated[str | None, InputPath()] = Field(
        default=None, description="HF model directory (config.json + safetensors) to start from")
    init: dict[str, Any] | None = Field(
        default=None, description="LlamaConfig fields for a randomly initialised model (instead of `model`)")
    new_row_init: Literal["mean", "random"] = Field(
        default="mean", description="embedding rows added for new tokens: mean of the existing rows, "
        "or N(0, initializer_range)")
    max_vocab_growth: float = Field(default=4.0, gt=1.0, description="refuse tokenizers with more than "
                                    "this many times the model's embedding rows")

    # LoRA (mode lora, and sft)
    lora_r: int = Field(default=8, gt=0)
    lora_alpha: int = Field(default=32, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LORA_TARGETS), min_length=1)
    modules_to_save: list[str] = Field(default_factory=lambda: ["embed_tokens", "lm_head"])
    init_adapter: Annotated[str | None, InputPath()] = Field(
        default=None, description="continue training this PEFT adapter (its LoRA settings win)")

    # Optimisation
    learning_rate: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.05, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(default=1.0, gt=0)
    micro_batch_size: int = Field(default=8, gt=0, description="sequences per rank per forward pass")
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="optimizer steps (default: num_epochs)")
    num_epochs: float = Field(default=1.0, gt=0)
    seed: int = 42

    # Checkpoints, evaluation, logging
    save_steps: int = Field(default=200, ge=0, description="checkpoint every N steps (0: only on preemption)")
    keep_last: int = Field(default=2, gt=0)
    eval_steps: int = Field(default=100, ge=0, description="validation loss every N steps (0: never)")
    logging_steps: int = Field(default=10, gt=0)

    # Runtime
    zero_stage: Literal[0, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage; 0 = plain data parallel")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 on GPU and on CPUs with native bf16 (avx512_bf16/AMX), "
        "else fp32 (fp16 fails under DeepSpeed on CPU)")
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa", description="flash_attention_2 falls back to sdpa without a GPU and flash-attn")

    @model_validator(mode="after")
    def _one_base_model(self) -> "TrainingParams":
        if (self.model is None) == (self.init is None):
            raise ValueError("give exactly one of `model` (an HF model directory) or `init` "
                             "(a LlamaConfig for a random model)")
        return self
