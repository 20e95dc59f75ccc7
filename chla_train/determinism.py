"""`deterministic: true` for a training stage: the same recipe, seed and machine give bitwise the
same weights on a GPU too, at a cost in speed.

On a CPU chla's training is already bitwise reproducible (its resume test compares weights
bitwise). On CUDA it is not by default: several kernels accumulate with atomic additions in
whatever order the threads finish (the embedding and index_add/scatter backward passes, cuBLAS's
split-K reductions with more than one workspace stream, flash-attn's backward for dq), and cuDNN
and cuBLAS pick algorithms by benchmarking. Turned on here:

- torch.use_deterministic_algorithms(True) (PyTorch's deterministic implementation of every op
  that has one; warn_only=False, see below), torch.backends.cudnn.deterministic = True and
  cudnn.benchmark = False;
- CUBLAS_WORKSPACE_CONFIG=:4096:8, which cuBLAS reads when it creates its workspace: set by the
  job entry before torch is imported (chla_train.entry), and again here for a stage started some
  other way; a value already set to one of the two settings cuBLAS documents as deterministic
  (:4096:8, :16:8) is kept;
- FLASH_ATTENTION_DETERMINISTIC=1, which transformers reads to pass `deterministic=True` to
  flash-attn's kernels (flash-attn >= 2.4.1): PyTorch's switch does not reach flash-attn, whose
  default backward is not deterministic and would silently break the promise.

warn_only=False: an op with no deterministic implementation raises (naming the op) at its first
call, in the first training step, instead of a run that is silently not reproducible. The ops a
chla stage runs (LLaMA layers under sdpa or flash_attention_2, the chunked loss, AdamW, DeepSpeed's
ZeRO reductions) are exercised by the GPU test layer (`pytest -m gpu`) with this mode on.

The cost, not measured by chla (no GPU where it was written): PyTorch's reproducibility notes
say only that deterministic operations "are often slower"; reports for transformer training range
from a few percent to a few tens of percent of step time, depending on how much of the step the
replaced kernels are (embedding backward becomes a sort plus a segmented sum; flash-attn's
deterministic backward is, in its own words, "slightly slower and uses more memory"). cuBLAS's
:4096:8 reserves 8 x 4 MiB of workspace per stream. Under the mode torch also fills the memory of
every tensor made by torch.empty & co. (NaN for floats: torch.utils.deterministic.
fill_uninitialized_memory), one extra write per such allocation. On a CPU the mode costs next to
nothing. Off by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# cuBLAS's two deterministic workspace settings (its documentation, "Results reproducibility").
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def prepare_environment(deterministic: bool) -> None:
    """Set the variables the CUDA libraries read when they start, for a stage with
    `deterministic: true`. Torch-free: the job entry calls it before anything imports torch."""
    if not deterministic:
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"


@dataclass(frozen=True)
class DeterminismChoice:
    enabled: bool
    reason: str  # one line: what is set (logged and written to state.json)

    def record(self) -> dict[str, object]:
        """The fields a stage adds to its state.json metrics and train summary."""
        return {"deterministic": self.enabled, "deterministic_reason": self.reason}


def apply_determinism(deterministic: bool) -> DeterminismChoice:
    """Switch this process to deterministic algorithms for `deterministic: true` (and leave
    PyTorch's defaults otherwise); the choice, read back from torch, to log and record."""
    import torch

    if not deterministic:
        return DeterminismChoice(False, "deterministic: false (GPU kernels may differ bitwise between runs)")
    prepare_environment(True)
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    settings = [
        f"torch deterministic algorithms {'on' if torch.are_deterministic_algorithms_enabled() else 'OFF'}",
        f"cudnn.deterministic {torch.backends.cudnn.deterministic}, benchmark {torch.backends.cudnn.benchmark}",
        f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}",
        f"FLASH_ATTENTION_DETERMINISTIC={os.environ['FLASH_ATTENTION_DETERMINISTIC']}",
    ]
    return DeterminismChoice(True, "deterministic: true: " + ", ".join(settings))
