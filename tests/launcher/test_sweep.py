"""Node-scaling sweeps: one stage per node count, frozen as one stage, strong-scaling arithmetic."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from chla_launcher.contract.errors import RecipeError
from chla_launcher.contract.recipe import dump_frozen, load_frozen, load_recipe

from .conftest import chla, status_json

PY = sys.executable


def recipe(tmp_path: Path, sweep: str, extra: str = "") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: sw
        stages:
          prep:
            kind: command
            params: {{argv: [echo, hi]}}
          bench:
            kind: command
            sweep: {sweep}
            params:
              argv: [{PY}, -c, "import os; open(os.environ['CHLA_OUT_DIR'] + '/w' + os.environ['RANK'], 'w').write(os.environ['WORLD_SIZE'] + ' ${{stages.prep.out}}')"]
        """)
        + extra
    )
    return path


@pytest.mark.slow  # runs a chain
def test_sweep_expands_runs_and_freezes_as_one_stage(tmp_path):
    path = recipe(tmp_path, "{nodes: [2, 1]}")
    resolved = load_recipe(path, cwd=tmp_path)
    assert list(resolved.stages) == ["prep", "bench-n1", "bench-n2"]
    assert [resolved.stages[n].resources.nodes for n in ("bench-n1", "bench-n2")] == [1, 2]
    assert resolved.stages["bench-n2"].after == ["prep"]
    chla("submit", "r.yaml", cwd=tmp_path, check=True)
    run_dir = tmp_path / "runs" / "sw"
    assert (run_dir / "recipe.yaml").read_text().count("bench") == 1  # frozen as the recipe said it
    again = load_frozen(run_dir)
    assert list(again.stages) == list(resolved.stages)
    assert dump_frozen(again) == dump_frozen(load_frozen(run_dir))
    rows = status_json(run_dir)
    assert {n: r["state"] for n, r in rows.items()} == dict.fromkeys(["prep", "bench-n1", "bench-n2"], "COMPLETED")
    assert (run_dir / "bench-n2" / "out" / "w1").read_text().startswith("2 ")
    assert (run_dir / "bench-n1" / "out" / "w0").read_text().startswith("1 ")


def test_nothing_may_depend_on_a_sweep(tmp_path):
    path = recipe(
        tmp_path,
        "{nodes: [1, 2]}",
        '  report:\n    kind: command\n    params: {argv: [cat, "${stages.bench.out}/w0"]}\n',
    )
    with pytest.raises(RecipeError, match="r.yaml:.*stages.report.*node-scaling sweep"):
        load_recipe(path, cwd=tmp_path)


def test_sweep_of_a_single_process_kind_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\nstages:\n  a:\n    kind: train_spm\n    sweep: {nodes: [1, 2]}\n"
        "    params: {input: [/etc/hostname], vocab_size: 100}\n"
    )
    with pytest.raises(RecipeError):
        load_recipe(path, cwd=tmp_path)


def test_bad_node_lists(tmp_path):
    for bad in ("{nodes: []}", "{nodes: [0, 1]}", "{nodes: [2, 2]}", "{nodes: [1], scaling: sideways}"):
        with pytest.raises(RecipeError, match="stages.bench.sweep"):
            load_recipe(recipe(tmp_path, bad), cwd=tmp_path)
