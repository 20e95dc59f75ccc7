"""Which floating-point type a stage computes in (`precision: auto | bf16 | fp32`), and why.

`auto` is bf16 only where the hardware multiplies bf16 natively: a CUDA GPU that supports it, or
a CPU with AVX512-BF16 or AMX that torch and oneDNN are allowed to use. Everywhere else it is
fp32, because emulated bf16 is far slower than fp32: on an AVX2-only AMD EPYC a 1024x1024 bf16
matmul took 2.37 s against 28 ms in fp32 (one thread), and a demo tuned on a bf16 machine ran
twice as long there. fp16 is never chosen: it fails under DeepSpeed on CPU and needs loss scaling.

The CPU check reads what the libraries will actually use, not only the CPU's flags: torch's
dispatch ISA (`torch.backends.cpu.get_cpu_capability()`, which ATEN_CPU_CAPABILITY caps) and
oneDNN's (ONEDNN_MAX_CPU_ISA caps it; oneDNN runs torch's bf16 matmuls on CPU). With either capped
below AVX-512 BF16, bf16 is emulated, so `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` on a
bf16 machine behaves, and is treated, like an AVX2-only CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# oneDNN's ISA names (the values ONEDNN_MAX_CPU_ISA takes), lowest first. Aliases share a rank.
_ONEDNN_ISA_RANK = {
    "SSE41": 1,
    "AVX": 2,
    "AVX2": 3,
    "AVX2_VNNI": 4,
    "AVX2_VNNI_2": 5,
    "AVX512_CORE": 6,
    "AVX512_CORE_VNNI": 7,
    "AVX512_CORE_BF16": 8,
    "AVX10_1_512": 9,
    "AVX512_CORE_FP16": 9,
    "AVX10_1_512_AMX": 10,
    "AVX512_CORE_AMX": 10,
    "AVX10_1_512_AMX_FP16": 11,
    "AVX512_CORE_AMX_FP16": 11,
    "ALL": 99,
    "DEFAULT": 99,
}
_ONEDNN_BF16_RANK = _ONEDNN_ISA_RANK["AVX512_CORE_BF16"]
# torch's dispatch capabilities at which its CPU kernels use AVX-512 (bf16 instructions included).
_TORCH_AVX512_CAPABILITIES = {"AVX512", "AVX512_BF16", "AMX"}


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    name: str  # "bf16" | "fp32", as a recipe writes it
    reason: str  # one line: why this type (logged and written to state.json)

    def record(self) -> dict[str, str]:
        """The fields a stage adds to its state.json metrics and train summary."""
        return {"precision": self.name, "precision_reason": self.reason}


def choose_precision(requested: str) -> Precision:
    """The compute type for `precision: requested` on this machine, with the reason."""
    if requested == "bf16":
        return Precision(torch.bfloat16, "bf16", "precision: bf16 set in the recipe")
    if requested == "fp32":
        return Precision(torch.float32, "fp32", "precision: fp32 set in the recipe")
    if requested != "auto":
        raise ValueError(f"unknown precision {requested!r}")
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "bf16", f"auto: CUDA GPU {torch.cuda.get_device_name()} computes bf16")
        return Precision(torch.float32, "fp32", f"auto: CUDA GPU {torch.cuda.get_device_name()} has no bf16")
    native, why = cpu_bf16_native()
    return Precision(torch.bfloat16 if native else torch.float32, "bf16" if native else "fp32", f"auto: {why}")


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this process's CPU matmuls run bf16 in hardware, and a one-line reason."""
    has_avx512_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    has_amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    if not (has_avx512_bf16 or has_amx):
        return False, "the CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, slower than fp32): fp32"
    flags = "+".join(name for name, present in (("avx512_bf16", has_avx512_bf16), ("amx", has_amx)) if present)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _TORCH_AVX512_CAPABILITIES:
        return False, (
            f"the CPU has {flags} but torch dispatches {capability} kernels "
            f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')}): fp32"
        )
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if onednn_cap:
        rank = _ONEDNN_ISA_RANK.get(onednn_cap.strip().upper())
        if rank is None or rank < _ONEDNN_BF16_RANK:
            return False, (
                f"the CPU has {flags} but ONEDNN_MAX_CPU_ISA={onednn_cap} keeps oneDNN below AVX512_CORE_BF16: fp32"
            )
    return True, f"the CPU computes bf16 natively ({flags}, torch {capability} kernels): bf16"
