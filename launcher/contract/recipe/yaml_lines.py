"""YAML with line numbers: the recipe as plain Python objects plus the line of every key, so that
an error anywhere (a typo, a bad value, a missing input) names file:line and the key path.

A recipe is data, read from files a user may not have written: what YAML can make a parser do is
bounded here, and anything beyond a plain document (strings, numbers, booleans, null, lists and
mappings, anchors and merge keys) is one error naming the file and line:
- at most `max_nodes` nodes composed and `max_values` values built (every use of an alias counts
  again, so an alias-expansion "billion laughs" stops there) and `max_depth` levels of nesting
  (an alias that contains itself is endless nesting); PyYAML's composer recurses once per level
  and is stopped at the limit, long before Python's recursion limit;
- tags: only the core schema's (`!!str`, `!!int`, `!!float`, `!!bool`, `!!null`, `!!map`,
  `!!seq`); `!!python/...`, `!!binary`, `!!set`, `!!omap` and custom tags are refused; a
  timestamp-looking scalar (2024-01-01) and YAML 1.1's base-60 numbers (`time: 4:00:00`, which
  PyYAML reads as 14400) stay the text they are;
- keys are text as written (`1:`, `on:` and `yes:` are the strings "1", "on" and "yes", not a
  number or a boolean); complex keys (`? [a, b]`) are refused; a key given twice is an error
  naming both lines; a merge key (`<<: *defaults`) fills in only the keys the mapping lacks;
- numbers are finite (`.inf`, `.nan`, 1e999 refused) and have at most 64 digits;
- strings hold no control characters but tab and newline (a NUL, an ESC or a carriage return
  in a value is never what the user meant, and would reach files, argv and batch scripts).
The size of the file is bounded by the caller (chla_launcher.contract.recipe.load).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import KeyPath, RecipeError


@dataclass(frozen=True)
class ParseLimits:
    """What one document may make the parser do (see the module docstring)."""

    max_nodes: int
    max_values: int
    max_depth: int


# A recipe is a few kilobytes: recipes/full.yaml composes to ~300 nodes, 6 levels deep. PyYAML's
# pure-Python composer takes ~40 us a node here, so these limits bound a refused document's
# parse to about a second (measured figures: tests/launcher/test_hostile_recipes.py).
RECIPE_LIMITS = ParseLimits(max_nodes=20_000, max_values=20_000, max_depth=32)
# A frozen recipe is written by chla (its globs expanded into every file they matched, which can
# be many): only the nesting is bounded.
FROZEN_LIMITS = ParseLimits(max_nodes=50_000_000, max_values=50_000_000, max_depth=32)

_TAG = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_TAG + name for name in ("str", "int", "float", "bool", "null")}
# Kept as the text written: a date in vars is a string; YAML 1.1's "=" (the `value` type) too.
_TEXT_TAGS = {_TAG + "timestamp", _TAG + "value"}
_MAX_DIGITS = 64
# C0 controls but tab and newline, DEL, C1 controls, and the Unicode line/paragraph separators.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


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


class _TooBig(Exception):
    """Raised inside PyYAML's composer when a limit is passed (with the node where it happened)."""

    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.message, self.mark = message, mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's pure-Python safe loader, counting the nodes it composes and the depth it is at.
    (libyaml's loader is faster but its composer recurses in C without a bound: a document of
    200,000 '[' crashes the process with a segmentation fault, measured with PyYAML 6.0.3.)"""

    def __init__(self, text: str, limits: ParseLimits) -> None:
        super().__init__(text)
        self.limits, self.composed, self.depth = limits, 0, 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.composed += 1
        self.depth += 1
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        if self.composed > self.limits.max_nodes:
            raise _TooBig(f"more than {self.limits.max_nodes:,} YAML nodes (a recipe is a few hundred)", mark)
        if self.depth > self.limits.max_depth:
            raise _TooBig(f"nested deeper than {self.limits.max_depth} levels", mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_with_lines(text: str, source: str, limits: ParseLimits = RECIPE_LIMITS) -> tuple[Any, dict[KeyPath, int]]:
    """Parse YAML into plain Python objects plus a map key-path -> line number, within `limits`."""
    lines: dict[KeyPath, int] = {}
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text, limits)
        node = loader.get_single_node()
        if node is None:
            raise RecipeError("the recipe is empty; it needs at least `name:` and `stages:`", file=source)
        data = _Builder(loader, source, lines, limits).build(node, (), 0)
    except _TooBig as error:
        raise RecipeError(error.message, file=source, line=error.mark.line + 1 if error.mark else None) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else None
        problem = (error.problem or str(error)).strip()
        raise RecipeError(f"YAML syntax error: {problem}", file=source, line=line) from None
    except yaml.reader.ReaderError as error:
        # A character YAML does not allow in a stream (NUL, most controls): its position is a
        # character offset, turned into the line here.
        line = text.count("\n", 0, error.position) + 1
        code = error.character if isinstance(error.character, int) else ord(str(error.character)[:1] or "\0")
        raise RecipeError(
            f"YAML error: character U+{code:04X} is not allowed in a recipe", file=source, line=line
        ) from None
    except yaml.YAMLError as error:
        raise RecipeError(f"YAML error: {' '.join(str(error).split())}", file=source) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def parse_value(text: str, source: str, what: str) -> Any:
    """One YAML value given outside a file (`--set KEY=VALUE`), under the recipe's rules; errors
    name `what`."""
    try:
        data, _ = parse_with_lines(text, source)
    except RecipeError as error:
        raise RecipeError(f"{what}: {error.problem}", file=source) from None
    return data


@dataclass
class _Builder:
    """Plain Python objects from composed nodes, within the limits, recording each key's line."""

    loader: _BoundedLoader
    source: str
    lines: dict[KeyPath, int]
    limits: ParseLimits
    built: int = 0

    def error(self, message: str, path: KeyPath, node: yaml.Node) -> RecipeError:
        key = dotted(path)
        if len(key) > 100:  # an alias bomb's path: the start says where it is
            key = key[:100] + "..."
        return RecipeError(message, file=self.source, key=key or None, line=node.start_mark.line + 1)

    def build(self, node: yaml.Node, path: KeyPath, depth: int) -> Any:
        self.built += 1
        if self.built > self.limits.max_values:
            raise self.error(
                f"expands to more than {self.limits.max_values:,} values (aliases repeating aliases?)", path, node
            )
        if depth > self.limits.max_depth:
            raise self.error(f"nested deeper than {self.limits.max_depth} levels (an alias inside itself?)", path, node)
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                raise self.error(f"YAML tag {node.tag!r} is not allowed (a recipe holds plain lists)", path, node)
            return [self.build(item, path + (index,), depth + 1) for index, item in enumerate(node.value)]
        return self.scalar(node, path)

    def mapping(self, node: yaml.MappingNode, path: KeyPath, depth: int) -> dict[str, Any]:
        if node.tag != _TAG + "map":
            raise self.error(f"YAML tag {node.tag!r} is not allowed (a recipe holds plain mappings)", path, node)
        explicit: dict[str, Any] = {}
        key_lines: dict[str, int] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _TAG + "merge":
                for source in self.merge_sources(value_node, path):
                    for key, value in self.build(source, path, depth + 1).items():
                        merged.setdefault(key, value)  # earlier sources win, as YAML's merge says
                continue
            key = self.key(key_node, path)
            line = key_node.start_mark.line + 1
            if key in explicit:
                raise RecipeError(
                    f"duplicate key {key!r} (first at line {key_lines[key]}; YAML would silently keep the last)",
                    file=self.source,
                    key=dotted(path + (key,)),
                    line=line,
                )
            key_lines[key] = line
            self.lines[path + (key,)] = line
            explicit[key] = self.build(value_node, path + (key,), depth + 1)
        return {**merged, **explicit}

    def merge_sources(self, value_node: yaml.Node, path: KeyPath) -> list[yaml.MappingNode]:
        if isinstance(value_node, yaml.MappingNode):
            return [value_node]
        if isinstance(value_node, yaml.SequenceNode) and all(isinstance(n, yaml.MappingNode) for n in value_node.value):
            return list(value_node.value)
        raise self.error("a merge key (<<) takes a mapping or a list of mappings", path, value_node)

    def key(self, node: yaml.Node, path: KeyPath) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error("mapping keys must be plain scalars (text)", path, node)
        if node.tag not in _PLAIN_TAGS | _TEXT_TAGS:
            raise self.error(f"YAML tag {node.tag!r} is not allowed on a key", path, node)
        self.check_text(node.value, path, node)
        return str(node.value)  # as written: `on:` is the key "on", `1:` the key "1"

    def scalar(self, node: yaml.Node, path: KeyPath) -> Any:
        tag = node.tag
        if tag in _TEXT_TAGS:
            return node.value
        if tag not in _PLAIN_TAGS:
            raise self.error(
                f"YAML tag {tag!r} is not allowed (a recipe holds text, numbers, booleans, lists and mappings)",
                path,
                node,
            )
        if tag in (_TAG + "int", _TAG + "float"):
            if getattr(node, "style", None) is None and ":" in node.value:
                return node.value  # YAML 1.1's base 60: `4:00:00` is the time it looks like
            if sum(ch.isdigit() for ch in node.value) > _MAX_DIGITS:
                raise self.error(f"a number of more than {_MAX_DIGITS} digits", path, node)
        value = self.loader.construct_object(node, deep=True)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(f"{node.value!r} is not a finite number", path, node)
        if isinstance(value, str):
            self.check_text(value, path, node)
        return value

    def check_text(self, value: str, path: KeyPath, node: yaml.Node) -> None:
        found = _CONTROL.search(value)
        if found:
            raise self.error(
                f"control character U+{ord(found.group()):04X} in a string (only tab and newline are allowed)",
                path,
                node,
            )
