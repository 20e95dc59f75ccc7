"""`evaluate`: perplexity, labelled tasks scored beside their baselines, and prompt generations, as an
array over shards.

Item i of every input file belongs to task i % N; each task writes its sums and generations
under out/partials/, and `finalize` adds them up into out/results.json and out/results.md
(the same numbers a single task gives). See chla_tools.evaluate for the exact methods.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from . import InputPath, StageKind, StageParams


class EvaluateParams(StageParams):
    model: Annotated[str, InputPath()] = Field(description="HF model directory (merged, or the base)")
    adapters: Annotated[list[str], InputPath()] = Field(
        default_factory=list, description="peft LoRA adapters applied on top, in training order")
    ppl: Annotated[list[str], InputPath()] = Field(
        default_factory=list, description="held-out text files (one paragraph a line) for perplexity")
    tasks: Annotated[list[str], InputPath()] = Field(
        default_factory=list, description="Alpaca-format labelled files, scored by their records' `task` "
        "(sentiment, segmentation, entities, continuation) beside its baselines, else by exact match")
    prompts: Annotated[list[str], InputPath()] = Field(
        default_factory=list, description='JSONL {"prompt": ...} (or Alpaca) files to generate for')
    batch_size: int = Field(8, ge=1, description="sequences per forward pass / generate call")
    max_new_tokens: int | None = Field(None, ge=1, description="generation length for every input; default: "
                                       "each task's own (chla_tools.tasks), 64 for prompts and untyped files")
    block_size: int | None = Field(None, ge=2, description="perplexity window; default max_position_embeddings")
    template: bool = Field(True, description="wrap instructions and prompts in the Alpaca template")
    max_items: int | None = Field(None, ge=1, description="evaluate only the first N lines/records of every input")

    @model_validator(mode="after")
    def _something_to_do(self) -> "EvaluateParams":
        if not (self.ppl or self.tasks or self.prompts):
            raise ValueError("give at least one of ppl, tasks, prompts")
        return self


KIND = StageKind(
    name="evaluate",
    params=EvaluateParams,
    entry="chla_tools.evaluate:run",
    finalize="chla_tools.evaluate:finalize",
    description="perplexity per token/char, task scores beside baselines, prompt generations; sharded, then aggregated",
    array=True,
)
