"""Vocabulary report: tokens per character, bytes per token, byte-token and unknown rates, the HF
tokenizer's agreement with its reference and the share of lines tokenized exactly as the first
tokenizer does, for every tokenizer on every corpus (report.json, report.md, report.png). The
first tokenizer is the baseline the others are compared with.

Both tokenizer families, side by side:
- SentencePiece (LLaMA 1/2): the reference is SentencePiece itself; a byte token is a byte-fallback
  piece (<0xE4>), a character the vocabulary does not hold.
- byte-level BPE (Llama 3, SmolLM, Qwen): the reference is the `tokenizers` object built from
  tokenizer.json; a byte token is a token of a single non-ASCII byte, a piece of a character the
  vocabulary spells in bytes (a Chinese character is 3 bytes). Single ASCII characters ("a", ".")
  are whole characters and not counted.
Either way the HF side is what training loads: transformers' AutoTokenizer on the directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chla_launcher.contract.atomic import new_directory, write_json, write_text
from chla_launcher.contract.errors import ChlaError

from .byte_level import is_byte_level_bpe, resolve_tokenizer_json, token_bytes
from .corpus import iter_corpus_lines
from .log import Log, print_line
from .sp_model import resolve_sp_model

if TYPE_CHECKING:
    from chla_launcher.contract.kinds.vocab_report import VocabReportParams

SENTENCEPIECE = "sentencepiece"
BYTE_LEVEL_BPE = "byte_level_bpe"


@dataclass
class ReportedTokenizer:
    """One tokenizer as the report measures it: the HF tokenizer and its reference."""

    family: str  # SENTENCEPIECE or BYTE_LEVEL_BPE
    reference: str  # what the HF tokenizer is compared with
    hf: Any  # transformers' AutoTokenizer
    encode: Callable[[list[str]], list[list[int]]]  # the reference's ids, no special tokens
    byte_ids: frozenset[int]
    unk_id: int | None


def load_tokenizer(path: str | os.PathLike[str]) -> ReportedTokenizer:
    """The HF tokenizer behind `path` (an HF directory or a merge_tokenizer stage's out directory)
    and its reference, for either family."""
    from transformers import AutoTokenizer

    if is_byte_level_bpe(path):
        from tokenizers import Tokenizer

        file = resolve_tokenizer_json(path, role="tokenizer")
        reference = Tokenizer.from_file(str(file))
        singles = (i for token, i in reference.get_vocab(with_added_tokens=False).items() if _byte_of_a_char(token))
        unk = reference.model.unk_token if hasattr(reference.model, "unk_token") else None
        return ReportedTokenizer(
            family=BYTE_LEVEL_BPE,
            reference="tokenizers",
            hf=AutoTokenizer.from_pretrained(str(file.parent)),
            encode=lambda batch: [e.ids for e in reference.encode_batch(batch, add_special_tokens=False)],
            byte_ids=frozenset(singles),
            unk_id=reference.token_to_id(unk) if unk else None,
        )
    fast, slow = load_tokenizer_pair(path)
    return ReportedTokenizer(
        family=SENTENCEPIECE,
        reference="sentencepiece",
        hf=fast,
        encode=slow.encode,
        byte_ids=frozenset(i for i in range(slow.get_piece_size()) if slow.is_byte(i)),
        unk_id=slow.unk_id(),
    )


def _byte_of_a_char(token: str) -> bool:
    """A byte-level token of one byte of a multi-byte UTF-8 character."""
    data = token_bytes(token)
    return data is not None and len(data) == 1 and data[0] >= 0x80


def load_tokenizer_pair(tokenizer_dir: str | os.PathLike[str]):
    """(HF fast tokenizer via AutoTokenizer, SentencePieceProcessor) for one SentencePiece
    tokenizer dir."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model_path = resolve_sp_model(tokenizer_dir, role="tokenizer")
    return (
        AutoTokenizer.from_pretrained(str(model_path.parent)),
        spm.SentencePieceProcessor(model_file=str(model_path)),
    )


def measure(tokenizer: ReportedTokenizer, corpus: str | os.PathLike[str], first_ids: list | None = None) -> dict:
    """Token statistics of one tokenizer on one corpus (one line = one sequence, no BOS). The
    reference's ids of every line are returned under "ids"; with `first_ids` (the first
    tokenizer's), the lines whose ids equal them are counted."""
    chars = nbytes = tokens = byte_tokens = unk_tokens = lines = agree = same = 0
    all_ids: list[list[int]] = []
    batch: list[str] = []

    def flush() -> None:
        nonlocal chars, nbytes, tokens, byte_tokens, unk_tokens, lines, agree, same
        hf_ids = tokenizer.hf(batch, add_special_tokens=False)["input_ids"]
        for text, h_ids, r_ids in zip(batch, hf_ids, tokenizer.encode(batch)):
            if first_ids is not None:
                same += first_ids[lines] == r_ids
            lines += 1
            chars += len(text)
            nbytes += len(text.encode("utf-8"))
            tokens += len(r_ids)
            byte_tokens += sum(i in tokenizer.byte_ids for i in r_ids)
            unk_tokens += sum(i == tokenizer.unk_id for i in r_ids)
            agree += h_ids == r_ids
            all_ids.append(r_ids)
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
        # SentencePiece: byte-fallback pieces; byte-level BPE: tokens of one non-ASCII byte
        "byte_fallback_rate": byte_tokens / tokens,
        "unk_rate": unk_tokens / tokens,
        # the HF tokenizer == its reference (SentencePiece / tokenizers)
        "fast_slow_agreement": agree / lines,
        "lines_agree": agree,
        "lines_same_ids_as_first": same if first_ids is not None else lines,
        "same_ids_as_first": (same if first_ids is not None else lines) / lines,
        "vocab_size": len(tokenizer.hf),
        "ids": all_ids,
    }


def vocab_report(params: VocabReportParams, out_dir: str | os.PathLike[str], log: Log = print_line) -> dict[str, Any]:
    """Measure every tokenizer on every corpus; write report.json, report.md and report.png."""
    tokenizers, corpora = params.tokenizers, params.corpora
    for name, path in tokenizers.items():
        if not is_byte_level_bpe(path):
            resolve_sp_model(path, role=f"tokenizer {name}")
    for name, path in corpora.items():
        if not Path(path).is_file():
            raise ChlaError(f"{path}: corpus {name} not found; check the path")

    started = time.monotonic()
    report: dict[str, Any] = {"tokenizers": {}, "corpora": {n: str(p) for n, p in corpora.items()}, "results": []}
    first = next(iter(tokenizers))
    baseline: dict[str, int] = {}
    first_ids: dict[str, list] = {}
    first_family = None
    for tok_name, tok_dir in tokenizers.items():
        tokenizer = load_tokenizer(tok_dir)
        first_family = first_family or tokenizer.family
        report["tokenizers"][tok_name] = {
            "vocab_size": len(tokenizer.hf),
            "path": str(tok_dir),
            "family": tokenizer.family,
            "reference": tokenizer.reference,
        }
        for corpus_name, corpus in corpora.items():
            stats = measure(tokenizer, corpus, first_ids.get(corpus_name))
            stats.pop("vocab_size")
            ids = stats.pop("ids")
            if tokenizer.family != first_family:  # ids of another family: nothing to compare
                stats["lines_same_ids_as_first"] = stats["same_ids_as_first"] = None
            if tok_name == first:
                baseline[corpus_name] = stats["tokens"]
                first_ids[corpus_name] = ids
            change = stats["tokens"] / baseline[corpus_name] - 1
            report["results"].append(
                {"tokenizer": tok_name, "corpus": corpus_name, **stats, "tokens_change_vs_first": change}
            )
            log(
                f"{tok_name} on {corpus_name}: {stats['tokens_per_char']:.3f} tokens/char "
                f"({change:+.1%} tokens vs {first}), HF == {tokenizer.reference} on "
                f"{stats['lines_agree']}/{stats['lines']} lines"
                + (
                    f", ids as {first} on {stats['lines_same_ids_as_first']}/{stats['lines']}"
                    if stats["same_ids_as_first"] is not None
                    else ""
                )
            )

    with new_directory(out_dir) as tmp:
        write_json(tmp / "report.json", report)
        write_text(tmp / "report.md", render_markdown(report, first))
        plot_report(report, first, tmp / "report.png")
    log(f"wrote {out_dir}/report.json, report.md, report.png ({time.monotonic() - started:.1f} s)")
    return report


def render_markdown(report: dict, first: str) -> str:
    rows = [
        "| tokenizer | family | vocab | corpus | chars | tokens | tokens/char | bytes/token | "
        f"byte tokens | unk | HF = reference | ids as {first} | tokens vs {first} |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        about = report["tokenizers"][r["tokenizer"]]
        family = {SENTENCEPIECE: "SentencePiece", BYTE_LEVEL_BPE: "byte-level BPE"}.get(about.get("family"), "?")
        rows.append(
            f"| {r['tokenizer']} | {family} | {about['vocab_size']:,} | {r['corpus']} | {r['chars']:,} | "
            f"{r['tokens']:,} | {r['tokens_per_char']:.3f} | {r['bytes_per_token']:.2f} | "
            f"{r['byte_fallback_rate']:.1%} | {r['unk_rate']:.2%} | "
            f"{r['fast_slow_agreement']:.2%} | {_percent(r.get('same_ids_as_first'))} | "
            f"{r['tokens_change_vs_first']:+.1%} |"
        )
    notes = (
        "\nbyte tokens: SentencePiece byte-fallback pieces, or byte-level BPE tokens of one non-ASCII byte. "
        "HF = reference: lines on which transformers' tokenizer gives the reference's ids "
        "(SentencePiece, or the `tokenizers` object of tokenizer.json). "
        f"ids as {first}: lines tokenized to exactly the ids {first} gives (same family only).\n"
    )
    return "# Vocabulary efficiency\n\n" + "\n".join(rows) + "\n" + notes


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{share:.2%}"


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
