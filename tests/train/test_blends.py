"""Pretraining on a weighted blend of corpora (Chinese plus replayed English): the run records
each corpus's sample count, and a preempted run resumes onto exactly the samples it had not seen,
ending bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from .test_training import logged_steps, pretrain_params, rank_processes, submit_local, summary, wait_until


@pytest.fixture(scope="module")
def en_corpus(demo_assets, tmp_path_factory) -> str:
    """English text pre-tokenized with the base tokenizer (its ids are valid in the merged one)."""
    from chla_tools.pretokenize import pretokenize

    root = tmp_path_factory.mktemp("en_corpus")
    lines = Path(demo_assets["en_text"]).read_text(encoding="utf-8").splitlines()
    text = root / "en.txt"
    text.write_text("\n".join(line for line in lines[:1200] if line.strip()) + "\n", encoding="utf-8")
    pretokenize(
        [str(text)], demo_assets["base_tokenizer"], root / "corpus", cache_dir=root / "cache", log=lambda *_: None
    )
    return str(root / "corpus")


@pytest.mark.slow
def test_blended_pretraining_counts_samples_and_resumes_exactly(train_assets, en_corpus, tmp_path):
    from safetensors.torch import load_file

    blend = [
        {"path": train_assets["corpus"], "weight": 0.8, "name": "zh"},
        {"path": en_corpus, "weight": 0.2, "name": "en"},
    ]
    params = pretrain_params(
        train_assets,
        corpus=blend,
        mode="embeddings",
        new_rows_only=True,
        train_lm_head=True,
        max_steps=30,
        eval_steps=0,
        micro_batch_size=5,
    )
    straight = tmp_path / "straight" / "runs" / "t"
    runner = submit_local(tmp_path / "straight", params)
    assert runner.wait(timeout=300) == 0, runner.stdout.read()
    # Preempted as Slurm does (SIGTERM) after step 4; the local executor requeues it.
    executor = submit_local(tmp_path / "interrupted", params)
    interrupted = tmp_path / "interrupted" / "runs" / "t"
    [rank] = rank_processes(executor, 1)
    wait_until(lambda: max(logged_steps(interrupted / "train" / "work"), default=0) >= 4, 120, "training steps")
    rank.send_signal(signal.SIGTERM)
    output, _ = executor.communicate(timeout=300)
    assert executor.returncode == 0 and "train: requeued" in output, output

    record = summary(straight)
    assert record["corpus_samples"] == {"zh": 120, "en": 30}  # 30 steps x 5 samples, 80/20 exactly
    assert record["corpus_weights"] == {"zh": 0.8, "en": 0.2}
    state = json.loads((straight / "train" / "state.json").read_text())
    assert state["metrics"]["corpus_samples"] == {"zh": 120, "en": 30}  # the stage's metrics
    resumed = summary(interrupted)
    [step] = resumed["resumed_from_steps"]
    assert 4 <= step < 30 and resumed["samples_seen"] == 150
    a = load_file(str(straight / "train" / "out" / "model" / "model.safetensors"))
    b = load_file(str(interrupted / "train" / "out" / "model" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming the blend"
    # Control: without English the same steps train other rows (the blend is really read).
    runner = submit_local(tmp_path / "zh_only", dict(params, corpus=train_assets["corpus"]))
    assert runner.wait(timeout=300) == 0, runner.stdout.read()
    zh_only = tmp_path / "zh_only" / "runs" / "t"
    c = load_file(str(zh_only / "train" / "out" / "model" / "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
