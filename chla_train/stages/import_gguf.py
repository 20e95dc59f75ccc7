"""`import_gguf` stage: a GGUF file as an HF model folder, out/ itself (chla_tools.gguf_import),
so later stages take ${stages.<this stage>.out} as their model."""

from __future__ import annotations

from typing import Any

from chla_launcher.contract.kinds.import_gguf import ImportGgufParams
from chla_tools.gguf_import import import_gguf
from chla_train.context import StageContext


def run(ctx: StageContext[ImportGgufParams]) -> dict[str, Any]:
    summary = import_gguf(ctx.params, ctx.out_dir, log=ctx.log)
    return {key: summary[key] for key in ("sha256", "parameters", "tie_word_embeddings")}
