"""Command-line flags derived from a stage kind's params model, so that an option is declared once.

`chla pretokenize`, `chla merge`, `chla eval` and `chla vocab` run the same code as their stage
kinds. Their flags are the kind's params fields: the type, the choices, the default and the help
text come from the params model, and the parsed flags become that model again (validated the
same way as a recipe's `params:`). A command lists which fields it offers and may rename a flag
where the CLI had a shorter name first (`--input` for `inputs`).

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from .errors import ChlaError
from .kinds import StageParams

ParamsT = TypeVar("ParamsT", bound=StageParams)


@dataclass(frozen=True)
class Flag:
    """One params field offered as a flag: `name` replaces the derived `--field-name` (or
    `--no-field-name`), `metavar` the placeholder in the help."""

    field: str
    name: str | None = None
    metavar: str | None = None


def _flags(flags: Sequence[Flag | str]) -> list[Flag]:
    return [flag if isinstance(flag, Flag) else Flag(flag) for flag in flags]


def _plain(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without Annotated and None, whether None was allowed)."""
    optional = False
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType) and type(None) in get_args(annotation):
            rest = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(rest) != 1:
                raise TypeError(f"a flag cannot take {annotation}")
            annotation, optional = rest[0], True
        else:
            return annotation, optional


def flag_name(flag: Flag, info: FieldInfo) -> str:
    if flag.name:
        return flag.name
    dashed = flag.field.replace("_", "-")
    annotation, _ = _plain(info.annotation)
    return f"--no-{dashed}" if annotation is bool and info.get_default() is True else f"--{dashed}"


def add_param_flags(parser: argparse.ArgumentParser, model: type[StageParams], flags: Sequence[Flag | str]) -> None:
    """Add one flag per listed field of `model` to `parser` (dest: the field's name)."""
    for flag in _flags(flags):
        info = model.model_fields[flag.field]
        annotation, _ = _plain(info.annotation)
        required = info.is_required()
        default = None if required else info.get_default(call_default_factory=True)
        help_text = (info.description or "").replace("%", "%%")
        options: dict[str, Any] = {"dest": flag.field}
        if annotation is bool:
            options["action"] = "store_false" if default is True else "store_true"
            if default is True:
                help_text = f"switch off (on by default): {help_text}"
        elif get_origin(annotation) is list:
            options.update(nargs="+", action="extend", type=get_args(annotation)[0], required=required,
                           default=None if required else list(default or []))
        elif get_origin(annotation) is Literal:
            choices = list(get_args(annotation))
            options.update(choices=choices, type=type(choices[0]), required=required, default=default)
        elif annotation in (str, int, float):
            options.update(type=annotation, required=required, default=default)
        else:
            raise TypeError(f"{model.__name__}.{flag.field}: a flag cannot take {info.annotation}")
        if flag.metavar:
            options["metavar"] = flag.metavar
        if default is not None and not isinstance(default, bool) and default != []:
            help_text += f" (default: {default})".replace("%", "%%")
        parser.add_argument(flag_name(flag, info), help=help_text.strip() or None, **options)


def params_from_flags(model: type[ParamsT], args: argparse.Namespace, flags: Sequence[Flag | str],
                      **fixed: Any) -> ParamsT:
    """The params object the parsed flags (and `fixed` values) describe, validated by the model; an
    invalid value is a ChlaError that names its flag."""
    flags = _flags(flags)
    values = {flag.field: getattr(args, flag.field) for flag in flags}
    try:
        return model(**values, **fixed)
    except ValidationError as error:
        first = error.errors()[0]
        names = {flag.field: flag_name(flag, model.model_fields[flag.field]) for flag in flags}
        field = str(first["loc"][0]) if first["loc"] else ""
        where = names.get(field, field)
        raise ChlaError(f"{where}: {first['msg']}" if where else first["msg"]) from None
