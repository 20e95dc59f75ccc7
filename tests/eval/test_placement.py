"""A model spread by accelerate's device_map "auto" (what evaluation and chat do on GPUs) generates
and scores as the model in memory. No GPU here: the same placement runs under a memory cap that
sends half the layers to disk, so the hooks that move weights and inputs between devices run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from chla_tools import evaluate as evaluation
from chla_tools.inference import generate_batch, input_device, load_for_inference, placement

from .test_evaluate import eval_inputs, merged_model  # noqa: F401  (the fixtures)

PROMPTS = ["话说天下大势，分久必合，合久必分。", "你好", "人民日报报道，今年粮食生产获得丰收。"]


@pytest.mark.slow
def test_spread_model_generates_and_scores_as_the_whole_one(merged_model, eval_inputs, tmp_path):  # noqa: F811 (fixtures)
    assert placement("cuda") == {"device_map": "auto"} and placement("cpu") == {}
    whole, tokenizer = load_for_inference(merged_model, log=lambda _m: None)
    layer_bytes = sum(p.numel() * 4 for p in whole.model.layers[0].parameters())
    embed_bytes = whole.get_input_embeddings().weight.numel() * 4
    spread, _ = load_for_inference(
        merged_model,
        max_memory={"cpu": 2 * embed_bytes + layer_bytes},
        log=lambda _m: None,
        offload_folder=tmp_path / "offload",
    )
    devices = set(spread.hf_device_map.values())
    assert devices == {"cpu", "disk"}, spread.hf_device_map  # some layers live on disk
    assert str(input_device(spread)) == "cpu"
    assert generate_batch(spread, tokenizer, PROMPTS, max_new_tokens=6) == generate_batch(
        whole, tokenizer, PROMPTS, max_new_tokens=6
    )
    lines = Path(eval_inputs["ppl"][0]).read_text(encoding="utf-8").splitlines()[:3]
    a = evaluation.perplexity_sums(whole, tokenizer, lines, block=64, batch_size=2)
    b = evaluation.perplexity_sums(spread, tokenizer, lines, block=64, batch_size=2)
    assert a["tokens"] == b["tokens"] and math.isclose(a["nll"], b["nll"], rel_tol=1e-6)
