"""`sft`: LoRA instruction tuning on Alpaca-format JSON (prompt tokens masked, target = output +
eos). Output: out/adapter (stock PEFT + tokenizer with a pad token), metrics.jsonl, tb/,
train_summary.json."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from . import InputPath, StageKind
from ._training import TrainingParams


# FlashAttention has no form for a prompt prefix shared by several examples of a row.
NO_SHARED_PREFIX_UNDER_FLASH = (
    "share_prompt_prefix needs attn_implementation sdpa or eager: FlashAttention's varlen kernel lets "
    "a token attend only within its own contiguous segment, and a prefix shared by the examples of a "
    "row is contiguous with one of them at most")


class SftParams(TrainingParams):
    train_file: Annotated[str, InputPath()] = Field(description="Alpaca-format JSON for training")
    valid_file: Annotated[str | None, InputPath()] = Field(
        default=None, description="Alpaca-format JSON for validation (default: hold out valid_fraction)")
    valid_fraction: float = Field(default=0.05, ge=0, lt=1)
    max_seq_length: int = Field(default=512, gt=8)
    template: str | None = Field(default=None, description="prompt template name (default: Alpaca)")
    on_bad_record: Literal["error", "skip"] = "error"
    packing: bool = Field(
        default=False, description="pack examples into max_seq_length sequences (they attend to each other)")
    pack_batches: bool = Field(
        default=False, description="pack each micro-batch's examples into rows of max_seq_length, each "
                                   "attending only to itself: no padding, the loss of the padded batch")
    share_prompt_prefix: bool = Field(
        default=False, description="with pack_batches: the prompt tokens all examples of a micro-batch start "
                                   "with (template, shared instruction) are computed once per row; same loss")
    group_by_length: bool = Field(
        default=False, description="batch examples of similar length (less padding; HF's group_by_length)")
    # The original SFT settings (FACTS.md).
    learning_rate: float = Field(default=1e-4, gt=0)
    warmup_ratio: float = Field(default=0.03, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _prefix_needs_packing(self) -> "SftParams":
        if self.share_prompt_prefix and not self.pack_batches:
            raise ValueError("share_prompt_prefix needs pack_batches: true")
        if self.share_prompt_prefix and self.attn_implementation == "flash_attention_2":
            raise ValueError(NO_SHARED_PREFIX_UNDER_FLASH)
        return self


KIND = StageKind(
    name="sft",
    params=SftParams,
    entry="chla_train.stages.sft:run",
    description="LoRA instruction tuning (Alpaca format) on DeepSpeed, resumable",
    distributed=True,
    accumulation_param="gradient_accumulation_steps",
)
