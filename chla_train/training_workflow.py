"""The training workflow of the `pretrain` and `sft` stages: one recipe, read top to bottom in
`TrainingWorkflow.run`, that each stage specialises with only what differs.

    0. Setup: precision and determinism, before the model is built.
    1. Inputs: the tokenizer and the data.                            stage: `load_inputs`
       (pretrain: corpus blocks or a blend of corpora; sft: instruction examples and replay)
    2. Model: the base resized to the tokenizer, then the part that   stage: `prepare_model`
       trains (embeddings mode, LoRA, new rows), counted.
    3. Train on DeepSpeed, resuming from the last checkpoint by itself (chla_train.trainer).
    4. Save the adapter or the whole model with the tokenizer and      stage: `saves_adapter`,
       the run's facts.                                                       `model_facts`
    5. Summary: out/train_summary.json and the headline figures       stage: `headline` and
       the job records.                                                      the inputs' facts

A stage is a subclass that fills in those methods; its runner is `run(ctx)`:
`Pretraining(ctx).run()`. The loop itself, and why it is not HF Trainer: chla_train.trainer.
The job entry (chla_train.entry) calls the runner; nothing here imports the entry.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic

import torch
import torch.distributed as dist

from chla_launcher.contract.atomic import write_json
from chla_train import model as models
from chla_train.context import ParamsT, StageContext
from chla_train.determinism import apply_determinism
from chla_train.export import save_adapter, save_model
from chla_train.freed_memory import return_freed_memory
from chla_train.precision import choose_precision
from chla_train.trainer import TrainData, Trainer, TrainResult, deepspeed_config, init_distributed

# The figures of train_summary.json a training stage returns to its job (state.json, chla status).
HEADLINE = (
    "step",
    "tokens_seen",
    "train_loss",
    "eval_loss",
    "first_eval_loss",
    "precision",
    "precision_reason",
    "torch_compile",
    "deterministic",
)


@dataclass
class StageInputs:
    """What step 1 gives the rest of the workflow."""

    tokenizer: Any
    data: TrainData
    # Facts of the data the run records with the model, in its summary and in the headline
    # figures (a blend's samples per corpus or per part).
    data_facts: dict[str, Any] = field(default_factory=dict)
    # Facts only the summary records, after everything else (sft: how the files read).
    summary_facts: dict[str, Any] = field(default_factory=dict)


class TrainingWorkflow(Generic[ParamsT]):
    """One training stage; subclasses fill in the steps marked "stage" in the module docstring."""

    kind: ClassVar[str]
    headline: ClassVar[tuple[str, ...]] = HEADLINE

    def __init__(self, ctx: StageContext[ParamsT]) -> None:
        self.ctx = ctx
        self.params: Any = ctx.params

    # --- what a stage specialises ---------------------------------------------------------------

    def load_inputs(self) -> StageInputs:
        """Step 1: the tokenizer and the data, every check before DeepSpeed starts (a bad input
        then costs seconds)."""
        raise NotImplementedError

    def prepare_model(self, model: Any, *, base_rows: int, tokenizer: Any) -> Any:
        """Step 2: make the part that trains trainable in the base model (`base_rows`: its rows
        before the resize); returns the model to train."""
        raise NotImplementedError

    def describe_model(self, *, trainable: int, total: int, base_rows: int, tokenizer: Any) -> str:
        """Step 2's log line: what trains."""
        raise NotImplementedError

    def model_facts(self, *, base_rows: int, tokenizer: Any) -> dict[str, Any]:
        """Step 4: what the run records about the model it trained, in the order chla_training.json
        and train_summary.json list them (after the stage and its kind)."""
        raise NotImplementedError

    def saves_adapter(self) -> bool:
        """Step 4: an adapter (LoRA) rather than a whole HF model."""
        return True

    # --- the recipe -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        ctx, params = self.ctx, self.params
        ctx.enable_cooperative_preemption()

        # 0. Setup.
        precision = choose_precision(params.precision)
        dtype = precision.dtype
        ctx.log(f"precision {precision.name}: {precision.reason}")
        determinism = apply_determinism(params.deterministic)  # before the model is built
        ctx.log(determinism.reason)

        # 1. Inputs.
        inputs = self.load_inputs()
        tokenizer = inputs.tokenizer

        # 2. Model: the base, resized to the tokenizer, then what trains (under ZeRO-3, partitioned
        #    over the ranks as it loads).
        with model_loading(ctx, params, dtype=dtype):
            model, base_rows = models.base_model_for(params, len(tokenizer), dtype=dtype, stage=ctx.stage, log=ctx.log)
            model = self.prepare_model(model, base_rows=base_rows, tokenizer=tokenizer)
        trainable, total = models.count_parameters(model)
        ctx.log(self.describe_model(trainable=trainable, total=total, base_rows=base_rows, tokenizer=tokenizer))

        # 3. Train.
        init_distributed(ctx)
        trainer = Trainer(ctx, model, inputs.data, params, dtype=dtype)
        result = trainer.train()

        # 4. Save: the adapter or the model, the tokenizer beside it, and the run's facts.
        facts = {
            "stage": ctx.stage,
            "kind": self.kind,
            **self.model_facts(base_rows=base_rows, tokenizer=tokenizer),
            "step": result.step,
            "tokens_seen": result.tokens_seen,
            "new_row_init": params.new_row_init,
            **precision.record(),
            **trainer.compile_choice.record(),
            **determinism.record(),
            **inputs.data_facts,
        }
        if self.saves_adapter():
            save_adapter(trainer, tokenizer, ctx.out_dir, facts)
        else:
            save_model(trainer, tokenizer, ctx.out_dir, facts)
        trainer.finish()

        # 5. Summary.
        summary = train_summary(facts, result, trainable=trainable, total=total, world_size=ctx.dist.world_size)
        summary.update(inputs.summary_facts)
        return save_train_summary(ctx, summary, (*self.headline, *inputs.data_facts))


def model_loading(ctx, params, *, dtype: torch.dtype):
    """The context a stage builds its model in. Under ZeRO-3, a model loaded from a checkpoint is
    built partitioned over the ranks (chla_train.model.partitioned_loading): no rank ever holds
    all of it. Otherwise, and for an `init:` model (built whole, so that every ZeRO stage starts
    from the same random weights) or embeddings mode (which splits whole embedding matrices),
    each rank builds it whole and DeepSpeed partitions it when training starts."""
    from chla_train.model import gather_in_place_over_gloo, partitioned_loading

    if params.zero_stage == 3:
        # A rank holds its partition and, for a moment, the layer it computes, gathered once (not
        # staged twice by gloo); what it frees goes back to the kernel instead of staying kept
        # for reuse (chla_train.freed_memory).
        return_freed_memory()
        gather_in_place_over_gloo()
    config_file = Path(params.model or "-") / "config.json"
    if params.zero_stage != 3 or getattr(params, "mode", None) == "embeddings" or not config_file.is_file():
        return contextlib.nullcontext()
    init_distributed(ctx)
    hidden_size = json.loads(config_file.read_text())["hidden_size"]
    ctx.log(f"ZeRO-3: {params.model} is loaded partitioned over {ctx.dist.world_size} rank(s)")
    return partitioned_loading(
        deepspeed_config(params, dtype=dtype, world_size=ctx.dist.world_size, hidden_size=hidden_size)
    )


def train_summary(
    facts: dict[str, Any], result: TrainResult, *, trainable: int, total: int, world_size: int
) -> dict[str, Any]:
    """The train_summary.json of a training stage: its own facts plus the run's figures."""
    return {
        **facts,
        "trainable_params": trainable,
        "total_params": total,
        "world_size": world_size,
        "global_batch": result.global_batch,
        "samples_seen": result.samples_seen,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "first_eval_loss": result.first_eval_loss,
        "elapsed_s": round(result.elapsed_s, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "resumed_from_steps": result.resumed_from,
    }


def save_train_summary(ctx, summary: dict[str, Any], headline: Sequence[str] = HEADLINE) -> dict[str, Any]:
    """The last step of a training stage: write out/train_summary.json (rank 0), tear the process
    group down and return the `headline` figures of the summary."""
    if ctx.dist.is_main:
        write_json(ctx.out_dir / "train_summary.json", summary)
    shutdown_distributed()
    return {key: summary[key] for key in headline}


def shutdown_distributed() -> None:
    """Tear the process group down before the job entry exits (gloo leaves threads otherwise)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
