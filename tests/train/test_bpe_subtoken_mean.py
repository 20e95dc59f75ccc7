"""`new_row_init: subtoken_mean` for a byte-level BPE tokenizer (tokenizer.json, no SentencePiece
model: SmolLM2, Llama 3, Qwen). A ByteLevel BPE is trained here on real Chinese and English text;
the same trainer stopped at N tokens is the base tokenizer (the first N ids of the larger one are
its ids), and a new token's row must be the mean of the base rows of the pieces the base
tokenizer splits the token's bytes into."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ..helpers import TINY_LLAMA

BASE_ROWS, MERGED_ROWS = 700, 1400


def train_byte_level_bpe(text_file: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train([str(text_file)], trainer)
    return tokenizer


def byte_level_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for (GPT-2's table: one printable character a byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    decoder = {chr(c): b for b, c in zip(printable, characters)}
    return bytes(decoder[c] for c in token)


@pytest.fixture(scope="module")
def bpe_pair(demo_assets, tmp_path_factory):
    """(merged tokenizer dir, base tokenizer): the merged one has MERGED_ROWS BPE tokens and a
    [PAD] added after them."""
    root = tmp_path_factory.mktemp("bpe")
    zh = Path(demo_assets["zh_train"]).read_text(encoding="utf-8").splitlines()[:400]
    en = Path(demo_assets["en_text"]).read_text(encoding="utf-8").splitlines()[:400]
    text = root / "mixed.txt"
    text.write_text("\n".join(zh + en) + "\n", encoding="utf-8")
    merged, base = train_byte_level_bpe(text, MERGED_ROWS), train_byte_level_bpe(text, BASE_ROWS)
    assert merged.get_vocab_size() == MERGED_ROWS and base.get_vocab_size() == BASE_ROWS
    # the test's premise: the larger run's first BASE_ROWS ids are the base tokenizer's
    assert {t: i for t, i in merged.get_vocab().items() if i < BASE_ROWS} == base.get_vocab()
    merged.add_special_tokens(["[PAD]"])
    (root / "merged").mkdir()
    merged.save(str(root / "merged" / "tokenizer.json"))
    return root / "merged", base


def test_new_bpe_tokens_split_into_the_base_tokenizers_pieces(bpe_pair):
    from tokenizers import Tokenizer

    from chla_train.new_rows import subtoken_ids

    merged_dir, base = bpe_pair
    merged = Tokenizer.from_file(str(merged_dir / "tokenizer.json"))
    pieces = subtoken_ids(merged_dir, BASE_ROWS, MERGED_ROWS + 1, where="test")
    assert len(pieces) == MERGED_ROWS + 1 - BASE_ROWS
    whole_text = 0
    for i, ids in zip(range(BASE_ROWS, MERGED_ROWS), pieces):
        token = merged.id_to_token(i)
        assert len(ids) >= 2 and all(j < BASE_ROWS for j in ids), (token, ids)
        try:
            text = byte_level_bytes(token).decode("utf-8")
        except UnicodeDecodeError:  # part of a character's bytes: no text, the base BPE on its bytes
            assert ids == [t.id for t in base.model.tokenize(token)], token
            continue
        assert ids == base.encode(text).ids, (token, text)
        whole_text += 1
    assert whole_text > 300
    assert pieces[-1] == base.encode("[PAD]").ids  # an added token is plain text


def test_bpe_subtoken_mean_rows_in_the_tied_matrix(bpe_pair):
    from tokenizers import Tokenizer

    from chla_train import model as models
    from chla_train.new_rows import subtoken_ids

    merged_dir, base = bpe_pair
    init = dict(TINY_LLAMA, vocab_size=BASE_ROWS, tie_word_embeddings=True)
    model = models.build_base_model(None, init, dtype=torch.float32, attn_implementation="sdpa", seed=3)
    start = model.get_input_embeddings().weight.detach().clone()
    models.resize_to_tokenizer(
        model,
        MERGED_ROWS + 1,
        new_row_init="subtoken_mean",
        max_vocab_growth=4,
        where="test",
        tokenizer_dir=merged_dir,
        log=lambda _: None,
    )
    weight = model.get_input_embeddings().weight.detach()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(weight[:BASE_ROWS], start)
    pieces = subtoken_ids(merged_dir, BASE_ROWS, MERGED_ROWS + 1, where="test")
    expected = torch.stack([start[ids].mean(dim=0) for ids in pieces])
    torch.testing.assert_close(weight[BASE_ROWS:], expected, rtol=0, atol=1e-6)

    # controls, each a wrong split that a plausible bug would give: byte by byte, and the
    # byte-level string taken for text ("ä¸Ń" encoded as three characters of its own)
    merged = Tokenizer.from_file(str(merged_dir / "tokenizer.json"))
    strings = [merged.id_to_token(i) for i in range(BASE_ROWS, MERGED_ROWS)]
    by_bytes = torch.stack([start[[base.token_to_id(c) for c in s]].mean(dim=0) for s in strings])
    as_text = torch.stack([start[base.encode(s).ids].mean(dim=0) for s in strings])
    for wrong in (by_bytes, as_text):
        differing = (weight[BASE_ROWS:MERGED_ROWS] - wrong).abs().amax(dim=1) > 1e-4
        assert differing.float().mean() > 0.5


def test_a_tokenizer_json_that_is_not_bpe_is_one_line(tmp_path):
    import json

    from chla_launcher.contract.errors import ChlaError
    from chla_train.new_rows import subtoken_ids

    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(ChlaError, match="its model is 'Unigram'; use new_row_init: mean"):
        subtoken_ids(tmp_path, 10, 12, where="test")
