"""`sft` stage: LoRA instruction tuning on Alpaca-format data.

Load the tokenizer (adding a [PAD] token if it has none, as the original did) and the
instruction data (prompt tokens masked with -100, target = output + eos), build the base model
resized to the tokenizer, add a new LoRA adapter or continue an earlier one, train on DeepSpeed
(resuming by itself), save the adapter with the tokenizer. The loop: chla_train.trainer.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from chla_launcher.atomic import write_json
from chla_launcher.errors import ChlaError
from chla_train import model as models
from chla_train.export import save_adapter
from chla_train.trainer import (TrainData, Trainer, init_distributed, model_loading, rank_zero_first,
                                shutdown_distributed, train_summary)

def run(ctx) -> dict[str, Any]:
    from chla_tools.blocks import split_indices
    from chla_tools.sft_data import load_sft_dataset, load_sft_tokenizer, sft_collate

    params = ctx.params
    ctx.enable_cooperative_preemption()
    dtype = models.resolve_dtype(params.precision)

    # 1. Inputs. The tokenizer gets a pad token ("[PAD]") if it has none, as the data reader's.
    base_vocab = len(models.load_tokenizer(params.tokenizer))
    tokenizer = load_sft_tokenizer(params.tokenizer)
    if len(tokenizer) != base_vocab:
        ctx.log(f"tokenizer has no pad token: added {tokenizer.pad_token} (id {tokenizer.pad_token_id})")
    # Rank 0 tokenizes into the stage's cache; the other ranks then read it.
    load = partial(load_sft_dataset, tokenizer_dir=params.tokenizer, max_seq_length=params.max_seq_length,
                   template=params.template, on_bad_record=params.on_bad_record,
                   cache_dir=ctx.work_dir / "sft_cache", packing=params.packing)
    train_set = rank_zero_first(ctx, partial(load, params.train_file))
    if params.valid_file:
        valid_set = rank_zero_first(ctx, partial(load, params.valid_file))
        train_idx, valid_idx = list(range(len(train_set))), list(range(len(valid_set)))
    else:
        valid_set = train_set
        train_idx, valid_idx = split_indices(len(train_set), valid_fraction=params.valid_fraction,
                                             seed=params.seed)
    if train_set.pad_id != tokenizer.pad_token_id:
        raise RuntimeError(f"pad id mismatch: data {train_set.pad_id}, tokenizer {tokenizer.pad_token_id}")
    if len(train_idx) == 0:
        raise ChlaError(f"{ctx.stage}.train_file {params.train_file}: no usable records")
    ctx.log(f"data: {len(train_idx)} training and {len(valid_idx)} validation examples")

    # 2. Model: base resized to the tokenizer (pad included), then the LoRA adapter (under ZeRO-3,
    #    partitioned over the ranks as it loads).
    with model_loading(ctx, params, dtype=dtype):
        model, base_rows = models.base_model_for(params, len(tokenizer), dtype=dtype, stage=ctx.stage)
        model.config.pad_token_id = tokenizer.pad_token_id
        model = models.apply_lora(model, r=params.lora_r, alpha=params.lora_alpha, dropout=params.lora_dropout,
                                  target_modules=params.lora_target_modules,
                                  modules_to_save=params.modules_to_save, init_adapter=params.init_adapter,
                                  key_prefix=ctx.stage, seed=params.seed, log=ctx.log)
    trainable, total = models.count_parameters(model)
    ctx.log(f"LoRA: {trainable:,} of {total:,} parameters train; vocabulary {base_rows} -> {len(tokenizer)}")

    # 3. Train.
    init_distributed(ctx)
    collate = sft_collate(tokenizer.pad_token_id, pack_batches=params.pack_batches,
                          row_length=params.max_seq_length, share_prefix=params.share_prompt_prefix)
    data = TrainData(train_set=train_set, train_indices=train_idx, valid_set=valid_set,
                     valid_indices=valid_idx, collate=collate,
                     train_lengths=train_set.lengths if params.group_by_length else None)
    trainer = Trainer(ctx, model, data, params, dtype=dtype)
    result = trainer.train()

    # 4. Save the adapter and the tokenizer (with its pad token) beside it.
    facts = {"stage": ctx.stage, "kind": "sft", "base_rows": base_rows, "vocab_size": len(tokenizer),
             "pad_token": tokenizer.pad_token, "step": result.step, "tokens_seen": result.tokens_seen}
    save_adapter(trainer, tokenizer, ctx.out_dir, facts)
    trainer.finish()
    summary = train_summary(facts, result, trainable=trainable, total=total, world_size=ctx.dist.world_size)
    summary["data_stats"] = _jsonable(getattr(train_set, "stats", None))
    if ctx.dist.is_main:
        write_json(ctx.out_dir / "train_summary.json", summary)
    shutdown_distributed()
    return {k: summary[k] for k in ("step", "tokens_seen", "train_loss", "eval_loss", "first_eval_loss")}


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))
