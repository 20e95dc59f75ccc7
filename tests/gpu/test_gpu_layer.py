"""The real-GPU layer: what CPU tests cannot show, on one CUDA GPU, in a few minutes.

    .venv/bin/python -m pytest -m gpu -q tests/gpu

1. The shrunk full chain through the local executor and the real job entry: a SentencePiece model
   merged into the base tokenizer, stage 1 (new rows only, `new_row_init: subtoken_mean` from a
   saved base model: the resize on the GPU), stage 2 (LoRA + embed_tokens/lm_head on a blend of
   Chinese and English), merge, SFT on two instruction files plus replay with `num_epochs: 2` and
   no max_steps (the step count a blend decides once), merge, evaluation, GGUF export; the stages'
   defaults otherwise (bf16 and compiled decoder layers on a GPU).
2. Packed SFT rows give the padded batch's loss under sdpa and flash_attention_2 (flash-attn's own
   kernels; skipped with the reason where flash_attn cannot be imported), each against a control
   that leaks attention between the examples of a row (tests/data/test_packed_attention.py's case).
3. `deterministic: true`: two runs of a LoRA pretraining stage (dropout on, embeddings trained: the
   embedding backward is one of the CUDA kernels that is not deterministic by default) end bitwise
   equal; without it the stage just runs and records that it was off.

The models are the CPU tests' tiny LLaMAs and the data the demo assets (fetched once into the
chla cache, as for the CPU suite). Without CUDA every gpu-marked test skips with the reason; the
CPU suite deselects them (tests/gpu/conftest.py) and runs only the dry run of the chain's recipe.
"""

from __future__ import annotations

import copy
import json
import math
import types
from pathlib import Path

import pytest
import yaml

from ..data.test_packed_attention import case  # noqa: F401  (the CPU test's fixture, reused)
from ..helpers import TINY_LLAMA, EngineStub, chla, status_json
from ..train.conftest import train_assets  # noqa: F401  (the CPU training tests' fixture)
from ..train.launch import launch
from ..train.test_training import pretrain_params


def _lines(path: str, count: int) -> str:
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return "\n".join(lines[:count]) + "\n"


def shrunk_chain(demo_assets, tmp_path: Path, *, base_weights: bool = True) -> dict:
    """The shrunk full chain's recipe, its inputs written under tmp_path: slices of the demo's
    text and instruction data, and a tiny saved base model (only its config.json where
    `base_weights` is false: enough for a dry run)."""
    import torch

    from chla_train import model as models

    # Inputs: slices of the demo's text and instruction data, and a tiny saved base model.
    (tmp_path / "zh.txt").write_text(_lines(demo_assets["zh_train"], 400), encoding="utf-8")
    (tmp_path / "en.txt").write_text(_lines(demo_assets["en_text"], 300), encoding="utf-8")
    records = json.loads(Path(demo_assets["sft_train"]).read_text(encoding="utf-8"))
    for name, part in (("sft_a", records[:24]), ("sft_b", records[24:48])):
        (tmp_path / f"{name}.json").write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "sft_valid.json").write_text(
        json.dumps(json.loads(Path(demo_assets["sft_valid"]).read_text(encoding="utf-8"))[:16], ensure_ascii=False),
        encoding="utf-8",
    )
    base = tmp_path / "base"
    model = models.build_base_model(None, TINY_LLAMA, dtype=torch.float32, attn_implementation="sdpa", seed=7)
    if base_weights:
        model.save_pretrained(base)
    else:
        model.config.save_pretrained(base)
    tokenizer = demo_assets["base_tokenizer"]
    training = {"block_size": 64, "micro_batch_size": 4, "save_steps": 0, "logging_steps": 1, "valid_count": 4}
    stages = {
        "spm": {"kind": "train_spm", "params": {"inputs": [str(tmp_path / "zh.txt")], "vocab_size": 2400}},
        "vocab": {"kind": "merge_tokenizer", "params": {"base": tokenizer, "add": "${stages.spm.out}/spm.model"}},
        "vocab_sft": {
            "kind": "merge_tokenizer",
            "params": {"base": tokenizer, "add": "${stages.spm.out}/spm.model", "pad_token": True},
        },
        "zh_tokens": {
            "kind": "pretokenize",
            "params": {"tokenizer": "${stages.vocab.out}/tokenizer", "inputs": [str(tmp_path / "zh.txt")]},
        },
        "en_tokens": {"kind": "pretokenize", "params": {"tokenizer": tokenizer, "inputs": [str(tmp_path / "en.txt")]}},
        "pt1": {
            "kind": "pretrain",
            "params": {
                **training,
                "mode": "embeddings",
                "new_rows_only": True,
                "train_lm_head": True,
                "new_row_init": "subtoken_mean",
                "model": str(base),
                "tokenizer": "${stages.vocab.out}/tokenizer",
                "corpus": "${stages.zh_tokens.out}",
                "max_steps": 4,
                "eval_steps": 4,
            },
        },
        "pt2": {
            "kind": "pretrain",
            "params": {
                **training,
                "mode": "lora",
                "model": "${stages.pt1.out}/model",
                "tokenizer": "${stages.vocab.out}/tokenizer",
                "corpus": [
                    {"path": "${stages.zh_tokens.out}", "weight": 0.8, "name": "zh"},
                    {"path": "${stages.en_tokens.out}", "weight": 0.2, "name": "en"},
                ],
                "max_steps": 4,
                "eval_steps": 4,
            },
        },
        "merge_pt": {
            "kind": "merge",
            "params": {"base": "${stages.pt1.out}/model", "adapters": ["${stages.pt2.out}/adapter"]},
        },
        "sft": {
            "kind": "sft",
            "params": {
                "model": "${stages.merge_pt.out}",
                "tokenizer": "${stages.vocab_sft.out}/tokenizer",
                "train_file": [
                    {"path": str(tmp_path / "sft_a.json"), "weight": 0.5, "name": "a"},
                    {"path": str(tmp_path / "sft_b.json"), "weight": 0.5, "name": "b"},
                ],
                "valid_file": str(tmp_path / "sft_valid.json"),
                "replay_corpus": [{"path": "${stages.zh_tokens.out}", "weight": 1, "name": "zh"}],
                "replay_weight": 0.25,
                "replay_block_size": 32,
                "max_seq_length": 128,
                "num_epochs": 2,
                "micro_batch_size": 4,
                "eval_steps": 1000,
                "save_steps": 0,
                "logging_steps": 1,
            },
        },
        "merge_sft": {
            "kind": "merge",
            "params": {"base": "${stages.merge_pt.out}", "adapters": ["${stages.sft.out}/adapter"]},
        },
        "eval": {
            "kind": "evaluate",
            "params": {
                "model": "${stages.merge_sft.out}",
                "ppl": [demo_assets["zh_heldout"]],
                "max_items": 8,
                "block_size": 64,
                "batch_size": 4,
            },
        },
        "gguf": {"kind": "export", "params": {"model": "${stages.merge_sft.out}", "outtype": "f16"}},
    }
    return {"name": "gpu", "stages": stages}


def test_the_gpu_chain_recipe_is_valid(demo_assets, tmp_path):
    """Not a GPU test: the CPU suite keeps the GPU layer's recipe valid as the params change
    (`chla-submit --dry-run` checks every stage's params and inputs without running anything)."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(shrunk_chain(demo_assets, tmp_path, base_weights=False)))
    result = chla("submit", "r.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.gpu
def test_shrunk_full_chain_on_one_gpu(demo_assets, tmp_path):
    recipe = shrunk_chain(demo_assets, tmp_path)
    stages = recipe["stages"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = chla("submit", "r.yaml", "--executor", "local", cwd=tmp_path, timeout=540)
    run_dir = tmp_path / "runs" / "gpu"
    states = {name: row["state"] for name, row in status_json(run_dir).items()}
    assert states == dict.fromkeys(stages, "COMPLETED"), (states, result.stdout[-3000:], result.stderr[-3000:])

    def summary(stage: str) -> dict:
        return json.loads((run_dir / stage / "out" / "train_summary.json").read_text())

    pt1 = summary("pt1")
    assert pt1["vocab_size"] > pt1["base_rows"] == TINY_LLAMA["vocab_size"]
    assert pt1["precision"] == "bf16" and pt1["new_row_init"] == "subtoken_mean", pt1
    assert set(summary("pt2")["corpus_samples"]) == {"zh", "en"}
    sft = summary("sft")
    examples = sum(part["examples"] for part in sft["data_stats"].values())
    steps = math.ceil(2 * math.ceil(examples / (1 - 0.25)) / 4)  # two epochs of the blend, batch 4
    assert sft["step"] == steps and sft["samples_seen"] == sum(sft["blend_samples"].values()) == 4 * steps, sft
    assert math.isfinite(sft["eval_loss"])
    results = json.loads((run_dir / "eval" / "out" / "results.json").read_text())
    assert results, "evaluation wrote no results"
    assert (run_dir / "gguf" / "out" / "model.gguf").stat().st_size > 0


def _gpu_loss(model, batch, implementation: str) -> float:
    """Trainer._forward (the trainer's own loss path) on the GPU with `implementation`."""
    import torch

    from chla_train.trainer import Trainer

    model.config._attn_implementation = implementation
    trainer = types.SimpleNamespace(engine=EngineStub(model), device=torch.device("cuda"))
    with torch.no_grad():
        return Trainer._forward(trainer, batch).item()


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_packed_rows_give_the_padded_loss_on_the_gpu(case, implementation):  # noqa: F811
    """sdpa in fp32 to the CPU test's tolerance (1e-5 relative; the leak moves the loss by more than
    1e-4 of it); flash_attention_2 in bf16 (flash-attn has no fp32 kernels): padded and packed
    batches both reach flash-attn's varlen kernel one example a segment, so they agree to 1e-3,
    and the leak must differ by more than 5x their difference and 1e-4 of the loss."""
    import numpy as np
    import torch

    if implementation == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed (pip install flash-attn)")
    dtype = torch.float32 if implementation == "sdpa" else torch.bfloat16
    model = copy.deepcopy(case.model).to("cuda", dtype).eval()
    padded = _gpu_loss(model, case.padded, implementation)
    packed = _gpu_loss(model, case.packed, implementation)
    rows, width = case.packed["input_ids"].shape
    leaky = _gpu_loss(model, dict(case.packed, position_ids=np.tile(np.arange(width), (rows, 1))), implementation)
    if implementation == "sdpa":
        assert packed == pytest.approx(padded, rel=1e-5)
        assert abs(leaky - padded) > 1e-4 * padded
    else:
        assert packed == pytest.approx(padded, rel=1e-3)
        assert abs(leaky - padded) > max(5 * abs(packed - padded), 1e-4 * padded), (padded, packed, leaky)


def _lora_run(assets, run_dir: Path, **overrides) -> dict:
    from safetensors.torch import load_file

    params = pretrain_params(
        assets, mode="lora", micro_batch_size=4, max_steps=6, eval_steps=0, lora_dropout=0.05, **overrides
    )
    params.pop("precision")  # the GPU's default (bf16), as a recipe would leave it
    launch({"kind": "pretrain", "run_dir": str(run_dir), "params": params}, timeout=300)
    record = json.loads((run_dir / "train" / "out" / "train_summary.json").read_text())
    return {
        "record": record,
        "weights": load_file(str(run_dir / "train" / "out" / "adapter" / "adapter_model.safetensors")),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_deterministic_runs_are_bitwise_equal_on_the_gpu(train_assets, tmp_path, implementation):  # noqa: F811
    import torch

    if implementation == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed (pip install flash-attn)")
    first = _lora_run(train_assets, tmp_path / "a", deterministic=True, attn_implementation=implementation)
    second = _lora_run(train_assets, tmp_path / "b", deterministic=True, attn_implementation=implementation)
    assert (
        first["record"]["deterministic"] is True
        and "CUBLAS_WORKSPACE_CONFIG" in first["record"]["deterministic_reason"]
    )
    assert set(first["weights"]) == set(second["weights"])
    for name, tensor in first["weights"].items():
        assert torch.equal(tensor, second["weights"][name]), f"{name} differs between two deterministic runs"
    # Off: the stage runs and says so (whether its weights differ run to run is the GPU's business).
    off = _lora_run(train_assets, tmp_path / "off", attn_implementation=implementation)
    assert off["record"]["deterministic"] is False
    # Control: the comparison sees a change of the run (another seed gives other weights).
    other = _lora_run(train_assets, tmp_path / "seed", deterministic=True, attn_implementation=implementation, seed=8)
    assert any(not torch.equal(t, other["weights"][n]) for n, t in first["weights"].items())
