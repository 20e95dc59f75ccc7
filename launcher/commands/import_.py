"""`chla import gguf FILE --out DIR [--dtype float32|bfloat16|float16]`: the `import_gguf` stage on
this machine. Its flags are the `import_gguf` kind's params (chla_launcher.contract.kinds.import_gguf)."""

from __future__ import annotations

import argparse

from ..contract.kinds.import_gguf import ImportGgufParams
from ..flags import Flag, ParamFlags, add_action

NAME = "import"
HELP = "import a model from another format as an HF model folder: GGUF (llama.cpp's)"
ORDER = 65

# One subcommand per format (today gguf), like `chla export`.
FLAGS = ParamFlags(ImportGgufParams, (Flag("gguf", metavar="FILE", positional=True),))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    description = (
        "read FILE with transformers' own GGUF loader and write an HF model folder: model.safetensors, "
        "config.json, generation_config.json, a portable tokenizer with the chat template, and chla_import.json "
        "with the file's sha256; DIR is replaced atomically"
    )
    summary = "a GGUF file -> safetensors, config and a tokenizer transformers 4 and 5 load"
    add_action(formats, "gguf", summary, description, FLAGS.add_to, out=("DIR", "the model folder to write"))


def run(args: argparse.Namespace) -> int:
    from chla_tools.gguf_import import import_gguf

    import_gguf(FLAGS.params(args), args.out)
    return 0
