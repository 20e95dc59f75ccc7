"""`merge_tokenizer`: append a SentencePiece model's new pieces to a base tokenizer (out/merged.model,
out/tokenizer/, out/merge.json)."""

from __future__ import annotations

from chla_launcher.contract.kinds.merge_tokenizer import MergeTokenizerParams
from chla_tools.vocab import merge_tokenizers
from chla_train.context import StageContext


def run(ctx: StageContext[MergeTokenizerParams]) -> dict:
    summary = merge_tokenizers(ctx.params, ctx.out_dir, log=ctx.log)
    return {k: summary[k] for k in ("base_size", "new_pieces", "merged_size", "final_size", "arithmetic")}
