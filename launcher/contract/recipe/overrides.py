"""`--set KEY.PATH=VALUE`: overrides applied to the parsed recipe before it is validated."""

from __future__ import annotations

from typing import Any

from ..errors import RecipeError
from ..executor_registry import settings_models
from .yaml_lines import parse_value


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> None:
    """Apply `key.path=value` overrides in place. The value is parsed as a YAML scalar/flow value
    (so `nodes=2` is an int, `argv=[a, b]` a list); the schema types it during validation.
    Every container on the path must exist; the last key may be new (validation catches typos)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE", file=source)
        key_path, _, value_text = item.partition("=")
        parts = key_path.strip().split(".")
        if not key_path.strip() or any(not part or not part.isprintable() for part in parts):
            raise RecipeError(f"--set {item!r}: malformed key path", file=source)
        # Parsed under the recipe file's rules and bounds (no tags, finite numbers, no control
        # characters, no alias bombs).
        value = parse_value(value_text, source, f"--set {key_path}") if value_text.strip() else ""
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, dict) and part in node and isinstance(node[part], (dict, list)):
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part not in node and _creatable(parts[: depth + 1]):
                node[part] = {}
                node = node[part]
            else:
                where = ".".join(parts[: depth + 1])
                raise RecipeError(f"--set {key_path}: {where} does not exist in the recipe", file=source)
        last = parts[-1]
        if isinstance(node, list):
            if not (last.isdigit() and int(last) < len(node)):
                raise RecipeError(f"--set {key_path}: no list item {last}", file=source)
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"--set {key_path}: {'.'.join(parts[:-1])} is not a mapping", file=source)


def _creatable(prefix: list[str]) -> bool:
    """Blocks that --set may create: resources, vars, tracking (and anything inside vars or
    tracking), the settings block of any executor that has one (`slurm`, a plugin's) and anything
    inside it (`slurm.sbatch`), a stage's resources, and anything inside a stage's params. The
    models behind them (settings, the kind's params) catch typos."""
    if prefix[0] in ("vars", "tracking") or prefix[0] in settings_models():
        return True
    if len(prefix) == 1:
        return prefix[0] == "resources"
    if len(prefix) >= 3 and prefix[0] == "stages" and prefix[2] == "params":
        return True
    return len(prefix) == 3 and prefix[0] == "stages" and prefix[2] == "resources"
