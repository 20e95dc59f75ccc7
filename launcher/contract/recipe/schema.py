"""The recipe's schema: what a recipe file may say, typed and validated by pydantic. Unknown keys
are errors; stage params are a plain mapping here and validated by their kind (chla_launcher.contract.kinds)
once references are resolved."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..executor_registry import executor_names
from ..rundir import RESERVED_NAMES
from ..tracking_settings import TrackingSettings
from .units import check_mem, check_time

# Run and stage names: they become directory names, job names (`#SBATCH --job-name`) and log
# prefixes, so one line of safe characters, never "." or "..". Matched whole (fullmatch: a `$`
# would let a trailing newline through).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_NAME_RE = re.compile(NAME_PATTERN)

# What Slurm accepts (measured with sbatch 22.05 --test-only, and its man pages): node counts are
# signed 32-bit ("2147483648 is not a valid node count"; 4294967296 silently wraps to 0 nodes);
# tasks per node and CPUs per task are 16-bit in Slurm's job description, whose top two values
# mean "not set" and "unlimited"; GPUs per node are bounded alike (no node has more); --signal's
# time is 0..65535 s; MaxArraySize may not exceed 4,000,001.
MAX_NODES = 2**31 - 1
MAX_PER_NODE = 2**16 - 3
MAX_SIGNAL_DELAY_S = 65535
MAX_ARRAY_CHUNK = 4_000_001
# Partition, account and QOS names (a partition may be a comma-separated list), and a
# constraint's feature expression (&, |, [], *, !): reach `#SBATCH` lines, so one line of these.
# Lengths bounded too (a line of the batch script, not a megabyte).
_SLURM_NAME_RE = re.compile(r"(?=.{1,256}\Z)[A-Za-z0-9_.@+-]+(,[A-Za-z0-9_.@+-]+)*")
_CONSTRAINT_RE = re.compile(r"[A-Za-z0-9_.,:&|*!()\[\]@+-]{1,1024}")
MAX_SBATCH_VALUE = 4096


def shown(value: Any) -> str:
    """`value` as an error shows it: its repr, cut short (a megabyte of input is one line too)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + "..." + text[-7:]


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {shown(value)} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return value


class _Strict(BaseModel):
    # Numbers given where text is expected (`--set vars.tag=7`) become text; inf and nan are no
    # numbers a recipe means.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)


class Resources(_Strict):
    """What one stage asks of the cluster (the recipe's defaults, each stage may override)."""

    nodes: int = Field(1, ge=1, le=MAX_NODES)
    tasks_per_node: int = Field(1, ge=1, le=MAX_PER_NODE)
    gpus_per_node: int = Field(0, ge=0, le=MAX_PER_NODE)
    cpus_per_task: int = Field(1, ge=1, le=MAX_PER_NODE)
    mem: str = "4G"
    time: str = "01:00:00"
    # Memory of one GPU, for `chla plan` and chla-submit's memory check (not passed to Slurm);
    # without it, a GPU named in slurm.constraint gives it.
    gpu_mem: str | None = None

    _mem = field_validator("mem", "gpu_mem")(classmethod(lambda cls, v: check_mem(v)))
    _time = field_validator("time", mode="before")(classmethod(lambda cls, v: check_time(v)))

    @model_validator(mode="after")
    def _task_count(self) -> Resources:
        if self.world_size > MAX_NODES:
            raise ValueError(
                f"nodes x tasks_per_node = {self.world_size:,} tasks; Slurm counts tasks in 32 bits "
                f"(at most {MAX_NODES:,})"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


class ResourceOverrides(_Strict):
    nodes: int | None = Field(None, ge=1, le=MAX_NODES)
    tasks_per_node: int | None = Field(None, ge=1, le=MAX_PER_NODE)
    gpus_per_node: int | None = Field(None, ge=0, le=MAX_PER_NODE)
    cpus_per_task: int | None = Field(None, ge=1, le=MAX_PER_NODE)
    mem: str | None = None
    time: str | None = None
    gpu_mem: str | None = None

    _mem = field_validator("mem", "gpu_mem")(classmethod(lambda cls, v: check_mem(v)))
    _time = field_validator("time", mode="before")(classmethod(lambda cls, v: check_time(v)))


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


class SweepSpec(_Strict):
    """Node-scaling experiment: the stage runs once per node count, as stages `<name>-n<nodes>`.
    weak: every rank keeps its batch, so the global batch grows with the nodes; strong: the global
    batch stays that of the smallest count (the kind's accumulation param is divided)."""

    nodes: list[int] = Field(min_length=1)
    scaling: Literal["weak", "strong"] = "weak"

    @field_validator("nodes")
    @classmethod
    def _positive_unique(cls, nodes: list[int]) -> list[int]:
        if any(not 1 <= n <= MAX_NODES for n in nodes) or len(set(nodes)) != len(nodes):
            raise ValueError(f"node counts must be distinct, at least 1 and at most {MAX_NODES:,} (Slurm's limit)")
        return sorted(nodes)


class StageSpec(_Strict):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)
    resources: ResourceOverrides = Field(default_factory=ResourceOverrides)
    # Number of shards: the stage becomes an array of this many tasks.
    # (chla splits an array into array jobs of at most the cluster's MaxArraySize tasks.)
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
    # Experiment tracking (MLflow, W&B) of every stage; see chla_launcher.contract.tracking_settings.
    tracking: TrackingSettings | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "run name")

    @field_validator("executor")
    @classmethod
    def _executor(cls, value: str) -> str:
        if value not in executor_names():
            raise ValueError(f"unknown executor {value!r} (known: {', '.join(executor_names())})")
        return value

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
        for name in stages:
            check_name(name, "stage name")
            if name in RESERVED_NAMES:
                raise ValueError(
                    f"stage name {name!r} is taken by the run directory's own "
                    f"{name} (reserved: {', '.join(sorted(RESERVED_NAMES))})"
                )
        return stages
