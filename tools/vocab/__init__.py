"""Vocabulary extension: train a Chinese SentencePiece model, merge it into a LLaMA-style base
tokenizer, and measure how much shorter Chinese text becomes.

Three steps, each a library function that takes its stage kind's params, a stage kind
(chla_train/stages/<kind>.py) and a `chla vocab` subcommand:

    train_spm        corpus files -> spm.model (BPE, the original project's settings)
    merge_tokenizers base tokenizer + spm.model -> merged.model + HF tokenizer dir
    vocab_report     tokenizers x corpora -> report.json / report.md / report.png

Modules: corpus (UTF-8 corpus lines), sp_model (SentencePiece .model files), fast_tokenizer (an
HF tokenizer that encodes exactly as SentencePiece: how, in its docstring), spm_training,
tokenizer_merge (the scores of the appended pieces, and the original project's), report.
"""

from .corpus import CorpusStats, check_corpora, iter_corpus_lines
from .fast_tokenizer import build_fast_tokenizer, write_hf_tokenizer
from .report import load_tokenizer_pair, measure, plot_report, render_markdown, vocab_report
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
    "iter_corpus_lines",
    "load_sp_proto",
    "load_tokenizer_pair",
    "measure",
    "merge_tokenizers",
    "plot_report",
    "render_markdown",
    "resolve_sp_model",
    "train_spm",
    "vocab_report",
    "write_hf_tokenizer",
]
