"""Benchmark of the vocabulary-extension chain on the demo corpus: wall time of
fetch (cached), train (20k Chinese BPE), merge and report, then the headline table.

    .venv/bin/python benchmarks/vocab.py [--vocab-size 20000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import time

from common import parse_with_work_dir, print_timings_and_outputs, quiet
from machine import print_machine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=20000)
    args, work = parse_with_work_dir(parser, prefix="chla-vocab-bench-")
    print_machine()

    from chla_launcher.contract.kinds.merge_tokenizer import MergeTokenizerParams
    from chla_launcher.contract.kinds.train_spm import TrainSpmParams
    from chla_launcher.contract.kinds.vocab_report import VocabReportParams
    from chla_tools.assets import fetch_assets
    from chla_tools.vocab import merge_tokenizers, render_markdown, train_spm, vocab_report

    timings: dict[str, float] = {}

    fetch_assets(log=quiet)  # make sure the cache is filled; the timed call is the cached one
    started = time.perf_counter()
    assets = fetch_assets(log=quiet)
    timings["fetch (cached)"] = time.perf_counter() - started

    train = TrainSpmParams(inputs=[assets["zh_train"]], vocab_size=args.vocab_size)
    started = time.perf_counter()
    trained = train_spm(train, work / "zh_spm", log=quiet)
    timings[f"train ({args.vocab_size} BPE, {trained['chars']:,} chars)"] = time.perf_counter() - started

    merge = MergeTokenizerParams(base=assets["base_tokenizer"], add=str(work / "zh_spm" / "spm.model"))
    started = time.perf_counter()
    merged = merge_tokenizers(merge, work / "merged", log=quiet)
    timings["merge"] = time.perf_counter() - started

    corpora = {"zh_heldout": assets["zh_heldout"], "en_heldout": assets["en_heldout"], "en_text": assets["en_text"]}
    tokenizers = {"llama": assets["base_tokenizer"], "llama+zh": str(work / "merged")}
    measured = VocabReportParams(tokenizers=tokenizers, corpora=corpora)
    started = time.perf_counter()
    report = vocab_report(measured, work / "report", log=quiet)
    timings["report (2 tokenizers x 3 corpora, incl. transformers import)"] = time.perf_counter() - started

    print(f"machine: {os.cpu_count()} cores")
    print(f"vocabulary: {merged['arithmetic']}\n")
    print_timings_and_outputs(timings, render_markdown(report, "llama"), work, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
