"""`vocab_report`: tokens per character (and more) of every tokenizer on every corpus (out/report.json,
out/report.md, out/report.png); the stage's metrics are the tokens per character."""

from __future__ import annotations

from chla_launcher.contract.kinds.vocab_report import VocabReportParams
from chla_tools.vocab import vocab_report
from chla_train.context import StageContext


def run(ctx: StageContext[VocabReportParams]) -> dict:
    report = vocab_report(ctx.params, ctx.out_dir, log=ctx.log)
    return {
        f"{r['tokenizer']}/{r['corpus']}/tokens_per_char": round(r["tokens_per_char"], 4) for r in report["results"]
    }
