"""Pretraining on a weighted blend of corpora (Chinese plus replayed English): the run records
each corpus's sample count, and a preempted run resumes onto exactly the samples it had not seen,
ending bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .launch import launch
from .test_training import pretrain_params, summary


@pytest.fixture(scope="module")
def en_corpus(demo_assets, tmp_path_factory) -> str:
    """English text pre-tokenized with the base tokenizer (its ids are valid in the merged one)."""
    from chla_tools.pretokenize import pretokenize

    root = tmp_path_factory.mktemp("en_corpus")
    lines = Path(demo_assets["en_text"]).read_text(encoding="utf-8").splitlines()
    text = root / "en.txt"
    text.write_text("\n".join(line for line in lines[:1200] if line.strip()) + "\n", encoding="utf-8")
    pretokenize([str(text)], demo_assets["base_tokenizer"], root / "corpus", cache_dir=root / "cache",
                log=lambda *_: None)
    return str(root / "corpus")


def test_blended_pretraining_counts_samples_and_resumes_exactly(train_assets, en_corpus, tmp_path):
    from safetensors.torch import load_file

    blend = [{"path": train_assets["corpus"], "weight": 0.8, "name": "zh"},
             {"path": en_corpus, "weight": 0.2, "name": "en"}]
    params = pretrain_params(train_assets, corpus=blend, mode="embeddings", new_rows_only=True,
                             train_lm_head=True, max_steps=9, save_steps=3, eval_steps=0, micro_batch_size=5)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert launch({"kind": "pretrain", "run_dir": str(straight), "params": params}) == [0]
    spec = {"kind": "pretrain", "run_dir": str(interrupted), "params": params, "preempt_after_polls": 4}
    assert launch(spec) == [75]  # preempted at step 4, after the checkpoint of step 3
    assert launch(dict(spec, preempt_after_polls=None)) == [0]

    record = summary(straight)
    assert record["corpus_samples"] == {"zh": 36, "en": 9}  # 9 steps x 5 samples, 80/20 exactly
    assert record["corpus_weights"] == {"zh": 0.8, "en": 0.2}
    state = json.loads((straight / "train" / "out" / "result.json").read_text())
    assert state["corpus_samples"] == {"zh": 36, "en": 9}  # the stage's metrics (state.json)
    resumed = summary(interrupted)
    assert resumed["resumed_from_steps"] == [4] and resumed["samples_seen"] == 45
    a = load_file(str(straight / "train" / "out" / "model" / "model.safetensors"))
    b = load_file(str(interrupted / "train" / "out" / "model" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming the blend"
    # Control: without English the same steps train other rows (the blend is really read).
    zh_only = tmp_path / "zh_only"
    launch({"kind": "pretrain", "run_dir": str(zh_only),
            "params": dict(params, corpus=train_assets["corpus"], save_steps=0)})
    c = load_file(str(zh_only / "train" / "out" / "model" / "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
