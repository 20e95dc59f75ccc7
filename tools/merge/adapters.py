"""peft LoRA adapter directories: which base tensor each adapter tensor replaces, changes by a
LoRA pair (with its scale) or overwrites rows of (trainable token indices)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from chla_launcher.contract.errors import ChlaError

from .checkpoint import SafetensorsFile, read_json_file
from .tokenizer import has_tokenizer

_PEFT_PREFIX = "base_model.model."
_TOKEN_ROWS_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[A-Za-z0-9_]+)?$")
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$"
)


@dataclass
class LoraPair:
    a_key: str
    b_key: str
    scale: float
    fan_in_fan_out: bool
    embedding: bool


@dataclass
class TokenRows:
    key: str  # the adapter tensor holding the rows, in the order of `indices`
    indices: list[int]


@dataclass
class Adapter:
    dir: Path
    file: SafetensorsFile
    config: dict
    # base tensor name -> adapter tensor name that replaces it (modules_to_save, base_layer)
    replacements: dict[str, str] = field(default_factory=dict)
    loras: dict[str, LoraPair] = field(default_factory=dict)
    # base tensor name -> rows the adapter writes over it (trainable token indices)
    token_rows: dict[str, TokenRows] = field(default_factory=dict)

    @property
    def has_tokenizer(self) -> bool:
        return has_tokenizer(self.dir)


def _pattern_value(patterns: dict | None, module: str, default):
    # peft's get_pattern_key: a pattern matches a module name suffix (as a regex)
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def load_adapter(adapter_dir: Path) -> Adapter:
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ChlaError(f"adapter {adapter_dir}: no adapter_config.json; pass a peft save_pretrained directory")
    config = read_json_file(config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise ChlaError(f"adapter {adapter_dir}: peft_type {config.get('peft_type')} is not LoRA; only LoRA merges")
    for unsupported in ("use_dora", "lora_bias", "layer_replication", "target_parameters"):
        if config.get(unsupported):
            raise ChlaError(
                f"adapter {adapter_dir}: adapter_config.json sets {unsupported}, which chla merge "
                "does not support; merge it with peft merge_and_unload instead"
            )
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ChlaError(
            f"adapter {adapter_dir}: no adapter_model.safetensors; re-save it with "
            "save_pretrained(safe_serialization=True)"
        )
    adapter = Adapter(dir=adapter_dir, file=SafetensorsFile(weights), config=config)

    lora_parts: dict[str, dict[str, str]] = {}
    for key in adapter.file.tensors:
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        match = _LORA_KEY.match(name)
        if match:
            lora_parts.setdefault(match["module"], {})[match["part"]] = key
            continue
        match = _TOKEN_ROWS_KEY.match(name)
        if match:
            adapter.token_rows[f"{match['module']}.weight"] = TokenRows(key, _token_indices(adapter, match["module"]))
            continue
        # modules_to_save copies and saved base layers replace the base tensor
        name = re.sub(r"\.modules_to_save(\.[A-Za-z0-9_]+)?\.", ".", name)
        name = name.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")
        if ".original_module." in name:
            continue
        adapter.replacements[name] = key

    use_rslora = bool(config.get("use_rslora"))
    for module, parts in lora_parts.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            raise ChlaError(
                f"adapter {adapter_dir}: {module} has only one of its LoRA A/B tensors; the adapter file is incomplete"
            )
        rank = adapter.file.tensors[a_key].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        adapter.loras[f"{module}.weight"] = LoraPair(a_key, b_key, scale, bool(config.get("fan_in_fan_out")), embedding)
    return adapter


def _token_indices(adapter: Adapter, module: str) -> list[int]:
    """The trainable token indices adapter_config.json gives for `module` (peft: a list means the
    input embedding; a dict maps module names, matched as suffixes, to lists)."""
    configured = adapter.config.get("trainable_token_indices")
    if isinstance(configured, list) and module.endswith("embed_tokens"):
        return [int(i) for i in configured]
    indices = _pattern_value(configured if isinstance(configured, dict) else {}, module, None)
    if indices is None:
        raise ChlaError(
            f"adapter {adapter.dir}: it holds trainable token rows for {module} but "
            "adapter_config.json's trainable_token_indices names no such module"
        )
    return [int(i) for i in indices]
