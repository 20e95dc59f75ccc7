"""The fake-CUDA layer's fixtures: cuda:0 made addressable on a torch without CUDA (device.py),
and the training tests' merged tokenizer (subtoken_mean needs a real one)."""

from __future__ import annotations

import pytest

from ..train.conftest import train_assets  # noqa: F401  (the merged tokenizer)


@pytest.fixture(scope="session", autouse=True)
def cuda_device_guard() -> None:
    from .device import install_cuda_device_guard

    install_cuda_device_guard()
