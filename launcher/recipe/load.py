"""Loading a recipe file: read, parse with line numbers, apply `--set` overrides, refuse
credentials, resolve."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RecipeError
from ..tracking import refuse_credentials
from .overrides import apply_overrides
from .resolve import resolve
from .resolved import ResolvedRecipe
from .yaml_lines import SourceMap, parse_with_lines


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
    data, lines = parse_with_lines(text, source)
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a mapping with `name:` and `stages:`", file=source, line=1)
    apply_overrides(data, list(overrides or []), source)
    refuse_credentials(data, source, SourceMap(source, lines).line)
    if run_dir is not None:
        data["run_dir"] = run_dir
    return resolve(data, source, lines, check_inputs=check_inputs, cwd=cwd, interpolate=interpolate)
