"""`vocab_report`: tokens per character (and more) for every tokenizer x corpus.

Writes out/report.json, out/report.md and out/report.png. The first tokenizer is the baseline
the others are compared with. SentencePiece and byte-level BPE tokenizers may sit side by side.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from . import StageKind, StageParams


class VocabReportParams(StageParams):
    """tokens/char, bytes/token, byte tokens, HF/reference agreement, ids as the first, per tokenizer x corpus"""

    # name -> HF tokenizer directory (or a merge_tokenizer stage's out directory). Checked when
    # the stage runs: the values are usually outputs of upstream stages.
    tokenizers: dict[str, str] = Field(min_length=1, description="name -> tokenizer directory")
    corpora: dict[str, str] = Field(min_length=1, description="name -> UTF-8 text file")

    @field_validator("tokenizers", "corpora")
    @classmethod
    def _names(cls, named: dict[str, str]) -> dict[str, str]:
        for name, path in named.items():
            if not name or not path:
                raise ValueError("names and paths must not be empty")
        return named


KIND = StageKind("vocab_report", VocabReportParams, "chla_train.stages.vocab_report:run")
