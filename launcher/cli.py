"""`chla` and `chla-submit`. Subcommands live in chla_launcher.commands, one module each; this file
only wires them. Nothing here imports the training stack, so `chla --help` stays fast on a login node."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
from types import ModuleType

from . import __version__, commands
from .contract.errors import ChlaError


def _command_modules() -> list[ModuleType]:
    modules = [
        importlib.import_module(f"{commands.__name__}.{info.name}") for info in pkgutil.iter_modules(commands.__path__)
    ]
    modules = [m for m in modules if hasattr(m, "NAME") and hasattr(m, "run")]
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chla",
        description="Adapt a LLaMA-family model to Chinese: YAML recipes become chains of "
        "dependent Slurm jobs (or run on this machine).",
    )
    parser.add_argument("--version", action="version", version=f"chla {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def _dispatch(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ChlaError as error:
        print(f"chla: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as error:
        # SIGINT, or SIGTERM/SIGHUP during a submission (chla_launcher.transaction), which has
        # been rolled back by now. The terminal may be gone (SIGHUP): say it if we can.
        signum = getattr(error, "signum", signal.SIGINT)
        try:
            print(f"chla: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        except OSError:
            pass
        return 128 + signum
    except BrokenPipeError:
        return 0


def main(argv: list[str] | None = None) -> int:
    return _dispatch(build_parser(), sys.argv[1:] if argv is None else argv)


def submit_main(argv: list[str] | None = None) -> int:
    """`chla-submit ...` is `chla submit ...`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version",):
        return main(argv)
    code = main(["submit", *argv])
    return code


if __name__ == "__main__":
    sys.exit(main())
