"""`command`: run an argv list (never through a shell) in the stage directory.

Array tasks get CHLA_TASK_INDEX / CHLA_NUM_TASKS; distributed ranks get RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT. The command's outputs go to
$CHLA_OUT_DIR (the stage's out directory, made visible only when every rank finished).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator

from . import InputPath, StageKind, StageParams


class CommandParams(StageParams):
    """run an argv list (no shell) in the stage directory"""

    argv: list[str] = Field(min_length=1, description="program and arguments, run without a shell")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    # Exit codes that count as success (e.g. [0, 1] for grep).
    ok_exit_codes: list[int] = Field(default_factory=lambda: [0])
    # Files the command reads: checked at submission and part of the stage's fingerprint, so a
    # changed input makes the stage run again.
    inputs: list[Annotated[str, InputPath()]] = Field(default_factory=list)

    @field_validator("argv")
    @classmethod
    def _argv_strings(cls, argv: list[str]) -> list[str]:
        if not argv[0]:
            raise ValueError("argv[0] (the program) is empty")
        for item in argv:
            if "\x00" in item:
                raise ValueError("argv items may not contain NUL bytes")
        return argv

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        # Passed in the environment of the process (never through a shell); a POSIX name, and no
        # NUL in a value (the kernel's environment is NUL-separated).
        for name, value in env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"invalid environment variable name {name!r} (letters, digits and '_')")
            if "\x00" in value:
                raise ValueError(f"environment variable {name} may not contain NUL bytes")
        return env


KIND = StageKind(
    "command", CommandParams, "chla_train.stages.command:run", array=True, distributed=True, needs_training_stack=False
)
