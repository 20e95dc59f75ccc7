"""`sft`: LoRA instruction tuning on Alpaca-format JSON (prompt tokens masked, target = output +
eos). Output: out/adapter (stock PEFT + tokenizer with a pad token), metrics.jsonl, tb/,
train_summary.json."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from . import InputPath, StageKind, Trains
from ._training import BlendPart, TrainingParams, one_part_per_path

# FlashAttention has no form for a prompt prefix shared by several examples of a row.
NO_SHARED_PREFIX_UNDER_FLASH = (
    "share_prompt_prefix needs attn_implementation sdpa or eager: FlashAttention's varlen kernel lets "
    "a token attend only within its own contiguous segment, and a prefix shared by the examples of a "
    "row is contiguous with one of them at most"
)


class SftParams(TrainingParams):
    """LoRA instruction tuning (Alpaca format) on DeepSpeed, resumable"""

    train_file: Annotated[list[BlendPart], InputPath()] = Field(
        min_length=1,
        description="Alpaca-format JSON for training, or a blend [{path, weight}, ...] of such "
        "files drawn by weight in a fixed, resumable order",
    )
    valid_file: Annotated[str | None, InputPath()] = Field(
        default=None,
        description="Alpaca-format JSON for validation (default: hold out valid_fraction of every training file)",
    )
    valid_fraction: float = Field(default=0.05, ge=0, lt=1)
    max_seq_length: int = Field(default=512, gt=8)
    template: str | None = Field(
        default=None,
        description="prompt template: alpaca (the default), chat (the tokenizer's chat template, one user "
        "turn; for an instruction-tuned base), or a template text containing {instruction}",
    )
    on_bad_record: Literal["error", "skip"] = "error"
    max_records: int | None = Field(
        None,
        gt=0,
        description="read only the first N records of each instruction file (train_file and "
        "valid_file): a quick trial of a recipe without tokenizing all of its data (default: all)",
    )
    cache_dir: str | None = Field(
        None,
        description="content-addressed cache of the tokenized examples (default $CHLA_CACHE/sft or "
        "~/.cache/chla/sft), keyed by the data, the tokenizer, the settings that shape an example "
        "and the reader's code: a rerun or another run on the same files reads it instead of "
        "tokenizing again; on several nodes it should be on a filesystem they share",
    )
    packing: bool = Field(
        default=False, description="pack examples into max_seq_length sequences (they attend to each other)"
    )
    pack_batches: bool = Field(
        default=False,
        description="pack each micro-batch's examples into rows of max_seq_length, each "
        "attending only to itself: no padding, the loss of the padded batch",
    )
    share_prompt_prefix: bool = Field(
        default=False,
        description="with pack_batches: the prompt tokens all examples of a micro-batch start "
        "with (template, shared instruction) are computed once per row; same loss",
    )
    replay_corpus: Annotated[list[BlendPart] | None, InputPath()] = Field(
        default=None,
        description="pre-tokenized pretraining text (a corpus, or a blend of corpora) mixed into "
        "the batches so that SFT keeps the language model; each block is one row "
        "of plain language modelling",
    )
    replay_weight: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="share of the training samples that are "
        "replay blocks (the loss is the mean over label tokens, so a block of "
        "replay_block_size tokens weighs as much as that many answer tokens)",
    )
    replay_block_size: int = Field(default=128, gt=1, description="tokens per replay block")
    loss_mean: Literal["token", "example"] = Field(
        default="token",
        description="token: the loss is the mean over the batch's answer tokens (the original's), "
        "so long answers outweigh short ones; example: the mean over examples of each example's "
        "token mean (a replay block counts as one example)",
    )
    group_by_length: bool = Field(
        default=False, description="batch examples of similar length (less padding; HF's group_by_length)"
    )
    # The original project's SFT settings (Chinese-LLaMA-Alpaca, scripts/training/run_sft.sh).
    learning_rate: float = Field(default=1e-4, gt=0)
    warmup_ratio: float = Field(default=0.03, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)

    _plain_train_file = field_validator("train_file", "replay_corpus", mode="before")(one_part_per_path)

    @model_validator(mode="after")
    def _prefix_needs_packing(self) -> SftParams:
        if self.group_by_length and (self.replay_corpus or len(self.train_file) > 1):
            raise ValueError(
                "group_by_length needs one train_file and no replay_corpus (length groups "
                "would sort the parts of a blend apart); use pack_batches"
            )
        if self.share_prompt_prefix and not self.pack_batches:
            raise ValueError("share_prompt_prefix needs pack_batches: true")
        if self.share_prompt_prefix and self.attn_implementation == "flash_attention_2":
            raise ValueError(NO_SHARED_PREFIX_UNDER_FLASH)
        return self


KIND = StageKind(
    "sft",
    SftParams,
    "chla_train.stages.sft:run",
    distributed=True,
    accumulation_param="gradient_accumulation_steps",
    trains=Trains(sequence_length="max_seq_length", partial_loss=True, adds_pad_token=True),
)
