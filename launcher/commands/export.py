"""`chla export gguf MODEL_DIR --out FILE [--outtype f32|f16|q8_0]`: the `export` stage on this
machine. Its flags are the `export` kind's params (chla_launcher.contract.kinds.export)."""

from __future__ import annotations

import argparse

from ..contract.kinds.export import ExportParams
from ..flags import Flag, ParamFlags, add_action

NAME = "export"
HELP = "export an HF model for other tools: GGUF for llama.cpp (its own converter)"
ORDER = 66

# One subcommand per format (today gguf); the file is --out, not the stage's file_name in out/.
FLAGS = ParamFlags(
    ExportParams, (Flag("model", metavar="MODEL_DIR", positional=True),), exclude=frozenset({"format", "file_name"})
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    description = (
        "check the model's vocabulary rows against its tokenizer, convert with llama.cpp's own "
        "converter (fetched once from the pinned llama-cpp-python sdist), write FILE atomically"
    )
    summary = "convert to one GGUF file with llama.cpp's convert_hf_to_gguf.py"
    gguf = add_action(formats, "gguf", summary, description, FLAGS.add_to, out=("FILE", "the .gguf file to write"))
    gguf.add_argument(
        "--offline", action="store_true", help="never download the converter; fail if it is not cached yet"
    )


def run(args: argparse.Namespace) -> int:
    from chla_tools.gguf_export import export_gguf

    export_gguf(FLAGS.params(args), args.out, offline=args.offline)
    return 0
