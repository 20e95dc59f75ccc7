"""DeepSpeed, imported so that two parts of it that chla never runs cost nothing at start-up.

- **MLflow.** `import deepspeed` imports its autotuner, which imports MLflow whenever it is
  installed (chla's `mlflow` tracking backend installs it) only to log autotuning trials; MLflow
  brings pandas, FastAPI and OpenTelemetry with it. It is hidden while DeepSpeed imports (not at
  all when something, a tracking backend, imported it first) and stays importable after.
- **The Muon optimizer's compilation.** ZeRO imports DeepSpeed's Muon optimizer on every run (to
  check the optimizer's type), and that module wraps its kernels in `torch.compile` at import,
  which imports TorchInductor's compiler even on a CPU run that compiles nothing. DeepSpeed's
  `compiler.compile()` (only Muon uses it) is made lazy: the wrapping happens at a kernel's first
  call, which no chla run makes (its optimizer is torch's AdamW).

Measured on a 2-core AVX2 EPYC: importing the training stack (torch, transformers, DeepSpeed,
PEFT, chla's stages) took 15.0 s with MLflow and 11.4 s without; importing the Muon module, 1.9 s
before and 0.002 s after. Both were paid by every training process."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_deepspeed() -> ModuleType:
    if "deepspeed" not in sys.modules:
        hide_mlflow = "mlflow" not in sys.modules
        if hide_mlflow:
            sys.modules["mlflow"] = None  # type: ignore[assignment]  # the autotuner's `import mlflow` fails
        try:
            importlib.import_module("deepspeed")
        finally:
            if hide_mlflow and sys.modules.get("mlflow", False) is None:
                del sys.modules["mlflow"]
    if MUON_MODULE not in sys.modules:  # its kernels are not decorated yet
        compiler = importlib.import_module("deepspeed.runtime.compiler")
        compiler.compile = lambda: compile_at_first_call  # type: ignore[attr-defined]
    return sys.modules["deepspeed"]


def compile_at_first_call(function: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compile(function)`, done when the function is first called instead of now."""
    compiled: Callable[..., Any] | None = None

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(function)
        return compiled(*args, **kwargs)

    return call
