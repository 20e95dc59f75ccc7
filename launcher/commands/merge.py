"""`chla merge`: merge LoRA adapters into a base model without loading it whole."""

from __future__ import annotations

import argparse

NAME = "merge"
HELP = "merge LoRA adapters (in order) into a base model, tensor by tensor"
ORDER = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="DIR", help="HF model directory (safetensors)")
    parser.add_argument("--adapter", dest="adapters", action="append", required=True, metavar="DIR",
                        help="peft LoRA adapter directory; repeat to apply several in order")
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory (replaced atomically)")
    parser.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="output dtype of floating tensors (default: keep the base's)")


def run(args: argparse.Namespace) -> int:
    from chla_tools.merge import merge_adapters

    merge_adapters(args.base, args.adapters, args.out, shard_size=args.shard_size, dtype=args.dtype)
    return 0
