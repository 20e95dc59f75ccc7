"""Array stages of the real kinds on the real local Slurm cluster give what one local task gives:
pre-tokenization (4 tasks vs 1) and batch evaluation (4 shards vs 1)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from ..helpers import chla, status_json, wait_for_chain

pytestmark = pytest.mark.slurm


def run_chain(tmp_path: Path, name: str, recipe: str, executor: str) -> Path:
    work = tmp_path / executor
    work.mkdir()
    (work / "r.yaml").write_text(textwrap.dedent(recipe))
    chla("submit", "r.yaml", "--executor", executor, cwd=work, check=True)
    run_dir = work / "runs" / name
    rows = wait_for_chain(run_dir, timeout=300) if executor == "slurm" else status_json(run_dir)
    assert all(row["state"] == "COMPLETED" for row in rows.values()), rows
    return run_dir


def test_pretokenize_4_tasks_on_slurm_equals_1_task_locally(tmp_path, slurm_cluster, demo_assets):
    import numpy as np

    from chla_tools.blocks import TokenCorpus

    def recipe(shards: int, cache: Path) -> str:
        return f"""\
            name: tok
            resources: {{cpus_per_task: 1, mem: 2G}}
            stages:
              tok:
                kind: pretokenize
                array: {shards}
                params:
                  tokenizer: {demo_assets["base_tokenizer"]}
                  inputs: [{demo_assets["zh_heldout"]}, {demo_assets["en_heldout"]}, {demo_assets["en_text"]}]
                  cache_dir: {cache}
                  piece_mb: 0.05
                  workers: 1
            """

    # Separate caches, so both runs really tokenize.
    slurm_run = run_chain(tmp_path, "tok", recipe(4, tmp_path / "cache-slurm"), "slurm")
    local_run = run_chain(tmp_path, "tok", recipe(1, tmp_path / "cache-local"), "local")
    chain = json.loads((slurm_run / "chain.json").read_text())["stages"]["tok"]
    assert chain["finalize_job_id"] and len(chain["job_ids"]) == 1
    task_states = [json.loads((slurm_run / "tok" / "tasks" / f"{i}.json").read_text()) for i in range(4)]
    assert len({state["job_id"] for state in task_states}) == 4  # four array tasks, four allocations
    sharded = TokenCorpus(slurm_run / "tok" / "out")
    single = TokenCorpus(local_run / "tok" / "out")
    assert sharded.num_tokens == single.num_tokens > 100_000
    assert np.array_equal(
        np.asarray(sharded.tokens(0, sharded.num_tokens)), np.asarray(single.tokens(0, single.num_tokens))
    )


def test_evaluate_4_shards_on_slurm_equals_1_shard_locally(tmp_path, slurm_cluster, demo_assets):
    from ..eval.conftest import make_base

    model = make_base(tmp_path / "model", demo_assets["base_tokenizer"], seed=3)
    records = json.loads(Path(demo_assets["sentiment_test"]).read_text(encoding="utf-8"))[:12]
    (tmp_path / "task.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    heldout = Path(demo_assets["zh_heldout"]).read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "heldout.txt").write_text("\n".join(heldout) + "\n", encoding="utf-8")

    def recipe(shards: int) -> str:
        return f"""\
            name: ev
            resources: {{cpus_per_task: 1, mem: 3G}}
            stages:
              ev:
                kind: evaluate
                array: {shards}
                params:
                  model: {model}
                  ppl: [{tmp_path / "heldout.txt"}]
                  tasks: [{tmp_path / "task.json"}]
                  prompts: [{demo_assets["prompts"]}]
                  max_new_tokens: 6
                  batch_size: 4
                  block_size: 128
            """

    slurm_run = run_chain(tmp_path, "ev", recipe(4), "slurm")
    local_run = run_chain(tmp_path, "ev", recipe(1), "local")
    sharded = json.loads((slurm_run / "ev" / "out" / "results.json").read_text())
    single = json.loads((local_run / "ev" / "out" / "results.json").read_text())
    assert sharded["num_shards"] == 4 and single["num_shards"] == 1
    for name, ppl in single["perplexity"].items():
        other = sharded["perplexity"][name]
        assert (other["tokens"], other["characters"]) == (ppl["tokens"], ppl["characters"])
        assert other["ppl_per_char"] == pytest.approx(ppl["ppl_per_char"], rel=1e-6)
    for name, task in single["tasks"].items():
        assert sharded["tasks"][name]["correct"] == task["correct"]
        assert sharded["tasks"][name]["majority_baseline"] == task["majority_baseline"]
    for name in single["prompts"]:
        path = "ev/out/" + single["prompts"][name]["generations"]
        assert (slurm_run / path).read_text() == (local_run / path).read_text()
