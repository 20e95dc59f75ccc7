"""A full disk under the run directory, during pretokenize and during merge (the run directory on a
small tmpfs, mounted here): one clear line, a non-zero exit, no DONE and nothing half-written left
behind; once space is freed, the resubmit completes with the same result as a run with room."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ..eval.conftest import make_adapter, make_base
from ..helpers import chla


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(
            f"a tmpfs cannot be mounted here ({result.stderr.strip() or result.returncode}); "
            f"the full-disk tests need root and mount"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """A file that takes all but `leave_bytes` of the disk's free space."""
    filler = disk / "filler"
    size = shutil.disk_usage(disk).free - leave_bytes
    with open(filler, "wb") as handle:
        for _ in range(size // 2**20):
            handle.write(bytes(2**20))
        handle.write(bytes(size % 2**20))
    return filler


def submit_local(work: Path, stage: dict, run_dir: Path) -> subprocess.CompletedProcess:
    (work / "r.yaml").write_text(json.dumps({"name": "disk", "stages": {"s": stage}}))
    return chla("submit", "r.yaml", "--executor", "local", "--run-dir", str(run_dir), cwd=work, timeout=300)


def check_failed_cleanly(result: subprocess.CompletedProcess, disk: Path, run_dir: Path) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    line = next(line for line in output.splitlines() if "chla: stage s: no space left" in line)
    assert str(run_dir) in line and "free space" in line, line
    assert not (run_dir / "s" / "DONE").exists()
    state = json.loads((run_dir / "s" / "state.json").read_text())
    assert state["status"] == "FAILED" and "no space left" in state["error"], state
    leftovers = [p for p in disk.rglob("*") if ".tmp" in p.name]
    assert leftovers == [], leftovers  # nothing half-written stays behind


@pytest.mark.slow
def test_full_disk_during_pretokenize(small_disk, tmp_path, demo_assets):
    from chla_tools.pretokenize import pretokenize

    text = Path(demo_assets["zh_train"]).read_text(encoding="utf-8")[:600_000]
    corpus = tmp_path / "zh.txt"
    corpus.write_text(text, encoding="utf-8")
    stage = {
        "kind": "pretokenize",
        "params": {
            "tokenizer": demo_assets["base_tokenizer"],
            "inputs": [str(corpus)],
            "cache_dir": str(small_disk / "cache"),
        },
    }
    run_dir = small_disk / "run"
    filler = fill(small_disk, 400_000)  # the tokens need about 1.3 MB
    check_failed_cleanly(submit_local(tmp_path, stage, run_dir), small_disk, run_dir)

    filler.unlink()
    result = submit_local(tmp_path, stage, run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run_dir / "s" / "DONE").exists()
    reference = pretokenize(
        [str(corpus)],
        demo_assets["base_tokenizer"],
        tmp_path / "reference",
        cache_dir=tmp_path / "cache",
        log=lambda _: None,
    )
    manifest = json.loads((run_dir / "s" / "out" / "manifest.json").read_text())
    assert manifest["totals"]["tokens"] == reference["tokens"] > 600_000


@pytest.mark.slow
def test_full_disk_during_merge(small_disk, tmp_path, demo_assets):
    from transformers import AutoTokenizer

    from chla_tools.merge import merge_adapters

    base = make_base(tmp_path / "base", demo_assets["base_tokenizer"])  # about 17 MB of fp32 weights
    adapter = make_adapter(tmp_path / "adapter", base, AutoTokenizer.from_pretrained(base), seed=3)
    stage = {"kind": "merge", "params": {"base": str(base), "adapters": [str(adapter)]}}
    run_dir = small_disk / "run"
    filler = fill(small_disk, 8 * 2**20)
    check_failed_cleanly(submit_local(tmp_path, stage, run_dir), small_disk, run_dir)

    filler.unlink()
    result = submit_local(tmp_path, stage, run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run_dir / "s" / "DONE").exists()
    merge_adapters(base, [adapter], tmp_path / "reference", log=lambda _: None)
    merged = (run_dir / "s" / "out" / "model.safetensors").read_bytes()
    assert merged == (tmp_path / "reference" / "model.safetensors").read_bytes()
