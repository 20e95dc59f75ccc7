"""Where a training step's time goes, by kind of work: matrix products, attention, elementwise and
normalisation, reductions and the loss, memory copies, collectives, the rest.

benchmarks/gpu.py --profile runs a few steps of a configuration under torch.profiler and prints
this breakdown beside its MFU, so that one call on a GPU says what bounds the step: a step whose
GPU is busy most of the wall time but spends little of it in matrix products is bound by the
memory-bound kernels around them (fusion, FlashAttention); one whose GPU idles is bound by the
host (launches, Python, synchronisation). On a CPU the same summary counts aten operators' own
time instead of GPU kernels (the CPU has no kernels of its own to list).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

# First match wins. GPU kernel names (cuBLAS/CUTLASS, FlashAttention, PyTorch's own kernels) and
# aten operator names (on a CPU) alike.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("attention", r"flash|fmha|attention|attn|_efficient_|scaled_dot_product"),
        ("matmul", r"gemm|xmma|cutlass|cublas|nvjet|wgmma|aten::(mm|addmm|bmm|baddbmm|matmul|linear)\b"),
        ("collective", r"nccl|all_reduce|allreduce|all_gather|reduce_scatter|c10d|gloo"),
        ("copy", r"memcpy|memset|copy_kernel|aten::(copy_|to|_to_copy|clone|contiguous|cat|fill_|zero_|zeros|empty)\b"),
        ("loss and softmax", r"softmax|cross_entropy|nll_loss|log_softmax|logsumexp"),
        ("normalisation", r"norm|rsqrt|aten::(mean|pow|var)\b"),
        ("reduction", r"reduce|aten::(sum|max|min|argmax)\b"),
        ("embedding and indexing", r"embedding|index|gather|scatter"),
        ("elementwise", r"elementwise|vectorized|unrolled|aten::(mul|add|sub|div|silu|sigmoid|neg|cos|sin|exp|where)"),
        ("optimizer", r"adam|multi_tensor|foreach"),
    )
)


def kernel_category(name: str) -> str:
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def profile_steps(step: Callable[[], object], steps: int = 2, *, top: int = 15) -> dict:
    """Run `step` `steps` times under torch.profiler. Returns the wall seconds, the seconds the
    device worked (GPU kernels on CUDA; aten operators' own time on a CPU), those seconds by
    category, and the `top` kernels or operators by time (name, calls, seconds)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    rows = []
    for event in prof.key_averages():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            seconds = event.self_device_time_total / 1e6
        else:
            if not event.key.startswith("aten::"):
                continue
            seconds = event.self_cpu_time_total / 1e6
        if seconds > 0:
            rows.append((event.key, event.count, seconds))
    return summarize(rows, wall, device="cuda" if cuda else "cpu", steps=steps, top=top)


def summarize(rows: list[tuple[str, int, float]], wall: float, *, device: str, steps: int, top: int = 15) -> dict:
    busy = sum(seconds for _, _, seconds in rows)
    categories: dict[str, float] = {}
    for name, _, seconds in rows:
        category = kernel_category(name)
        categories[category] = categories.get(category, 0.0) + seconds
    return {
        "device": device,
        "steps": steps,
        "wall_s": wall,
        "busy_s": busy,
        "categories": dict(sorted(categories.items(), key=lambda item: -item[1])),
        "top": sorted(rows, key=lambda row: -row[2])[:top],
    }


def format_profile(name: str, summary: dict) -> list[str]:
    """A PROFILE line (shares of the busy time by category, and busy over wall time), then the
    top kernels, one per line."""
    busy = summary["busy_s"] or float("nan")
    shares = " ".join(
        f"{category.replace(' ', '_')}={seconds / busy:.3f}" for category, seconds in summary["categories"].items()
    )
    lines = [
        f"PROFILE {name} device={summary['device']} steps={summary['steps']} wall_s={summary['wall_s']:.3f} "
        f"busy_s={summary['busy_s']:.3f} busy_over_wall={summary['busy_s'] / summary['wall_s']:.3f} {shares}"
    ]
    for kernel, calls, seconds in summary["top"]:
        lines.append(f"  {seconds / busy:6.3f} {calls:6d}x {kernel_category(kernel):<22} {kernel[:110]}")
    return lines
