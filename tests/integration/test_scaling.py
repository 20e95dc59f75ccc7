"""A node-scaling sweep over nodes [1, 2] on the real local Slurm cluster: one job per node count,
then `chla report scaling` writes the table (Markdown, JSON) and the plot, and says that the two
"nodes" share a host."""

from __future__ import annotations

import json

import pytest

from ..helpers import REPO, chla, wait_for_chain

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_scaling_sweep_on_slurm_reports_speedup_and_efficiency(tmp_path, slurm_cluster, demo_assets):
    # 5 steps, not the recipe's 12: the report times steps 2 to 5 (it needs 3 logged steps); each
    # step took ~5 s here with both jobs sharing the two cores.
    recipe = str(REPO / "recipes" / "scaling.yaml")
    shrink = ["--set", "stages.bench.params.max_steps=5"]
    chla("submit", recipe, "--executor", "slurm", *shrink, cwd=tmp_path, check=True)
    run_dir = tmp_path / "runs" / "scaling"
    chain = json.loads((run_dir / "chain.json").read_text())["stages"]
    assert {"bench-n1", "bench-n2"} <= set(chain)
    rows = wait_for_chain(run_dir, timeout=600)
    assert all(row["state"] == "COMPLETED" for row in rows.values()), rows
    report = chla("report", "scaling", str(run_dir), check=True)
    assert "share a host" in report.stdout
    data = json.loads((run_dir / "reports" / "scaling.json").read_text())
    points = data["sweeps"]["bench"]["points"]
    assert [p["nodes"] for p in points] == [1, 2]
    assert [p["devices"] for p in points] == [1, 2]
    assert points[1]["global_batch"] == 2 * points[0]["global_batch"]  # weak scaling
    assert points[0]["speedup"] == 1.0 and points[1]["ideal_speedup"] == 2.0
    for point in points:
        assert point["median_step_s"] > 0 and point["tokens_per_s"] > 0
        assert point["efficiency"] == pytest.approx(point["speedup"] / point["ideal_speedup"])
    assert len(set(points[1]["hosts"])) == 1  # node1 and node2 are one machine here
    plot = run_dir / "reports" / "scaling-bench.png"
    assert plot.stat().st_size > 10_000
    assert "| nodes |" in (run_dir / "reports" / "scaling.md").read_text()
