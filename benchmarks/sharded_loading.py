"""Host memory of two ranks loading a ~2 GB model for training: ZeRO-3 partitioned loading against
each rank loading it whole, and ZeRO-2's shared memory map.

A LLaMA of ~0.94B parameters (hidden 2048, 16 layers, 32,000-token vocabulary; 1.88 GB in bf16,
random N(0, 0.02) weights, one safetensors file) is trained for a few LoRA steps by the real
`pretrain` stage (chla_train.stages.pretrain.run) on two local ranks, as the local executor runs
them, in three ways:

  zero3-partitioned  ZeRO-3 as the stage runs it now: the model built under zero.Init and each
                     rank reading only its slice of every tensor (chla_train.model.load_partitioned),
                     freed memory handed back to the kernel and parameters gathered in place
                     (chla_train.training_workflow.model_loading)
  zero3-whole        ZeRO-3 with every rank loading the whole model first, as chla did before
                     (the stage's model_loading replaced by a no-op, and with it those two
                     settings): DeepSpeed partitions it when training starts
  zero2              ZeRO-2, whole on every rank: transformers maps the file, so the two ranks
                     share one copy of the weights (page cache)

Per rank: the RSS before the stage starts (interpreter and imports), the peak RSS (VmHWM: every
resident page, mapped file pages included), the largest RSS in each phase of the stage (loading
the model, starting DeepSpeed, training, saving) and, at the end, the proportional set size (PSS:
a page two ranks share counts half for each), whose sum over the ranks is what the node holds. The
loss of every step is printed for each way; partitioned and whole ZeRO-3 must train the same.

What the ratios count: the RSS a rank holds before the stage starts (~0.57 GB: Python, torch,
transformers, DeepSpeed, PEFT) does not depend on the model, and on two ranks the partition alone
is 0.5x the model, so the peak RSS with it can never be <= 0.6x a 1.88 GB model. The RESULT line
gives both: the whole peak RSS over the model's bytes, and the peak above that baseline (what
loading and training the model add) over the model's bytes, for the whole stage and for its
loading phase alone.

LoRA r 8 on q,k,v,o,gate,up,down, nothing else trained (modules_to_save would add full trainable
copies of the embeddings, which is optimizer memory, not loading), micro-batch 1 of 128 tokens,
bf16 (fp32 with --precision fp32).

Usage: python benchmarks/sharded_loading.py [--workdir DIR] [--steps 3] [--ways zero3-partitioned,zero3-whole,zero2]
Last line: RESULT peak_rss_ratio=<max over ranks of zero3-partitioned peak RSS / model bytes>
           above_baseline_ratio=<max over ranks of (peak RSS - RSS before the stage) / model bytes>
           load_above_baseline_ratio=<the same for the loading phase's largest RSS>
           whole_peak_rss_ratio=<peak_rss_ratio of zero3-whole> whole_above_baseline_ratio=<...>
           loss_match=<yes|no>   (target: <= 0.6)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import exit_skipping_teardown  # benchmarks/, on sys.path when run as a script
from machine import print_machine  # benchmarks/, on sys.path when run as a script

from chla_train.distributed import DistributedEnv
from chla_train.model_config import llama_config

MODEL = llama_config(hidden=2048, intermediate=5504, layers=16, heads=16, positions=512)
WAYS = {"zero3-partitioned": 3, "zero3-whole": 3, "zero2": 2}
BLOCK = 128
# The pretrain params of a measured run: no evaluation or checkpoint between its steps, every step
# logged (plan_memory's runs too).
MEASURED_RUN = dict(valid_count=2, eval_steps=0, save_steps=0, logging_steps=1)


def write_model(directory: Path, dtype_name: str) -> int:
    """The checkpoint, written tensor by tensor (at most one fp32 tensor extra in memory). Returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    weights = directory / "model.safetensors"
    if weights.is_file():
        return weights.stat().st_size
    directory.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype_name])
    config = LlamaConfig(**MODEL)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    h, i, v = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(MODEL["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes.update(
            {
                prefix + name: shape
                for name, shape in (
                    ("self_attn.q_proj.weight", (h, h)),
                    ("self_attn.k_proj.weight", (h, h)),
                    ("self_attn.v_proj.weight", (h, h)),
                    ("self_attn.o_proj.weight", (h, h)),
                    ("mlp.gate_proj.weight", (i, h)),
                    ("mlp.up_proj.weight", (i, h)),
                    ("mlp.down_proj.weight", (h, i)),
                    ("input_layernorm.weight", (h,)),
                    ("post_attention_layernorm.weight", (h,)),
                )
            }
        )
    tensors = {
        name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02).to(dtype)
        for name, shape in shapes.items()
    }
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return weights.stat().st_size


def prepare_inputs(root: Path) -> dict[str, str]:
    """The demo's base tokenizer (32,000 tokens, the model's vocabulary) and a small corpus of zh_train."""
    from chla_tools.assets import fetch_assets
    from chla_tools.pretokenize import pretokenize

    assets = fetch_assets()
    corpus = root / "corpus"
    if not (corpus / "manifest.json").is_file():
        text = root / "zh.txt"
        text.write_text(
            "\n".join(Path(assets["zh_train"]).read_text(encoding="utf-8").splitlines()[:300]) + "\n", encoding="utf-8"
        )
        pretokenize([str(text)], assets["base_tokenizer"], corpus, cache_dir=root / "cache", log=lambda _m: None)
    return {"tokenizer": assets["base_tokenizer"], "corpus": str(corpus)}


def memory_now() -> dict[str, int]:
    """RSS, peak RSS (VmHWM) and PSS of this process, in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    rollup = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    kib = lambda text: int(text.split()[0]) * 1024  # noqa: E731
    return {"rss": kib(status["VmRSS"]), "peak_rss": kib(status["VmHWM"]), "pss": kib(rollup["Pss"])}


class PhasePeaks:
    """The largest RSS seen in each phase of the stage (sampled every 20 ms by a thread), so that
    the report says where the peak is: loading, starting DeepSpeed, training, saving."""

    def __init__(self) -> None:
        import threading

        self.phase, self.peaks = "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            rss = memory_now()["rss"]
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)

    def around(self, owner, name: str, phase: str) -> None:
        """Run `owner.name` as `phase` (then back to the phase before)."""
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            before, self.phase = self.phase, phase
            try:
                return original(*args, **kwargs)
            finally:
                self.phase = before

        setattr(owner, name, wrapped)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def worker(spec_file: str) -> None:
    """One rank of the stage (RANK, WORLD_SIZE, MASTER_* in the environment)."""
    spec = json.loads(Path(spec_file).read_text())
    from unittest import mock

    import deepspeed  # noqa: F401  (imported before the baseline: every stage task imports them)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from chla_launcher.contract.kinds.pretrain import PretrainParams
    from chla_train.context import StageContext
    from chla_train.freed_memory import keep_freed_memory
    from chla_train.stages import pretrain

    keep_freed_memory()  # as every stage task does
    env = DistributedEnv.from_environment()
    params = PretrainParams(
        model=spec["model"],
        tokenizer=spec["tokenizer"],
        corpus=spec["corpus"],
        mode="lora",
        modules_to_save=[],
        lora_dropout=0.0,
        block_size=BLOCK,
        micro_batch_size=1,
        max_steps=spec["steps"],
        **MEASURED_RUN,
        zero_stage=spec["zero_stage"],
        precision=spec["precision"],
        learning_rate=1e-3,
    )
    ctx = StageContext.standalone(Path(spec["run_dir"]), "train", "pretrain", params, dist=env, fingerprint="bench")
    from chla_train import trainer as trainers
    from chla_train import training_workflow as workflow

    before = memory_now()
    phases = PhasePeaks()
    phases.around(workflow.models, "base_model_for", "load")
    phases.around(trainers.Trainer, "__init__", "deepspeed")
    phases.around(trainers.Trainer, "train", "train")
    phases.around(workflow, "save_adapter", "save")
    whole = mock.patch.object(workflow, "model_loading", lambda *a, **k: contextlib.nullcontext())
    started = time.perf_counter()
    with whole if spec["way"] == "zero3-whole" else contextlib.nullcontext():
        pretrain.run(ctx)
    after = memory_now()
    report = {
        "rank": env.rank,
        "baseline_rss": before["rss"],
        "peak_rss": after["peak_rss"],
        "pss": after["pss"],
        "seconds": time.perf_counter() - started,
        "phases": phases.stop(),
    }
    if env.rank == 0:
        lines = (ctx.out_dir / "metrics.jsonl").read_text().splitlines()
        report["losses"] = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    Path(spec["report"]).with_suffix(f".rank{env.rank}.json").write_text(json.dumps(report))
    exit_skipping_teardown()


def run_way(way: str, paths: dict[str, str], root: Path, steps: int, precision: str) -> list[dict]:
    run_dir = root / way
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = dict(
        paths,
        way=way,
        zero_stage=WAYS[way],
        steps=steps,
        precision=precision,
        run_dir=str(run_dir),
        report=str(run_dir / "report.json"),
    )
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, **DistributedEnv.on_this_machine(rank, 2, port).variables(), "OMP_NUM_THREADS": "1"}
        env.pop("SLURM_JOB_ID", None)
        log = open(run_dir / f"rank{rank}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(spec_file)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    for proc, log in procs:
        code = proc.wait()
        log.close()
        if code != 0:
            raise SystemExit(f"{way}: a rank exited {code}; see {run_dir}/rank*.log")
    return [json.loads((run_dir / f"report.rank{rank}.json").read_text()) for rank in range(2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help="where the model and runs go (default: a temporary directory)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--ways", default=",".join(WAYS))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0

    print_machine()
    with tempfile.TemporaryDirectory(prefix="chla-sharded-") as scratch:
        root = Path(args.workdir or scratch)
        model_dir = root / f"model-{args.precision}"
        model_bytes = write_model(model_dir, args.precision)
        paths = dict(prepare_inputs(root), model=str(model_dir))
        print(
            f"model: {model_bytes / 1e9:.2f} GB ({args.precision}, {model_dir}); 2 ranks, LoRA, "
            f"{args.steps} steps of 1 x {BLOCK} tokens",
            flush=True,
        )
        results = {}
        for way in args.ways.split(","):
            ranks = run_way(way, paths, root / "runs", args.steps, args.precision)
            results[way] = ranks
            for r in ranks:
                print(
                    f"{way:18s} rank {r['rank']}: baseline RSS {r['baseline_rss'] / 1e9:.2f} GB, peak RSS "
                    f"{r['peak_rss'] / 1e9:.2f} GB = {r['peak_rss'] / model_bytes:.2f} x model "
                    f"(above baseline {(r['peak_rss'] - r['baseline_rss']) / model_bytes:.2f} x), "
                    f"PSS at the end {r['pss'] / 1e9:.2f} GB, {r['seconds']:.0f} s; largest RSS while "
                    + ", ".join(f"{phase} {rss / 1e9:.2f}" for phase, rss in r["phases"].items()),
                    flush=True,
                )
            print(
                f"{way:18s} both ranks' PSS: {sum(r['pss'] for r in ranks) / 1e9:.2f} GB; losses {ranks[0]['losses']}",
                flush=True,
            )
    ratio = lambda way: max(r["peak_rss"] for r in results[way]) / model_bytes  # noqa: E731
    above = lambda way: max(r["peak_rss"] - r["baseline_rss"] for r in results[way]) / model_bytes  # noqa: E731
    fields = []
    if "zero3-partitioned" in results:
        loading = max(r["phases"].get("load", 0) - r["baseline_rss"] for r in results["zero3-partitioned"])
        fields.append(f"peak_rss_ratio={ratio('zero3-partitioned'):.2f}")
        fields.append(f"above_baseline_ratio={above('zero3-partitioned'):.2f}")
        fields.append(f"load_above_baseline_ratio={loading / model_bytes:.2f}")
    if "zero3-whole" in results:
        fields.append(f"whole_peak_rss_ratio={ratio('zero3-whole'):.2f}")
        fields.append(f"whole_above_baseline_ratio={above('zero3-whole'):.2f}")
    if {"zero3-partitioned", "zero3-whole"} <= set(results):
        a, b = results["zero3-partitioned"][0]["losses"], results["zero3-whole"][0]["losses"]
        fields.append(f"loss_match={'yes' if all(abs(x - y) <= 1e-3 * abs(y) for x, y in zip(a, b)) else 'no'}")
    print("RESULT " + " ".join(fields), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
