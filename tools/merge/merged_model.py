"""`merge_adapters`: the merged model directory, built under a temporary name (shards, index,
config, tokenizer, provenance) and moved into place whole."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from chla_launcher.contract.atomic import replace_dir, write_json
from chla_launcher.contract.errors import ChlaError
from chla_tools.hf_tokenizer import make_portable

from .adapters import load_adapter
from .checkpoint import CONFIG_DTYPE, DTYPE_NAMES, Checkpoint
from .plan import EMBED_KEY, parse_size, plan_merge, shard_groups
from .shards import Log, write_shards
from .tokenizer import TOKENIZER_FILES, check_tokenizer, has_tokenizer

if TYPE_CHECKING:
    from chla_launcher.contract.kinds.merge import MergeParams


def merge_adapters(
    base_dir: str | os.PathLike,
    adapter_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    shard_size: str | int = "5GB",
    dtype: str | None = None,
    log: Log = print,
    progress: Callable[..., None] | None = None,
) -> dict:
    """Merge `adapter_dirs` (in order) into the model at `base_dir`; write an HF model to `out_dir`.

    Returns a summary (tensors, bytes, shards, vocab size, seconds). `progress(done, total=...)` is
    told the merged bytes as they are written.
    """
    started = time.monotonic()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    shard_bytes = parse_size(shard_size)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ChlaError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    out_dtype = DTYPE_NAMES[dtype] if dtype else None

    base = Checkpoint(base_dir)
    adapters = [load_adapter(Path(d)) for d in adapter_dirs]
    planned, keep_tied = plan_merge(base, adapters, out_dtype)
    tokenizer_dir = next((a.dir for a in reversed(adapters) if a.has_tokenizer), None)
    if tokenizer_dir is None and has_tokenizer(base_dir):
        tokenizer_dir = base_dir
    if tokenizer_dir is None:
        raise ChlaError(
            f"no tokenizer in base {base_dir} or in any adapter; copy the tokenizer files "
            "(tokenizer.model, tokenizer_config.json, ...) into the last adapter's directory"
        )

    vocab_rows = next((p.shape[0] for p in planned if p.name == EMBED_KEY), base.config.get("vocab_size"))
    check_tokenizer(tokenizer_dir, vocab_rows)

    groups = shard_groups(planned, shard_bytes)
    total_bytes = sum(item.nbytes for item in planned)
    log(
        f"merge: {len(adapters)} adapter(s) into {base_dir}: {len(planned)} tensors, "
        f"{total_bytes / 1e9:.2f} GB in {len(groups)} shard(s), vocabulary {vocab_rows}"
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        names = (
            ["model.safetensors"]
            if len(groups) == 1
            else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        )
        report = (lambda done: progress(done, total=total_bytes)) if progress else None
        weight_map = write_shards(tmp_dir, names, groups, base, adapters, total_bytes, log, report)
        if progress is not None:
            progress(total_bytes, total=total_bytes)
        if len(groups) > 1:
            write_json(
                tmp_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
            )

        config = dict(base.config)
        config["vocab_size"] = vocab_rows
        if config.get("tie_word_embeddings") and not keep_tied:
            config["tie_word_embeddings"] = False
        if out_dtype is not None:
            config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = CONFIG_DTYPE[
                out_dtype
            ]
        write_json(tmp_dir / "config.json", config)
        if (base_dir / "generation_config.json").is_file():
            shutil.copy2(base_dir / "generation_config.json", tmp_dir / "generation_config.json")
        for file_name in TOKENIZER_FILES:
            if (tokenizer_dir / file_name).is_file():
                shutil.copy2(tokenizer_dir / file_name, tmp_dir / file_name)
        make_portable(tmp_dir)  # an adapter saved by transformers 5 elsewhere loads in 4 too
        write_json(
            tmp_dir / "chla_merge.json",
            {
                "base": str(base_dir),
                "adapters": [str(a.dir) for a in adapters],
                "tokenizer_from": str(tokenizer_dir),
                "dtype": dtype,
                "shard_size": shard_bytes,
            },
        )
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log(f"merge: wrote {out_dir} ({total_bytes / 1e9:.2f} GB, {len(groups)} shard(s)) in {seconds:.1f} s")
    return {
        "tensors": len(planned),
        "bytes": total_bytes,
        "shards": len(groups),
        "vocab_size": vocab_rows,
        "tied_embeddings": keep_tied,
        "tokenizer_from": str(tokenizer_dir),
        "seconds": round(seconds, 2),
    }


def merge_with_params(
    params: MergeParams, out_dir: str | os.PathLike, log: Log = print, progress: Callable[..., None] | None = None
) -> dict:
    """`merge_adapters` as the stage kind's params describe it (`chla merge` and the stage)."""
    return merge_adapters(
        params.base,
        params.adapters,
        out_dir,
        shard_size=params.shard_size,
        dtype=params.dtype,
        log=log,
        progress=progress,
    )
