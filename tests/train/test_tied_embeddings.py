"""Tied input and output embeddings (`tie_word_embeddings`: one tensor, as SmolLM2 and most small
modern bases have it) through the training stages: the resize and new-row init, stage 1 (the new
rows of the one matrix), stage 2 (LoRA plus those rows), stock PEFT loading the adapter, and chla
merge keeping one tensor. A tiny fp32 LLaMA with the tie; its untied twin is the control where the
tie is what the test is about."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ..helpers import TINY_LLAMA
from .launch import launch
from .test_training import PROBE, pretrain_params

TIED_LLAMA = dict(TINY_LLAMA, tie_word_embeddings=True)
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def resized(tokenizer_dir: str, init=TIED_LLAMA, method: str = "subtoken_mean", seed: int = 7):
    """The model a stage starts from, rebuilt the same way (same seed, same resize)."""
    from chla_train import model as models

    tokenizer = models.load_tokenizer(tokenizer_dir)
    model = models.build_base_model(None, init, dtype=torch.float32, attn_implementation="sdpa", seed=seed)
    base_rows = models.resize_to_tokenizer(
        model,
        len(tokenizer),
        new_row_init=method,
        max_vocab_growth=4,
        where="test",
        tokenizer_dir=tokenizer_dir,
        seed=seed,
        log=lambda _: None,
    )
    return model, base_rows


def is_tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_resize_initialises_the_one_matrix_once_from_the_input_rows(train_assets):
    from chla_train.new_rows import subtoken_ids

    tokenizer = train_assets["merged_tokenizer"]
    model, base_rows = resized(tokenizer, method="random")
    assert is_tied(model) and base_rows == 32000
    new = model.get_input_embeddings().weight[base_rows:].detach()
    generator = torch.Generator().manual_seed(7)
    first = torch.randn(new.shape, generator=generator) * 0.02
    second = torch.randn(new.shape, generator=generator) * 0.02
    assert torch.equal(new, first)  # drawn once: a second init of the same tensor would leave `second`
    assert not torch.equal(new, second)

    model, _ = resized(tokenizer)
    assert is_tied(model)
    weight = model.get_input_embeddings().weight.detach()
    pieces = subtoken_ids(tokenizer, base_rows, weight.shape[0], where="test")
    some = [i for i, p in enumerate(pieces) if len(p) > 1][:50]
    expected = torch.stack([weight[pieces[i]].mean(dim=0) for i in some])
    torch.testing.assert_close(weight[[base_rows + i for i in some]], expected, rtol=0, atol=1e-6)
    # control: untied, lm_head's new rows are the means of lm_head's own rows, not the input's
    untied, _ = resized(tokenizer, init=TINY_LLAMA)
    head = untied.get_output_embeddings().weight.detach()
    torch.testing.assert_close(
        head[[base_rows + i for i in some]], torch.stack([head[pieces[i]].mean(dim=0) for i in some])
    )
    assert not torch.allclose(head[base_rows:], untied.get_input_embeddings().weight[base_rows:])


def test_embeddings_mode_trains_the_new_rows_of_the_one_matrix_from_both_sides(train_assets):
    """The output side reaches the trainable new rows: a loss on the logits of new tokens, with
    only base tokens as input, gives them a gradient. Control: untied, that loss leaves the input
    embedding's new rows without one (lm_head is frozen there)."""
    from chla_train import model as models

    def new_rows_gradient(init) -> tuple[torch.Tensor, int, int]:
        model, base_rows = resized(train_assets["merged_tokenizer"], init=init)
        models.setup_embeddings_training(
            model, base_rows=base_rows, new_rows_only=True, train_lm_head=False, where="test"
        )
        logits = model(input_ids=torch.tensor([[1, 400, 5, 77, 12]])).logits
        logits[..., base_rows:].logsumexp(-1).sum().backward()
        trainable, _ = models.count_parameters(model)
        grad = model.get_input_embeddings().new_weight.grad
        return (torch.zeros(1) if grad is None else grad), trainable, model.get_input_embeddings().new_weight.numel()

    grad, trainable, new_values = new_rows_gradient(TIED_LLAMA)
    assert grad.abs().sum() > 0
    assert trainable == new_values  # the one matrix's new rows, counted once
    grad, _, _ = new_rows_gradient(TINY_LLAMA)
    assert grad.abs().sum() == 0


def test_split_input_rows_beside_a_plain_head_are_not_tied(train_assets):
    """Stage 1 of an untied model without train_lm_head: the input embedding split into base and
    new rows, lm_head left whole. Saving asks whether the two are tied (it raised AttributeError on
    the split embedding's missing `weight`); they are not, and the state dict keeps lm_head.
    Control: the tied model's split is tied."""
    from chla_train import model as models

    for init, tied in ((TINY_LLAMA, False), (TIED_LLAMA, True)):
        model, base_rows = resized(train_assets["merged_tokenizer"], init=init)
        models.setup_embeddings_training(
            model, base_rows=base_rows, new_rows_only=True, train_lm_head=False, where="test"
        )
        assert models.embeddings_tied(model) is tied
        kept = models.without_tied_output(model, model.state_dict())
        assert ("lm_head.weight" in kept) is (not tied)


def test_train_lm_head_with_tied_embeddings_is_one_line(train_assets):
    from chla_launcher.contract.errors import ChlaError
    from chla_train import model as models

    model, base_rows = resized(train_assets["merged_tokenizer"])
    with pytest.raises(ChlaError, match="unset train_lm_head"):
        models.setup_embeddings_training(model, base_rows=base_rows, new_rows_only=True, train_lm_head=True, where="s1")


def test_tied_output_rows_give_peft_logits_and_gradients():
    """chla's cheaper output head for trainable token rows, on a tied base (PEFT ties lm_head's
    rows to embed_tokens'): the loss and every gradient of PEFT's own layers. Control: other
    trained rows give another loss."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from chla_train.token_rows import output_rows_without_full_gradient

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**dict(TIED_LLAMA, vocab_size=300)))
    rows = list(range(250, 300))

    def adapted(shift: float):
        torch.manual_seed(1)  # the same LoRA A matrices
        config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": rows})
        model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    param.add_(shift)  # trained rows that differ from the base's
        return model

    peft_model, ours, other = adapted(0.1), adapted(0.1), adapted(0.2)
    assert peft_model.get_output_embeddings().token_adapter.tied_adapter is not None
    assert output_rows_without_full_gradient(ours) and output_rows_without_full_gradient(other)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    losses = [m(input_ids=ids, labels=ids).loss for m in (peft_model, ours, other)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    assert not torch.allclose(losses[1], losses[2])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (peft_model, ours)]
    assert len(grads[0]) == 5  # LoRA A and B of two layers, the one token-row delta
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


def saved_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.slow
def test_stage1_moves_only_new_rows_and_saves_one_tied_tensor(train_assets, tmp_path):
    """Stage 1 (mode embeddings, new_rows_only) on a tied base: the files hold one vocabulary
    tensor, the config stays tied, the base rows are bitwise the starting ones and the new rows
    moved; every other tensor is the starting one. The reloaded model's tie holds."""
    from transformers import AutoModelForCausalLM

    params = pretrain_params(train_assets, init=TIED_LLAMA, mode="embeddings", new_rows_only=True, weight_decay=0.1)
    launch({"kind": "pretrain", "run_dir": str(tmp_path), "params": params})

    out = tmp_path / "train" / "out" / "model"
    before, base_rows = resized(train_assets["merged_tokenizer"])
    after = saved_tensors(out)
    reference = {k: v for k, v in before.state_dict().items() if k != HEAD}
    assert set(after) == set(reference)  # one tensor: no lm_head.weight
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    for name, tensor in reference.items():
        if name == EMBED:
            assert torch.equal(after[name][:base_rows], tensor[:base_rows]), "a base row changed"
            moved = (after[name][base_rows:] != tensor[base_rows:]).any(dim=1)
            assert moved.float().mean() > 0.9, f"only {int(moved.sum())} new rows moved"
        else:
            assert torch.equal(after[name], tensor), f"{name} changed but must be frozen"
    record = json.loads((tmp_path / "train" / "out" / "train_summary.json").read_text())
    assert record["trainable_params"] == (len(after[EMBED]) - base_rows) * TINY_LLAMA["hidden_size"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert is_tied(model) and torch.equal(model.get_output_embeddings().weight, after[EMBED])


def lora_run(assets, run_dir: Path, *, world_size: int = 1, **overrides) -> Path:
    params = pretrain_params(
        assets,
        init=TIED_LLAMA,
        mode="lora",
        micro_batch_size=4 // world_size,
        lora_dropout=0.0,
        learning_rate=2e-3,
        **overrides,
    )
    launch(
        {
            "kind": "pretrain",
            "run_dir": str(run_dir),
            "params": params,
            "probe_ids": PROBE,
            "probe_out": str(run_dir / "probe_logits.pt"),
        },
        world_size=world_size,
    )
    return run_dir / "train" / "out" / "adapter"


def head_is_the_embedding(peft_model) -> bool:
    """Whether PEFT's lm_head computes with the embedding's trained matrix: its modules_to_save
    copy is the embedding copy's tensor, or its token rows are the embedding's."""
    head, embedding = peft_model.get_output_embeddings(), peft_model.get_input_embeddings()
    if hasattr(head, "modules_to_save"):
        return head.modules_to_save["default"].weight is embedding.modules_to_save["default"].weight
    if hasattr(head, "token_adapter"):
        return head.token_adapter.tied_adapter is embedding.token_adapter
    return head.weight is embedding.weight


def check_tied_adapter(assets, run_dir: Path, adapter: Path, tmp_path: Path) -> None:
    """Stock PEFT loads the adapter onto the resized tied base, its logits equal the in-training
    model's and its head is still the embedding's matrix; chla merge writes one vocabulary
    tensor, keeps the config tied, and gives the adapter model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chla_tools.merge import merge_adapters

    base, base_rows = resized(assets["merged_tokenizer"])
    start = base.get_input_embeddings().weight.detach().clone()
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    probe = torch.tensor(PROBE)
    with torch.no_grad():
        logits = peft_model(input_ids=probe).logits
    torch.testing.assert_close(logits, torch.load(run_dir / "probe_logits.pt"), rtol=0, atol=1e-5)
    assert head_is_the_embedding(peft_model)

    base_dir = tmp_path / "tied_base"
    resized(assets["merged_tokenizer"])[0].save_pretrained(base_dir)
    merged = tmp_path / "merged"
    summary = merge_adapters(base_dir, [adapter], merged, log=lambda _m: None)
    assert summary["tied_embeddings"] is True
    tensors = saved_tensors(merged)
    assert EMBED in tensors and HEAD not in tensors
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert is_tied(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe).logits, logits, rtol=0, atol=1e-5)
    # control: the adapter changed the one matrix (a merge that dropped it would not match)
    assert not torch.equal(tensors[EMBED][base_rows:], start[base_rows:])


@pytest.mark.slow
@pytest.mark.parametrize("vocab_rows", ["all", "new"])
def test_stage2_lora_trains_the_tied_matrix_and_the_adapter_loads_and_merges_tied(train_assets, tmp_path, vocab_rows):
    from safetensors import safe_open

    adapter = lora_run(train_assets, tmp_path / "run", vocab_rows=vocab_rows)
    config = json.loads((adapter / "adapter_config.json").read_text())
    # the copies tied by ensure_weight_tying; token rows of embed_tokens, which PEFT ties itself
    assert config["ensure_weight_tying"] is (vocab_rows == "all")
    saved_whole = config["modules_to_save"] or []  # PEFT lists embed_tokens also by its full name
    assert {name.rsplit(".", 1)[-1] for name in saved_whole} == ({"embed_tokens"} if vocab_rows == "all" else set())
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    if vocab_rows == "new":  # the rows of the one matrix, saved once
        assert [n for n in names if "lora_" not in n] == [
            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
        ]
    check_tied_adapter(train_assets, tmp_path / "run", adapter, tmp_path)


@pytest.mark.slow
def test_two_rank_zero2_lora_on_a_tied_base(train_assets, tmp_path):
    """ZeRO-2 over two ranks: the tied copy of the vocabulary matrix trains as one parameter
    (DeepSpeed's partitioned optimizer over a parameter two modules hold), and the adapter it
    saves is the one-rank run's (same global batch, losses within 1e-4)."""
    one = lora_run(train_assets, tmp_path / "one")
    two = lora_run(train_assets, tmp_path / "two", world_size=2)
    losses = [
        [json.loads(line).get("loss") for line in (run.parent / "metrics.jsonl").read_text().splitlines()]
        for run in (one, two)
    ]
    assert len(losses[0]) == len(losses[1])
    for a, b in zip(*losses):
        assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-4), losses
    check_tied_adapter(train_assets, tmp_path / "two", two, tmp_path)
