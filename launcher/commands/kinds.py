"""`chla kinds`: the stage kinds a recipe can use, with their parameters."""

from __future__ import annotations

import argparse

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
        traits = [t for t, on in (("array", kind.array), ("distributed", kind.distributed)) if on]
        print(f"{kind.name}: {kind.description}" + (f" [{', '.join(traits)}]" if traits else ""))
        for name, field in kind.params.model_fields.items():
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
            note = f" - {field.description}" if field.description else ""
            print(f"  {name}: {_type_name(field.annotation)} ({default}){note}")
        return 0
    for kind in kinds.values():
        traits = [t for t, on in (("array", kind.array), ("distributed", kind.distributed)) if on]
        print(f"{kind.name:<18} {kind.description}" + (f" [{', '.join(traits)}]" if traits else ""))
    return 0


def _type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")
