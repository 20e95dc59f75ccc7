"""SFT that keeps the language model: only the new vocabulary rows train (PEFT trainable token
rows: a small adapter that stock PEFT loads and chla merge merges), with their own learning rate,
and pretraining text replayed in the batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ..helpers import TINY_LLAMA, peft_with_shifted_rows
from .test_training import PROBE, _run_expecting_error, launch_probed, reference_model, summary


@pytest.mark.slow
def test_embedding_learning_rate_gets_its_own_param_groups():
    from transformers import LlamaConfig, LlamaForCausalLM

    from chla_launcher.contract.kinds import get_kind
    from chla_train.trainer import build_optimizer

    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    params = get_kind("sft").params(
        tokenizer="/t", model="/m", train_file="/f", learning_rate=1e-3, embedding_learning_rate=1e-5, weight_decay=0.1
    )
    groups = build_optimizer(model, params).param_groups
    vocabulary = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.1), (1e-3, 0.0), (1e-5, 0.1)]
    assert {id(p) for p in groups[2]["params"]} == vocabulary
    assert not vocabulary & {id(p) for g in groups[:2] for p in g["params"]}
    # Without it: one learning rate, the groups as before.
    plain = build_optimizer(model, params.model_copy(update={"embedding_learning_rate": None})).param_groups
    assert [g["lr"] for g in plain] == [1e-3, 1e-3]


def test_trainable_output_rows_give_peft_logits_and_gradients():
    """chla's cheaper output head for trainable token rows (no full weight gradient) computes what
    PEFT's own TrainableTokensLayer computes: the same loss and every gradient."""

    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from chla_train.token_rows import output_rows_without_full_gradient

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**dict(TINY_LLAMA, vocab_size=300)))
    rows = list(range(250, 300))

    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": rows, "lm_head": rows})
    peft_model, ours, other = (peft_with_shifted_rows(base, config, shift) for shift in (0.1, 0.1, 0.2))
    assert output_rows_without_full_gradient(ours) and output_rows_without_full_gradient(other)
    ids = torch.randint(0, 300, (2, 9))
    losses = [m(input_ids=ids, labels=ids).loss for m in (peft_model, ours, other)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[1], losses[2])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (peft_model, ours)]
    assert len(grads[0]) == 6  # LoRA A and B of two layers, the two token-row deltas
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


def test_replay_rows_sit_beside_the_packed_instruction_rows():
    from chla_tools.sft_data import collate_sft_packed
    from chla_tools.sft_replay import collate_with_replay

    prompt = [1, 50, 51, 52, 53]
    examples = [
        {"input_ids": np.array(prompt + [60 + i, 2]), "labels": np.array([-100] * 5 + [60 + i, 2])} for i in range(3)
    ]
    replay = [{"input_ids": np.arange(100, 108), "labels": np.arange(100, 108), "replay": True}]

    def packed(batch):
        return collate_sft_packed(batch, pad_id=0, row_length=16, share_prefix=True)

    batch = collate_with_replay(packed, pad_id=0)(examples + replay)
    alone = packed(examples)
    rows = alone["input_ids"].shape[0]
    # The instruction rows are exactly what they are without replay (the shared prefix intact)...
    assert np.array_equal(batch["input_ids"][:rows, : alone["input_ids"].shape[1]], alone["input_ids"])
    assert np.array_equal(batch["labels"][:rows, : alone["labels"].shape[1]], alone["labels"])
    # ...and the replay block is one more row: every token a label, attending only to itself.
    assert np.array_equal(batch["input_ids"][rows, :8], np.arange(100, 108))
    assert np.array_equal(batch["labels"][rows, :8], np.arange(100, 108))
    assert np.array_equal(batch["position_ids"][rows, :8], np.arange(8))
    mask = batch["packed_attention_mask"][rows]
    assert np.array_equal(mask[:8, :8], np.tri(8, dtype=bool)) and not mask[:8, 8:].any()
    assert batch["input_ids"].shape[0] == rows + 1 and set(batch) == set(alone)


@pytest.mark.slow
def test_sft_on_new_rows_with_replay_keeps_base_rows_and_merges(train_assets, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chla_tools.merge import merge_adapters

    # The "pretrained" model: the tiny base resized to the merged tokenizer, saved with it.
    base_dir = tmp_path / "pretrained"
    model, base_rows = reference_model(train_assets["merged_tokenizer"])
    model.save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(train_assets["merged_tokenizer"]).save_pretrained(base_dir)

    params = {
        "tokenizer": train_assets["merged_tokenizer"],
        "model": str(base_dir),
        "train_file": train_assets["sft_train"],
        "valid_file": train_assets["sft_valid"],
        "max_seq_length": 128,
        "micro_batch_size": 8,
        "max_steps": 6,
        "eval_steps": 6,
        "logging_steps": 2,
        "save_steps": 0,
        "precision": "fp32",
        "learning_rate": 1e-2,
        "seed": 3,
        "pack_batches": True,
        "share_prompt_prefix": True,
        "vocab_rows": "new",
        "new_rows_from": base_rows,
        "embedding_learning_rate": 1e-3,
        "replay_corpus": train_assets["corpus"],
        "replay_weight": 0.25,
        "replay_block_size": 32,
    }
    # Without new_rows_from, only the [PAD] row this stage adds would train: refused in one line
    # (the run below, with new_rows_from, is the control).
    message = _run_expecting_error(
        "sft", {k: v for k, v in params.items() if k != "new_rows_from"}, tmp_path / "pad_only"
    )
    assert "new_rows_from" in message and "32000" in message
    run = tmp_path / "sft"
    launch_probed("sft", run, params)
    record = summary(run)
    assert record["blend_samples"] == {"sft_train": 36, "replay:corpus": 12}  # 6 x 8, a quarter replay

    adapter = run / "train" / "out" / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    vocab = len(tokenizer)
    assert vocab == len(AutoTokenizer.from_pretrained(train_assets["merged_tokenizer"])) + 1  # + [PAD]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    rows = vocab - base_rows
    assert shapes["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] == [rows, 16]
    assert shapes["base_model.model.lm_head.token_adapter.trainable_tokens_delta"] == [rows, 16]
    assert max(shape[0] for shape in shapes.values()) == rows  # no whole vocabulary matrix
    # Stock PEFT loads it onto the base resized to the adapter's tokenizer: the trained logits.
    resized = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    resized.resize_token_embeddings(vocab)
    peft_model = PeftModel.from_pretrained(resized, str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=torch.tensor(PROBE)).logits, torch.load(run / "probe_logits.pt"), rtol=0, atol=1e-5
        )
    # chla's streaming merge gives what peft's merge_and_unload gives; the base rows did not move.
    merged_dir = tmp_path / "merged"
    merge_adapters(base_dir, [adapter], merged_dir, log=lambda _m: None)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    reference = peft_model.merge_and_unload()
    ids = torch.tensor([[1, 400, 31000, base_rows, 33000, vocab - 1]])
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() < 1e-5
    # the merged tokenizer's new rows ([PAD] is after them)
    new = slice(base_rows, model.get_input_embeddings().weight.shape[0])
    for ours, before, moved in (
        (merged.get_input_embeddings().weight, model.get_input_embeddings().weight, 0.0),
        (merged.get_output_embeddings().weight, model.get_output_embeddings().weight, 0.9),
    ):
        assert torch.equal(ours[:base_rows], before[:base_rows])
        # every lm_head row gets a gradient; an input row only when its token occurs
        assert (ours[new] != before[new]).any(dim=1).float().mean() > moved


def test_embedding_adam_epsilon_applies_to_the_vocabulary_groups_only():
    """Adam's epsilon of the vocabulary parts: set, they get a group with it and every other group
    keeps 1e-8; with the learning rate unset, the vocabulary group takes the stage's rate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chla_launcher.contract.kinds import get_kind
    from chla_train.trainer import build_optimizer

    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    params = get_kind("sft").params(
        tokenizer="/t", model="/m", train_file="/f", learning_rate=1e-3, embedding_adam_epsilon=1e-3, weight_decay=0.1
    )
    groups = build_optimizer(model, params).param_groups
    vocabulary = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert [(g["lr"], g["eps"]) for g in groups] == [(1e-3, 1e-8), (1e-3, 1e-8), (1e-3, 1e-3)]
    assert {id(p) for p in groups[2]["params"]} == vocabulary
    # Control: without it, one epsilon and no vocabulary group.
    plain = build_optimizer(model, params.model_copy(update={"embedding_adam_epsilon": None})).param_groups
    assert [g["eps"] for g in plain] == [1e-8, 1e-8]
    # Only the vocabulary trains (stage 1): no empty group beside it, which DeepSpeed would drop
    # under the learning-rate scheduler built on the groups (a failure at the first step).
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.get_input_embeddings().weight.requires_grad = True
    only = build_optimizer(model, params).param_groups
    assert [(g["part"], len(g["params"])) for g in only] == [("vocabulary", 1)]
