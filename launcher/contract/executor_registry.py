"""Which executors exist, by name, and where each one's three parts live: the recipe's `executor:`
is checked against these names, the launcher loads the login side a chain names, the job loads the
job side of the executor that started it, and the recipe validates the executor's settings block.

An executor is three parts, each named "module:attribute" and imported only when wanted:
    login            its chla_launcher.executors.Executor subclass: submit, status, logs, cancel
                     (may import heavy things: submitit)
    job_environment  its chla_launcher.contract.job_environment.JobEnvironment subclass: rank,
                     world size, master address, attempt, preemption and requeue inside a task
                     (imports only the contract: it is loaded in every task, before torch)
    settings         its chla_launcher.contract.executor_settings.ExecutorSettings subclass, or
                     none: the recipe's top-level block named after the executor (`slurm:`)

Built-in executors are listed here; a package outside chla adds one through the `chla.executors`
entry-point group: the entry point's name is the executor's, its value "module:ATTRIBUTE" names
an ExecutorPlugin in a module that imports nothing heavy (the way submitit finds its plugins).
Listing the names imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from .errors import ChlaError
from .import_path import import_entry

ENTRY_POINT_GROUP = "chla.executors"

# The job side of a process that no executor started (a benchmark, a test's ranks, torchrun):
# the local executor's reads torch.distributed's own variables.
DEFAULT_JOB_EXECUTOR = "local"


@dataclass(frozen=True)
class ExecutorPlugin:
    """One executor's parts ("module:attribute" each)."""

    name: str
    login: str
    job_environment: str
    settings: str | None = None

    def login_class(self) -> Any:
        return load(self.login, f"executor {self.name!r}'s login side")

    def job_environment_class(self) -> Any:
        return load(self.job_environment, f"executor {self.name!r}'s job environment")

    def settings_model(self) -> Any:
        """The executor's settings model (a pydantic model), or None where it has none."""
        return load(self.settings, f"executor {self.name!r}'s settings") if self.settings else None


BUILT_IN = {
    "local": ExecutorPlugin(
        name="local",
        login="chla_launcher.executors.local:LocalExecutor",
        job_environment="chla_launcher.contract.executors.local_job:LocalJobEnvironment",
    ),
    "slurm": ExecutorPlugin(
        name="slurm",
        login="chla_launcher.executors.slurm:SlurmExecutor",
        job_environment="chla_launcher.contract.executors.slurm_job:SlurmJobEnvironment",
        settings="chla_launcher.contract.executors.slurm_settings:SlurmSettings",
    ),
}


def load(reference: str, what: str) -> Any:
    """The attribute a "module:attribute" reference names."""
    try:
        return import_entry(reference)
    except (ImportError, AttributeError) as error:
        raise ChlaError(f"{what} {reference!r} cannot be loaded: {error}") from None


def _installed() -> dict[str, Any]:
    return {entry_point.name: entry_point for entry_point in entry_points(group=ENTRY_POINT_GROUP)}


def executor_names() -> list[str]:
    return sorted(set(BUILT_IN) | set(_installed()))


@cache
def executor_plugin(name: str) -> ExecutorPlugin:
    """The parts of the executor called `name` (a built-in one wins over a plugin of that name)."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    installed = _installed()
    if name not in installed:
        raise ChlaError(f"unknown executor {name!r} (known: {', '.join(executor_names())})")
    plugin = installed[name].load()
    if not isinstance(plugin, ExecutorPlugin) or plugin.name != name:
        raise ChlaError(
            f"the {ENTRY_POINT_GROUP} entry point {name!r} = {installed[name].value!r} is {plugin!r}, "
            f"not an ExecutorPlugin named {name!r} (chla_launcher.contract.executor_registry)"
        )
    return plugin


def settings_models() -> dict[str, Any]:
    """Executor name -> its settings model, for every executor that has one (the recipe's blocks)."""
    models = {}
    for name in executor_names():
        model = executor_plugin(name).settings_model()
        if model is not None:
            models[name] = model
    return models
