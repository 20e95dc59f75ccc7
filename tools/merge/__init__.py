"""Merge LoRA adapters into a base model in bounded memory (`chla merge`, stage kind `merge`).

The original project loaded the whole model into memory and called peft's merge_and_unload.
Here the base is streamed: every output shard's header is laid out in advance, tensors that no
adapter changes are copied byte for byte from file to file inside the kernel, and tensors that a
LoRA changes are read, merged and written in row chunks at their final offsets, with peft's own
arithmetic (delta (B @ A) * scale in fp32, added to the weight and rounded once to its dtype), so
the result is bit for bit what merge_and_unload gives. Peak memory is a few 16 MB chunks plus
the adapters, whatever the model's size (one whole tensor more when --dtype converts).

Why not `safe_open` for the data: pages of a memory-mapped file stay resident (and count in
RSS) for as long as the file is mapped, so reading a 10 GB shard through one mapping makes the
process hold 10 GB. Chunks are read with plain positioned reads into a few reused buffers
(reading through a short-lived mapping of each chunk instead was measured: no faster).

Names. peft saves a LoRA module as `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`
(`.lora_embedding_A` / `.lora_embedding_B` for an embedding), a modules_to_save module as
`base_model.model.<module>.weight` (peft >= 0.13; older versions wrote
`<module>.modules_to_save.<adapter>.weight`), and with `save_embedding_layers` the resized base
embedding of a LoRA-adapted embedding as `<module>.base_layer.weight` (of one with trainable token
rows as `<module>.token_adapter.base_layer.weight`). All map to the base tensor `<module>.weight`.

Trainable token rows (LoraConfig.trainable_token_indices, chla's `vocab_rows: new`): the adapter
holds `<module>.token_adapter.trainable_tokens_delta`, one row per index listed in
adapter_config.json; merging writes those rows over the matrix's rows at those indices (peft's
index_copy, the values cast to the matrix's dtype). Indices past the base's last row grow the
matrix; every row it grows by must be among them.

Vocabulary growth (32000 -> 49953 -> 49954 in the original): an adapter's saved embed_tokens and
lm_head define the new number of rows; fewer rows than the model already has is refused.
With tied embeddings (`tie_word_embeddings`) the base has no lm_head tensor. An adapter that
keeps the tie as stock peft loads it (ensure_weight_tying, or trainable token rows of the input
embedding, which peft ties the head's rows to) changes the one matrix: the merged model keeps one
tensor and `tie_word_embeddings`. Any other adapter that changes embed_tokens or lm_head (a
modules_to_save copy without ensure_weight_tying: peft unties them) gives the merged model its
own lm_head (what the adapter model computed with) and the config is untied.

Modules: checkpoint (safetensors headers and reads), adapters (what each adapter tensor does),
plan (output shapes, checked first, and the shard layout), lora (peft's arithmetic), kernel_io
and shards (writing the shards), tokenizer (the one the merged model ships), merged_model (the
whole directory, moved into place).
"""

from .adapters import Adapter, load_adapter
from .checkpoint import DTYPE_NAMES, Checkpoint, SafetensorsFile, TensorEntry, torch_dtype
from .merged_model import merge_adapters, merge_with_params
from .plan import EMBED_KEY, LM_HEAD_KEY, PlannedTensor, header_bytes, parse_size, plan_merge, shard_groups
from .tokenizer import TOKENIZER_FILES, has_tokenizer, tokenizer_size

__all__ = [
    "DTYPE_NAMES",
    "EMBED_KEY",
    "LM_HEAD_KEY",
    "TOKENIZER_FILES",
    "Adapter",
    "Checkpoint",
    "PlannedTensor",
    "SafetensorsFile",
    "TensorEntry",
    "has_tokenizer",
    "header_bytes",
    "load_adapter",
    "merge_adapters",
    "merge_with_params",
    "parse_size",
    "plan_merge",
    "shard_groups",
    "tokenizer_size",
    "torch_dtype",
]
