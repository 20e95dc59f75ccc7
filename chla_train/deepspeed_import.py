"""DeepSpeed, imported without MLflow, which it imports for a part of it that chla never runs.

`import deepspeed` imports its autotuner, which imports MLflow whenever MLflow is installed (chla's
`mlflow` tracking backend installs it) only to log autotuning trials; MLflow brings pandas,
FastAPI and OpenTelemetry with it. Measured on a 2-core AVX2 EPYC: importing the training stack
(torch, transformers, DeepSpeed, PEFT, chla's stages) took 15.0 s with MLflow and 11.4 s without,
in every training and merge process. DeepSpeed's autotuner is never run by chla, so nothing a
stage computes changes. MLflow itself stays importable: it is hidden only while DeepSpeed imports,
and not at all when something (a tracking backend) imported it first. Every place in chla that
uses DeepSpeed imports it through `import_deepspeed`.

(DeepSpeed's Muon optimizer costs seconds too, wrapping its kernels in `torch.compile` at import,
but ZeRO imports it unconditionally on every backward pass: it cannot be left out.)"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide_mlflow = "mlflow" not in sys.modules
    if hide_mlflow:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # the autotuner's `import mlflow` fails
    try:
        return importlib.import_module("deepspeed")
    finally:
        if hide_mlflow and sys.modules.get("mlflow", False) is None:
            del sys.modules["mlflow"]
