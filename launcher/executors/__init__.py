"""Executors: local (this machine) and slurm (submitit)."""
