"""Vocabulary report: tokens per character, bytes per token, byte-fallback and unknown rates and
fast/slow agreement of every tokenizer on every corpus (report.json, report.md, report.png). The
first tokenizer is the baseline the others are compared with."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chla_launcher.atomic import new_directory, write_json, write_text
from chla_launcher.errors import ChlaError

from .corpus import iter_corpus_lines
from .log import Log, print_line
from .sp_model import resolve_sp_model

if TYPE_CHECKING:
    from chla_launcher.kinds.vocab_report import VocabReportParams


def load_tokenizer_pair(tokenizer_dir: str | os.PathLike[str]):
    """(HF fast tokenizer via AutoTokenizer, SentencePieceProcessor) for one tokenizer dir."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model_path = resolve_sp_model(tokenizer_dir, role="tokenizer")
    return (
        AutoTokenizer.from_pretrained(str(model_path.parent)),
        spm.SentencePieceProcessor(model_file=str(model_path)),
    )


def measure(fast, slow, corpus: str | os.PathLike[str]) -> dict:
    """Token statistics of one tokenizer on one corpus (one line = one sequence, no BOS)."""
    byte_ids = {i for i in range(slow.get_piece_size()) if slow.is_byte(i)}
    unk_id = slow.unk_id()
    chars = nbytes = tokens = byte_tokens = unk_tokens = lines = agree = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal chars, nbytes, tokens, byte_tokens, unk_tokens, lines, agree
        fast_ids = fast(batch, add_special_tokens=False)["input_ids"]
        for text, f_ids, s_ids in zip(batch, fast_ids, slow.encode(batch)):
            lines += 1
            chars += len(text)
            nbytes += len(text.encode("utf-8"))
            tokens += len(s_ids)
            byte_tokens += sum(i in byte_ids for i in s_ids)
            unk_tokens += sum(i == unk_id for i in s_ids)
            agree += f_ids == s_ids
        batch.clear()

    for line in iter_corpus_lines(corpus):
        batch.append(line)
        if len(batch) >= 2048:
            flush()
    if batch:
        flush()
    if lines == 0:
        raise ChlaError(f"{corpus}: corpus file is empty (no non-blank lines)")
    return {
        "chars": chars,
        "bytes": nbytes,
        "tokens": tokens,
        "lines": lines,
        "tokens_per_char": tokens / chars,
        "bytes_per_token": nbytes / tokens,
        "byte_fallback_rate": byte_tokens / tokens,
        "unk_rate": unk_tokens / tokens,
        "fast_slow_agreement": agree / lines,
        "lines_agree": agree,
        "vocab_size": len(fast),
    }


def vocab_report(params: VocabReportParams, out_dir: str | os.PathLike[str], log: Log = print_line) -> dict[str, Any]:
    """Measure every tokenizer on every corpus; write report.json, report.md and report.png."""
    tokenizers, corpora = params.tokenizers, params.corpora
    for name, path in tokenizers.items():
        resolve_sp_model(path, role=f"tokenizer {name}")
    for name, path in corpora.items():
        if not Path(path).is_file():
            raise ChlaError(f"{path}: corpus {name} not found; check the path")

    started = time.monotonic()
    report: dict[str, Any] = {"tokenizers": {}, "corpora": {n: str(p) for n, p in corpora.items()}, "results": []}
    first = next(iter(tokenizers))
    baseline: dict[str, int] = {}
    for tok_name, tok_dir in tokenizers.items():
        fast, slow = load_tokenizer_pair(tok_dir)
        for corpus_name, corpus in corpora.items():
            stats = measure(fast, slow, corpus)
            report["tokenizers"][tok_name] = {"vocab_size": stats.pop("vocab_size"), "path": str(tok_dir)}
            if tok_name == first:
                baseline[corpus_name] = stats["tokens"]
            change = stats["tokens"] / baseline[corpus_name] - 1
            report["results"].append(
                {"tokenizer": tok_name, "corpus": corpus_name, **stats, "tokens_change_vs_first": change}
            )
            log(
                f"{tok_name} on {corpus_name}: {stats['tokens_per_char']:.3f} tokens/char "
                f"({change:+.1%} tokens vs {first}), fast/slow agree on "
                f"{stats['lines_agree']}/{stats['lines']} lines"
            )

    with new_directory(out_dir) as tmp:
        write_json(tmp / "report.json", report)
        write_text(tmp / "report.md", render_markdown(report, first))
        plot_report(report, first, tmp / "report.png")
    log(f"wrote {out_dir}/report.json, report.md, report.png ({time.monotonic() - started:.1f} s)")
    return report


def render_markdown(report: dict, first: str) -> str:
    rows = [
        "| tokenizer | vocab | corpus | chars | tokens | tokens/char | bytes/token | "
        f"byte-fallback | unk | fast=slow | tokens vs {first} |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        vocab = report["tokenizers"][r["tokenizer"]]["vocab_size"]
        rows.append(
            f"| {r['tokenizer']} | {vocab:,} | {r['corpus']} | {r['chars']:,} | "
            f"{r['tokens']:,} | {r['tokens_per_char']:.3f} | {r['bytes_per_token']:.2f} | "
            f"{r['byte_fallback_rate']:.1%} | {r['unk_rate']:.2%} | "
            f"{r['fast_slow_agreement']:.2%} | {r['tokens_change_vs_first']:+.1%} |"
        )
    return "# Vocabulary efficiency\n\n" + "\n".join(rows) + "\n"


def plot_report(report: dict, first: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tok_names = list(report["tokenizers"])
    corpus_names = list(report["corpora"])
    by_key = {(r["tokenizer"], r["corpus"]): r for r in report["results"]}
    width = 0.8 / len(tok_names)
    fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(corpus_names) + 2), 4.5), dpi=110)
    palette = plt.get_cmap("tab10")
    colors = [palette(i) for i in range(palette.N)]
    top = max(r["tokens_per_char"] for r in report["results"])
    for t, tok in enumerate(tok_names):
        xs = [c + (t - (len(tok_names) - 1) / 2) * width for c in range(len(corpus_names))]
        values = [by_key[(tok, c)]["tokens_per_char"] for c in corpus_names]
        vocab = report["tokenizers"][tok]["vocab_size"]
        ax.bar(xs, values, width * 0.92, label=f"{tok} ({vocab:,} pieces)", color=colors[t % len(colors)])
        for x, corpus, value in zip(xs, corpus_names, values):
            change = by_key[(tok, corpus)]["tokens_change_vs_first"]
            label = f"{value:.2f}" if tok == first else f"{value:.2f}\n{change:+.0%}"
            ax.text(x, value + top * 0.015, label, ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(corpus_names)), corpus_names, fontsize=11)
    ax.set_ylabel("tokens per character (lower is better)")
    ax.set_ylim(0, top * 1.3)
    ax.set_title(f"Tokens per character by corpus (bar labels: value, change vs. {first})", fontsize=11)
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
