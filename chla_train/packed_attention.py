"""Packed rows (chla_tools.sft_data.collate_sft_packed) as each attention backend must be told them.

A packed row holds several examples; each may attend only to itself (and, with a shared prompt
prefix, to the row's one copy of that prefix). transformers 5 has no single input that says so
to every backend:

- sdpa: restarting `position_ids` are enough. With no attention mask, masking_utils reads the
  restarts as sequence boundaries (find_packed_sequence_indices, per row) and builds the
  block-diagonal causal mask itself. A 4-D mask (the shared prefix) is passed through as is,
  and sdpa reads a boolean one as "True = attend".
- eager: the same 4-D mask is passed through as is too, but eager *adds* it to the scores, so
  it must be additive: 0 where a token attends, the dtype's minimum where it must not (a
  boolean mask adds 1 or 0 and masks nothing). Built here, from the boundaries.
- flash_attention_2: restarting position ids are read as boundaries only when the batch has one
  row (modeling_flash_attention_utils._is_packed_sequence); with several rows FlashAttention
  runs plain causal attention over each whole row, across examples. So the boundaries go in
  explicitly as varlen arguments (cu_seq_lens_q/k, max_length_q/k, FlashAttentionKwargs),
  which transformers hands to flash_attn_varlen_func with the rows flattened into one sequence.
  A shared prefix has no such form: varlen attention lets a token see only its own contiguous
  segment, and the prefix is contiguous with one example of the row at most.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.sft import NO_SHARED_PREFIX_UNDER_FLASH

# Implementations that take varlen boundaries (transformers' FlashAttention integrations).
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


def packed_attention_inputs(
    batch: dict[str, np.ndarray], implementation: str, *, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """The model keyword arguments that delimit the examples of packed rows under `implementation`
    (position_ids always; plus a 4-D mask or the varlen boundaries)."""
    position_ids = torch.from_numpy(batch["position_ids"]).to(device)
    inputs: dict[str, Any] = {"position_ids": position_ids}
    shared = batch.get("packed_attention_mask")
    if implementation in VARLEN_IMPLEMENTATIONS:
        if shared is not None or "cu_seq_lens" not in batch:
            raise ChlaError(NO_SHARED_PREFIX_UNDER_FLASH)
        boundaries = torch.from_numpy(batch["cu_seq_lens"]).to(device=device, dtype=torch.int32)
        longest = int(batch["max_seq_len"])  # an int: flash_attn_varlen_func takes no tensor here
        inputs.update(cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries, max_length_q=longest, max_length_k=longest)
        return inputs
    if implementation == "sdpa" and shared is None:
        return inputs  # masking_utils builds the block-diagonal mask from the restarts
    attend = torch.from_numpy(shared) if shared is not None else block_causal_mask(batch["position_ids"])
    attend = attend.unsqueeze(1).to(device)  # rows x 1 (every head) x query x key
    if implementation == "eager":
        inputs["attention_mask"] = additive_mask(attend, dtype)
    elif implementation == "sdpa":
        inputs["attention_mask"] = attend
    else:
        raise ChlaError(
            f"packed batches support attn_implementation sdpa, eager and flash_attention_2, not {implementation}"
        )
    return inputs


def block_causal_mask(position_ids: np.ndarray) -> torch.Tensor:
    """rows x query x key, True where a token may attend: earlier or same tokens of its own
    example, the examples being the runs of position ids that restart at 0."""
    segment = torch.from_numpy(np.cumsum(position_ids == 0, axis=1))
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return (segment[:, :, None] == segment[:, None, :]) & causal


def additive_mask(attend: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `attend`, the dtype's most negative value elsewhere (what eager attention adds to
    the scores; as transformers' own eager masks, finite, so a softmax over it stays defined)."""
    mask = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
    return mask.masked_fill_(~attend, torch.finfo(dtype).min)
