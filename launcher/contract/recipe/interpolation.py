"""References inside string values of `params` and `vars`: `${vars.NAME}`, `${stages.NAME.out}`
(the stage's output directory), `${stages.NAME.dir}` (the stage directory), `${run.dir}` and
`${run.name}`. A string that is exactly one reference takes the referenced value with its type;
`$${...}` is a literal "${...}" (for programs that expand variables themselves)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# A reference is at most 256 characters: unbounded, every match attempt in a string of "${"
# without a "}" ran to its end (60,000 characters took 14 s; bounded, 0.1 s).
_REF_RE = re.compile(r"\$(\$?)\{([^}]{0,256})\}")


class Scope:
    """What references can name: the run, its vars and its stages."""

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


def interpolate_references(value: Any, scope: Scope, refs: set[str], depth: int = 0) -> Any:
    """`value` with every reference resolved, inside dicts and lists too. Adds the stages it refers
    to to `refs`; a bad reference is a KeyError whose message the caller places in the recipe."""
    if depth > 20:
        raise KeyError("references nest too deeply (a variable refers to itself?)")
    if isinstance(value, str):
        whole = _REF_RE.fullmatch(value)
        if whole and not whole.group(1):
            return interpolate_references(scope.lookup(whole.group(2), refs), scope, refs, depth + 1)

        def substitute(match: re.Match[str]) -> str:
            if match.group(1):
                return "${" + match.group(2) + "}"
            found = interpolate_references(scope.lookup(match.group(2), refs), scope, refs, depth + 1)
            if isinstance(found, (dict, list)):
                raise KeyError(f"${{{match.group(2)}}} is a {type(found).__name__}, not text")
            return str(found)

        return _REF_RE.sub(substitute, value)
    if isinstance(value, dict):
        return {key: interpolate_references(item, scope, refs, depth) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate_references(item, scope, refs, depth) for item in value]
    return value
