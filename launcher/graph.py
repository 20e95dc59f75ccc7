"""The stage graph: dependency order, fingerprints, and which stages a submission runs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import __version__
from .errors import ChlaError
from .recipe import ResolvedRecipe, ResolvedStage


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as [a, b, ..., a], or None. `edges[x]` are the stages x waits for."""
    white, grey, black = 0, 1, 2
    color = {node: white for node in edges}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for parent in edges.get(node, []):
            if color.get(parent) == grey:
                return stack[stack.index(parent):] + [parent]
            if color.get(parent) == white:
                found = visit(parent)
                if found:
                    return found
        stack.pop()
        color[node] = black
        return None

    for node in sorted(edges):
        if color[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def topological_order(recipe: ResolvedRecipe) -> list[str]:
    """Stages parents-first; ties keep the recipe's order (so plans read like the recipe)."""
    position = {name: index for index, name in enumerate(recipe.stages)}
    remaining = {name: set(stage.after) for name, stage in recipe.stages.items()}
    order: list[str] = []
    while remaining:
        ready = sorted((name for name, parents in remaining.items() if not parents), key=position.get)
        if not ready:  # cannot happen: resolve() rejects cycles
            raise ChlaError("dependency cycle")
        name = ready[0]
        order.append(name)
        del remaining[name]
        for parents in remaining.values():
            parents.discard(name)
    return order


def descendants(recipe: ResolvedRecipe, roots: set[str]) -> set[str]:
    children: dict[str, set[str]] = {name: set() for name in recipe.stages}
    for name, stage in recipe.stages.items():
        for parent in stage.after:
            children[parent].add(name)
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        for child in children[node]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def ancestors(recipe: ResolvedRecipe, name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(recipe.stages[name].after)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(recipe.stages[node].after)
    return seen


@lru_cache(maxsize=None)
def code_version(entry_module: str) -> str:
    """chla's version plus a hash of the kind's runner source, found without importing it (the
    launcher must not import the training stack)."""
    digest = hashlib.sha256(__version__.encode())
    try:
        spec = importlib.util.find_spec(entry_module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.exists(spec.origin):
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


def _input_identity(path: str) -> list:
    """Size and mtime of an external input (cheap; content hashes are the stages' own business)."""
    try:
        stat = os.stat(path)
    except OSError:
        return [path, None]
    return [path, stat.st_size, int(stat.st_mtime)]


def fingerprints(recipe: ResolvedRecipe) -> dict[str, str]:
    """Per stage: hash of kind, resolved params, array size, world size (it changes the global
    batch), the fingerprints of the stages it waits for, and the code version."""
    from .kinds import input_path_fields

    result: dict[str, str] = {}
    for name in topological_order(recipe):
        stage = recipe.stages[name]
        external = []
        for field_name in input_path_fields(stage.kind.params):
            value = getattr(stage.params, field_name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item and not Path(item).is_relative_to(recipe.run_dir):
                    external.append(_input_identity(item))
        payload = {
            "kind": stage.kind.name,
            "params": stage.params_raw,
            "array": stage.array,
            "world_size": stage.resources.world_size,
            "upstream": {parent: result[parent] for parent in stage.after},
            "inputs": external,
            "code": code_version(stage.kind.entry_module),
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        result[name] = hashlib.sha256(blob).hexdigest()[:20]
    return result


@dataclass
class Plan:
    """What one submission does: stages to run (in order) and stages already finished."""

    order: list[str]
    run: list[str]
    skip: list[str]
    fingerprints: dict[str, str]

    def stages_to_run(self, recipe: ResolvedRecipe) -> list[ResolvedStage]:
        return [recipe.stages[name] for name in self.run]


def plan(recipe: ResolvedRecipe, done: dict[str, str | None], *, only: list[str] | None = None,
         from_stage: str | None = None) -> Plan:
    """Choose the stages to run.

    `done[stage]` is the fingerprint in the stage's DONE marker (None if absent). By default a stage
    runs unless its DONE marker holds its current fingerprint; everything downstream of a stage that
    runs runs too. `from_stage` forces that stage and all its dependents; `only` runs exactly the named
    stages. Stages that must run first but are neither finished nor selected are an error.
    """
    prints = fingerprints(recipe)
    order = topological_order(recipe)
    for name in (only or []) + ([from_stage] if from_stage else []):
        if name not in recipe.stages:
            raise ChlaError(f"no stage named {name!r} in the recipe (stages: {', '.join(order)})")

    finished = {name for name in order if done.get(name) == prints[name]}
    if only:
        selected = set(only)
    elif from_stage:
        selected = {from_stage} | descendants(recipe, {from_stage})
        selected |= {name for name in order if name not in finished}
    else:
        selected = {name for name in order if name not in finished}
        selected |= descendants(recipe, selected)

    for name in order:
        if name in selected:
            for parent in recipe.stages[name].after:
                if parent not in selected and parent not in finished:
                    raise ChlaError(f"stage {name!r} needs {parent!r}, which has not finished "
                                    f"with the current recipe; run it too (drop --only/--from)")
    run = [name for name in order if name in selected]
    skip = [name for name in order if name not in selected]
    return Plan(order=order, run=run, skip=skip, fingerprints=prints)
