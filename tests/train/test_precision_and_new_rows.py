"""`precision: auto` (bf16 only where the CPU/GPU computes it natively, capped ISAs included) and
`new_row_init` (subtoken_mean against the base tokenizer's own encoding, mean, seeded random)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ..helpers import TINY_LLAMA

CHOICE = (
    "import json; from chla_train.precision import choose_precision as c; "
    "p = c('auto'); print(json.dumps([p.name, p.reason]))"
)


def _auto_precision(**env: str) -> tuple[str, str]:
    """What `precision: auto` picks in a fresh process (torch reads ATEN_CPU_CAPABILITY once)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run(
        [sys.executable, "-c", CHOICE], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout
    return tuple(json.loads(out))


@pytest.mark.slow
def test_auto_precision_is_fp32_when_bf16_is_emulated():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    name, reason = _auto_precision()
    assert name == ("bf16" if native else "fp32"), reason
    # The AVX2-only EPYC, emulated: torch's and oneDNN's ISA capped below AVX-512 BF16.
    name, reason = _auto_precision(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert name == "fp32"
    if native:
        assert "ATEN_CPU_CAPABILITY=avx2" in reason
        name, reason = _auto_precision(ONEDNN_MAX_CPU_ISA="AVX512_CORE")  # oneDNN alone capped
        assert name == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX512_CORE" in reason
        assert _auto_precision(ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16")[0] == "bf16"


def test_forced_precision_wins():
    from chla_train.precision import choose_precision

    assert choose_precision("fp32").dtype == torch.float32 and "recipe" in choose_precision("fp32").reason
    assert choose_precision("bf16").dtype == torch.bfloat16


def _resized(tokenizer_dir: str, method: str, seed: int = 7):
    from chla_train import model as models

    tokenizer = models.load_tokenizer(tokenizer_dir)
    model = models.build_base_model(None, TINY_LLAMA, dtype=torch.float32, attn_implementation="sdpa", seed=1)
    base = {
        "embed": model.get_input_embeddings().weight.detach().clone(),
        "head": model.get_output_embeddings().weight.detach().clone(),
    }
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
    return model, base, base_rows


def test_subtoken_mean_rows_are_the_means_of_the_base_tokenizers_pieces(train_assets):
    """Each new row is the mean of the base rows of the pieces the *base* tokenizer (its own
    tokenizer.model, not the merged one cut down) splits the new piece's text into."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import AutoTokenizer

    model, base, base_rows = _resized(train_assets["merged_tokenizer"], "subtoken_mean")
    assert base_rows == 32000
    merged = AutoTokenizer.from_pretrained(train_assets["merged_tokenizer"])
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(os.path.join(train_assets["base_tokenizer"], "tokenizer.model"), "rb").read())
    proto.normalizer_spec.add_dummy_prefix = False
    base_sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    checked = 0
    for token_id in range(base_rows, len(merged)):
        text = merged.convert_ids_to_tokens(token_id).replace("\u2581", " ")
        pieces = base_sp.encode(text)
        assert pieces, text
        torch.testing.assert_close(embed[token_id], base["embed"][pieces].mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(head[token_id], base["head"][pieces].mean(0), rtol=0, atol=1e-6)
        checked += 1
    assert checked == len(merged) - 32000 > 1000
    # Base rows untouched; and unlike `mean`, the new rows differ from one another.
    assert torch.equal(embed[:base_rows], base["embed"]) and torch.equal(head[:base_rows], base["head"])
    assert len(torch.unique(embed[base_rows:], dim=0)) > 0.9 * checked
    mean_model, _, _ = _resized(train_assets["merged_tokenizer"], "mean")
    assert len(torch.unique(mean_model.get_input_embeddings().weight[base_rows:], dim=0)) == 1


def test_random_new_rows_come_from_the_recipe_seed(train_assets):
    first, _, rows = _resized(train_assets["merged_tokenizer"], "random", seed=7)
    again, _, _ = _resized(train_assets["merged_tokenizer"], "random", seed=7)
    other, _, _ = _resized(train_assets["merged_tokenizer"], "random", seed=8)
    new = lambda m: m.get_input_embeddings().weight[rows:].detach()  # noqa: E731
    assert torch.equal(new(first), new(again))
    assert not torch.equal(new(first), new(other))
    assert abs(float(new(first).std()) - 0.02) < 0.002  # N(0, initializer_range)


def test_subtoken_mean_needs_a_sentencepiece_model_or_a_tokenizer_json(train_assets, tmp_path):
    import shutil

    from chla_launcher.contract.errors import ChlaError
    from chla_train.new_rows import subtoken_ids

    # Without tokenizer.model the tokenizer.json's BPE serves (control: it still resizes); with
    # neither there is nothing to split a new token's text with.
    copy = tmp_path / "tok"
    shutil.copytree(train_assets["merged_tokenizer"], copy)
    (copy / "tokenizer.model").unlink()
    _resized(str(copy), "subtoken_mean")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ChlaError, match="SentencePiece model or its tokenizer.json.*new_row_init: mean"):
        subtoken_ids(copy, 100, 110, where="stage pt")
