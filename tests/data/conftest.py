"""Small real corpora cut from the demo assets, and helpers to run the pretokenize stage."""

from __future__ import annotations

import types
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zh_lines(demo_assets) -> list[str]:
    text = Path(demo_assets["zh_train"]).read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line.strip()]


@pytest.fixture(scope="session")
def sp_reference(demo_assets):
    """Encode documents the way the original project's (slow) LlamaTokenizer did: SentencePiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(demo_assets["base_tokenizer"]) / "tokenizer.model"))

    def encode_docs(docs: list[str], eos: int = 2) -> list[int]:
        out: list[int] = []
        for ids in sp.encode(docs):
            out += ids + [eos]
        return out

    encode_docs.sp = sp
    return encode_docs


def stage_context(params, out_dir: Path, task_index: int, num_tasks: int):
    """What the job entry hands a runner (only the fields the pretokenize runner reads)."""
    return types.SimpleNamespace(
        params=params,
        out_dir=Path(out_dir),
        work_dir=Path(out_dir).parent / "work",
        stage_dir=Path(out_dir).parent,
        task_index=task_index,
        num_tasks=num_tasks,
        dist=types.SimpleNamespace(rank=0),
        log=lambda message: None,
        stage="pretokenize",
    )
