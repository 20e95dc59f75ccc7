"""Vocabulary extension: train a Chinese tokenizer, merge it into a base tokenizer, and measure
how much shorter Chinese text becomes. Two tokenizer families: LLaMA-1/2-style SentencePiece BPE
and byte-level BPE (Llama 3, SmolLM, Qwen: a tokenizer.json with a ByteLevel pre-tokenizer).

Each step is a library function that takes its stage kind's params, a stage kind
(chla_train/stages/<kind>.py) and a `chla vocab` subcommand:

    train_spm        corpus files -> spm.model (BPE, the original project's settings)
    train_bpe        corpus files + byte-level base -> tokenizer.json (the base's pre-tokenizer)
    merge_tokenizers base tokenizer + either -> HF tokenizer dir (+ merged.model for SentencePiece)
    vocab_report     tokenizers x corpora -> report.json / report.md / report.png

Modules: corpus (UTF-8 corpus lines), sp_model (SentencePiece .model files), fast_tokenizer (an
HF tokenizer that encodes exactly as SentencePiece: how, in its docstring), spm_training,
tokenizer_merge (the scores of the appended pieces, and the original project's), byte_level
(byte-level BPE tokenizer.json files), bpe_training, bpe_merge (what the byte-level merge keeps,
in its docstring), report.
"""

from .bpe_merge import merge_byte_level
from .bpe_training import train_bpe
from .byte_level import is_byte_level_bpe, load_byte_level_bpe
from .corpus import CorpusStats, check_corpora, iter_corpus_lines
from .fast_tokenizer import build_fast_tokenizer, write_hf_tokenizer
from .report import load_tokenizer, load_tokenizer_pair, measure, plot_report, render_markdown, vocab_report
from .sp_model import load_sp_proto, resolve_sp_model
from .spm_training import train_spm
from .tokenizer_merge import PAD_TOKEN, SCORES_BELOW_BASE, SCORES_ORIGINAL, merge_tokenizers

__all__ = [
    "PAD_TOKEN",
    "SCORES_BELOW_BASE",
    "SCORES_ORIGINAL",
    "CorpusStats",
    "build_fast_tokenizer",
    "check_corpora",
    "is_byte_level_bpe",
    "iter_corpus_lines",
    "load_byte_level_bpe",
    "load_sp_proto",
    "load_tokenizer",
    "load_tokenizer_pair",
    "measure",
    "merge_byte_level",
    "merge_tokenizers",
    "plot_report",
    "render_markdown",
    "resolve_sp_model",
    "train_bpe",
    "train_spm",
    "vocab_report",
    "write_hf_tokenizer",
]
