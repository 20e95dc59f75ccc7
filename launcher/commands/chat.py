"""`chla chat MODEL_DIR [--adapter DIR]...`: interactive generation, tokens streamed as they come."""

from __future__ import annotations

import argparse

NAME = "chat"
HELP = "talk to a model (merged, or base + adapters) in the terminal, streaming the answer"
ORDER = 62

# The original project's generation settings (scripts/inference/inference_hf.py).
GENERATION_DEFAULTS = {"temperature": 0.2, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 400}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GENERATION_DEFAULTS
    parser.add_argument("model", metavar="MODEL_DIR", help="HF model directory (merged, or the base)")
    parser.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        default=[],
        metavar="DIR",
        help="peft LoRA adapter applied on top, unmerged on disk (repeat, in training order)",
    )
    parser.add_argument(
        "--no-template",
        dest="template",
        action="store_const",
        const="none",
        default="alpaca",
        help="send the raw line instead of wrapping it in the instruction template",
    )
    parser.add_argument(
        "--chat-template",
        dest="template",
        action="store_const",
        const="chat",
        help="wrap each line in the tokenizer's chat template (for a model SFT trained with template: chat)",
    )
    parser.add_argument(
        "--rope-scaling",
        type=float,
        default=None,
        metavar="FACTOR",
        help="dynamic NTK RoPE scaling factor (> 1) for inputs beyond the training length",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=defaults["temperature"],
        help="sampling temperature; 0 means greedy (default %(default)s)",
    )
    parser.add_argument("--top-k", type=int, default=defaults["top_k"], help="default %(default)s")
    parser.add_argument("--top-p", type=float, default=defaults["top_p"], help="default %(default)s")
    parser.add_argument(
        "--repetition-penalty", type=float, default=defaults["repetition_penalty"], help="default %(default)s"
    )
    parser.add_argument("--max-new-tokens", type=int, default=defaults["max_new_tokens"], help="default %(default)s")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


def run(args: argparse.Namespace) -> int:
    from chla_train.chat import chat

    return chat(args)
