"""`pretokenize`: one array task tokenizes its share of the corpus into shards
(chla_tools.pretokenize); `finalize`, once every task succeeded, writes the manifest.

No torch here: the stage runs on CPU nodes and needs only numpy and the tokenizers.
"""

from __future__ import annotations

from typing import Any

from chla_launcher.contract.kinds.pretokenize import PretokenizeParams
from chla_launcher.contract.progress import progress_writer
from chla_tools.pretokenize import finalize_corpus, run_task_with_params
from chla_train.context import StageContext


def run(ctx: StageContext[PretokenizeParams]) -> dict[str, Any]:
    num_tasks = max(1, ctx.num_tasks)
    progress = progress_writer(ctx, total=0, unit="pieces")
    result = run_task_with_params(
        ctx.params,
        ctx.out_dir,
        max(0, ctx.task_index),
        num_tasks,
        ctx.log,
        progress=progress.update if progress else None,
    )
    if progress is not None:
        progress.close()
    if num_tasks == 1:  # no separate finalize step runs for a single task
        manifest = finalize_corpus(ctx.out_dir, 1, ctx.log)
        result["total_tokens"] = manifest["totals"]["tokens"]
    return result


def finalize(ctx: StageContext[PretokenizeParams]) -> dict[str, Any]:
    manifest = finalize_corpus(ctx.out_dir, max(1, ctx.num_tasks), ctx.log)
    totals = manifest["totals"]
    return {
        "tokens": totals["tokens"],
        "documents": totals["documents"],
        "shards": totals["shards"],
        "bad_input": sum(totals["bad"].values()),
        "dtype": manifest["dtype"],
    }
