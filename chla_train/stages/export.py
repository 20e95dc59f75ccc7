"""`export` stage: an HF model as one GGUF file for llama.cpp.

Check the model's vocabulary rows against its tokenizer and convert it with llama.cpp's own
convert_hf_to_gguf.py (chla_tools.gguf_export) into out/<file_name>; record what was converted
in out/export.json.
"""

from __future__ import annotations

from typing import Any

from chla_launcher.contract.atomic import write_json
from chla_launcher.contract.kinds.export import ExportParams
from chla_tools.gguf_export import export_gguf
from chla_train.context import StageContext


def run(ctx: StageContext[ExportParams]) -> dict[str, Any]:
    params = ctx.params
    summary = export_gguf(params, ctx.out_dir / params.file_name, log=ctx.log)
    write_json(ctx.out_dir / "export.json", {**summary, "model": str(params.model)})
    return {key: summary[key] for key in ("bytes", "outtype", "vocab_size")}
