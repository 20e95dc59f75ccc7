"""`evaluate`: perplexity, labelled tasks scored beside their baselines, and prompt generations, as an
array over shards.

Item i of every input file belongs to task i % N; each task writes its sums and generations
under out/partials/, and `finalize` adds them up into out/results.json and out/results.md
(the same numbers a single task gives). See chla_tools.evaluate for the exact methods.
`lm_eval` also runs EleutherAI's lm-evaluation-harness on the model (task 0 only; results in
results.json under "lm_eval"; chla_tools.lm_eval_backend).
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from . import InputPath, StageKind, StageParams


class LmEvalParams(StageParams):
    """lm-evaluation-harness on the stage's model (chla_tools.lm_eval_backend); run by task 0."""

    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval task names (ceval-valid, cmmlu, "
        "mmlu, ...; their data must be in the HF datasets cache) or include_path tasks",
    )
    # Paths one level down are not the launcher's InputPath fields: they are made absolute here,
    # where the recipe is validated (the directory chla is started from), and checked by the job.
    include_path: list[str] = Field(
        default_factory=list, description="directories of lm-eval task YAMLs (lm-eval's --include_path)"
    )
    alpaca_tasks: list[str] = Field(
        default_factory=list,
        description="Alpaca-format labelled files, each run as a multiple-choice "
        "task chla_<file stem> (choices: the file's distinct outputs)",
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per item (default: the task's)")
    limit: int | float | None = Field(None, gt=0, description="items per task: a count, or a fraction if below 1")
    seed: int = Field(1234, description="lm-eval's seeds (few-shot sampling)")
    pair_tokenization: Literal["joint", "separate"] = Field(
        "joint",
        description="joint: lm-eval's own (context + answer encoded as one string; comparable "
        "with published scores; as chla's SFT encodes its examples); separate: prompt and answer "
        "encoded each on its own, as the original project's SFT did",
    )

    @field_validator("include_path", "alpaca_tasks")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        return [os.path.abspath(os.path.expanduser(path)) for path in paths]

    @model_validator(mode="after")
    def _some_task(self) -> LmEvalParams:
        if not (self.tasks or self.alpaca_tasks):
            raise ValueError("give lm_eval.tasks or lm_eval.alpaca_tasks")
        return self


class VllmParams(StageParams):
    """LLM(...) settings of the vLLM backend (chla_tools.vllm_backend)."""

    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model is split over")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)


class EvaluateParams(StageParams):
    """perplexity per token/char, task scores beside baselines, prompt generations; sharded, then aggregated"""

    model: Annotated[str, InputPath()] = Field(description="HF model directory (merged, or the base)")
    adapters: Annotated[list[str], InputPath()] = Field(
        default_factory=list, description="peft LoRA adapters applied on top, in training order"
    )
    ppl: Annotated[list[str], InputPath()] = Field(
        default_factory=list, description="held-out text files (one paragraph a line) for perplexity"
    )
    tasks: Annotated[list[str], InputPath()] = Field(
        default_factory=list,
        description="Alpaca-format labelled files, scored by their records' `task` "
        "(sentiment, segmentation, entities, continuation) beside its baselines, else by exact match",
    )
    prompts: Annotated[list[str], InputPath()] = Field(
        default_factory=list, description='JSONL {"prompt": ...} (or Alpaca) files to generate for'
    )
    batch_size: int = Field(8, ge=1, description="sequences per forward pass / generate call")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="generation length for every input; default: "
        "each task's own (chla_tools.tasks), 64 for prompts and untyped files",
    )
    block_size: int | None = Field(None, ge=2, description="perplexity window; default max_position_embeddings")
    template: Literal["alpaca", "chat", "none"] = Field(
        "alpaca",
        description="the prompt template SFT trained with: alpaca, chat (the tokenizer's chat template) or "
        "none (instructions and prompts as they are); true and false mean alpaca and none",
    )
    max_items: int | None = Field(None, ge=1, description="evaluate only the first N lines/records of every input")
    sample: int | None = Field(
        None,
        ge=1,
        description="score a random sample of N records of every task file (seeded by sample_seed; the "
        "whole file when it has fewer); the results give the sample size beside each score's 95% interval",
    )
    sample_seed: int = Field(0, description="seed of the task files' samples")
    lm_eval: LmEvalParams | None = Field(None, description="also run lm-evaluation-harness on the model")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="generation for tasks and prompts: transformers, or vLLM on a GPU node (merged model)"
    )
    vllm: VllmParams = Field(default_factory=VllmParams)

    @field_validator("template", mode="before")
    @classmethod
    def _template_switch(cls, value: object) -> object:
        # recipes written when the template was a switch
        return {True: "alpaca", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _something_to_do(self) -> EvaluateParams:
        if not (self.ppl or self.tasks or self.prompts or self.lm_eval):
            raise ValueError("give at least one of ppl, tasks, prompts, lm_eval")
        if self.backend == "vllm" and (self.ppl or self.lm_eval or self.adapters):
            raise ValueError(
                "backend vllm only generates (tasks, prompts) with a merged model; evaluate "
                "ppl and lm_eval, or a model with adapters, with backend hf"
            )
        return self


KIND = StageKind(
    "evaluate",
    EvaluateParams,
    "chla_train.stages.evaluate:run",
    finalize="chla_train.stages.evaluate:finalize",
    array=True,
)
