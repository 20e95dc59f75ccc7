"""lm-evaluation-harness as the evaluate stage's backend, on a tiny real LLaMA with the demo
tokenizer and the demo's held-out sentiment reviews as a local multiple-choice task (nothing
fetched: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE are set while it runs).

lm-eval's per-item log-likelihoods are checked against a second computation written here with
plain transformers: the choice's tokens after the Alpaca prompt, summed log-softmax; the tokens
split as lm-eval documents it (context and context+choice encoded whole, the choice's tokens are
the difference; chla's SFT encodes its examples so) or encoded separately, as the original
project's SFT did (pair_tokenization: separate). The whole stage path (results.json, summary)
runs in the demo chain test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.evaluate import LmEvalParams
from chla_tools.tasks import TASKS


@pytest.fixture(scope="module")
def reviews(tmp_path_factory, demo_assets) -> Path:
    records = json.loads(Path(demo_assets["sentiment_test"]).read_text(encoding="utf-8"))[:12]
    path = tmp_path_factory.mktemp("lm_eval") / "reviews.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def own_loglikelihood(model, tokenizer, prompt: str, choice: str, pair_tokenization: str) -> float:
    import torch

    if pair_tokenization == "joint":
        # lm-eval's rule: the prompt's trailing space moves into the answer, the pair is encoded
        # whole and the answer's tokens are those past the prompt's
        context, continuation = prompt.rstrip(), prompt[len(prompt.rstrip()) :] + choice
        whole, head = tokenizer(context + continuation)["input_ids"], tokenizer(context)["input_ids"]
        assert whole[: len(head)] == head
    else:  # as the original project's SFT built its examples
        head = tokenizer(prompt)["input_ids"]
        whole = head + tokenizer(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return float(sum(logits[position - 1, whole[position]] for position in range(len(head), len(whole))))


@pytest.mark.slow
@pytest.mark.parametrize("pair_tokenization", ["joint", "separate"])
def test_lm_eval_scores_the_alpaca_task_as_chla_would(tiny_chain, reviews, tmp_path, pair_tokenization):
    from chla_tools.inference import load_for_inference
    from chla_tools.lm_eval_backend import run_lm_eval
    from chla_tools.sft_data import format_prompt

    model, tokenizer = load_for_inference(tiny_chain["base"], [], log=lambda _m: None)
    spec = LmEvalParams(alpaca_tasks=[str(reviews)], limit=8, pair_tokenization=pair_tokenization)
    summary = run_lm_eval(
        model, tokenizer, spec, tmp_path / "out", tmp_path / "work", batch_size=4, log=lambda _m: None
    )

    task = summary["tasks"]["chla_reviews"]
    assert task["samples"] == 8
    rows = [
        json.loads(line)
        for line in (tmp_path / "out" / "lm_eval_samples" / "chla_reviews.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    records = json.loads(reviews.read_text(encoding="utf-8"))
    choices = sorted({record["output"] for record in records})
    assert choices == sorted(TASKS["sentiment"].choices)  # the distinct outputs, sorted
    correct = 0
    for row in rows:
        record = records[row["doc_id"]]
        assert row["target"] == choices.index(record["output"])
        prompt = format_prompt(record["instruction"], record["input"])
        mine = [own_loglikelihood(model, tokenizer, prompt, choice, pair_tokenization) for choice in choices]
        assert row["loglikelihoods"] == pytest.approx(mine, abs=1e-3)
        correct += max(range(len(mine)), key=mine.__getitem__) == row["target"]
    assert task["acc"] == pytest.approx(correct / len(rows))
    saved = json.loads((tmp_path / "out" / "lm_eval.json").read_text())
    assert saved["tasks"] == summary["tasks"] and saved["pair_tokenization"] == pair_tokenization


@pytest.mark.slow
def test_unknown_task_is_one_line(tiny_chain, tmp_path):
    from chla_tools.lm_eval_backend import run_lm_eval

    spec = LmEvalParams(tasks=["no_such_benchmark_xyz"])
    with pytest.raises(ChlaError, match="no lm-eval task named 'no_such_benchmark_xyz'"):
        run_lm_eval(None, None, spec, tmp_path / "out", tmp_path / "work", batch_size=1)


def test_a_file_with_one_label_is_not_a_multiple_choice_task(tmp_path):
    from chla_tools.lm_eval_backend import write_alpaca_task

    path = tmp_path / "one.json"
    path.write_text(json.dumps([{"instruction": "i", "input": "", "output": "正面"}] * 3), encoding="utf-8")
    with pytest.raises(ChlaError, match="at least two distinct outputs"):
        write_alpaca_task(path, tmp_path / "tasks")
