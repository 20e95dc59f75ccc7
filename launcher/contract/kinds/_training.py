"""Params shared by the training kinds (`pretrain`, `sft`). Defaults are the original
Chinese-LLaMA-Alpaca settings where it had one (its scripts/training/run_pt.sh and run_sft.sh),
chla's faster choices elsewhere.
Torch-free: this module is imported by the launcher."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ._params import InputPath, StageParams

# The original project's LoRA targets (all attention and MLP projections of a LLaMA block).
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


class BlendPart(StageParams):
    """One part of a weighted blend of data sets (corpora, instruction files)."""

    path: Annotated[str, InputPath()] = Field(description="the data set (a file or directory)")
    weight: float = Field(gt=0, description="its share of the training samples (weights are normalised)")
    name: str | None = Field(
        default=None,
        description="name in logs and counts (default: the stage that wrote it, or the file or directory name)",
    )


def one_part_per_path(value: Any) -> Any:
    """A plain path is a blend of one part (so `corpus: path` and `train_file: path` stay valid)."""
    return [{"path": value, "weight": 1.0}] if isinstance(value, str) else value


class TrainingParams(StageParams):
    # Inputs
    tokenizer: Annotated[str, InputPath()] = Field(description="HF tokenizer dir (the merged one)")
    model: Annotated[str | None, InputPath()] = Field(
        default=None, description="HF model directory (config.json + safetensors) to start from"
    )
    init: dict[str, Any] | None = Field(
        default=None, description="LlamaConfig fields for a randomly initialised model (instead of `model`)"
    )
    new_row_init: Literal["subtoken_mean", "mean", "random"] = Field(
        default="subtoken_mean",
        description="embedding and lm_head rows added for new tokens: the mean "
        "of the base rows of the token's pieces under the base tokenizer (subtoken_mean), the mean of "
        "all base rows, or N(0, initializer_range) from the recipe's seed",
    )
    max_vocab_growth: float = Field(
        default=4.0, gt=1.0, description="refuse tokenizers with more than this many times the model's embedding rows"
    )

    # LoRA (mode lora, and sft)
    lora_r: int = Field(default=8, gt=0)
    lora_alpha: int = Field(default=32, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LORA_TARGETS), min_length=1)
    modules_to_save: list[str] = Field(default_factory=lambda: ["embed_tokens", "lm_head"])
    vocab_rows: Literal["all", "new"] = Field(
        default="all",
        description="rows of the vocabulary matrices in modules_to_save (embed_tokens, lm_head) "
        "that LoRA stages train: all (full copies in the adapter, as the original) or new (PEFT trainable "
        "token rows from new_rows_from on; the adapter holds only those rows)",
    )
    new_rows_from: int | None = Field(
        default=None,
        ge=0,
        description="vocab_rows new: the first row that trains (default: the rows the "
        "model had before this stage's tokenizer; 32000 for a LLaMA base trains every Chinese row)",
    )
    init_adapter: Annotated[str | None, InputPath()] = Field(
        default=None, description="continue training this PEFT adapter (its LoRA settings win)"
    )

    # Optimisation
    learning_rate: float = Field(default=2e-4, gt=0)
    embedding_learning_rate: float | None = Field(
        default=None,
        gt=0,
        description="learning rate of the trainable parts of embed_tokens and lm_head (default: learning_rate)",
    )
    embedding_adam_epsilon: float | None = Field(
        default=None,
        gt=0,
        description="Adam's epsilon for the trainable parts of embed_tokens and lm_head (default: 1e-8, as "
        "for everything else). Adam moves each element by about the learning rate whatever the size of its "
        "gradient, and every output row gets the softmax's small push-down gradient: new rows that no batch "
        "uses (most of a large vocabulary extension) all fall by the full step each step. An epsilon between "
        "those gradients (~1e-5) and those of the rows in use (~2e-3) keeps the unused rows still",
    )
    loraplus_lr_ratio: float | None = Field(
        default=None,
        gt=0,
        description="LoRA+: the LoRA B matrices learn at learning_rate times this (16 in the LoRA+ paper; "
        "default: one rate for A and B, as plain LoRA)",
    )
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
        default="auto",
        description="auto: bf16 on GPUs with bf16 and on CPUs whose torch and oneDNN may use "
        "avx512_bf16/AMX, else fp32 (emulated bf16 is slower; fp16 fails under DeepSpeed on CPU)",
    )
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa", description="flash_attention_2 falls back to sdpa without a GPU and flash-attn"
    )
    # Cost of `deterministic` (chla_train.determinism says more): not measured by chla; reports for
    # transformer training put PyTorch's deterministic kernels, cuBLAS's single-stream workspace
    # and flash-attn's deterministic backward at a few percent to a few tens of percent of step
    # time on GPUs, next to nothing on CPUs. Off by default.
    deterministic: bool = Field(
        default=False,
        description="bitwise-reproducible GPU training (torch deterministic algorithms, "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8, cuDNN deterministic, flash-attn's deterministic backward): "
        "same recipe, seed and hardware give the same weights, and a resumed run equals an uninterrupted "
        "one on CUDA too; costs a few to a few tens of percent of step time on GPUs (not measured by chla)",
    )
    torch_compile: bool | Literal["auto"] = Field(
        default="auto",
        description="compile each decoder layer with TorchInductor (fuses the elementwise work around the "
        "matrix products); auto: on a CUDA GPU with Triton unless zero_stage is 3, never on a CPU",
    )

    @model_validator(mode="after")
    def _one_base_model(self) -> TrainingParams:
        if (self.model is None) == (self.init is None):
            raise ValueError(
                "give exactly one of `model` (an HF model directory) or `init` (a LlamaConfig for a random model)"
            )
        return self

    @model_validator(mode="after")
    def _compile_without_zero3(self) -> TrainingParams:
        if self.torch_compile is True and self.zero_stage == 3:
            raise ValueError(
                "torch_compile: true needs zero_stage 0 or 2 (ZeRO-3 gathers each layer's parameters "
                "in module hooks that compiled layers do not run as DeepSpeed expects)"
            )
        return self
