"""What a LLaMA-shaped model holds and computes while it trains, from its config alone.

Parameter counts (total and trainable, as chla's training modes build the model), model FLOPs per
token (for MFU: what is actually computed, not 6N), and bytes per device: weights, gradients and
optimizer states under a ZeRO stage, and the activations autograd keeps for the backward pass.
Torch-free: `chla plan` runs it on a login node, and the benchmarks count their MFU with it.

The activation bytes are those of the tensors the transformers 5 LLaMA code saves for backward
(enumerated in `_layer_saved_bytes`; tests/launcher/test_sizing.py checks them against the bytes
autograd really saves), plus the peak of the loss: HF upcasts the logits to fp32, log_softmax
saves its fp32 output, and its backward holds that output, the incoming gradient and the
outgoing one at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

# LlamaConfig's defaults (transformers 5), for keys an `init:` config leaves out.
LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "tie_word_embeddings": False,
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32 = 4
MASK = 1  # a dropout mask: one bool per element


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """From an HF config.json (or a LlamaConfig `init:` dict, LlamaConfig's defaults filling in)."""
        merged = {**LLAMA_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        heads = int(merged["num_attention_heads"])
        return cls(
            vocab_size=int(merged["vocab_size"]),
            hidden_size=int(merged["hidden_size"]),
            intermediate_size=int(merged["intermediate_size"]),
            num_layers=int(merged["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(merged.get("num_key_value_heads") or heads),
            head_dim=int(merged.get("head_dim") or int(merged["hidden_size"]) // heads),
            tie_word_embeddings=bool(merged["tie_word_embeddings"]),
        )

    def with_vocab(self, vocab_size: int) -> ModelShape:
        return replace(self, vocab_size=vocab_size)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.projections().values()) + 2 * self.hidden_size  # + 2 norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.embedding_params + self.num_layers * self.layer_params + self.hidden_size


@dataclass(frozen=True)
class Trainable:
    """What trains, as chla_train builds it: `lora` (adapters on `lora_targets`, plus full trainable
    copies of `modules_to_save`), `embeddings` (embed_tokens, or only its `new_rows`, and lm_head
    with train_lm_head) or `full`."""

    mode: Literal["lora", "embeddings", "full"]
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0
    modules_to_save: tuple[str, ...] = ()
    new_rows: int | None = None
    train_lm_head: bool = False

    @property
    def trains_embeddings(self) -> bool:
        return self.mode in ("embeddings", "full") or "embed_tokens" in self.modules_to_save

    @property
    def trains_lm_head(self) -> bool:
        return self.mode == "full" or self.train_lm_head or "lm_head" in self.modules_to_save


def parameter_counts(shape: ModelShape, trainable: Trainable) -> tuple[int, int]:
    """(total, trainable). PEFT keeps the frozen original of a module in modules_to_save beside its
    trainable copy, so each such module counts twice in the total."""
    total = shape.total_params
    if trainable.mode == "full":
        return total, total
    if trainable.mode == "embeddings":
        rows = trainable.new_rows if trainable.new_rows is not None else shape.vocab_size
        matrices = 2 if trainable.train_lm_head else 1
        return total, rows * shape.hidden_size * matrices
    lora = shape.num_layers * sum(
        trainable.lora_r * (a + b) for name, (a, b) in shape.projections().items() if name in trainable.lora_targets
    )
    copies = shape.embedding_params * sum(name in trainable.modules_to_save for name in ("embed_tokens", "lm_head"))
    return total + lora + copies, lora + copies


# --- FLOPs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def flops_per_token(shape: ModelShape, trainable: Trainable, seq_len: int, *, logits_fraction: float = 1.0) -> Flops:
    """Model FLOPs per input token of one training step (multiply-add = 2): what the step must
    compute, not what an implementation does on top (gradient-checkpointing recomputation,
    FlashAttention's recomputed scores, masked-out attention blocks).

    Forward: every matmul, 2 x in x out (the base weights and LoRA's A and B); causal attention,
    QK^T and AV over (seq_len + 1) / 2 keys on average; the vocabulary projection only at the
    `logits_fraction` of positions where logits are computed (chla's SFT: label positions).
    Backward: the activation gradient of every matmul down to the lowest trainable parameter (the
    first layer's q, k and v need none when the embeddings are frozen), twice the forward
    attention, and weight gradients only for the weights that train: frozen base weights cost
    nothing there, where 6N counts 4N."""
    keys = (seq_len + 1) / 2
    attention_forward = 4 * shape.num_heads * shape.head_dim * keys  # QK^T and AV
    vocab = 2 * shape.hidden_size * shape.vocab_size * logits_fraction
    base = sum(2 * a * b for a, b in shape.projections().values())
    lora = sum(
        2 * trainable.lora_r * (a + b)
        for name, (a, b) in shape.projections().items()
        if trainable.mode == "lora" and name in trainable.lora_targets
    )
    forward = shape.num_layers * (base + lora + attention_forward) + vocab

    trains_in_layers = trainable.mode == "full" or (trainable.mode == "lora" and bool(trainable.lora_targets))
    if trains_in_layers or trainable.trains_embeddings:
        # The gradient flows from the loss down to the lowest trainable parameter.
        activation_grads = shape.num_layers * (base + lora + 2 * attention_forward) + vocab
        if not trainable.trains_embeddings:  # the first layer's q, k, v read frozen embeddings
            activation_grads -= sum(
                2 * a * b for name, (a, b) in shape.projections().items() if name in ("q_proj", "k_proj", "v_proj")
            )
    else:
        activation_grads = 0.0  # at most lm_head trains: no gradient enters the layers
    weight_grads: float = shape.num_layers * (base if trainable.mode == "full" else lora)
    if trainable.trains_lm_head:
        weight_grads += vocab
    return Flops(forward=forward, backward=activation_grads + weight_grads)


# --- memory per device -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSetup:
    """How a stage trains: what the memory depends on besides the model and what trains."""

    precision: Literal["bf16", "fp32"] = "bf16"
    zero_stage: int = 2
    world_size: int = 1
    micro_batch: int = 8
    seq_len: int = 512
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # Share of positions that predict a label (SFT: the answers); the loss is computed there only.
    label_fraction: float = 1.0
    # A mask reaches attention (padded or packed batches): transformers then repeats k and v to
    # every query head for sdpa, and eager keeps the whole score matrix.
    masked: bool = False
    reduce_bucket_size: int = 200_000_000
    # On a CPU, dropout keeps its mask in the training dtype (CUDA's fused kernel: one byte).
    cpu: bool = False

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device. `weights`, `optimizer` and `gradients` are held through the whole step
    (`gradients` also counts the reduction buffers that live only while backward runs, for the
    table); `activations` are what autograd keeps for backward over a micro-batch (with gradient
    checkpointing: the layers' inputs plus one layer recomputed).

    The peak is the largest of three moments, because what is short-lived in one phase is gone in
    the next: the end of the forward pass (all activations, the loss's working set), the start of
    backward (all activations, the gradient buffers DeepSpeed allocates then, the first gradient),
    the optimizer step (the activations freed, the gradients flattened and cast to fp32)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    gradient_checkpointing: bool
    # The part of `gradients` not held through the forward pass (ZeRO-2: the reduce buckets, there
    # from the first gradient to the end of backward, and the gradient partition, from backward to
    # the step) and, of it, the buckets.
    short_lived_gradients: int = 0
    reduce_buckets: int = 0
    forward_transient: int = 0  # the loss computed in the forward pass (chla's chunked loss)
    backward_transient: int = 0  # the loss's backward and the first gradient, before it enters a bucket
    step_transient: int = 0  # the optimizer step: gradients flattened and cast to fp32

    @property
    def states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def _peak(self, activations: int) -> int:
        held = self.weights + self.optimizer + self.gradients - self.short_lived_gradients
        return held + max(
            activations + self.forward_transient,
            activations + self.reduce_buckets + self.backward_transient,
            self.step_transient,
        )

    @property
    def peak(self) -> int:
        return self._peak(self.activations_checkpointed if self.gradient_checkpointing else self.activations)

    @property
    def peak_without_checkpointing(self) -> int:
        return self._peak(self.activations)

    @property
    def peak_with_checkpointing(self) -> int:
        return self._peak(self.activations_checkpointed)


def training_memory(
    shape: ModelShape, trainable: Trainable, setup: TrainingSetup, *, chunked_loss: bool | None = None
) -> MemoryEstimate:
    """Bytes per device while a stage trains, as DeepSpeed and chla's trainer allocate them.

    Weights: every parameter in the training dtype, partitioned over the ranks under ZeRO-3 (plus
    the parameters gathered while in use). Gradients: the trainable parameters' in the training
    dtype (partitioned from ZeRO-2 on) and DeepSpeed's reduce buckets: ZeRO-3 allocates its bucket
    and its gradient partitions when it starts and keeps them; ZeRO-2 allocates its bucket when the
    first gradient arrives in backward and frees it at the end of backward, its partition of the
    gradients living on until the step. Optimizer: AdamW's two fp32 moments, plus an fp32 master
    copy of the trainable parameters whenever DeepSpeed keeps one (bf16, or any ZeRO stage),
    partitioned from ZeRO-2 on. Activations: `_layer_saved_bytes` per layer and token, the final
    norm, the loss's saved state. `chunked_loss`: chla's chunked vocabulary projection (its trainer
    uses it except under ZeRO-3, where it computes its gradients in forward), else transformers'
    loss over fp32 logits (its working set in backward)."""
    b, world = setup.dtype_bytes, setup.world_size
    total, trained = parameter_counts(shape, trainable)
    shards_from_2 = world if setup.zero_stage >= 2 else 1
    weights = b * total // (world if setup.zero_stage == 3 else 1)
    gradients = b * trained // shards_from_2
    reduce_buckets = short_lived_gradients = 0
    if setup.zero_stage == 2:
        # DeepSpeed's contiguous gradient bucket, allocated whole; two of them with overlap_comm (GPUs)
        reduce_buckets = b * setup.reduce_bucket_size * (1 if setup.cpu else 2)
        short_lived_gradients = gradients + reduce_buckets
        gradients += reduce_buckets
    elif setup.zero_stage == 3:
        gradients += b * (setup.reduce_bucket_size if setup.cpu else shape.hidden_size**2)
        # Parameters gathered while in use: one module at a time on CPUs (chla's zero3.json), up to
        # 1e9 kept for reuse between forward and backward on GPUs (chla's GPU settings).
        largest_module = max(shape.embedding_params, *(a * c for a, c in shape.projections().values()))
        weights += b * (largest_module if setup.cpu else min(total, 10**9))
    keeps_master = b == 2 or setup.zero_stage >= 2
    optimizer = (8 + 4 * keeps_master) * trained // shards_from_2
    # The step flattens the partition's gradients (a copy in the training dtype) and casts it to
    # fp32; under ZeRO-2 the partition itself exists only from backward to here.
    step_transient = (b + 4) * trained // shards_from_2 if keeps_master else 0
    step_transient += short_lived_gradients - reduce_buckets

    tokens = setup.tokens
    labels = int(tokens * setup.label_fraction)
    h, v = shape.hidden_size, shape.vocab_size
    layers = sum(
        _layer_saved_bytes(shape, trainable, setup, input_needs_grad=layer > 0 or trainable.trains_embeddings)
        for layer in range(shape.num_layers)
    )
    final_norm = FP32 * h + FP32 + (b * h if trainable.mode == "full" else 0)
    projection_input = b * h * labels if trainable.trains_lm_head else 0
    if chunked_loss is None:
        chunked_loss = setup.zero_stage != 3
    # The largest gradient autograd hands DeepSpeed at once, before DeepSpeed copies it into a bucket.
    first_gradient = b * (shape.embedding_params if trainable.trains_lm_head else 0)
    if chunked_loss:
        # Saved: the gradient for the hidden states and, when lm_head trains, for its weight (fp32).
        loss_saved = b * h * labels + (FP32 * v * h if trainable.trains_lm_head else 0)
        # One chunk's fp32 logits (softmax in place) and their gradient in the training dtype, and
        # the chunk's weight gradient before it is added to the fp32 sum.
        chunk_logits = 2**24 if setup.cpu else 2**27  # chla_train.token_loss.LOGITS_PER_CHUNK
        forward_transient = (FP32 + b) * min(labels, max(1, chunk_logits // v)) * v
        if trainable.trains_lm_head:
            forward_transient += (FP32 + b) * v * h
        # Backward scales the saved gradients by the incoming one: new tensors in the training dtype.
        backward_transient = b * h * labels + first_gradient
    else:
        # log_softmax keeps its fp32 output; its backward holds that, the incoming and the
        # outgoing fp32 gradient at once, then the cast back to the training dtype.
        loss_saved = FP32 * v * labels
        forward_transient = 0
        backward_transient = (2 * FP32 + b) * v * labels
    per_token_final = final_norm * tokens
    activations = layers * tokens + per_token_final + projection_input + loss_saved
    one_layer = _layer_saved_bytes(shape, trainable, setup, input_needs_grad=True)
    checkpointed = (shape.num_layers * b * h + one_layer) * tokens + per_token_final + projection_input + loss_saved
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        activations_checkpointed=checkpointed,
        gradient_checkpointing=setup.gradient_checkpointing,
        short_lived_gradients=short_lived_gradients,
        reduce_buckets=reduce_buckets,
        forward_transient=forward_transient,
        backward_transient=backward_transient,
        step_transient=step_transient,
    )


def _layer_saved_bytes(shape: ModelShape, trainable: Trainable, setup: TrainingSetup, *, input_needs_grad: bool) -> int:
    """Bytes per token that one transformers LLaMA decoder layer saves for backward.

    RMSNorm upcasts its input to fp32 and saves it, with 1/rms (the normalised output only when
    its own weight trains). A linear layer saves its input when its weight trains; a frozen one
    saves nothing. LoRA (PEFT) adds, per adapted layer: the dropout mask (when the layer's input
    needs a gradient) and the dropped-out input its A matrix saves (with no dropout, A saves the
    layer's input, shared with anyone else who does), and A's r outputs. sdpa/FlashAttention keep
    q, k, v, the output (which is also o_proj's input) and an fp32 log-sum-exp per head; when a
    mask reaches sdpa, k and v repeated to every query head and the mask made additive in the
    training dtype. Eager keeps q and the repeated k and v, the fp32 softmax and the probabilities
    in the training dtype over all keys. The MLP keeps gate's output, SiLU's output and up's."""
    b, h, i = setup.dtype_bytes, shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    full = trainable.mode == "full"
    lora = trainable.mode == "lora"
    dropout = trainable.lora_dropout > 0
    targets = set(trainable.lora_targets) if lora else set()
    inputs = {
        "q_proj": ("normed_1", h),
        "k_proj": ("normed_1", h),
        "v_proj": ("normed_1", h),
        "o_proj": ("attention_out", q),
        "gate_proj": ("normed_2", h),
        "up_proj": ("normed_2", h),
        "down_proj": ("product", i),
    }
    saved = 0
    shared_inputs: dict[str, int] = {}
    for name, (source, width) in inputs.items():
        needs_grad = input_needs_grad or name not in ("q_proj", "k_proj", "v_proj")
        if full:
            shared_inputs[source] = b * width
        if name in targets:
            if dropout:
                saved += b * width + ((b if setup.cpu else MASK) * width if needs_grad else 0)
            else:
                shared_inputs[source] = b * width
            saved += b * trainable.lora_r
    if setup.attention != "eager":
        shared_inputs.pop("attention_out", None)  # o_proj's input is the output attention keeps
    saved += sum(shared_inputs.values())
    norms = 2 * (FP32 * h + FP32 + (b * h if full else 0))
    if not input_needs_grad:
        norms -= FP32 * h + FP32  # the first norm's input needs no gradient
    attention_kv = q if (setup.masked and kv < q) else kv
    if setup.attention == "eager":
        scores = shape.num_heads * setup.seq_len  # per query token: one row of scores per head
        attention = 3 * b * q + FP32 * scores + (b * scores if b != FP32 else 0)  # q, k, v repeated
    else:
        attention = b * (q + 2 * attention_kv + q) + FP32 * shape.num_heads
        if setup.masked:  # sdpa turns a boolean mask into an additive one in the dtype, per layer
            attention += b * setup.seq_len
    mlp = 3 * b * i
    return saved + norms + attention + mlp
