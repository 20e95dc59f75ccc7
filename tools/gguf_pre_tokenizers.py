"""llama.cpp's names for byte-level BPE pre-tokenizers, and the tokenizer.json pre-tokenizer each
stands for.

A GGUF file does not store how a byte-level BPE tokenizer splits text before merging; it stores a
name (`tokenizer.ggml.pre`: "gpt-2", "smollm", "llama-bpe", ...) and llama.cpp hard-codes the
regular expressions behind each. Two conversions need the name <-> tokenizer.json mapping:

- GGUF -> HF (chla_tools.gguf_import): transformers' GGUF reader knows the Llama 3 / Qwen style
  splits but builds every other name as GPT-2's ByteLevel split. For "smollm" (SmolLM, SmolLM2)
  that loses the digit rule: llama.cpp and SmolLM2's own tokenizer.json put every digit in a
  piece of its own, GPT-2 keeps "2024" whole, so the same text gives other ids.
- HF -> GGUF (chla_tools.gguf_export): llama.cpp's converter recognises a pre-tokenizer by
  hashing the ids the tokenizer gives for a fixed text, so a vocabulary with appended tokens (a
  Chinese extension) hashes differently and is refused, although it splits text exactly as its
  base does. The pre-tokenizer in its tokenizer.json still says which name it is.

Only names whose llama.cpp regular expressions this table reproduces exactly are listed (checked
in llama.cpp's llama-vocab.cpp of the pinned release); for anything else the export asks for the
name (`pre_tokenizer:`) rather than guess.
"""

from __future__ import annotations

import json
from typing import Any

# llama.cpp's LLAMA3 split, as Meta's tokenizer.json writes it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    # GPT-2's regex (ByteLevel's own).
    "gpt-2": _byte_level(True),
    # Every digit alone, then GPT-2's regex (llama.cpp: "\p{N}" before the GPT-2 expression).
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)],
    },
    "llama-bpe": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            _byte_level(False),
        ],
    },
}


def _canonical(pre_tokenizer: Any) -> str:
    """The pre-tokenizer without trim_offsets, which moves offsets only, never the pieces."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: strip(value) for key, value in node.items() if key != "trim_offsets"}
        if isinstance(node, list):
            return [strip(value) for value in node]
        return node

    return json.dumps(strip(pre_tokenizer), sort_keys=True)


def llama_cpp_name(tokenizer_json: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name of a tokenizer.json (its `pre_tokenizer` block), or None
    when it is none of the known ones (or has a normalizer, which llama.cpp's BPE does not run)."""
    if tokenizer_json.get("normalizer") is not None:
        return None
    wanted = _canonical(tokenizer_json.get("pre_tokenizer"))
    return next((name for name, pre in PRE_TOKENIZERS.items() if _canonical(pre) == wanted), None)
