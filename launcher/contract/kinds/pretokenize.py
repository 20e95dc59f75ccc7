"""`pretokenize`: tokenize a text corpus once into memory-mappable uint16/uint32 shards.

An array stage (`array: N`): the input files, cut into pieces at document boundaries, are spread
over the N tasks balanced by bytes; each task tokenizes its pieces on all its cores, reusing the
content-addressed cache; `finalize` writes out/manifest.json last. Training stages read the
output with chla_tools.blocks (TokenCorpus / BlockDataset).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import InputPath, StageKind, StageParams


class PretokenizeParams(StageParams):
    """tokenize a corpus into memory-mapped token shards (array, cached by content)"""

    tokenizer: Annotated[str, InputPath()] = Field(
        description="HF tokenizer directory (e.g. ${stages.vocab.tokenizer})"
    )
    inputs: Annotated[list[str], InputPath(glob=True)] = Field(
        min_length=1, description="files or globs: .txt, .jsonl, .json"
    )
    text_format: Literal["auto", "txt", "jsonl", "json"] = Field(
        "auto", description="auto: by file suffix (.txt/.text, .jsonl, .json)"
    )
    txt_documents: Literal["line", "paragraph"] = Field(
        "line", description=".txt documents: one a line, or blank-line separated paragraphs"
    )
    text_key: str = Field("text", description="key of the text in .jsonl/.json records")
    append_eos: bool = Field(True, description="append EOS after every document")
    prepend_bos: bool = Field(False, description="prepend BOS before every document")
    encoder: Literal["auto", "sentencepiece", "hf"] = Field(
        "auto",
        description="auto: sentencepiece directly when the HF tokenizer is built on "
        "tokenizer.model (checked), else the HF fast tokenizer",
    )
    workers: int | None = Field(None, ge=1, description="worker processes per task (default: all cores)")
    cache_dir: str | None = Field(
        None,
        description="content-addressed cache (default $CHLA_CACHE/pretokenize or "
        "~/.cache/chla/pretokenize); put it on the run directory's filesystem "
        "so shards are hard links, not copies",
    )
    piece_mb: float = Field(16, gt=0, description="files are cut into pieces of about this size")
    block_size: int | None = Field(None, ge=1, description="recorded in the manifest for training")


KIND = StageKind(
    "pretokenize",
    PretokenizeParams,
    "chla_train.stages.pretokenize:run",
    finalize="chla_train.stages.pretokenize:finalize",
    array=True,
    needs_training_stack=False,
)
