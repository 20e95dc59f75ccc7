"""The demo recipe itself, end to end, shrunk with --set to a few steps per training stage: once
on the local executor and once on the real local Slurm cluster. Every stage of the Slurm run is a
job held by afterok on its parents' jobs, `chla status` shows the whole chain, and both runs write
a summary.json with the required keys and the same figures (same seeds, same thread counts).

The full-size demo (README: about 13 minutes) is not run here; its figures are in the README."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from ..helpers import chla, status_json, wait_for_chain
from .conftest import DEMO, TASK_ITEMS

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REQUIRED = (
    "tokens_per_char_base",
    "tokens_per_char_merged",
    "zh_ppl_per_char",
    "en_ppl_per_char",
    "sft_accuracy",
    "majority_baseline",
    "tasks",
    "prompt_generations",
    "plots",
)
TASKS = ("task-sentiment_test", "task-segmentation_test", "task-entities_test", "task-continuation_test")


def parents_in_recipe(stage: dict) -> set[str]:
    """The stages a stage reads from (${stages.X.out}) or names in `after`."""
    text = json.dumps(stage.get("params", {}))
    return set(re.findall(r"\$\{stages\.(\w+)\.out\}", text)) | set(stage.get("after", []))


def test_demo_chain_on_slurm_matches_the_local_run(demo_slurm_run, demo_local_run):
    recipe = yaml.safe_load(DEMO.read_text())["stages"]
    stages = list(recipe)

    slurm_run = demo_slurm_run
    chain = json.loads((slurm_run / "chain.json").read_text())["stages"]
    assert set(chain) == set(stages)
    for name in stages:
        # every stage is a job; a stage with parents waits on exactly their (final) jobs
        job = chain[name]["job_ids"][0]
        script = (slurm_run / name / "logs" / f"{job}_submission.sh").read_text()
        parents = parents_in_recipe(recipe[name])
        if parents:
            wanted = set()
            for parent in parents:
                final = chain[parent].get("finalize_job_id")
                wanted |= {final} if final else set(chain[parent]["job_ids"])
            deps = script.split("--dependency=")[1].splitlines()[0].strip("'")
            assert deps.startswith("afterok:") and set(deps[len("afterok:") :].split(":")) == wanted, name
        else:
            assert "--dependency" not in script, name
        assert bool(recipe[name].get("array")) == ("--array=" in script), name

    local_run = demo_local_run

    rows = wait_for_chain(slurm_run, timeout=900)
    assert {name: row["state"] for name, row in rows.items()} == dict.fromkeys(stages, "COMPLETED")
    assert all(row["state"] == "COMPLETED" for row in status_json(local_run).values())
    table = chla("status", str(slurm_run), check=True).stdout
    assert all(name in table for name in stages)

    local = json.loads((local_run / "summary.json").read_text())
    on_slurm = json.loads((slurm_run / "summary.json").read_text())
    for summary in (local, on_slurm):
        assert set(REQUIRED) <= set(summary)
        for key in ("zh_ppl_per_char", "en_ppl_per_char"):
            assert set(summary[key]) >= {"base", "after_pt", "after_sft"}
        for plot in summary["plots"].values():
            assert Path(plot).is_file()
    assert on_slurm["tokens_per_char_merged"] == local["tokens_per_char_merged"]
    assert on_slurm["tokens_per_char_base"] == local["tokens_per_char_base"]
    for key in ("zh_ppl_per_char", "en_ppl_per_char"):
        for point in ("base", "after_pt", "after_sft"):
            a, b = local[key][point], on_slurm[key][point]
            assert math.isclose(a, b, rel_tol=0.02), (key, point, a, b)
    assert abs(local["sft_accuracy"] - on_slurm["sft_accuracy"]) <= 0.05
    assert local["task_items"] == on_slurm["task_items"] == TASK_ITEMS
    for summary in (local, on_slurm):
        assert tuple(summary["tasks"]) == TASKS
        assert all(row["items"] == TASK_ITEMS for row in summary["tasks"].values())
        assert summary["tasks"]["task-segmentation_test"]["systems"]["jieba"]["f1"] > 0.6
        assert len(summary["prompt_generations"]["after_sft"]) == 8
    # the baselines do not depend on the model or the executor
    for task in TASKS:
        for system, row in local["tasks"][task]["systems"].items():
            if row["role"] != "model":
                assert row == on_slurm["tasks"][task]["systems"][system], (task, system)
