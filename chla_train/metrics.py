"""Training metrics: one JSON line per logging step in metrics.jsonl, TensorBoard events in tb/.

Both live in the work dir while training (it survives requeues; the per-attempt out dir does
not) and are copied into the stage's out dir at the end. On resume, lines logged after the
checkpoint are dropped (they will be logged again) and TensorBoard purges the same steps, so the
curves of an interrupted run look like those of an uninterrupted one.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from chla_launcher.contract import atomic


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def parse_record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl line as a dict, or None for a blank or torn one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """Written by rank 0 only; other ranks get a MetricsLog with enabled=False."""

    def __init__(self, work_dir: Path, *, enabled: bool, resume_step: int, sinks: list | None = None) -> None:
        self.enabled = enabled
        # Also told every record: experiment trackers (chla_train.tracking), progress bars.
        self.sinks = list(sinks or [])
        self.jsonl = Path(work_dir) / "metrics.jsonl"
        self.tb_dir = Path(work_dir) / "tb"
        self._tb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tb_dir), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is in the train extra; metrics.jsonl is what matters
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to the resumed step. A line that does not parse is the torn end of
        an append that was killed (or hit a full disk) and is dropped: the step it belonged to is
        after the checkpoint, so it is logged again."""
        if not self.jsonl.is_file():
            return
        kept = [
            line
            for line in self.jsonl.read_text(encoding="utf-8", errors="replace").splitlines()
            if (record := parse_record(line)) is not None and record.get("step", 0) <= step
        ]
        atomic.write_text(self.jsonl, "".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log_metrics(record)
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(
                        f"train/{key}" if not key.startswith("eval") else key.replace("_", "/", 1), value, step
                    )
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def copy_to(self, out_dir: Path) -> None:
        if not self.enabled:
            return
        self.close()
        if self.jsonl.is_file():
            shutil.copyfile(self.jsonl, Path(out_dir) / "metrics.jsonl")
        if self.tb_dir.is_dir():
            shutil.copytree(self.tb_dir, Path(out_dir) / "tb", dirs_exist_ok=True)
