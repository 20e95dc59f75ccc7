"""`sft` stage: LoRA instruction tuning on Alpaca-format data.

The steps are chla_train.training_workflow's; what instruction tuning fills in: the tokenizer
(with a [PAD] token added if it has none, as the original did), the data (prompt tokens masked
with -100, target = output + eos; several files and replay corpora as a blend), and what trains
(a new LoRA adapter or an earlier one continued, on the base resized to the tokenizer, pad
included). It saves the adapter with the tokenizer (and its pad token) beside it.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.sft import SftParams
from chla_train import model as models
from chla_train.context import StageContext
from chla_train.token_rows import new_token_rows
from chla_train.trainer import TrainData, rank_zero_first, total_steps
from chla_train.training_workflow import StageInputs, TrainingWorkflow


def run(ctx: StageContext[SftParams]) -> dict[str, Any]:
    return InstructionTuning(ctx).run()


class InstructionTuning(TrainingWorkflow[SftParams]):
    kind = "sft"

    def load_inputs(self) -> StageInputs:
        from chla_tools.sft_data import load_sft_tokenizer, load_stage_examples

        ctx, params = self.ctx, self.params
        # The tokenizer gets a pad token ("[PAD]") if it has none, as the data reader's.
        self.base_vocab = len(models.load_tokenizer(params.tokenizer))
        tokenizer = load_sft_tokenizer(params.tokenizer)
        if len(tokenizer) != self.base_vocab:
            ctx.log(f"tokenizer has no pad token: added {tokenizer.pad_token} (id {tokenizer.pad_token_id})")
        # Rank 0 tokenizes into the content-addressed cache; the other ranks then read it (a rank
        # that finds no entry, as on a node-local cache, builds the same one itself).
        load = partial(load_stage_examples, params=params)
        data, blend_facts, data_stats = instruction_data(
            params,
            lambda path: rank_zero_first(ctx, partial(load, path)),
            tokenizer,
            world_size=ctx.dist.world_size,
            log=ctx.log,
        )
        return StageInputs(tokenizer, data, data_facts=blend_facts, summary_facts={"data_stats": _jsonable(data_stats)})

    def prepare_model(self, model: Any, *, base_rows: int, tokenizer: Any) -> Any:
        model.config.pad_token_id = tokenizer.pad_token_id
        added_here = len(tokenizer) - self.base_vocab  # the [PAD] row, if this stage added it
        rows = new_token_rows(self.params, base_rows, len(tokenizer), where=self.ctx.stage, added_here=added_here)
        return models.apply_stage_lora(model, self.params, stage=self.ctx.stage, new_token_rows=rows, log=self.ctx.log)

    def describe_model(self, *, trainable: int, total: int, base_rows: int, tokenizer: Any) -> str:
        return f"LoRA: {trainable:,} of {total:,} parameters train; vocabulary {base_rows} -> {len(tokenizer)}"

    def model_facts(self, *, base_rows: int, tokenizer: Any) -> dict[str, Any]:
        return {"base_rows": base_rows, "vocab_size": len(tokenizer), "pad_token": tokenizer.pad_token}


def instruction_data(params, load, tokenizer, *, world_size: int, log) -> tuple[TrainData, dict, Any]:
    """The training and validation examples: of one instruction file; or, with several files or
    replay, a WeightedBlend of every file (their weights scaled to 1 - replay_weight) and of the
    replay corpora (chla_tools.sft_replay; scaled to replay_weight), read in its fixed order, for
    as many steps as the instruction examples alone need (num_epochs) or max_steps. Returns the
    data, the facts the run records (samples per part of a blend) and the files' reading stats."""
    from chla_tools.blocks import BlendSource, ItemList, WeightedBlend, part_name, split_indices
    from chla_tools.sft_data import sft_collate
    from chla_tools.sft_replay import ReplayBlocks, collate_with_replay

    valid_set = load(params.valid_file) if params.valid_file else None
    parts, valid_picks = [], []
    for part in params.train_file:
        dataset = load(part.path)
        if dataset.pad_id != tokenizer.pad_token_id:
            raise RuntimeError(f"pad id mismatch: data {dataset.pad_id}, tokenizer {tokenizer.pad_token_id}")
        if valid_set is None:
            train_idx, valid_idx = split_indices(len(dataset), valid_fraction=params.valid_fraction, seed=params.seed)
            valid_picks += [(dataset, int(i)) for i in valid_idx]
        else:
            train_idx = np.arange(len(dataset))
        if len(train_idx) == 0:
            raise ChlaError(f"train_file {part.path}: no usable records")
        parts.append(BlendSource(part.name or part_name(part.path), dataset, train_idx, part.weight))
        cached = " (tokenized earlier: read from the cache)" if dataset.from_cache else ""
        log(f"data {parts[-1].name}: {len(train_idx)} training examples{cached}")
    collate = sft_collate(
        tokenizer.pad_token_id,
        pack_batches=params.pack_batches,
        row_length=params.max_seq_length,
        share_prefix=params.share_prompt_prefix,
        example_mean=params.loss_mean == "example",
    )
    if valid_set is None:
        valid_set = parts[0].dataset if len(parts) == 1 else ItemList(valid_picks)
        valid_idx = np.asarray(valid_idx) if len(parts) == 1 else np.arange(len(valid_set))
    else:
        valid_idx = np.arange(len(valid_set))
    log(f"data: {sum(len(p.indices) for p in parts)} training and {len(valid_idx)} validation examples")
    stats = (
        getattr(parts[0].dataset, "stats", None)
        if len(parts) == 1
        else {p.name: getattr(p.dataset, "stats", None) for p in parts}
    )
    if len(parts) == 1 and not params.replay_corpus:
        part = parts[0]
        return (
            TrainData(
                train_set=part.dataset,
                train_indices=part.indices,
                valid_set=valid_set,
                valid_indices=valid_idx,
                collate=collate,
                train_lengths=part.dataset.lengths if params.group_by_length else None,
            ),
            {},
            stats,
        )

    replay_share = params.replay_weight if params.replay_corpus else 0.0
    sources = [
        BlendSource(p.name, p.dataset, p.indices, p.weight / sum(q.weight for q in parts) * (1 - replay_share))
        for p in parts
    ]
    for part in params.replay_corpus or []:
        blocks = ReplayBlocks(part.path, params.replay_block_size, len(tokenizer))
        share = part.weight / sum(q.weight for q in params.replay_corpus) * replay_share
        sources.append(
            BlendSource(f"replay:{part.name or part_name(part.path)}", blocks, np.arange(len(blocks)), share)
        )
    examples = sum(len(p.indices) for p in parts)
    steps = total_steps(params, math.ceil(examples / (1 - replay_share)), world_size)
    global_batch = params.micro_batch_size * params.gradient_accumulation_steps * world_size
    blend = WeightedBlend(sources, steps * global_batch, seed=params.seed)
    counts = blend.counts()
    log(
        "blend: "
        + ", ".join(
            f"{name} {count} samples ({weight:.1%})" for (name, count), weight in zip(counts.items(), blend.weights)
        )
    )
    if params.replay_corpus:
        collate = collate_with_replay(collate, tokenizer.pad_token_id, weighted=params.loss_mean == "example")
    return (
        TrainData(
            train_set=blend,
            train_indices=np.arange(len(blend)),
            valid_set=valid_set,
            valid_indices=valid_idx,
            collate=collate,
            shuffle=False,
            steps=steps,
        ),
        {"blend_samples": counts},
        stats,
    )


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))
