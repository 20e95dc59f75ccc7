"""Scores on a sample of a test set: the seeded sample and the 95% bootstrap intervals printed
beside each score."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from chla_launcher.contract.kinds.evaluate import EvaluateParams
from chla_tools.evaluate import Source, sampled
from chla_tools.intervals import bootstrap_interval
from chla_tools.summary import _tasks_table, cjk_share
from chla_tools.tasks import task_named


def wilson(correct: int, items: int, z: float = 1.96) -> tuple[float, float]:
    p = correct / items
    centre = (p + z * z / (2 * items)) / (1 + z * z / items)
    half = z * math.sqrt(p * (1 - p) / items + z * z / (4 * items * items)) / (1 + z * z / items)
    return centre - half, centre + half


def accuracy_items(correct: int, items: int) -> list[dict[str, float]]:
    return [{"items": 1, "correct": int(i < correct)} for i in range(items)]


def test_an_accuracys_interval_is_wilsons_and_narrows_with_the_sample():
    sentiment = task_named("sentiment")
    metric = lambda counts: sentiment.metrics(counts)["accuracy"]  # noqa: E731
    low, high = bootstrap_interval(accuracy_items(160, 200), metric)
    expected = wilson(160, 200)
    assert low < 0.8 < high
    assert abs(low - expected[0]) < 0.015 and abs(high - expected[1]) < 0.015
    # control: a quarter of the sample, twice as wide
    small = bootstrap_interval(accuracy_items(40, 50), metric)
    assert small[1] - small[0] > 1.6 * (high - low)
    assert bootstrap_interval(accuracy_items(160, 200), metric) == (low, high)  # seeded


def test_a_micro_f1_interval_sums_the_resampled_counts():
    entities = task_named("entities")
    gold = {"output": "人名：江泽民、李鹏；地名：北京；机构名：无"}
    # 30 sentences answered right, 10 with one wrong name of the three
    one_wrong = "人名：李鹏；地名：上海；机构名：无"
    items = [entities.score(gold, gold["output"])] * 30 + [entities.score(gold, one_wrong)] * 10
    low, high = bootstrap_interval(items, lambda counts: entities.metrics(counts)["f1"])
    point = entities.metrics({key: sum(item[key] for item in items) for key in items[0]})["f1"]
    assert low < point < high < 1.0


def test_a_task_files_sample_is_seeded_and_in_file_order(tmp_path):
    source = Source("task", Path("sentiment_test.json"), "task-sentiment_test")
    records = [{"n": n} for n in range(100)]

    def params(**sample) -> EvaluateParams:
        return EvaluateParams(model="m", tasks=["t.json"], **sample)

    first = sampled(records, source, params(sample=20))
    assert len(first) == 20 and first == sorted(first, key=lambda r: r["n"])
    assert sampled(records, source, params(sample=20)) == first
    assert sampled(records, source, params(sample=20, sample_seed=1)) != first  # control: another seed
    assert sampled(records, source, params(sample=500)) == records
    assert sampled(records, source, params()) == records
    # perplexity text is never sampled (its figure is a sum over all of it)
    assert sampled(records, Source("ppl", Path("zh.txt"), "ppl-zh"), params(sample=20)) == records


def test_the_summary_prints_the_sample_size_and_the_interval():
    row = {
        "items": 200,
        "sampled_from": 1737,
        "metric": "accuracy",
        "metric_label": "accuracy",
        "systems": {
            "model": {"role": "model", "label": "greedy generation", "accuracy": 0.85, "interval_95": [0.8, 0.9]},
            "majority": {"role": "baseline", "label": "majority output (消极)", "accuracy": 0.52},
        },
    }
    table = "\n".join(_tasks_table({"task-sentiment_test": row}))
    assert "task-sentiment_test (200 of 1737)" in table
    assert "0.850 [0.800, 0.900] (greedy generation)" in table


@pytest.mark.parametrize(
    ("answer", "share"),
    [("长城是中国古代的军事防御工程。", 1.0), ("The Great Wall 长城", 2 / 14), ("2024，。", 0.0)],
)
def test_cjk_share_counts_letters_and_ideographs_only(answer, share):
    assert cjk_share(answer) == pytest.approx(share)
