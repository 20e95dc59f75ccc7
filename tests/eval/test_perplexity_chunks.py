"""Perplexity from hidden states with the vocabulary projection a chunk of positions at a time:
the numbers of the whole-logits computation it replaced, without a batch x block x vocabulary
fp32 tensor, and an evaluation that reports its progress (log lines and the stage's progress file)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from chla_launcher.contract.kinds.evaluate import EvaluateParams  # noqa: E402
from chla_launcher.contract.progress import read_progress  # noqa: E402
from chla_tools import evaluate as evaluation  # noqa: E402
from chla_tools.inference import encode  # noqa: E402
from chla_train.stages import evaluate as evaluate_stage  # noqa: E402


def whole_logits_sums(model, tokenizer, lines: list[str], *, block: int, batch_size: int) -> float:
    """The nll of perplexity_sums as it was computed before: every batch's logits whole, in fp32."""
    import torch.nn.functional as F

    windows = []
    for line in lines:
        ids = encode(tokenizer, line)
        windows += [ids[start : start + block] for start in range(0, max(len(ids) - 1, 1), block - 1)]
    nll = 0.0
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        width = max(len(w) for w in batch)
        input_ids = torch.tensor([w + [0] * (width - len(w)) for w in batch])
        mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in batch])
        labels = input_ids.masked_fill(mask == 0, -100)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
        ).view(len(batch), -1)
        nll += sum(losses.double().sum(dim=1).tolist())
    return nll


class LargestTensor(TorchDispatchMode):
    """The largest tensor (bytes) any operation produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())
        return out


@pytest.fixture(scope="module")
def large_vocabulary_model(demo_assets):
    """A 1-layer LLaMA over the demo's 32,000-piece tokenizer: the logits dwarf the model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chla_train.model_config import llama_config

    tokenizer = AutoTokenizer.from_pretrained(demo_assets["base_tokenizer"])
    settings = llama_config(vocab=len(tokenizer), hidden=16, intermediate=32, layers=1, heads=2, positions=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings, tie_word_embeddings=False)).eval()
    lines = [line for line in Path(demo_assets["zh_heldout"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    return model, tokenizer, lines[:6] + ["".join(lines[:4])]  # the last one spans several windows


def test_chunked_perplexity_equals_the_whole_logits_computation(large_vocabulary_model, monkeypatch):
    model, tokenizer, lines = large_vocabulary_model
    block, batch_size = 64, 4
    # 7 positions a chunk (raising=False: the same test runs against the code before chunking)
    monkeypatch.setattr(evaluation, "LOGITS_PER_CHUNK", {"cpu": 7 * len(tokenizer)}, raising=False)
    with LargestTensor() as chunked_peak:
        sums = evaluation.perplexity_sums(model, tokenizer, lines, block=block, batch_size=batch_size)
    with LargestTensor() as whole_peak:
        reference = whole_logits_sums(model, tokenizer, lines, block=block, batch_size=batch_size)
    assert sums["tokens"] == sum(len(encode(tokenizer, line)) - 1 for line in lines) > 7 * batch_size
    assert math.isclose(sums["nll"], reference, rel_tol=1e-6)
    # The largest tensor: one chunk's fp32 logits or the lm_head matrix (views of it count), not
    # a batch's logits (4 x 64 x 32,000 x 4 B = 33 MB).
    head_bytes = model.lm_head.weight.numel() * 4
    assert chunked_peak.bytes <= max(7 * len(tokenizer) * 4, head_bytes) < whole_peak.bytes / 10
    # Control: the projection doubled (exactly undone after) gives other numbers.
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    try:
        sharper = evaluation.perplexity_sums(model, tokenizer, lines, block=block, batch_size=batch_size)
    finally:
        with torch.no_grad():
            model.lm_head.weight.div_(2)
    assert sharper["tokens"] == sums["tokens"]
    assert not math.isclose(sharper["nll"], sums["nll"], rel_tol=1e-4)


def test_evaluation_reports_its_progress(large_vocabulary_model, tmp_path, monkeypatch):
    """The stage writes the shard's items done to its progress file (what `chla status` and the
    local executor's bars read) and, at intervals, a log line."""
    model, tokenizer, lines = large_vocabulary_model
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    monkeypatch.setattr(evaluation, "PROGRESS_LOG_INTERVAL_S", 0.0)
    messages: list[str] = []
    stage_dir = tmp_path / "eval"
    params = EvaluateParams(model=str(model_dir), ppl=[str(text)], batch_size=2, block_size=64)
    ctx = SimpleNamespace(
        params=params,
        out_dir=stage_dir / "out",
        task_index=1,
        num_tasks=2,
        log=messages.append,
        stage="eval",
        stage_dir=stage_dir,
        dist=SimpleNamespace(rank=0),
    )
    seen: list[tuple[int, int]] = []
    keep = evaluation.ShardProgress.at

    def record(self, done, label):
        seen.append((done, self.total))
        keep(self, done, label)

    monkeypatch.setattr(evaluation.ShardProgress, "at", record)
    evaluate_stage.run(ctx)
    mine = len(evaluation.shard_of(lines, 1, 2))
    [task] = read_progress(stage_dir)
    assert (task.task, task.unit, task.done, task.total) == (1, "items", mine, mine)
    assert task.describe().startswith(f"items {mine}/{mine}")
    # Updated within the source (a batch at a time), not only at its end.
    assert 0 < len([done for done, _ in seen if 0 < done < mine])
    assert any(f"/{mine} items of shard-00001-of-00002 done" in message for message in messages)
