"""Known model architectures, for `chla plan --arch NAME` before a model is downloaded: the sizes
`chla plan` reads from a config.json (chla_launcher.sizing.ModelShape.from_config), as the
published config.json of each model gives them (Hugging Face model repositories, `config.json`).

Only the shapes that decide memory are here: hidden size, layers, attention and key/value heads,
MLP width, vocabulary and whether the input and output embeddings are tied. (Qwen2.5's q, k and v
biases, 0.01% of its parameters, are left out.)"""

from __future__ import annotations

from typing import Any


def _config(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, *, tied: bool = False
) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }


ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama-2-7b": _config(4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": _config(5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": _config(8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": _config(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": _config(8192, 28672, 80, 64, 8, 128256),
    "mistral-7b": _config(4096, 14336, 32, 32, 8, 32000),  # v0.1 and v0.2 (v0.3: 32768 tokens)
    "qwen2.5-7b": _config(3584, 18944, 28, 28, 4, 152064),
    "qwen2.5-14b": _config(5120, 13824, 48, 40, 8, 152064),
}
