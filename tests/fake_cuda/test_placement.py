"""The paths that place tensors, run with the model and its batches on cuda:0 of a CUDA device
that does not exist (device.py): a tensor left on the CPU beside them fails here as it would on a
GPU, and the results must equal a plain CPU run's (the fake device computes on the CPU).

Covered: the model built and moved to cuda:LOCAL_RANK as ZeRO-0/2 load it, resized to the merged
tokenizer with each new_row_init; the stage-1 row split (new rows only, lm_head too); LoRA with
trainable token rows; the trainer's loss on padded and packed batches (sdpa and eager), with the
chunked vocabulary projection and its in-forward gradients; the evaluation's perplexity loop.

Not covered, and why:
- Loading from a directory: transformers streams the weights to the GPU through accelerate
  (device_map), which asks the CUDA runtime about memory; the layer moves a built model instead,
  which places every parameter where the load does.
- ZeRO-3: DeepSpeed's zero.Init partitions and gathers parameters with collectives of a process
  group on the device (NCCL), which does not exist here, and gloo refuses CUDA tensors. What runs
  on gathered ZeRO-3 tensors is the same code as ZeRO-0/2's (chla_train.model.writable_whole
  gathers the whole matrices, then init_new_rows fills them on the device they were gathered to),
  so the resize tests cover it on whole matrices. The partitioned load itself is covered on CPUs
  by tests/train (ZeRO-3 over gloo).
- Backward: torch's autograd engine needs a CUDA accelerator for a graph of CUDA tensors. The
  trainer's chunked loss computes its gradients inside forward, so their placement is covered;
  the engine's backward pass and DeepSpeed's optimizer step are not.
- Kernels, numerics in bf16 or on tensor cores, memory, NCCL: see device.py.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from chla_tools import evaluate as evaluation
from chla_train import model as models
from chla_train.trainer import Trainer

from ..helpers import TINY_LLAMA, EngineStub, resize_like_a_stage, small_lora
from .device import CUDA, DeviceMismatch, FakeCuda, FakeCudaTensor

pytestmark = pytest.mark.filterwarnings("ignore:User provided device_type of 'cuda'")


def on_cpu(value):
    """A result's values, wherever it is."""
    return value.elem if isinstance(value, FakeCudaTensor) else value


def resized_model(tokenizer_dir: str, method: str, *, device: torch.device | None, seed: int = 7):
    """The tiny LLaMA, moved to `device` as a ZeRO-0/2 load places it, resized to the merged
    tokenizer with `method`."""
    tokenizer = models.load_tokenizer(tokenizer_dir)
    model = models.build_base_model(None, TINY_LLAMA, dtype=torch.float32, attn_implementation="sdpa", seed=1)
    if device is not None:
        model.to(device)
    return model, tokenizer, resize_like_a_stage(model, tokenizer_dir, method, seed)


def trainer_on(model, device: torch.device):
    """A stand-in `self` for Trainer._forward: a DeepSpeed engine cannot start on this device."""
    return types.SimpleNamespace(engine=EngineStub(model), device=device)


def pretraining_batch(vocab_size: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, vocab_size, size=(2, 24))
    return {"input_ids": ids, "labels": ids.copy()}


def packed_batch(vocab_size: int) -> dict[str, np.ndarray]:
    from chla_tools.sft_data import collate_sft_packed

    rng = np.random.default_rng(1)
    examples = []
    for length, prompt in ((14, 6), (9, 4), (11, 3), (6, 2)):
        ids = rng.integers(3, vocab_size, size=length)
        labels = ids.copy()
        labels[:prompt] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return collate_sft_packed(examples, pad_id=0, row_length=24)


# --- the layer fails what a GPU refuses --------------------------------------------------------------


def test_a_tensor_left_on_the_cpu_fails_the_layer(train_assets):
    """Controls: the model on cuda:0 and its input ids on the CPU; the trainer's batch moved to
    the CPU (a trainer whose device is wrong); finding 1's index tensors on the CPU."""
    with FakeCuda():
        model, tokenizer, _ = resized_model(train_assets["merged_tokenizer"], "mean", device=CUDA)
        batch = pretraining_batch(len(tokenizer))
        with pytest.raises(DeviceMismatch, match="embedding"):
            model(input_ids=torch.from_numpy(batch["input_ids"]))
        with pytest.raises(DeviceMismatch):
            Trainer._forward(trainer_on(model, torch.device("cpu")), batch)
        matrix = model.get_input_embeddings().weight
        with pytest.raises(DeviceMismatch, match="embedding_bag"):
            torch.nn.functional.embedding_bag(torch.tensor([1, 2]), matrix, torch.tensor([0]), mode="mean")
        # and the same operations with everything on cuda:0 pass
        assert model(input_ids=torch.from_numpy(batch["input_ids"]).to(CUDA)).logits.device == CUDA
        bag = torch.nn.functional.embedding_bag(
            torch.tensor([1, 2], device=CUDA), matrix, torch.tensor([0], device=CUDA), mode="mean"
        )
        assert bag.device == CUDA


# --- the model: resize and new rows --------------------------------------------------------------


@pytest.mark.parametrize("method", ["subtoken_mean", "mean", "random"])
def test_new_rows_are_initialised_on_the_models_device(train_assets, method):
    """Finding 1: subtoken_mean built its indices on the CPU beside a matrix on cuda:LOCAL_RANK.
    Every method fills the new rows on the device, with the CPU run's values (random: the same
    draw from the seed on every device)."""
    tokenizer_dir = train_assets["merged_tokenizer"]
    cpu_model, _, base_rows = resized_model(tokenizer_dir, method, device=None)
    with FakeCuda():
        model, _, cuda_base_rows = resized_model(tokenizer_dir, method, device=CUDA)
    assert cuda_base_rows == base_rows
    for name in ("get_input_embeddings", "get_output_embeddings"):
        weight = getattr(model, name)().weight
        assert weight.device == CUDA
        expected = getattr(cpu_model, name)().weight.detach()
        assert torch.equal(on_cpu(weight.detach())[base_rows:], expected[base_rows:]), name
    # control: another seed draws other random rows
    if method == "random":
        other, _, _ = resized_model(tokenizer_dir, method, device=None, seed=8)
        assert not torch.equal(other.get_input_embeddings().weight[base_rows:], expected[base_rows:])


# --- training: the trainable parts and the loss ---------------------------------------------------


def forward_loss(model, batch, device) -> float:
    """Trainer._forward's loss (grad mode on: the chunked loss computes its gradients)."""
    return float(Trainer._forward(trainer_on(model, device), batch).item())


def test_stage1_new_rows_train_on_the_device(train_assets):
    """Stage 1 (`mode: embeddings`, new rows only, lm_head too): the split matrices and the chunked
    loss over the joined projection, on cuda:0, give the CPU's loss."""
    losses = {}
    for device in (None, CUDA):
        with FakeCuda():
            model, tokenizer, base_rows = resized_model(train_assets["merged_tokenizer"], "mean", device=device)
            models.setup_embeddings_training(
                model, base_rows=base_rows, new_rows_only=True, train_lm_head=True, where="test"
            )
            head = model.get_output_embeddings()
            assert isinstance(head, models.NewRowsLinear) and head.new_weight.requires_grad
            losses[device] = forward_loss(model, pretraining_batch(len(tokenizer)), device or torch.device("cpu"))
    assert losses[CUDA] == pytest.approx(losses[None], rel=1e-6)


def test_lora_with_trainable_token_rows_on_the_device(train_assets):
    """A LoRA stage with `vocab_rows: new`: PEFT's adapters and trainable token rows created on
    the base layers' device, the loss through them the CPU's."""
    losses = {}
    for device in (None, CUDA):
        with FakeCuda():
            model, tokenizer, base_rows = resized_model(train_assets["merged_tokenizer"], "mean", device=device)
            model = small_lora(model, seed=3, new_token_rows=range(base_rows, len(tokenizer)))
            trainable = [param for param in model.parameters() if param.requires_grad]
            assert trainable and all(param.device == (device or torch.device("cpu")) for param in trainable)
            losses[device] = forward_loss(model, pretraining_batch(len(tokenizer)), device or torch.device("cpu"))
    assert losses[CUDA] == pytest.approx(losses[None], rel=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batches_on_the_device(train_assets, attention):
    """Packed SFT rows: position ids and the block-diagonal mask moved with the batch."""
    losses = {}
    for device in (None, CUDA):
        with FakeCuda():
            model, tokenizer, _ = resized_model(train_assets["merged_tokenizer"], "mean", device=device)
            model.config._attn_implementation = attention
            batch = packed_batch(len(tokenizer))
            assert batch["input_ids"].shape[0] < 4  # packed: fewer rows than examples
            losses[device] = forward_loss(model, batch, device or torch.device("cpu"))
    assert losses[CUDA] == pytest.approx(losses[None], rel=1e-6)


def test_validation_loss_under_no_grad_on_the_device(train_assets):
    """What Trainer.evaluate runs per batch: the loss under torch.no_grad()."""
    with FakeCuda():
        model, tokenizer, _ = resized_model(train_assets["merged_tokenizer"], "mean", device=CUDA)
        batch = pretraining_batch(len(tokenizer))
        with torch.no_grad():
            loss = Trainer._forward(trainer_on(model, CUDA), batch, weighted=False)
        assert loss.device == CUDA and loss.item() > 0


# --- evaluation ----------------------------------------------------------------------------------


def test_perplexity_loop_on_the_device(train_assets, demo_assets):
    """chla eval's perplexity: windows batched onto the model's device, the chunked projection
    there; the CPU's numbers."""
    from pathlib import Path

    text = Path(demo_assets["zh_heldout"]).read_text(encoding="utf-8").splitlines()
    lines = [line for line in text if line.strip()][:3]
    sums = {}
    for device in (None, CUDA):
        with FakeCuda():
            model, tokenizer, _ = resized_model(train_assets["merged_tokenizer"], "mean", device=device)
            model.eval()
            sums[device] = evaluation.perplexity_sums(model, tokenizer, lines, block=32, batch_size=3)
    assert sums[CUDA]["tokens"] == sums[None]["tokens"]
    assert sums[CUDA]["nll"] == pytest.approx(sums[None]["nll"], rel=1e-6)
