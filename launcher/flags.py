"""Command-line flags derived from a stage kind's params model, so that an option is declared once.

`chla pretokenize`, `chla merge`, `chla eval` and `chla vocab` run the same code as their stage
kinds. Their flags are the kind's params fields: the type, the choices, the default and the help
text come from the params model, and the parsed flags become that model again (validated the
same way as a recipe's `params:`). A command offers every field but those it excludes, and may
rename a flag where the CLI had a shorter name first (`--input` for `inputs`), or take a required
path as a positional argument.

Derived from the field's annotation (Annotated markers and `| None` looked through):
  str, int, float     --field-name VALUE, converted by that type
  Literal[...]        --field-name {a,b,c}
  list[str]           --field-name VALUE [VALUE ...], repeatable; the values are collected
  bool                --field-name (sets True) when it defaults to False, --no-field-name when
                      it defaults to True
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from .contract.errors import ChlaError
from .contract.kinds import StageParams

ParamsT = TypeVar("ParamsT", bound=StageParams)


@dataclass(frozen=True)
class Flag:
    """How one params field is offered: `name` replaces the derived `--field-name` (or
    `--no-field-name`), `metavar` the placeholder in the help; a `positional` field (a required
    str) is an argument without a flag (`chla export gguf MODEL_DIR`)."""

    field: str
    name: str | None = None
    metavar: str | None = None
    positional: bool = False


@dataclass(frozen=True)
class ParamFlags(Generic[ParamsT]):
    """The flags of a command that runs what a stage kind runs: every field of `model` except
    `exclude`, in the model's order, as `flags` rename them. A field added to the model is a flag
    of the command without touching the command."""

    model: type[ParamsT]
    flags: tuple[Flag, ...] = ()
    exclude: frozenset[str] = frozenset()

    def offered(self) -> list[Flag]:
        named = {flag.field: flag for flag in self.flags}
        unknown = set(named) - set(self.model.model_fields)
        if unknown:
            raise TypeError(f"{self.model.__name__} has no field {sorted(unknown)}")
        return [named.get(field, Flag(field)) for field in self.model.model_fields if field not in self.exclude]

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add one flag per offered field to `parser` (dest: the field's name)."""
        for flag in self.offered():
            _add_flag(parser, self.model, flag)

    def params(self, args: argparse.Namespace) -> ParamsT:
        """The params object the parsed flags describe, validated by the model; an invalid value is
        a ChlaError that names its flag."""
        flags = self.offered()
        try:
            return self.model(**{flag.field: getattr(args, flag.field) for flag in flags})
        except ValidationError as error:
            first = error.errors()[0]
            message = first["msg"].removeprefix("Value error, ")
            names = {flag.field: flag_name(flag, self.model.model_fields[flag.field]) for flag in flags}
            where = names.get(str(first["loc"][0])) if first["loc"] else None
            raise ChlaError(f"{where}: {message}" if where else message) from None


def add_override_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--set KEY.PATH=VALUE` (repeatable; dest `overrides`): the recipe override flag of every
    command that reads a recipe (submit, plan)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=help_text
    )


def add_action(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    description: str,
    add_flags: Callable[[argparse.ArgumentParser], None],
    out: tuple[str, str | None] | None = ("DIR", None),
) -> argparse.ArgumentParser:
    """The parser of action `name` of a command that has actions (`chla vocab train`, `chla export
    gguf`): `help_text` in the command's list, `description` atop its own help, the flags
    `add_flags` adds (a ParamFlags' add_to) and, unless `out` is None, a required `--out` (its
    metavar and help)."""
    action = actions.add_parser(name, help=help_text, description=description)
    add_flags(action)
    if out is not None:
        metavar, out_help = out
        action.add_argument("--out", required=True, metavar=metavar, help=out_help)
    return action


def _plain(annotation: Any) -> Any:
    """The annotation without Annotated and `| None`."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType) and type(None) in get_args(annotation):
            rest = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(rest) != 1:
                raise TypeError(f"a flag cannot take {annotation}")
            annotation = rest[0]
        else:
            return annotation


def flag_name(flag: Flag, info: FieldInfo) -> str:
    if flag.positional:
        return flag.metavar or flag.field
    if flag.name:
        return flag.name
    dashed = flag.field.replace("_", "-")
    annotation = _plain(info.annotation)
    return f"--no-{dashed}" if annotation is bool and info.get_default() is True else f"--{dashed}"


def _add_flag(parser: argparse.ArgumentParser, model: type[StageParams], flag: Flag) -> None:
    info = model.model_fields[flag.field]
    annotation = _plain(info.annotation)
    required = info.is_required()
    default = None if required else info.get_default(call_default_factory=True)
    help_text = (info.description or "").replace("%", "%%")
    if flag.positional:
        if annotation is not str or not required:
            raise TypeError(f"{model.__name__}.{flag.field}: only a required str can be positional")
        parser.add_argument(flag.field, metavar=flag.metavar, help=help_text or None)
        return
    options: dict[str, Any] = {"dest": flag.field}
    if annotation is bool:
        options["action"] = "store_false" if default is True else "store_true"
        if default is True:
            help_text = f"switch off (on by default): {help_text}"
    elif get_origin(annotation) is list:
        options.update(
            nargs="+",
            action="extend",
            type=get_args(annotation)[0],
            required=required,
            default=None if required else list(default or []),
        )
    elif get_origin(annotation) is Literal:
        choices = list(get_args(annotation))
        options.update(choices=choices, type=type(choices[0]), required=required, default=default)
    elif annotation in (str, int, float):
        options.update(type=annotation, required=required, default=default)
    else:
        raise TypeError(f"{model.__name__}.{flag.field}: a flag cannot take {info.annotation}; exclude it")
    if flag.metavar:
        options["metavar"] = flag.metavar
    if default is not None and not isinstance(default, bool) and default != []:
        help_text += f" (default: {default})".replace("%", "%%")
    parser.add_argument(flag_name(flag, info), help=help_text.strip() or None, **options)
