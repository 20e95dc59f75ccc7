"""Fast checks of the training kinds' params (launcher side, torch-free), the DeepSpeed config,
the LR schedule and `chla report train`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from chla_launcher.contract.kinds import get_kind, input_path_fields
from chla_train.model_config import llama_config

from ..helpers import small_lora


def test_kinds_are_registered_with_original_defaults():
    pretrain, sft = get_kind("pretrain"), get_kind("sft")
    assert pretrain.distributed and sft.distributed
    p = pretrain.params(tokenizer="/t", corpus="/c", init={"hidden_size": 16})
    assert (
        p.learning_rate,
        p.lora_r,
        p.lora_alpha,
        p.lora_dropout,
        p.block_size,
        p.warmup_ratio,
        p.weight_decay,
        p.lr_scheduler,
        p.zero_stage,
    ) == (2e-4, 8, 32, 0.05, 512, 0.05, 0.01, "cosine", 2)
    assert p.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert p.modules_to_save == ["embed_tokens", "lm_head"]
    s = sft.params(tokenizer="/t", model="/m", train_file="/f")
    assert (s.learning_rate, s.warmup_ratio, s.weight_decay, s.max_seq_length) == (1e-4, 0.03, 0.0, 512)
    assert {"tokenizer", "model", "corpus", "init_adapter"} <= set(input_path_fields(pretrain.params))
    assert {"tokenizer", "model", "train_file", "valid_file", "init_adapter"} <= set(input_path_fields(sft.params))


@pytest.mark.parametrize(
    "bad",
    [
        {},  # neither model nor init
        {"model": "/m", "init": {"hidden_size": 8}},  # both
        {"init": {}, "mode": "lora", "new_rows_only": True},  # embeddings-only option
        {"init": {}, "zero_stage": 1},  # 0, 2 or 3
        {"init": {}, "precision": "fp16"},  # fails on CPU: not offered
        {"init": {}, "lora_targets": ["q_proj"]},  # unknown key
    ],
)
def test_bad_params_are_rejected(bad):
    with pytest.raises(ValidationError):
        get_kind("pretrain").params(tokenizer="/t", corpus="/c", **bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"share_prompt_prefix": True},  # needs pack_batches
        {
            "share_prompt_prefix": True,
            "pack_batches": True,
            "attn_implementation": "flash_attention_2",
        },  # FA2 takes no 4-D mask
    ],
)
def test_bad_sft_params_are_rejected(bad):
    with pytest.raises(ValidationError):
        get_kind("sft").params(tokenizer="/t", model="/m", train_file="/f", **bad)


def test_optimizer_is_fused():
    """One fused AdamW kernel per tensor: the for-each-op default took 40% of an SFT step on CPU."""
    import torch

    from chla_train.trainer import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    params = get_kind("sft").params(tokenizer="/t", model="/m", train_file="/f", learning_rate=1e-3, weight_decay=0.1)
    optimizer = build_optimizer(model, params)
    assert optimizer.defaults["fused"] is True
    assert [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups] == [(1, 0.1), (3, 0.0)]


def test_job_entry_keeps_freed_memory_unless_the_user_tuned_malloc():
    code = "from chla_train.freed_memory import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tuned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert tuned.stdout.strip() == "True"  # glibc (Debian/Ubuntu): mallopt accepted every setting
    own = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**env, "MALLOC_TOP_PAD_": "0"}
    )
    assert own.stdout.strip() == "False"


def test_zero3_stages_hand_freed_memory_back():
    # 256 MiB of 1 MiB blocks on the heap, freed: kept resident under keep_freed_memory (the
    # control), handed back by return_freed_memory (and no longer kept for what comes after).
    code = (
        "import sys; from chla_train.freed_memory import keep_freed_memory, return_freed_memory\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
        "def churn():\n"
        "    blocks = [b'x' * (1 << 20) for _ in range(256)]\n"
        "    del blocks\n"
        "keep_freed_memory(); start = rss(); churn(); kept = rss() - start\n"
        "handed = return_freed_memory(); after = rss() - start; churn(); again = rss() - start\n"
        "print(kept, handed, after, again)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    kept, handed, after, again = result.stdout.split()
    assert int(kept) > 200 and handed == "True", result.stdout
    assert int(after) < 50 and int(again) < 50, result.stdout


GATHER_RANK = """
import os, sys, torch, torch.distributed as dist, deepspeed.comm
from chla_train.model import gather_in_place_over_gloo
dist.init_process_group("gloo")
rank = dist.get_rank()
part = torch.arange(6, dtype=torch.bfloat16) + 10 * rank  # rank 0: 0..5, rank 1: 10..15
reference = torch.empty(12, dtype=torch.bfloat16)
dist.all_gather_into_tensor(reference, part)
gather_in_place_over_gloo()
gather_in_place_over_gloo()  # installed once, whatever the number of stages that ask
gathered = torch.full((12,), -1.0, dtype=torch.bfloat16)
deepspeed.comm.allgather_fn(gathered, part, async_op=True).wait()
swapped = torch.cat([reference[6:], reference[:6]])  # the control: ranks' places exchanged
print(torch.equal(gathered, reference), torch.equal(gathered, swapped), deepspeed.comm.allgather_fn.__module__)
sys.stdout.flush()
dist.destroy_process_group()
os._exit(0)  # gloo can abort at interpreter exit after the work is done
"""


@pytest.mark.slow
def test_zero3_gathering_over_gloo_puts_every_partition_in_its_place(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(GATHER_RANK)
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 500))
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=dict(env, RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [stderr[-2000:] for _, stderr in results]
    outputs = [stdout.splitlines()[-1].split() for stdout, _ in results]  # the last line: after DeepSpeed's log
    assert outputs == [["True", "False", "chla_train.model"]] * 2


ADAPTER_DTYPE_RANK = """
import json, os, sys, torch
from pathlib import Path
from chla_launcher.contract.kinds.pretrain import PretrainParams
from chla_train import model as models
from chla_train.context import StageContext
from chla_train.trainer import Trainer, TrainData
from chla_train.training_workflow import model_loading
root = Path(sys.argv[1])
params = PretrainParams(
    model=str(root / "base"), tokenizer=str(root), corpus=str(root), mode="lora", zero_stage=3, precision="bf16",
    max_steps=1, micro_batch_size=1,
)
ctx = StageContext.standalone(root / "run", "train", "pretrain", params)
with model_loading(ctx, params, dtype=torch.bfloat16):
    model = models.build_base_model(params.model, None, dtype=torch.bfloat16, attn_implementation="sdpa", seed=7)
    model = models.apply_stage_lora(model, params, stage="train", log=lambda _m: None)
trainable = lambda: sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})  # noqa: E731
before = trainable()
Trainer(ctx, model, TrainData([], [0], [], [], collate=None), params, dtype=torch.bfloat16)
frozen = [p for p in model.parameters() if not p.requires_grad]
partitioned = all(hasattr(p, "ds_id") and p.dtype == torch.bfloat16 for p in frozen)
print(json.dumps({"before": before, "after": trainable(), "partitioned": partitioned}))
sys.stdout.flush()
os._exit(0)  # gloo can abort at interpreter exit after the work is done
"""


@pytest.mark.slow
def test_zero3_partitioned_model_trains_its_adapters_in_bf16(tmp_path):
    """A model built under zero.Init: DeepSpeed casts none of its parameters to bf16, so the
    adapters PEFT added after loading stayed fp32 (the control: `before`), beside bf16 copies of
    the embeddings (ZeRO-3's optimizer then refused to start), while those of a model loaded
    whole trained in bf16. The trainer casts them, and leaves the base's partitions as they are."""
    import torch

    from chla_train import model as models

    from ..helpers import TINY_LLAMA

    base = models.build_base_model(None, TINY_LLAMA, dtype=torch.bfloat16, attn_implementation="sdpa", seed=7)
    base.save_pretrained(tmp_path / "base")
    script = tmp_path / "rank.py"
    script.write_text(ADAPTER_DTYPE_RANK)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.splitlines()[-1])  # the last line: after DeepSpeed's log
    # Before: the copies of embed_tokens and lm_head that train (modules_to_save, made from the
    # partitioned bf16 modules) and the fp32 adapters.
    assert outcome == {"before": ["torch.bfloat16", "torch.float32"], "after": ["torch.bfloat16"], "partitioned": True}


def test_launcher_kinds_do_not_import_torch():
    code = (
        "import sys, chla_launcher.contract.kinds.pretrain, chla_launcher.contract.kinds.sft; "
        "print(any(m in sys.modules for m in ('torch', 'transformers', 'numpy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_deepspeed_config_and_schedule():
    import torch

    from chla_train.trainer import build_scheduler, deepspeed_config

    params = get_kind("pretrain").params(
        tokenizer="/t",
        corpus="/c",
        init={},
        micro_batch_size=2,
        gradient_accumulation_steps=3,
        zero_stage=3,
        max_steps=100,
    )
    config = deepspeed_config(params, dtype=torch.bfloat16, world_size=4, hidden_size=4096, on_gpu=False)
    assert config["train_batch_size"] == 24 and config["zero_optimization"]["stage"] == 3
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert "optimizer" not in config and "scheduler" not in config  # no fused_adam JIT build
    assert config["zero_optimization"]["overlap_comm"] is False  # gloo: nothing to overlap with
    gpu = deepspeed_config(params, dtype=torch.bfloat16, world_size=4, hidden_size=4096, on_gpu=True)
    assert gpu["zero_optimization"]["overlap_comm"] is True
    assert gpu["zero_optimization"]["reduce_bucket_size"] == 4096**2
    assert gpu["zero_optimization"]["stage3_param_persistence_threshold"] == 40960
    zero2 = deepspeed_config(
        params.model_copy(update={"zero_stage": 2}), dtype=torch.bfloat16, world_size=4, hidden_size=4096, on_gpu=True
    )["zero_optimization"]
    assert zero2["overlap_comm"] is True and zero2["reduce_bucket_size"] == 2e8
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for settings in (gpu["zero_optimization"], zero2):  # DeepSpeed accepts them
        DeepSpeedZeroConfig(**settings)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, params, 100)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[4] <= 1.0 and lrs[5] == pytest.approx(1.0)  # 5% warmup, then cosine
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def _write_metrics(path, losses, evals):
    path.parent.mkdir(parents=True)
    lines = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)] + [{"step": s, "eval_loss": v} for s, v in evals]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_report_train_draws_every_training_stage(tmp_path):
    from chla_launcher.commands import report

    run = tmp_path / "run"
    _write_metrics(run / "pt1" / "out" / "metrics.jsonl", [3.0, 2.5, 2.0], [(3, 2.2)])
    _write_metrics(run / "sft" / "work" / "metrics.jsonl", [1.5, 1.2], [])  # still running
    (run / "vocab" / "out").mkdir(parents=True)  # not a training stage
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args(["train", str(run)])) == 0
    png = run / "reports" / "train_loss.png"
    assert png.read_bytes()[:4] == b"\x89PNG"

    from chla_tools.train_report import find_training_metrics

    assert list(find_training_metrics(run)) == ["pt1", "sft"]


def test_report_train_errors_are_one_line(tmp_path):
    from chla_launcher.contract.errors import ChlaError
    from chla_tools.train_report import train_report

    with pytest.raises(ChlaError, match="no training stage"):
        train_report(tmp_path)
    (tmp_path / "pt" / "out").mkdir(parents=True)
    # A torn last line is the end of an interrupted append (the report of a live run skips it); a
    # line that does not parse before the last one is damage.
    (tmp_path / "pt" / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(ChlaError, match=r"metrics.jsonl:2"):
        train_report(tmp_path)


def test_new_lora_adapter_depends_on_the_seed_not_on_the_global_rng():
    """The A matrices of a new adapter come from the recipe's seed, not from the global RNG (which
    torch seeds differently in every process): a process that drew random numbers before gets the
    same adapter as one that did not."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**llama_config(vocab=64, hidden=8, intermediate=16, layers=1, heads=2))

    def lora_a(seed: int, draws_before: int) -> torch.Tensor:
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
        torch.rand(draws_before)  # whatever the process did before
        model = small_lora(base, target_modules=["q_proj"], modules_to_save=[], seed=seed, log=lambda _: None)
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()

    assert torch.equal(lora_a(42, 0), lora_a(42, 1000))
    assert not torch.equal(lora_a(42, 0), lora_a(43, 0))
    after = torch.rand(1)
    torch.manual_seed(0)
    LlamaForCausalLM(config)
    torch.rand(0)
    assert torch.equal(after, torch.rand(1))  # the caller's RNG stream is left as it was


def test_init_adapter_continues_across_an_added_pad_row(tmp_path):
    """The original's 49953/49954 problem: a pretraining adapter (vocab N) continued by SFT whose
    tokenizer added [PAD] (vocab N+1). Trained rows are kept; the new row starts at their mean."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from chla_train.model import apply_lora

    config = llama_config(vocab=100, hidden=8, intermediate=16, layers=1, heads=2)
    torch.manual_seed(0)
    trained = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**config)),
        LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"),
    )
    trained.save_pretrained(tmp_path / "adapter")
    saved_rows = trained.base_model.model.model.embed_tokens.modules_to_save["default"].weight.detach().clone()

    base = LlamaForCausalLM(LlamaConfig(**config))
    base.resize_token_embeddings(101, mean_resizing=False)
    messages = []
    model = apply_lora(
        base,
        r=8,
        alpha=32,
        dropout=0.0,
        target_modules=["q_proj"],
        modules_to_save=[],
        init_adapter=str(tmp_path / "adapter"),
        key_prefix="sft",
        seed=0,
        log=messages.append,
    )
    rows = model.base_model.model.model.embed_tokens.modules_to_save["default"].weight.detach()
    assert rows.shape == (101, 8)
    assert torch.equal(rows[:100], saved_rows)
    torch.testing.assert_close(rows[100], saved_rows.mean(dim=0))
    assert messages and "100->101" in messages[0]
