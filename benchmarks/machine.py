"""The machine a benchmark ran on, printed first by every benchmark.

This project's figures move 2-3x between machines of one nominal kind: an Intel with AMX computes
bf16 matmuls faster than fp32, an AMD EPYC without AVX-512 computes them ~84x slower. A figure
without its machine cannot be compared with anything, so each benchmark starts with

    MACHINE cpu="AMD EPYC" cores=2 flags=avx2,avx512f,avx512_bf16 torch_isa=AVX512 bf16=native ...

Usage from a benchmark script (benchmarks/ is the script's own directory, so it is importable):
    from machine import print_machine
    print_machine()
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

# The CPU features that decide which precision is fast on this machine.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "sentencepiece", "tokenizers")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, [flag for flag in RELEVANT_FLAGS if flag in flags]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "-"
    return versions


def torch_compute() -> dict[str, str]:
    """What torch itself will use: its dispatch ISA (ATEN_CPU_CAPABILITY can cap it) and the
    accelerator, when torch is installed."""
    try:
        import torch
    except ImportError:
        return {}
    info = {"torch_isa": torch.backends.cpu.get_cpu_capability(), "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return info


def machine_line() -> str:
    model, flags = cpu_model_and_flags()
    fields = {"cpu": model, "cores": str(usable_cores()), "flags": ",".join(flags) or "-"}
    fields.update(torch_compute())
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS"):
        if os.environ.get(name):
            fields[name] = os.environ[name]
    fields.update(library_versions())
    return "MACHINE " + " ".join(
        f'{key}="{value}"' if " " in value else f"{key}={value}" for key, value in fields.items()
    )


def print_machine() -> None:
    print(machine_line(), flush=True)


if __name__ == "__main__":
    print_machine()
