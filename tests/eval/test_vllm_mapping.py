"""The vLLM backend's argument mapping (vLLM itself needs a CUDA GPU, which this machine lacks:
these tests check what chla would pass to vllm.SamplingParams and vllm.LLM, not a run)."""

from __future__ import annotations

import pytest

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.evaluate import EvaluateParams
from chla_tools.vllm_backend import ORIGINAL_GENERATION, llm_kwargs, sampling_params_kwargs


def test_the_original_projects_sampling_settings():
    kwargs = sampling_params_kwargs(**ORIGINAL_GENERATION, seed=7)
    assert kwargs == {
        "max_tokens": 400,
        "temperature": 0.2,
        "top_k": 40,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "seed": 7,
        "skip_special_tokens": True,
    }


def test_greedy_drops_the_sampling_filters():
    """HF ignores top_k/top_p when greedy; vLLM would apply them, so they are not passed."""
    kwargs = sampling_params_kwargs(max_new_tokens=3, temperature=0.0, top_k=40, top_p=0.9)
    assert kwargs == {"max_tokens": 3, "temperature": 0.0, "repetition_penalty": 1.0, "skip_special_tokens": True}


def test_no_top_k_is_vllms_minus_one():
    assert sampling_params_kwargs(max_new_tokens=5, temperature=0.7)["top_k"] == -1
    assert sampling_params_kwargs(max_new_tokens=5, temperature=0.7, top_k=0)["top_k"] == -1


def test_llm_arguments():
    assert llm_kwargs("/models/merged", dtype="bf16", tensor_parallel_size=4, gpu_memory_utilization=0.8) == {
        "model": "/models/merged",
        "tokenizer": "/models/merged",
        "dtype": "bfloat16",
        "tensor_parallel_size": 4,
        "gpu_memory_utilization": 0.8,
        "seed": 0,
        "trust_remote_code": False,
    }
    assert llm_kwargs("/m")["dtype"] == "auto"


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(max_new_tokens=4, temperature=-1)])
def test_bad_sampling_settings_are_one_line(bad):
    with pytest.raises(ChlaError):
        sampling_params_kwargs(**bad)


def test_recipe_settings_and_what_vllm_cannot_do():
    params = EvaluateParams.model_validate(
        {"model": "/m", "tasks": ["/t.json"], "backend": "vllm", "vllm": {"dtype": "fp16", "tensor_parallel_size": 2}}
    )
    assert (
        llm_kwargs(params.model, dtype=params.vllm.dtype, tensor_parallel_size=params.vllm.tensor_parallel_size)[
            "dtype"
        ]
        == "float16"
    )
    for unsupported in ({"ppl": ["/p.txt"]}, {"adapters": ["/a"]}):
        with pytest.raises(ValueError, match="backend vllm only generates"):
            EvaluateParams.model_validate({"model": "/m", "tasks": ["/t.json"], "backend": "vllm", **unsupported})


def test_without_vllm_installed_the_stage_says_so(tmp_path):
    from chla_tools.vllm_backend import VllmGenerator

    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ChlaError, match="vLLM is not installed"):
        VllmGenerator.load("/m", [], EvaluateParams.model_validate({"model": "/m", "tasks": ["/t"]}).vllm, None)
