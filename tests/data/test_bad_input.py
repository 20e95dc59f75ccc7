"""Bad input: one clear line and exit status 2 where the run cannot go on, counts in the
manifest where it can."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chla_launcher.contract.errors import ChlaError
from chla_tools import pretokenize as pt
from chla_tools.sft_data import load_sft_dataset


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chla_launcher", "pretokenize", *args], capture_output=True, text=True, timeout=120
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chla: "), result.stderr  # no traceback
    return lines[0]


def run(tmp_path: Path, demo_assets, inputs: list[Path], **options) -> dict:
    pt.pretokenize(
        [str(p) for p in inputs],
        demo_assets["base_tokenizer"],
        tmp_path / "out",
        workers=1,
        options=pt.PretokenizeOptions(**options),
        cache_dir=tmp_path / "cache",
        log=lambda m: None,
    )
    return json.loads((tmp_path / "out" / "manifest.json").read_text())


@pytest.mark.slow
def test_glob_matching_nothing_is_one_line_exit_2(tmp_path, demo_assets):
    line = one_error_line(
        cli(
            "--tokenizer",
            demo_assets["base_tokenizer"],
            "--input",
            str(tmp_path / "*.txt"),
            "--out",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
        )
    )
    assert "matches no file" in line and str(tmp_path / "*.txt") in line


@pytest.mark.slow
def test_empty_files_are_counted_but_only_empty_input_fails(tmp_path, zh_lines, demo_assets):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    good = tmp_path / "good.txt"
    good.write_text("\n".join(zh_lines[:20]) + "\n", encoding="utf-8")
    manifest = run(tmp_path, demo_assets, [empty, good])
    assert manifest["totals"]["empty_files"] == 1 and manifest["totals"]["documents"] == 20
    assert manifest["sources"][0]["size"] == 0 and manifest["sources"][0]["tokens"] == 0

    line = one_error_line(
        cli(
            "--tokenizer",
            demo_assets["base_tokenizer"],
            "--input",
            str(empty),
            "--out",
            str(tmp_path / "out2"),
            "--cache-dir",
            str(tmp_path / "cache"),
        )
    )
    assert "hold no text" in line


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, zh_lines, demo_assets):
    path = tmp_path / "mixed.txt"
    path.write_bytes("\n".join(zh_lines[:5]).encode() + b"\nbad \xff\xfe bytes\n" + zh_lines[5].encode() + b"\n")
    manifest = run(tmp_path, demo_assets, [path])
    assert manifest["totals"]["bad"]["invalid_utf8_documents"] == 1
    assert manifest["totals"]["documents"] == 7
    assert "invalid_utf8_documents" in manifest["sources"][0]["bad_where"]


def test_wrong_json_records_are_counted(tmp_path, zh_lines, demo_assets):
    path = tmp_path / "docs.jsonl"
    good = [json.dumps({"text": line}, ensure_ascii=False) for line in zh_lines[:10]]
    bad = ['{"text": 5}', '{"body": "没有 text 键"}', "[1, 2]", "{not json", '{"text": ""}']
    path.write_text("\n".join(good[:5] + bad + good[5:]) + "\n", encoding="utf-8")
    manifest = run(tmp_path, demo_assets, [path])
    counts = manifest["totals"]["bad"]
    assert (
        counts["non_string_text"],
        counts["missing_text_key"],
        counts["not_an_object"],
        counts["invalid_json"],
        counts["empty_documents"],
    ) == (1, 1, 1, 1, 1)
    assert manifest["totals"]["documents"] == 10


@pytest.mark.slow
def test_missing_text_key_everywhere_is_an_error(tmp_path, zh_lines, demo_assets):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"content": line}, ensure_ascii=False) + "\n" for line in zh_lines[:5]), encoding="utf-8"
    )
    line = one_error_line(
        cli(
            "--tokenizer",
            demo_assets["base_tokenizer"],
            "--input",
            str(path),
            "--out",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
        )
    )
    assert str(path) in line and "text_key" in line and "'content'" in line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_json_of_the_wrong_shape_and_unknown_suffix_are_errors(tmp_path, demo_assets):
    path = tmp_path / "docs.json"
    path.write_text('{"text": "一个对象，不是列表"}', encoding="utf-8")
    with pytest.raises(ChlaError, match=r"docs.json: top level is a JSON dict, expected a list"):
        run(tmp_path, demo_assets, [path])
    other = tmp_path / "docs.csv"
    other.write_text("a,b\n")
    with pytest.raises(ChlaError, match=r"docs.csv: unknown input type '.csv'"):
        run(tmp_path, demo_assets, [other])
    with pytest.raises(ChlaError, match="is not a directory"):
        pt.pretokenize(
            [str(other)], tmp_path / "no-tokenizer", tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None
        )


def test_bad_sft_records_name_file_and_index_or_are_skipped(tmp_path, demo_assets):
    records = [
        {"instruction": "判断情感", "input": "很好", "output": "正面"},
        {"instruction": "判断情感", "input": "", "output": "负面"},
        {"instruction": "判断情感", "input": "一般"},
        {"instruction": "判断情感", "input": "不错", "output": 1},
    ]
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ChlaError, match=r"sft.json: record 2: missing key 'output'.*on_bad_record: skip"):
        load_sft_dataset(path, demo_assets["base_tokenizer"], cache_dir=tmp_path / "cache")
    dataset = load_sft_dataset(path, demo_assets["base_tokenizer"], on_bad_record="skip", cache_dir=tmp_path / "cache")
    assert len(dataset) == 2 and dataset.stats["skipped"] == 2 and dataset.stats["records"] == 4
    path.write_text(json.dumps(records[:2] + [records[3]], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ChlaError, match=r"record 2: 'output' is a int, expected a string"):
        load_sft_dataset(path, demo_assets["base_tokenizer"], cache_dir=tmp_path / "cache")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ChlaError, match="empty.jsonl: file is empty"):
        load_sft_dataset(tmp_path / "empty.jsonl", demo_assets["base_tokenizer"], cache_dir=tmp_path / "cache")
