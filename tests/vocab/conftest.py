"""Session fixtures for the vocabulary tests: one 20k Chinese model trained on the real demo text,
merged into the real base tokenizer (with and without [PAD]) through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from chla_launcher.cli import main as chla_main


def run_chla(capsys, *args: str) -> tuple[int, str, str]:
    """Run `chla ARGS` in this process; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = chla_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vocab")


@pytest.fixture(scope="session")
def zh_spm(demo_assets, vocab_dir) -> Path:
    """The 20k-piece Chinese BPE model trained on zh_train (a few seconds)."""
    from chla_launcher.kinds.train_spm import TrainSpmParams
    from chla_tools.vocab import train_spm

    out = vocab_dir / "zh20k"
    train_spm(TrainSpmParams(inputs=[demo_assets["zh_train"]], vocab_size=20000), out, log=lambda m: None)
    return out / "spm.model"


@pytest.fixture(scope="session")
def merged(demo_assets, zh_spm, vocab_dir) -> dict:
    from chla_launcher.kinds.merge_tokenizer import MergeTokenizerParams
    from chla_tools.vocab import merge_tokenizers

    out = vocab_dir / "merged"
    params = MergeTokenizerParams(base=demo_assets["base_tokenizer"], add=str(zh_spm))
    summary = merge_tokenizers(params, out, log=lambda m: None)
    return {"dir": out, **summary}


@pytest.fixture(scope="session")
def merged_pad(demo_assets, zh_spm, vocab_dir) -> dict:
    from chla_launcher.kinds.merge_tokenizer import MergeTokenizerParams
    from chla_tools.vocab import merge_tokenizers

    out = vocab_dir / "merged_pad"
    params = MergeTokenizerParams(base=demo_assets["base_tokenizer"], add=str(zh_spm), pad_token=True)
    summary = merge_tokenizers(params, out, log=lambda m: None)
    return {"dir": out, **summary}
