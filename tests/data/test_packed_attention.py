"""Packed SFT rows give the padded batch's loss under every attention backend the trainer offers.

sdpa and eager run for real. flash_attention_2 needs a GPU and the flash-attn package, so its two
kernels (flash_attn_func, flash_attn_varlen_func) are replaced by CPU stand-ins with the same
signatures that compute sdpa one varlen segment at a time and record the boundaries they get;
everything above the kernels is transformers' own FlashAttention path (mask creation, the
choice between the dense and the varlen kernel, unpadding of the padded batch). Each equality
has a control that leaks attention between the examples of a row and must differ.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from chla_tools.sft_data import collate_sft, collate_sft_packed, load_sft_dataset
from chla_train.model_config import llama_config
from chla_train.trainer import Trainer

from ..helpers import trainer_stub


@pytest.fixture(scope="module")
def case(demo_assets, tmp_path_factory):
    """16 real SFT examples (padded, packed, packed with the shared prompt prefix) and a tiny fp32
    LLaMA whose attention is peaked enough that any leak shows in the loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("packed")
    with open(demo_assets["sft_train"], encoding="utf-8") as handle:
        records = json.load(handle)[:16]
    path = root / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    dataset = load_sft_dataset(path, demo_assets["base_tokenizer"], max_seq_length=256, cache_dir=root / "cache")
    examples = [dataset[i] for i in range(len(dataset))]
    torch.manual_seed(0)
    shape = llama_config(
        vocab=dataset.vocab_size, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, positions=512
    )
    # Weights this large make attention peaked: a leak between the examples of a row moves the
    # summed loss by ~5e-4 of itself on these records (at 0.3 it was ~1e-5 on some data, no more
    # than the equality tolerance).
    config = LlamaConfig(**shape, initializer_range=1.0, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    return types.SimpleNamespace(
        examples=examples,
        model=model,
        padded=collate_sft(examples, dataset.pad_id),
        packed=collate_sft_packed(examples, dataset.pad_id, row_length=256),
        shared=collate_sft_packed(examples, dataset.pad_id, row_length=256, share_prefix=True),
    )


def trainer_loss(model, batch, implementation: str) -> float:
    """The trainer's summed token loss of `batch` with the model's attention set to `implementation`."""
    model.config._attn_implementation = implementation
    trainer = trainer_stub(model)
    with torch.no_grad():
        return Trainer._forward(trainer, batch).item()


def plain_call_loss(model, batch, implementation: str, **inputs) -> float:
    """The summed token loss of the model called with `inputs` as they are (no trainer)."""
    model.config._attn_implementation = implementation
    one = torch.ones(())
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(batch["input_ids"]),
            labels=torch.from_numpy(batch["labels"]),
            num_items_in_batch=one,
            use_cache=False,
            **inputs,
        ).loss.item()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_loss(case, implementation):
    padded = trainer_loss(case.model, case.padded, implementation)
    packed = trainer_loss(case.model, case.packed, implementation)
    shared = trainer_loss(case.model, case.shared, implementation)
    assert packed == pytest.approx(padded, rel=1e-5)
    assert shared == pytest.approx(padded, rel=1e-5)

    # Controls. The packed rows with positions that do not restart: examples see each other.
    rows, width = case.packed["input_ids"].shape
    leaky = dict(case.packed, position_ids=np.tile(np.arange(width), (rows, 1)))
    assert abs(trainer_loss(case.model, leaky, implementation) - padded) > 1e-4 * padded
    # The shared-prefix rows' boolean mask handed to the model as is (what the trainer did before):
    # sdpa reads it right, eager adds 1/0 to the scores and masks nothing.
    as_is = plain_call_loss(
        case.model,
        case.shared,
        implementation,
        position_ids=torch.from_numpy(case.shared["position_ids"]),
        attention_mask=torch.from_numpy(case.shared["packed_attention_mask"])[:, None],
    )
    if implementation == "sdpa":
        assert as_is == pytest.approx(padded, rel=1e-5)
    else:
        assert abs(as_is - padded) > 1e-4 * padded


class ReferenceFlashKernels:
    """CPU stand-ins for flash-attn's two kernels, with their signatures: (batch, seq, heads, dim)
    for the dense one, (tokens, heads, dim) plus cumulative boundaries for the varlen one. Each
    segment is computed with sdpa on its own; the varlen calls' boundaries are recorded."""

    def __init__(self) -> None:
        self.varlen_calls: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        self.dense_calls = 0

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        self.dense_calls += 1
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=causal,
            scale=softmax_scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2)

    def flash_attn_varlen_func(
        self,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q=None,
        max_seqlen_k=None,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
    ):
        self.varlen_calls.append((cu_seqlens_q.clone(), cu_seqlens_k.clone(), max_seqlen_q, max_seqlen_k))
        out = torch.empty_like(q)
        for (qs, qe), (ks, ke) in zip(
            zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()),
            zip(cu_seqlens_k[:-1].tolist(), cu_seqlens_k[1:].tolist()),
        ):
            segment = torch.nn.functional.scaled_dot_product_attention(
                q[qs:qe].transpose(0, 1),
                k[ks:ke].transpose(0, 1),
                v[ks:ke].transpose(0, 1),
                is_causal=causal,
                scale=softmax_scale,
                enable_gqa=True,
            )
            out[qs:qe] = segment.transpose(0, 1)
        return out


@pytest.fixture()
def flash_kernels(monkeypatch):
    import transformers.modeling_flash_attention_utils as flash_utils

    kernels = ReferenceFlashKernels()
    monkeypatch.setattr(
        flash_utils,
        "_lazy_imports",
        lambda *args, **kwargs: (
            kernels.flash_attn_func,
            kernels.flash_attn_varlen_func,
            None,
            flash_utils._pad_input,
            flash_utils._unpad_input,
        ),
    )
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    return kernels


def test_flash_attention_gets_each_examples_boundaries(case, flash_kernels):
    layers = case.model.config.num_hidden_layers
    padded = trainer_loss(case.model, case.padded, "flash_attention_2")
    assert flash_kernels.dense_calls == 0 and len(flash_kernels.varlen_calls) == layers  # unpadded by its mask
    flash_kernels.varlen_calls.clear()

    packed = trainer_loss(case.model, case.packed, "flash_attention_2")
    assert packed == pytest.approx(padded, rel=1e-5)
    assert padded == pytest.approx(trainer_loss(case.model, case.padded, "sdpa"), rel=1e-5)
    # Every layer's kernel got the same boundaries, and they cut the flattened rows into exactly
    # the examples (each once, whole) and the rows' pad tails.
    assert flash_kernels.dense_calls == 0 and len(flash_kernels.varlen_calls) == layers
    cu_q, cu_k, max_q, max_k = flash_kernels.varlen_calls[0]
    assert all(torch.equal(call[0], cu_q) and torch.equal(call[1], cu_q) for call in flash_kernels.varlen_calls)
    assert torch.equal(cu_k, cu_q) and cu_q.dtype == torch.int32
    bounds = cu_q.tolist()
    assert max_q == max_k == max(np.diff(bounds)) and isinstance(max_q, int)
    flat_ids = case.packed["input_ids"].reshape(-1)
    flat_real = case.packed["attention_mask"].reshape(-1)
    segments = [(flat_ids[a:b].tolist(), flat_real[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    real = sorted(ids for ids, mask in segments if mask.all())
    assert real == sorted(example["input_ids"].tolist() for example in case.examples)
    assert all(not mask.any() for _, mask in segments if not mask.all())  # the rest: pad tails only
    width = case.packed["input_ids"].shape[1]
    assert set(range(0, flat_ids.size, width)) <= set(bounds)  # no segment crosses a row

    # Control: the same rows with only the restarting position ids, as transformers reads them for
    # FlashAttention: several rows are "not packed", so the dense kernel attends across examples.
    flash_kernels.varlen_calls.clear()
    leaky = plain_call_loss(
        case.model, case.packed, "flash_attention_2", position_ids=torch.from_numpy(case.packed["position_ids"])
    )
    assert flash_kernels.dense_calls == layers and not flash_kernels.varlen_calls
    assert abs(leaky - padded) > 1e-4 * padded


def test_shared_prefix_is_refused_under_flash_attention(case):
    from pydantic import ValidationError

    from chla_launcher.contract.errors import ChlaError
    from chla_launcher.contract.kinds.sft import SftParams
    from chla_train.packed_attention import packed_attention_inputs

    with pytest.raises(ValidationError, match="contiguous segment"):
        SftParams(
            tokenizer="t",
            train_file="f",
            init={},
            pack_batches=True,
            share_prompt_prefix=True,
            attn_implementation="flash_attention_2",
        )
    with pytest.raises(ChlaError, match="contiguous segment"):
        packed_attention_inputs(case.shared, "flash_attention_2", dtype=torch.float32, device=torch.device("cpu"))
