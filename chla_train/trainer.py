"""The training loop of the `pretrain` and `sft` stages (step 3 of chla_train.training_workflow): a
lean loop over a DeepSpeed engine.

Why not HF Trainer: the stages need three things Trainer makes hard, and the loop is ~200 lines.
1. Bitwise-exact resume after preemption. Trainer resumes by replaying (skipping) batches of a
   re-seeded dataloader and restores RNG state at epoch granularity; here the data position is
   one integer in the checkpoint (chla_tools.blocks.ResumableSampler), RNG states are saved per
   rank at the optimizer step, and the test shows an interrupted run ends with the same weights.
2. Cooperative preemption: the stop signal (Slurm's SIGTERM when it preempts, USR2 before the
   time limit) only sets a flag; at each optimizer step the flag is all-reduced (so every rank
   agrees, whichever ranks got the signal), a checkpoint is written and the job requeues itself
   (chla_train.preemption). Trainer has no hook at that point that all ranks reach together.
3. Correct loss across micro-batches and ranks: the loss of an optimizer step is the sum of token
   losses over the whole global batch divided by its number of label tokens (counted before the
   forward passes and all-reduced), so 1 rank x 4 micro-batches and 2 ranks x 2 give the same
   gradient, also for SFT's variable-length answers.
Plus: checkpoints contain only trainable weights (a LoRA checkpoint of a 7B model is MBs, not
13 GB), and adapters are gathered from all ZeRO-3 partitions before saving (the original's empty
adapters came from saving the partitioned placeholders).

DeepSpeed 0.19 behaviour this relies on, measured on 2-core CPU machines with an empty
~/.cache/torch_extensions: no "optimizer" block in the config (that JIT-compiles fused_adam for
~41 s; time `deepspeed.initialize` with and without one to see it): we build torch.optim.AdamW and
hand it over; fp16 is not offered (on CPU DeepSpeed rejects it: "Type fp16 is not supported on your
device"); gloo is used on CPU by itself. The shared-memory allreduce op is switched off: DeepSpeed
only uses it for inference all-reduce, it costs a 20-40 s JIT build, and with it loaded ~15% of
2-rank runs aborted at interpreter exit (SIGABRT after training finished; 0 in 30 runs with it
off: `tests/train/test_training.py` runs 2-rank jobs).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.progress import progress_writer
from chla_train import checkpoint as checkpoints
from chla_train import tracking
from chla_train.deepspeed_import import import_deepspeed
from chla_train.distributed import local_cuda_device
from chla_train.layer_compile import choose_compile, compile_decoder_layers
from chla_train.metrics import MetricsLog, peak_memory_mb
from chla_train.model import full_shape
from chla_train.packed_attention import packed_attention_inputs
from chla_train.token_loss import ChunkedLinearCrossEntropy, computing_layer, projection_weight

Collate = Callable[[list[Any]], dict[str, np.ndarray]]
T = TypeVar("T")


@dataclass
class TrainData:
    train_set: Any  # indexable: train_set[i] -> item for `collate`
    train_indices: Sequence[int] | np.ndarray
    valid_set: Any
    valid_indices: Sequence[int] | np.ndarray
    collate: Collate
    # per-item lengths of train_set, for length-grouped batches (None: plain shuffle)
    train_lengths: np.ndarray | None = None
    # False: read train_indices in order, every epoch (a blend is already interleaved and shuffled)
    shuffle: bool = True
    # The optimizer steps a blend was built for (its length is steps x global batch, num_epochs
    # already counted in): the trainer runs exactly these, one pass over the blend. None: the
    # steps of num_epochs passes over train_indices, or max_steps (`total_steps`).
    steps: int | None = None


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    samples_seen: int
    train_loss: float | None
    eval_loss: float | None
    first_eval_loss: float | None
    global_batch: int
    elapsed_s: float
    tokens_per_s: float
    resumed_from: list[int] = field(default_factory=list)


def init_distributed(ctx) -> None:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU) from ctx.dist's env.

    Rank 0's TCPStore binds MASTER_PORT. A process that is alone takes the first free port; in a
    group the port is fixed (every rank derived it alone), so rank 0 checks it is free and otherwise
    stops with one line naming the port, instead of a rendezvous that waits for its timeout."""
    import dataclasses

    import_deepspeed()
    import deepspeed
    import deepspeed.ops

    from chla_train.distributed import free_master_port, require_port_free

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see module docstring
    if not dist.is_initialized():
        if ctx.dist.world_size == 1:
            ctx.dist = dataclasses.replace(ctx.dist, master_port=free_master_port(os.getpid()))
        elif ctx.dist.rank == 0:
            require_port_free(ctx.dist.master_port, f"stage {ctx.stage}")
    ctx.dist.export()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_cuda_device(torch.cuda.device_count()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def rank_zero_first(ctx, work: Callable[[], T]) -> T:
    """`work` on rank 0, then on the other ranks, which find its result in a cache it wrote: data
    every rank needs is prepared once per stage, not once per rank (at 64 nodes x 8 GPUs, 512
    tokenizations into 512 caches). A failure on rank 0 is raised on every rank with rank 0's
    message, so none waits for a cache that will not come. One rank: just `work`, without
    starting torch.distributed (a bad input then fails before anything distributed starts)."""
    if ctx.dist.world_size == 1:
        return work()
    init_distributed(ctx)
    outcome: list[str | None] = [None]
    if ctx.dist.rank == 0:
        try:
            result = work()
        except BaseException as error:
            outcome[0] = str(error) if isinstance(error, ChlaError) else f"rank 0 failed: {error!r}"
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise ChlaError(outcome[0])
    return result if ctx.dist.rank == 0 else work()


def deepspeed_config(
    params, *, dtype: torch.dtype, world_size: int, hidden_size: int, on_gpu: bool | None = None
) -> dict[str, Any]:
    """The DeepSpeed config of a training stage: its ZeRO stage's file, the batch, the precision,
    and on GPUs the communication settings of `gpu_zero_settings`."""
    text = resources.files("chla_train").joinpath(f"deepspeed_configs/zero{params.zero_stage}.json").read_text()
    config = json.loads(text)
    config.update(
        train_micro_batch_size_per_gpu=params.micro_batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        train_batch_size=params.micro_batch_size * params.gradient_accumulation_steps * world_size,
        gradient_clipping=params.max_grad_norm,
        bf16={"enabled": dtype == torch.bfloat16},
        zero_allow_untested_optimizer=True,
    )
    if torch.cuda.is_available() if on_gpu is None else on_gpu:
        config["zero_optimization"].update(gpu_zero_settings(params.zero_stage, hidden_size))
    return config


def gpu_zero_settings(zero_stage: int, hidden_size: int) -> dict[str, Any]:
    """What changes on GPUs: gradient reduction (ZeRO-2, 3) and parameter gathering (ZeRO-3)
    overlapped with the backward pass on NCCL's own CUDA streams. On CPU, gloo runs on the cores
    that compute, so there is nothing to overlap with: the files keep it off, and zero3.json gathers
    each layer's parameters only while it runs (no prefetch, no parameters kept for reuse), so a
    rank holds its partition and one layer. ZeRO-2 keeps its 2e8-element buckets: with overlap_comm
    DeepSpeed holds ~4.5x the bucket size in buffers (its docs), 1.8 GB in bf16 (DeepSpeed's default
    of 5e8 would hold 4.5 GB). ZeRO-3's sizes follow the hidden size, as HF Trainer's "auto" values
    do: reduce in hidden^2 buckets, prefetch 0.9x that, keep parameters under 10 x hidden (norms,
    biases) whole on every GPU, and up to 1e9 gathered parameters (2 GB in bf16) alive for reuse
    between the forward and the backward pass (DeepSpeed's defaults)."""
    if zero_stage == 2:
        return {"overlap_comm": True}
    if zero_stage == 3:
        return {
            "overlap_comm": True,
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
        }
    return {}


def parameters_in_training_dtype(model, dtype: torch.dtype) -> None:
    """Cast the parameters a ZeRO-3 partitioned model gained after loading (PEFT's adapters) to
    the training dtype. DeepSpeed casts every parameter of a model to bf16 when it starts, except
    in a model built under zero.Init, whose partitions were made in that dtype: it left the rest
    as they were, and PEFT makes adapters fp32 (get_peft_model's autocast_adapter_dtype). With
    modules_to_save (bf16 copies of partitioned modules) beside them, DeepSpeed's ZeRO-3 optimizer
    then stopped at its start (defragment: one dtype per group); without, the adapters trained in
    fp32 on a partitioned base and in bf16 on a base loaded whole, and each cast its input to fp32,
    a copy autograd kept for the backward pass: two ranks training LoRA r 8 on a 0.94B bf16 model
    peaked at 0.87x the model's bytes above the RSS before the stage, 0.78x with the adapters in
    bf16 (benchmarks/sharded_loading.py). fp32 training: nothing to cast (DeepSpeed casts none)."""
    if dtype == torch.float32:
        return
    for parameter in model.parameters():
        if not hasattr(parameter, "ds_id") and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def build_optimizer(model, params) -> torch.optim.Optimizer:
    # No weight decay on 1-D parameters (norm weights, biases), as HF Trainer does. With
    # `embedding_learning_rate`, the trainable parts of embed_tokens and lm_head (full copies, new
    # rows or trainable token rows) get a learning rate of their own: in SFT they are the parts
    # that most easily undo what pretraining taught, because every token's row moves. With
    # `loraplus_lr_ratio` (LoRA+, Hayou et al. 2024), the LoRA B matrices learn that many times
    # faster than the A matrices: the paper shows one rate for both learns features inefficiently
    # in wide layers. A LoRA B inside embed_tokens/lm_head keeps the vocabulary's rate.
    # `embedding_adam_epsilon` gives those vocabulary parts Adam's epsilon of their own (see its
    # description: the unused rows of a vocabulary extension stay still).
    own_vocabulary_group = params.embedding_learning_rate is not None or params.embedding_adam_epsilon is not None
    vocabulary = vocabulary_parameter_ids(model) if own_vocabulary_group else set()
    lora_b = lora_b_parameter_ids(model) if params.loraplus_lr_ratio is not None else set()

    def part_of(parameter) -> str:
        if id(parameter) in vocabulary:  # the vocabulary's rate wins, for a LoRA inside it too
            return "vocabulary"
        return "lora_B" if id(parameter) in lora_b else "rest"

    rates = {
        "rest": params.learning_rate,
        "lora_B": params.learning_rate * (params.loraplus_lr_ratio or 1.0),
        "vocabulary": params.embedding_learning_rate or params.learning_rate,
    }
    default_epsilon = 1e-8
    epsilons = {"vocabulary": params.embedding_adam_epsilon or default_epsilon}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for part, lr in rates.items():
        eps = epsilons.get(part, default_epsilon)
        chosen = [p for p in trainable if part_of(p) == part]
        decay = [p for p in chosen if len(full_shape(p)) >= 2]  # ZeRO-3: .ndim of a partition is 1
        no_decay = [p for p in chosen if len(full_shape(p)) < 2]
        # "part" names the group for the stage log (torch keeps extra keys of a param group). No
        # empty groups: DeepSpeed drops them, and the scheduler, built on the groups, then fails.
        if decay:
            groups.append({"params": decay, "weight_decay": params.weight_decay, "lr": lr, "part": part, "eps": eps})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr, "part": part, "eps": eps})
    if not groups:  # nothing trains (the stage's own checks refuse that first); torch needs a group
        groups.append({"params": [], "weight_decay": params.weight_decay, "lr": params.learning_rate, "part": "rest"})
    # fused: one pass over each tensor instead of ~10 (CPU and CUDA both have the kernel). With
    # embed_tokens and lm_head trainable (26M values in the demo), the demo's SFT step on CPU is
    # 11% faster with it (benchmarks/sft_step.py; 40% before chla_train.freed_memory.keep_freed_memory).
    return torch.optim.AdamW(groups, lr=params.learning_rate, betas=(0.9, 0.999), eps=default_epsilon, fused=True)


def lora_b_parameter_ids(model) -> set[int]:
    """ids of the B matrices of PEFT's LoRA layers (`...lora_B.<adapter>.weight`), the ones
    LoRA+ speeds up; LoRA on embeddings (lora_embedding_B) keeps the base rate."""
    return {id(p) for name, p in model.named_parameters() if p.requires_grad and ".lora_B." in name}


def vocabulary_parameter_ids(model) -> set[int]:
    """ids of the parameters that belong to the input embedding and the output head (including
    PEFT's trainable copies or token rows of them, and chla's new-rows split of them)."""
    found: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            found.update(id(p) for p in module.parameters())
    return found


def build_scheduler(optimizer, params, total_steps: int):
    warmup = math.ceil(params.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if params.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if params.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps(params, num_train_items: int, world_size: int) -> int:
    if params.max_steps:
        return params.max_steps
    global_batch = params.micro_batch_size * params.gradient_accumulation_steps * world_size
    return max(1, math.ceil(params.num_epochs * num_train_items / global_batch))


class Trainer:
    def __init__(self, ctx, model, data: TrainData, params, *, dtype: torch.dtype) -> None:
        import_deepspeed()
        import deepspeed

        self.ctx, self.data, self.params = ctx, data, params
        self.has_validation = len(data.valid_indices) > 0
        self.rank, self.world_size = ctx.dist.rank, ctx.dist.world_size
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_cuda_device(torch.cuda.device_count()))
        self.global_batch = params.micro_batch_size * params.gradient_accumulation_steps * self.world_size
        self.total_steps = self._steps(data, params)
        if params.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        parameters_in_training_dtype(model, dtype)
        self.compile_choice = choose_compile(
            params.torch_compile, zero_stage=params.zero_stage, attention=model.config._attn_implementation
        )
        if self.compile_choice.enabled:
            compiled = compile_decoder_layers(model)
            ctx.log(f"torch_compile: {compiled} decoder layers compiled ({self.compile_choice.reason})")
        else:
            ctx.log(f"torch_compile: off ({self.compile_choice.reason})")
        optimizer = build_optimizer(model, params)
        if params.loraplus_lr_ratio is not None:
            faster = sum(len(group["params"]) for group in optimizer.param_groups if group["part"] == "lora_B")
            ctx.log(
                f"LoRA+: {faster} LoRA B matrices learn at "
                f"{params.learning_rate * params.loraplus_lr_ratio:.2e} ({params.loraplus_lr_ratio:g} x learning_rate)"
            )
        scheduler = build_scheduler(optimizer, params, self.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(
                params, dtype=dtype, world_size=self.world_size, hidden_size=model.config.hidden_size
            ),
        )

    def _steps(self, data: TrainData, params) -> int:
        """The run's optimizer steps, decided once: by the blend's builder where the data is a blend
        (counting its items again with num_epochs would read it num_epochs times over, and stretch
        warmup and decay to match), else from num_epochs or max_steps."""
        if data.steps is None:
            return total_steps(params, len(data.train_indices), self.world_size)
        if len(data.train_indices) != data.steps * self.global_batch:
            raise ValueError(
                f"a blend of {len(data.train_indices)} items for {data.steps} steps of {self.global_batch}"
            )
        return data.steps

    # --- the loop -----------------------------------------------------------------------------

    def train(self) -> TrainResult:
        from chla_tools.blocks import ResumableSampler

        ctx, params = self.ctx, self.params
        train_indices = np.asarray(self.data.train_indices)
        lengths = None if self.data.train_lengths is None else self.data.train_lengths[train_indices]
        # Groups of 64 global batches are sorted by length (HF's group_by_length uses 50).
        sampler = ResumableSampler(
            train_indices,
            seed=params.seed,
            shuffle=self.data.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            global_batch_size=self.global_batch,
            lengths=lengths,
            length_group=64 * self.global_batch,
        )
        state: dict[str, Any] = {
            "step": 0,
            "tokens_seen": 0,
            "samples_seen": 0,
            "elapsed_s": 0.0,
            "resumed_from": [],
            "first_eval_loss": None,
        }
        latest, foreign = checkpoints.resume_point(ctx.work_dir, ctx.fingerprint, rank=self.rank)
        if foreign:
            # The stage's config changed since these were written (the work dir outlives a
            # fingerprint): resuming would mix two runs, so start over and keep them aside.
            aside = checkpoints.set_aside(ctx.work_dir, rank=self.rank)
            ctx.log(f"checkpoints in the work dir belong to another config of this stage; moved to {aside.name}")
            latest = None
        if latest is not None:
            state = checkpoints.load_checkpoint(self.engine, latest, rank=self.rank)
            sampler.load_state_dict(state["sampler"])
            state["resumed_from"] = state.get("resumed_from", []) + [state["step"]]
            ctx.log(f"resumed from {latest.name}: step {state['step']}, {state['tokens_seen']:,} tokens seen")
        else:
            torch.manual_seed(params.seed)  # LoRA dropout masks: same seed, same run
            np.random.seed(params.seed)
        tracker = tracking.stage_tracker(ctx)
        metrics = MetricsLog(
            ctx.work_dir, enabled=self.rank == 0, resume_step=state["step"], sinks=[tracker] if tracker else []
        )
        progress = progress_writer(ctx, total=self.total_steps, unit="steps", start_done=state["step"])
        ctx.log(
            f"training {self.total_steps} steps; global batch {self.global_batch} = micro-batch "
            f"{params.micro_batch_size} x accumulation {params.gradient_accumulation_steps} x "
            f"{self.world_size} rank(s); ZeRO stage {params.zero_stage}"
        )
        if state["step"] == 0 and params.eval_steps and self.has_validation:
            state["first_eval_loss"] = self.evaluate()
            ctx.log(f"step 0: eval loss {state['first_eval_loss']:.4f}")
            metrics.write({"step": 0, "eval_loss": state["first_eval_loss"]})

        if self._any_rank_stopping():
            # Asked to stop while loading or evaluating: nothing was trained since the checkpoint.
            ctx.log(f"{ctx.stop_signal or 'stop requested'} before step {state['step'] + 1}: leaving")
            metrics.close()
            ctx.requeue_and_exit()
        samples = iter(sampler)
        window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}
        started = time.perf_counter() - state["elapsed_s"]
        train_loss = eval_loss = throughput = None
        self.engine.train()
        while state["step"] < self.total_steps:
            loss, tokens, preempt = self.optimizer_step(samples)
            state["step"] += 1
            state["tokens_seen"] += tokens
            state["samples_seen"] += self.global_batch
            state["elapsed_s"] = time.perf_counter() - started
            window["loss"] += loss
            window["steps"] += 1
            window["tokens"] += tokens
            step = state["step"]
            last = step == self.total_steps
            if step % params.logging_steps == 0 or last:
                train_loss = window["loss"] / window["steps"]
                seconds = time.perf_counter() - window["start"]
                record = {
                    "step": step,
                    "loss": round(train_loss, 6),
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": self._grad_norm(),
                    "tokens_per_s": round(window["tokens"] / seconds, 1),
                    "tokens_per_s_per_device": round(window["tokens"] / seconds / self.world_size, 1),
                    "tokens_seen": state["tokens_seen"],
                    "samples_seen": state["samples_seen"],
                    "elapsed_s": round(state["elapsed_s"], 3),
                    "peak_mem_mb": round(peak_memory_mb(), 1),
                    "global_batch": self.global_batch,
                }
                metrics.write(record)
                self._log(
                    f"step {step}/{self.total_steps} loss {train_loss:.4f} lr {record['lr']:.2e} "
                    f"{record['tokens_per_s']:.0f} tok/s"
                )
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}
                throughput = record["tokens_per_s"]
            if progress is not None:  # the live bars and `chla status --watch`
                progress.update(step, loss=train_loss, tokens_per_s=throughput)
            if params.eval_steps and self.has_validation and (step % params.eval_steps == 0 or last):
                eval_loss = self.evaluate()
                metrics.write({"step": step, "eval_loss": eval_loss})
                self._log(f"step {step}: eval loss {eval_loss:.4f}")
            saved = False
            if params.save_steps and step % params.save_steps == 0 and not last:
                self._save(state, sampler)
                saved = True
            if preempt and not last:
                ctx.log(f"{ctx.stop_signal or 'preemption'} on some rank: checkpointing at step {step}")
                if not saved:
                    self._save(state, sampler)
                metrics.close()
                ctx.requeue_and_exit()
        self.metrics = metrics
        if progress is not None:
            progress.close()
        elapsed = state["elapsed_s"]
        return TrainResult(
            step=state["step"],
            tokens_seen=state["tokens_seen"],
            samples_seen=state["samples_seen"],
            train_loss=train_loss,
            eval_loss=eval_loss,
            first_eval_loss=state.get("first_eval_loss"),
            global_batch=self.global_batch,
            elapsed_s=elapsed,
            tokens_per_s=state["tokens_seen"] / max(elapsed, 1e-9),
            resumed_from=state["resumed_from"],
        )

    def optimizer_step(self, samples) -> tuple[float, int, bool]:
        """One optimizer step over gradient_accumulation_steps micro-batches. Returns the global
        mean token loss, the global number of input tokens, and whether any rank was asked to stop."""
        params = self.params
        micro_batches = [
            self.data.collate([self.data.train_set[next(samples)] for _ in range(params.micro_batch_size)])
            for _ in range(params.gradient_accumulation_steps)
        ]
        # Collectives run on the device: NCCL (GPU) cannot reduce CPU tensors.
        local = torch.tensor(
            [sum(label_weight_sum(b) for b in micro_batches), sum(input_token_count(b) for b in micro_batches)],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(local)
        label_tokens, input_tokens = local.tolist()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            token_loss_sum = self._forward(batch)
            # DeepSpeed averages gradients over ranks, so scale by world_size / global label tokens
            # (or the global sum of the label weights) to get the gradient of the global mean.
            self.engine.backward(token_loss_sum * (self.world_size / label_tokens), scale_wrt_gas=False)
            self.engine.step()
            loss_sum += token_loss_sum.detach().double()
        preempt = torch.tensor(1.0 if self.ctx.preempt_requested else 0.0, dtype=torch.float64, device=self.device)
        flag = torch.stack([loss_sum, preempt])
        dist.all_reduce(flag)
        return flag[0].item() / label_tokens, int(input_tokens), flag[1].item() > 0

    def _any_rank_stopping(self) -> bool:
        """Collective: whether any rank was asked to stop (the scheduler signals ranks one by one)."""
        flag = torch.tensor(1.0 if self.ctx.preempt_requested else 0.0, dtype=torch.float64, device=self.device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def _forward(self, batch: dict[str, np.ndarray], *, weighted: bool = True) -> torch.Tensor:
        """Sum of token cross-entropies of one micro-batch, each times its label weight when the
        batch has `label_weights` and `weighted` (chla_tools.sft_data.weigh_examples).

        The vocabulary projection is computed only at the positions that predict a label (SFT:
        the answer, ~50 of ~1,600 tokens in a batch of reviews; with a 50K vocabulary that
        projection is most of a small model's work): a pre-hook on the output layer gathers those
        hidden states. It also computes the loss there, a chunk of positions at a time
        (chla_train.token_loss), and hands the layer an empty input, so the logits never exist
        whole; under ZeRO-3, and for an output layer that is not a plain projection, the layer
        computes the gathered positions' logits itself. (`logits_to_keep` can only keep the same
        columns in every row: with packed rows that was ~7x the positions.) The loss is the sum
        transformers computes over all positions."""
        labels = torch.from_numpy(batch["labels"]).to(self.device)
        inputs = {"input_ids": torch.from_numpy(batch["input_ids"]).to(self.device)}
        mask = batch.get("attention_mask")
        if "position_ids" in batch:
            # Packed rows (chla_tools.sft_data.collate_sft_packed): the example boundaries in the
            # form the model's attention backend reads (chla_train.packed_attention); the 2-D mask
            # only counts tokens.
            module = self.engine.module
            inputs.update(
                packed_attention_inputs(
                    batch, module.config._attn_implementation, dtype=module.dtype, device=self.device
                )
            )
        elif mask is not None and not mask.all():  # an all-ones mask only slows SDPA down
            inputs["attention_mask"] = torch.from_numpy(mask).to(self.device)
        # Position t predicts token t + 1.
        rows, columns = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
        targets = labels[rows, columns + 1]
        scale = None
        if weighted and "label_weights" in batch:
            scale = torch.from_numpy(batch["label_weights"]).to(self.device, torch.float32)[rows, columns + 1]
        layer = computing_layer(self.engine.module.get_output_embeddings())
        chunked = projection_weight(layer) is not None and not self.engine.zero_optimization_partition_weights()
        losses = []

        def label_positions_only(module, args):
            hidden = args[0][rows, columns]
            if chunked:
                losses.append(ChunkedLinearCrossEntropy.apply(hidden, projection_weight(module), targets, scale))
                hidden = hidden[:0]
            return (hidden.unsqueeze(0),) + tuple(args[1:])

        hook = layer.register_forward_pre_hook(label_positions_only)
        try:
            logits = self.engine(**inputs, use_cache=False).logits
        finally:
            hook.remove()
        if chunked:
            return losses[0]
        token_losses = torch.nn.functional.cross_entropy(logits[0].float(), targets, reduction="none")
        return (token_losses if scale is None else token_losses * scale).sum()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the validation items, split across ranks. Every rank runs the same
        number of forward passes (ZeRO-3 gathers parameters collectively); padding batches count 0."""
        params = self.params
        indices = [int(i) for i in self.data.valid_indices]
        per_batch = params.micro_batch_size
        num_batches = math.ceil(len(indices) / (per_batch * self.world_size))
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in range(num_batches):
            start = (b * self.world_size + self.rank) * per_batch
            chunk = indices[start : start + per_batch]
            weight = 1.0 if chunk else 0.0
            batch = self.data.collate([self.data.valid_set[i] for i in (chunk or indices[:1])])
            totals[0] += weight * self._forward(batch, weighted=False).double()
            totals[1] += weight * label_token_count(batch)
        self.engine.train()
        dist.all_reduce(totals)
        return float(totals[0]) / max(float(totals[1]), 1.0)

    def _log(self, message: str) -> None:
        """Progress lines from rank 0 only (every rank has the same numbers)."""
        if self.rank == 0:
            self.ctx.log(message)

    def _grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return round(float(norm), 6)

    def _save(self, state: dict[str, Any], sampler) -> None:
        trainer_state = dict(
            state,
            sampler=sampler.state_dict(),
            world_size=self.world_size,
            global_batch=self.global_batch,
            fingerprint=self.ctx.fingerprint,
        )
        path = checkpoints.save_checkpoint(
            self.engine,
            self.ctx.work_dir,
            state["step"],
            trainer_state,
            rank=self.rank,
            keep_last=self.params.keep_last,
        )
        self._log(f"checkpoint {path.name} written")

    # --- exporting the result -------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The module's complete state dict on rank 0 (None elsewhere). Collective under ZeRO-3,
        where each rank holds only a partition and the module's own tensors are empty
        placeholders: saving those is how the original project got empty adapters."""
        if self.engine.zero_optimization_partition_weights():
            return self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}

    def finish(self) -> None:
        self.metrics.copy_to(self.ctx.out_dir)
        dist.barrier()


def label_token_count(batch: dict[str, np.ndarray]) -> int:
    """Positions that contribute to the causal-LM loss (HF shifts labels left by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def label_weight_sum(batch: dict[str, np.ndarray]) -> float:
    """What a micro-batch's loss sum is divided by: its label tokens, or with `label_weights`
    the sum of the weights of those tokens (one per example: the mean over examples)."""
    if "label_weights" not in batch:
        return float(label_token_count(batch))
    return float(batch["label_weights"][:, 1:][batch["labels"][:, 1:] != -100].sum())


def input_token_count(batch: dict[str, np.ndarray]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].size)
