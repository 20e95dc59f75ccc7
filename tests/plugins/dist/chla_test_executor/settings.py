"""The queuefile executor's settings: the recipe's `queuefile:` block."""

from chla_launcher.contract.executor_settings import ExecutorSettings


class QueueFileSettings(ExecutorSettings):
    queue: str = "queue"  # the scheduler's directory (relative: to the run directory)
