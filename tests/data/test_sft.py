"""SFT data: exact template, prompt masking, target = output + EOS, [PAD] (base + 1), padding,
truncation, packing (plain, and per micro-batch with examples kept apart) and the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chla_tools.sft_data import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    collate_sft,
    collate_sft_packed,
    encode_prompt,
    format_prompt,
    load_sft_dataset,
    load_sft_tokenizer,
    shared_prompt_prefix,
)

# The original project's Alpaca training prompt, verbatim (Chinese-LLaMA-Alpaca,
# scripts/training/build_dataset.py: PROMPT_TEMPLATE).
ORIGINAL = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response: "
)


@pytest.fixture(scope="module")
def tokenizer(demo_assets):
    return load_sft_tokenizer(demo_assets["base_tokenizer"])


@pytest.fixture()
def records(demo_assets):
    """Sentiment examples: one task, so one instruction that every example shares."""
    with open(demo_assets["sentiment_train"], encoding="utf-8") as handle:
        return json.load(handle)[:40]


def test_template_is_the_original(records):
    assert PROMPT_TEMPLATE == ORIGINAL
    assert format_prompt("说一句话") == ORIGINAL.replace("{instruction}", "说一句话")
    assert format_prompt("翻译", "你好") == ORIGINAL.replace("{instruction}", "翻译\n你好")
    assert format_prompt("a {x}", template="Q: {instruction}\nA: ") == "Q: a {x}\nA: "


def test_prompt_is_masked_and_target_is_output_plus_eos(tmp_path, records, tokenizer, demo_assets):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    dataset = load_sft_dataset(path, demo_assets["base_tokenizer"], max_seq_length=512, cache_dir=tmp_path / "cache")
    assert len(dataset) == len(records) and dataset.stats["records"] == len(records)
    for index in (0, 7, len(records) - 1):
        record, example = records[index], dataset[index]
        prompt = format_prompt(record["instruction"], record["input"])
        # The answer is the prompt's continuation: prompt + output encoded as one string, the
        # answer's tokens those past the prompt's, the prompt's trailing space carried by the
        # answer's first token; a model generating after the prompt sees the same boundary.
        prompt_ids = tokenizer(prompt.rstrip())["input_ids"]
        whole = tokenizer(prompt + record["output"])["input_ids"]
        assert whole[: len(prompt_ids)] == prompt_ids
        target_ids = whole[len(prompt_ids) :] + [tokenizer.eos_token_id]
        assert prompt_ids[0] == tokenizer.bos_token_id
        assert example["input_ids"].dtype == np.int64 and example["labels"].dtype == np.int64
        assert example["input_ids"].tolist() == prompt_ids + target_ids
        assert example["labels"].tolist() == [IGNORE_INDEX] * len(prompt_ids) + target_ids
        assert tokenizer.decode(example["labels"][len(prompt_ids) : -1]).strip() == record["output"]
        assert example["input_ids"][: len(prompt_ids)].tolist() == encode_prompt(tokenizer, prompt)
        # control: the original's way, prompt and output encoded each on its own, differs at the
        # boundary (a lone "▁" ends the prompt, and the output starts with its own "▁")
        separate = tokenizer(prompt)["input_ids"] + tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        assert separate != whole and tokenizer.convert_ids_to_tokens(separate[len(prompt_ids)]) == "▁"
    assert dataset.stats["split_boundary"] == 0


def test_pad_token_makes_vocab_base_plus_one_and_collate_pads_right(tmp_path, records, tokenizer, demo_assets):
    from transformers import AutoTokenizer

    base = len(AutoTokenizer.from_pretrained(demo_assets["base_tokenizer"]))
    assert base == 32000
    assert len(tokenizer) == base + 1 and tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == base
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    dataset = load_sft_dataset(path, demo_assets["base_tokenizer"], cache_dir=tmp_path / "cache")
    assert dataset.pad_id == base and dataset.vocab_size == base + 1
    batch = collate_sft([dataset[0], dataset[1]], dataset.pad_id)
    lengths = [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]
    longest = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, longest)
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (longest - length)
        assert (batch["input_ids"][row, length:] == base).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()


def test_truncation_packing_and_cache(tmp_path, records, demo_assets):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    full = load_sft_dataset(path, demo_assets["base_tokenizer"], max_seq_length=4096, cache_dir=tmp_path / "c")
    # A limit that cuts some examples inside the target and leaves others without any target.
    prompt_lengths = sorted(int((full[i]["labels"] == IGNORE_INDEX).sum()) for i in range(len(full)))
    limit = prompt_lengths[len(prompt_lengths) // 2] + 1
    short = load_sft_dataset(path, demo_assets["base_tokenizer"], max_seq_length=limit, cache_dir=tmp_path / "c")
    kept = [i for i in range(len(full)) if (full[i]["labels"][:limit] != IGNORE_INDEX).any()]
    assert 0 < len(kept) < len(full) and short.stats["truncated"] >= len(kept)
    assert len(short) == len(kept) and short.stats["no_target"] == len(full) - len(kept)
    for position, index in enumerate(kept):
        assert short[position]["input_ids"].tolist() == full[index]["input_ids"][:limit].tolist()
        assert short[position]["labels"].tolist() == full[index]["labels"][:limit].tolist()

    packed = load_sft_dataset(
        path, demo_assets["base_tokenizer"], max_seq_length=1024, packing=True, cache_dir=tmp_path / "c"
    )
    assert len(packed) < len(full) and all(len(packed[i]["input_ids"]) <= 1024 for i in range(len(packed)))
    assert np.array_equal(
        np.concatenate([packed[i]["labels"] for i in range(len(packed))]),
        np.concatenate([full[i]["labels"] for i in range(len(full))]),
    )

    entries = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(entries) == 3  # one per option set
    again = load_sft_dataset(path, demo_assets["base_tokenizer"], max_seq_length=limit, cache_dir=tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == entries
    assert np.array_equal(again.offsets, short.offsets)


def test_packed_batches_hold_every_example_once(tmp_path, records, demo_assets):
    """A micro-batch packed into rows (position ids restarting per example) holds every example
    once, whole, with the padded batch's label count; with the shared prompt prefix, once per row.
    That each backend computes the padded batch's loss from them: test_packed_attention.py."""
    from chla_train.trainer import label_token_count

    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    dataset = load_sft_dataset(path, demo_assets["base_tokenizer"], max_seq_length=256, cache_dir=tmp_path / "c")
    examples = [dataset[i] for i in range(16)]
    lengths = [len(e["input_ids"]) for e in examples]
    packed = collate_sft_packed(examples, dataset.pad_id, row_length=256)
    padded = collate_sft(examples, dataset.pad_id)
    rows = packed["input_ids"].shape[0]
    assert rows < len(examples) and packed["input_ids"].shape[1] <= 256
    assert packed["input_ids"].size < padded["input_ids"].size
    fill = packed["attention_mask"].sum(axis=1)
    assert all(fill[a] + fill[b] > 256 for a in range(rows) for b in range(a))  # first fit: no two rows merge
    assert int(packed["attention_mask"].sum()) == sum(lengths)
    assert label_token_count(packed) == label_token_count(padded)
    # Each example appears once, whole, with positions 0..n-1.
    found = []
    for row in range(rows):
        starts = np.flatnonzero(packed["position_ids"][row] == 0)
        for start, stop in zip(starts, list(starts[1:]) + [packed["input_ids"].shape[1]]):
            if packed["attention_mask"][row, start]:
                assert packed["attention_mask"][row, start:stop].all()
                found.append(packed["input_ids"][row, start:stop].tolist())
    assert sorted(found) == sorted(e["input_ids"].tolist() for e in examples)
    with pytest.raises(ValueError, match="does not fit"):
        collate_sft_packed(examples, dataset.pad_id, row_length=min(lengths) - 1)

    # The shared prompt prefix (template + the task's one instruction) computed once per row.
    prefix = shared_prompt_prefix(examples)
    instruction = len(
        load_sft_tokenizer(demo_assets["base_tokenizer"])(format_prompt(records[0]["instruction"]))["input_ids"]
    )
    assert instruction - 8 <= prefix < instruction  # the template's end follows the review, not shared
    assert all((e["labels"][: prefix + 1] == IGNORE_INDEX).all() for e in examples)
    shared = collate_sft_packed(examples, dataset.pad_id, row_length=256, share_prefix=True)
    assert int(shared["attention_mask"].sum()) == sum(lengths) - (len(examples) - shared["input_ids"].shape[0]) * prefix
    assert label_token_count(shared) == label_token_count(padded)
    attend = shared["packed_attention_mask"]
    assert attend.shape == (shared["input_ids"].shape[0],) + (shared["input_ids"].shape[1],) * 2
    assert attend.diagonal(axis1=1, axis2=2).all()  # every query has a key (no NaN rows)
    assert not np.triu(attend, k=1).any()  # causal
    # Examples that start differently share nothing.
    other = dict(examples[1], input_ids=np.concatenate([[7], examples[1]["input_ids"][1:]]))
    assert shared_prompt_prefix([examples[0], other]) == 0


def test_a_token_across_the_prompt_boundary_falls_back_to_encoding_the_answer_alone(tmp_path, demo_assets):
    """A template that ends inside a word ("say hel" + the output "lo" is "▁hell", "o"): the
    pair's tokens do not start with the prompt's, so the answer is encoded on its own, counted."""
    tokenizer = load_sft_tokenizer(demo_assets["base_tokenizer"])
    path = tmp_path / "train.json"
    records = [{"instruction": "say", "input": "", "output": "lo"}, {"instruction": "say", "input": "", "output": "!"}]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    dataset = load_sft_dataset(
        path, demo_assets["base_tokenizer"], template="{instruction} hel", cache_dir=tmp_path / "cache"
    )
    head = encode_prompt(tokenizer, "say hel")
    assert tokenizer("say hello")["input_ids"][: len(head)] != head  # the premise
    assert dataset.stats["split_boundary"] == 1
    answer = tokenizer("lo", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert dataset[0]["input_ids"].tolist() == head + answer
    assert dataset[0]["labels"].tolist() == [IGNORE_INDEX] * len(head) + answer
    # control: "!" starts a piece of its own, so that pair is split where the prompt ends
    assert dataset[1]["input_ids"].tolist() == tokenizer("say hel!")["input_ids"] + [tokenizer.eos_token_id]


def test_example_mean_weighs_every_example_and_replay_block_as_one(tmp_path, records, demo_assets):
    from chla_tools.sft_data import sft_collate
    from chla_tools.sft_replay import collate_with_replay
    from chla_train.trainer import label_token_count, label_weight_sum

    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    dataset = load_sft_dataset(path, demo_assets["base_tokenizer"], cache_dir=tmp_path / "cache")
    items = [dataset[i] for i in range(6)]
    padded = sft_collate(dataset.pad_id, example_mean=True)(items)
    packed = sft_collate(dataset.pad_id, pack_batches=True, row_length=512, share_prefix=True, example_mean=True)(items)
    for batch in (padded, packed):
        assert label_weight_sum(batch) == pytest.approx(6)
        assert not batch["label_weights"][batch["labels"] == IGNORE_INDEX].any()
    assert padded["label_weights"][:, 1:].sum(axis=1) == pytest.approx(np.ones(6))
    blocks = [{"input_ids": np.arange(100, 110), "labels": np.arange(100, 110), "replay": True}] * 2
    mixed = collate_with_replay(sft_collate(dataset.pad_id, example_mean=True), dataset.pad_id, weighted=True)
    assert label_weight_sum(mixed(items + blocks)) == pytest.approx(8)
    assert label_weight_sum(mixed(blocks)) == pytest.approx(2)
    # control: the token mean divides by the label tokens, more than the examples here
    plain = sft_collate(dataset.pad_id)(items)
    assert "label_weights" not in plain and label_weight_sum(plain) == label_token_count(plain) > 6


def test_the_cache_is_read_again_and_never_across_reader_code(tmp_path, records, demo_assets, monkeypatch):
    """A second load of the same file (another run, a resubmitted stage) reads the entry the first
    wrote; an entry written by other reader code is not read (control: a changed fingerprint of
    the reader makes a second entry)."""
    from chla_tools import sft_data

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    first = load_sft_dataset(path, demo_assets["base_tokenizer"], cache_dir=tmp_path / "c")
    again = load_sft_dataset(path, demo_assets["base_tokenizer"], cache_dir=tmp_path / "c")
    assert not first.from_cache and again.from_cache
    assert np.array_equal(again.input_ids, first.input_ids) and np.array_equal(again.labels, first.labels)
    assert len(list((tmp_path / "c").iterdir())) == 1

    monkeypatch.setattr(sft_data, "_reader_fingerprint", lambda: "other reader code")
    other = load_sft_dataset(path, demo_assets["base_tokenizer"], cache_dir=tmp_path / "c")
    assert not other.from_cache and len(list((tmp_path / "c").iterdir())) == 2


def test_max_records_reads_the_first_records_only(tmp_path, records, demo_assets):
    """`max_records` (an sft stage's quick trial) tokenizes the file's first N records, as the whole
    file would; the capped and the whole file are separate cache entries."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    whole = load_sft_dataset(path, demo_assets["base_tokenizer"], cache_dir=tmp_path / "c")
    first = load_sft_dataset(path, demo_assets["base_tokenizer"], cache_dir=tmp_path / "c", max_records=3)
    assert len(first) == 3 < len(whole) and first.stats["records"] == 3
    for index in range(3):
        assert first[index]["input_ids"].tolist() == whole[index]["input_ids"].tolist()
        assert first[index]["labels"].tolist() == whole[index]["labels"].tolist()
    assert len(list((tmp_path / "c").iterdir())) == 2
