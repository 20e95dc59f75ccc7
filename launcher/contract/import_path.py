"""The one resolver of "module:attribute" references, by which kinds name their runners, executors
their parts and tracking backends their job-side trackers, so that nothing is imported before it is
wanted."""

from __future__ import annotations

import importlib
from typing import Any


def import_entry(spec: str) -> Any:
    """Import "module:attr" and return the attribute."""
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)
