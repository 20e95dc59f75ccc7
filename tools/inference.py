"""Loading a model for generation (merged, or base + adapters unmerged) and batched generation.

Shared by `chla chat` (chla_train.chat) and `chla eval` (chla_tools.evaluate).

Adapters are checked against the model with the same shape plan `chla merge` uses, before any
weights are loaded, so a mismatch is one line naming the tensor. All adapters but the last are
merged in memory (peft cannot stack adapters across vocabulary growth); the last stays a
PeftModel, unmerged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chla_launcher.contract.errors import ChlaError

# The recipe's Alpaca template, exactly as SFT training formats prompts.
from chla_tools.sft_data import PROMPT_TEMPLATE, encode_prompt, format_prompt  # noqa: E402,F401


def find_tokenizer_dir(model_dir: Path, adapter_dirs: list[Path]) -> Path:
    """The tokenizer of the last adapter that has one, else the model's (as `chla merge` does)."""
    from chla_tools.merge import has_tokenizer

    for directory in [*reversed(adapter_dirs), model_dir]:
        if has_tokenizer(directory):
            return directory
    raise ChlaError(
        f"no tokenizer in {model_dir} or its adapters; copy the tokenizer files "
        "(tokenizer.model / tokenizer.json + tokenizer_config.json) into the model directory"
    )


def load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a broken dir
        raise ChlaError(
            f"tokenizer in {tokenizer_dir} does not load ({type(err).__name__}); fix or replace its files"
        ) from None
    # Batched generation pads on the left, so every prompt ends right where generation starts.
    tokenizer.padding_side = "left"
    if "[PAD]" in tokenizer.get_vocab():
        tokenizer.pad_token = "[PAD]"
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_for_inference(
    model_dir: str | Path,
    adapter_dirs: Sequence[str | Path] = (),
    *,
    rope_scaling: float | None = None,
    device: str | None = None,
    max_memory: dict[str | int, str] | None = None,
    offload_folder: str | Path | None = None,
    log: Callable[[str], None] = print,
):
    """(model, tokenizer) ready for generation, in eval mode. On GPUs the model is spread over all
    of them (`placement`); on a CPU it sits in memory, unless `max_memory` caps what each device
    may hold (then the same placement, with the rest offloaded to `offload_folder`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from chla_tools.merge import Checkpoint, load_adapter, plan_merge

    model_dir = Path(model_dir)
    adapter_paths = [Path(d) for d in adapter_dirs]
    if not model_dir.is_dir():
        raise ChlaError(f"model {model_dir}: not a directory")
    checkpoint = Checkpoint(model_dir)
    adapters = [load_adapter(d) for d in adapter_paths]
    planned, _tied = plan_merge(checkpoint, adapters, None)
    vocab_rows = next((p.shape[0] for p in planned if p.name == "model.embed_tokens.weight"), None)
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir, adapter_paths))
    if vocab_rows is not None and len(tokenizer) > vocab_rows:
        raise ChlaError(
            f"tokenizer has {len(tokenizer)} tokens but the model has {vocab_rows} embedding rows; "
            "pass the adapter that added the tokens (--adapter), or the merged model"
        )

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on a GPU; fp32 on a CPU whatever bf16 support it has: evaluation is cheap next to
    # training there, and a model's scores then do not depend on the CPU's bf16 arithmetic.
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    log(
        f"precision {'bf16' if dtype == torch.bfloat16 else 'fp32'}: inference on {device} "
        f"({'a GPU' if dtype == torch.bfloat16 else 'a CPU: scores independent of its bf16 support'})"
    )
    spread = placement(device, max_memory, offload_folder)
    config = AutoConfig.from_pretrained(model_dir)
    if rope_scaling is not None:
        if rope_scaling <= 1.0:
            raise ChlaError(f"--rope-scaling {rope_scaling}: the factor must be > 1 (1 means no scaling)")
        # transformers 5 keeps RoPE settings in config.rope_parameters ("rope_type", "factor",
        # "rope_theta"); "dynamic" is NTK-aware scaling that only kicks in past
        # max_position_embeddings, like the original project's --alpha.
        config.rope_parameters = {
            **(config.rope_parameters or {}),
            "rope_type": "dynamic",
            "factor": float(rope_scaling),
        }
    # Any: a transformers model, then a peft model wrapping it
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype, **spread)
    if spread:
        devices = sorted({str(d) for d in getattr(model, "hf_device_map", {"": "cpu"}).values()})
        log(f"placed on {', '.join(devices)} (device_map auto)")

    from peft import PeftModel

    for position, (adapter, directory) in enumerate(zip(adapters, adapter_paths)):
        rows = _saved_embedding_rows(adapter)
        current = model.get_input_embeddings().weight.shape[0]
        if rows is not None and rows > current:
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(directory))
        if position < len(adapters) - 1:
            model = model.merge_and_unload()
        log(f"loaded adapter {directory}")
    if not spread:
        model.to(device)
    model.eval()
    return model, tokenizer


def placement(
    device: str, max_memory: dict[str | int, str] | None = None, offload_folder: str | Path | None = None
) -> dict:
    """from_pretrained's placement arguments. On GPUs, accelerate's device_map "auto": the layers
    spread over every visible GPU in turn, those that do not fit kept in CPU memory and brought to
    a GPU as they run (slow, but a 70B model evaluates on one 80 GB GPU), and the embeddings'
    GPU is where inputs go (`input_device`). No arguments (everything on `device`) otherwise,
    unless `max_memory` is given: then the same spreading under those caps, the rest of the model
    offloaded to disk in `offload_folder`."""
    if max_memory is None and not device.startswith("cuda"):
        return {}
    spread: dict = {"device_map": "auto"}
    if max_memory is not None:
        spread["max_memory"] = max_memory
    if offload_folder is not None:
        spread["offload_folder"] = str(offload_folder)
    return spread


def input_device(model):
    """Where a model's inputs go: its input embeddings' device (the first GPU of a spread model);
    the CPU when they are offloaded (accelerate's hooks then move each layer's inputs)."""
    device = model.get_input_embeddings().weight.device
    return device if device.type != "meta" else "cpu"


def _saved_embedding_rows(adapter) -> int | None:
    """The embedding rows the adapter was trained with: its saved matrix's, or past the last of
    its trainable token rows (which then cover every row the base lacks)."""
    key = adapter.replacements.get("model.embed_tokens.weight")
    if key:
        return adapter.file.tensors[key].shape[0]
    rows = adapter.token_rows.get("model.embed_tokens.weight")
    return max(rows.indices) + 1 if rows else None


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` starting with exactly one BOS (LLaMA convention), whatever the
    tokenizer's add_bos setting."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def generate_batch(model, tokenizer, prompts: list[str], *, max_new_tokens: int, **sampling) -> list[str]:
    """Greedy (default) or sampled continuations of `prompts`, batched with left padding."""
    import torch

    # as SFT encodes a prompt: without its trailing whitespace, which the answer starts with
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    device = input_device(model)
    settings = {"do_sample": False, **sampling}
    if not settings["do_sample"]:
        settings.pop("temperature", None), settings.pop("top_k", None), settings.pop("top_p", None)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **settings,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in output.cpu()]


def read_json_or_jsonl(path: Path) -> list:
    """A JSON list, or JSON Lines (one object a line); errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ChlaError(f"{path}: cannot read ({err.strerror})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ChlaError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ChlaError(f"{path}:{number}: invalid JSON line ({err.msg})") from None
    return records
