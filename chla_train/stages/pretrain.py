"""`pretrain` stage: continued pretraining of a LLaMA-family model on a pre-tokenized corpus.

The steps are chla_train.training_workflow's; what pretraining fills in: the data (the corpus's
blocks, or a weighted blend of corpora), what trains (new embedding rows, LoRA, or everything, by
`mode`), and what it saves (an adapter for LoRA, a whole HF model otherwise).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.pretrain import PretrainParams
from chla_train import model as models
from chla_train.context import StageContext
from chla_train.token_rows import new_token_rows
from chla_train.trainer import TrainData, total_steps
from chla_train.training_workflow import HEADLINE, StageInputs, TrainingWorkflow


def run(ctx: StageContext[PretrainParams]) -> dict[str, Any]:
    return Pretraining(ctx).run()


class Pretraining(TrainingWorkflow[PretrainParams]):
    kind = "pretrain"
    headline = (*HEADLINE, "tokens_per_s")

    def load_inputs(self) -> StageInputs:
        tokenizer = models.load_tokenizer(self.params.tokenizer)
        data, corpus_facts = pretraining_data(
            self.params, len(tokenizer), world_size=self.ctx.dist.world_size, log=self.ctx.log
        )
        return StageInputs(tokenizer, data, data_facts=corpus_facts)

    def prepare_model(self, model: Any, *, base_rows: int, tokenizer: Any) -> Any:
        params, stage = self.params, self.ctx.stage
        if params.mode == "embeddings":
            models.setup_embeddings_training(
                model,
                base_rows=base_rows,
                new_rows_only=params.new_rows_only,
                train_lm_head=params.train_lm_head,
                where=stage,
            )
        elif params.mode == "lora":
            rows = new_token_rows(params, base_rows, len(tokenizer), where=stage)
            model = models.apply_stage_lora(model, params, stage=stage, new_token_rows=rows, log=self.ctx.log)
        return model

    def describe_model(self, *, trainable: int, total: int, base_rows: int, tokenizer: Any) -> str:
        return (
            f"mode {self.params.mode}: {trainable:,} of {total:,} parameters train; vocabulary "
            f"{base_rows} -> {len(tokenizer)} rows ({self.params.new_row_init} init)"
        )

    def model_facts(self, *, base_rows: int, tokenizer: Any) -> dict[str, Any]:
        return {"mode": self.params.mode, "base_rows": base_rows, "vocab_size": len(tokenizer)}

    def saves_adapter(self) -> bool:
        return self.params.mode == "lora"


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
