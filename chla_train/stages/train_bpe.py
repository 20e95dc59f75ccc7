"""`train_bpe`: train a byte-level BPE with a base tokenizer's pre-tokenizer (out/tokenizer.json,
out/train.json)."""

from __future__ import annotations

from chla_launcher.contract.kinds.train_bpe import TrainBpeParams
from chla_tools.vocab import train_bpe
from chla_train.context import StageContext


def run(ctx: StageContext[TrainBpeParams]) -> dict:
    return train_bpe(ctx.params, ctx.out_dir, log=ctx.log)
