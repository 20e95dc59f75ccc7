"""SFT step time on the demo's model: padded, length-grouped and packed micro-batches (with and
without a shared prompt prefix); the AdamW step unfused (torch's default on CPU) and fused (chla's).

Five configurations run through chla's own training loop (chla_train.trainer, DeepSpeed, ZeRO 0,
1 rank, bf16 where the CPU has it) in one process, taking turns step by step so that all see the
same machine load. Each optimizer step is 16 sentiment reviews of the demo's SFT data in the
Alpaca template (prompt masked), LoRA r 16 on every projection plus embed_tokens and lm_head
trained in full, as in the demo's `sft` stage:

  padded        random batches, each padded to its longest review   (the demo before session 2)
  grouped       length-grouped batches (group_by_length)              (the demo until now)
  packed        random batches packed into rows of 256 tokens, each review attending only to
                itself (pack_batches)
  packed+fused  the same with the fused AdamW kernel
  shared+fused  packed, the prompt prefix all 16 share (template + instruction, ~half of each
                example) computed once per row (share_prompt_prefix)   (the demo now)

All run with the job entry's malloc setting (chla_train.freed_memory.keep_freed_memory), as stages do.
The first three use an unfused AdamW (torch's default on CPU; chla_train.trainer.build_optimizer
is patched for that), so that the batch layouts and the optimizer are compared separately.
Grouping is fast but puts long and short reviews in different batches, and in this data length
correlates with the label (the longest fifth is ~70% positive, the rest ~40%): packing keeps the
random batches that gave the better accuracy at grouped speed or better.

Model: the demo's base config (hidden 256, 4 layers) with a 50,702-row vocabulary, randomly
initialised (step time does not depend on the weights). Reviews are tokenized with --tokenizer
(default: the demo's base tokenizer, where reviews are ~2x longer than with the merged one; pass
a run's runs/demo/vocab_sft/out/tokenizer for the demo's exact lengths).

Every configuration computes the same loss for the same batch (tests/data/test_sft.py checks
padded, packed and shared-prefix rows against each other); only grouped draws other batches.

Usage: python benchmarks/sft_step.py [--steps 12] [--warmup 2] [--tokenizer DIR]
Last line: RESULT shared_fused_vs_grouped=<x> shared_fused_vs_padded=<y> examples_per_s=<z>
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from common import exit_skipping_teardown  # benchmarks/, on sys.path when run as a script
from machine import print_machine  # benchmarks/, on sys.path when run as a script
from train_throughput import make_context

from chla_train.model_config import llama_config
from chla_train.trainer import build_optimizer as FUSED_BUILD_OPTIMIZER

MICRO_BATCH = 16
MAX_SEQ_LENGTH = 256
VOCAB = 50702
MODEL = llama_config(vocab=VOCAB, hidden=256, intermediate=688, layers=4, heads=4, positions=512)
CONFIGS = {  # tag: (batch layout, fused optimizer)
    "padded": ("padded", False),
    "grouped": ("grouped", False),
    "packed": ("packed", False),
    "packed+fused": ("packed", True),
    "shared+fused": ("shared", True),
}


def unfused_adamw(model, params) -> torch.optim.Optimizer:
    """build_optimizer's groups with torch's default (for-each-tensor) AdamW implementation."""
    fused = FUSED_BUILD_OPTIMIZER(model, params)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in fused.param_groups]
    return torch.optim.AdamW(groups, lr=params.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def build(tag: str, layout: str, fused: bool, dataset, pad_id: int, root: Path) -> dict:
    from chla_launcher.contract.kinds.sft import SftParams
    from chla_tools.blocks import ResumableSampler
    from chla_tools.sft_data import sft_collate
    from chla_train import model as models
    from chla_train import trainer as trainers
    from chla_train.precision import choose_precision

    params = SftParams(
        model="-",
        tokenizer="-",
        train_file="-",
        max_seq_length=MAX_SEQ_LENGTH,
        micro_batch_size=MICRO_BATCH,
        max_steps=1000,
        learning_rate=1e-3,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        zero_stage=0,
        eval_steps=0,
        save_steps=0,
        group_by_length=layout == "grouped",
        pack_batches=layout in ("packed", "shared"),
        share_prompt_prefix=layout == "shared",
    )
    ctx = make_context(tag.replace("+", "_"), params, root, kind="sft")
    trainers.init_distributed(ctx)
    model = models.build_base_model(None, MODEL, dtype=torch.float32, attn_implementation="sdpa", seed=0)
    model = models.apply_stage_lora(model, params, stage=tag)
    collate = sft_collate(
        pad_id, pack_batches=params.pack_batches, row_length=MAX_SEQ_LENGTH, share_prefix=params.share_prompt_prefix
    )
    data = trainers.TrainData(
        train_set=dataset, train_indices=range(len(dataset)), valid_set=dataset, valid_indices=[], collate=collate
    )
    with mock.patch.object(trainers, "build_optimizer", FUSED_BUILD_OPTIMIZER if fused else unfused_adamw):
        trainer = trainers.Trainer(ctx, model, data, params, dtype=choose_precision("auto").dtype)
    trainer.engine.train()
    # The trainer's own sampler: grouped batches come from the lengths, as in the stage.
    lengths = dataset.lengths if layout == "grouped" else None
    sampler = ResumableSampler(
        np.arange(len(dataset)),
        seed=params.seed,
        global_batch_size=MICRO_BATCH,
        lengths=lengths,
        length_group=64 * MICRO_BATCH,
    )
    return {"trainer": trainer, "samples": iter(sampler), "seconds": [], "tokens": [], "loss": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for the reviews (default: demo base)")
    args = parser.parse_args()
    print_machine()

    from chla_tools.assets import fetch_assets
    from chla_tools.sft_data import load_sft_dataset, load_sft_tokenizer
    from chla_train.freed_memory import keep_freed_memory

    keep_freed_memory()  # as every stage task does
    assets = fetch_assets(offline=True)
    tokenizer_dir = args.tokenizer or assets["base_tokenizer"]
    print(f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads); torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="chla-bench-") as tmp:
        dataset = load_sft_dataset(
            assets["sft_train"], tokenizer_dir, max_seq_length=MAX_SEQ_LENGTH, cache_dir=Path(tmp) / "cache"
        )
        pad_id = load_sft_tokenizer(tokenizer_dir).pad_token_id
        print(
            f"data: {len(dataset)} reviews of {dataset.lengths.mean():.0f} tokens on average ({tokenizer_dir})",
            flush=True,
        )
        runs = {tag: build(tag, layout, fused, dataset, pad_id, Path(tmp)) for tag, (layout, fused) in CONFIGS.items()}
        for step in range(args.steps):
            order = list(runs) if step % 2 == 0 else list(reversed(runs))
            for tag in order:
                run = runs[tag]
                started = time.perf_counter()
                run["loss"], tokens, _ = run["trainer"].optimizer_step(run["samples"])
                run["seconds"].append(time.perf_counter() - started)
                run["tokens"].append(tokens)
            print(
                f"step {step + 1}/{args.steps}: "
                + "  ".join(f"{tag} {runs[tag]['seconds'][-1]:.3f} s" for tag in runs),
                flush=True,
            )
    results = {}
    for tag, run in runs.items():
        # Median over the timed steps: the batches differ in length from step to step, so the
        # minimum would pick the shortest batch rather than the least disturbed step.
        seconds = float(np.median(run["seconds"][args.warmup :]))
        tokens = float(np.sum(run["tokens"][args.warmup :]) / np.sum(run["seconds"][args.warmup :]))
        results[tag] = seconds
        print(
            f"{tag:13s} median step {seconds:.3f} s  {MICRO_BATCH / seconds:6.1f} reviews/s  "
            f"{tokens:7.0f} computed tokens/s",
            flush=True,
        )
    best = results["shared+fused"]
    print(
        f"RESULT shared_fused_vs_grouped={results['grouped'] / best:.2f} "
        f"shared_fused_vs_padded={results['padded'] / best:.2f} examples_per_s={MICRO_BATCH / best:.1f}",
        flush=True,
    )
    exit_skipping_teardown()


if __name__ == "__main__":
    main()
