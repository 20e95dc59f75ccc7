"""`pretrain` stage: continued pretraining of a LLaMA-family model on a pre-tokenized corpus.

Reads top to bottom like the recipe: load the tokenizer and the corpus blocks, build the base
model resized to the tokenizer, make the part that trains trainable (new embedding rows, LoRA,
or everything), train on DeepSpeed (resuming from the last checkpoint by itself), save the
adapter or model with the tokenizer. The loop and why it is not HF Trainer: chla_train.trainer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.pretrain import PretrainParams
from chla_train import model as models
from chla_train.context import StageContext
from chla_train.determinism import apply_determinism
from chla_train.export import save_adapter, save_model
from chla_train.precision import choose_precision
from chla_train.token_rows import new_token_rows
from chla_train.trainer import (
    HEADLINE,
    TrainData,
    Trainer,
    init_distributed,
    model_loading,
    save_train_summary,
    total_steps,
    train_summary,
)


def pretraining_data(params, vocab_size: int, *, world_size: int, log) -> tuple[TrainData, dict[str, Any]]:
    """Training and validation blocks of the corpus, or of a weighted blend of corpora
    (chla_tools.blocks.WeightedBlend: each corpus held out and drawn by weight, in a fixed order).
    Returns the data and the facts the run records (per-corpus sample counts of a blend)."""
    from chla_tools.blocks import BlendSource, BlockDataset, ItemList, WeightedBlend, part_name, split_indices

    sources = []
    for part in params.corpus:
        blocks = BlockDataset(part.path, params.block_size)
        if len(blocks) < 2:
            raise ChlaError(
                f"corpus {part.path}: only {len(blocks)} block(s) of {params.block_size} "
                "tokens; pre-tokenize more text or lower block_size"
            )
        if blocks.corpus.vocab_size > vocab_size:
            raise ChlaError(
                f"corpus {part.path}: pre-tokenized with a {blocks.corpus.vocab_size}-token "
                f"vocabulary, larger than the tokenizer's {vocab_size}; pre-tokenize it with this "
                "stage's tokenizer"
            )
        train_idx, valid_idx = split_indices(
            len(blocks), valid_count=params.valid_count, valid_fraction=params.valid_fraction, seed=params.seed
        )
        sources.append((BlendSource(part.name or part_name(part.path), blocks, train_idx, part.weight), valid_idx))
        log(
            f"corpus {sources[-1][0].name}: {len(train_idx)} training and {len(valid_idx)} validation "
            f"blocks of {params.block_size}"
        )
    if len(sources) == 1:  # one corpus: shuffled epoch by epoch, no blend
        ((source, valid_idx),) = sources
        return TrainData(
            train_set=source.dataset,
            train_indices=source.indices,
            valid_set=source.dataset,
            valid_indices=valid_idx,
            collate=collate_blocks,
        ), {}

    global_batch = params.micro_batch_size * params.gradient_accumulation_steps * world_size
    steps = total_steps(params, sum(len(source.indices) for source, _ in sources), world_size)
    blend = WeightedBlend([source for source, _ in sources], steps * global_batch, seed=params.seed)
    valid = ItemList([(source.dataset, int(i)) for source, valid_idx in sources for i in valid_idx])
    counts = blend.counts()
    log(
        "blend: "
        + ", ".join(
            f"{name} {count} samples ({weight:.1%})" for (name, count), weight in zip(counts.items(), blend.weights)
        )
    )
    facts = {
        "corpus_weights": {s.name: round(float(w), 6) for (s, _), w in zip(sources, blend.weights)},
        "corpus_samples": counts,
    }
    return TrainData(
        train_set=blend,
        train_indices=np.arange(len(blend)),
        valid_set=valid,
        valid_indices=np.arange(len(valid)),
        collate=collate_blocks,
        shuffle=False,
        steps=steps,
    ), facts


def collate_blocks(blocks: list[np.ndarray]) -> dict[str, np.ndarray]:
    input_ids = np.stack(blocks).astype(np.int64)
    return {"input_ids": input_ids, "labels": input_ids}


def run(ctx: StageContext[PretrainParams]) -> dict[str, Any]:
    params = ctx.params
    ctx.enable_cooperative_preemption()
    precision = choose_precision(params.precision)
    dtype = precision.dtype
    ctx.log(f"precision {precision.name}: {precision.reason}")
    determinism = apply_determinism(params.deterministic)  # before the model is built
    ctx.log(determinism.reason)

    # 1. Inputs: every check before DeepSpeed starts, so a bad input costs seconds.
    tokenizer = models.load_tokenizer(params.tokenizer)
    data, corpus_facts = pretraining_data(params, len(tokenizer), world_size=ctx.dist.world_size, log=ctx.log)

    # 2. Model: base, resized to the tokenizer, then what trains (under ZeRO-3, partitioned over
    #    the ranks as it loads).
    with model_loading(ctx, params, dtype=dtype):
        model, base_rows = models.base_model_for(params, len(tokenizer), dtype=dtype, stage=ctx.stage, log=ctx.log)
        if params.mode == "embeddings":
            models.setup_embeddings_training(
                model,
                base_rows=base_rows,
                new_rows_only=params.new_rows_only,
                train_lm_head=params.train_lm_head,
                where=ctx.stage,
            )
        elif params.mode == "lora":
            rows = new_token_rows(params, base_rows, len(tokenizer), where=ctx.stage)
            model = models.apply_stage_lora(model, params, stage=ctx.stage, new_token_rows=rows, log=ctx.log)
    trainable, total = models.count_parameters(model)
    ctx.log(
        f"mode {params.mode}: {trainable:,} of {total:,} parameters train; vocabulary "
        f"{base_rows} -> {len(tokenizer)} rows ({params.new_row_init} init)"
    )

    # 3. Train.
    init_distributed(ctx)
    trainer = Trainer(ctx, model, data, params, dtype=dtype)
    result = trainer.train()

    # 4. Save: an adapter for LoRA, a whole HF model otherwise.
    facts = {
        "stage": ctx.stage,
        "kind": "pretrain",
        "mode": params.mode,
        "base_rows": base_rows,
        "vocab_size": len(tokenizer),
        "step": result.step,
        "tokens_seen": result.tokens_seen,
        "new_row_init": params.new_row_init,
        **precision.record(),
        **trainer.compile_choice.record(),
        **determinism.record(),
        **corpus_facts,
    }
    if params.mode == "lora":
        save_adapter(trainer, tokenizer, ctx.out_dir, facts)
    else:
        save_model(trainer, tokenizer, ctx.out_dir, facts)
    trainer.finish()
    summary = train_summary(facts, result, trainable=trainable, total=total, world_size=ctx.dist.world_size)
    return save_train_summary(ctx, summary, (*HEADLINE, "tokens_per_s", *corpus_facts))
