"""The arithmetic of stock peft's merge, row block by row block: LoRA deltas, trainable token
rows written over a matrix, and one output tensor merged whole (where the dtype changes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .adapters import Adapter, LoraPair, TokenRows
from .checkpoint import Checkpoint, SafetensorsFile, torch_dtype
from .plan import PlannedTensor

if TYPE_CHECKING:
    import torch

# Rows of a weight are merged in blocks of about this many elements. The LoRA delta of a row
# depends only on that row, so a block's fp32 scratch (the widened weight and its delta) stays
# in the CPU cache, and the memory a merge needs does not grow with the size of a matrix.
_BLOCK_ELEMENTS = 128 * 1024


@dataclass
class LoraDelta:
    """delta = (left @ right) * scale in fp32, with `left` having the weight's rows (B for a
    Linear, A^T for an embedding or a fan_in_fan_out layer, as peft transposes B @ A there)."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float


def load_lora(adapter: Adapter, lora: LoraPair) -> LoraDelta:
    # peft upcasts fp16/bf16 adapter weights to fp32 when it loads them (autocast_adapter_dtype)
    lora_a = adapter.file.read(lora.a_key).float()
    lora_b = adapter.file.read(lora.b_key).float()
    if lora.embedding or lora.fan_in_fan_out:
        return LoraDelta(lora_a.t().contiguous(), lora_b.t().contiguous(), lora.scale)
    return LoraDelta(lora_b, lora_a, lora.scale)


class Scratch:
    """Two fp32 blocks reused for every row block: the widened weight and the delta."""

    def __init__(self) -> None:
        import torch

        self.wide = torch.empty(_BLOCK_ELEMENTS, dtype=torch.float32)
        self.delta = torch.empty(_BLOCK_ELEMENTS, dtype=torch.float32)

    def grow(self, elements: int) -> None:
        if self.wide.numel() < elements:  # a single row longer than a block
            import torch

            self.wide = torch.empty(elements, dtype=torch.float32)
            self.delta = torch.empty(elements, dtype=torch.float32)


def apply_loras(rows: torch.Tensor, first_row: int, deltas: list[LoraDelta], scratch: Scratch) -> None:
    """rows += delta[first_row:first_row + len(rows)] for each delta in order, in place.

    Bit for bit what peft's merge does on CPU: `weight.data += (B @ A) * scale` with the delta in
    fp32 (peft holds adapter weights in fp32), so a half-precision weight is widened, the delta
    added in fp32, and the sum rounded once back to the weight's dtype, once per adapter."""
    import torch

    columns = rows.shape[1]
    step = max(1, _BLOCK_ELEMENTS // max(1, columns))
    scratch.grow(step * columns)
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        shape = tuple(block.shape)
        delta = scratch.delta[: block.numel()].view(shape)
        wide = block if block.dtype == torch.float32 else scratch.wide[: block.numel()].view(shape)
        for lora in deltas:
            torch.mm(lora.left[first_row + start : first_row + start + shape[0]], lora.right, out=delta)
            delta.mul_(lora.scale)
            if wide is block:
                block.add_(delta)
            else:
                wide.copy_(block)
                wide.add_(delta)
                block.copy_(wide)


@dataclass
class TensorSource:
    """Where an output tensor's bytes start from (the base's tensor, or the last replacement of
    it), and the LoRA deltas, then the token rows, written over it after that, in order (the
    planner refuses a tensor with both)."""

    file: SafetensorsFile
    key: str
    loras: list[tuple[Adapter, LoraPair]]
    token_rows: list[tuple[Adapter, TokenRows]] = field(default_factory=list)


def tensor_source(item: PlannedTensor, base: Checkpoint, adapters: list[Adapter]) -> TensorSource:
    source = TensorSource(base.files[item.source], item.source, [])
    for adapter in adapters:
        key = adapter.replacements.get(item.name)
        if key is not None:
            source = TensorSource(adapter.file, key, [])
        lora = adapter.loras.get(item.name)
        if lora is not None:
            source.loras.append((adapter, lora))
        rows = adapter.token_rows.get(item.name)
        if rows is not None:
            source.token_rows.append((adapter, rows))
    return source


@dataclass
class RowPatch:
    """Rows written over a matrix: row indices[i] becomes values[i] (already in its dtype)."""

    indices: torch.Tensor
    values: torch.Tensor


def load_row_patch(adapter: Adapter, rows: TokenRows, dtype) -> RowPatch:
    import torch

    return RowPatch(torch.tensor(rows.indices, dtype=torch.long), adapter.file.read(rows.key).to(dtype))


def apply_row_patches(rows: torch.Tensor, first_row: int, patches: list[RowPatch]) -> None:
    """rows (rows first_row.. of the matrix) with every patched row among them overwritten."""
    for patch in patches:
        inside = (patch.indices >= first_row) & (patch.indices < first_row + rows.shape[0])
        if bool(inside.any()):
            rows[patch.indices[inside] - first_row] = patch.values[inside]


def merged_tensor(
    item: PlannedTensor, base: Checkpoint, adapters: list[Adapter], scratch: Scratch | None = None
) -> torch.Tensor:
    """One output tensor, whole in memory: the base's, then every adapter in order. Used where
    the dtype changes; same-dtype tensors are streamed in row chunks by `merge_adapters`."""
    import torch

    scratch = scratch or Scratch()
    out_dtype = torch_dtype(item.dtype)
    tensor = base.read(item.source)
    for adapter in adapters:
        key = adapter.replacements.get(item.name)
        if key is not None:
            tensor = adapter.file.read(key)
        lora = adapter.loras.get(item.name)
        if lora is not None:
            # work in the wider of the stored and the requested dtype
            if out_dtype.itemsize > tensor.dtype.itemsize:
                tensor = tensor.to(out_dtype)
            apply_loras(tensor, 0, [load_lora(adapter, lora)], scratch)
        rows = adapter.token_rows.get(item.name)
        if rows is not None:
            patch = load_row_patch(adapter, rows, tensor.dtype)
            grown = int(patch.indices.max()) + 1
            if grown > tensor.shape[0]:
                tensor = torch.cat([tensor, tensor.new_zeros(grown - tensor.shape[0], *tensor.shape[1:])])
            apply_row_patches(tensor, 0, [patch])
    return tensor.to(out_dtype).contiguous()
