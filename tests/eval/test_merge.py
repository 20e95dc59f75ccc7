"""chla merge: same logits as stock peft merge_and_unload, bounded shards, clear refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from chla_launcher.contract.errors import ChlaError  # noqa: E402
from chla_tools.merge import merge_adapters, parse_size  # noqa: E402

from .conftest import make_adapter, make_base  # noqa: E402


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_two_adapters_match_stock_peft_merge(tiny_chain, stock_merge, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    # a small shard size forces several shards and the index
    summary = merge_adapters(
        tiny_chain["base"], [tiny_chain["pretrain"], tiny_chain["sft"]], out, shard_size="2MB", log=lambda _m: None
    )
    base_vocab, pretrain_vocab, sft_vocab = tiny_chain["sizes"]
    assert base_vocab < pretrain_vocab < sft_vocab
    assert summary["vocab_size"] == sft_vocab and summary["shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        f"model-{i:05d}-of-{summary['shards']:05d}.safetensors" for i in range(1, summary["shards"] + 1)
    }
    assert json.loads((out / "config.json").read_text())["vocab_size"] == sft_vocab
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left

    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == sft_vocab and tokenizer.pad_token == "[PAD]"
    reference = stock_merge(tiny_chain["base"], [tiny_chain["pretrain"], tiny_chain["sft"]])

    text = "话说天下大势，分久必合。长江英雄[PAD]"
    ids = tokenizer(text, return_tensors="pt").input_ids
    # include the newest rows of the grown vocabulary explicitly
    ids = torch.cat([ids, torch.tensor([[base_vocab, pretrain_vocab - 1, sft_vocab - 1]])], dim=1)
    diff = (_logits(ours, ids) - _logits(reference, ids)).abs().max().item()
    print(f"max abs logits diff vs peft merge_and_unload: {diff:.3g}")
    assert diff <= 1e-5
    # and the adapters really change the model (a merge that skipped them would not match peft)
    only_pretrain = stock_merge(tiny_chain["base"], [tiny_chain["pretrain"]])
    base_ids = ids[ids < pretrain_vocab].unsqueeze(0)  # tokens the pretrain-only model knows
    assert (_logits(ours, base_ids)[..., :pretrain_vocab] - _logits(only_pretrain, base_ids)).abs().max() > 1e-2


def test_dtype_and_single_shard(tiny_chain, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    summary = merge_adapters(tiny_chain["base"], [tiny_chain["pretrain"]], out, dtype="bf16", log=lambda _m: None)
    assert summary["shards"] == 1 and not (out / "model.safetensors.index.json").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_rslora_and_tied_embeddings_match_peft(tmp_path, tokenizer_dir, stock_merge):
    """Rank-stabilised scaling and a tied base whose lm_head an adapter replaces."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_base(tmp_path / "tied_base", tokenizer_dir, seed=3, tie_word_embeddings=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    adapter = make_adapter(
        tmp_path / "rs",
        base,
        tokenizer,
        seed=4,
        modules_to_save=["lm_head"],
        lora_kwargs={"use_rslora": True, "r": 8, "lora_alpha": 16},
    )
    out = tmp_path / "merged"
    summary = merge_adapters(base, [adapter], out, log=lambda _m: None)
    assert summary["tied_embeddings"] is False
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

    ids = torch.tensor([[1, 5, 900, 31999, 42]])
    diff = (
        (
            _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)
            - _logits(stock_merge(base, [adapter]), ids)
        )
        .abs()
        .max()
        .item()
    )
    assert diff <= 1e-5


@pytest.mark.parametrize(
    "kind, tie_kept",
    [("copies_tied", True), ("token_rows", True), ("copies", False)],
)
def test_adapters_of_a_tied_base_keep_one_tensor_where_peft_keeps_the_tie(
    tmp_path, tokenizer_dir, stock_merge, kind, tie_kept
):
    """A tied base and an adapter that changes the one matrix: modules_to_save copies with
    ensure_weight_tying (the vocabulary grows), or trainable token rows of embed_tokens (peft ties
    lm_head's rows to them). The merged model keeps one tensor and tie_word_embeddings, with
    stock peft's logits. Control: the copies without ensure_weight_tying, which peft unties."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conftest import NEW_WORDS

    base = make_base(tmp_path / "tied_base", tokenizer_dir, seed=3, tie_word_embeddings=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if kind == "token_rows":
        settings: dict = {"lora_kwargs": {"trainable_token_indices": {"embed_tokens": list(range(100, 140))}}}
        settings["save_kwargs"] = {"save_embedding_layers": False}
    else:
        tokenizer.add_tokens(NEW_WORDS)
        settings = {
            "modules_to_save": ["embed_tokens", "lm_head"],
            "lora_kwargs": {"ensure_weight_tying": kind == "copies_tied"},
        }
    adapter = make_adapter(tmp_path / kind, base, tokenizer, seed=4, **settings)
    out = tmp_path / "merged"
    assert merge_adapters(base, [adapter], out, log=lambda _m: None)["tied_embeddings"] is tie_kept
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tie_kept
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert ("lm_head.weight" in handle.keys()) is not tie_kept
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) is tie_kept
    ids = torch.tensor([[1, 5, 100, 120, 139, 31999, len(tokenizer) - 1]])
    reference = stock_merge(base, [adapter])
    assert (_logits(ours, ids) - _logits(reference, ids)).abs().max().item() <= 1e-5
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert (_logits(ours, ids[:, :-1])[..., :32000] - _logits(plain, ids[:, :-1])).abs().max() > 1e-3


@pytest.mark.parametrize("dtype, whole_matrices", [(None, False), ("bf16", True)])
def test_trainable_token_rows_match_peft_and_grow_the_vocabulary(
    tiny_chain, tmp_path, monkeypatch, dtype, whole_matrices
):
    """An SFT-style adapter that trains only the new vocabulary rows (LoraConfig
    trainable_token_indices), one of them the [PAD] row it adds: chla merge writes the same rows
    as stock peft (streamed in several chunks, or whole when the dtype changes). Saved as chla
    saves it (only the rows), or as peft does by default when the vocabulary grew (the resized
    matrices whole as well)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import chla_tools.merge.shards as merge_module

    base_vocab, pretrain_vocab, sft_vocab = tiny_chain["sizes"]
    pretrained = tmp_path / "pretrained"
    merge_adapters(tiny_chain["base"], [tiny_chain["pretrain"]], pretrained, log=lambda _m: None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chain["sft"])
    rows = list(range(base_vocab, sft_vocab))
    adapter = make_adapter(
        tmp_path / "rows",
        pretrained,
        tokenizer,
        seed=5,
        lora_kwargs={"trainable_token_indices": {"embed_tokens": rows, "lm_head": rows}},
        save_kwargs={} if whole_matrices else {"save_embedding_layers": False},
    )
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    assert shapes["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] == [len(rows), 64]
    assert any(shape[0] >= base_vocab for shape in shapes.values()) == whole_matrices

    monkeypatch.setattr(merge_module, "_CHUNK_BYTES", 64 * 4 * 1000)  # 1,000 rows a chunk
    out = tmp_path / "merged"
    assert merge_adapters(pretrained, [adapter], out, dtype=dtype, log=lambda _m: None)["vocab_size"] == sft_vocab
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)

    resized = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32)
    resized.resize_token_embeddings(sft_vocab)  # stock PEFT needs the base resized to the tokenizer
    reference = PeftModel.from_pretrained(resized, adapter).merge_and_unload()
    if dtype:
        reference = reference.to(torch.bfloat16).float()
    ids = torch.tensor([[1, 400, base_vocab - 1, base_vocab, pretrain_vocab - 1, sft_vocab - 1]])
    assert (_logits(ours, ids) - _logits(reference, ids)).abs().max().item() <= 1e-5
    embed = ours.get_input_embeddings().weight
    before = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32).get_input_embeddings().weight
    stored = (lambda t: t.to(torch.bfloat16).float()) if dtype else (lambda t: t)  # noqa: E731
    assert torch.equal(embed[:base_vocab], stored(before[:base_vocab]))  # base rows untouched
    assert not torch.equal(embed[base_vocab:pretrain_vocab], before[base_vocab:])  # the rows moved


def test_token_rows_that_do_not_cover_the_growth_are_refused(tiny_chain, tmp_path):
    from transformers import AutoTokenizer

    base_vocab, pretrain_vocab, sft_vocab = tiny_chain["sizes"]
    pretrained = tmp_path / "pretrained"
    merge_adapters(tiny_chain["base"], [tiny_chain["pretrain"]], pretrained, log=lambda _m: None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chain["sft"])
    adapter = make_adapter(
        tmp_path / "rows",
        pretrained,
        tokenizer,
        seed=6,
        lora_kwargs={"trainable_token_indices": [sft_vocab - 1]},
        save_kwargs={"save_embedding_layers": False},
    )
    # the adapter was trained on a model that had every row but the last; this base lacks more
    out = tmp_path / "merged"
    with pytest.raises(ChlaError, match=f"grow .* from {base_vocab} to {sft_vocab}"):
        merge_adapters(tiny_chain["base"], [adapter], out, log=lambda _m: None)
    _assert_untouched(out)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234
    with pytest.raises(ChlaError):
        parse_size("five")


# --- bad input: one clear line, nothing half-written -----------------------------------------


def _assert_untouched(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_adapter_for_a_different_base_names_the_tensor(tiny_chain, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    other_base = make_base(tmp_path / "other", tokenizer_dir, intermediate_size=96)
    foreign = make_adapter(tmp_path / "foreign", other_base, AutoTokenizer.from_pretrained(tokenizer_dir), seed=5)
    out = tmp_path / "out"
    with pytest.raises(ChlaError) as caught:
        merge_adapters(tiny_chain["base"], [foreign], out, log=lambda _m: None)
    message = str(caught.value)
    assert "\n" not in message and "mlp." in message and "lora_" in message and "different base" in message
    _assert_untouched(out)


def test_vocabulary_shrink_is_refused(tiny_chain, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ChlaError, match="shrink"):
        merge_adapters(tiny_chain["base"], [tiny_chain["sft"], tiny_chain["pretrain"]], out, log=lambda _m: None)
    _assert_untouched(out)


def test_truncated_safetensors_is_refused(tiny_chain, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_chain["base"], base)
    weights = base / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    out = tmp_path / "out"
    with pytest.raises(ChlaError, match="truncated") as caught:
        merge_adapters(base, [tiny_chain["pretrain"]], out, log=lambda _m: None)
    assert str(weights) in str(caught.value)
    _assert_untouched(out)


def test_missing_tokenizer_is_refused(tiny_chain, tmp_path):
    base = tmp_path / "base"
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_chain["base"], base, ignore=shutil.ignore_patterns("tokenizer*"))
    shutil.copytree(tiny_chain["pretrain"], adapter, ignore=shutil.ignore_patterns("tokenizer*"))
    out = tmp_path / "out"
    with pytest.raises(ChlaError, match="no tokenizer"):
        merge_adapters(base, [adapter], out, log=lambda _m: None)
    _assert_untouched(out)


def test_cli_errors_are_one_line_with_exit_status_2(tiny_chain, tmp_path):
    """Through the real `chla` entry point: a truncated base for `chla merge`, an empty task file
    for `chla eval`."""
    import subprocess
    import sys

    chla = Path(sys.executable).with_name("chla")
    command = [str(chla)] if chla.exists() else [sys.executable, "-m", "chla_launcher.cli"]
    base = tmp_path / "base"
    shutil.copytree(tiny_chain["base"], base)
    os.truncate(base / "model.safetensors", 4096)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    runs = {
        "truncated": command
        + ["merge", "--base", str(base), "--adapter", str(tiny_chain["pretrain"]), "--out", str(tmp_path / "merged")],
        "no items": command
        + ["eval", "--model", str(tiny_chain["base"]), "--task", str(empty), "--out", str(tmp_path / "results")],
    }
    for expected, argv in runs.items():
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("chla: ") and expected in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "empty.jsonl"]
