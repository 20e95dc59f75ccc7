"""Must show 4: every mistake a user can make is one line on stderr, exit status 2, no traceback
and no output directory (complete or half-written) left behind.

Non-UTF-8 policy: a corpus line that is not valid UTF-8 is an error naming file and line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run_chla


def _assert_one_clear_line(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chla: "), err
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _assert_nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


@pytest.fixture()
def corpora(tmp_path: Path, demo_assets) -> dict[str, Path]:
    heldout = Path(demo_assets["zh_heldout"]).read_text(encoding="utf-8").splitlines()
    files = {
        "empty": tmp_path / "empty.txt",
        "blank": tmp_path / "blank.txt",
        "small": tmp_path / "small.txt",
        "gbk": tmp_path / "gbk.txt",
    }
    files["empty"].write_bytes(b"")
    files["blank"].write_text("\n  \n\n", encoding="utf-8")
    files["small"].write_text("\n".join(heldout[:20]) + "\n", encoding="utf-8")
    # line 3 is GBK-encoded Chinese, as a mis-converted corpus would be
    files["gbk"].write_bytes("第一行\n第二行\n".encode() + "第三行".encode("gbk") + b"\n")
    return files


@pytest.mark.parametrize(
    "corpus, needles",
    [
        ("empty", ["empty.txt", "empty"]),
        ("blank", ["blank.txt", "empty"]),
        ("missing", ["missing.txt", "not found"]),
        ("gbk", ["gbk.txt:3:", "not valid UTF-8", "iconv"]),
        ("small", ["small.txt", "cannot support a 20000-piece vocabulary", "<="]),
    ],
)
def test_train_bad_corpus(capsys, tmp_path, corpora, corpus, needles):
    path = corpora.get(corpus, tmp_path / "missing.txt")
    code, out, err = run_chla(
        capsys, "vocab", "train", "--input", path, "--vocab-size", "20000", "--out", tmp_path / "spm"
    )
    _assert_one_clear_line(code, out, err, *needles)
    _assert_nothing_written(tmp_path, "spm")


def test_non_utf8_in_report_corpus_names_file_and_line(capsys, tmp_path, corpora, demo_assets):
    code, out, err = run_chla(
        capsys,
        "vocab",
        "report",
        "--tokenizer",
        f"base={demo_assets['base_tokenizer']}",
        "--corpus",
        f"bad={corpora['gbk']}",
        "--out",
        tmp_path / "report",
    )
    _assert_one_clear_line(code, out, err, "gbk.txt:3:", "not valid UTF-8")
    _assert_nothing_written(tmp_path, "report")


def _bases(tmp_path: Path) -> dict[str, Path]:
    json_only = tmp_path / "llama3_like"
    json_only.mkdir()
    (json_only / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (json_only / "tokenizer_config.json").write_text("{}")
    tiktoken = tmp_path / "tiktoken"
    tiktoken.mkdir()
    # Llama 3's original/tokenizer.model: base64 token, space, rank
    (tiktoken / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\nJA== 3\nJQ== 4\n")
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    return {"json_only": json_only, "tiktoken": tiktoken, "empty": empty, "missing": tmp_path / "missing_dir"}


@pytest.mark.parametrize(
    "base, needles",
    [
        ("json_only", ["llama3_like", "not a SentencePiece", "tokenizer.json"]),
        ("tiktoken", ["tokenizer.model", "not a SentencePiece model", "tiktoken"]),
        ("empty", ["no_tokenizer", "no tokenizer"]),
        ("missing", ["missing_dir", "not found"]),
    ],
)
def test_merge_bad_base(capsys, tmp_path, zh_spm, base, needles):
    code, out, err = run_chla(
        capsys, "vocab", "merge", "--base", _bases(tmp_path)[base], "--add", zh_spm, "--out", tmp_path / "merged"
    )
    _assert_one_clear_line(code, out, err, *needles)
    _assert_nothing_written(tmp_path, "merged")


def test_merge_bad_add_model(capsys, tmp_path, demo_assets):
    not_a_model = tmp_path / "zh.model"
    not_a_model.write_text("这不是模型\n", encoding="utf-8")
    for add, needle in [(not_a_model, "not a SentencePiece model"), (tmp_path / "nope.model", "not found")]:
        code, out, err = run_chla(
            capsys,
            "vocab",
            "merge",
            "--base",
            demo_assets["base_tokenizer"],
            "--add",
            add,
            "--out",
            tmp_path / "merged",
        )
        _assert_one_clear_line(code, out, err, add.name, needle)
        _assert_nothing_written(tmp_path, "merged")


def test_vocab_size_below_the_characters_needed(capsys, tmp_path, demo_assets):
    code, out, err = run_chla(
        capsys, "vocab", "train", "--input", demo_assets["zh_heldout"], "--vocab-size", "500", "--out", tmp_path / "spm"
    )
    _assert_one_clear_line(code, out, err, "zh_heldout.txt", "500-piece", "--character-coverage")
    _assert_nothing_written(tmp_path, "spm")


def test_no_traceback_in_a_real_process(tmp_path, corpora):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chla_launcher",
            "vocab",
            "train",
            "--input",
            str(corpora["gbk"]),
            "--vocab-size",
            "1000",
            "--out",
            str(tmp_path / "spm"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_clear_line(result.returncode, result.stdout, result.stderr, "gbk.txt:3:")
    _assert_nothing_written(tmp_path, "spm")


def test_existing_output_survives_a_failed_run(capsys, tmp_path, corpora, zh_spm):
    from chla_launcher.contract.atomic import write_text

    out = tmp_path / "spm"
    out.mkdir()
    write_text(out / "spm.model", "previous result")
    code, _, err = run_chla(
        capsys, "vocab", "train", "--input", corpora["small"], "--vocab-size", "20000", "--out", out
    )
    assert code == 2
    assert (out / "spm.model").read_text() == "previous result"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".spm")] == []
