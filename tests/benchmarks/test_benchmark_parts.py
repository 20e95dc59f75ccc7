"""What the benchmarks compute before they time anything, checked on CPU: the original project's
HF Trainer arguments and LoRA setup, the FLOP counts behind the MFU figures, benchmarks/gpu.py's
choice of layers and its dry run (the GPU runs themselves need a CUDA machine)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ..helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu  # noqa: E402
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
