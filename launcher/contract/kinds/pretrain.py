"""`pretrain`: continued pretraining on a pre-tokenized corpus (chla_tools.pretokenize output).

mode `embeddings`: only embed_tokens (and lm_head with train_lm_head) trains; with new_rows_only
only the rows the tokenizer merge added, the base vocabulary stays bitwise unchanged (the
original project's unreleased stage 1). mode `lora`: LoRA on the projections plus full
embed_tokens/lm_head (stage 2). mode `full`: every parameter. Output: out/adapter (lora) or
out/model (embeddings, full), metrics.jsonl, tb/, train_summary.json.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from . import InputPath, StageKind
from ._training import BlendPart, TrainingParams, one_part_per_path


class PretrainParams(TrainingParams):
    """continued pretraining (embeddings | lora | full) on DeepSpeed, resumable"""

    mode: Literal["embeddings", "lora", "full"] = "lora"
    corpus: Annotated[list[BlendPart], InputPath()] = Field(
        min_length=1,
        description="pre-tokenized corpus directory, or a blend [{path, weight}, ...] drawn by "
        "weight in a fixed, resumable order (each corpus holds out its own validation blocks)",
    )
    block_size: int = Field(default=512, gt=1)
    valid_count: int | None = Field(default=None, ge=0, description="blocks held out for validation")
    valid_fraction: float | None = Field(default=None, ge=0, lt=1)
    new_rows_only: bool = Field(default=False, description="embeddings mode: train only the added rows")
    train_lm_head: bool = Field(default=False, description="embeddings mode: train lm_head too")

    _plain_corpus = field_validator("corpus", mode="before")(one_part_per_path)

    @model_validator(mode="after")
    def _mode_options(self) -> PretrainParams:
        if self.mode != "embeddings" and (self.new_rows_only or self.train_lm_head):
            raise ValueError("new_rows_only / train_lm_head only apply to mode: embeddings")
        if self.mode != "lora" and self.init_adapter:
            raise ValueError("init_adapter only applies to mode: lora")
        if self.mode != "lora" and self.loraplus_lr_ratio is not None:
            raise ValueError("loraplus_lr_ratio only applies to mode: lora")
        return self


KIND = StageKind(
    "pretrain",
    PretrainParams,
    "chla_train.stages.pretrain:run",
    distributed=True,
    accumulation_param="gradient_accumulation_steps",
)
