"""YAML with line numbers: the recipe as plain Python objects plus the line of every key, so that
an error anywhere (a typo, a bad value, a missing input) names file:line and the key path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import KeyPath, RecipeError


def dotted(path: KeyPath) -> str:
    """A key path as the user writes it: stages.pt.params.inputs[0]."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


@dataclass(frozen=True)
class SourceMap:
    """Where a recipe's keys stand: its file and the line of each key path YAML reported."""

    file: str
    lines: Mapping[KeyPath, int] = field(default_factory=dict)

    def line(self, path: KeyPath) -> int | None:
        """The line of `path`, or of the nearest key around it that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def error(self, message: str, path: KeyPath, *, line_of: KeyPath | None = None) -> RecipeError:
        """A RecipeError naming the file, `path` and the line of `line_of` (default: of `path`)."""
        return RecipeError(
            message, file=self.file, key=dotted(path), line=self.line(path if line_of is None else line_of)
        )


def parse_with_lines(text: str, source: str) -> tuple[Any, dict[KeyPath, int]]:
    """Parse YAML into plain Python objects plus a map key-path -> line number.

    Duplicate keys are errors (PyYAML silently keeps the last one, which would hide a second stage
    with the same name)."""
    loader = yaml.SafeLoader(text)
    lines: dict[KeyPath, int] = {}
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError("the recipe is empty; it needs at least `name:` and `stages:`", file=source)

        def build(node: yaml.Node, path: KeyPath) -> Any:
            lines.setdefault(path, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                loader.flatten_mapping(node)
                result: dict[Any, Any] = {}
                for key_node, value_node in node.value:
                    key = loader.construct_object(key_node, deep=True)
                    if not isinstance(key, (str, int, float, bool)) or key is None:
                        raise RecipeError(
                            "mapping keys must be plain scalars",
                            file=source,
                            key=dotted(path),
                            line=key_node.start_mark.line + 1,
                        )
                    if key in result:
                        raise RecipeError(
                            f"duplicate key {key!r}",
                            file=source,
                            key=dotted(path + (key,)),
                            line=key_node.start_mark.line + 1,
                        )
                    lines[path + (key,)] = key_node.start_mark.line + 1
                    result[key] = build(value_node, path + (key,))
                return result
            if isinstance(node, yaml.SequenceNode):
                return [build(item, path + (index,)) for index, item in enumerate(node.value)]
            return loader.construct_object(node, deep=True)

        data = build(node, ())
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else None
        problem = (error.problem or str(error)).strip()
        raise RecipeError(f"YAML syntax error: {problem}", file=source, line=line) from None
    except yaml.YAMLError as error:
        raise RecipeError(f"YAML error: {error}", file=source) from None
    finally:
        loader.dispose()
    return data, lines
