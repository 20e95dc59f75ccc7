"""The launcher tests use the shared helpers (tests/helpers.py) and fixtures (tests/conftest.py),
and, for a chain that runs on either executor, EXECUTORS, the cluster_if_slurm fixture, submit and
finish."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ..helpers import REPO, chla, status_json, wait_for_chain, wait_until  # noqa: F401

EXECUTORS = [pytest.param("local"), pytest.param("slurm", marks=pytest.mark.slurm)]


@pytest.fixture
def cluster_if_slurm(request, executor):
    """The real local Slurm cluster where the test's `executor` is slurm."""
    if executor == "slurm":
        request.getfixturevalue("slurm_cluster")


def submit(tmp_path: Path, executor: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """`chla submit r.yaml` in tmp_path on `executor`."""
    return chla("submit", "r.yaml", "--executor", executor, *extra, cwd=tmp_path, check=check)


def finish(tmp_path: Path, executor: str, name: str) -> dict[str, dict]:
    """The status rows of run `name` once it has ended: a local submission returns at the end of its
    chain, a Slurm one is waited for."""
    run_dir = tmp_path / "runs" / name
    if executor == "slurm":
        return wait_for_chain(run_dir)
    return status_json(run_dir)
