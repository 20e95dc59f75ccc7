"""The files a stage reads (params marked InputPath): made absolute against the directory chla is
started from, checked to exist at submission, and glob patterns replaced by the files they match."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..errors import KeyPath
from ..kinds import StageKind, input_path_fields, input_path_values, map_input_paths
from .yaml_lines import SourceMap


def absolutize_inputs(kind: StageKind, params: dict[str, Any], cwd: Path) -> dict[str, Any]:
    out = dict(params)
    for field_name in input_path_fields(kind.params):
        if field_name in out:
            out[field_name] = map_input_paths(out[field_name], lambda value: _absolute(value, cwd))
    return out


def _absolute(value: str, cwd: Path) -> str:
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else str((cwd / expanded).resolve())


def check_inputs_exist(params: BaseModel, run_dir: Path, where: SourceMap, base: KeyPath) -> None:
    """Every input outside the run directory exists (a glob matches something)."""
    for field_name, marker in input_path_fields(type(params)).items():
        for below, item in input_path_values(getattr(params, field_name)):
            if Path(item).is_relative_to(run_dir):
                continue  # produced by an upstream stage of this run
            key_path = base + ("params", field_name) + below
            if marker.glob and any(ch in item for ch in "*?["):
                if not glob.glob(item, recursive=True):
                    raise where.error(f"no file matches {item}", key_path)
            elif not os.path.exists(item):
                raise where.error(f"input not found: {item}", key_path)


def expand_globs(kind: StageKind, params: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Glob inputs become the files they match now, in place and sorted, so the frozen recipe (what
    the job reads) and the fingerprint name exactly the files this submission saw: a file that
    matches later makes a new submission run the stage again, never slips into this one."""
    out = dict(params)
    for field_name, marker in input_path_fields(kind.params).items():
        value = out.get(field_name)
        if not marker.glob or not isinstance(value, list):
            continue
        files: list[str] = []
        for item in value:
            if isinstance(item, str) and any(ch in item for ch in "*?[") and not Path(item).is_relative_to(run_dir):
                matches = sorted(match for match in glob.glob(item, recursive=True) if os.path.isfile(match))
                files += matches or [item]  # matches only directories: the stage says so when it runs
            else:
                files.append(item)
        out[field_name] = files
    return out
