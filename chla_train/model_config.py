"""LLaMA configurations by shape: the config.json keys a LLaMA is built from (a training stage's
`init:`, transformers' LlamaConfig), spelled once. The benchmarks and tests that build a model of
their own size describe it in one line here instead of seven keys.

Imports nothing heavy: benchmarks build their `init:` dicts on the launcher side too.
"""

from __future__ import annotations

from typing import Any


def llama_config(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    vocab: int = 32000,
    positions: int = 2048,
    **more: Any,
) -> dict[str, Any]:
    """The config.json keys of a LLaMA of this shape: `kv_heads` below `heads` is grouped-query
    attention (default: as many as `heads`), `vocab` defaults to LLaMA's 32,000 pieces and
    `positions` (max_position_embeddings) to LLaMA's 2048; `more` are other LlamaConfig keys
    (tie_word_embeddings, attn_implementation, ...)."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "max_position_embeddings": positions,
        **more,
    }


# LLaMA-7B's published shape (config.json of the original checkpoints).
LLAMA_7B = llama_config(hidden=4096, intermediate=11008, layers=32, heads=32)
