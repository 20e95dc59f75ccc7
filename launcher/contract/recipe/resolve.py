"""Resolution: the parsed recipe validated against the schema, every stage's references
interpolated, its params validated by its kind, its resources merged with the recipe's defaults
and its dependencies inferred; then sweeps expanded and cycles refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from ..errors import KeyPath, RecipeError
from ..kinds import StageKind, registry
from .cycles import find_cycle
from .inputs import absolutize_inputs, check_inputs_exist, expand_globs
from .interpolation import Scope, interpolate_references
from .resolved import ResolvedRecipe, ResolvedStage
from .schema import RecipeModel, Resources, StageSpec, shown
from .sweep import expand_sweep
from .yaml_lines import SourceMap, dotted


def raise_validation(error: ValidationError, where: SourceMap, prefix: KeyPath = ()) -> NoReturn:
    """pydantic's first complaint as one RecipeError at its key and line."""
    first = error.errors()[0]
    loc = prefix + tuple(part for part in first["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    elif (
        "input" in first
        and first["type"] not in {"value_error", "assertion_error"}
        and not isinstance(first["input"], dict)
    ):
        message = f"{message} (got {shown(first['input'])})"
    message = message.removeprefix("Value error, ")
    raise RecipeError(message, file=where.file, key=dotted(loc) or None, line=where.line(loc)) from None


def resolve(
    data: dict[str, Any],
    source: str,
    lines: dict[KeyPath, int] | None = None,
    *,
    check_inputs: bool = True,
    cwd: Path | None = None,
    interpolate: bool = True,
) -> ResolvedRecipe:
    """Validate `data` into a ResolvedRecipe. `interpolate=False` is for a frozen recipe, whose
    references were resolved at submission (a literal "${...}" in it must stay as it is)."""
    where = SourceMap(source, lines or {})
    cwd = cwd or Path.cwd()
    try:
        model = RecipeModel.model_validate(data)
    except ValidationError as error:
        raise_validation(error, where)

    run_dir = Path(model.run_dir or f"runs/{model.name}")
    run_dir = (cwd / run_dir).resolve() if not run_dir.is_absolute() else run_dir
    context = _Context(
        model=model,
        where=where,
        scope=Scope(run_dir, model.name, set(model.stages), model.vars),
        kinds=registry(),
        cwd=cwd,
        run_dir=run_dir,
        check_inputs=check_inputs,
        interpolate=interpolate,
    )
    stages: dict[str, ResolvedStage] = {}
    for name, spec in model.stages.items():
        resolved = _resolve_stage(name, spec, context)
        if spec.sweep is None:
            stages[name] = resolved
        else:
            for point in expand_sweep(resolved, spec.sweep, set(model.stages), where, ("stages", name)):
                stages[point.name] = point

    _refuse_consumers_of_sweeps(model, stages, where)
    recipe = ResolvedRecipe(model=model, source=source, run_dir=run_dir, stages=stages, raw=data)
    cycle = find_cycle({name: stage.after for name, stage in stages.items()})
    if cycle:
        raise where.error("dependency cycle: " + " -> ".join(cycle), ("stages", cycle[0]))
    return recipe


@dataclass(frozen=True)
class _Context:
    """What resolving one stage reads of the recipe around it."""

    model: RecipeModel
    where: SourceMap
    scope: Scope
    kinds: dict[str, StageKind]
    cwd: Path
    run_dir: Path
    check_inputs: bool
    interpolate: bool


def _resolve_stage(name: str, spec: StageSpec, context: _Context) -> ResolvedStage:
    """One stage: its references interpolated (the stages they name become dependencies), its
    input paths made absolute, its params validated by its kind, its resources merged."""
    where, base = context.where, ("stages", name)
    kind = context.kinds.get(spec.kind)
    if kind is None:
        known = ", ".join(sorted(context.kinds))
        raise where.error(f"unknown stage kind {spec.kind!r} (known: {known})", base + ("kind",))
    refs: set[str] = set()
    try:
        params_raw = (
            interpolate_references(spec.params, context.scope, refs) if context.interpolate else dict(spec.params)
        )
    except KeyError as error:
        raise where.error(str(error.args[0]), base + ("params",)) from None
    for after in spec.after:
        if after not in context.model.stages:
            raise where.error(f"`after` names a missing stage {after!r}", base + ("after",))
    params_raw = absolutize_inputs(kind, params_raw, context.cwd)
    try:
        params = kind.params.model_validate(params_raw)
    except ValidationError as error:
        raise_validation(error, where, prefix=base + ("params",))
    resources = _stage_resources(kind, spec, context.model, where, base)
    if name in refs:
        raise where.error("a stage cannot refer to its own output", base + ("params",))
    if context.check_inputs:
        check_inputs_exist(params, context.run_dir, where, base)
        expanded = expand_globs(kind, params_raw, context.run_dir)
        if expanded != params_raw:
            params = kind.params.model_validate(expanded)
    return ResolvedStage(
        name=name,
        kind=kind,
        params=params,
        params_raw=params.model_dump(mode="json", exclude_unset=False),
        resources=resources,
        array=spec.array,
        after=sorted(set(spec.after) | refs),
    )


def _stage_resources(
    kind: StageKind, spec: StageSpec, model: RecipeModel, where: SourceMap, base: KeyPath
) -> Resources:
    """The recipe's default resources with the stage's overrides, refused where the kind cannot
    use them (several processes for a one-process kind, an array of a kind that has none, an
    array of multi-process tasks)."""
    merged = model.resources.model_dump()
    merged.update(spec.resources.model_dump(exclude_none=True))
    try:
        # Each side is valid alone; together they may not be (nodes x tasks_per_node past Slurm's).
        resources = Resources.model_validate(merged)
    except ValidationError as error:
        raise_validation(error, where, prefix=base + ("resources",))
    if resources.world_size > 1 and not kind.distributed:
        raise where.error(
            f"kind {kind.name!r} runs as one process; nodes x tasks_per_node must be 1 "
            f"(got {resources.nodes} x {resources.tasks_per_node})",
            base + ("resources",),
        )
    if spec.array is not None and not kind.array:
        raise where.error(f"kind {kind.name!r} cannot run as an array", base + ("array",))
    if spec.array is not None and resources.world_size > 1:
        raise where.error(
            "an array stage runs one process per task; use array or nodes/tasks_per_node, not both",
            base + ("array",),
        )
    return resources


def _refuse_consumers_of_sweeps(model: RecipeModel, stages: dict[str, ResolvedStage], where: SourceMap) -> None:
    """A node-scaling sweep is an experiment: no stage may depend on it."""
    swept = {name for name, spec in model.stages.items() if spec.sweep is not None}
    for name, stage in stages.items():
        waits_for_sweep = swept & set(stage.after)
        if waits_for_sweep:
            group = sorted(waits_for_sweep)[0]
            raise where.error(
                f"stage depends on {group!r}, a node-scaling sweep (sweeps are experiments "
                "whose outputs nothing consumes)",
                ("stages", stage.sweep.group if stage.sweep else name),
            )
