"""Pretraining on a weighted blend of corpora (Chinese plus replayed English): the run records
each corpus's sample count, and a preempted run resumes onto exactly the samples it had not seen,
ending bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

from ..helpers import TINY_LLAMA
from .launch import launch
from .test_training import (
    logged_steps,
    metrics,
    pretrain_params,
    rank_processes,
    submit_local,
    summary,
    wait_until,
)


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


def _read_counts(reads_file: Path) -> dict[str, Counter]:
    """How often each item of each blend part was read for training."""
    counts: dict[str, Counter] = {}
    for name, index in json.loads(reads_file.read_text()):
        counts.setdefault(name, Counter())[index] += 1
    return counts


@pytest.fixture(scope="module")
def twin_corpora(train_assets, tmp_path_factory) -> tuple[str, str]:
    """Two small corpora of the same 48 Chinese lines (pre-tokenized twice with the merged
    tokenizer): equal block counts, so that equal weights read every block alike."""
    from chla_tools.pretokenize import pretokenize

    root = tmp_path_factory.mktemp("twin_corpora")
    lines = Path(train_assets["corpus"]).parent.joinpath("zh_small.txt").read_text(encoding="utf-8").splitlines()
    text = root / "zh.txt"
    text.write_text("\n".join(lines[:48]) + "\n", encoding="utf-8")
    corpora = []
    for name in ("a", "b"):
        pretokenize(
            [str(text)],
            train_assets["merged_tokenizer"],
            root / name,
            cache_dir=root / f"cache-{name}",
            log=lambda *_: None,
        )
        corpora.append(str(root / name))
    return corpora[0], corpora[1]


@pytest.mark.slow
def test_blends_train_num_epochs_once_and_count_what_they_read(train_assets, twin_corpora, tmp_path):
    """num_epochs: 2 and no max_steps: a blend of two equal parts is read exactly twice, item by
    item, in the steps two epochs take; the summary counts what was read. (Finding 2: the trainer
    counted the blend's steps again with num_epochs and trained 4 epochs, counting 2.) Slow: two
    stage runs, ~40 s each on 2 cores, most of it starting DeepSpeed."""
    from chla_tools.blocks import BlockDataset

    common = {"micro_batch_size": 4, "num_epochs": 2, "max_steps": None, "eval_steps": 0, "logging_steps": 100}
    # Pretraining: two corpora of n training blocks each, weight 1:1.
    corpus = [{"path": path, "weight": 1, "name": name} for path, name in zip(twin_corpora, "ab")]
    params = pretrain_params(
        train_assets, corpus=corpus, mode="embeddings", new_rows_only=True, valid_count=2, **common
    )
    n = len(BlockDataset(twin_corpora[0], params["block_size"])) - params["valid_count"]
    assert n >= 8
    run = tmp_path / "pretrain"
    launch({"kind": "pretrain", "run_dir": str(run), "params": params, "reads_out": str(run / "reads.json")})
    # SFT: two instruction files of 12 records each, weight 1:1, validation from a file of its own.
    examples = json.loads(Path(train_assets["sft_train"]).read_text(encoding="utf-8"))
    files = []
    for name, part in (("x", examples[:12]), ("y", examples[12:24])):
        files.append({"path": str(tmp_path / f"{name}.json"), "weight": 1, "name": name})
        Path(files[-1]["path"]).write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
    sft_params = {
        "tokenizer": train_assets["base_tokenizer"],
        "init": TINY_LLAMA,
        "train_file": files,
        "valid_file": train_assets["sft_valid"],
        "max_seq_length": 128,
        "save_steps": 0,
        "precision": "fp32",
        "seed": 3,
        **common,
    }
    sft_run = tmp_path / "sft"
    launch({"kind": "sft", "run_dir": str(sft_run), "params": sft_params, "reads_out": str(sft_run / "reads.json")})

    # The files' records whose answer fits max_seq_length (the same number in both halves).
    usable = {part["examples"] for part in summary(sft_run)["data_stats"].values()}
    assert len(usable) == 1 and min(usable) >= 8
    for run_dir, items, counted in ((run, n, "corpus_samples"), (sft_run, usable.pop(), "blend_samples")):
        record = summary(run_dir)
        steps = 2 * (2 * items) // 4  # two epochs of 2 x items at a global batch of 4
        assert record["step"] == steps and record["samples_seen"] == 4 * steps, (run_dir.name, record)
        assert [r["step"] for r in metrics(run_dir)][-1] == steps
        reads = _read_counts(run_dir / "reads.json")
        for part, counts in reads.items():
            assert len(counts) == items and set(counts.values()) == {2}, (run_dir.name, part, counts)
        assert record[counted] == {part: sum(counts.values()) for part, counts in reads.items()}
