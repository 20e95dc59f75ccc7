"""`merge_tokenizer.params.scores: original` gives the original project's merged SentencePiece
model byte for byte; chla's default gives the same pieces and ids with other scores.

The reference is an independent few-line implementation of the original merge_tokenizers.py's
algorithm (its code is not ours to commit): load both models through SentencePiece, append every
piece of the Chinese model whose text the base lacks, in order, setting only its text and a score
of 0, serialise. Inputs: a small LLaMA-style base (BPE, byte fallback, trained here on English)
and a small Chinese model (trained here with chla's train_spm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def original_merge(base_model: Path, chinese_model: Path) -> bytes:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    base, chinese = pb.ModelProto(), pb.ModelProto()
    base.ParseFromString(spm.SentencePieceProcessor(model_file=str(base_model)).serialized_model_proto())
    chinese.ParseFromString(spm.SentencePieceProcessor(model_file=str(chinese_model)).serialized_model_proto())
    existing = {piece.piece for piece in base.pieces}
    for piece in chinese.pieces:
        if piece.piece not in existing:
            added = base.pieces.add()
            added.piece = piece.piece
            added.score = 0
    return base.SerializeToString()


@pytest.fixture(scope="module")
def small_models(tmp_path_factory, demo_assets) -> dict[str, Path]:
    import sentencepiece as spm

    from chla_launcher.contract.kinds.train_spm import TrainSpmParams
    from chla_tools.vocab import train_spm

    root = tmp_path_factory.mktemp("original_scores")
    english = [line for line in Path(demo_assets["en_text"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    chinese = [line for line in Path(demo_assets["zh_train"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    (root / "en.txt").write_text("\n".join(english[:2000]) + "\n", encoding="utf-8")
    (root / "zh.txt").write_text("\n".join(chinese[:300]) + "\n", encoding="utf-8")
    (root / "zh_probe.txt").write_text("\n".join(chinese[300:500]) + "\n", encoding="utf-8")
    base_dir = root / "base"
    base_dir.mkdir()
    # LLaMA's trainer settings, small: BPE, byte fallback, digits split, no normalisation.
    spm.SentencePieceTrainer.train(
        input=str(root / "en.txt"),
        model_prefix=str(base_dir / "tokenizer"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    params = TrainSpmParams(inputs=[str(root / "zh.txt")], vocab_size=2000, character_coverage=0.98)
    train_spm(params, root / "zh", log=lambda _m: None)
    return {
        "root": root,
        "base": base_dir / "tokenizer.model",
        "add": root / "zh" / "spm.model",
        "probe": root / "zh_probe.txt",
    }


def merge_params(small_models: dict[str, Path], **params):
    """The merge_tokenizer params that add the small Chinese model to the small base."""
    from chla_launcher.contract.kinds.merge_tokenizer import MergeTokenizerParams

    return MergeTokenizerParams(base=str(small_models["base"]), add=str(small_models["add"]), **params)


def test_scores_original_is_byte_identical_to_the_original_algorithm(small_models, tmp_path):
    from chla_tools.vocab import merge_tokenizers

    quiet = lambda _m: None  # noqa: E731
    reference = original_merge(small_models["base"], small_models["add"])
    original = merge_tokenizers(merge_params(small_models, scores="original"), tmp_path / "original", log=quiet)
    chla = merge_tokenizers(merge_params(small_models), tmp_path / "chla", log=quiet)

    written = (tmp_path / "original" / "merged.model").read_bytes()
    assert written == reference
    assert json.loads((tmp_path / "original" / "merge.json").read_text())["scores"] == "original"
    # the control: chla's default scores differ, with the same pieces and ids
    assert (tmp_path / "chla" / "merged.model").read_bytes() != reference
    assert original["merged_size"] == chla["merged_size"] == 600 + original["new_pieces"]
    pieces = {}
    for name in ("original", "chla"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / name / "merged.model"))
        pieces[name] = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    assert [p for p, _ in pieces["original"]] == [p for p, _ in pieces["chla"]]
    assert all(score == 0 for _, score in pieces["original"][600:])
    assert all(score < min(s for _, s in pieces["chla"][:600]) for _, score in pieces["chla"][600:])


def test_vocab_report_gives_the_fast_slow_agreement_of_each(small_models, tmp_path):
    """The HF tokenizer of `scores: original` loads, but, with all new pieces tied at score 0,
    disagrees with SentencePiece on some Chinese lines; chla's scores agree on every line."""
    from chla_launcher.contract.kinds.vocab_report import VocabReportParams
    from chla_tools.vocab import merge_tokenizers, vocab_report

    quiet = lambda _m: None  # noqa: E731
    for name, scores in (("original", "original"), ("chla", "below_base")):
        merge_tokenizers(merge_params(small_models, scores=scores), tmp_path / name, log=quiet)
    params = VocabReportParams(
        tokenizers={"chla": str(tmp_path / "chla" / "tokenizer"), "original": str(tmp_path / "original" / "tokenizer")},
        corpora={"zh": str(small_models["probe"])},
    )
    report = vocab_report(params, tmp_path / "report", log=quiet)
    agreement = {row["tokenizer"]: row["fast_slow_agreement"] for row in report["results"]}
    assert agreement["chla"] == 1.0
    assert agreement["original"] < 1.0
    assert "HF = reference" in (tmp_path / "report" / "report.md").read_text()  # fast = slow
