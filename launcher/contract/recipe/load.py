"""Loading a recipe file: read, parse with line numbers, apply `--set` overrides, refuse
credentials, resolve."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RecipeError
from ..tracking_settings import refuse_credentials
from .overrides import apply_overrides
from .resolve import resolve
from .resolved import ResolvedRecipe
from .yaml_lines import FROZEN_LIMITS, RECIPE_LIMITS, SourceMap, parse_with_lines

# A recipe is a few kilobytes (recipes/full.yaml: 5 KB); a larger file is a mistake (a data file
# given as the recipe) or hostile. Read at most this much, so that /dev/zero or a FIFO cannot hang
# the read either. A frozen recipe (written by chla, globs expanded) is not bounded.
MAX_RECIPE_BYTES = 1 << 20


def load_recipe(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    *,
    run_dir: str | None = None,
    check_inputs: bool = True,
    cwd: Path | None = None,
    interpolate: bool = True,
) -> ResolvedRecipe:
    """The recipe at `path`, resolved. `interpolate=False` reads a frozen recipe (written by chla,
    its references resolved), which is parsed without the size bounds of a user's recipe."""
    source = str(path)
    frozen = not interpolate
    try:
        with open(path, "rb") as stream:
            raw = stream.read() if frozen else stream.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError("recipe file not found", file=source) from None
    except IsADirectoryError:
        raise RecipeError("is a directory, not a recipe file", file=source) from None
    except OSError as error:
        raise RecipeError(f"cannot read the recipe: {error.strerror}", file=source) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe", file=source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise RecipeError(f"not UTF-8 text (byte {error.start})", file=source, line=line) from None
    data, lines = parse_with_lines(text, source, FROZEN_LIMITS if frozen else RECIPE_LIMITS)
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a mapping with `name:` and `stages:`", file=source, line=1)
    apply_overrides(data, list(overrides or []), source)
    refuse_credentials(data, source, SourceMap(source, lines).line)
    if run_dir is not None:
        data["run_dir"] = run_dir
    return resolve(data, source, lines, check_inputs=check_inputs, cwd=cwd, interpolate=interpolate)
