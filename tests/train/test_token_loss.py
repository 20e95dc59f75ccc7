"""The chunked vocabulary projection + loss gives transformers' loss and gradients.

fp32: the same to summation order (rel 1e-5). bf16: transformers' own arithmetic (logits in bf16,
softmax in fp32, the gradient cast to bf16 before the matmuls), so the same up to bf16 rounding.
Controls: a gradient with a target shifted by one position differs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import chla_train.token_loss as token_loss
from chla_train.model_config import llama_config
from chla_train.token_loss import ChunkedLinearCrossEntropy
from chla_train.trainer import Trainer

from ..helpers import small_lora, trainer_stub


def reference_loss(hidden, weight, targets):
    """transformers' ForCausalLMLoss on already shifted targets, summed."""
    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")


def gradient_tolerance(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def assert_chunked_matches(reference, hidden, weight, *args):
    """ChunkedLinearCrossEntropy and `reference` on copies of `hidden` and `weight` (and `args`),
    each loss scaled as the trainer scales the sum before backward: the same loss and gradients.
    Returns the reference's loss, its gradient of `hidden` and the chunked one, for the controls."""
    results = []
    for compute in (ChunkedLinearCrossEntropy.apply, reference):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = compute(h, w, *args)
        (loss * 0.37).backward()
        results.append((loss.detach(), h.grad.float(), w.grad.float()))
    (chunked_loss, chunked_dh, chunked_dw), (loss, dh, dw) = results
    tolerance = gradient_tolerance(hidden.dtype)
    assert chunked_loss.item() == pytest.approx(loss.item(), rel=1e-6 if hidden.dtype == torch.float32 else 1e-3)
    assert torch.allclose(chunked_dh, dh, rtol=tolerance, atol=tolerance * dh.abs().max().item())
    assert torch.allclose(chunked_dw, dw, rtol=tolerance, atol=tolerance * dw.abs().max().item())
    return loss, dh, chunked_dh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_and_gradients_match_transformers(monkeypatch, dtype):
    monkeypatch.setitem(token_loss.LOGITS_PER_CHUNK, "cpu", 3 * 500)  # 3 positions a chunk: 7 chunks
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=generator).to(dtype)
    weight = (torch.randn(500, 16, generator=generator) * 0.5).to(dtype)
    targets = torch.randint(0, 500, (20,), generator=generator)
    _loss, dh, chunked_dh = assert_chunked_matches(reference_loss, hidden, weight, targets)
    tolerance = gradient_tolerance(dtype)
    # Control: one target moved gives another gradient.
    moved = targets.clone()
    moved[5] = (moved[5] + 1) % 500
    h = hidden.clone().requires_grad_()
    ChunkedLinearCrossEntropy.apply(h, weight, moved).backward()
    assert not torch.allclose(h.grad.float() * 0.37, chunked_dh, rtol=tolerance, atol=tolerance * dh.abs().max().item())


@pytest.mark.parametrize("labels_kind", ["pretrain", "sft"])
def test_trainer_loss_and_adapter_gradients_match_transformers(labels_kind, monkeypatch):
    """The trainer's forward on a LoRA model with embed_tokens/lm_head trained (PEFT's
    modules_to_save wrapper in front of the projection) against transformers' own loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**llama_config(vocab=300, hidden=32, intermediate=64, layers=2, heads=4, positions=64))
    model = small_lora(LlamaForCausalLM(config))
    for name, param in model.named_parameters():  # LoRA B starts at 0: give it gradients that show
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, 300, size=(3, 24))
    labels = input_ids.copy()
    if labels_kind == "sft":
        labels[:, :15] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    trainer = trainer_stub(model)
    chunked_calls = []
    forward = ChunkedLinearCrossEntropy.forward
    monkeypatch.setattr(
        ChunkedLinearCrossEntropy, "forward", staticmethod(lambda *args: chunked_calls.append(1) or forward(*args))
    )

    gradients = []
    for compute in (
        lambda: Trainer._forward(trainer, batch),
        lambda: (
            model(
                input_ids=torch.from_numpy(input_ids),
                labels=torch.from_numpy(labels),
                num_items_in_batch=torch.ones(()),
            ).loss
        ),
    ):
        model.zero_grad()
        loss = compute()
        loss.backward()
        gradients.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (reference, reference_grads) = gradients
    assert chunked_calls == [1]  # the trainer's loss went through the chunked projection
    assert loss == pytest.approx(reference, rel=1e-5)
    assert grads.keys() == reference_grads.keys() and any("lm_head" in name for name in grads)
    for name in grads:
        assert torch.allclose(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_chunked_loss_and_gradients_match_the_weighted_reference(monkeypatch, dtype):
    """Per-target weights (SFT's loss_mean: example): sum_i w_i CE_i, and its gradients."""
    monkeypatch.setitem(token_loss.LOGITS_PER_CHUNK, "cpu", 3 * 500)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, 16, generator=generator).to(dtype)
    weight = (torch.randn(500, 16, generator=generator) * 0.5).to(dtype)
    targets = torch.randint(0, 500, (20,), generator=generator)
    scale = torch.rand(20, generator=generator) + 0.05

    def reference(h, w, t, s):
        return (torch.nn.functional.cross_entropy((h @ w.T).float(), t, reduction="none") * s).sum()

    loss, _dh, _chunked_dh = assert_chunked_matches(reference, hidden, weight, targets, scale)
    # Control: the unweighted loss differs
    assert ChunkedLinearCrossEntropy.apply(hidden, weight, targets).item() != pytest.approx(loss.item(), rel=1e-3)


def test_trainer_example_mean_is_the_mean_of_each_examples_token_mean():
    """loss_mean: example through the trainer: with each row's label_weights (one example a row),
    the weighted sum over the batch divided by label_weight_sum is the mean of the rows' own
    token means, as transformers computes each row's loss alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chla_tools.sft_data import example_label_weights
    from chla_train.trainer import label_token_count, label_weight_sum

    torch.manual_seed(0)
    config = LlamaConfig(**llama_config(vocab=300, hidden=32, intermediate=64, layers=2, heads=4, positions=64))
    model = LlamaForCausalLM(config)
    input_ids = np.random.default_rng(0).integers(0, 300, size=(3, 24))
    labels = input_ids.copy()
    for row, prompt in enumerate((20, 8, 15)):  # answers of 4, 16 and 9 tokens
        labels[row, :prompt] = -100
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "label_weights": np.stack([example_label_weights(row) for row in labels]),
    }
    trainer = trainer_stub(model)
    with torch.no_grad():
        weighted = Trainer._forward(trainer, batch).item() / label_weight_sum(batch)
        token_mean = Trainer._forward(trainer, batch, weighted=False).item() / label_token_count(batch)
        rows = [
            model(input_ids=torch.from_numpy(input_ids[r : r + 1]), labels=torch.from_numpy(labels[r : r + 1])).loss
            for r in range(3)
        ]
    assert label_weight_sum(batch) == pytest.approx(3)
    assert weighted == pytest.approx(float(sum(rows)) / 3, rel=1e-5)
    # control: the token mean weighs the 16-token answer 4 times the 4-token one
    assert token_mean != pytest.approx(weighted, rel=1e-3)


class _OutputShapes(TorchDispatchMode):
    """Records the shape and dtype of every tensor an operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.produced: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.produced.append((tuple(tensor.shape), tensor.dtype))
        return out


def test_no_weight_gradient_is_computed_under_no_grad():
    """Validation runs under torch.no_grad() with a trainable lm_head: no vocabulary x hidden fp32
    gradient may be allocated or filled. Control: under grad mode the same call produces it."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(20, 16, generator=generator)
    weight = torch.randn(500, 16, generator=generator).requires_grad_()  # trainable, as lm_head
    targets = torch.randint(0, 500, (20,), generator=generator)
    weight_gradient = ((500, 16), torch.float32)
    with torch.no_grad(), _OutputShapes() as no_grad:
        validation_loss = ChunkedLinearCrossEntropy.apply(hidden, weight, targets)
    assert weight_gradient not in no_grad.produced
    with _OutputShapes() as grad_mode:
        training_loss = ChunkedLinearCrossEntropy.apply(hidden, weight, targets)
    assert weight_gradient in grad_mode.produced
    assert validation_loss.item() == pytest.approx(training_loss.item(), rel=1e-6)
