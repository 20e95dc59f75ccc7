"""The summary's per-task table and the general prompts' answers, from evaluate results whose task
figures come from the evaluator's own aggregation (chla_tools.evaluate.task_results)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.summarize import SummarizeParams
from chla_tools.evaluate import task_results
from chla_tools.tasks import TASKS
from chla_train.stages import summarize


def write_results(directory: Path, tasks: dict = None, prompts: list[tuple[str, str]] = ()) -> str:
    results = {
        "model": "m",
        "adapters": [],
        "num_shards": 1,
        "block_size": 256,
        "perplexity": {},
        "tasks": tasks or {},
        "prompts": {},
    }
    if prompts:
        (directory / "generations").mkdir(parents=True)
        (directory / "generations" / "prompts-p.jsonl").write_text(
            "".join(
                json.dumps({"index": i, "generation": g, "prompt": p}, ensure_ascii=False) + "\n"
                for i, (p, g) in enumerate(prompts)
            ),
            encoding="utf-8",
        )
        results["prompts"]["prompts-p"] = {
            "path": "p.jsonl",
            "items": len(prompts),
            "generations": "generations/prompts-p.jsonl",
        }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")
    return str(directory)


def task_entry(name: str, counts: dict, labels: Counter | None = None) -> dict:
    items = counts["model"].get("items") or 100
    return {
        "path": f"{name}.json",
        "items": items,
        **task_results(TASKS[name], counts, labels or Counter()),
        "counts": counts,
        "predictions": f"generations/task-{name}.jsonl",
    }


def run_summary(tmp_path: Path, **params) -> dict:
    out = tmp_path / "summary" / "out"
    out.mkdir(parents=True)
    ctx = SimpleNamespace(
        params=SummarizeParams(**params),
        run_dir=tmp_path,
        out_dir=out,
        stage="summary",
        stage_out=lambda stage: tmp_path / stage / "out",
    )
    summarize.run(ctx)
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_per_task_table_and_prompt_answers(tmp_path, capsys):
    segmentation = {
        system: {"gold": 100, "predicted": predicted, "correct": correct}
        for system, predicted, correct in (("model", 90, 72), ("every_character", 160, 40), ("jieba", 105, 85))
    }
    entity_counts = {
        "gold": 10,
        "predicted": 8,
        "correct": 6,
        **{
            f"{kind}.{key}": value
            for kind in ("人名", "地名", "机构名")
            for key, value in (("gold", 3), ("predicted", 2), ("correct", 2))
        },
    }
    entities = {
        "model": entity_counts,
        "no_entities": {**entity_counts, "predicted": 0, "correct": 0},
        "jieba": entity_counts,
    }
    sentiment = {"model": {"items": 200, "correct": 170}, "model_loglik": {"items": 200, "correct": 176}}
    tasks = {
        "task-sentiment_test": task_entry("sentiment", sentiment, Counter({"负面": 104, "正面": 96})),
        "task-segmentation_test": task_entry("segmentation", segmentation),
        "task-entities_test": task_entry("entities", entities),
    }
    task_dir = write_results(tmp_path / "eval_task" / "out", tasks)
    sft_dir = write_results(
        tmp_path / "eval_sft" / "out", prompts=[("写一首关于春天的五言绝句。", "春风吹\n绿柳|花开"), ("你好", "")]
    )
    result = run_summary(tmp_path, evaluations={"after_sft": sft_dir}, task_results=task_dir)

    assert result["sft_accuracy"] == 0.85 and result["majority_baseline"] == 0.52 and result["task_items"] == 200
    rows = result["tasks"]
    assert rows["task-segmentation_test"]["score"] == pytest.approx(2 * 0.8 * 0.72 / 1.52)  # P 72/90, R 72/100
    assert rows["task-segmentation_test"]["systems"]["every_character"]["f1"] == pytest.approx(2 * 0.25 * 0.4 / 0.65)
    assert rows["task-entities_test"]["systems"]["no_entities"]["f1"] == 0.0
    assert rows["task-sentiment_test"]["systems"]["model_loglik"]["accuracy"] == 0.88
    assert result["prompt_generations"]["after_sft"][0] == {
        "prompt": "写一首关于春天的五言绝句。",
        "generation": "春风吹\n绿柳|花开",
        "cjk_share": 1.0,
    }

    markdown = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert markdown == (tmp_path / "summary" / "out" / "summary.md").read_text(encoding="utf-8")
    assert (
        "| task-segmentation_test (100) | word F1 | 0.758 (greedy generation) | every character a word 0.308 "
        "| jieba (dictionary segmenter) 0.829 |"
    ) in markdown
    assert (
        "| task-sentiment_test (200) | accuracy | 0.850 (greedy generation); 0.880 (log-likelihood ranking "
        "of the choices) | majority output (负面) 0.520 | - |"
    ) in markdown
    assert "| task-entities_test (100) | entity F1 | 0.667 (greedy generation) | no entities 0.000 |" in markdown
    # one table row per prompt, whatever the answer holds
    assert "| 写一首关于春天的五言绝句。 | 春风吹 绿柳\\|花开 | 1.00 |" in markdown
    assert "| 你好 |   | 0.00 |" in markdown
    assert "写一首关于春天的五言绝句。" in capsys.readouterr().out


def test_a_missing_headline_task_is_one_clear_error(tmp_path):
    task_dir = write_results(
        tmp_path / "eval_task" / "out",
        {
            "task-segmentation_test": task_entry(
                "segmentation",
                {system: {"gold": 1, "predicted": 1, "correct": 1} for system in ("model", "every_character", "jieba")},
            )
        },
    )
    with pytest.raises(ChlaError, match="has no task 'task-sentiment_test'"):
        run_summary(tmp_path, task_results=task_dir)
    # without a headline task the table still comes out
    assert (
        run_summary(tmp_path / "again", task_results=task_dir, task=None)["tasks"]["task-segmentation_test"]["score"]
        == 1.0
    )
