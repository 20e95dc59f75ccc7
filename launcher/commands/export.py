"""`chla export gguf MODEL_DIR --out FILE [--outtype f32|f16|q8_0]`: the `export` stage on this machine."""

from __future__ import annotations

import argparse
from typing import get_args

from ..kinds.export import ExportParams

NAME = "export"
HELP = "export an HF model for other tools: GGUF for llama.cpp (its own converter)"
ORDER = 66


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    gguf = sub.add_parser(
        "gguf",
        help="convert to one GGUF file with llama.cpp's convert_hf_to_gguf.py",
        description="check the model's vocabulary rows against its tokenizer, convert "
        "with llama.cpp's own converter (fetched once from the pinned "
        "llama-cpp-python sdist), write FILE atomically",
    )
    gguf.add_argument("model", metavar="MODEL_DIR", help="HF model directory with its tokenizer")
    gguf.add_argument("--out", required=True, metavar="FILE", help="the .gguf file to write")
    outtype = ExportParams.model_fields["outtype"]
    gguf.add_argument(
        "--outtype",
        choices=get_args(outtype.annotation),
        default=outtype.default,
        help=f"{outtype.description} (default: {outtype.default})",
    )
    gguf.add_argument(
        "--offline", action="store_true", help="never download the converter; fail if it is not cached yet"
    )


def run(args: argparse.Namespace) -> int:
    from chla_tools.gguf_export import export_gguf

    export_gguf(args.model, args.out, args.outtype, offline=args.offline)
    return 0
