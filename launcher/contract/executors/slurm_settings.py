"""The Slurm executor's settings: the recipe's `slurm:` block (partition, account, sbatch options,
the batch script's setup lines, requeues, array chunks). Rendered into `#SBATCH` lines by the
login side (chla_launcher.executors.slurm_commands.sbatch_parameters)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from ..executor_settings import ExecutorSettings
from ..strict import shown

# What Slurm accepts (measured with sbatch 22.05 --test-only, and its man pages): --signal's time
# is 0..65535 s; MaxArraySize may not exceed 4,000,001.
MAX_SIGNAL_DELAY_S = 65535
MAX_ARRAY_CHUNK = 4_000_001
# Partition, account and QOS names (a partition may be a comma-separated list), and a
# constraint's feature expression (&, |, [], *, !): reach `#SBATCH` lines, so one line of these.
# Lengths bounded too (a line of the batch script, not a megabyte).
_SLURM_NAME_RE = re.compile(r"(?=.{1,256}\Z)[A-Za-z0-9_.@+-]+(,[A-Za-z0-9_.@+-]+)*")
_CONSTRAINT_RE = re.compile(r"[A-Za-z0-9_.,:&|*!()\[\]@+-]{1,1024}")
MAX_SBATCH_VALUE = 4096


class SlurmSettings(ExecutorSettings):
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
    signal_delay_s: int = Field(120, ge=10, le=MAX_SIGNAL_DELAY_S)
    # How often a stage that hit its time limit may be requeued (preemptions do not count).
    max_requeues: int = Field(3, ge=0, le=10_000)
    # Split arrays into several array jobs of at most this many tasks (default: the cluster's
    # MaxArraySize, read with scontrol).
    array_chunk: int | None = Field(None, ge=1, le=MAX_ARRAY_CHUNK)

    @field_validator("partition", "account", "qos")
    @classmethod
    def _slurm_name(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_NAME_RE.fullmatch(value):
            raise ValueError(
                f"{shown(value)} is not a Slurm name: letters, digits, '_', '.', '-', '+', '@' (a partition may "
                "be a comma-separated list)"
            )
        return value

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, value: str | None) -> str | None:
        if value is not None and not _CONSTRAINT_RE.fullmatch(value):
            raise ValueError(
                f"{shown(value)} is not a Slurm constraint: feature names joined by & | , with [ ] ( ) * !, no spaces"
            )
        return value

    @field_validator("python")
    @classmethod
    def _single_line(cls, value: str | None) -> str | None:
        # A path: shell-quoted on the srun line, so any one line will do.
        if value is not None and (not value or not value.isprintable()):
            raise ValueError("must be a path on one line")
        return value

    @field_validator("sbatch")
    @classmethod
    def _sbatch_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        for key, value in values.items():
            if not re.fullmatch(r"[a-z][a-z0-9-]{0,63}", key):
                raise ValueError(f"sbatch option {shown(key)} is not an sbatch long option name")
            if isinstance(value, str) and len(value) > MAX_SBATCH_VALUE:
                raise ValueError(f"sbatch option {key!r} is longer than {MAX_SBATCH_VALUE} characters")
            if isinstance(value, str) and not value.isprintable():
                # A newline would start a new line in the batch script: refuse, never escape.
                # (Other characters are shell-quoted onto the `#SBATCH --key=value` line.)
                raise ValueError(f"sbatch option {key!r} must be a single line of printable characters")
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                raise ValueError(f"sbatch option {key!r}: {value} is beyond any Slurm number (64 bits)")
        return values

    def node_features(self) -> tuple[str, str]:
        return self.constraint or "", "slurm.constraint"
