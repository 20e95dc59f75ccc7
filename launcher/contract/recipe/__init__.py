"""Recipe: YAML -> a validated, typed, fully resolved model of the stage chain.

Loading is strict: unknown keys, wrong types, missing input files, unknown stage kinds, references to
missing stages and duplicate keys are errors that name the file, the key path and (where YAML knows
it) the line. `--set a.b=c` overrides any key before validation, typed by the schema.

Interpolation: `${vars.NAME}`, `${stages.NAME.out}` (the stage's output directory),
`${stages.NAME.dir}` (the stage directory), `${run.dir}` and `${run.name}` inside string values of
`params` and `vars`. A string that is exactly one reference takes the referenced value with its type.
Relative paths (run_dir and params marked as input paths) are resolved against the directory
chla is started from, and frozen as absolute paths.

One module per step, in the order a recipe goes through them:
    units          Slurm's memory and time strings
    schema         the recipe's keys and their types (RecipeModel, StageSpec, Resources, ...)
    yaml_lines     YAML parsed with the line of every key, for errors that point there
    overrides      `--set KEY.PATH=VALUE`
    interpolation  `${...}` references
    inputs         input paths made absolute, checked, globs expanded
    resolve        validation of every stage by its kind, dependencies, cycles
    sweep          node-scaling sweeps expanded into one stage per node count
    resolved       the result: ResolvedRecipe and ResolvedStage
    load           a recipe file -> ResolvedRecipe
    frozen         the copy in the run directory that jobs read
"""

from .frozen import dump_frozen, load_frozen
from .load import load_recipe
from .overrides import apply_overrides
from .resolve import resolve
from .resolved import ResolvedRecipe, ResolvedStage, SweepPoint
from .schema import NAME_PATTERN, RecipeModel, ResourceOverrides, Resources, SlurmSettings, StageSpec, SweepSpec
from .units import mem_to_mb, time_to_minutes

__all__ = [
    "NAME_PATTERN",
    "RecipeModel",
    "ResolvedRecipe",
    "ResolvedStage",
    "ResourceOverrides",
    "Resources",
    "SlurmSettings",
    "StageSpec",
    "SweepPoint",
    "SweepSpec",
    "apply_overrides",
    "dump_frozen",
    "load_frozen",
    "load_recipe",
    "mem_to_mb",
    "resolve",
    "time_to_minutes",
]
