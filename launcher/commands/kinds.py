"""`chla kinds`: the stage kinds a recipe can use, with their parameters."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chla_launcher.contract.kinds import StageKind

NAME = "kinds"
HELP = "list the stage kinds and their parameters"
ORDER = 90


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", nargs="?", help="show the parameters of one kind")


def run(args: argparse.Namespace) -> int:
    from chla_launcher.contract.errors import ChlaError
    from chla_launcher.contract.kinds import registry

    kinds = registry()
    if args.kind:
        if args.kind not in kinds:
            raise ChlaError(f"unknown stage kind {args.kind!r} (known: {', '.join(sorted(kinds))})")
        kind = kinds[args.kind]
        print(f"{kind.name}: {kind.description}{_traits(kind)}")
        for name, field in kind.params.model_fields.items():
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
            note = f" - {field.description}" if field.description else ""
            print(f"  {name}: {_type_name(field.annotation)} ({default}){note}")
        return 0
    for kind in kinds.values():
        print(f"{kind.name:<18} {kind.description}{_traits(kind)}")
    return 0


def _traits(kind: StageKind) -> str:
    """How the stage may run and what it declares to the rest of chla (what `chla plan` sizes and
    follows), as ` [array, distributed, trains, model out]`; empty where it declares nothing."""
    traits = [
        trait
        for trait, declared in (
            ("array", kind.array),
            ("distributed", kind.distributed),
            ("trains", kind.trains is not None),
            ("model out", kind.model_output is not None),
            ("tokenizer out", kind.tokenizer_output is not None),
            ("vocabulary out", kind.vocabulary_output is not None),
        )
        if declared
    ]
    return f" [{', '.join(traits)}]" if traits else ""


def _type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")
