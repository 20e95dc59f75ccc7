"""The instruction tasks built into the demo assets: the People's Daily reader (/nr joining,
sentences), the split rules (no test or valid example in zh_train or in any SFT training
example; zh_heldout apart), the record formats and the sizes the manifest states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chla_tools.peoples_daily import entities, parse_paragraph, people_in_run, split_sentences, text_of
from chla_tools.task_data import paragraph_part
from chla_tools.tasks import TASKS, Entities

TASK_NAMES = ("sentiment", "segmentation", "entities", "continuation")


def test_adjacent_person_words_are_joined_into_people():
    words = parse_paragraph("中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr  在/p  北京/ns")
    assert entities(words) == [("机构名", "中共中央"), ("人名", "江泽民"), ("地名", "北京")]
    # runs of several people with nothing between them (lists of leaders, photo credits)
    assert people_in_run(["李", "鹏", "乔", "石", "朱", "镕基"]) == ["李鹏", "乔石", "朱镕基"]
    assert people_in_run(["岳", "世华", "尚", "正海", "阿平"]) == ["岳世华", "尚正海", "阿平"]
    assert people_in_run(["陈", "方", "安生"]) == ["陈方安生"]  # a double surname
    assert people_in_run(["奥尔布赖特", "克林顿"]) == ["奥尔布赖特", "克林顿"]  # whole foreign names
    assert people_in_run(["老赵"]) == ["老赵"]
    # control: a plain join of the run would make one person of two
    assert people_in_run(["江", "泽民", "李", "鹏"]) != ["江泽民李鹏"]


def test_paragraph_tokens_and_sentences():
    # single and triple spaces occur between tokens in this copy of the corpus
    words = parse_paragraph("他/r 说/v  ：/w  “/w  好/a  。/w  ”/w   然后/c  走/v  了/y  。/w  （/w  完/v  ）/w")
    assert [text_of(s) for s in split_sentences(words)] == ["他说：“好。”", "然后走了。", "（完）"]
    with pytest.raises(ValueError, match="token '好' is not word/tag"):
        parse_paragraph("好  的/u", "199801.txt:3")


def test_split_rule_by_paragraph_index():
    parts = [paragraph_part(i) for i in range(80)]
    assert [i for i, part in enumerate(parts) if part == "heldout"] == [19, 39, 59, 79]
    assert [i for i, part in enumerate(parts) if part == "test"] == [18, 58]
    assert [i for i, part in enumerate(parts) if part == "valid"] == [38, 78]
    assert parts.count("train") == 72


@pytest.fixture(scope="module")
def task_files(demo_assets) -> dict[str, dict[str, list[dict]]]:
    return {
        task: {
            part: json.loads(Path(demo_assets[f"{task}_{part}"]).read_text(encoding="utf-8"))
            for part in ("train", "valid", "test")
        }
        for task in TASK_NAMES
    }


@pytest.fixture(scope="module")
def manifest(demo_assets) -> dict:
    return json.loads((Path(demo_assets["zh_train"]).parent / "manifest.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_held_out_examples_are_never_trained_on(demo_assets, task_files):
    zh_train = Path(demo_assets["zh_train"]).read_text(encoding="utf-8")
    zh_heldout = Path(demo_assets["zh_heldout"]).read_text(encoding="utf-8").splitlines()
    sft_train = json.loads(Path(demo_assets["sft_train"]).read_text(encoding="utf-8"))
    trained = "\n".join(
        {r["input"] for r in sft_train}
        | {r["input"] for parts in task_files.values() for r in parts["train"]}
        | {r["output"] for r in task_files["continuation"]["train"]}
    )
    tagging_test = {r["input"] for r in task_files["segmentation"]["test"]}
    tagging_valid = {r["input"] for r in task_files["segmentation"]["valid"]}
    assert tagging_test == {r["input"] for r in task_files["entities"]["test"]}
    assert not tagging_test & tagging_valid
    for sentence in tagging_test | tagging_valid:
        assert sentence not in zh_train and sentence not in trained, sentence
    for part in ("valid", "test"):
        for record in task_files["continuation"][part]:
            assert record["output"] not in zh_train and record["output"] not in trained, record["output"]
    # the control: training examples do come from zh_train
    assert all(r["input"] in zh_train for r in task_files["segmentation"]["train"][:200])
    # no perplexity paragraph is a pretraining paragraph, nor inside an SFT example (only the
    # short ones could fit in a sentence or a passage)
    assert not set(zh_train.splitlines()) & set(zh_heldout)
    short = [line for line in zh_heldout if 20 <= len(line) <= 100]
    assert len(short) > 100 and not [line for line in short if line in trained]


def test_records_are_alpaca_with_a_task_and_parse_back(task_files, demo_assets):
    for task, parts in task_files.items():
        for part, records in parts.items():
            assert records, (task, part)
            for record in records[:300]:
                assert set(record) == {"task", "instruction", "input", "output"}
                assert record["task"] == task and record["instruction"] == TASKS[task].instruction
                assert record["input"] and record["output"]
    for record in task_files["segmentation"]["test"]:
        words = record["output"].split(" ")
        assert "".join(words) == record["input"] and all(words)
    for record in task_files["entities"]["test"]:
        assert record["output"].startswith("人名：") and record["output"].count("；") == 2
        assert all(name in record["input"] for _, name in Entities.parse(record["output"]))
    people = {
        name for r in task_files["entities"]["train"] for kind, name in Entities.parse(r["output"]) if kind == "人名"
    }
    assert "江泽民" in people and "泽民" not in people and "江泽民李鹏" not in people
    assert all(5 <= len(r["input"]) <= 60 for r in task_files["segmentation"]["test"])
    assert all(len(r["output"]) <= 60 and len(r["input"]) <= 100 for r in task_files["continuation"]["test"])
    sft_train = json.loads(Path(demo_assets["sft_train"]).read_text(encoding="utf-8"))
    assert {r["task"] for r in sft_train} == set(TASK_NAMES)


def test_manifest_states_the_rules_and_every_size(manifest, task_files, demo_assets):
    assert "i % 40 == 18" in manifest["split_rules"] and "i % 20 == 19" in manifest["split_rules"]
    counts = manifest["counts"]
    for task, parts in task_files.items():
        for part, records in parts.items():
            assert counts["tasks"][task][part] == len(records), (task, part)
    zh_heldout = Path(demo_assets["zh_heldout"]).read_text(encoding="utf-8").splitlines()
    assert counts["zh_heldout"]["lines"] == len(zh_heldout)
    sft_train = json.loads(Path(demo_assets["sft_train"]).read_text(encoding="utf-8"))
    assert counts["sft_train"]["records"] == len(sft_train) == 4 * counts["sft_train"]["per_task"]
    assert counts["task_paragraphs"]["peoples_daily"]["test"] > 400
