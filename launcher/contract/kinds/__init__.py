"""The stage-kind registry: kind name -> typed params, entry point (an import path string, so the
launcher never imports the training stack) and traits.

Each module in this package describes one kind: its params model (whose docstring is the kind's
description) and `KIND = StageKind(name, params, entry, ...)`; the registry
collects them, so adding a kind is adding one module here and its runner,
`chla_train/stages/<kind>.py` (`run`, and `finalize` for an array kind; tests/launcher/test_kinds.py
holds every kind to that).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict


class StageParams(BaseModel):
    """Base of every kind's params: unknown keys are errors, values are validated on assignment,
    inf and nan are no numbers (a learning rate of .inf passed `gt=0`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True, allow_inf_nan=False)


class InputPath:
    """Marks a params field (str or list of str) as a path that must exist when the recipe is
    submitted, unless it lies inside the run directory (then an upstream stage produces it).

    Use as `Annotated[str, InputPath()]`. `glob=True` means the value is a glob pattern that
    must match at least one file.
    """

    def __init__(self, glob: bool = False) -> None:
        self.glob = glob

    def __repr__(self) -> str:
        return f"InputPath(glob={self.glob})"


@dataclass(frozen=True)
class StageKind:
    """What the launcher knows about one kind of stage. Its one-line description (`chla kinds`) is
    the docstring of its params model."""

    name: str
    params: type[StageParams]
    # "module:function" run once per task with a chla_train.context.StageContext.
    entry: str
    # May the stage be an array (`array: N` in the recipe)? Array stages also get `finalize`, run
    # once after every task succeeded (aggregation, manifests); it writes nothing if None.
    array: bool = False
    finalize: str | None = None
    # May the stage run on nodes x tasks_per_node > 1 ranks?
    distributed: bool = False
    # Does the stage need the training extra (torch ...)? Informational for `chla kinds`.
    needs_training_stack: bool = True
    # For node-scaling sweeps with `scaling: strong`: the integer param that multiplies the global
    # batch (gradient accumulation), divided as the node count grows so the global batch stays put.
    accumulation_param: str | None = None

    @property
    def description(self) -> str:
        return " ".join((self.params.__doc__ or "").split())

    @property
    def entry_module(self) -> str:
        return self.entry.split(":", 1)[0]


@lru_cache(maxsize=1)
def registry() -> dict[str, StageKind]:
    kinds: dict[str, StageKind] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        kind = getattr(module, "KIND", None)
        if isinstance(kind, StageKind):
            if kind.name in kinds:
                raise RuntimeError(f"stage kind {kind.name!r} is defined twice")
            kinds[kind.name] = kind
    return kinds


def get_kind(name: str) -> StageKind | None:
    return registry().get(name)


def input_path_fields(params_model: type[BaseModel]) -> dict[str, InputPath]:
    """Fields of a params model marked with InputPath, by name."""
    found: dict[str, InputPath] = {}
    for field_name, field in params_model.model_fields.items():
        markers = [meta for meta in field.metadata if isinstance(meta, InputPath)]
        markers += _markers_inside(field.annotation)
        if markers:
            found[field_name] = markers[0]
    return found


def _markers_inside(annotation: Any) -> list[InputPath]:
    """InputPath markers of `list[Annotated[str, InputPath()]]` or `Annotated[str, ...] | None`."""
    found: list[InputPath] = []
    if get_origin(annotation) is Annotated:
        found += [meta for meta in get_args(annotation)[1:] if isinstance(meta, InputPath)]
    else:
        for arg in get_args(annotation):
            found += _markers_inside(arg)
    return found


def input_path_values(value: Any) -> list[tuple[tuple[int | str, ...], str]]:
    """The paths inside one InputPath field's value, each with its key path below the field: the
    value itself (a str), the items of a list, and the `path` of list items that are parts (such
    as a corpus blend's `{path, weight}`, as a dict or a params model)."""
    if isinstance(value, str):
        return [((), value)] if value else []
    found: list[tuple[tuple[int | str, ...], str]] = []
    for index, item in enumerate(value if isinstance(value, list) else []):
        if isinstance(item, str):
            if item:
                found.append(((index,), item))
            continue
        path = item.get("path") if isinstance(item, dict) else getattr(item, "path", None)
        if isinstance(path, str) and path:
            found.append(((index, "path"), path))
    return found


def map_input_paths(value: Any, change: Callable[[str], str]) -> Any:
    """`value` (an InputPath field's raw value) with every path in it replaced by change(path)."""
    if isinstance(value, str):
        return change(value) if value else value
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for item in value:
        if isinstance(item, str):
            out.append(change(item) if item else item)
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
            out.append({**item, "path": change(item["path"])})
        else:
            out.append(item)
    return out


def import_entry(spec: str) -> Any:
    """Import "module:attr" (used on the job side only)."""
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)
