"""Which executors exist, by name: the recipe's `executor:` is checked against these, and the
launcher loads the one a chain names. Built-in executors are listed here; a package outside chla
adds one through the `chla.executors` entry-point group (name = the module that defines it), the
way submitit finds its plugins. Nothing is imported to list the names.
"""

from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "chla.executors"

BUILT_IN = {
    "local": "chla_launcher.executors.local",
    "slurm": "chla_launcher.executors.slurm",
}


def executor_modules() -> dict[str, str]:
    """Executor name -> the module that defines it (built-in ones, then installed plugins')."""
    modules = dict(BUILT_IN)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        modules.setdefault(entry_point.name, entry_point.value)
    return modules


def executor_names() -> list[str]:
    return sorted(executor_modules())
