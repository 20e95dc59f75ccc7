"""Recipe: YAML -> a validated, typed, fully resolved model of the stage chain.

Loading is strict: unknown keys, wrong types, missing input files, unknown stage kinds, references to
missing stages and duplicate keys are errors that name the file, the key path and (where YAML knows
it) the line. `--set a.b=c` overrides any key before validation, typed by the schema.

Interpolation: `${vars.NAME}`, `${stages.NAME.out}` (the stage's output directory),
`${stages.NAME.dir}` (the stage directory), `${run.dir}` and `${run.name}` inside string values of
`params` and `vars`. A string that is exactly one reference takes the referenced value with its type.
Relative paths (run_dir and params marked as input paths) are resolved against the directory
chla is started from, and frozen as absolute paths.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import KeyPath, RecipeError
from .kinds import StageKind, StageParams, input_path_fields, input_path_values, map_input_paths, registry
from .rundir import RESERVED_NAMES
from .tracking import TrackingSettings, refuse_credentials

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
_MEM_RE = re.compile(r"^\d+(\.\d+)?[KMGT]?B?$", re.IGNORECASE)
# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
# ${ref}; $${...} is a literal "${...}" (for programs that expand variables themselves).
_REF_RE = re.compile(r"\$(\$?)\{([^}]*)\}")


class _Strict(BaseModel):
    # Numbers given where text is expected (`--set vars.tag=7`) become text.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


def _check_mem(value: str | None) -> str | None:
    if value is not None and not _MEM_RE.match(str(value)):
        raise ValueError(f"memory must look like 4G, 500M or 16GB (got {value!r})")
    return None if value is None else str(value).upper()


def _check_time(value: str | int | None) -> str | None:
    if value is None:
        return None
    text = str(value)
    if not _TIME_RE.match(text):
        raise ValueError(f"time must be minutes or [D-]HH:MM:SS (got {value!r})")
    return text


def time_to_minutes(text: str) -> int:
    """Slurm time string -> whole minutes (rounded up)."""
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
        parts = [int(p) for p in text.split(":")]
        hours, minutes, seconds = (parts + [0, 0, 0])[:3]
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, minutes, seconds = 0, parts[0], parts[1]
        else:
            hours, minutes, seconds = parts
    total_seconds = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return max(1, -(-total_seconds // 60))


def mem_to_mb(text: str) -> int:
    match = re.match(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", text.upper())
    assert match, text
    number, unit = float(match.group(1)), match.group(2) or "M"
    return int(number * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[unit])


class Resources(_Strict):
    """What one stage asks of the cluster (the recipe's defaults, each stage may override)."""

    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, ge=1)
    mem: str = "4G"
    time: str = "01:00:00"
    # Memory of one GPU, for `chla plan` and chla-submit's memory check (not passed to Slurm);
    # without it, a GPU named in slurm.constraint gives it.
    gpu_mem: str | None = None

    _mem = field_validator("mem", "gpu_mem")(classmethod(lambda cls, v: _check_mem(v)))
    _time = field_validator("time", mode="before")(classmethod(lambda cls, v: _check_time(v)))

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


class ResourceOverrides(_Strict):
    nodes: int | None = Field(None, ge=1)
    tasks_per_node: int | None = Field(None, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = None
    time: str | None = None
    gpu_mem: str | None = None

    _mem = field_validator("mem", "gpu_mem")(classmethod(lambda cls, v: _check_mem(v)))
    _time = field_validator("time", mode="before")(classmethod(lambda cls, v: _check_time(v)))


class SlurmSettings(_Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # Shell lines run in the batch script before the job starts (module loads, venv activation).
    setup: list[str] = Field(default_factory=list)
    # Extra sbatch parameters, e.g. {"exclusive": true, "mail-type": "FAIL"}.
    sbatch: dict[str, str | int | bool] = Field(default_factory=dict)
    # Python on the compute nodes; default: the interpreter chla-submit runs under.
    python: str | None = None
    # Seconds between Slurm's warning signal (USR2) and the kill, for checkpointing.
    signal_delay_s: int = Field(120, ge=10)
    # How often a stage that hit its time limit may be requeued (preemptions do not count).
    max_requeues: int = Field(3, ge=0)
    # Split arrays into several array jobs of at most this many tasks (default: the cluster's
    # MaxArraySize, read with scontrol).
    array_chunk: int | None = Field(None, ge=1)

    @field_validator("partition", "account", "qos", "constraint", "python")
    @classmethod
    def _single_line(cls, value: str | None) -> str | None:
        if value is not None and ("\n" in value or "\r" in value):
            raise ValueError("must be a single line")
        return value

    @field_validator("sbatch")
    @classmethod
    def _sbatch_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        for key, value in values.items():
            if not re.match(r"^[a-z][a-z0-9-]*$", key):
                raise ValueError(f"sbatch option {key!r} is not an sbatch long option name")
            if isinstance(value, str) and ("\n" in value or "\r" in value):
                # A newline would start a new line in the batch script: refuse, never escape.
                raise ValueError(f"sbatch option {key!r} must be a single line")
        return values


class SweepSpec(_Strict):
    """Node-scaling experiment: the stage runs once per node count, as stages `<name>-n<nodes>`.
    weak: every rank keeps its batch, so the global batch grows with the nodes; strong: the global
    batch stays that of the smallest count (the kind's accumulation param is divided)."""

    nodes: list[int] = Field(min_length=1)
    scaling: Literal["weak", "strong"] = "weak"

    @field_validator("nodes")
    @classmethod
    def _positive_unique(cls, nodes: list[int]) -> list[int]:
        if any(n < 1 for n in nodes) or len(set(nodes)) != len(nodes):
            raise ValueError("node counts must be distinct and at least 1")
        return sorted(nodes)


class StageSpec(_Strict):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)
    resources: ResourceOverrides = Field(default_factory=ResourceOverrides)
    # Number of shards: the stage becomes an array of this many tasks.
    array: int | None = Field(None, ge=1, le=1_000_000)
    # Stages that must finish first, beyond those inferred from ${stages.X...} references.
    after: list[str] = Field(default_factory=list)
    sweep: SweepSpec | None = None


class RecipeModel(_Strict):
    name: str
    run_dir: str | None = None
    executor: str = "local"  # an executor's name (chla_launcher.executors)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    resources: Resources = Field(default_factory=Resources)
    vars: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, StageSpec] = Field(min_length=1)
    # Experiment tracking (MLflow, W&B) of every stage; see chla_launcher.tracking.
    tracking: TrackingSettings | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return value

    @field_validator("executor")
    @classmethod
    def _executor(cls, value: str) -> str:
        from .executors import executor_names

        if value not in executor_names():
            raise ValueError(f"unknown executor {value!r} (known: {', '.join(executor_names())})")
        return value

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
        for name in stages:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise ValueError(f"stage name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
            if name in RESERVED_NAMES:
                raise ValueError(
                    f"stage name {name!r} is taken by the run directory's own "
                    f"{name} (reserved: {', '.join(sorted(RESERVED_NAMES))})"
                )
        return stages


@dataclass(frozen=True)
class SweepPoint:
    """Where an expanded stage sits in its node-scaling sweep."""

    group: str  # the stage name in the recipe
    nodes: int
    scaling: str


ParamsT = TypeVar("ParamsT", bound=StageParams)


@dataclass
class ResolvedStage:
    """One stage after interpolation, validation and dependency inference."""

    name: str
    kind: StageKind
    params: BaseModel
    params_raw: dict[str, Any]
    resources: Resources
    array: int | None
    after: list[str]  # explicit and inferred, sorted
    sweep: SweepPoint | None = None

    @property
    def num_tasks(self) -> int:
        return self.array or 1

    def params_as(self, params_type: type[ParamsT]) -> ParamsT:
        """The stage's params as the kind's own model (for code that reads one kind's fields)."""
        if not isinstance(self.params, params_type):
            raise TypeError(
                f"stage {self.name} ({self.kind.name}) has {type(self.params).__name__}, not {params_type.__name__}"
            )
        return self.params


@dataclass
class ResolvedRecipe:
    model: RecipeModel
    source: str  # the recipe file (or the frozen copy)
    run_dir: Path
    stages: dict[str, ResolvedStage]
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.model.name

    def frozen(self) -> dict[str, Any]:
        """The recipe as frozen into the run directory: every reference resolved, every default
        filled in, every path absolute. Loading it again gives the same ResolvedRecipe."""
        model = self.model.model_dump(mode="json")
        model["run_dir"] = str(self.run_dir)
        model["vars"] = {}
        for name, stage in self.stages.items():
            if stage.sweep is not None:
                # A sweep stays one stage in the frozen recipe; loading it expands it again.
                name = stage.sweep.group
                if stage.sweep.nodes != model["stages"][name]["sweep"]["nodes"][0]:
                    continue
            spec = model["stages"][name]
            spec["params"] = stage.params_raw
            spec["after"] = stage.after
            spec["resources"] = stage.resources.model_dump(mode="json")
        return model


# --------------------------------------------------------------------------------------------
# YAML with line numbers


def _compose(text: str, source: str) -> tuple[Any, dict[KeyPath, int]]:
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
                            key=_dotted(path),
                            line=key_node.start_mark.line + 1,
                        )
                    if key in result:
                        raise RecipeError(
                            f"duplicate key {key!r}",
                            file=source,
                            key=_dotted(path + (key,)),
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


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_for(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


# --------------------------------------------------------------------------------------------
# --set overrides


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> None:
    """Apply `key.path=value` overrides in place. The value is parsed as a YAML scalar/flow value
    (so `nodes=2` is an int, `argv=[a, b]` a list); the schema types it during validation.
    Every container on the path must exist; the last key may be new (validation catches typos)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE", file=source)
        key_path, _, value_text = item.partition("=")
        parts = key_path.strip().split(".")
        if not key_path.strip() or any(not part for part in parts):
            raise RecipeError(f"--set {item!r}: malformed key path", file=source)
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else ""
        except yaml.YAMLError:
            raise RecipeError(f"--set {key_path}: cannot parse value {value_text!r}", file=source) from None
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
    """Blocks that --set may create: slurm, resources, vars, tracking (and anything inside vars or
    tracking), slurm.sbatch, a stage's resources, and anything inside a stage's params (the
    kind's schema catches typos)."""
    if len(prefix) == 1:
        return prefix[0] in {"slurm", "resources", "vars", "tracking"}
    if prefix[0] in ("vars", "tracking"):
        return True
    if len(prefix) == 2 and prefix[0] == "slurm":
        return prefix[1] == "sbatch"
    if len(prefix) >= 3 and prefix[0] == "stages" and prefix[2] == "params":
        return True
    return len(prefix) == 3 and prefix[0] == "stages" and prefix[2] == "resources"


# --------------------------------------------------------------------------------------------
# Interpolation


class _Scope:
    def __init__(self, run_dir: Path, name: str, stage_names: set[str], vars_: dict[str, Any]) -> None:
        self.run_dir, self.name, self.stage_names, self.vars = run_dir, name, stage_names, vars_

    def lookup(self, ref: str, refs: set[str]) -> Any:
        parts = ref.strip().split(".")
        if parts[0] == "run" and len(parts) == 2 and parts[1] in {"dir", "name"}:
            return str(self.run_dir) if parts[1] == "dir" else self.name
        if parts[0] == "vars" and len(parts) >= 2:
            value: Any = self.vars
            for part in parts[1:]:
                if not isinstance(value, dict) or part not in value:
                    raise KeyError(f"no variable {'.'.join(parts[1:])!r} in vars")
                value = value[part]
            return value
        if parts[0] == "stages" and len(parts) == 3 and parts[2] in {"out", "dir"}:
            if parts[1] not in self.stage_names:
                raise KeyError(f"reference to a missing stage {parts[1]!r}")
            refs.add(parts[1])
            stage_dir = self.run_dir / parts[1]
            return str(stage_dir / "out") if parts[2] == "out" else str(stage_dir)
        raise KeyError(
            f"unknown reference ${{{ref}}} (use vars.NAME, stages.NAME.out, stages.NAME.dir, run.dir or run.name)"
        )


def _interpolate(value: Any, scope: _Scope, refs: set[str], depth: int = 0) -> Any:
    if depth > 20:
        raise KeyError("references nest too deeply (a variable refers to itself?)")
    if isinstance(value, str):
        whole = _REF_RE.fullmatch(value)
        if whole and not whole.group(1):
            return _interpolate(scope.lookup(whole.group(2), refs), scope, refs, depth + 1)

        def substitute(match: re.Match[str]) -> str:
            if match.group(1):
                return "${" + match.group(2) + "}"
            found = _interpolate(scope.lookup(match.group(2), refs), scope, refs, depth + 1)
            if isinstance(found, (dict, list)):
                raise KeyError(f"${{{match.group(2)}}} is a {type(found).__name__}, not text")
            return str(found)

        return _REF_RE.sub(substitute, value)
    if isinstance(value, dict):
        return {key: _interpolate(item, scope, refs, depth) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, scope, refs, depth) for item in value]
    return value


# --------------------------------------------------------------------------------------------
# Loading


def load_recipe(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    *,
    run_dir: str | None = None,
    check_inputs: bool = True,
    cwd: Path | None = None,
    interpolate: bool = True,
) -> ResolvedRecipe:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("recipe file not found", file=source) from None
    except IsADirectoryError:
        raise RecipeError("is a directory, not a recipe file", file=source) from None
    except UnicodeDecodeError as error:
        raise RecipeError(f"not UTF-8 text (byte {error.start})", file=source) from None
    data, lines = _compose(text, source)
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a mapping with `name:` and `stages:`", file=source, line=1)
    apply_overrides(data, list(overrides or []), source)
    refuse_credentials(data, source, lambda path: _line_for(lines, path))
    if run_dir is not None:
        data["run_dir"] = run_dir
    return resolve(data, source, lines, check_inputs=check_inputs, cwd=cwd, interpolate=interpolate)


def _raise_validation(error: ValidationError, source: str, lines: dict[KeyPath, int], prefix: KeyPath = ()) -> None:
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
        message = f"{message} (got {first['input']!r})"
    message = message.removeprefix("Value error, ")
    raise RecipeError(message, file=source, key=_dotted(loc) or None, line=_line_for(lines, loc)) from None


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
    lines = lines or {}
    cwd = cwd or Path.cwd()
    try:
        model = RecipeModel.model_validate(data)
    except ValidationError as error:
        _raise_validation(error, source, lines)

    run_dir = Path(model.run_dir or f"runs/{model.name}")
    run_dir = (cwd / run_dir).resolve() if not run_dir.is_absolute() else run_dir
    stage_names = set(model.stages)
    scope = _Scope(run_dir, model.name, stage_names, model.vars)
    kinds = registry()

    stages: dict[str, ResolvedStage] = {}
    for name, spec in model.stages.items():
        base = ("stages", name)
        kind = kinds.get(spec.kind)
        if kind is None:
            known = ", ".join(sorted(kinds))
            raise RecipeError(
                f"unknown stage kind {spec.kind!r} (known: {known})",
                file=source,
                key=_dotted(base + ("kind",)),
                line=_line_for(lines, base + ("kind",)),
            )
        refs: set[str] = set()
        try:
            params_raw = _interpolate(spec.params, scope, refs) if interpolate else dict(spec.params)
        except KeyError as error:
            raise RecipeError(
                str(error.args[0]),
                file=source,
                key=_dotted(base + ("params",)),
                line=_line_for(lines, base + ("params",)),
            ) from None
        for after in spec.after:
            if after not in stage_names:
                raise RecipeError(
                    f"`after` names a missing stage {after!r}",
                    file=source,
                    key=_dotted(base + ("after",)),
                    line=_line_for(lines, base + ("after",)),
                )
        params_raw = _absolutize_inputs(kind, params_raw, cwd)
        try:
            params = kind.params.model_validate(params_raw)
        except ValidationError as error:
            _raise_validation(error, source, lines, prefix=base + ("params",))
        merged = model.resources.model_dump()
        merged.update(spec.resources.model_dump(exclude_none=True))
        resources = Resources.model_validate(merged)
        if resources.world_size > 1 and not kind.distributed:
            raise RecipeError(
                f"kind {kind.name!r} runs as one process; nodes x tasks_per_node must be 1 "
                f"(got {resources.nodes} x {resources.tasks_per_node})",
                file=source,
                key=_dotted(base + ("resources",)),
                line=_line_for(lines, base + ("resources",)),
            )
        if spec.array is not None and not kind.array:
            raise RecipeError(
                f"kind {kind.name!r} cannot run as an array",
                file=source,
                key=_dotted(base + ("array",)),
                line=_line_for(lines, base + ("array",)),
            )
        if spec.array is not None and resources.world_size > 1:
            raise RecipeError(
                "an array stage runs one process per task; use array or nodes/tasks_per_node, not both",
                file=source,
                key=_dotted(base + ("array",)),
                line=_line_for(lines, base + ("array",)),
            )
        if name in refs:
            raise RecipeError(
                "a stage cannot refer to its own output",
                file=source,
                key=_dotted(base + ("params",)),
                line=_line_for(lines, base + ("params",)),
            )
        if check_inputs:
            _check_inputs(kind, params, run_dir, source, lines, base)
            expanded = _expand_globs(kind, params_raw, run_dir)
            if expanded != params_raw:
                params = kind.params.model_validate(expanded)
        resolved = ResolvedStage(
            name=name,
            kind=kind,
            params=params,
            params_raw=params.model_dump(mode="json", exclude_unset=False),
            resources=resources,
            array=spec.array,
            after=sorted(set(spec.after) | refs),
        )
        if spec.sweep is None:
            stages[name] = resolved
        else:
            for point in _expand_sweep(resolved, spec.sweep, stage_names, source, lines, base):
                stages[point.name] = point

    swept = {name for name, spec in model.stages.items() if spec.sweep is not None}
    for name, stage in stages.items():
        waits_for_sweep = swept & set(stage.after)
        if waits_for_sweep:
            group = sorted(waits_for_sweep)[0]
            key = ("stages", stage.sweep.group if stage.sweep else name)
            raise RecipeError(
                f"stage depends on {group!r}, a node-scaling sweep (sweeps are experiments "
                "whose outputs nothing consumes)",
                file=source,
                key=_dotted(key),
                line=_line_for(lines, key),
            )
    recipe = ResolvedRecipe(model=model, source=source, run_dir=run_dir, stages=stages, raw=data)
    from .graph import find_cycle  # the graph module imports this one

    cycle = find_cycle({name: stage.after for name, stage in stages.items()})
    if cycle:
        first = cycle[0]
        raise RecipeError(
            "dependency cycle: " + " -> ".join(cycle),
            file=source,
            key=f"stages.{first}",
            line=_line_for(lines, ("stages", first)),
        )
    return recipe


def _expand_sweep(
    stage: ResolvedStage, sweep: SweepSpec, stage_names: set[str], source: str, lines: dict[KeyPath, int], base: KeyPath
) -> list[ResolvedStage]:
    key = base + ("sweep",)
    if not stage.kind.distributed:
        raise RecipeError(
            f"kind {stage.kind.name!r} runs as one process; it cannot be swept over nodes",
            file=source,
            key=_dotted(key),
            line=_line_for(lines, key),
        )
    if stage.array is not None:
        raise RecipeError(
            "an array stage cannot be swept over nodes", file=source, key=_dotted(key), line=_line_for(lines, key)
        )
    points = []
    for nodes in sweep.nodes:
        name = f"{stage.name}-n{nodes}"
        if name in stage_names:
            raise RecipeError(
                f"the sweep would create stage {name!r}, which the recipe already has",
                file=source,
                key=_dotted(key),
                line=_line_for(lines, key),
            )
        params_raw = dict(stage.params_raw)
        if sweep.scaling == "strong":
            param = stage.kind.accumulation_param
            if not param:
                raise RecipeError(
                    f"kind {stage.kind.name!r} has no batch parameter for strong scaling",
                    file=source,
                    key=_dotted(key + ("scaling",)),
                    line=_line_for(lines, key),
                )
            total = int(params_raw[param]) * sweep.nodes[0]
            if total % nodes:
                raise RecipeError(
                    f"strong scaling: {param}={params_raw[param]} on {sweep.nodes[0]} node(s) "
                    f"cannot be split evenly over {nodes} nodes; raise {param}",
                    file=source,
                    key=_dotted(base + ("params", param)),
                    line=_line_for(lines, base + ("params",)),
                )
            params_raw[param] = total // nodes
        points.append(
            ResolvedStage(
                name=name,
                kind=stage.kind,
                params=stage.kind.params.model_validate(params_raw),
                params_raw=params_raw,
                resources=stage.resources.model_copy(update={"nodes": nodes}),
                array=None,
                after=stage.after,
                sweep=SweepPoint(stage.name, nodes, sweep.scaling),
            )
        )
    return points


def _absolutize_inputs(kind: StageKind, params: dict[str, Any], cwd: Path) -> dict[str, Any]:
    out = dict(params)
    for field_name in input_path_fields(kind.params):
        if field_name in out:
            out[field_name] = map_input_paths(out[field_name], lambda value: _absolute(value, cwd))
    return out


def _absolute(value: str, cwd: Path) -> str:
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else str((cwd / expanded).resolve())


def _check_inputs(
    kind: StageKind, params: BaseModel, run_dir: Path, source: str, lines: dict[KeyPath, int], base: KeyPath
) -> None:
    import glob as globmod

    for field_name, marker in input_path_fields(type(params)).items():
        for below, item in input_path_values(getattr(params, field_name)):
            if Path(item).is_relative_to(run_dir):
                continue  # produced by an upstream stage of this run
            key_path = base + ("params", field_name) + below
            if marker.glob and any(ch in item for ch in "*?["):
                if not globmod.glob(item, recursive=True):
                    raise RecipeError(
                        f"no file matches {item}", file=source, key=_dotted(key_path), line=_line_for(lines, key_path)
                    )
            elif not os.path.exists(item):
                raise RecipeError(
                    f"input not found: {item}", file=source, key=_dotted(key_path), line=_line_for(lines, key_path)
                )


def _expand_globs(kind: StageKind, params: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Glob inputs become the files they match now, in place and sorted, so the frozen recipe (what
    the job reads) and the fingerprint name exactly the files this submission saw: a file that
    matches later makes a new submission run the stage again, never slips into this one."""
    import glob as globmod

    out = dict(params)
    for field_name, marker in input_path_fields(kind.params).items():
        value = out.get(field_name)
        if not marker.glob or not isinstance(value, list):
            continue
        files: list[str] = []
        for item in value:
            if isinstance(item, str) and any(ch in item for ch in "*?[") and not Path(item).is_relative_to(run_dir):
                matches = sorted(match for match in globmod.glob(item, recursive=True) if os.path.isfile(match))
                files += matches or [item]  # matches only directories: the stage says so when it runs
            else:
                files.append(item)
        out[field_name] = files
    return out


def load_frozen(run_dir: str | os.PathLike[str]) -> ResolvedRecipe:
    """The recipe a run was submitted with (used by jobs and by `--resume`)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.exists():
        raise RecipeError("not a chla run directory (no recipe.yaml)", file=str(run_dir))
    return load_recipe(path, check_inputs=False, interpolate=False)


def dump_frozen(recipe: ResolvedRecipe) -> str:
    header = (
        f"# Frozen by chla from {recipe.source}: every reference resolved, every default filled in.\n"
        "# Jobs read this file; edit the source recipe and resubmit instead of editing it.\n"
    )
    return header + yaml.safe_dump(recipe.frozen(), sort_keys=False, allow_unicode=True, width=100)
