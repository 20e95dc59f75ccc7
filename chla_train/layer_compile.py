"""Whether a training stage compiles its decoder layers (`torch_compile: auto | true | false`),
and why; and compiling them.

What it buys on a GPU: eager PyTorch runs every RMSNorm, rotary embedding, SiLU-and-multiply,
LoRA dropout, scale and add as a kernel of its own, each a full pass over the activations. In
chla's LoRA pretraining step on a LLaMA-7B-shaped model (32 layers, bf16, 8 x 512 tokens) on an
NVIDIA H200 those elementwise kernels took a third of the GPU's busy time and matrix products under
half; with each decoder layer compiled (TorchInductor fuses them into a few Triton kernels) the
elementwise share fell to 4% and the step ran 1.33x faster (10,417 -> 13,807 tokens/s; packed SFT
1.30x; `benchmarks/gpu.py --profile` measures both). On a CPU it bought nothing measurable (a
2-layer, 128-wide model on a 2-core EPYC: 1,646 tokens/s eager, 1,624 compiled) and compiling costs
~20 s a run, so `auto` leaves CPU runs eager.

Why each decoder layer rather than the whole model: the layers share their code and shapes, so one
compiled graph serves all of them (~8 s of compilation on the H200 for 32 layers), and what changes
from batch to batch stays outside the compiled graphs: the hook that projects only the label
positions onto the vocabulary (chla_train.trainer), the packed-attention inputs. `Module.compile()`
compiles in place, so parameter names, checkpoints and adapters are unchanged.

`auto` compiles only layers whose attention is sdpa or eager: flash_attention_2 compiled has not
been run (flash-attn could not be installed where the GPU figures above were measured).

ZeRO-3 is left eager: it gathers each layer's partitioned parameters in module hooks that run
collectives, which a compiled layer would either break its graph on or trace into. The recipe
validator refuses `torch_compile: true` with `zero_stage: 3`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompileChoice:
    enabled: bool
    reason: str  # one line: why (logged and written to state.json)

    def record(self) -> dict[str, object]:
        """The fields a stage adds to its state.json metrics and train summary."""
        return {"torch_compile": self.enabled, "torch_compile_reason": self.reason}


def choose_compile(requested: bool | str, *, zero_stage: int, attention: str) -> CompileChoice:
    """Whether to compile the decoder layers for `torch_compile: requested` on this machine, for
    a model whose attention runs through `attention` (the implementation it was loaded with)."""
    if requested is True:
        return CompileChoice(True, "torch_compile: true set in the recipe")
    if requested is False:
        return CompileChoice(False, "torch_compile: false set in the recipe")
    if requested != "auto":
        raise ValueError(f"unknown torch_compile {requested!r}")
    if not torch.cuda.is_available():
        return CompileChoice(False, "auto: no CUDA GPU (on a CPU compiling costs more than it saves)")
    if zero_stage == 3:
        return CompileChoice(False, "auto: ZeRO-3 gathers parameters in module hooks; layers stay eager")
    if attention not in ("sdpa", "eager"):
        return CompileChoice(False, f"auto: {attention} attention has not been measured compiled; layers stay eager")
    from torch.utils._triton import has_triton

    if not has_triton():
        return CompileChoice(False, "auto: Triton is not installed (TorchInductor needs it on a GPU)")
    return CompileChoice(True, f"auto: CUDA GPU {torch.cuda.get_device_name()} with Triton")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules whose class transformers names in the model's
    `_no_split_modules` (LlamaDecoderLayer for LLaMA), under a PEFT wrapper too."""
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in base.modules() if type(module).__name__ in names]


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile each decoder layer in place (TorchInductor; compiled at its first call). Returns
    how many; 0 where the model names no decoder layer class."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
