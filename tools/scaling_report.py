"""`chla report scaling RUN_DIR`: throughput of a node-scaling sweep (`sweep: {nodes: [...]}` on a
training stage) as a table (Markdown and JSON) and a PNG of speedup against the ideal line, with
parallel efficiency on a second axis.

Per sweep point, from its metrics.jsonl (log every step for this: `logging_steps: 1`):
- step time: the differences of `elapsed_s` between consecutive records divided by the steps between
  them; the first record is dropped (it carries start-up: allocation, first compile, data warm-up);
  the median is reported;
- tokens/s = tokens per optimizer step / median step time, and per device (ranks, or GPUs);
- speedup = tokens/s over the smallest node count's tokens/s; ideal = nodes / smallest nodes;
  efficiency = speedup / ideal. With weak scaling (the global batch grows with the nodes) this is
  throughput scaling; with strong scaling (fixed global batch) it is also the step-time speedup.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from chla_launcher.contract.atomic import write_json, write_text
from chla_launcher.contract.errors import ChlaError


def _metrics(stage_dir: Path) -> list[dict[str, Any]]:
    for candidate in (stage_dir / "out" / "metrics.jsonl", stage_dir / "work" / "metrics.jsonl"):
        if candidate.is_file():
            return [
                json.loads(line)
                for line in candidate.read_text(encoding="utf-8").splitlines()
                if line.strip() and "loss" in json.loads(line)
            ]
    return []


def _point(run_dir: Path, stage) -> dict[str, Any]:
    records = _metrics(run_dir / stage.name)
    if len(records) < 3:
        raise ChlaError(
            f"{run_dir / stage.name}: fewer than 3 logged steps; run the sweep stages to the end with logging_steps: 1"
        )
    times, tokens = [], []
    for before, after in zip(records[1:], records[2:]):
        steps = after["step"] - before["step"]
        times.append((after["elapsed_s"] - before["elapsed_s"]) / steps)
        tokens.append((after["tokens_seen"] - before["tokens_seen"]) / steps)
    state = json.loads((run_dir / stage.name / "state.json").read_text(encoding="utf-8"))
    resources = stage.resources
    ranks = resources.nodes * resources.tasks_per_node
    devices = resources.nodes * resources.gpus_per_node if resources.gpus_per_node else ranks
    step_time = statistics.median(times)
    tokens_per_step = statistics.median(tokens)
    return {
        "stage": stage.name,
        "nodes": stage.sweep.nodes,
        "devices": devices,
        "device_kind": "GPU" if resources.gpus_per_node else "rank",
        "global_batch": records[-1].get("global_batch"),
        "steps_measured": len(times),
        "median_step_s": step_time,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / step_time,
        "tokens_per_s_per_device": tokens_per_step / step_time / devices,
        "hosts": state.get("hosts", []),
    }


def scaling_report(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    from chla_launcher.contract.recipe import load_frozen

    run_dir = Path(run_dir)
    recipe = load_frozen(run_dir)
    groups: dict[str, list] = {}
    for stage in recipe.stages.values():
        if stage.sweep is not None:
            groups.setdefault(stage.sweep.group, []).append(stage)
    if not groups:
        raise ChlaError(
            f"{run_dir}: the recipe has no node-scaling sweep (add `sweep: {{nodes: [1, 2]}}` to a training stage)"
        )
    out_dir = Path(out) if out else run_dir / "reports"
    report: dict[str, Any] = {"run": str(run_dir), "sweeps": {}}
    for group, stages in groups.items():
        points = sorted((_point(run_dir, stage) for stage in stages), key=lambda p: p["nodes"])
        base = points[0]
        for point in points:
            point["speedup"] = point["tokens_per_s"] / base["tokens_per_s"]
            point["ideal_speedup"] = point["nodes"] / base["nodes"]
            point["efficiency"] = point["speedup"] / point["ideal_speedup"]
        scaling = stages[0].sweep.scaling
        shared = [p for p in points if p["nodes"] > 1 and len(set(p["hosts"])) < p["nodes"]]
        note = ""
        if shared:
            note = (
                "The nodes of this sweep share a host ("
                + ", ".join(sorted({h for p in shared for h in p["hosts"]}))
                + "): these figures are a smoke test of the mechanism, not a measurement of scaling."
            )
        report["sweeps"][group] = {
            "scaling": scaling,
            "scaling_meaning": (
                "weak: each rank keeps its batch, the global batch grows with the nodes"
                if scaling == "weak"
                else "strong: the global batch is fixed"
            ),
            "note": note,
            "points": points,
        }
        _plot(group, points, scaling, note, out_dir / f"scaling-{group}.png")
        report["sweeps"][group]["plot"] = str(out_dir / f"scaling-{group}.png")
    write_json(out_dir / "scaling.json", report)
    write_text(out_dir / "scaling.md", markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Node scaling: {report['run']}", ""]
    for group, sweep in report["sweeps"].items():
        lines += [f"## {group} ({sweep['scaling_meaning']})", ""]
        if sweep["note"]:
            lines += [f"**{sweep['note']}**", ""]
        kind = sweep["points"][0]["device_kind"]
        lines += [
            f"| nodes | {kind}s | global batch | median step (s) | tokens/s | tokens/s per {kind} "
            "| speedup | ideal | efficiency |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in sweep["points"]:
            lines.append(
                f"| {p['nodes']} | {p['devices']} | {p['global_batch']} | {p['median_step_s']:.3f} | "
                f"{p['tokens_per_s']:.0f} | {p['tokens_per_s_per_device']:.0f} | {p['speedup']:.2f} | "
                f"{p['ideal_speedup']:.0f} | {100 * p['efficiency']:.0f}% |"
            )
        lines += ["", f"Plot: {sweep['plot']}", ""]
    return "\n".join(lines)


def _plot(group: str, points: list[dict[str, Any]], scaling: str, note: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [p["nodes"] for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(nodes, [p["ideal_speedup"] for p in points], "--", color="grey", label="ideal")
    ax.plot(nodes, [p["speedup"] for p in points], "o-", color="tab:blue", label="measured speedup")
    ax.set_xlabel("nodes")
    ax.set_ylabel("speedup (tokens/s relative to the fewest nodes)")
    ax.set_xticks(nodes)
    ax.grid(alpha=0.3)
    second = ax.twinx()
    second.plot(nodes, [100 * p["efficiency"] for p in points], "s:", color="tab:orange", label="efficiency")
    second.set_ylabel("parallel efficiency (%)")
    second.set_ylim(0, max(110, max(100 * p["efficiency"] for p in points) + 10))
    handles = ax.get_legend_handles_labels()[0] + second.get_legend_handles_labels()[0]
    ax.legend(handles, [str(h.get_label()) for h in handles], loc="upper left")
    title = f"{group}: {scaling} scaling"
    if note:
        title += "\n(nodes share one host: smoke test only)"
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
