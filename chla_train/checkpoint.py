"""Training checkpoints in <work_dir>/checkpoints/step-N: complete or absent.

A checkpoint holds DeepSpeed's engine state (trainable weights only, optimizer partitions of
every rank, LR scheduler), each rank's RNG states, and trainer_state.json (step, tokens seen,
sampler position). All ranks write into a hidden `.step-N.tmp` directory; rank 0 renames it to
`step-N` only after every rank has finished, so a checkpoint directory is visible only once
complete, and resume takes the highest step-N that rank 0 sees (resume_point). The work dir must be
on a file system all nodes share (the run directory is).

A checkpoint belongs to one fingerprint of its stage (trainer_state.json says which); one of another
fingerprint, or one that does not say, is never resumed. Every file is read with
torch.load(weights_only=True): no code runs from a checkpoint file.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from chla_launcher.contract.atomic import write_json
from chla_train.deepspeed_import import import_deepspeed

ENGINE_TAG = "engine"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_root(work_dir: Path) -> Path:
    return Path(work_dir) / "checkpoints"


def list_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under `root`, as this node sees it now."""
    if not root.is_dir():
        return []
    return [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]


def latest_checkpoint(work_dir: Path) -> Path | None:
    steps = list_steps(checkpoints_root(work_dir))
    return max(steps)[1] if steps else None


def same_run(checkpoint: Path, fingerprint: str) -> bool:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state.get("fingerprint") == fingerprint


def resume_point(work_dir: Path, fingerprint: str, *, rank: int) -> tuple[Path | None, bool]:
    """Collective where torch.distributed runs: the checkpoint every rank resumes from, and whether
    the checkpoints there belong to another fingerprint (then set them aside and start afresh).

    Rank 0 decides and tells the others: a node's cached listing of a network file system can
    miss the newest step-N for a while (NFS caches directory entries for up to a minute), and ranks
    that chose alone would load different steps, or only some would enter set_aside's barriers."""
    choice: list[Any] = [None, False]
    if rank == 0:
        latest = latest_checkpoint(work_dir)
        if latest is not None and not same_run(latest, fingerprint):
            choice = [None, True]
        else:
            choice = [str(latest) if latest is not None else None, False]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    path, foreign = choice
    return (Path(path) if path is not None else None), bool(foreign)


def set_aside(work_dir: Path, *, rank: int) -> Path:
    """Collective: rename the checkpoints dir out of the way (rank 0), everyone waits."""
    root = checkpoints_root(work_dir)
    aside = root.with_name(f"checkpoints.stale-{int(time.time())}")
    _barrier()  # every rank has read the old trainer_state.json
    if rank == 0:
        os.replace(root, aside)
    _barrier()
    return aside


def rng_states() -> dict[str, Any]:
    """Every RNG's state as tensors, ints and lists only, so that it loads with weights_only=True
    (numpy's own state holds an ndarray, which that loader refuses)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)  # the legacy state: ("MT19937", keys, position, ...)
    states = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    engine, work_dir: Path, step: int, trainer_state: dict[str, Any], *, rank: int, keep_last: int
) -> Path:
    """Collective: every rank calls it at the same optimizer step."""
    root = checkpoints_root(work_dir)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a rank killed mid-save
        tmp.mkdir(parents=True)
    _barrier()
    # Frozen base weights are not saved: they come from the base model again on resume.
    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_states(), tmp / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        write_json(tmp / "trainer_state.json", trainer_state)
        if final.exists():  # same step saved by an earlier attempt that died before pruning
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep_last)
    _barrier()
    return final


def load_checkpoint(engine, checkpoint: Path, *, rank: int) -> dict[str, Any]:
    """Restore engine state and this rank's RNG; returns trainer_state.json."""
    _read_weights_only(engine)
    load_path, _ = engine.load_checkpoint(
        str(checkpoint),
        tag=ENGINE_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint}")
    rng_file = checkpoint / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        restore_rng_states(torch.load(rng_file, weights_only=True))
    return json.loads((checkpoint / "trainer_state.json").read_text())


def _read_weights_only(engine) -> None:
    """Make DeepSpeed read its checkpoint files with torch.load(weights_only=True); it passes False.
    Besides tensors and plain containers its files hold three objects of its own (found by loading
    every file of ZeRO-0/2/3 checkpoints, fp32 and bf16): those are allowed by name."""
    import_deepspeed()
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:  # not a custom engine of a user's config
        engine.checkpoint_engine.load = load


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(list_steps(root))
    for _, path in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
