"""Scores of generated text against a reference: word-segmentation F1, set F1, ROUGE-L.

Each function returns counts that add up over items (and over evaluation shards); `prf` turns
summed counts into precision, recall and F1 at the end (micro-averaging, as the SIGHAN bakeoff
scorer does for words).

Word segmentation (the SIGHAN / icwb2 definition): a predicted word is correct when its span of
character offsets is the span of a gold word; precision = correct / predicted words, recall =
correct / gold words. When the predicted words do not spell the gold sentence exactly (a model
that drops, adds or changes characters), the two character sequences are first aligned by a
longest common subsequence, and a predicted word is correct only when each of its characters is
aligned, in order and without gaps, to a gold word's characters and to nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable


def prf(correct: float, predicted: float, gold: float) -> dict[str, float]:
    """Precision, recall and F1 (0 where a denominator is 0: no predictions score precision 0)."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def word_spans(words: Iterable[str]) -> list[tuple[int, int]]:
    """(start, end) character offsets of each word in the concatenated text."""
    spans, start = [], 0
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word)
    return spans


def lcs_alignment(a: str, b: str) -> list[tuple[int, int]]:
    """Index pairs (i, j) with a[i] == b[j] of one longest common subsequence of a and b, in
    order (ties broken the same way every time)."""
    rows, cols = len(a), len(b)
    # table[i][j] = LCS length of a[i:] and b[j:]
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(rows - 1, -1, -1):
        row, below = table[i], table[i + 1]
        for j in range(cols - 1, -1, -1):
            row[j] = below[j + 1] + 1 if a[i] == b[j] else max(below[j], row[j + 1])
    pairs, i, j = [], 0, 0
    while i < rows and j < cols:
        if a[i] == b[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def segmentation_counts(gold_words: list[str], predicted_words: list[str]) -> dict[str, int]:
    """{"gold", "predicted", "correct"} word counts for one sentence (see the module docstring)."""
    gold_spans = set(word_spans(gold_words))
    predicted_spans = word_spans(predicted_words)
    gold_text, predicted_text = "".join(gold_words), "".join(predicted_words)
    if predicted_text == gold_text:
        correct = sum(span in gold_spans for span in predicted_spans)
    else:
        to_gold = dict(lcs_alignment(predicted_text, gold_text))
        correct = 0
        for start, end in predicted_spans:
            mapped = [to_gold.get(i) for i in range(start, end)]
            first = mapped[0]
            if (
                first is not None
                and mapped == list(range(first, first + end - start))
                and (first, first + end - start) in gold_spans
            ):
                correct += 1
    return {"gold": len(gold_words), "predicted": len(predicted_words), "correct": correct}


def set_counts(gold: set, predicted: set) -> dict[str, int]:
    """{"gold", "predicted", "correct"} for two sets of items (exact match)."""
    return {"gold": len(gold), "predicted": len(predicted), "correct": len(gold & predicted)}


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    """Character-level ROUGE-L (whitespace ignored): the longest common subsequence over the
    prediction's length (precision) and the reference's (recall), and their F1."""
    prediction, reference = "".join(prediction.split()), "".join(reference.split())
    common = len(lcs_alignment(prediction, reference))
    return prf(common, len(prediction), len(reference))
