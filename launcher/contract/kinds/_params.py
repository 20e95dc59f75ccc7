"""The base of every kind's params model, and the marker of its fields that name input paths
(below the registry and the training params, which both build on them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StageParams(BaseModel):
    """Base of every kind's params: unknown keys are errors, values are validated on assignment,
    inf and nan are no numbers (a learning rate of .inf passed `gt=0`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True, allow_inf_nan=False)


class InputPath:
    """Marks a params field (str or list of str) as a path that must exist when the recipe is
    submitted, unless it lies inside the run directory (then an upstream stage produces it).

    Use as `Annotated[str, InputPath()]`. `glob=True` means the value is a glob pattern that
    must match at least one file.
    """

    def __init__(self, glob: bool = False) -> None:
        self.glob = glob

    def __repr__(self) -> str:
        return f"InputPath(glob={self.glob})"
