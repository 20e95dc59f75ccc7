"""`chla report train RUN_DIR`: the loss curves of every training stage of a run in one PNG.

A training stage is any stage directory holding metrics.jsonl: in out/ once finished, in work/
while it still runs (so the report also works on a run in progress). One panel per stage,
training loss as a line and validation loss as markers, in the run's stage order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chla_launcher.contract.errors import ChlaError


def find_training_metrics(run_dir: Path) -> dict[str, Path]:
    """Stage name -> its metrics.jsonl, ordered by chain.json when present, else by name."""
    order: list[str] = []
    chain = run_dir / "chain.json"
    if chain.is_file():
        try:
            stages = json.loads(chain.read_text()).get("stages", {})
            order = list(stages) if isinstance(stages, (dict, list)) else []
            order = [s if isinstance(s, str) else s.get("name", "") for s in order]
        except (ValueError, AttributeError):
            order = []
    found: dict[str, Path] = {}
    for stage_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        for candidate in (stage_dir / "out" / "metrics.jsonl", stage_dir / "work" / "metrics.jsonl"):
            if candidate.is_file():
                found[stage_dir.name] = candidate
                break
    ranked = [s for s in order if s in found] + [s for s in found if s not in order]
    return {name: found[name] for name in ranked}


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, evals = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record: dict[str, Any] = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # the torn end of an append (a killed job, a full disk), or one being written
            raise ChlaError(f"{path}:{number}: not a JSON line; the metrics file is damaged") from None
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "eval_loss" in record:
            evals.append((record["step"], record["eval_loss"]))
    return train, evals


def train_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ChlaError(f"{run_dir}: no such run directory")
    stages = find_training_metrics(run_dir)
    if not stages:
        raise ChlaError(f"{run_dir}: no training stage has metrics.jsonl yet (looked in */out and */work)")
    out = Path(out) if out else run_dir / "reports" / "train_loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 4), squeeze=False)
    for ax, (stage, path) in zip(axes[0], stages.items()):
        _draw_loss(ax, stage, path)
    fig.suptitle(f"training loss: {run_dir.name}")
    return _save(fig, out)


def plot_stage_loss(metrics: str | Path, out: str | Path, title: str) -> Path:
    """One stage's loss curves (a metrics.jsonl) as a PNG, e.g. for experiment tracking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    _draw_loss(ax, title, Path(metrics))
    return _save(fig, Path(out))


def _draw_loss(ax, stage: str, path: Path) -> None:
    train, evals = read_metrics(path)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o--", label="validation loss", color="tab:orange")
    ax.set_title(stage)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    from chla_launcher.contract.atomic import atomic_path

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
