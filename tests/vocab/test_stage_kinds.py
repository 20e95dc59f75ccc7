"""The three vocabulary stage kinds: registered, typed, torch-free, and their runners work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest

from chla_launcher.contract.kinds import get_kind, import_entry, input_path_fields


def test_kinds_are_registered_with_input_paths():
    train, merge, report = (get_kind(n) for n in ("train_spm", "merge_tokenizer", "vocab_report"))
    assert train and merge and report
    assert set(input_path_fields(train.params)) == {"inputs"}
    assert set(input_path_fields(merge.params)) == {"base", "add"}
    assert not train.needs_training_stack and not merge.needs_training_stack
    for kind in (train, merge, report):
        assert callable(import_entry(kind.entry))
    with pytest.raises(pydantic.ValidationError):
        train.params(inputs=["a.txt"], vocab_size=20000, vocab=1)  # unknown key
    with pytest.raises(pydantic.ValidationError):
        train.params(inputs=["a.txt"], model_type="wordpiece")
    assert train.params(inputs=["a.txt"]).vocab_size == 20000


def test_kind_modules_import_no_heavy_packages():
    code = (
        "import sys, chla_launcher.contract.kinds as k; k.registry(); "
        "bad = [m for m in ('torch', 'transformers', 'sentencepiece', 'numpy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _ctx(kind: str, out_dir: Path, **params) -> SimpleNamespace:
    messages: list[str] = []
    return SimpleNamespace(
        params=get_kind(kind).params(**params), out_dir=out_dir, log=messages.append, messages=messages
    )


def test_runners_write_into_out_dir(tmp_path, demo_assets, zh_spm):
    from chla_train.stages import merge_tokenizer, train_spm, vocab_report

    ctx = _ctx("train_spm", tmp_path / "train", inputs=[demo_assets["zh_heldout"]], vocab_size=4000, threads=1)
    assert train_spm.run(ctx)["vocab_size"] == 4000
    assert (tmp_path / "train" / "spm.model").is_file()

    ctx = _ctx(
        "merge_tokenizer", tmp_path / "merge", base=demo_assets["base_tokenizer"], add=str(zh_spm), pad_token=True
    )
    metrics = merge_tokenizer.run(ctx)
    assert metrics["final_size"] == metrics["merged_size"] + 1
    assert any("32000 + " in m for m in ctx.messages)
    assert (tmp_path / "merge" / "tokenizer" / "tokenizer.json").is_file()

    ctx = _ctx(
        "vocab_report",
        tmp_path / "report",
        tokenizers={"base": demo_assets["base_tokenizer"], "zh": str(tmp_path / "merge")},
        corpora={"zh": demo_assets["zh_heldout"]},
    )
    metrics = vocab_report.run(ctx)
    assert metrics["zh/zh/tokens_per_char"] < 0.65 * metrics["base/zh/tokens_per_char"]
    assert (tmp_path / "report" / "report.png").is_file()
