"""Shared fixtures for every test area, and how the suite splits across pytest-xdist workers
(tests/run.sh runs it with `-n 3 --dist loadgroup`)."""

from __future__ import annotations

import os

import pytest

# The xdist group of every test that uses the real local Slurm cluster: they run one after another on
# one worker, as in a serial run. The cluster has two nodes of two CPUs; a test that needs both
# nodes, or a whole node to preempt, would otherwise queue behind another worker's jobs past its
# timeouts.
SLURM_GROUP = "slurm"
# The tests of the shrunk demo's local run (tests/integration/conftest.py: demo_local_run). xdist
# queues groups largest first, so the Slurm group starts on one worker and this one on the other,
# where the local chain runs beside the Slurm tests instead of on their path; the Slurm group's
# comparison with the local run comes last in that group and finds the run done.
DEMO_LOCAL_GROUP = "demo_local"


def pytest_configure(config) -> None:
    # Workers on this machine kind's two cores: one thread each (torch in the worker, and the
    # processes it starts: rank processes, local-executor stages and, through sbatch's exported
    # environment, Slurm jobs) instead of several workers x two threads spinning on two cores. Set
    # before any test imports torch; a value the user set is kept. Both sides of every
    # cross-run comparison run under the worker's setting, so they use the same thread count.
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # pytest-xdist registers its marker; without the plugin (a plain `pytest`) it is still known.
    config.addinivalue_line("markers", "xdist_group(name): run on one xdist worker with the group's other tests")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the group into the test's id
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if "slurm_cluster" in item.fixturenames or item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.xdist_group(SLURM_GROUP))
        elif "demo_local_run" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group(DEMO_LOCAL_GROUP))
    # Slurm tests that read the local demo run go last (a stable sort: the rest keep their order).
    items.sort(key=lambda item: "slurm_cluster" in item.fixturenames and "demo_local_run" in item.fixturenames)


@pytest.fixture(scope="session")
def demo_assets() -> dict[str, str]:
    """Paths of the real demo assets (chla_tools.assets.fetch_assets with the default cache:
    $CHLA_CACHE/assets or ~/.cache/chla/assets), downloaded at most once per machine.
    Keys: base_tokenizer, base_sp_model, zh_train, zh_heldout, en_text, en_heldout, sft_train,
    sft_valid (the multi-task SFT mix), prompts, and <task>_<part> for the tasks sentiment,
    segmentation, entities, continuation and the parts train, valid, test."""
    from chla_tools.assets import fetch_assets

    return fetch_assets()


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The real local Slurm cluster (bash slurm/localcluster.sh start). CI sets CHLA_REQUIRE_SLURM=1,
    so a cluster that is not up fails the tests there instead of skipping them."""
    from .helpers import require_slurm_cluster

    require_slurm_cluster()
