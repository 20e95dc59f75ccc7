"""GPU throughput and MFU of chla's training loop on a LLaMA-7B-shaped model, against the original
project's path, and packed-vs-padded SFT loss under FlashAttention-2. For one CUDA GPU (H100/H200).

The model: LLaMA-7B's shape (hidden 4096, intermediate 11008, 32 heads, 32,000-token vocabulary)
with as many of its 32 layers as chla's own memory model (chla_launcher.sizing, what `chla plan`
prints) says fit the GPU with chla's settings (--layers overrides), random weights, bf16. Each
configuration runs in a subprocess of its own (a clean GPU), for --warmup + --steps optimizer
steps; its figure is its best step.

  pretrain-chla-fa2    the `pretrain` stage's loop, LoRA r 8 on q,k,v,o,gate,up,down plus
                       embed_tokens/lm_head trained (stage 2), micro-batch 8 x 512, FlashAttention-2
  pretrain-chla-sdpa   the same with sdpa
  pretrain-chla-sdpa-uncompiled  the same with the decoder layers eager (torch_compile: false)
  pretrain-original    HF Trainer + PEFT with run_clm_pt_with_peft.py's arguments (run_pt.sh: batch 1
                       x accumulation 8, gradient checkpointing, DeepSpeed ZeRO-2 of
                       ds_zero2_no_offload.json), bf16 like chla (the script's fp16 runs at the same
                       speed on these GPUs), transformers' default attention (sdpa)
  sft-chla-packed-fa2  the `sft` stage's loop on the demo's instruction data (Chinese reviews in the
                       Alpaca template): 32 examples a micro-batch packed into rows of 512, LoRA r 8
                       plus embed_tokens/lm_head, FlashAttention-2 with varlen boundaries
  sft-chla-packed-sdpa the same with sdpa
  fa2-packed-vs-padded the sft loss of one micro-batch padded, packed (varlen boundaries), and
                       packed with only restarting position ids (the leak transformers leaves when
                       a batch has several rows): packed must equal padded, the leak must not
  varlen-packed-vs-padded the same check where flash-attn is not installed: the varlen arguments
                       chla builds for flash_attention_2, given to PyTorch's own FlashAttention
                       varlen kernel (torch.nn.attention.varlen) through an attention function
                       registered with transformers; without boundaries it attends over each whole
                       row, as flash_attention_2 does with several rows

chla's configurations run with the stages' defaults, so their decoder layers are compiled
(`torch_compile: auto` on a GPU; the first step compiles and the warm-up steps absorb it), except
pretrain-chla-sdpa-uncompiled.

MFU: model FLOPs per token (chla_launcher.sizing.flops_per_token: the frozen base needs no weight
gradients, LoRA's own matmuls count, the vocabulary projection only where logits are computed:
every position in pretraining, the answers in SFT) x tokens/s / the GPU's dense bf16 peak. Peak
memory is compared with `chla plan`'s estimate for the same setup. FlashAttention-2 needs the
flash-attn package; without it those configurations are reported as not run.

Usage: python benchmarks/gpu.py [--steps 10] [--warmup 3] [--layers N] [--only NAME,...] [--profile] [--dry-run]
(--dry-run: no GPU needed; prints the configurations, the layers and the FLOP counts. --profile: after
the timed steps of each chla configuration, two more under torch.profiler, and where their GPU time
went by kind of kernel: benchmarks/kernel_profile.py.)
Last lines: RESULT <config> tokens_per_s=<x> mfu=<y> peak_gib=<z> ... and RESULT fa2_packed_rel_diff=<d>
(with --profile, a PROFILE <config> line and its top kernels after each chla configuration's RESULT)
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import exit_skipping_teardown  # benchmarks/, on sys.path when run as a script
from kernel_profile import format_profile, profile_steps  # benchmarks/, on sys.path as a script
from machine import print_machine  # benchmarks/, on sys.path when run as a script
from train_throughput import (
    BLOCK,
    LORA_TARGETS,
    MODULES_TO_SAVE,
    SEED,
    build_chla,
    corpus_blocks,
    make_context,
    original_trainable,
    original_trainer,
)

from chla_train.model_config import LLAMA_7B

MICRO_BATCH = 8
SFT_EXAMPLES = 32
SFT_ROW = 512
# Dense bf16 tensor-core peaks (no sparsity), by device-name substring, longest first.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L4": 121e12,
}
CONFIGS = {
    "pretrain-chla-fa2": {"kind": "pretrain", "side": "chla", "attention": "flash_attention_2"},
    "pretrain-chla-sdpa": {"kind": "pretrain", "side": "chla", "attention": "sdpa"},
    # chla's step with its decoder layers left eager (torch_compile: false): what compiling buys
    "pretrain-chla-sdpa-uncompiled": {"kind": "pretrain", "side": "chla", "attention": "sdpa", "torch_compile": False},
    "pretrain-original": {"kind": "pretrain", "side": "original", "attention": "sdpa"},
    "sft-chla-packed-fa2": {"kind": "sft", "side": "chla", "attention": "flash_attention_2"},
    "sft-chla-packed-sdpa": {"kind": "sft", "side": "chla", "attention": "sdpa"},
    # The checks keep their layers eager: they compare what attention is told, and the varlen one
    # swaps the attention function mid-way.
    "fa2-packed-vs-padded": {
        "kind": "check",
        "side": "chla",
        "attention": "flash_attention_2",
        "torch_compile": False,
    },
    "varlen-packed-vs-padded": {"kind": "varlen-check", "side": "chla", "attention": "sdpa", "torch_compile": False},
}


def model_config(layers: int) -> dict:
    return dict(LLAMA_7B, num_hidden_layers=layers)


def gpu_peak_flops(device_name: str) -> float | None:
    for name in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if name in device_name:
            return GPU_PEAK_FLOPS[name]
    return None


def planned_memory(layers: int, *, attention: str = "flash_attention_2", checkpointing: bool = False):
    """chla plan's estimate for the pretrain configuration on one GPU."""
    from chla_launcher.sizing import ModelShape, TrainingSetup, training_memory

    setup = TrainingSetup(
        precision="bf16",
        zero_stage=2,
        world_size=1,
        micro_batch=MICRO_BATCH,
        seq_len=BLOCK,
        gradient_checkpointing=checkpointing,
        attention=attention,
    )
    return training_memory(ModelShape.from_config(model_config(layers)), original_trainable(), setup)


def layers_that_fit(gpu_bytes: int, *, headroom: float = 0.85) -> int:
    """The most of LLaMA-7B's 32 layers whose chla pretrain step fits in `headroom` of the GPU."""
    fitting = [n for n in range(1, 33) if planned_memory(n).peak <= headroom * gpu_bytes]
    return max(fitting, default=1)


def pretrain_flops_per_token(layers: int) -> float:
    from chla_launcher.sizing import ModelShape, flops_per_token

    return flops_per_token(ModelShape.from_config(model_config(layers)), original_trainable(), BLOCK).total


def sft_flops_per_token(layers: int, vocab: int, mean_example: float, label_fraction: float) -> float:
    """Per computed token of packed SFT rows: attention over each example's own tokens (its mean
    length), the vocabulary projection at the label positions only."""
    from chla_launcher.sizing import ModelShape, flops_per_token

    shape = ModelShape.from_config(dict(model_config(layers), vocab_size=vocab))
    return flops_per_token(
        shape, original_trainable(), max(1, round(mean_example)), logits_fraction=label_fraction
    ).total


# --- one configuration, in its own process ---------------------------------------------------------


def run_config(name: str, layers: int, steps: int, warmup: int, profile: bool = False) -> dict:
    import torch

    from chla_train.freed_memory import keep_freed_memory
    from chla_train.model import usable_attention

    config = CONFIGS[name]
    if config["attention"] == "flash_attention_2" and usable_attention("flash_attention_2") != "flash_attention_2":
        return {"name": name, "skipped": "flash-attn is not installed (pip install flash-attn)"}
    keep_freed_memory()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="chla-gpu-") as tmp:
        root = Path(tmp)
        if config["kind"] == "check":
            return dict(fa2_packed_vs_padded(layers, root), name=name)
        if config["kind"] == "varlen-check":
            return dict(varlen_packed_vs_padded(layers, root), name=name)
        if config["kind"] == "sft":
            return dict(time_sft(config, layers, steps, warmup, root, profile=profile), name=name)
        blocks = corpus_blocks(MICRO_BATCH * (steps + warmup + 3))
        if config["side"] == "chla":
            run = build_chla(
                blocks,
                "bf16",
                root,
                model_config=model_config(layers),
                attention=config["attention"],
                torch_compile=config.get("torch_compile", "auto"),
            )

            def step() -> None:
                run["trainer"].optimizer_step(run["samples"])

            seconds = [timed(step) for _ in range(steps + warmup)]
            profiled = profile_steps(step) if profile else None
        else:
            seconds = time_original(blocks, layers, steps + warmup, root)
            profiled = None
    best = min(seconds[warmup:])
    tokens_per_s = MICRO_BATCH * BLOCK / best
    return {
        "name": name,
        "profile": profiled,
        "tokens_per_s": tokens_per_s,
        "best_step_s": best,
        "flops_per_token": pretrain_flops_per_token(layers),
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "planned_bytes": planned_memory(
            layers, attention=config["attention"], checkpointing=config["side"] == "original"
        ).peak,
    }


def timed(step) -> float:
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def time_original(blocks, layers: int, total_steps: int, root: Path) -> list[float]:
    import torch
    from transformers import TrainerCallback

    seconds: list[float] = []

    class StepTimes(TrainerCallback):
        mark = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.mark is None:
                torch.cuda.synchronize()
                self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            now = time.perf_counter()
            seconds.append(now - self.mark)
            self.mark = now

    original_trainer(
        blocks, torch.bfloat16, total_steps, root, [StepTimes()], model_config=model_config(layers)
    ).train()
    return seconds


def sft_trainer(config: dict, layers: int, root: Path, *, vocab: int, pad_id: int, dataset, pack: bool = True):
    import torch

    from chla_launcher.contract.kinds.sft import SftParams
    from chla_tools.sft_data import sft_collate
    from chla_train import model as models
    from chla_train.trainer import TrainData, Trainer, init_distributed

    params = SftParams(
        tokenizer="-",
        train_file="-",
        init=dict(model_config(layers), vocab_size=vocab),
        max_seq_length=SFT_ROW,
        micro_batch_size=SFT_EXAMPLES,
        max_steps=10_000,
        eval_steps=0,
        save_steps=0,
        precision="bf16",
        pack_batches=pack,
        attn_implementation=config["attention"],
        modules_to_save=list(MODULES_TO_SAVE),
        lora_target_modules=list(LORA_TARGETS),
        seed=SEED,
        torch_compile=config.get("torch_compile", "auto"),
    )
    ctx = make_context(f"sft-{config['attention']}-{pack}", params, root, kind="sft")
    init_distributed(ctx)
    model = models.build_base_model(
        None, params.init, dtype=torch.bfloat16, attn_implementation=config["attention"], seed=SEED
    )
    model = models.apply_stage_lora(model, params, stage="sft")  # the kind's defaults: r 8, alpha 32, dropout 0.05
    collate = sft_collate(pad_id, pack_batches=pack, row_length=SFT_ROW)
    data = TrainData(
        train_set=dataset, train_indices=range(len(dataset)), valid_set=dataset, valid_indices=[], collate=collate
    )
    return Trainer(ctx, model, data, params, dtype=torch.bfloat16), collate


def sft_data(root: Path):
    from chla_tools.assets import fetch_assets
    from chla_tools.sft_data import load_sft_dataset, load_sft_tokenizer

    assets = fetch_assets()
    dataset = load_sft_dataset(
        assets["sft_train"], assets["base_tokenizer"], max_seq_length=SFT_ROW, cache_dir=root / "cache"
    )
    tokenizer = load_sft_tokenizer(assets["base_tokenizer"])
    return dataset, len(tokenizer), tokenizer.pad_token_id


def time_sft(config: dict, layers: int, steps: int, warmup: int, root: Path, *, profile: bool = False) -> dict:
    import numpy as np
    import torch

    from chla_tools.blocks import ResumableSampler
    from chla_train.trainer import input_token_count, label_token_count

    dataset, vocab, pad_id = sft_data(root)
    trainer, collate = sft_trainer(config, layers, root, vocab=vocab, pad_id=pad_id, dataset=dataset)
    trainer.engine.train()
    samples = iter(ResumableSampler(np.arange(len(dataset)), seed=SEED))
    rates, tokens_total, labels_total, examples_total = [], 0, 0, 0
    for step in range(steps + warmup):
        indices = [next(samples) for _ in range(SFT_EXAMPLES)]
        batch = collate([dataset[i] for i in indices])
        tokens, labels = input_token_count(batch), label_token_count(batch)
        replay = iter(indices)
        seconds = timed(lambda replay=replay: trainer.optimizer_step(replay))
        if step >= warmup:
            rates.append(tokens / seconds)
            tokens_total += tokens
            labels_total += labels
            examples_total += SFT_EXAMPLES
    profiled = None
    if profile:

        def step() -> None:
            trainer.optimizer_step(iter([next(samples) for _ in range(SFT_EXAMPLES)]))

        profiled = profile_steps(step)
    mean_example = tokens_total / examples_total
    flops = sft_flops_per_token(layers, vocab, mean_example, labels_total / tokens_total)
    return {
        "profile": profiled,
        "tokens_per_s": max(rates),
        "flops_per_token": flops,
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "mean_example_tokens": mean_example,
    }


def packed_check_setup(config_name: str, layers: int, root: Path):
    """What both packed-vs-padded checks compare: an SFT trainer over at most 4 layers (in eval
    mode), and one micro-batch of 32 reviews collated padded and packed."""
    from chla_tools.sft_data import collate_sft, collate_sft_packed

    dataset, vocab, pad_id = sft_data(root)
    trainer, _ = sft_trainer(CONFIGS[config_name], min(layers, 4), root, vocab=vocab, pad_id=pad_id, dataset=dataset)
    trainer.engine.eval()
    examples = [dataset[i] for i in range(SFT_EXAMPLES)]
    return trainer, collate_sft(examples, pad_id), collate_sft_packed(examples, pad_id, row_length=SFT_ROW)


def summed_loss(module, batch: dict, inputs: dict) -> float:
    """The summed token cross-entropy of `batch` through `module`, with `inputs` (the attention
    arguments) beside its input ids: the whole logits, as transformers computes them."""
    import torch

    logits = module(input_ids=torch.from_numpy(batch["input_ids"]).cuda(), use_cache=False, **inputs).logits
    labels = torch.from_numpy(batch["labels"]).cuda()
    return torch.nn.functional.cross_entropy(
        logits.float()[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    ).item()


def packed_check_result(layers: int, padded: dict, packed: dict, *, loss_padded, loss_packed, loss_leaky) -> dict:
    import numpy as np

    return {
        "loss_padded": loss_padded,
        "loss_packed": loss_packed,
        "loss_leaky": loss_leaky,
        "packed_rel_diff": abs(loss_packed - loss_padded) / loss_padded,
        "leaky_rel_diff": abs(loss_leaky - loss_padded) / loss_padded,
        "rows": int(packed["input_ids"].shape[0]),
        "examples": SFT_EXAMPLES,
        "layers": min(layers, 4),
        "padded_tokens": int(np.asarray(padded["input_ids"]).size),
    }


def fa2_packed_vs_padded(layers: int, root: Path) -> dict:
    """One micro-batch of 32 reviews, its loss padded, packed, and packed leaking (bf16, FA2)."""
    import torch

    trainer, padded, packed = packed_check_setup("fa2-packed-vs-padded", layers, root)
    with torch.no_grad():
        loss_padded = trainer._forward(padded).item()
        loss_packed = trainer._forward(packed).item()
        leaky = {"position_ids": torch.from_numpy(packed["position_ids"]).cuda()}  # no varlen boundaries
        loss_leaky = summed_loss(trainer.engine.module, packed, leaky)
    return packed_check_result(
        layers, padded, packed, loss_padded=loss_padded, loss_packed=loss_packed, loss_leaky=loss_leaky
    )


@functools.cache
def varlen_causal_argument() -> dict:
    """How torch.nn.attention.varlen_attn is told to be causal: `is_causal` where it has that
    argument, else a window reaching no token to the right (torch 2.11 and later)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return {"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters else {"window_size": (-1, 0)}


def torch_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function over PyTorch's FlashAttention varlen kernel, reading the
    same keyword arguments as transformers' flash_attention_2 (cu_seq_lens_q/k, max_length_q/k):
    the rows flattened into one sequence, each segment causal on its own. Without them each row is
    one segment (flash_attention_2's behaviour with several rows)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    rows, heads, width, head_dim = query.shape
    flat = [t.transpose(1, 2).reshape(rows * width, t.shape[1], head_dim) for t in (query, key, value)]
    starts = kwargs.get("cu_seq_lens_q")
    longest = kwargs.get("max_length_q")
    if starts is None:
        starts = torch.arange(0, (rows + 1) * width, width, dtype=torch.int32, device=query.device)
        longest = width
    out = varlen_attn(*flat, starts, starts, longest, longest, scale=scaling, **varlen_causal_argument())
    return out.reshape(rows, width, heads, head_dim), None


def varlen_packed_vs_padded(layers: int, root: Path) -> dict:
    """fa2_packed_vs_padded with PyTorch's FlashAttention varlen kernel standing in for flash-attn:
    the padded loss under sdpa; the packed rows with chla's flash_attention_2 inputs, and without
    their boundaries (the leak), under the varlen kernel."""
    import torch
    from transformers import AttentionInterface

    from chla_train.packed_attention import packed_attention_inputs

    AttentionInterface.register("chla_torch_varlen", torch_varlen_attention)
    trainer, padded, packed = packed_check_setup("varlen-packed-vs-padded", layers, root)
    module = trainer.engine.module
    with torch.no_grad():
        loss_padded = trainer._forward(padded).item()
        varlen = packed_attention_inputs(packed, "flash_attention_2", dtype=module.dtype, device=torch.device("cuda"))
        module.set_attn_implementation("chla_torch_varlen")
        loss_packed = summed_loss(module, packed, varlen)
        loss_leaky = summed_loss(module, packed, {"position_ids": varlen["position_ids"]})
        # the padded rows under the same kernel (each row one segment; its padding comes last)
        loss_padded_varlen = summed_loss(module, padded, {})
    return dict(
        packed_check_result(
            layers, padded, packed, loss_padded=loss_padded, loss_packed=loss_packed, loss_leaky=loss_leaky
        ),
        loss_padded_varlen=loss_padded_varlen,
        packed_rel_diff_same_kernel=abs(loss_packed - loss_padded_varlen) / loss_padded_varlen,
        segments=len(varlen["cu_seq_lens_q"]) - 1,
        kernel="torch.nn.attention.varlen",
    )


# --- the orchestration -------------------------------------------------------------------------------


def report(result: dict, peak: float | None) -> str:
    if "skipped" in result:
        return f'RESULT {result["name"]} not_run="{result["skipped"]}"'
    if "packed_rel_diff" in result:
        label = "varlen" if result.get("kernel") else "fa2"
        return (
            f"RESULT {label}_packed_rel_diff={result['packed_rel_diff']:.2e} "
            f"{label}_leaky_rel_diff={result['leaky_rel_diff']:.2e} loss_padded={result['loss_padded']:.4f} "
            f"loss_packed={result['loss_packed']:.4f} loss_leaky={result['loss_leaky']:.4f}"
            + (
                f" padded_same_kernel={result['loss_padded_varlen']:.4f}"
                f" packed_rel_diff_same_kernel={result['packed_rel_diff_same_kernel']:.2e}"
                if "loss_padded_varlen" in result
                else ""
            )
        )
    mfu = f"{result['tokens_per_s'] * result['flops_per_token'] / peak:.3f}" if peak else "n/a"
    fields = [
        f"tokens_per_s={result['tokens_per_s']:.0f}",
        f"mfu={mfu}",
        f"peak_gib={result['peak_bytes'] / 2**30:.1f}",
    ]
    if "planned_bytes" in result:
        fields.append(f"plan_gib={result['planned_bytes'] / 2**30:.1f}")
    return f"RESULT {result['name']} " + " ".join(fields)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, help="decoder layers (default: as many of 32 as fit the GPU)")
    parser.add_argument("--only", help="comma-separated configurations (default: all)")
    parser.add_argument(
        "--profile", action="store_true", help="where the GPU time of chla's steps goes, by kernel kind"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan; needs no GPU")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # one configuration, in a subprocess
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        Path(args.result).write_text(
            json.dumps(run_config(args.config, args.layers, args.steps, args.warmup, args.profile))
        )
        exit_skipping_teardown()

    print_machine()
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    import torch

    if args.dry_run or not torch.cuda.is_available():
        layers = args.layers or layers_that_fit(80 * 2**30)
        print(
            f"{'dry run' if args.dry_run else 'no CUDA device: not run'}; for an 80 GiB GPU: {layers} layers, "
            f"plan {planned_memory(layers).peak / 2**30:.1f} GiB for chla's pretrain step; pretrain model FLOPs "
            f"{pretrain_flops_per_token(layers) / 1e9:.2f} G per token; configurations: {', '.join(names)}"
        )
        return 0 if args.dry_run else 1
    device = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory
    layers = args.layers or layers_that_fit(total)
    peak = gpu_peak_flops(device)
    print(
        f"{device}, {total / 2**30:.0f} GiB: LLaMA-7B shape with {layers} of 32 layers "
        f"(bf16 dense peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s)",
        flush=True,
    )
    lines = []
    with tempfile.TemporaryDirectory(prefix="chla-gpu-") as tmp:
        for name in names:
            result_file = Path(tmp) / f"{name}.json"
            command = [
                sys.executable,
                __file__,
                "--config",
                name,
                "--layers",
                str(layers),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--result",
                str(result_file),
                *(["--profile"] if args.profile else []),
            ]
            done = subprocess.run(command)
            if done.returncode != 0 or not result_file.exists():
                lines.append(f"RESULT {name} failed=exit{done.returncode}")
                print(lines[-1], flush=True)
                continue
            result = json.loads(result_file.read_text())
            lines.append(report(result, peak))
            print(lines[-1], flush=True)
            if result.get("profile"):
                print("\n".join(format_profile(name, result["profile"])), flush=True)
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
