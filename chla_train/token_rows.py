"""`vocab_rows: new`: a LoRA stage trains only some rows of embed_tokens and lm_head.

The original project trains full copies of embed_tokens and lm_head in every LoRA stage: every
row moves (in SFT that undid much of what pretraining taught: the demo's Chinese perplexity per
character went from 145 to 4,312) and every adapter carries both matrices whole (~0.8 GB at 7B).
With `vocab_rows: new` those two matrices train only the rows from `new_rows_from` on, through
PEFT's trainable token rows (LoraConfig.trainable_token_indices, TrainableTokensLayer): the
adapter holds just those rows, loads with stock PeftModel.from_pretrained onto the base resized
to the adapter's tokenizer, and chla's merge and peft's merge_and_unload both write the rows into
the matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chla_launcher.contract.errors import ChlaError


def new_token_rows(params, base_rows: int, vocab_size: int, *, where: str, added_here: int = 0) -> range | None:
    """The rows a LoRA stage with `vocab_rows: new` trains: from new_rows_from (default: the rows
    the model had before this stage's tokenizer) to the end of the vocabulary. `added_here`: the
    tokens the stage itself added to its tokenizer (SFT's [PAD])."""
    if params.vocab_rows != "new":
        return None
    if params.new_rows_from is None and 0 < vocab_size - base_rows <= added_here:
        # An SFT base that went through the merge already has every merged row: by default only
        # [PAD] would train, and a model whose answers are new tokens then never learns them.
        raise ChlaError(
            f"{where}.vocab_rows: new would train only the {vocab_size - base_rows} token(s) this "
            f"stage adds ({base_rows}..{vocab_size - 1}: the model already has a row for every other "
            "token); set new_rows_from to the first row the vocabulary merge added (the original "
            "base model's vocabulary size, 32000 for LLaMA)"
        )
    first = base_rows if params.new_rows_from is None else params.new_rows_from
    if first > base_rows:
        raise ChlaError(
            f"{where}.new_rows_from: {first} is past the model's {base_rows} rows; the rows "
            f"{base_rows}..{first - 1} this stage adds would neither train nor be saved"
        )
    return range(first, vocab_size)


def token_rows_config(
    model, modules_to_save: list[str], rows: range | None
) -> tuple[list[str], dict[str, list[int]] | None]:
    """modules_to_save split into the modules still saved whole and, for the vocabulary matrices
    among them, PEFT's trainable_token_indices (None without `rows`)."""
    if rows is None or len(rows) == 0:
        return list(modules_to_save), None
    vocabulary = {_leaf_name(model, model.get_input_embeddings()), _leaf_name(model, model.get_output_embeddings())}
    kept = [name for name in modules_to_save if name not in vocabulary]
    indices = list(rows)
    return kept, {name: indices for name in modules_to_save if name in vocabulary} or None


def _leaf_name(model, module) -> str | None:
    return next((name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is module), None)


def output_rows_without_full_gradient(model) -> bool:
    """Make trainable token rows of the output head cost only their own gradient.

    PEFT computes the head of a TrainableTokensLayer as F.linear(x, W) with W the base matrix
    with the trained rows copied in, so backward forms the gradient of the whole V x hidden
    matrix (as many multiply-adds as the forward pass) only to keep a few rows of it. Here the
    logits come from the frozen base matrix, and the trained rows' logits from those rows alone,
    written over their columns: the same logits and the same gradients, without the large
    weight gradient (the output head is most of a small model's compute). With tied embeddings
    PEFT ties the head's layer to the embedding's (its trained rows and indices are the
    embedding's own, and its base matrix is the embedding's): the same applies. Returns whether
    the head was changed."""
    head = model.get_output_embeddings()
    layer = getattr(head, "token_adapter", None)
    if layer is None:
        return False
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear) or base.bias is not None:
        return False
    peft_forward = layer.forward
    indices: dict[tuple[str, torch.device], torch.Tensor] = {}

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = layer.active_adapters
        if layer.disable_adapters or layer.merged or len(active) != 1 or active[0] not in layer.trainable_tokens_delta:
            return peft_forward(x, *args, **kwargs)
        name = active[0]
        key = (name, x.device)
        if key not in indices:
            indices[key] = torch.as_tensor(layer.token_indices[name], dtype=torch.long, device=x.device)
        logits = F.linear(x, base.weight)
        rows = F.linear(x, layer.trainable_tokens_delta[name].to(base.weight.dtype))
        return logits.index_copy(-1, indices[key], rows)

    layer.forward = forward
    return True
