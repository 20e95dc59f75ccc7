"""The stage kinds' reference in Markdown, generated from their params models: for each kind its
module docstring, its traits and a table of its parameters (name, type with its bounds, default,
description), and a table for each nested model a parameter takes (a blend part, lm_eval's block).

The documentation build (mkdocs.yml's hook, docs/hooks/kind_parameters.py) puts this text into
docs/kinds.md, so a field added to a kind's params model is in the built docs without another edit.
Torch-free, like the rest of the launcher: it reads the pydantic models only.
"""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from chla_launcher.contract.kinds import InputPath, StageKind, registry

# Text outside code spans: what Markdown would read as markup (emphasis, HTML tags, links, table
# cells) is escaped, so a docstring's `out/<file_name>` or `a_b_c` shows as written.
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_MARKUP = re.compile(r"([\\*_\[\]|])")


def kinds_reference(kinds: Iterable[StageKind] | None = None, heading_level: int = 3) -> str:
    """Every kind of the registry (or those given), in name order, one section each."""
    chosen = sorted(registry().values() if kinds is None else kinds, key=lambda kind: kind.name)
    return "\n".join(kind_reference(kind, heading_level) for kind in chosen)


def kind_reference(kind: StageKind, heading_level: int = 3) -> str:
    """One kind: a heading named like the kind, its description, traits and parameter tables."""
    hashes = "#" * heading_level
    lines = [f"{hashes} `{kind.name}`", ""]
    # The docstring of the kind's module says what the kind does (its first line says at more length
    # what the params model's one-line description, `chla kinds`, says); a kind without one gets that line.
    paragraphs = _module_docstring(kind.params) or [kind.description]
    lines += [_prose(paragraph) + "\n" for paragraph in paragraphs]
    traits = [
        "an array stage (`array: N`)" if kind.array else "one task (no `array:`)",
        "may run on several ranks" if kind.distributed else "one rank",
        "needs the training extra" if kind.needs_training_stack else "runs without the training extra",
    ]
    lines += [f"Runs `{kind.entry}`; {', '.join(traits)}.", ""]
    lines += _table(kind.params)
    for nested in _nested_models(kind.params):
        lines += ["", f"{hashes}# `{kind.name}`: `{nested.__name__}`", ""]
        if nested.__doc__:
            lines += [_prose(" ".join(nested.__doc__.split())), ""]
        lines += _table(nested)
    return "\n".join(lines) + "\n"


def _table(model: type[BaseModel]) -> list[str]:
    rows = ["| parameter | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        cells = [f"`{name}`", _type_cell(field), _default_cell(field), _prose(field.description or "")]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _type_cell(field: FieldInfo) -> str:
    text = f"`{type_text(field.annotation)}`"
    notes = [_bound_text(meta) for meta in field.metadata]
    markers = [meta for meta in field.metadata if isinstance(meta, InputPath)] + _input_paths_inside(field.annotation)
    if markers:
        notes.append("a glob that must match a file" if markers[0].glob else "an input path")
    shown = [note for note in notes if note]
    return text + (" (" + "; ".join(shown) + ")" if shown else "")


def _default_cell(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return "`" + json.dumps(value, ensure_ascii=False, default=str) + "`"


def type_text(annotation: Any) -> str:
    """A params annotation as a reader writes its values: `int | null`, `"bpe" | "unigram"`,
    `list[BlendPart]`."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Annotated:
        return type_text(args[0])
    if origin is Union or origin is types.UnionType:
        return " | ".join(type_text(arg) for arg in args)
    if origin is Literal:
        return " | ".join(json.dumps(arg, ensure_ascii=False) for arg in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_text(arg) for arg in args)}]" if args else name
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    return str(getattr(annotation, "__name__", annotation)).replace("typing.", "")


def _bound_text(meta: object) -> str:
    bounds: list[tuple[type[Any], str, str]] = [
        (annotated_types.Ge, "ge", ">="),
        (annotated_types.Gt, "gt", ">"),
        (annotated_types.Le, "le", "<="),
        (annotated_types.Lt, "lt", "<"),
    ]
    for bound_type, attribute, sign in bounds:
        if isinstance(meta, bound_type):
            return f"{sign} {getattr(meta, attribute)}"
    if isinstance(meta, annotated_types.MinLen):
        return f"at least {meta.min_length} long"
    if isinstance(meta, annotated_types.MaxLen):
        return f"at most {meta.max_length} long"
    return ""


def _input_paths_inside(annotation: Any) -> list[InputPath]:
    if get_origin(annotation) is Annotated:
        return [meta for meta in get_args(annotation)[1:] if isinstance(meta, InputPath)]
    return [marker for arg in get_args(annotation) for marker in _input_paths_inside(arg)]


def _nested_models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """The models a field's values are made of (a blend's parts, lm_eval's and vllm's blocks), in
    field order, each once."""
    found: list[type[BaseModel]] = []

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in found:
                found.append(annotation)
            return
        for arg in get_args(annotation):
            visit(arg)

    for field in model.model_fields.values():
        visit(field.annotation)
    return found


def _module_docstring(params: type[BaseModel]) -> list[str]:
    """The paragraphs of the docstring of the module that defines the params model."""
    module = sys.modules.get(params.__module__)
    doc = (module.__doc__ if module else None) or ""
    return [" ".join(paragraph.split()) for paragraph in doc.strip().split("\n\n") if paragraph.strip()]


def _prose(text: str) -> str:
    """`text` for a Markdown paragraph or table cell: code spans kept, markup characters and angle
    brackets outside them escaped."""
    out: list[str] = []
    position = 0
    for match in _CODE_SPAN.finditer(text):
        out.append(_escape(text[position : match.start()]))
        # Python-Markdown's tables split no cell inside a code span: its `|` stays as it is.
        out.append(match.group(0))
        position = match.end()
    out.append(_escape(text[position:]))
    return "".join(out)


def _escape(text: str) -> str:
    text = _MARKUP.sub(r"\\\1", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
