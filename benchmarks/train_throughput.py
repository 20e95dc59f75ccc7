"""Tokens/s and MFU of LoRA pretraining on CPU: chla's `pretrain` loop against the original project's own path.

  original  HF Trainer + PEFT with run_clm_pt_with_peft.py's arguments (scripts/training/run_pt.sh):
            per-device batch 1 x gradient accumulation 8, gradient checkpointing, LoRA r 8 alpha 32
            dropout 0.05 on q,k,v,o,gate,down,up, modules_to_save embed_tokens,lm_head, lr 2e-4
            cosine, warmup 0.05, weight decay 0.01, blocks of 512, DeepSpeed ZeRO-2 with
            ds_zero2_no_offload.json (fp16 there; here the run's precision), transformers' default
            attention (sdpa).
  chla      the `pretrain` stage's loop (chla_train.trainer) with the stage's defaults: micro-batch
            8 x accumulation 1, no gradient checkpointing, sdpa, DeepSpeed ZeRO-2; the same LoRA.

Both train the same model (the same seeded initialisation) on the same blocks in the same
precision (--precision, default chla's `auto`: bf16 where the CPU has native bf16, else fp32), in
one process and taking turns: the HF Trainer runs its own loop, and a callback at the end of each
of its optimizer steps runs one chla step, so both see the same machine load. Each side's time is
its best optimizer step after the warm-up (8 sequences of 512 tokens either way; load from other
processes only ever adds time). Both run with the job entry's malloc setting, as stages do.

MFU: model FLOPs per token (chla_launcher.sizing.flops_per_token: the frozen base weights need
activation gradients but no weight gradients; LoRA's own matmuls; the vocabulary projection at
every position, its weight gradient too since lm_head trains) x tokens/s, over this machine's
measured dense matmul rate in the same precision (best of 2048x2048 matmuls on all threads). The
6N count would call LoRA ~1.5x more work than it is.

Model: a ~10M-parameter LLaMA (hidden 128, 4 layers, the 32,000-row vocabulary being most of it),
on the demo's Chinese text through the demo base tokenizer.

Usage: python benchmarks/train_throughput.py [--steps 6] [--warmup 2] [--precision auto|bf16|fp32]
(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 makes an AVX-512 machine compute like the AVX2-only
EPYC.) Last line: RESULT speedup_vs_original=<x> tokens_per_s=<y> original_tokens_per_s=<z> mfu=<m>
original_mfu=<n> precision=<p>
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import exit_skipping_teardown  # benchmarks/, on sys.path when run as a script
from machine import print_machine  # benchmarks/, on sys.path when run as a script

from chla_train.model_config import llama_config

BLOCK = 512
MICRO_BATCHES = 8  # sequences per optimizer step, on both sides
MODEL = llama_config(hidden=128, intermediate=344, layers=4, heads=4, positions=BLOCK)
LORA_TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]  # run_pt.sh
MODULES_TO_SAVE = ["embed_tokens", "lm_head"]
SEED = 42


def original_deepspeed_config(bf16: bool) -> dict:
    """scripts/ds_zero2_no_offload.json, with two changes DeepSpeed 0.19 on CPU needs: a bf16
    block (fp16 fails on CPU) and an integer min_loss_scale (0.19 rejects 1e-10)."""
    return {
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 100,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": 2,
            "allgather_partitions": True,
            "allgather_bucket_size": 1e8,
            "overlap_comm": True,
            "reduce_scatter": True,
            "reduce_bucket_size": 1e8,
            "contiguous_gradients": True,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 2000,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }


def original_training_arguments(output_dir: str, *, bf16: bool, max_steps: int):
    """run_pt.sh's TrainingArguments (transformers 5 spells warmup_ratio as a fractional warmup_steps)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=MICRO_BATCHES,
        gradient_checkpointing=True,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.01,
        bf16=bf16,
        deepspeed=original_deepspeed_config(bf16),
        max_steps=max_steps,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=SEED,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )


def original_lora_config():
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=LORA_TARGETS,
        inference_mode=False,
        r=8,
        lora_alpha=32,
        lora_dropout=0.05,
        modules_to_save=MODULES_TO_SAVE,
    )


def corpus_blocks(num_blocks: int) -> list[np.ndarray]:
    """The demo's Chinese training text through the demo base tokenizer, in blocks of 512."""
    from transformers import AutoTokenizer

    from chla_tools.assets import fetch_assets

    assets = fetch_assets()
    tokenizer = AutoTokenizer.from_pretrained(assets["base_tokenizer"])
    text = Path(assets["zh_train"]).read_text(encoding="utf-8")[: num_blocks * BLOCK * 2]
    ids = np.resize(np.array(tokenizer(text).input_ids, dtype=np.int64), num_blocks * BLOCK)
    print(f"data: {num_blocks} blocks of {BLOCK} tokens of zh_train (demo base tokenizer)", flush=True)
    return [ids[i * BLOCK : (i + 1) * BLOCK] for i in range(num_blocks)]


def make_context(tag: str, params, root: Path, kind: str = "pretrain"):
    from chla_train.context import StageContext
    from chla_train.distributed import DistributedEnv

    dist = DistributedEnv(master_port=29000 + os.getpid() % 1000)
    return StageContext.standalone(root, tag, kind, params, dist=dist, fingerprint="bench")


def build_chla(
    blocks,
    precision: str,
    root: Path,
    *,
    model_config: dict = MODEL,
    attention: str = "sdpa",
    torch_compile: bool | str = "auto",
) -> dict:
    """The pretrain stage's trainer, as chla_train.stages.pretrain builds it, with its defaults."""
    from chla_launcher.contract.kinds.pretrain import PretrainParams
    from chla_tools.blocks import ResumableSampler
    from chla_train import model as models
    from chla_train.precision import choose_precision
    from chla_train.stages.pretrain import collate_blocks
    from chla_train.trainer import TrainData, Trainer, init_distributed

    params = PretrainParams(
        tokenizer="-",
        corpus="-",
        init=model_config,
        mode="lora",
        block_size=BLOCK,
        max_steps=10_000,
        save_steps=0,
        eval_steps=0,
        precision=precision,
        seed=SEED,
        attn_implementation=attention,
        torch_compile=torch_compile,
    )
    ctx = make_context("chla", params, root)
    init_distributed(ctx)
    dtype = choose_precision(precision).dtype
    model = models.build_base_model(
        None, params.init, dtype=dtype, attn_implementation=params.attn_implementation, seed=params.seed
    )
    model = models.apply_stage_lora(model, params, stage="chla")
    data = TrainData(
        train_set=blocks, train_indices=range(len(blocks)), valid_set=blocks, valid_indices=[], collate=collate_blocks
    )
    trainer = Trainer(ctx, model, data, params, dtype=dtype)
    trainer.engine.train()
    return {
        "trainer": trainer,
        "samples": iter(ResumableSampler(np.arange(len(blocks)), seed=SEED)),
        "seconds": [],
        "tokens": 0,
        "loss": None,
    }


def original_trainer(blocks, dtype: torch.dtype, max_steps: int, root: Path, callbacks, *, model_config: dict = MODEL):
    """HF Trainer + PEFT as run_clm_pt_with_peft.py sets them up (the model built as chla builds
    it from the same config and seed; the script loads it with from_pretrained)."""
    from peft import get_peft_model
    from transformers import Trainer, default_data_collator, set_seed

    from chla_train import model as models

    set_seed(SEED)  # the script's set_seed(training_args.seed), before the model is built
    model = models.build_base_model(None, model_config, dtype=dtype, attn_implementation="sdpa", seed=SEED)
    model = get_peft_model(model, original_lora_config())
    dataset = [{"input_ids": torch.from_numpy(block), "labels": torch.from_numpy(block)} for block in blocks]
    args = original_training_arguments(str(root / "original"), bf16=dtype == torch.bfloat16, max_steps=max_steps)
    return Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=default_data_collator, callbacks=callbacks
    )


def run_original_with_chla_in_turns(blocks, dtype: torch.dtype, steps: int, chla: dict, root: Path) -> dict:
    """The original's trainer, with one chla step after each of its optimizer steps. Returns the
    original's step times."""
    from transformers import TrainerCallback

    original = {"seconds": []}

    class TakeTurns(TrainerCallback):
        mark = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.mark is None:  # the first step: from here (its batches are already fetched)
                self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            original["seconds"].append(time.perf_counter() - self.mark)
            started = time.perf_counter()
            chla["loss"], chla["tokens"], _ = chla["trainer"].optimizer_step(chla["samples"])
            chla["seconds"].append(time.perf_counter() - started)
            print(
                f"step {state.global_step}/{steps}: original {original['seconds'][-1]:.2f} s  "
                f"chla {chla['seconds'][-1]:.2f} s (loss {chla['loss']:.4f})",
                flush=True,
            )
            self.mark = time.perf_counter()  # from here: everything HF does for its next step

    result = original_trainer(blocks, dtype, steps, root, [TakeTurns()]).train()
    original["loss"] = result.training_loss
    return original


def measured_matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """This machine's dense matmul rate in `dtype` on all of torch's threads (best of `repeats`)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def original_trainable():
    """What trains in run_pt.sh's setup (and chla's pretrain stage 2), for counting."""
    from chla_launcher.sizing import Trainable

    return Trainable(
        mode="lora",
        lora_r=8,
        lora_targets=tuple(LORA_TARGETS),
        lora_dropout=0.05,
        modules_to_save=tuple(MODULES_TO_SAVE),
    )


def model_flops_per_token(model_config: dict = MODEL) -> float:
    from chla_launcher.sizing import ModelShape, flops_per_token

    return flops_per_token(ModelShape.from_config(model_config), original_trainable(), BLOCK).total


def six_n_per_token() -> float:
    from chla_launcher.sizing import ModelShape

    return 6 * ModelShape.from_config(MODEL).total_params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="both sides' precision (default: chla's auto)",
    )
    args = parser.parse_args()

    from chla_train.freed_memory import keep_freed_memory
    from chla_train.precision import choose_precision

    print_machine()
    keep_freed_memory()  # as every stage task does
    dtype = choose_precision(args.precision).dtype
    precision = str(dtype).replace("torch.", "")
    total = args.warmup + args.steps
    blocks = corpus_blocks(MICRO_BATCHES * (total + 1))
    with tempfile.TemporaryDirectory(prefix="chla-bench-") as tmp:
        chla = build_chla(blocks, "bf16" if dtype == torch.bfloat16 else "fp32", Path(tmp))
        original = run_original_with_chla_in_turns(blocks, dtype, total, chla, Path(tmp))
    peak = measured_matmul_flops(dtype)
    flops = model_flops_per_token()
    tokens = MICRO_BATCHES * BLOCK
    results = {}
    for tag, run in (("original", original), ("chla", chla)):
        seconds = float(np.min(run["seconds"][args.warmup :]))
        results[tag] = {"tokens_per_s": tokens / seconds, "mfu": tokens / seconds * flops / peak}
        print(
            f"{tag:9s} {precision:9s} {results[tag]['tokens_per_s']:8.1f} tokens/s  best step {seconds:.2f} s  "
            f"MFU {results[tag]['mfu']:.3f}",
            flush=True,
        )
    print(
        f"model FLOPs {flops / 1e6:.1f} M per token (6N would count {six_n_per_token() / 1e6:.1f} M); "
        f"measured {precision} matmul peak {peak / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    speedup = results["chla"]["tokens_per_s"] / results["original"]["tokens_per_s"]
    print(
        f"RESULT speedup_vs_original={speedup:.2f} tokens_per_s={results['chla']['tokens_per_s']:.1f} "
        f"original_tokens_per_s={results['original']['tokens_per_s']:.1f} mfu={results['chla']['mfu']:.3f} "
        f"original_mfu={results['original']['mfu']:.3f} precision={precision}",
        flush=True,
    )
    exit_skipping_teardown()


if __name__ == "__main__":
    main()
