"""The training stages end to end on tiny models: embeddings-only bitwise, 2 ranks vs 1 rank,
bitwise resume after two preemptions, SFT, bad inputs. Runs go through harness.py in
subprocesses (one per rank), as the local executor starts them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ..helpers import TINY_LLAMA
from .launch import launch

PROBE = [[1, 400, 31000, 32100, 5, 77, 33000, 12], [1, 9, 8, 7, 6, 5, 4, 3]]


def pretrain_params(assets, **overrides):
    params = {
        "tokenizer": assets["merged_tokenizer"],
        "corpus": assets["corpus"],
        "init": TINY_LLAMA,
        "block_size": 64,
        "valid_count": 16,
        "micro_batch_size": 4,
        "max_steps": 8,
        "save_steps": 0,
        "eval_steps": 4,
        "logging_steps": 1,
        "precision": "fp32",
        "learning_rate": 1e-2,
        "seed": 7,
    }
    params.update(overrides)
    return params


def reference_model(tokenizer_dir: str, init=TINY_LLAMA, seed: int = 7):
    """The model a stage starts from, rebuilt the same way (same seed, same resize)."""
    from chla_train import model as models

    tokenizer = models.load_tokenizer(tokenizer_dir)
    model = models.build_base_model(None, init, dtype=torch.float32, attn_implementation="sdpa", seed=seed)
    base_rows = models.resize_to_tokenizer(
        model,
        len(tokenizer),
        new_row_init="subtoken_mean",
        max_vocab_growth=4,
        where="test",
        tokenizer_dir=tokenizer_dir,
        seed=seed,
    )
    return model, base_rows


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / "out" / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "train" / "out" / "train_summary.json").read_text())


# --- must-show 1 -------------------------------------------------------------------------------


@pytest.mark.slow
def test_embeddings_new_rows_only_leaves_base_rows_bitwise_unchanged(train_assets, tmp_path):
    from safetensors.torch import load_file

    params = pretrain_params(train_assets, mode="embeddings", new_rows_only=True, train_lm_head=True, weight_decay=0.1)
    launch({"kind": "pretrain", "run_dir": str(tmp_path), "params": params})

    before, base_rows = reference_model(train_assets["merged_tokenizer"])
    assert base_rows == 32000
    after = load_file(str(tmp_path / "train" / "out" / "model" / "model.safetensors"))
    reference = before.state_dict()
    assert set(after) == set(reference)
    for name, tensor in reference.items():
        saved = after[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(saved[:base_rows], tensor[:base_rows]), f"{name}: a base row changed"
            changed_rows = (saved[base_rows:] != tensor[base_rows:]).any(dim=1)
            assert changed_rows.float().mean() > 0.9, f"{name}: only {int(changed_rows.sum())} new rows moved"
        else:
            assert torch.equal(saved, tensor), f"{name} changed but must be frozen"
    record = summary(tmp_path)
    assert record["trainable_params"] == 2 * (len(after["lm_head.weight"]) - base_rows) * TINY_LLAMA["hidden_size"]
    # The saved model is a stock HF directory with the tokenizer beside it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "train" / "out" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "train" / "out" / "model")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 33217


# --- must-show 2 -------------------------------------------------------------------------------


def _lora_run(assets, run_dir: Path, world_size: int, zero_stage: int = 2, model_dir: Path | None = None):
    # Same global batch (4): 1 rank x 4 sequences, or 2 ranks x 2. Dropout off: masks are drawn
    # per rank, so with dropout the two runs would differ by design, not by a bug.
    params = pretrain_params(
        assets,
        mode="lora",
        micro_batch_size=4 // world_size,
        lora_dropout=0.0,
        zero_stage=zero_stage,
        learning_rate=2e-3,
    )
    if model_dir is not None:  # the same model, saved: loaded from its files instead of built
        params.pop("init")
        params["model"] = str(model_dir)
    launch(
        {
            "kind": "pretrain",
            "run_dir": str(run_dir),
            "params": params,
            "probe_ids": PROBE,
            "probe_out": str(run_dir / "probe_logits.pt"),
        },
        world_size=world_size,
    )


def _check_adapter_reloads(assets, run_dir: Path) -> None:
    """Stock PEFT loads the adapter; its logits equal the in-training model's."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoTokenizer

    adapter = run_dir / "train" / "out" / "adapter"
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        assert all(handle.get_slice(n).get_shape() and 0 not in handle.get_slice(n).get_shape() for n in names)
    assert sum("lora_A" in n for n in names) == 2 * 7  # 2 layers x 7 target projections
    assert any("embed_tokens" in n for n in names) and any("lm_head" in n for n in names)
    base, _ = reference_model(assets["merged_tokenizer"])
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE)).logits
    trained = torch.load(run_dir / "probe_logits.pt")
    torch.testing.assert_close(logits, trained, rtol=0, atol=1e-5)
    assert len(AutoTokenizer.from_pretrained(adapter)) == 33217


@pytest.mark.slow
def test_two_rank_zero2_lora_matches_one_rank_and_adapter_reloads(train_assets, tmp_path):
    _lora_run(train_assets, tmp_path / "one", 1)
    _lora_run(train_assets, tmp_path / "two", 2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert two[1]["global_batch"] == one[1]["global_batch"] == 4
    # Stated tolerance: 1e-4 absolute on every logged training and validation loss (seen: ~1e-6,
    # the difference is only the summation order of the gloo all-reduce).
    for a, b in zip(one, two):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (a, b)
    assert one[-1]["eval_loss"] < one[0]["eval_loss"]  # it learns
    assert summary(tmp_path / "one")["tokens_seen"] == summary(tmp_path / "two")["tokens_seen"]
    _check_adapter_reloads(train_assets, tmp_path / "one")
    _check_adapter_reloads(train_assets, tmp_path / "two")


@pytest.mark.slow
def test_zero3_adapter_is_complete_and_reloads(train_assets, tmp_path):
    """The original project's bug: under ZeRO-3 the saved adapter held empty partitions. The base
    model comes from a checkpoint, so it is loaded partitioned (each rank reads its own slices):
    the logits of the trained model equal those of the seed-7 model plus the reloaded adapter
    only if every slice landed where it belongs."""
    from chla_train import model as models

    checkpoint = tmp_path / "base"
    models.build_base_model(None, TINY_LLAMA, dtype=torch.float32, attn_implementation="sdpa", seed=7).save_pretrained(
        checkpoint
    )
    _lora_run(train_assets, tmp_path, 2, zero_stage=3, model_dir=checkpoint)
    _check_adapter_reloads(train_assets, tmp_path)
    logs = "".join(p.read_text() for p in tmp_path.glob("spec-*-rank*.log"))
    assert "partitioned" in logs  # the stage said how it loaded


# --- must-show 3 -------------------------------------------------------------------------------


def submit_local(work: Path, params: dict, *, ranks: int = 1) -> subprocess.Popen:
    """`chla-submit` of a one-stage pretrain recipe with the local executor, in the background."""
    work.mkdir(parents=True, exist_ok=True)
    recipe = {
        "name": "t",
        "resources": {"cpus_per_task": 1},
        "stages": {"train": {"kind": "pretrain", "resources": {"tasks_per_node": ranks}, "params": params}},
    }
    (work / "r.yaml").write_text(json.dumps(recipe))
    return subprocess.Popen(
        [sys.executable, "-m", "chla_launcher", "submit", "r.yaml", "--executor", "local"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def logged_steps(work_dir: Path) -> list[int]:
    path = work_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


def rank_processes(executor: subprocess.Popen, ranks: int, timeout: float = 60) -> list:
    """The job entry processes of the current attempt, by rank."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for child in psutil.Process(executor.pid).children():
            try:
                if "chla_train.entry" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                    found[int(child.environ()["RANK"])] = child
            except (psutil.NoSuchProcess, KeyError):
                continue
        if len(found) == ranks:
            return [found[r] for r in range(ranks)]
        time.sleep(0.1)
    raise AssertionError(f"{ranks} rank processes did not start")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_twice_preempted_run_ends_bitwise_equal_to_uninterrupted(train_assets, tmp_path):
    """SIGTERM, as Slurm preempts, to the rank processes of a local run: first to rank 1 only (the
    flag must reach rank 0 through the all-reduce), then to both at different moments. Between the
    attempts a torn line is left at the end of metrics.jsonl, as a kill mid-append leaves it."""
    import psutil
    from safetensors.torch import load_file

    # LoRA dropout on, so the restored RNG state matters.
    params = pretrain_params(
        train_assets,
        mode="lora",
        micro_batch_size=1,
        max_steps=40,
        save_steps=0,
        lora_dropout=0.05,
        learning_rate=2e-3,
        eval_steps=10,
    )
    straight = submit_local(tmp_path / "straight", params, ranks=2)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    executor = submit_local(tmp_path / "interrupted", params, ranks=2)
    run_dir = tmp_path / "interrupted" / "runs" / "t"
    work = run_dir / "train" / "work"
    reached = []  # the last step each preempted attempt logged
    for targets in ([1], [1, 0]):
        ranks = rank_processes(executor, 2)
        resumed = max(reached, default=0)
        wait_until(lambda resumed=resumed: max(logged_steps(work), default=0) >= resumed + 5, 120, "training steps")
        os.kill(executor.pid, signal.SIGSTOP)  # hold the requeue until the torn line is written
        for rank in targets:
            ranks[rank].send_signal(signal.SIGTERM)
            time.sleep(0.2)
        wait_until(lambda ranks=ranks: all(p.status() == psutil.STATUS_ZOMBIE for p in ranks), 60, "the ranks to exit")
        reached.append(max(logged_steps(work)))
        with open(work / "metrics.jsonl", "a") as handle:
            handle.write('{"step": 99, "loss": 1.23')  # torn: no closing brace, no newline
        os.kill(executor.pid, signal.SIGCONT)
    output, _ = executor.communicate(timeout=300)
    assert executor.returncode == 0, output
    assert output.count("train: requeued") == 2, output

    a = load_file(str(tmp_path / "straight" / "runs" / "t" / "train" / "out" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "train" / "out" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    s_a, s_b = summary(tmp_path / "straight" / "runs" / "t"), summary(run_dir)
    # Each attempt saved the step it had reached: not one optimizer step of work was lost.
    assert s_b["resumed_from_steps"] == reached, (s_b["resumed_from_steps"], reached)
    assert s_a["tokens_seen"] == s_b["tokens_seen"] == 40 * 2 * 64
    assert s_a["samples_seen"] == s_b["samples_seen"] == 80

    # Every step once, each with the same loss: the same samples, none lost or repeated.
    def curve(run: Path) -> list[tuple]:
        return [tuple(r.get(k) for k in ("step", "loss", "lr", "grad_norm", "eval_loss")) for r in metrics(run)]

    assert curve(run_dir) == curve(tmp_path / "straight" / "runs" / "t")
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, 41))
    # Checkpoints: step-N directories only (no temporaries), the last keep_last=2 kept, and every
    # RNG file readable without unpickling code.
    checkpoints = sorted(p.name for p in (work / "checkpoints").iterdir())
    assert checkpoints == sorted(f"step-{n}" for n in reached), checkpoints
    for rng_file in (work / "checkpoints").glob("*/rng_rank*.pt"):
        assert torch.load(rng_file, weights_only=True)["torch"].dtype == torch.uint8

    # The run's loss curves in one PNG.
    from chla_tools.train_report import train_report

    png = train_report(run_dir)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- must-show 4 -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_lowers_validation_loss_and_adapter_reloads_with_pad(train_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    params = {
        "tokenizer": train_assets["base_tokenizer"],
        "init": TINY_LLAMA,
        "train_file": train_assets["sft_train"],
        "valid_file": train_assets["sft_valid"],
        "max_seq_length": 128,
        "micro_batch_size": 4,
        "max_steps": 20,
        "eval_steps": 20,
        "logging_steps": 5,
        "save_steps": 0,
        "precision": "fp32",
        "learning_rate": 1e-2,
        "seed": 3,
    }
    launch({"kind": "sft", "run_dir": str(tmp_path), "params": params})
    record = summary(tmp_path)
    assert record["eval_loss"] < record["first_eval_loss"] - 0.5, record
    adapter = tmp_path / "train" / "out" / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == 32000 and len(tokenizer) == 32001
    base, _ = reference_model(str(adapter), seed=3)  # resized to the saved tokenizer, pad included
    model = PeftModel.from_pretrained(base, str(adapter))
    batch = tokenizer(["判断情感：很好", "差"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape[-1] == 32001


# --- must-show 6 -------------------------------------------------------------------------------


def _run_expecting_error(kind: str, params: dict, tmp_path: Path) -> str:
    import torch.distributed as dist

    from chla_launcher.contract.errors import ChlaError

    from .harness import make_context, run_stage

    ctx = make_context(kind, params, tmp_path)
    with pytest.raises(ChlaError) as caught:
        run_stage(ctx)
    message = str(caught.value)
    assert "\n" not in message and message
    assert not dist.is_initialized()  # failed before DeepSpeed started, so before any step
    assert not list(ctx.work_dir.glob("checkpoints/*"))
    return message


def test_bad_inputs_fail_with_one_line_before_training(train_assets, tmp_path):
    # A tokenizer far larger than the model: 33,220 tokens for a 1,000-row model.
    message = _run_expecting_error(
        "pretrain", pretrain_params(train_assets, init=dict(TINY_LLAMA, vocab_size=1000)), tmp_path / "big"
    )
    assert "33217" in message and "max_vocab_growth" in message

    # A LoRA target that the model does not have.
    message = _run_expecting_error(
        "pretrain", pretrain_params(train_assets, lora_target_modules=["q_proj", "query_key_value"]), tmp_path / "t"
    )
    assert "query_key_value" in message and "lora_target_modules" in message

    # A base directory with config.json but no weights.
    from transformers import LlamaConfig

    empty_base = tmp_path / "base-without-weights"
    LlamaConfig(**TINY_LLAMA).save_pretrained(empty_base)
    params = pretrain_params(train_assets)
    params.pop("init")
    message = _run_expecting_error("pretrain", dict(params, model=str(empty_base)), tmp_path / "w")
    assert "no weights" in message and str(empty_base) in message

    # An adapter trained on a different base (hidden size 8, not 16).
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    other = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**dict(TINY_LLAMA, hidden_size=8))),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    other.save_pretrained(tmp_path / "other-adapter")
    message = _run_expecting_error(
        "pretrain", pretrain_params(train_assets, init_adapter=str(tmp_path / "other-adapter")), tmp_path / "a"
    )
    assert "different base" in message and "init_adapter" in message


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    """A kill mid-append (or a full disk) leaves half a line at the end of metrics.jsonl; the next
    attempt keeps the records up to its checkpoint and logs on."""
    from chla_train.metrics import MetricsLog

    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')
    log = MetricsLog(tmp_path, enabled=True, resume_step=4)
    log.write({"step": 5, "loss": 0.5})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["loss"] == 0.5


def test_only_checkpoints_of_the_same_fingerprint_are_resumed(tmp_path):
    """A checkpoint written under other parameters of the stage (another fingerprint), or one that
    does not say which (written before checkpoints carried it), is never resumed."""
    from chla_train.checkpoint import same_run

    for name, state in (
        ("mine", {"step": 4, "fingerprint": "abc"}),
        ("other", {"step": 4, "fingerprint": "xyz"}),
        ("unlabelled", {"step": 4}),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(state))
    assert same_run(tmp_path / "mine", "abc")
    assert not same_run(tmp_path / "other", "abc")
    assert not same_run(tmp_path / "unlabelled", "abc")
