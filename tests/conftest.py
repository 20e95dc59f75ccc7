"""Shared fixtures for every test area."""

from __future__ import annotations

import pytest


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
