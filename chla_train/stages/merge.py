"""`merge`: merge the LoRA adapters, in order, into the base model, streaming tensor by tensor
(chla_tools.merge); the merged bytes so far feed the live progress bars."""

from __future__ import annotations

from typing import Any

from chla_launcher.contract.kinds.merge import MergeParams
from chla_launcher.contract.progress import progress_writer
from chla_tools.merge import merge_with_params
from chla_train.context import StageContext


def run(ctx: StageContext[MergeParams]) -> dict[str, Any]:
    progress = progress_writer(ctx, total=0, unit="bytes")
    summary = merge_with_params(ctx.params, ctx.out_dir, log=ctx.log, progress=progress.update if progress else None)
    if progress is not None:
        progress.close()
    return summary
