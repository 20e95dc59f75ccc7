"""The recipe's schema: what a recipe file may say, typed and validated by pydantic. Unknown keys
are errors; stage params are a plain mapping here and validated by their kind (chla_launcher.kinds)
once references are resolved."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..rundir import RESERVED_NAMES
from ..tracking import TrackingSettings
from .units import check_mem, check_time

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)


class _Strict(BaseModel):
    # Numbers given where text is expected (`--set vars.tag=7`) become text.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


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

    _mem = field_validator("mem", "gpu_mem")(classmethod(lambda cls, v: check_mem(v)))
    _time = field_validator("time", mode="before")(classmethod(lambda cls, v: check_time(v)))

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
        from ..executors import executor_names

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
