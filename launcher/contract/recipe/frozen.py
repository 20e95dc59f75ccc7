"""The frozen recipe: what `chla submit` writes into the run directory (recipe.yaml, every
reference resolved, every default filled in, every path absolute) and what jobs and `--resume`
read back."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..errors import RecipeError
from .load import load_recipe
from .resolved import ResolvedRecipe


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
