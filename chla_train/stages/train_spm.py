"""`train_spm`: train a SentencePiece model on corpus text (out/spm.model, out/spm.vocab)."""

from __future__ import annotations

from chla_launcher.contract.kinds.train_spm import TrainSpmParams
from chla_tools.vocab import train_spm
from chla_train.context import StageContext


def run(ctx: StageContext[TrainSpmParams]) -> dict:
    return train_spm(ctx.params, ctx.out_dir, log=ctx.log)
