"""The base of every block a recipe may contain (the recipe's own, an executor's settings): unknown
keys are errors, and an error shows a value cut short."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    # Numbers given where text is expected (`--set vars.tag=7`) become text; inf and nan are no
    # numbers a recipe means.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)


def shown(value: Any) -> str:
    """`value` as an error shows it: its repr, cut short (a megabyte of input is one line too)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + "..." + text[-7:]
