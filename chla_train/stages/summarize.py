"""`summarize` stage: a chain's headline figures in one file.

Collect the figures of the stages the params name (chla_tools.summary), add the training loss plot
and each stage's wall time, write out/summary.json and out/summary.md, copy both beside the run's
recipe.yaml (where chla-submit prints summary.md at the end) and print the table.
"""

from __future__ import annotations

from typing import Any

from chla_launcher.contract.atomic import write_json, write_text
from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.summarize import SummarizeParams
from chla_tools.summary import chain_figures, markdown, stage_seconds
from chla_train.context import StageContext


def run(ctx: StageContext[SummarizeParams]) -> dict[str, Any]:
    # 1. The figures the chain's vocab_report and evaluate stages wrote.
    summary: dict[str, Any] = {"run": ctx.run_dir.name, **chain_figures(ctx.params)}

    # 2. The training loss plot, when the chain trains; every stage's wall time.
    from chla_tools.train_report import train_report

    try:
        train_report(ctx.run_dir, ctx.out_dir / "train_loss.png")
        # Where it will be once this stage's out/ is in place.
        summary["plots"]["training_loss"] = str(ctx.stage_out(ctx.stage) / "train_loss.png")
    except ChlaError:
        pass  # no training stage in this chain
    summary["stage_seconds"] = stage_seconds(ctx.run_dir, ctx.stage)

    # 3. Save, in out/ and beside the run's recipe.yaml.
    for directory in (ctx.out_dir, ctx.run_dir):
        write_json(directory / "summary.json", summary)
        write_text(directory / "summary.md", markdown(summary))
    print(markdown(summary), flush=True)
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}
