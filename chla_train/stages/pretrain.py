"""`pretrain` stage: continued pretraining of a LLaMA-family model on a pre-tokenized corpus.

Reads top to bottom like the recipe: load the tokenizer and the corpus blocks, build the base
model resized to the tokenizer, make the part that trains trainable (new embedding rows, LoRA,
or everything), train on DeepSpeed (resuming from the last checkpoint by itself), save the
adapter or model with the tokenizer. The loop and why it is not HF Trainer: chla_train.trainer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from chla_launcher.atomic import write_json
from chla_launcher.errors import ChlaError
from chla_train import model as models
from chla_train.export import save_adapter, save_model
from chla_train.trainer import (TrainData, Trainer, init_distributed, model_loading, shutdown_distributed,
                                train_summary)


def collate_blocks(blocks: list[np.ndarray]) -> dict[str, np.ndarray]:
    input_ids = np.stack(blocks).astype(np.int64)
    return {"input_ids": input_ids, "labels": input_ids}


def run(ctx) -> dict[str, Any]:
    from chla_tools.blocks import BlockDataset, split_indices

    params = ctx.params
    ctx.enable_cooperative_preemption()
    dtype = models.resolve_dtype(params.precision)

    # 1. Inputs: every check before DeepSpeed starts, so a bad input costs seconds.
    tokenizer = models.load_tokenizer(params.tokenizer)
    blocks = BlockDataset(params.corpus, params.block_size)
    if len(blocks) < 2:
        raise ChlaError(f"corpus {params.corpus}: only {len(blocks)} block(s) of {params.block_size} "
                        "tokens; pre-tokenize more text or lower block_size")
    train_idx, valid_idx = split_indices(len(blocks), valid_count=params.valid_count,
                                         valid_fraction=params.valid_fraction, seed=params.seed)
    ctx.log(f"corpus: {len(train_idx)} training and {len(valid_idx)} validation blocks of {params.block_size}")

    # 2. Model: base, resized to the tokenizer, then what trains (under ZeRO-3, partitioned over
    #    the ranks as it loads).
    with model_loading(ctx, params, dtype=dtype):
        model, base_rows = models.base_model_for(params, len(tokenizer), dtype=dtype, stage=ctx.stage)
        if params.mode == "embeddings":
            models.setup_embeddings_training(model, base_rows=base_rows, new_rows_only=params.new_rows_only,
                                             train_lm_head=params.train_lm_head, where=ctx.stage)
        elif params.mode == "lora":
            model = models.apply_lora(model, r=params.lora_r, alpha=params.lora_alpha,
                                      dropout=params.lora_dropout, target_modules=params.lora_target_modules,
                                      modules_to_save=params.modules_to_save,
                                      init_adapter=params.init_adapter, key_prefix=ctx.stage, seed=params.seed,
                                      log=ctx.log)
    trainable, total = models.count_parameters(model)
    ctx.log(f"mode {params.mode}: {trainable:,} of {total:,} parameters train; vocabulary "
            f"{base_rows} -> {len(tokenizer)} rows ({params.new_row_init} init)")

    # 3. Train.
    init_distributed(ctx)
    data = TrainData(train_set=blocks, train_indices=train_idx, valid_set=blocks,
                     valid_indices=valid_idx, collate=collate_blocks)
    trainer = Trainer(ctx, model, data, params, dtype=dtype)
    result = trainer.train()

    # 4. Save: an adapter for LoRA, a whole HF model otherwise.
    facts = {"stage": ctx.stage, "kind": "pretrain", "mode": params.mode, "base_rows": base_rows,
             "vocab_size": len(tokenizer), "step": result.step, "tokens_seen": result.tokens_seen}
    if params.mode == "lora":
        save_adapter(trainer, tokenizer, ctx.out_dir, facts)
    else:
        save_model(trainer, tokenizer, ctx.out_dir, facts)
    trainer.finish()
    summary = train_summary(facts, result, trainable=trainable, total=total, world_size=ctx.dist.world_size)
    if ctx.dist.is_main:
        write_json(ctx.out_dir / "train_summary.json", summary)
    shutdown_distributed()
    return {k: summary[k] for k in ("step", "tokens_seen", "train_loss", "eval_loss", "tokens_per_s")}
