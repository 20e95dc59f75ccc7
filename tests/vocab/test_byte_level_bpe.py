"""Vocabulary extension of a byte-level BPE base (Llama 3, SmolLM, Qwen style): a Chinese BPE
trained with the base's pre-tokenizer (train_bpe), merged into the base's tokenizer.json
(merge_tokenizer). The guarantees, each with a control that breaks it: base ids and special
tokens unchanged, English and code lines tokenized to exactly the base's ids, decode(encode(x))
== x, every appended token produced by the merged tokenizer. The base is a small byte-level BPE
trained in the fixture (tests/vocab/conftest.py says why and how it resembles SmolLM2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ..helpers import REPO
from .conftest import run_chla

CJK = re.compile(r"[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef]")
MIXED = ["  两个空格开头 and trailing  ", "中文English混合\t制表 123年", "“引号”——破折号…", "é café naïve → x"]


def _lines(path) -> list[str]:
    return [line.rstrip("\n") for line in open(path, encoding="utf-8") if line.strip()]


def _code_lines() -> list[str]:
    """Lines of this repository's Python code without CJK characters (they keep other non-ASCII
    characters: "→", "é", "—")."""
    lines = []
    for path in sorted((REPO / "tools").rglob("*.py")) + sorted((REPO / "launcher").rglob("*.py")):
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in lines if not CJK.search(line)]


def _tokenizers(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


def _ids(tokenizer, lines: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(lines, add_special_tokens=False)]


def _same(base, other, lines: list[str]) -> int:
    return sum(a == b for a, b in zip(_ids(base, lines), _ids(other, lines)))


@pytest.fixture(scope="module")
def parts(bpe_base, zh_bpe) -> dict:
    from chla_tools.vocab.byte_level import load_byte_level_bpe

    return {
        "base": load_byte_level_bpe(bpe_base, role="base"),
        "added": load_byte_level_bpe(zh_bpe, role="added"),
    }


def test_train_bpe_uses_the_base_pre_tokenizer_and_byte_alphabet(bpe_base, zh_bpe):
    trained = json.loads((zh_bpe / "tokenizer.json").read_text(encoding="utf-8"))
    base = json.loads((bpe_base / "tokenizer.json").read_text(encoding="utf-8"))
    assert trained["pre_tokenizer"] == base["pre_tokenizer"]
    assert len(trained["model"]["merges"]) == 4000
    # the 256 byte symbols, then one token per merge
    assert len(trained["model"]["vocab"]) == 256 + 4000
    summary = json.loads((zh_bpe / "train.json").read_text(encoding="utf-8"))
    assert summary["merges"] == 4000 and summary["lines"] == 3400


def test_base_ids_and_special_tokens_unchanged_new_tokens_after_them(bpe_base, merged_bpe, parts):
    from transformers import AutoTokenizer

    base, merged = _tokenizers(bpe_base), _tokenizers(merged_bpe["dir"] / "tokenizer")
    base_vocab = base.get_vocab(with_added_tokens=True)
    merged_vocab = merged.get_vocab(with_added_tokens=True)
    # <|endoftext|> 0 inside the model's vocabulary, the chat tokens past it
    im_start, im_end = base_vocab["<|im_start|>"], base_vocab["<|im_end|>"]
    assert base_vocab["<|endoftext|>"] == 0
    assert im_start == len(parts["base"]["model"]["vocab"]) and im_end == im_start + 1
    assert all(merged_vocab[token] == i for token, i in base_vocab.items())
    new_ids = sorted(i for token, i in merged_vocab.items() if token not in base_vocab)
    assert new_ids == list(range(im_end + 1, merged_bpe["merged_size"]))
    assert merged_bpe["base_size"] == im_end + 1 and len(new_ids) == merged_bpe["new_pieces"] > 2000
    # the base's merges first, in order; the special tokens as they were
    merged_json = json.loads((merged_bpe["dir"] / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    base_merges = parts["base"]["model"]["merges"]
    assert [list(m) for m in merged_json["model"]["merges"][: len(base_merges)]] == base_merges
    assert merged_json["added_tokens"] == json.loads((bpe_base / "tokenizer.json").read_text())["added_tokens"]
    for tokenizer in (base, merged):
        ids = tokenizer.encode("<|im_start|>user\n你好<|im_end|>").ids
        assert ids[0] == im_start and ids[-1] == im_end
    # through transformers: the specials, the chat template, the ids of a chat
    hf_base = AutoTokenizer.from_pretrained(bpe_base)
    hf = AutoTokenizer.from_pretrained(merged_bpe["dir"] / "tokenizer")
    assert len(hf) == merged_bpe["merged_size"]
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(hf, key) == getattr(hf_base, key)
        assert getattr(hf, f"{key}_id") == getattr(hf_base, f"{key}_id")
    chat = [{"role": "user", "content": "What is BPE?"}]
    assert hf.apply_chat_template(chat, tokenize=False) == hf_base.apply_chat_template(chat, tokenize=False)
    assert hf(hf.apply_chat_template(chat, tokenize=False))["input_ids"][0] == im_start


def test_english_and_code_lines_keep_the_base_ids(demo_assets, bpe_base, merged_bpe, parts):
    from chla_tools.vocab.bpe_merge import build_merged, tokenizer_from

    base, merged = _tokenizers(bpe_base), _tokenizers(merged_bpe["dir"] / "tokenizer")
    english, code = _lines(demo_assets["en_heldout"]), _code_lines()
    assert len(english) == 214 and len(code) > 5000
    assert _same(base, merged, english) == len(english)
    # ASCII lines keep the base's ids by construction; a line with a character the base spells
    # in bytes (its merges stop at "âĢ" + "¦" for "…") may get the new token for it.
    ascii_code = [line for line in code if line.isascii()]
    assert len(ascii_code) > 0.9 * len(code) and _same(base, merged, ascii_code) == len(ascii_code)
    changed = [line for line, a, b in zip(code, _ids(base, code), _ids(merged, code)) if a != b]
    assert len(changed) <= 0.001 * len(code)
    for line in changed:
        assert any(len(base.encode(char, add_special_tokens=False).ids) > 1 for char in line if not char.isascii())
    chinese = _lines(demo_assets["zh_heldout"])
    assert _same(base, merged, chinese) < 0.05 * len(chinese)  # the Chinese lines did change
    # Control 1: every merge of the Chinese BPE whose halves exist, ASCII-only tokens included
    # (the corpus holds English): held-out English lines change.
    base_json, added = parts["base"], parts["added"]
    known, tokens, merges = set(base_json["model"]["vocab"]), [], []
    for left, right in added["model"]["merges"]:
        if left + right not in known and left in known and right in known:
            known.add(left + right)
            tokens.append(left + right)
            merges.append([left, right])
    naive = build_merged(base_json, tokens, merges)
    appended = _same(base, tokenizer_from(naive), english)
    assert appended < len(english)
    # Control 2: those merges ranked before the base's: more English lines change.
    n_base = len(base_json["model"]["merges"])
    naive["model"]["merges"] = naive["model"]["merges"][n_base:] + naive["model"]["merges"][:n_base]
    assert _same(base, tokenizer_from(naive), english) < appended


def test_decode_of_encode_is_the_text(demo_assets, merged_bpe):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(merged_bpe["dir"] / "tokenizer")
    lines = _lines(demo_assets["zh_heldout"]) + _lines(demo_assets["en_heldout"]) + MIXED
    ids = hf(lines, add_special_tokens=False)["input_ids"]
    assert [hf.decode(row) for row in ids] == lines


def test_every_new_token_is_produced(merged_bpe, bpe_base, parts):
    """Each appended token is what the merged tokenizer makes of its own bytes: through
    transformers for tokens that are whole UTF-8 text, through the BPE model for pieces of a
    character. Control: without pruning, some appended tokens never come out."""
    from transformers import AutoTokenizer

    from chla_tools.vocab.bpe_merge import append_merges, build_merged, dead_tokens, tokenizer_from
    from chla_tools.vocab.byte_level import token_bytes

    hf = AutoTokenizer.from_pretrained(merged_bpe["dir"] / "tokenizer")
    base_vocab = _tokenizers(bpe_base).get_vocab(with_added_tokens=True)
    new = {token: i for token, i in hf.get_vocab().items() if token not in base_vocab}
    texts, pieces = {}, []
    for token in new:
        try:
            texts[token] = token_bytes(token).decode("utf-8")
        except UnicodeDecodeError:
            pieces.append(token)
    assert len(texts) > 1000 and pieces  # both kinds are there
    encoded = hf(list(texts.values()), add_special_tokens=False)["input_ids"]
    assert [ids for ids in encoded] == [[new[token]] for token in texts]
    model = _tokenizers(merged_bpe["dir"] / "tokenizer").model
    assert dead_tokens(model, pieces) == []
    assert merged_bpe["dead_tokens_removed"] > 0
    # control
    tokens, merges, _ = append_merges(parts["base"], parts["added"])
    unpruned = tokenizer_from(build_merged(parts["base"], tokens, merges))
    assert len(dead_tokens(unpruned.model, tokens)) > 0


def test_added_tokens_past_the_vocabulary_keep_their_ids(parts):
    """tokenizers gives an added token missing from the model "model size + n": the merge writes
    them into the model's vocabulary. Control: appended without that, <|im_start|> moves."""
    from chla_tools.vocab.bpe_merge import _check_base_ids_and_specials, build_merged, tokenizer_from

    base = parts["base"]
    assert "ÃŁÃŁÃŁ" not in base["model"]["vocab"]  # "ßßß", a token the base lacks
    merged = build_merged(base, ["ÃŁÃŁÃŁ"], [])
    _check_base_ids_and_specials(base, tokenizer_from(merged))
    for token in base["added_tokens"]:
        if token["content"] != "<|endoftext|>":
            del merged["model"]["vocab"][token["content"]]
    with pytest.raises(RuntimeError, match="changed id"):
        _check_base_ids_and_specials(base, tokenizer_from(merged))


def test_merged_folder_loads_in_transformers_4_with_the_same_ids(bpe_base, merged_bpe, tmp_path):
    """transformers 4.57 from the side environment install.sh --test builds (torch shared).
    Control: the base folder as transformers 5 saved it (TokenizersBackend) does not load there."""
    from transformers import AutoTokenizer

    from ..integration.test_demo_artifacts import TRANSFORMERS4, load_with

    if not (TRANSFORMERS4 / "transformers").is_dir():
        pytest.fail(f"{TRANSFORMERS4} is missing: run `bash install.sh --test`")
    folder = merged_bpe["dir"] / "tokenizer"
    loaded = load_with(TRANSFORMERS4, [folder, bpe_base], tmp_path, "tf4")
    assert loaded["transformers"].startswith("4.")
    got = loaded["folders"][str(folder)]
    assert "error" not in got, got
    from ..integration.test_demo_artifacts import TEXTS

    hf = AutoTokenizer.from_pretrained(folder)
    assert got["ids"] == [hf(text)["input_ids"] for text in TEXTS]
    assert got["vocab"] == len(hf) and got["eos_token_id"] == hf.eos_token_id
    assert "TokenizersBackend" in loaded["folders"][str(bpe_base)]["error"]


def test_report_puts_both_families_side_by_side(demo_assets, bpe_base, merged_bpe, tmp_path):
    from chla_launcher.contract.kinds.vocab_report import VocabReportParams
    from chla_tools.vocab import vocab_report

    zh = tmp_path / "zh.txt"
    zh.write_text("\n".join(_lines(demo_assets["zh_heldout"])[:300]) + "\n", encoding="utf-8")
    params = VocabReportParams(
        tokenizers={"bpe": str(bpe_base), "bpe+zh": str(merged_bpe["dir"]), "llama": demo_assets["base_tokenizer"]},
        corpora={"zh": str(zh), "en": demo_assets["en_heldout"]},
    )
    report = vocab_report(params, tmp_path / "report", log=lambda m: None)
    row = {(r["tokenizer"], r["corpus"]): r for r in report["results"]}
    families = {name: t["family"] for name, t in report["tokenizers"].items()}
    assert families == {"bpe": "byte_level_bpe", "bpe+zh": "byte_level_bpe", "llama": "sentencepiece"}
    assert report["tokenizers"]["bpe+zh"]["reference"] == "tokenizers"
    assert all(r["fast_slow_agreement"] == 1.0 for r in report["results"])
    # byte tokens: pieces of characters spelt in bytes; none in English, fewer after the merge
    assert row[("bpe", "zh")]["byte_fallback_rate"] > 0.2 > 0.05 > row[("bpe+zh", "zh")]["byte_fallback_rate"]
    assert row[("bpe", "en")]["byte_fallback_rate"] == row[("bpe+zh", "en")]["byte_fallback_rate"] < 0.01
    assert row[("bpe+zh", "zh")]["tokens_per_char"] < 0.7 * row[("bpe", "zh")]["tokens_per_char"]
    assert row[("bpe+zh", "en")]["same_ids_as_first"] == 1.0 > row[("bpe+zh", "zh")]["same_ids_as_first"]
    assert row[("llama", "en")]["same_ids_as_first"] is None  # another family: not compared
    table = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "| bpe+zh | byte-level BPE |" in table and "| llama | SentencePiece |" in table


def test_cli_train_bpe_and_merge(capsys, demo_assets, bpe_base, tmp_path):
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(_lines(demo_assets["zh_train"])[:500]) + "\n", encoding="utf-8")
    code, out, err = run_chla(
        capsys, "vocab", "train-bpe", "--input", corpus, "--base", bpe_base, "--merges", 300, "--out", tmp_path / "t"
    )
    assert code == 0, err
    assert "300 merges" in out
    code, out, err = run_chla(
        capsys, "vocab", "merge", "--base", bpe_base, "--add", tmp_path / "t", "--out", tmp_path / "m", "--pad-token"
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert f"{summary['base_size']} + {summary['new_pieces']} new = {summary['merged_size']}; + [PAD] = " in out
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["merge.json", "tokenizer"]
    files = sorted(p.name for p in (tmp_path / "m" / "tokenizer").iterdir())
    assert files == ["chat_template.jinja", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    from transformers import AutoTokenizer

    padded = AutoTokenizer.from_pretrained(tmp_path / "m" / "tokenizer")
    assert padded.pad_token == "[PAD]" and padded.pad_token_id == summary["merged_size"] == len(padded) - 1


@pytest.mark.parametrize(
    "case, needles",
    [
        ("spm_base_for_train_bpe", ["base tokenizer", "no ByteLevel pre-tokenizer"]),
        ("bpe_into_spm_base", ["cannot be merged into the SentencePiece base", "train_spm"]),
        ("original_scores", ["scores: original", "SentencePiece merges only"]),
        ("other_pre_tokenizer", ["pre-tokenizer differs from the base's", "train_bpe"]),
    ],
)
def test_bad_input_is_one_clear_line(capsys, demo_assets, bpe_base, zh_bpe, tmp_path, case, needles):
    from .test_bad_input import _assert_nothing_written, _assert_one_clear_line

    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(_lines(demo_assets["zh_train"])[:50]) + "\n", encoding="utf-8")
    spm_json = tmp_path / "spm_tokenizer.json"  # the LLaMA base's tokenizer.json (no ByteLevel)
    spm_json.write_text((Path(demo_assets["base_tokenizer"]) / "tokenizer.json").read_text(encoding="utf-8"))
    other = tmp_path / "other"
    other.mkdir()
    data = json.loads((zh_bpe / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    (other / "tokenizer.json").write_text(json.dumps(data))
    args = {
        "spm_base_for_train_bpe": ["train-bpe", "--input", corpus, "--base", spm_json],
        "bpe_into_spm_base": ["merge", "--base", demo_assets["base_tokenizer"], "--add", zh_bpe],
        "original_scores": ["merge", "--base", bpe_base, "--add", zh_bpe, "--scores", "original"],
        "other_pre_tokenizer": ["merge", "--base", bpe_base, "--add", other],
    }[case]
    code, out, err = run_chla(capsys, "vocab", *args, "--out", tmp_path / "out")
    _assert_one_clear_line(code, out, err, *needles)
    _assert_nothing_written(tmp_path, "out")


def test_plan_sizes_a_byte_level_merge_before_it_runs(tmp_path, bpe_base):
    """`chla plan` sizes the vocabulary a merge_tokenizer stage will produce from a train_bpe
    stage as the base plus one token per merge (an upper bound), as it does for train_spm."""
    from chla_launcher.contract.recipe import load_recipe
    from chla_launcher.plan import _Sizes

    corpus = tmp_path / "zh.txt"
    corpus.write_text("中文\n", encoding="utf-8")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        "name: x\nstages:\n"
        f"  zh: {{kind: train_bpe, params: {{inputs: [{corpus}], base: {bpe_base}, merges: 3000}}}}\n"
        f'  vocab: {{kind: merge_tokenizer, params: {{base: {bpe_base}, add: "${{stages.zh.out}}"}}}}\n',
        encoding="utf-8",
    )
    recipe = load_recipe(recipe_file, run_dir=str(tmp_path / "run"))
    sizes = _Sizes(recipe)
    assert sizes.tokenizer_size(str(bpe_base))[:2] == (2259, True)
    assert sizes.tokenizer_size(str(Path(recipe.run_dir) / "vocab" / "out" / "tokenizer"))[:2] == (2259 + 3000, False)
