"""The task scorers on hand-made cases with known figures, each beside a control that must differ;
the answer parsers; the baselines and the jieba reference."""

from __future__ import annotations

import pytest

from chla_launcher.contract.errors import ChlaError
from chla_tools.tasks import TASKS, Entities, jieba_entities, jieba_words, split_text_sentences, task_of
from chla_tools.text_metrics import lcs_alignment, prf, rouge_l, segmentation_counts

GOLD = ["中国", "人民", "很", "好"]  # 中国人民很好


def seg_f1(predicted: list[str], gold: list[str] = GOLD) -> dict[str, float]:
    counts = segmentation_counts(gold, predicted)
    return prf(counts["correct"], counts["predicted"], counts["gold"])


def test_segmentation_f1_on_known_cases():
    assert seg_f1(GOLD) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # 中国人民 is one span where gold has two: 很 and 好 are right -> P 2/3, R 2/4, F 4/7
    assert seg_f1(["中国人民", "很", "好"]) == pytest.approx({"precision": 2 / 3, "recall": 0.5, "f1": 4 / 7})
    # every character a word: the two one-character words are right -> P 2/6, R 2/4, F 0.4
    assert seg_f1(list("中国人民很好")) == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4})


def test_segmentation_counts_spans_not_word_lists():
    # Both spell 中国中国. A diff of the word lists finds 中, 国 in both; their spans differ.
    counts = segmentation_counts(["中", "国", "中国"], ["中国", "中", "国"])
    assert counts == {"gold": 3, "predicted": 3, "correct": 0}
    assert segmentation_counts(["中", "国", "中国"], ["中", "国", "中国"])["correct"] == 3  # control


def test_segmentation_with_dropped_and_added_characters_is_aligned():
    # 人 dropped: 中国 still lines up with gold; 民 (half of 人民) and 很好 do not
    assert segmentation_counts(GOLD, ["中国", "民", "很好"]) == {"gold": 4, "predicted": 3, "correct": 1}
    # 我们 added in front: every gold word still found, at shifted offsets
    assert segmentation_counts(GOLD, ["我们", "中国", "人民", "很", "好"]) == {"gold": 4, "predicted": 5, "correct": 4}
    # a word whose characters align to gold characters that are not next to each other is wrong
    assert segmentation_counts(["中", "人", "国"], ["中国"])["correct"] == 0


def test_lcs_alignment_is_a_longest_common_subsequence():
    pairs = lcs_alignment("ABCBDAB", "BDCABA")
    assert len(pairs) == 4  # the textbook example: LCS length 4
    assert all("ABCBDAB"[i] == "BDCABA"[j] for i, j in pairs)
    assert [i for i, _ in pairs] == sorted({i for i, _ in pairs}) and [j for _, j in pairs] == sorted(
        {j for _, j in pairs}
    )
    assert lcs_alignment("", "abc") == [] and len(lcs_alignment("abc", "abc")) == 3


def test_entity_f1_exact_type_and_text():
    entities = TASKS["entities"]
    record = {"output": "人名：江泽民；地名：北京、上海；机构名：无"}
    partly = entities.score(record, "人名：江泽民；地名：北京；机构名：新华社")
    assert entities.metrics(partly) == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "人名.f1": 1.0, "地名.f1": 2 / 3, "机构名.f1": 0.0}
    )
    # the right name under the wrong type is wrong; the control, under its type, is right
    assert entities.score(record, "人名：无；地名：江泽民；机构名：无")["correct"] == 0
    assert entities.score(record, "人名：江泽民；地名：无；机构名：无")["correct"] == 1
    assert entities.metrics(entities.score(record, record["output"]))["f1"] == 1.0  # control
    # a name listed twice counts once (sets of distinct mentions)
    assert entities.score(record, "人名：江泽民、江泽民")["predicted"] == 1


def test_entity_answers_parse_robustly_and_round_trip():
    parse, fmt = Entities.parse, Entities.format_answer
    expected = {("人名", "江泽民"), ("人名", "李鹏"), ("地名", "北京")}
    assert parse("人名：江泽民、李鹏；地名：北京；机构名：无") == expected
    assert parse("地名: 北京\n人名:江泽民,李鹏 机构名：无") == expected  # any order, ASCII colon, spaces
    assert parse("人名：无；地名：无锡；机构名：无") == {("地名", "无锡")}  # "无" alone is none, not a prefix
    assert parse("正面") == set() and parse("") == set()
    mentions = [("地名", "北京"), ("人名", "江泽民"), ("地名", "北京"), ("机构名", "新华社")]
    assert fmt(mentions) == "人名：江泽民；地名：北京；机构名：新华社"
    assert parse(fmt(mentions)) == set(mentions)
    assert fmt([]) == "人名：无；地名：无；机构名：无" and parse(fmt([])) == set()


def test_rouge_l_on_characters():
    assert rouge_l("玄德大喜", "玄德大怒") == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75})
    assert rouge_l("玄德 大喜", "玄德大喜")["f1"] == 1.0  # whitespace ignored
    assert rouge_l("", "玄德大喜") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rouge_l("曹操", "玄德大喜")["f1"] == 0.0
    # order matters (a subsequence, not a bag of characters)
    assert rouge_l("喜大德玄", "玄德大喜")["f1"] == pytest.approx(0.25)


def test_sentiment_is_exact_match_and_the_majority_is_left_to_aggregation():
    sentiment = TASKS["sentiment"]
    assert sentiment.score({"output": "积极"}, " 积极 ") == {"items": 1, "correct": 1}
    assert sentiment.score({"output": "积极"}, "消极") == {"items": 1, "correct": 0}
    assert sentiment.choices == ("积极", "消极") and sentiment.comparison_answers({"input": "好"}) == {}


def test_baselines_answer_in_the_task_format():
    segmentation, entities, continuation = TASKS["segmentation"], TASKS["entities"], TASKS["continuation"]
    answers = segmentation.comparison_answers({"input": "中国人民很好", "output": "中国 人民 很 好"})
    assert answers["every_character"] == "中 国 人 民 很 好"
    record = {"input": "江泽民在北京会见了新华社社长。", "output": "人名：江泽民；地名：北京；机构名：新华社"}
    answers = entities.comparison_answers(record)
    assert answers["no_entities"] == "人名：无；地名：无；机构名：无"
    assert entities.metrics(entities.score(record, answers["no_entities"]))["f1"] == 0.0
    assert entities.metrics(entities.score(record, answers["jieba"]))["f1"] > 0.5  # it finds 江泽民 and 北京
    passage = {"input": "玄德大喜。遂请关、张二人同行。", "output": "次日，于桃园中备下乌牛白马。"}
    assert continuation.comparison_answers(passage) == {"copy_last_sentence": "遂请关、张二人同行。"}


def test_sentences_of_text_keep_closing_quotes():
    assert split_text_sentences("玄德曰：“此天助我也！”遂引兵去。余下") == [
        "玄德曰：“此天助我也！”",
        "遂引兵去。",
        "余下",
    ]
    assert split_text_sentences("何故？！真乃神人也。") == ["何故？！", "真乃神人也。"]


def test_jieba_reads_full_width_digits_and_keeps_the_text():
    import jieba

    sentence = "１９９８年１月１日，江泽民在北京发表新年讲话。"
    words = jieba_words(sentence)
    assert "".join(words) == sentence and "１９９８" in words
    # control: jieba on the raw full-width text cuts the year into single characters
    raw = jieba.Tokenizer().lcut(sentence)
    assert "１９９８" not in raw and "１" in raw
    assert ("人名", "江泽民") in jieba_entities(sentence) and ("地名", "北京") in jieba_entities(sentence)


def test_a_file_has_one_known_task(tmp_path):
    assert task_of([{"output": "x"}], tmp_path).name == "exact_match"
    assert task_of([{"task": "segmentation"}] * 2, tmp_path) is TASKS["segmentation"]
    with pytest.raises(ChlaError, match=r"record 2 is task 'entities' but record 1 is 'segmentation'"):
        task_of([{"task": "segmentation"}, {"task": "entities"}], tmp_path)
    with pytest.raises(ChlaError, match=r"record 1 has task 'ner'; use one of sentiment, segmentation"):
        task_of([{"task": "ner"}], tmp_path)
