"""Batch evaluation: shards aggregate to the 1-shard numbers; batched greedy == one at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from chla_launcher.contract.errors import ChlaError  # noqa: E402
from chla_launcher.contract.kinds.evaluate import EvaluateParams  # noqa: E402
from chla_tools import evaluate as evaluation  # noqa: E402
from chla_tools.inference import encode, generate_batch, load_for_inference  # noqa: E402
from chla_tools.merge import merge_adapters  # noqa: E402
from chla_tools.sft_data import PROMPT_TEMPLATE  # noqa: E402
from chla_train.stages import evaluate as evaluate_stage  # noqa: E402


@pytest.fixture(scope="module")
def merged_model(tiny_chain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "merged"
    merge_adapters(tiny_chain["base"], [tiny_chain["pretrain"], tiny_chain["sft"]], out, log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def eval_inputs(demo_assets, tmp_path_factory) -> dict:
    """Small real slices: Chinese held-out paragraphs (one long enough to need several windows),
    the first test records of every task, the sentiment ones once more without their `task` key
    (exact match), and prompts."""
    root = tmp_path_factory.mktemp("eval_inputs")
    lines = [line for line in Path(demo_assets["zh_heldout"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = lines[:13] + ["".join(lines[:8])]
    (root / "heldout.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tasks = []
    for task, count in (("sentiment", 10), ("segmentation", 5), ("entities", 5), ("continuation", 5)):
        records = json.loads(Path(demo_assets[f"{task}_test"]).read_text(encoding="utf-8"))[:count]
        (root / f"{task}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        tasks.append(str(root / f"{task}.json"))
    untyped = [
        {key: value for key, value in record.items() if key != "task"}
        for record in json.loads(Path(tasks[0]).read_text(encoding="utf-8"))
    ]
    (root / "plain.json").write_text(json.dumps(untyped, ensure_ascii=False), encoding="utf-8")
    tasks.append(str(root / "plain.json"))
    prompts = ["介绍一下长江。", "天下大势是什么意思？", "写一首关于秋天的诗", "你好", "What is 1+1?"]
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8"
    )
    return {
        "ppl": [str(root / "heldout.txt")],
        "tasks": tasks,
        "prompts": [str(root / "prompts.jsonl")],
        "n_lines": len(lines),
    }


def rounded(value):
    """`value` with every float rounded to 12 significant digits (nested dicts)."""
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    return float(f"{value:.12g}") if isinstance(value, float) else value


def _ctx(params, out_dir: Path, task_index: int, num_tasks: int):
    return SimpleNamespace(
        params=params,
        out_dir=out_dir,
        task_index=task_index,
        num_tasks=num_tasks,
        log=lambda _m: None,
        stage="eval",
        stage_dir=out_dir.parent,
        dist=SimpleNamespace(rank=0),
    )


@pytest.mark.slow
def test_four_shards_equal_one_shard(merged_model, eval_inputs, tmp_path):
    params = EvaluateParams(
        model=str(merged_model),
        ppl=eval_inputs["ppl"],
        tasks=eval_inputs["tasks"],
        prompts=eval_inputs["prompts"],
        batch_size=3,
        max_new_tokens=6,
        block_size=32,
    )
    one, four = tmp_path / "one", tmp_path / "four"
    evaluate_stage.run(_ctx(params, one, 0, 1))
    headline = evaluate_stage.finalize(_ctx(params, one, -1, 1))  # the job entry finalizes a single task too
    for task in range(4):
        evaluate_stage.run(_ctx(params, four, task, 4))
    evaluate_stage.finalize(_ctx(params, four, -1, 4))

    single = json.loads((one / "results.json").read_text())
    sharded = json.loads((four / "results.json").read_text())
    ((ppl_name, ppl_one),) = single["perplexity"].items()
    ppl_four = sharded["perplexity"][ppl_name]
    assert ppl_one["lines"] == eval_inputs["n_lines"] and ppl_one["tokens"] > 32  # several windows
    for key in ("lines", "tokens", "characters"):
        assert ppl_one[key] == ppl_four[key]
    assert math.isclose(ppl_one["nll_sum"], ppl_four["nll_sum"], rel_tol=1e-6)
    assert math.isclose(ppl_one["ppl_per_char"], ppl_four["ppl_per_char"], rel_tol=1e-6)
    assert ppl_one["ppl_per_char"] == pytest.approx(math.exp(ppl_one["nll_sum"] / ppl_one["characters"]))
    assert headline[f"{ppl_name}.ppl_per_char"] == round(ppl_one["ppl_per_char"], 4)

    assert list(single["tasks"]) == [
        "task-sentiment",
        "task-segmentation",
        "task-entities",
        "task-continuation",
        "task-plain",
    ]
    for name, task in single["tasks"].items():
        for key in ("items", "task", "score", "systems", "counts"):  # sums of floats, in another order
            assert rounded(task[key]) == rounded(sharded["tasks"][name][key]), (name, key)
    assert single["tasks"]["task-sentiment"]["items"] == 10 and single["tasks"]["task-entities"]["items"] == 5
    # the sentiment file is scored as exact match with or without its `task` key; only the
    # typed one also ranks the choices by log-likelihood
    typed, plain = single["tasks"]["task-sentiment"], single["tasks"]["task-plain"]
    for key in ("correct", "accuracy", "majority_label", "majority_baseline"):
        assert typed[key] == plain[key]
    assert set(typed["systems"]) == {"model", "model_loglik", "majority"} and set(plain["systems"]) == {
        "model",
        "majority",
    }
    assert set(single["tasks"]["task-segmentation"]["systems"]) == {"model", "every_character", "jieba"}
    assert single["tasks"]["task-segmentation"]["systems"]["jieba"]["f1"] > 0.5
    assert headline["task-segmentation.jieba.f1"] == round(
        single["tasks"]["task-segmentation"]["systems"]["jieba"]["f1"], 4
    )
    assert "| task-entities | 5 | entity F1 | no entities | baseline | 0.0000 |" in (one / "results.md").read_text()
    for name in [*single["tasks"], *single["prompts"]]:
        assert (one / "generations" / f"{name}.jsonl").read_text() == (
            four / "generations" / f"{name}.jsonl"
        ).read_text()
    assert "ppl per char" in (four / "results.md").read_text()
    assert len(list((four / "partials").glob("shard-*-of-00004.json"))) == 4

    # `chla eval --shards 4` runs the same shards in one process, the model loaded once
    cli = tmp_path / "cli"
    evaluation.evaluate(params, cli, shards=4, log=lambda _m: None)
    from_cli = json.loads((cli / "results.json").read_text())
    assert from_cli["tasks"] == sharded["tasks"] and from_cli["perplexity"] == sharded["perplexity"]


@pytest.mark.slow
def test_batched_greedy_equals_one_at_a_time(merged_model):
    model, tokenizer = load_for_inference(merged_model, log=lambda _m: None)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "[PAD]"
    prompts = [
        "话说天下大势，分久必合，合久必分。",
        "你好",
        "滚滚长江东逝水",
        "人民日报报道，今年粮食生产获得丰收。周末",
        "a",
    ]
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=8)
    alone = [generate_batch(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone
    assert all(batched)


def test_choice_log_likelihoods_batched_equal_one_sequence_at_a_time(merged_model):
    model, tokenizer = load_for_inference(merged_model, log=lambda _m: None)
    prompts = [
        evaluation.prompt_text({"instruction": "判断情感", "input": text}, template=PROMPT_TEMPLATE)
        for text in ("很好", "这本书写得非常糟糕，不推荐购买。", "一般")
    ]
    choices = ["正面", "负面"]
    batched = evaluation.choice_logliks(model, tokenizer, prompts, choices, batch_size=4)
    for prompt, scores in zip(prompts, batched):
        for choice, score in zip(choices, scores):
            # the choice as the prompt's continuation (as SFT trains): the pair encoded whole,
            # the prompt without its trailing space, which the choice's first token carries
            prompt_ids = encode(tokenizer, prompt.rstrip())
            whole = encode(tokenizer, prompt + choice)
            assert whole[: len(prompt_ids)] == prompt_ids and prompt != prompt.rstrip()
            choice_ids = whole[len(prompt_ids) :]
            ids = torch.tensor([prompt_ids + choice_ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
            alone = sum(logprobs[len(prompt_ids) - 1 + k, token].item() for k, token in enumerate(choice_ids))
            assert score == pytest.approx(alone, abs=1e-4)
    assert batched[0] != batched[1]  # control: the scores depend on the prompt


@pytest.mark.slow
def test_unmerged_adapters_score_like_the_merged_model(tiny_chain, merged_model, eval_inputs):
    lines = Path(eval_inputs["ppl"][0]).read_text(encoding="utf-8").splitlines()[:4]
    merged = evaluation.perplexity_sums(
        *load_for_inference(merged_model, log=lambda _m: None), lines, block=64, batch_size=4
    )
    stacked = evaluation.perplexity_sums(
        *load_for_inference(tiny_chain["base"], [tiny_chain["pretrain"], tiny_chain["sft"]], log=lambda _m: None),
        lines,
        block=64,
        batch_size=4,
    )
    assert merged["tokens"] == stacked["tokens"]
    assert math.isclose(merged["nll"], stacked["nll"], rel_tol=1e-5)


def test_empty_task_file_is_refused_before_anything_is_written(merged_model, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]\n")
    out = tmp_path / "out"
    with pytest.raises(ChlaError, match="no items") as caught:
        evaluation.evaluate(EvaluateParams(model=str(merged_model), tasks=[str(empty)]), out, log=lambda _m: None)
    assert str(empty) in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_tokenizer_is_refused(merged_model, eval_inputs, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(merged_model, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ChlaError, match="no tokenizer"):
        evaluation.evaluate(
            EvaluateParams(model=str(bare), ppl=eval_inputs["ppl"]), tmp_path / "out", log=lambda _m: None
        )
    assert not (tmp_path / "out").exists()
