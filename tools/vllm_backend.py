"""vLLM as the `evaluate` stage's generation backend (`backend: vllm`), where vLLM is installed
(a CUDA GPU node; it is not a dependency of chla).

chla's generation settings map onto vLLM's arguments here and nowhere else:

    chla (and the original project's inference_hf.py)     vLLM
    max_new_tokens                                        SamplingParams.max_tokens
    temperature (0: greedy)                               SamplingParams.temperature (0: greedy)
    top_k / top_p (only when sampling)                    SamplingParams.top_k / top_p
    repetition_penalty (HF's: every token seen so far)    SamplingParams.repetition_penalty (same rule)
    seed                                                  SamplingParams.seed
    the model directory (a merged model)                  LLM(model=..., tokenizer=...)
    dtype (bf16 / fp16 / fp32 / auto)                     LLM(dtype="bfloat16" | "float16" | "float32" | "auto")
    tensor_parallel_size (GPUs per model)                 LLM(tensor_parallel_size=...)

Prompts go in as token ids, encoded by chla (exactly one BOS, as training saw them), so both
backends generate from the same tokens. vLLM applies no LoRA adapters here: give it a merged
model (a `merge` stage's output). Perplexity and log-likelihood scoring stay with the HF backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chla_launcher.contract.errors import ChlaError

# The original project's generation settings (scripts/inference/inference_hf.py).
ORIGINAL_GENERATION = {"temperature": 0.2, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 400}
_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def sampling_params_kwargs(
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> dict[str, Any]:
    """vllm.SamplingParams(**this) for chla's generation settings."""
    if max_new_tokens < 1:
        raise ChlaError(f"max_new_tokens {max_new_tokens}: must be at least 1")
    if temperature < 0:
        raise ChlaError(f"temperature {temperature}: must be 0 (greedy) or more")
    kwargs: dict[str, Any] = {
        "max_tokens": max_new_tokens,
        "temperature": float(temperature),
        "repetition_penalty": float(repetition_penalty),
        "skip_special_tokens": True,
    }
    if temperature > 0:  # HF ignores top_k/top_p when greedy; vLLM would still apply them
        kwargs["top_k"] = -1 if top_k in (None, 0) else int(top_k)  # vLLM: -1 = every token
        kwargs["top_p"] = 1.0 if top_p is None else float(top_p)
    if seed is not None:
        kwargs["seed"] = int(seed)
    return kwargs


def llm_kwargs(
    model_dir: str,
    *,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """vllm.LLM(**this) for a merged chla model directory."""
    if dtype not in _DTYPES:
        raise ChlaError(f"vllm dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    if tensor_parallel_size < 1:
        raise ChlaError(f"tensor_parallel_size {tensor_parallel_size}: must be at least 1")
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": _DTYPES[dtype],
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "seed": seed,
        "trust_remote_code": False,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    return kwargs


@dataclass
class VllmGenerator:
    """Stands in for the HF model in chla_tools.evaluate.generate_all."""

    llm: Any
    tokenizer: Any
    seed: int | None = None

    @classmethod
    def load(cls, model_dir: str, adapters: list[str], settings, tokenizer) -> VllmGenerator:
        if adapters:
            raise ChlaError(
                f"backend vllm generates with a merged model; merge the adapters {adapters} "
                "into the base first (a `merge` stage) and evaluate its output"
            )
        try:
            from vllm import LLM
        except ImportError:
            raise ChlaError(
                "backend vllm: vLLM is not installed here (it needs a CUDA GPU node); "
                "install it there, or use backend: hf"
            ) from None
        return cls(
            LLM(
                **llm_kwargs(
                    model_dir,
                    dtype=settings.dtype,
                    tensor_parallel_size=settings.tensor_parallel_size,
                    gpu_memory_utilization=settings.gpu_memory_utilization,
                )
            ),
            tokenizer,
        )

    def generate_texts(self, prompts: list[str], *, max_new_tokens: int, **sampling) -> list[str]:
        from vllm import SamplingParams

        from chla_tools.inference import encode_prompt

        params = SamplingParams(**sampling_params_kwargs(max_new_tokens=max_new_tokens, **sampling))
        requests = [{"prompt_token_ids": encode_prompt(self.tokenizer, prompt)} for prompt in prompts]
        return [result.outputs[0].text for result in self.llm.generate(requests, params, use_tqdm=False)]
