"""The job sides and settings of the built-in executors (local, Slurm): the halves of an executor
that both the launcher and a running task import, so they live in the contract, below both. Their
login sides are chla_launcher.executors.local and chla_launcher.executors.slurm. An executor from
outside chla keeps all three parts in its own package (chla_launcher.contract.executor_registry)."""
