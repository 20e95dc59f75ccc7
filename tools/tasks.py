"""The demo's instruction tasks: what each one asks, the answer format the model learns, and how an
answer is scored, beside the trivial baselines and references it is compared with.

A task record is an Alpaca record with one more key, `task` (a name below), which the evaluator
reads to pick the scorer; a file whose records have no `task` is scored by exact match.

- sentiment: a review -> "积极" or "消极" (positive, negative). Accuracy of the normalised
  answer (exact match). Also scored by ranking the two labels by the model's log-likelihood
  (chla_tools.evaluate). Baseline: the test file's majority label.
- segmentation: a sentence -> its words separated by single spaces (the icwb2 format). Word F1
  over character spans (chla_tools.text_metrics). Baseline: every character a word. Reference:
  jieba's default dictionary segmenter (HMM on).
- entities: a sentence -> "人名：江泽民、李鹏；地名：北京；机构名：无" (every field always present,
  names in order of first appearance, "无" for none). Entity F1 over the set of distinct
  (type, text) pairs of each sentence, micro-averaged over the file; a name predicted under the
  wrong type is wrong. The parser accepts ":" or "：", "、" "，" "," "/" or spaces between names,
  fields in any order, and ignores anything else. Baseline: no entities (F1 0 by definition: precision counts
  as 0 with no predictions). Reference: jieba's POS tagger (nr*/ns*/nt* words).
- continuation: a passage of 三国演义 -> the sentence that follows it. Character-level ROUGE-L
  F1 against that sentence, averaged over items. Baseline: repeat the passage's last sentence.

Baselines and references answer in the task's format and go through the same parser and scorer
as the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

from chla_launcher.contract.errors import ChlaError
from chla_tools.peoples_daily import CLOSERS, ENTITY_TYPES, ORGANISATION, PERSON, PLACE, SENTENCE_ENDS
from chla_tools.text_metrics import prf, rouge_l, segmentation_counts, set_counts


def normalise(text: str) -> str:
    """Runs of whitespace -> one space, ends stripped."""
    return " ".join(text.split())


def split_text_sentences(text: str) -> list[str]:
    """Sentences of plain Chinese text: each ends after 。！？ and the closing quotes or brackets
    that follow; text after the last end is a sentence too."""
    sentences, start, index = [], 0, 0
    while index < len(text):
        if text[index] in SENTENCE_ENDS:
            index += 1
            while index < len(text) and (text[index] in SENTENCE_ENDS or text[index] in CLOSERS):
                index += 1
            sentences.append(text[start:index])
            start = index
        else:
            index += 1
    if text[start:].strip():
        sentences.append(text[start:])
    return sentences


class Task:
    """One instruction task: its instruction, its answer format and its scoring."""

    name: str
    instruction: str
    # The figure that heads the task's row, a key of metrics(), and its label in tables.
    metric: str
    metric_label: str
    # Generation length: enough for the longest answer the task's builder writes, plus EOS.
    max_new_tokens: int
    # Classification tasks: the answers to rank by log-likelihood.
    choices: tuple[str, ...] = ()
    # The systems scored beside the model: key -> (role, label); role is baseline or reference.
    comparisons: dict[str, tuple[str, str]] = {}

    def record(self, text: str, answer: str) -> dict[str, str]:
        return {"task": self.name, "instruction": self.instruction, "input": text, "output": answer}

    def comparison_answers(self, record: dict) -> dict[str, str]:
        """The baselines' and references' answers to one record, in the task's format."""
        return {}

    def score(self, record: dict, answer: str) -> Mapping[str, float]:
        """Counts that add up over items."""
        raise NotImplementedError

    def metrics(self, counts: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError


class ExactMatch(Task):
    """Any labelled file without a `task` key: the normalised answer must equal the output. Its
    baseline, the file's majority output, is computed over the whole file when shards are
    added up (chla_tools.evaluate)."""

    name = "exact_match"
    instruction = ""
    metric, metric_label = "accuracy", "accuracy (exact match)"
    max_new_tokens = 0  # the evaluate stage's max_new_tokens

    def score(self, record: dict, answer: str) -> Mapping[str, float]:
        return {"items": 1, "correct": int(normalise(answer) == normalise(record["output"]))}

    def metrics(self, counts: Mapping[str, float]) -> dict[str, float]:
        return {"accuracy": counts["correct"] / counts["items"] if counts["items"] else 0.0}


class Sentiment(ExactMatch):
    name = "sentiment"
    instruction = "判断下面这条商品或图书评论的情感倾向，只回答“积极”或“消极”。"
    metric_label = "accuracy"
    max_new_tokens = 4
    # 积极/消极 rather than 正面/负面: after "Response:" the demo's merged tokenizer splits both
    # labels alike, "▁" then one piece the merge added, so the label is one choice between two
    # rows that SFT trains (vocab_rows: new). 正面/负面 split unlike ("▁正" "面" against "▁"
    # "负面"): the choice fell between a new row and "▁", a base row shared with every space in
    # the other tasks' answers, and on the validation split the log-likelihood ranking was no
    # better than the majority label (0.46 against 0.62 with these labels, same SFT).
    choices = ("积极", "消极")


class Segmentation(Task):
    name = "segmentation"
    instruction = "请对下面的句子分词，词与词之间用一个空格隔开。"
    metric, metric_label = "f1", "word F1"
    max_new_tokens = 128  # the longest test answer is 85 tokens with the demo's merged tokenizer
    comparisons = {
        "every_character": ("baseline", "every character a word"),
        "jieba": ("reference", "jieba (dictionary segmenter)"),
    }

    @staticmethod
    def format_answer(words: list[str]) -> str:
        return " ".join(words)

    def comparison_answers(self, record: dict) -> dict[str, str]:
        sentence = record["input"]
        return {"every_character": " ".join(sentence), "jieba": " ".join(jieba_words(sentence))}

    def score(self, record: dict, answer: str) -> Mapping[str, float]:
        return segmentation_counts(record["output"].split(), answer.split())

    def metrics(self, counts: Mapping[str, float]) -> dict[str, float]:
        return prf(counts["correct"], counts["predicted"], counts["gold"])


# A field's names run to the next field's label, a "；" / ";", or a line end.
_ENTITY_FIELD = re.compile(r"(人名|地名|机构名)\s*[:：]([^；;\n]*?)(?=(?:人名|地名|机构名)\s*[:：]|[；;\n]|$)")
_NAME_SEPARATORS = re.compile(r"[、，,/\s]+")
NO_ENTITY = "无"


class Entities(Task):
    name = "entities"
    instruction = "找出下面句子中的人名、地名和机构名。"
    metric, metric_label = "f1", "entity F1"
    max_new_tokens = 48  # longest test answer: 35 tokens
    comparisons = {"no_entities": ("baseline", "no entities"), "jieba": ("reference", "jieba POS tags (nr/ns/nt)")}

    @staticmethod
    def format_answer(mentions: list[tuple[str, str]]) -> str:
        """Every type's distinct names in order of first appearance, "无" for none."""
        fields = []
        for kind in ENTITY_TYPES:
            names = list(dict.fromkeys(text for type_, text in mentions if type_ == kind))
            fields.append(f"{kind}：{'、'.join(names) or NO_ENTITY}")
        return "；".join(fields)

    @staticmethod
    def parse(answer: str) -> set[tuple[str, str]]:
        found = set()
        for kind, names in _ENTITY_FIELD.findall(answer):
            for name in _NAME_SEPARATORS.split(names):
                name = name.strip()
                if name and name != NO_ENTITY:
                    found.add((kind, name))
        return found

    def comparison_answers(self, record: dict) -> dict[str, str]:
        return {"no_entities": self.format_answer([]), "jieba": self.format_answer(jieba_entities(record["input"]))}

    def score(self, record: dict, answer: str) -> Mapping[str, float]:
        gold, predicted = self.parse(record["output"]), self.parse(answer)
        counts = set_counts(gold, predicted)
        for kind in ENTITY_TYPES:
            for key, value in set_counts(
                {e for e in gold if e[0] == kind}, {e for e in predicted if e[0] == kind}
            ).items():
                counts[f"{kind}.{key}"] = value
        return counts

    def metrics(self, counts: Mapping[str, float]) -> dict[str, float]:
        figures = prf(counts["correct"], counts["predicted"], counts["gold"])
        for kind in ENTITY_TYPES:
            figures[f"{kind}.f1"] = prf(counts[f"{kind}.correct"], counts[f"{kind}.predicted"], counts[f"{kind}.gold"])[
                "f1"
            ]
        return figures


class Continuation(Task):
    name = "continuation"
    instruction = "续写下面这段《三国演义》，只写紧接着的一句。"
    metric, metric_label = "rouge_l_f1", "ROUGE-L F1 (characters)"
    max_new_tokens = 48  # longest test answer: 41 tokens
    comparisons = {"copy_last_sentence": ("baseline", "repeat the passage's last sentence")}

    def comparison_answers(self, record: dict) -> dict[str, str]:
        return {"copy_last_sentence": split_text_sentences(record["input"])[-1]}

    def score(self, record: dict, answer: str) -> Mapping[str, float]:
        figures = rouge_l(answer, record["output"])
        return {"items": 1, **{f"rouge_l_{key}": value for key, value in figures.items()}}

    def metrics(self, counts: Mapping[str, float]) -> dict[str, float]:
        items = counts["items"] or 1
        return {key: counts[key] / items for key in ("rouge_l_precision", "rouge_l_recall", "rouge_l_f1")}


TASKS: dict[str, Task] = {task.name: task for task in (Sentiment(), Segmentation(), Entities(), Continuation())}


EXACT_MATCH = ExactMatch()


def task_named(name: str) -> Task:
    return EXACT_MATCH if name == EXACT_MATCH.name else TASKS[name]


def task_of(records: list[dict], path) -> Task:
    """The task of a file's records (their `task` key), exact match when they have none; every
    record must name the same known task."""
    names = {record.get("task") for record in records}
    if names == {None}:
        return EXACT_MATCH
    for number, record in enumerate(records, 1):
        name = record.get("task")
        if name not in TASKS:
            known = ", ".join(TASKS)
            raise ChlaError(
                f"{path}: record {number} has task {name!r}; use one of {known}, "
                "or leave `task` out of every record for exact-match scoring"
            )
        if name != records[0]["task"]:
            raise ChlaError(
                f"{path}: record {number} is task {name!r} but record 1 is "
                f"{records[0]['task']!r}; put each task in a file of its own"
            )
    return TASKS[records[0]["task"]]


# --- jieba, the dictionary-segmenter reference -----------------------------------------------------

# PKU text writes digits and Latin letters full width (１９９８年); jieba's dictionary and its
# HMM treat full-width characters as unknown symbols and cut them one by one. jieba reads them in
# their ASCII forms (one character for one, so offsets do not move) and its words are cut back
# out of the original sentence.
_FULL_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)}
_JIEBA_ENTITY = {"nr": PERSON, "ns": PLACE, "nt": ORGANISATION}


@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba
    import jieba.posseg

    jieba.setLogLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()
    return tokenizer, jieba.posseg.POSTokenizer(tokenizer)


def _in_original(sentence: str, words: list[str]) -> list[str]:
    originals, start = [], 0
    for word in words:
        originals.append(sentence[start : start + len(word)])
        start += len(word)
    return originals


def jieba_words(sentence: str) -> list[str]:
    tokenizer, _ = _jieba()
    return _in_original(sentence, tokenizer.lcut(sentence.translate(_FULL_WIDTH), HMM=True))


def jieba_entities(sentence: str) -> list[tuple[str, str]]:
    _, tagger = _jieba()
    pairs = tagger.lcut(sentence.translate(_FULL_WIDTH), HMM=True)
    words = _in_original(sentence, [pair.word for pair in pairs])
    return [(_JIEBA_ENTITY[pair.flag[:2]], word) for pair, word in zip(pairs, words) if pair.flag[:2] in _JIEBA_ENTITY]
