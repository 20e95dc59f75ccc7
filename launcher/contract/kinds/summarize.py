"""`summarize`: the headline figures of a chain in one file: tokens per character before/after the
vocabulary merge (from a vocab_report stage), perplexity per character on held-out Chinese and
English at each evaluated point (from evaluate stages), every task's score beside its baselines
and references (one table), the sentiment accuracy as the headline `sft_accuracy`, what the
model answered to each general prompt, the training loss plot, and each stage's wall time.
Writes out/summary.json and out/summary.md, copies both to the run directory and prints the
table."""

from __future__ import annotations

from pydantic import Field

from . import StageKind, StageParams


class SummarizeParams(StageParams):
    """headline figures of a chain: tokens/char, perplexity per char, accuracy, plots"""

    vocab_report: str | None = Field(None, description="a vocab_report stage's report.json")
    base_tokenizer: str = Field("base", description="name of the base tokenizer in the vocab report")
    merged_tokenizer: str = Field("merged", description="name of the merged tokenizer in the vocab report")
    zh_corpus: str = Field("zh_heldout", description="vocab-report corpus name of the held-out Chinese text")
    # point name (e.g. base, after_pt, after_sft) -> an evaluate stage's out directory
    evaluations: dict[str, str] = Field(default_factory=dict)
    zh_ppl: str = Field("ppl-zh_heldout", description="evaluation name of the Chinese perplexity")
    en_ppl: str = Field("ppl-en_heldout", description="evaluation name of the English perplexity")
    # an evaluate stage's out directory holding the labelled tasks (and prompt generations)
    task_results: str | None = None
    task: str | None = Field(
        "task-sentiment_test",
        description="evaluation name of the task whose accuracy "
        "is the headline sft_accuracy (none: no headline accuracy)",
    )


KIND = StageKind("summarize", SummarizeParams, "chla_train.stages.summarize:run", needs_training_stack=False)
