"""The issue's "must show" 1-3 on the real demo data: a 20k Chinese model merged into the real
LLaMA-style base tokenizer."""

from __future__ import annotations

import json

import pytest

from .conftest import run_chla


def _lines(path: str) -> list[str]:
    return [line.rstrip("\n") for line in open(path, encoding="utf-8") if line.strip()]


@pytest.fixture(scope="module")
def report(demo_assets, merged, vocab_dir) -> dict:
    from chla_launcher.contract.kinds.vocab_report import VocabReportParams
    from chla_tools.vocab import vocab_report

    corpora = {
        "zh_heldout": demo_assets["zh_heldout"],
        "en_heldout": demo_assets["en_heldout"],
        "en_text": demo_assets["en_text"],
    }
    params = VocabReportParams(
        tokenizers={"base": demo_assets["base_tokenizer"], "merged": str(merged["dir"])}, corpora=corpora
    )
    return vocab_report(params, vocab_dir / "report", log=lambda m: None)


def _result(report: dict, tokenizer: str, corpus: str) -> dict:
    return next(r for r in report["results"] if r["tokenizer"] == tokenizer and r["corpus"] == corpus)


def test_merged_vocabulary_arithmetic(merged):
    assert merged["base_size"] == 32000
    assert merged["added_model_size"] == 20000
    # Pieces the base already has (ASCII, common CJK characters, punctuation) are not duplicated.
    assert 15000 < merged["new_pieces"] < 20000
    assert merged["merged_size"] == merged["final_size"] == 32000 + merged["new_pieces"]
    assert merged["arithmetic"] == f"32000 + {merged['new_pieces']} new = {merged['merged_size']}"


def test_chinese_tokens_per_char_drop_by_35_percent(report):
    base, new = _result(report, "base", "zh_heldout"), _result(report, "merged", "zh_heldout")
    assert base["chars"] == new["chars"] > 100_000
    assert new["tokens_per_char"] <= 0.65 * base["tokens_per_char"]
    # the base spells many characters as 3 byte pieces; the merged tokenizer almost never does
    assert base["byte_fallback_rate"] > 0.2 and new["byte_fallback_rate"] < 0.02


def test_english_token_count_changes_by_at_most_one_percent(report):
    for corpus in ("en_heldout", "en_text"):
        base, new = _result(report, "base", corpus), _result(report, "merged", corpus)
        assert abs(new["tokens"] / base["tokens"] - 1) <= 0.01, corpus


def test_fast_and_sentencepiece_agree_on_every_heldout_line(report, demo_assets, merged):
    for row in report["results"]:
        assert row["fast_slow_agreement"] == 1.0, row
        assert row["lines_agree"] == row["lines"]
    # and independently of the report, through AutoTokenizer with special tokens, leading and
    # repeated spaces included
    import sentencepiece as spm
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(merged["dir"] / "tokenizer")
    slow = spm.SentencePieceProcessor(model_file=str(merged["dir"] / "merged.model"))
    lines = _lines(demo_assets["zh_heldout"]) + _lines(demo_assets["en_heldout"])
    lines += ["  两个空格开头", "中文  English   混合\t制表", "１９９８年 1998年", "a    b"]
    ids = fast(lines)["input_ids"]
    for line, fast_ids, slow_ids in zip(lines, ids, slow.encode(lines)):
        assert fast_ids == [slow.bos_id()] + slow_ids, line


def test_report_files(report, vocab_dir):
    out = vocab_dir / "report"
    on_disk = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert on_disk["tokenizers"]["base"]["vocab_size"] == 32000
    keys = {
        "tokenizer",
        "corpus",
        "chars",
        "tokens",
        "tokens_per_char",
        "bytes_per_token",
        "byte_fallback_rate",
        "unk_rate",
        "fast_slow_agreement",
    }
    assert all(keys <= set(row) for row in on_disk["results"])
    assert len(on_disk["results"]) == 6
    table = (out / "report.md").read_text(encoding="utf-8")
    assert table.count("\n| merged |") == 3
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chinese_round_trips_and_base_ids_unchanged(demo_assets, merged):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(demo_assets["base_tokenizer"])
    tok = AutoTokenizer.from_pretrained(merged["dir"] / "tokenizer")
    assert len(tok) == merged["merged_size"]
    lines = _lines(demo_assets["zh_heldout"])
    encoded = tok(lines)["input_ids"]
    for line, ids in zip(lines, encoded):
        assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == line
    base_vocab = base.get_vocab()
    merged_vocab = tok.get_vocab()
    assert len(base_vocab) == 32000
    assert all(merged_vocab[piece] == i for piece, i in base_vocab.items())
    # at the SentencePiece level too: the first 32000 pieces are the base's, score and type included
    from chla_tools.vocab import load_sp_proto

    base_proto = load_sp_proto(demo_assets["base_sp_model"])
    merged_proto = load_sp_proto(merged["dir"] / "merged.model")
    assert list(merged_proto.pieces)[:32000] == list(base_proto.pieces)
    # new pieces: strictly decreasing scores below every base score, so score order == id order
    # (what transformers' own converter assumes) and SentencePiece never sees a tie
    new_scores = [p.score for p in merged_proto.pieces[32000:]]
    assert max(new_scores) < min(p.score for p in base_proto.pieces)
    assert all(a > b for a, b in zip(new_scores, new_scores[1:]))


def test_sft_variant_adds_exactly_one_pad_token(merged, merged_pad, demo_assets):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(merged["dir"] / "tokenizer")
    padded = AutoTokenizer.from_pretrained(merged_pad["dir"] / "tokenizer")
    assert len(padded) == len(plain) + 1 == merged_pad["final_size"]
    assert padded.pad_token == "[PAD]" and padded.pad_token_id == len(plain)
    assert plain.pad_token is None
    assert {p: i for p, i in padded.get_vocab().items() if p != "[PAD]"} == plain.get_vocab()
    lines = _lines(demo_assets["zh_heldout"])[:200]
    assert padded(lines)["input_ids"] == plain(lines)["input_ids"]
    batch = padded(lines[:2], padding=True)["input_ids"]
    assert len(batch[0]) == len(batch[1]) and padded.pad_token_id in batch[0] + batch[1]


def test_sentiment_labels_split_alike_into_one_new_piece(merged_pad):
    """After the template's "Response:" the demo's SFT tokenizer splits each sentiment label into
    "▁" and one piece the merge added, so the label is decided by one row that SFT trains
    (`vocab_rows: new`); the control, the labels used before, splits unlike."""
    from transformers import AutoTokenizer

    from chla_tools.sft_data import encode_pairs, format_prompt
    from chla_tools.tasks import TASKS

    tokenizer = AutoTokenizer.from_pretrained(merged_pad["dir"] / "tokenizer")
    prompt = format_prompt(TASKS["sentiment"].instruction, "这本书写得很好。")

    def answer_tokens(label: str) -> list[str]:
        ((_prompt, answer, joined),) = encode_pairs(tokenizer, [prompt], [label])
        assert joined
        return tokenizer.convert_ids_to_tokens(answer)

    for label in TASKS["sentiment"].choices:
        tokens = answer_tokens(label)
        assert tokens == ["▁", label] and tokenizer.convert_tokens_to_ids(label) >= 32000
    assert answer_tokens("正面") == ["▁正", "面"] and answer_tokens("负面") == ["▁", "负面"]


def test_cli_merge_prints_the_arithmetic(capsys, demo_assets, zh_spm, tmp_path):
    code, out, err = run_chla(
        capsys,
        "vocab",
        "merge",
        "--base",
        demo_assets["base_tokenizer"],
        "--add",
        zh_spm,
        "--out",
        tmp_path / "m",
        "--pad-token",
    )
    assert code == 0, err
    assert "32000 + " in out and "; + [PAD] = " in out
    summary = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert f"= {summary['merged_size']}; + [PAD] = {summary['merged_size'] + 1}" in out
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["merge.json", "merged.model", "tokenizer"]
