"""Whether two runs of the demo recipe give the same figures: for a change that must not alter
behaviour (a refactor), run the same recipe, shrunk the same way, on the code before and after, on
the same machine with the same thread count, then compare:

    OMP_NUM_THREADS=2 chla-submit recipes/demo.yaml --run-dir /tmp/before/run \
        --set stages.pt_embeddings.params.max_steps=3 --set stages.pt_lora.params.max_steps=3 \
        --set stages.sft.params.max_steps=3 --set stages.eval_base.params.max_items=8 \
        --set stages.eval_pt.params.max_items=8 --set stages.eval_sft.params.max_items=8 \
        --set stages.eval_sft.params.max_new_tokens=16 --set stages.eval_task.params.sample=8 \
        --set stages.eval_task.params.max_new_tokens=16
    (the same on the other checkout into /tmp/after/run, each with its own empty CHLA_CACHE)
    python benchmarks/compare_demo_runs.py /tmp/before/run /tmp/after/run

It compares every key of summary.json (timings and paths aside), every training stage's logged
losses, and the final merged model's weights; exit status 1 if anything differs."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

TIMING_KEYS = {"stage_seconds", "plots", "run"}
TRAINING_STAGES = ("pt_embeddings", "pt_lora", "sft")
HEADLINES = ("tokens_per_char_base", "tokens_per_char_merged", "zh_ppl_per_char", "en_ppl_per_char", "sft_accuracy")


def comparable(value: Any, run: Path) -> Any:
    """`value` without timings, and with the run's own directory in its paths written as <run>."""
    if isinstance(value, dict):
        return {
            key: comparable(item, run)
            for key, item in value.items()
            if key not in TIMING_KEYS and not key.endswith("_s") and "path" not in key
        }
    if isinstance(value, list):
        return [comparable(item, run) for item in value]
    if isinstance(value, str):
        return value.replace(str(run.resolve()), "<run>")
    return value


def losses(run: Path, stage: str) -> list[float]:
    lines = (run / stage / "work" / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="run directory")
    parser.add_argument("b", type=Path, help="run directory")
    args = parser.parse_args()
    a, b = (comparable(json.loads((run / "summary.json").read_text()), run) for run in (args.a, args.b))
    differing = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
    print(f"summary.json: {len(set(a) | set(b))} keys compared, differing: {differing or 'none'}")
    for key in HEADLINES:
        print(f"  {key}: {a.get(key)} | {b.get(key)}")
    for stage in TRAINING_STAGES:
        same = losses(args.a, stage) == losses(args.b, stage)
        differing += [] if same else [f"{stage} losses"]
        print(f"  {stage}: {len(losses(args.a, stage))} logged losses, equal: {same}")
    digests = [weights_digest(run / "merge_sft" / "out") for run in (args.a, args.b)]
    differing += [] if digests[0] == digests[1] else ["merge_sft weights"]
    print(f"  merge_sft weights sha256: {digests[0]} | {digests[1]}")
    print("equal" if not differing else f"different: {', '.join(differing)}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
