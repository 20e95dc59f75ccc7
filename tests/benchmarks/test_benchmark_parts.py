"""What the benchmarks compute before they time anything, checked on CPU: the original project's
HF Trainer arguments and LoRA setup, the FLOP counts behind the MFU figures, benchmarks/gpu.py's
choice of layers and its dry run, and the attention function its varlen check hands PyTorch's
FlashAttention varlen kernel (that kernel needs a CUDA machine: here a reference stands in), and the
bag-of-words classifier benchmarks/sentiment_reference.py scores the sentiment splits with."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ..helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu  # noqa: E402
import kernel_profile  # noqa: E402
import train_throughput  # noqa: E402


def test_original_path_has_run_pt_sh_arguments(tmp_path):
    args = train_throughput.original_training_arguments(str(tmp_path), bf16=False, max_steps=3)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 8)
    assert args.gradient_checkpointing and args.learning_rate == 2e-4 and args.weight_decay == 0.01
    assert args.lr_scheduler_type.value == "cosine" and args.warmup_steps == 0.05
    assert args.deepspeed["zero_optimization"]["stage"] == 2 and args.deepspeed["zero_optimization"]["overlap_comm"]
    lora = train_throughput.original_lora_config()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 32, 0.05)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"}
    assert lora.modules_to_save == ["embed_tokens", "lm_head"]


def test_mfu_counts_lora_and_logits_as_computed():
    from chla_launcher.sizing import ModelShape

    n = ModelShape.from_config(gpu.model_config(32)).total_params
    pretrain = gpu.pretrain_flops_per_token(32)
    assert 0.6 * 6 * n < pretrain < 0.8 * 6 * n  # 6N would overstate LoRA by ~1.4x
    full_logits = gpu.sft_flops_per_token(32, 32001, 100, 1.0)
    answers_only = gpu.sft_flops_per_token(32, 32001, 100, 0.05)
    assert answers_only < full_logits - 0.9 * 6 * 4096 * 32001  # the projection at 5% of positions
    assert train_throughput.model_flops_per_token() < train_throughput.six_n_per_token()
    assert gpu.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu.gpu_peak_flops("a CPU") is None


def test_layers_that_fit_follow_the_memory_model():
    assert gpu.layers_that_fit(80 * 2**30) == 32  # LLaMA-7B LoRA at micro-batch 8 x 512 fits an H100
    small = gpu.layers_that_fit(24 * 2**30)
    assert 1 <= small < 32
    assert gpu.planned_memory(small).peak <= 0.85 * 24 * 2**30 < gpu.planned_memory(small + 1).peak


@pytest.mark.slow
@pytest.mark.parametrize("script", ["gpu.py"])
def test_dry_run_needs_no_gpu(script):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--dry-run"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("MACHINE ") and "32 layers" in result.stdout


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch.nn.attention.varlen.varlen_attn's contract (tokens x heads x dim, causal within each
    segment when window_size is (-1, 0)), computed segment by segment with sdpa on CPU."""
    import torch

    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k)
    out = torch.empty_like(query)
    bounds = cu_seq_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        segment = [t[start:end].transpose(0, 1) for t in (query, key, value)]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            *segment, is_causal=True, scale=scale
        ).transpose(0, 1)
    return out


def test_varlen_check_attends_within_each_example(monkeypatch):
    """The attention function of gpu.py's varlen-packed-vs-padded check, given chla's
    flash_attention_2 inputs for two packed rows, gives each example the logits it gets alone under
    sdpa;
    without the boundaries (the control: flash_attention_2's behaviour with several rows) the
    later examples of a row see the earlier ones."""
    import numpy as np
    import torch
    import torch.nn.attention.varlen
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    from chla_train.packed_attention import packed_attention_inputs

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", reference_varlen_attn)
    AttentionInterface.register("chla_torch_varlen", gpu.torch_varlen_attention)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=100, initializer_range=1.0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("chla_torch_varlen")
    examples = [(0, 0, 4), (0, 4, 7), (0, 7, 8), (1, 0, 5), (1, 5, 8)]  # (row, start, end)
    position_ids = np.zeros((2, 8), dtype=np.int64)
    for row, start, end in examples:
        position_ids[row, start:end] = np.arange(end - start)
    batch = {
        "position_ids": position_ids,
        "cu_seq_lens": np.array([0, 4, 7, 8, 13, 16], dtype=np.int32),
        "max_seq_len": np.array(5),
    }
    inputs = packed_attention_inputs(batch, "flash_attention_2", dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        packed = model(input_ids=ids, use_cache=False, **inputs).logits
        leaky = model(input_ids=ids, use_cache=False, position_ids=inputs["position_ids"]).logits
        model.set_attn_implementation("sdpa")  # each example alone, through transformers' own path
        alone = [model(input_ids=ids[row : row + 1, start:end], use_cache=False).logits for row, start, end in examples]

    def worst_difference(logits):  # against each example alone, over all examples
        return max(
            (one - logits[row : row + 1, start:end]).abs().max().item()
            for one, (row, start, end) in zip(alone, examples)
        )

    packed_error, leaky_error = worst_difference(packed), worst_difference(leaky)
    assert packed_error < 1e-4
    assert leaky_error > 1.0  # the control: examples after the first of a row attend across


@pytest.mark.parametrize(
    ("kernel", "category"),
    [
        (
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas",
            "matmul",
        ),
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN", "matmul"),
        (
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>(Flash_fwd_params)",
            "attention",
        ),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
            "elementwise",
        ),
        ("Memcpy DtoD (Device -> Device)", "copy"),
        ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", "loss and softmax"),
        ("aten::addmm", "matmul"),
        ("a kernel of no known kind", "other"),  # the control: nothing matches
    ],
)
def test_kernels_are_sorted_by_kind(kernel, category):
    assert kernel_profile.kernel_category(kernel) == category


def test_profile_of_a_training_step_on_cpu():
    """profile_steps on a real forward and backward of a tiny LLaMA (aten operators' own time on a
    CPU): the categories add up to the busy time, matrix products are among them, and the top
    list is sorted."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=500,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 500, (4, 64))

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    summary = kernel_profile.profile_steps(step, steps=2, top=5)
    assert summary["device"] == "cpu" and summary["steps"] == 2
    assert 0 < summary["busy_s"] <= summary["wall_s"] * 1.05
    assert abs(sum(summary["categories"].values()) - summary["busy_s"]) < 1e-9
    assert summary["categories"].get("matmul", 0) > 0
    times = [seconds for _, _, seconds in summary["top"]]
    assert len(times) == 5 and times == sorted(times, reverse=True)
    lines = kernel_profile.format_profile("tiny", summary)
    assert lines[0].startswith("PROFILE tiny device=cpu steps=2") and "matmul=" in lines[0] and len(lines) == 6


def write_sentiment_run(root, *, shuffle_train_labels: bool):
    """A run directory as benchmarks/sentiment_reference.py reads it: the assets stage's three
    sentiment splits (reviews whose polarity shows in their words), the SFT stage's blend counts
    and the eval_task stage's accuracy."""
    import json
    import random

    rng = random.Random(0)
    cues = {"积极": "好棒赞喜欢满意", "消极": "差烂慢失望糟糕"}
    filler = "的了是在我有这个们来到时大地为子中你说生国年着就那和要她出也得里后自以会"

    def review(label):
        words = ["".join(rng.choice(filler) for _ in range(3)) for _ in range(3)] + [rng.choice(cues[label])] * 2
        rng.shuffle(words)
        return "，".join(words) + "。"

    tasks = root / "assets" / "out" / "tasks"
    tasks.mkdir(parents=True)
    for split, count in (("train", 200), ("valid", 100), ("test", 100)):
        labels = [rng.choice(["积极", "消极"]) for _ in range(count)]
        texts = [review(label) for label in labels]
        if split == "train" and shuffle_train_labels:
            rng.shuffle(labels)
        records = [{"task": "sentiment", "instruction": "-", "input": t, "output": y} for t, y in zip(texts, labels)]
        (tasks / f"sentiment_{split}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (root / "sft" / "out").mkdir(parents=True)
    (root / "sft" / "out" / "train_summary.json").write_text(json.dumps({"blend_samples": {"sentiment": 60}}))
    (root / "eval_task" / "out").mkdir(parents=True)
    results = {"tasks": {"task-sentiment_test": {"score": 0.61}}}
    (root / "eval_task" / "out" / "results.json").write_text(json.dumps(results))


@pytest.mark.parametrize("shuffled", [False, True])
def test_sentiment_reference_learns_the_words_that_carry_the_label(tmp_path, shuffled):
    write_sentiment_run(tmp_path, shuffle_train_labels=shuffled)
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sentiment_reference.py"), "--run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    figures = {
        line.split()[1].split("=")[0]: float(line.split()[1].split("=")[1])
        for line in result.stdout.splitlines()
        if line.startswith("RESULT ")
    }
    assert set(figures) == {f"logreg_{f}_{n}_test" for f in ("character", "jieba") for n in (200, 60)}
    if shuffled:  # the control: labels that no longer follow the words teach nothing
        assert max(figures.values()) < 0.75
    else:
        assert min(figures.values()) > 0.9
    assert "| the run's SFT model (greedy generation) | 60 | - | - | 0.610 |" in result.stdout
