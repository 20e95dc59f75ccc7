"""Fixtures for the training tests: a small real Chinese corpus, a merged tokenizer (base
LLaMA-style tokenizer + a small Chinese SentencePiece model trained here), the corpus
pre-tokenized with it, and small SFT files from the demo sentiment data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def train_assets(demo_assets, tmp_path_factory) -> dict[str, str]:
    from chla_launcher.contract.kinds.merge_tokenizer import MergeTokenizerParams
    from chla_launcher.contract.kinds.train_spm import TrainSpmParams
    from chla_tools.pretokenize import pretokenize
    from chla_tools.vocab import merge_tokenizers, train_spm

    root = tmp_path_factory.mktemp("train_assets")
    lines = Path(demo_assets["zh_train"]).read_text(encoding="utf-8").splitlines()
    zh_small = root / "zh_small.txt"
    zh_small.write_text("\n".join(lines[:600]) + "\n", encoding="utf-8")
    quiet = lambda *_: None  # noqa: E731
    train_spm(TrainSpmParams(inputs=[str(zh_small)], vocab_size=2400), root / "spm", log=quiet)
    added = str(root / "spm" / "spm.model")
    merge_tokenizers(MergeTokenizerParams(base=demo_assets["base_tokenizer"], add=added), root / "merged", log=quiet)
    merged = root / "merged" / "tokenizer"
    corpus = root / "corpus"
    pretokenize([str(zh_small)], merged, corpus, cache_dir=root / "cache", log=quiet)
    sft_train, sft_valid = root / "sft_train.json", root / "sft_valid.json"
    sft_train.write_text(
        json.dumps(json.loads(Path(demo_assets["sft_train"]).read_text())[:400], ensure_ascii=False), encoding="utf-8"
    )
    sft_valid.write_text(
        json.dumps(json.loads(Path(demo_assets["sft_valid"]).read_text())[:48], ensure_ascii=False), encoding="utf-8"
    )
    return {
        "base_tokenizer": demo_assets["base_tokenizer"],
        "merged_tokenizer": str(merged),
        "corpus": str(corpus),
        "sft_train": str(sft_train),
        "sft_valid": str(sft_valid),
    }
