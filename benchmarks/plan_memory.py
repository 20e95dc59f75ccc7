"""`chla plan`'s memory estimate against the measured peak of the same stage, on CPU.

The real `pretrain` stage (chla_train.stages.pretrain.run, one rank, DeepSpeed ZeRO-2, the job
entry's malloc setting) trains a small LLaMA on the demo's Chinese text for a few steps, in a
subprocess per configuration and measurement, in two shapes:

  small  hidden 256, 4 layers, intermediate 688, the demo tokenizer's 32,000-token vocabulary;
         LoRA r 8 on every projection plus embed_tokens and lm_head (PEFT's trainable copies),
         micro-batch 8 x 512; in fp32, bf16, and bf16 with gradient checkpointing
  wide   hidden 512, 2 layers, intermediate 1376, the same vocabulary; LoRA r 8 on every
         projection only (the embeddings frozen: the first layer's input needs no gradient, no
         vocabulary-sized gradient), micro-batch 4 x 512, bf16

Compared: chla_launcher.sizing.training_memory's peak for the stage, counted for a CPU (dropout
masks in the training dtype), which is what `chla plan` prints for a CPU stage; against the peak
of the bytes the stage's tensors hold at once, from torch's profiler (its running total of CPU
tensor allocations: the CPU counterpart of torch.cuda.max_memory_allocated, what the estimate
counts). Printed beside them, for scale: the process's peak RSS (VmHWM) minus its RSS just before
the stage starts. RSS is not what the estimate counts: it leaves out allocated but untouched
memory (DeepSpeed's 400 MB gradient bucket is allocated whole and written only as far as the
gradients go) and adds what is not a tensor (allocator slack: freed memory the job entry keeps
for reuse, oneDNN's scratch buffers).

Usage: python benchmarks/plan_memory.py [--steps 3]
Last line: RESULT worst_relative_error=<max |estimate - tensor peak| / tensor peak>   (target: <= 0.20)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import exit_skipping_teardown  # benchmarks/, on sys.path when run as a script
from machine import print_machine  # benchmarks/, on sys.path when run as a script
from sharded_loading import MEASURED_RUN, memory_now, prepare_inputs

from chla_train.model_config import llama_config

SMALL = llama_config(hidden=256, intermediate=688, layers=4, heads=4, positions=512)
WIDE = llama_config(hidden=512, intermediate=1376, layers=2, heads=8, positions=512)
VOCABULARY = ["embed_tokens", "lm_head"]
CONFIGS = {  # name: (model, modules_to_save, micro-batch, precision, gradient checkpointing)
    "small bf16": (SMALL, VOCABULARY, 8, "bf16", False),
    "small bf16+gc": (SMALL, VOCABULARY, 8, "bf16", True),
    "small fp32": (SMALL, VOCABULARY, 8, "fp32", False),
    "wide bf16": (WIDE, [], 4, "bf16", False),
}
BLOCK = 512


def stage_params(spec: dict):
    from chla_launcher.contract.kinds.pretrain import PretrainParams

    return PretrainParams(
        tokenizer=spec["tokenizer"],
        corpus=spec["corpus"],
        init=spec["model"],
        mode="lora",
        modules_to_save=spec["modules_to_save"],
        block_size=BLOCK,
        micro_batch_size=spec["micro_batch"],
        max_steps=spec["steps"],
        **MEASURED_RUN,
        zero_stage=2,
        precision=spec["precision"],
        gradient_checkpointing=spec["checkpointing"],
    )


def estimate(params, model: dict) -> int:
    from chla_launcher.sizing import ModelShape, Trainable, TrainingSetup, training_memory

    trainable = Trainable(
        mode="lora",
        lora_r=params.lora_r,
        lora_targets=tuple(params.lora_target_modules),
        lora_dropout=params.lora_dropout,
        modules_to_save=tuple(params.modules_to_save),
    )
    setup = TrainingSetup(
        precision=params.precision,
        zero_stage=params.zero_stage,
        world_size=1,
        micro_batch=params.micro_batch_size,
        seq_len=params.block_size,
        gradient_checkpointing=params.gradient_checkpointing,
        cpu=True,
    )
    return training_memory(ModelShape.from_config(model), trainable, setup).peak


def worker(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    import deepspeed  # noqa: F401  (imported before the baseline, as in every stage task)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from chla_train.context import StageContext
    from chla_train.distributed import DistributedEnv
    from chla_train.freed_memory import keep_freed_memory
    from chla_train.stages import pretrain

    keep_freed_memory()
    params = stage_params(spec)
    dist = DistributedEnv(master_port=int(spec["port"]))
    ctx = StageContext.standalone(Path(spec["run_dir"]), "train", "pretrain", params, dist=dist, fingerprint="bench")
    before = memory_now()
    if spec["measure"] == "tensors":
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            pretrain.run(ctx)
        trace = Path(spec["run_dir"]) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
        measured = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
    else:
        pretrain.run(ctx)
        measured = memory_now()["peak_rss"] - before["rss"]
    Path(spec["report"]).write_text(
        json.dumps({"measured": measured, "baseline": before["rss"], "estimate": estimate(params, spec["model"])})
    )
    exit_skipping_teardown()


def run_stage(run_dir: Path, spec: dict, index: int) -> dict:
    run_dir.mkdir(parents=True)
    spec = dict(spec, run_dir=str(run_dir), report=str(run_dir / "report.json"), port=29300 + os.getpid() % 500 + index)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID"):
        env.pop(key, None)
    with open(run_dir / "log.txt", "w") as log:
        code = subprocess.run(
            [sys.executable, __file__, "--worker", str(run_dir / "spec.json")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode
    if code != 0:
        raise SystemExit(f"{run_dir}: the stage exited {code}:\n{(run_dir / 'log.txt').read_text()[-3000:]}")
    return json.loads((run_dir / "report.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0

    print_machine()
    errors = []
    with tempfile.TemporaryDirectory(prefix="chla-plan-memory-") as tmp:
        root = Path(tmp)
        paths = prepare_inputs(root)
        for index, (name, (model, modules_to_save, micro_batch, precision, checkpointing)) in enumerate(
            CONFIGS.items()
        ):
            spec = dict(
                paths,
                model=model,
                modules_to_save=modules_to_save,
                micro_batch=micro_batch,
                precision=precision,
                checkpointing=checkpointing,
                steps=args.steps,
            )
            folder = root / name.replace(" ", "-")
            tensors = run_stage(folder / "tensors", dict(spec, measure="tensors"), 2 * index)
            rss = run_stage(folder / "rss", dict(spec, measure="rss"), 2 * index + 1)
            error = (tensors["estimate"] - tensors["measured"]) / tensors["measured"]
            errors.append(abs(error))
            print(
                f"{name:13s} chla plan's estimate {tensors['estimate'] / 2**20:6.0f} MiB; peak of tensor bytes "
                f"{tensors['measured'] / 2**20:6.0f} MiB ({error:+.1%}); peak RSS above the baseline "
                f"{rss['measured'] / 2**20:6.0f} MiB (baseline {rss['baseline'] / 2**20:.0f} MiB)",
                flush=True,
            )
    print(f"RESULT worst_relative_error={max(errors):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
