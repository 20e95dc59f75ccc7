"""The stage graph: dependency order, fingerprints, and which stages a submission runs."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from .contract.errors import ChlaError
from .contract.recipe import ResolvedRecipe, ResolvedStage


def topological_order(recipe: ResolvedRecipe) -> list[str]:
    """Stages parents-first; ties keep the recipe's order (so plans read like the recipe)."""
    position = {name: index for index, name in enumerate(recipe.stages)}
    remaining = {name: set(stage.after) for name, stage in recipe.stages.items()}
    order: list[str] = []
    while remaining:
        ready = sorted((name for name, parents in remaining.items() if not parents), key=position.__getitem__)
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


# What can change a stage's output besides its params and inputs: the code it runs and these
# libraries (numerics, tokenization, serialization).
CHLA_PACKAGES = ("chla_launcher", "chla_train", "chla_tools")
LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "sentencepiece", "tokenizers")


@cache
def _package_root(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)  # a top-level name: found without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _module_file(module: str) -> Path | None:
    top, _, rest = module.partition(".")
    root = _package_root(top) if top in CHLA_PACKAGES else None
    if root is None:
        return None
    base = root.joinpath(*rest.split(".")) if rest else root
    for candidate in (base / "__init__.py", base.with_name(base.name + ".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Every module name `module` may import, at the top or inside a function (a name imported
    `from` a package may be a submodule: listed too, dropped later if it is not one)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@cache
def code_closure(*modules: str) -> dict[str, Path]:
    """The chla modules a job starting at `modules` can run: their chla imports, transitively,
    with the packages around each (importing a.b.c runs a/__init__.py and a/b/__init__.py).
    Found by reading the source with ast: the launcher never imports the training stack."""
    found: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in found or module.partition(".")[0] not in CHLA_PACKAGES:
            continue
        path = _module_file(module)
        if path is None:  # a name imported from a module, not a module
            continue
        found[module] = path
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_imports(module, path))
    return dict(sorted(found.items()))


@cache
def code_version(*modules: str) -> str:
    """A hash of the source of every chla module a stage starting at `modules` can run."""
    digest = hashlib.sha256()
    for module, path in code_closure(*modules).items():
        digest.update(module.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """Installed versions (read from the package metadata, nothing imported) in the Python that
    submits, which is the one the jobs run unless slurm.python names another."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def input_identity(path: str) -> list[Any]:
    """Size and modification time of an external input, and of every file inside it if it is a
    directory (content hashes are the stages' own business: reading a model to hash it would take
    longer than the submission)."""
    try:
        stat = os.stat(path)
    except OSError:
        return [path, None]
    if not os.path.isdir(path):
        return [path, stat.st_size, stat.st_mtime_ns]
    files = []
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(folder, name)
            try:
                inner = os.stat(full)
            except OSError:
                continue
            files.append([os.path.relpath(full, path), inner.st_size, inner.st_mtime_ns])
    return [path, files]


def fingerprints(recipe: ResolvedRecipe) -> dict[str, str]:
    """Per stage: hash of kind, resolved params (globs expanded at submission), array size, world
    size (it changes the global batch), the fingerprints of the stages it waits for, the identity
    of its external input files, the source of the chla code it runs and the library versions."""
    from .contract.kinds import input_path_fields, input_path_values

    result: dict[str, str] = {}
    for name in topological_order(recipe):
        stage = recipe.stages[name]
        external = []
        for field_name in input_path_fields(stage.kind.params):
            for _, item in input_path_values(getattr(stage.params, field_name)):
                if not Path(item).is_relative_to(recipe.run_dir):
                    external.append(input_identity(item))
        entry_modules = [stage.kind.entry_module]
        if stage.kind.finalize:
            entry_modules.append(stage.kind.finalize.partition(":")[0])
        payload = {
            "kind": stage.kind.name,
            "params": stage.params_raw,
            "array": stage.array,
            "world_size": stage.resources.world_size,
            "upstream": {parent: result[parent] for parent in stage.after},
            "inputs": external,
            "code": code_version(*entry_modules),
            "libraries": library_versions(),
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


def plan(
    recipe: ResolvedRecipe, done: dict[str, str | None], *, only: list[str] | None = None, from_stage: str | None = None
) -> Plan:
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
                    raise ChlaError(
                        f"stage {name!r} needs {parent!r}, which has not finished "
                        f"with the current recipe; run it too (drop --only/--from)"
                    )
    run = [name for name in order if name in selected]
    skip = [name for name in order if name not in selected]
    return Plan(order=order, run=run, skip=skip, fingerprints=prints)
