"""The resolved recipe: every stage interpolated, validated by its kind and given its dependencies.
What the launcher plans and submits, and what a job reads back from the frozen recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from ..kinds import StageKind, StageParams
from .schema import RecipeModel, Resources


@dataclass(frozen=True)
class SweepPoint:
    """Where an expanded stage sits in its node-scaling sweep."""

    group: str  # the stage name in the recipe
    nodes: int
    scaling: str


ParamsT = TypeVar("ParamsT", bound=StageParams)


@dataclass
class ResolvedStage:
    """One stage after interpolation, validation and dependency inference."""

    name: str
    kind: StageKind
    params: BaseModel
    params_raw: dict[str, Any]
    resources: Resources
    array: int | None
    after: list[str]  # explicit and inferred, sorted
    sweep: SweepPoint | None = None

    @property
    def num_tasks(self) -> int:
        return self.array or 1

    def params_as(self, params_type: type[ParamsT]) -> ParamsT:
        """The stage's params as the kind's own model (for code that reads one kind's fields)."""
        if not isinstance(self.params, params_type):
            raise TypeError(
                f"stage {self.name} ({self.kind.name}) has {type(self.params).__name__}, not {params_type.__name__}"
            )
        return self.params


@dataclass
class ResolvedRecipe:
    model: RecipeModel
    source: str  # the recipe file (or the frozen copy)
    run_dir: Path
    stages: dict[str, ResolvedStage]
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.model.name

    def frozen(self) -> dict[str, Any]:
        """The recipe as frozen into the run directory: every reference resolved, every default
        filled in, every path absolute. Loading it again gives the same ResolvedRecipe."""
        model = self.model.model_dump(mode="json")
        model["run_dir"] = str(self.run_dir)
        model["vars"] = {}
        for name, stage in self.stages.items():
            if stage.sweep is not None:
                # A sweep stays one stage in the frozen recipe; loading it expands it again.
                name = stage.sweep.group
                if stage.sweep.nodes != model["stages"][name]["sweep"]["nodes"][0]:
                    continue
            spec = model["stages"][name]
            spec["params"] = stage.params_raw
            spec["after"] = stage.after
            spec["resources"] = stage.resources.model_dump(mode="json")
        return model
