"""The training loss: the summed cross-entropy of the label tokens, with the vocabulary projection
done a chunk of positions at a time and differentiated on the spot, so the logits never exist whole.

transformers' causal-LM loss projects every position onto the vocabulary, upcasts the logits to
fp32 and takes log_softmax; backward then builds a dense fp32 gradient of the same size and casts
it back. For a micro-batch of 8 x 512 tokens and 32,000 tokens of vocabulary that is a 262 MB
bf16 tensor and four 524 MB fp32 ones, streamed through memory several times: on a CPU the loss
took longer than the whole model (and at 7B, micro-batch 8 and 49,954 tokens, ~3 GB of GPU memory).
Here each chunk of positions is projected, its loss and its gradients with respect to the hidden
states and the projection weight computed at once from softmax minus one-hot, and its logits
dropped. The arithmetic is transformers' own (logits in the model's dtype, softmax in fp32, the
gradient cast back to the model's dtype before the two matmuls), so the loss and the gradients
are the same up to summation order; tests/train/test_token_loss.py compares them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Positions x vocabulary entries of one chunk's fp32 logits. On a CPU, 2^24 (64 MB): smaller chunks
# spend more time adding each chunk's weight gradient (measured on the 8 x 512 x 32,000 loss: 2^20
# 0.92 s, 2^22 0.62 s, 2^24 0.58 s, 2^25 0.56 s); a GPU wants large matmuls and has the memory for
# 2^27 (512 MB: a micro-batch of 8 x 512 tokens and 32,000 entries in two chunks).
LOGITS_PER_CHUNK = {"cpu": 2**24, "cuda": 2**27}


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i CE(hidden[i] @ weight.T, targets[i]); hidden [n, h], weight [vocab, h], targets
    [n], target_weights [n] (fp32; None: every w_i is 1)."""

    @classmethod
    def apply(
        cls,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        target_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # forward runs with grad mode off and its needs_input_grad follows requires_grad alone, so
        # the caller's grad mode is read here: under torch.no_grad() (validation) a trainable
        # lm_head would otherwise get a vocabulary x hidden fp32 gradient filled on every batch
        # (0.8 GB at 7B and 49,954 tokens) that nothing reads.
        return super().apply(hidden, weight, targets, target_weights, torch.is_grad_enabled())

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        target_weights: torch.Tensor | None = None,
        grad_enabled: bool = True,
    ) -> torch.Tensor:
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        want_weight = grad_enabled and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = max(1, LOGITS_PER_CHUNK.get(hidden.device.type, 2**22) // weight.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            piece, target = hidden[start : start + chunk], targets[start : start + chunk]
            scale = None if target_weights is None else target_weights[start : start + chunk]
            logits = (piece @ weight.T).float()
            # log-sum-exp and softmax from one exp pass, in place (the logits are not needed after)
            top = logits.amax(dim=1, keepdim=True)
            target_logits = logits.gather(1, target[:, None]).squeeze(1)
            exps = logits.sub_(top).exp_()
            sums = exps.sum(dim=1)
            losses = sums.log() + top.squeeze(1) - target_logits
            loss += (losses if scale is None else losses * scale).sum()
            if want_hidden or want_weight:
                # d loss / d logits = softmax - one-hot: computed in fp32, then in the model's dtype
                rows = torch.arange(len(target), device=exps.device)
                at_target = exps[rows, target] / sums - 1.0
                divisor = sums if scale is None else sums / scale  # a row's gradient scales with its weight
                if hidden.dtype == torch.float32:
                    grad_logits = exps.div_(divisor[:, None])
                else:  # the division writes the cast result: one pass instead of two
                    grad_logits = torch.div(exps, divisor[:, None], out=torch.empty_like(exps, dtype=hidden.dtype))
                if scale is not None:
                    at_target = at_target * scale
                grad_logits[rows, target] = at_target.to(hidden.dtype)
                if grad_hidden is not None:
                    torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk])
                if grad_weight is not None:
                    if grad_weight.dtype == grad_logits.dtype:
                        grad_weight.addmm_(grad_logits.T, piece)
                    else:
                        grad_weight += (grad_logits.T @ piece).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def projection_weight(module: nn.Module) -> torch.Tensor | None:
    """The [vocab, hidden] weight an output layer multiplies by, or None when it is not a plain
    bias-free projection (then the caller lets the layer compute its logits itself)."""
    if isinstance(module, nn.Linear):
        return module.weight if module.bias is None else None
    base, new = getattr(module, "base_weight", None), getattr(module, "new_weight", None)
    if isinstance(base, torch.Tensor) and isinstance(new, torch.Tensor):  # chla_train.model.NewRowsLinear
        return torch.cat([base, new], dim=0)
    return None


def computing_layer(output_embeddings: nn.Module) -> nn.Module:
    """The module that really projects: PEFT's modules_to_save wrapper delegates to its active copy."""
    copies = getattr(output_embeddings, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict):
        active = getattr(output_embeddings, "active_adapters", [])
        if len(active) == 1 and active[0] in copies:
            return copies[active[0]]
    return output_embeddings
