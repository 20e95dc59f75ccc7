"""Loaded by every Python process of a test run that puts this directory first on PYTHONPATH (the
job's environment is the submitter's, on Slurm as locally): faults on one rank of a training stage,
without touching chla's code.

A rank that fails at one optimizer step, as a CUDA out-of-memory error would:

    CHLA_TEST_FAIL_RANK=1 CHLA_TEST_FAIL_STEP=3 CHLA_TEST_FAIL_STAMP=/path/raised-at [CHLA_TEST_HANG=1]

The rank writes time.time() to CHLA_TEST_FAIL_STAMP right before it raises. With CHLA_TEST_HANG=1
the other ranks block at that step until they are killed, as ranks do in an NCCL collective whose
peer died (NCCL does not notice; gloo, on CPU, sees the closed connection and raises).

A rank whose listing of the checkpoint directory is stale (an NFS client's cached directory
entries miss the newest step-N): its latest_checkpoint() answers the step before the newest.

    CHLA_TEST_STALE_LISTING_RANK=1

A slurmctld slow to answer (a busy cluster): each `scontrol show job` the task asks through chla
(whether its job is being preempted) first waits this many seconds.

    CHLA_TEST_SLOW_SLURMCTLD_S=8"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time


def _rank() -> int:
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))


def _patch(trainer_module) -> None:
    fail_step = int(os.environ["CHLA_TEST_FAIL_STEP"])
    original = trainer_module.Trainer.optimizer_step
    calls = [0]

    def optimizer_step(self, samples):
        calls[0] += 1
        if calls[0] == fail_step and _rank() != int(os.environ["CHLA_TEST_FAIL_RANK"]):
            while True:
                time.sleep(3600)
        if calls[0] == fail_step:
            with open(os.environ["CHLA_TEST_FAIL_STAMP"], "w") as stamp:
                stamp.write(repr(time.time()))
            raise RuntimeError(f"CUDA out of memory. (raised by the test on rank {_rank()} at step {fail_step})")
        return original(self, samples)

    trainer_module.Trainer.optimizer_step = optimizer_step


def _stale_listing(checkpoint_module) -> None:
    def stale_latest(work_dir):
        root = checkpoint_module.checkpoints_root(work_dir)
        steps = (
            sorted((int(m.group(1)), p) for p in root.iterdir() if (m := checkpoint_module.STEP_DIR.match(p.name)))
            if root.is_dir()
            else []
        )
        return steps[-2][1] if len(steps) >= 2 else None

    checkpoint_module.latest_checkpoint = stale_latest


def _slow_slurmctld(slurm_module) -> None:
    delay = float(os.environ["CHLA_TEST_SLOW_SLURMCTLD_S"])
    original = slurm_module.being_preempted

    def being_preempted(job_id):
        time.sleep(delay)
        return original(job_id)

    slurm_module.being_preempted = being_preempted


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("CHLA_TEST_FAIL_RANK") is not None and (
    _rank() == int(os.environ["CHLA_TEST_FAIL_RANK"]) or os.environ.get("CHLA_TEST_HANG") == "1"
):
    sys.meta_path.insert(0, _PatchAfterImport("chla_train.trainer", _patch))
if os.environ.get("CHLA_TEST_STALE_LISTING_RANK") == str(_rank()):
    sys.meta_path.insert(0, _PatchAfterImport("chla_train.checkpoint", _stale_listing))
if os.environ.get("CHLA_TEST_SLOW_SLURMCTLD_S"):
    sys.meta_path.insert(0, _PatchAfterImport("chla_launcher.contract.executors.slurm_job", _slow_slurmctld))
