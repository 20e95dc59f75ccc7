"""The real-GPU layer (`pytest -m gpu`): tests that need a CUDA GPU. They run only when asked for by
their marker (`-m gpu`, or an -m expression naming gpu), so the CPU suite never collects them into
its run, and they skip with the reason when torch sees no CUDA device."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    if "gpu" not in (config.getoption("markexpr") or ""):
        config.hook.pytest_deselected(items=gpu_items)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
        return
    import torch

    if not torch.cuda.is_available():
        reason = (
            f"no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False); "
            "the GPU layer runs on a machine with one"
        )
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
