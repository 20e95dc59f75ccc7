"""Tokenizer folders that transformers 4 can load too (chla_tools.hf_tokenizer): what transformers 5's
save_pretrained writes (`TokenizersBackend`, no special_tokens_map.json, no added_tokens_decoder)
is rewritten in place; what loads in both already is left alone. Loading the demo's folders with
transformers 4.57 itself is in tests/integration/test_demo_artifacts.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from chla_tools.hf_tokenizer import PORTABLE_CLASS, make_portable, save_tokenizer

TEXT = ["白日依山尽，黄河入海流。", " two  spaces", "[PAD]"]


def test_a_tokenizer_saved_by_transformers_5_is_made_portable(demo_assets, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_assets["base_tokenizer"])
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # an HF-added token past tokenizer.model
    saved = save_tokenizer(tokenizer, tmp_path / "saved")

    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == PORTABLE_CLASS and "backend" not in config
    assert config["added_tokens_decoder"] == {
        "32000": {
            "content": "[PAD]",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    }
    assert json.loads((saved / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "[PAD]",
    }
    assert (saved / "tokenizer.model").read_bytes() == (
        Path(demo_assets["base_tokenizer"]) / "tokenizer.model"
    ).read_bytes()
    reloaded = AutoTokenizer.from_pretrained(saved)
    assert len(reloaded) == len(tokenizer) == 32001 and reloaded.pad_token_id == 32000
    assert reloaded(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert make_portable(saved) is False  # idempotent


def test_a_portable_folder_is_left_alone(demo_assets, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(demo_assets["base_tokenizer"], folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert make_portable(folder) is False
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
