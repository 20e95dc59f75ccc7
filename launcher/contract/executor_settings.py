"""An executor's own settings: the recipe's top-level block named after the executor (`slurm:`),
validated by the executor's settings model (chla_launcher.contract.executor_registry names it)."""

from __future__ import annotations

from .strict import StrictModel


class ExecutorSettings(StrictModel):
    """What every executor's settings model answers, whatever its keys."""

    def node_features(self) -> tuple[str, str]:
        """(what the settings say about the nodes a stage gets, the key that says it), for telling
        a GPU's memory from its name (chla plan): Slurm's constraint. ("", "") where they say nothing."""
        return "", ""
