"""`chla plan`: what every training stage of a recipe will hold per device, before anything is queued.

For each `pretrain` and `sft` stage: the model it starts from (config.json of a model directory, an
`init:` config, or the product of an upstream stage of the same recipe: a pretrain stage's model,
a merge of a model and adapters, grown to the vocabulary of a merged tokenizer), its total and
trainable parameters, and bytes per device for weights, gradients, optimizer states and
activations at its micro-batch and sequence length, with and without gradient checkpointing
(chla_launcher.sizing), against the memory of the device it asked for: `gpu_mem` in its
resources, or a GPU named in slurm.constraint, or for a CPU stage its `mem` per task. Reads
config.json and tokenizer files only: no model is loaded, no torch imported.

A base model not downloaded yet is sized from a known architecture (`--arch`, chla_launcher.
architectures). A tokenizer that a merge_tokenizer stage of the recipe will build is counted as its
base's entries (its tokenizer files, else the base model's vocab_size) plus the pieces of the
SentencePiece model it adds (a train_spm stage's vocab_size): an upper bound, since pieces both
have count once. Each stage's plan says where its sizes came from.

A stage "fits" when its peak (with the gradient checkpointing it is configured with) plus
RUNTIME_RESERVE (CUDA context, NCCL and allocator slack) is within the device's memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .architectures import ARCHITECTURES
from .contract.kinds._training import TrainingParams
from .contract.kinds.merge import MergeParams
from .contract.kinds.merge_tokenizer import MergeTokenizerParams
from .contract.kinds.pretrain import PretrainParams
from .contract.kinds.sft import SftParams
from .contract.kinds.train_bpe import TrainBpeParams
from .contract.kinds.train_spm import TrainSpmParams
from .contract.recipe import ResolvedRecipe, ResolvedStage, mem_to_mb
from .sizing import PROJECTIONS, MemoryEstimate, ModelShape, Trainable, TrainingSetup, parameter_counts, training_memory

GIB = 2**30
RUNTIME_RESERVE = 2 * GIB  # per GPU: CUDA context (~0.5 GB), NCCL buffers, allocator fragmentation
# GPU memory by name, as sites name them in node features (slurm.constraint): longest match first.
GPU_MEMORY_GIB = {
    "h200": 141,
    "gh200": 96,
    "h100-94": 94,
    "h100nvl": 94,
    "h100": 80,
    "h800": 80,
    "a100-80": 80,
    "a100_80": 80,
    "a10080": 80,
    "a100-40": 40,
    "a100": 40,
    "a800": 80,
    "l40s": 48,
    "l40": 48,
    "a6000": 48,
    "a40": 48,
    "a30": 24,
    "a10g": 24,
    "a10": 24,
    "l4": 24,
    "rtx4090": 24,
    "4090": 24,
    "3090": 24,
    "v100-32": 32,
    "v100": 16,
    "t4": 16,
    "mi300x": 192,
    "mi250": 128,
}
TRAINING_KINDS = ("pretrain", "sft")


@dataclass
class StagePlan:
    stage: str
    shape: ModelShape | None
    source: str  # where the sizes come from, or why they are unknown
    setup: TrainingSetup
    trainable: Trainable | None = None
    total_params: int = 0
    trainable_params: int = 0
    memory: MemoryEstimate | None = None
    device: str = ""  # "GPU (80 GiB, from constraint h100)", "CPU (mem 64G / 1 task)"
    device_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.memory is None:
            return "unknown"
        if self.device_bytes is None:
            return "no budget"
        need = self.memory.peak + (RUNTIME_RESERVE if self.device.startswith("GPU") else 0)
        return "fits" if need <= self.device_bytes else "does not fit"


def plan_recipe(recipe: ResolvedRecipe, arch: str | None = None) -> list[StagePlan]:
    """The plan of every training stage; `arch` (a name in ARCHITECTURES) sizes base models whose
    config.json is not there."""
    sizes = _Sizes(recipe, arch)
    return [plan_stage(stage, sizes, recipe) for stage in recipe.stages.values() if stage.kind.name in TRAINING_KINDS]


def plan_stage(stage: ResolvedStage, sizes: _Sizes, recipe: ResolvedRecipe) -> StagePlan:
    params, resources = stage.params_as(TrainingParams), stage.resources
    shape, source = sizes.training_shape(stage)
    notes = []
    on_gpu = resources.gpus_per_node > 0
    precision = params.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
        notes.append(f"precision auto taken as {precision}" + ("" if on_gpu else " (a CPU without native bf16)"))
    sft = isinstance(params, SftParams)
    setup = TrainingSetup(
        precision=precision,
        zero_stage=params.zero_stage,
        world_size=resources.world_size,
        micro_batch=params.micro_batch_size,
        seq_len=params.max_seq_length if isinstance(params, SftParams) else stage.params_as(PretrainParams).block_size,
        gradient_checkpointing=params.gradient_checkpointing,
        attention="sdpa"
        if params.attn_implementation == "flash_attention_2" and not on_gpu
        else params.attn_implementation,
        masked=sft and params.attn_implementation != "flash_attention_2",
        cpu=not on_gpu,
    )
    plan = StagePlan(stage=stage.name, shape=shape, source=source, setup=setup, notes=notes)
    if sft:
        plan.notes.append(
            "SFT: the loss taken at every position (an upper bound: chla computes it at the answers only)"
        )
    plan.trainable = _trainable(stage, shape, sizes)
    plan.device, plan.device_bytes = _device_budget(stage, recipe)
    if shape is None:
        return plan
    plan.total_params, plan.trainable_params = parameter_counts(shape, plan.trainable)
    if plan.trainable.new_rows is not None:
        matrices = "embed_tokens and lm_head" if plan.trainable.train_lm_head else "embed_tokens"
        plan.notes.append(
            f"trains the {plan.trainable.new_rows} new rows of {matrices} "
            f"({shape.vocab_size} - {shape.vocab_size - plan.trainable.new_rows} base rows) x {shape.hidden_size}"
        )
    plan.memory = training_memory(shape, plan.trainable, plan.setup)
    return plan


def _trainable(stage: ResolvedStage, shape: ModelShape | None, sizes: _Sizes) -> Trainable:
    params = stage.params_as(TrainingParams)
    mode = params.mode if isinstance(params, PretrainParams) else "lora"
    if isinstance(params, PretrainParams) and mode == "embeddings":
        new_rows = None
        if params.new_rows_only and shape is not None:
            new_rows = max(0, shape.vocab_size - sizes.base_rows(stage))
        return Trainable(mode="embeddings", new_rows=new_rows, train_lm_head=params.train_lm_head)
    if mode == "full":
        return Trainable(mode="full")
    return Trainable(
        mode="lora",
        lora_r=params.lora_r,
        lora_targets=tuple(t for t in params.lora_target_modules if t in PROJECTIONS),
        lora_dropout=params.lora_dropout,
        modules_to_save=tuple(params.modules_to_save),
    )


def _device_budget(stage: ResolvedStage, recipe: ResolvedRecipe) -> tuple[str, int | None]:
    resources = stage.resources
    if resources.gpus_per_node == 0:
        per_task = mem_to_mb(resources.mem) * 2**20 // resources.tasks_per_node
        return f"CPU ({resources.mem} / {resources.tasks_per_node} task(s))", per_task
    if resources.gpu_mem:
        return f"GPU ({resources.gpu_mem}, gpu_mem)", mem_to_mb(resources.gpu_mem) * 2**20
    constraint = (recipe.model.slurm.constraint or "").lower()
    for name in sorted(GPU_MEMORY_GIB, key=len, reverse=True):
        if re.search(rf"(^|[^a-z0-9]){re.escape(name)}($|[^0-9])", constraint):
            return f"GPU ({GPU_MEMORY_GIB[name]} GiB, {name} in slurm.constraint)", GPU_MEMORY_GIB[name] * GIB
    return "GPU (memory unknown: set resources.gpu_mem or a GPU name in slurm.constraint)", None


# --- model sizes, from files and from the stages that will produce them ---------------------------


class _Sizes:
    """Model shapes and tokenizer sizes, from files on disk or derived from the upstream stage that
    will produce them (a path inside the run directory)."""

    def __init__(self, recipe: ResolvedRecipe, arch: str | None = None) -> None:
        self.recipe = recipe
        self.arch = arch

    def base_rows(self, stage: ResolvedStage) -> int:
        """The embedding rows of the model a stage starts from, before its tokenizer grows it (what
        chla_train calls base_rows): the rows below those a stage-1 `new_rows_only` trains."""
        params = stage.params_as(TrainingParams)
        if params.init is not None:
            return ModelShape.from_config(params.init).vocab_size
        assert params.model is not None
        shape, _ = self.model_shape(params.model)
        return shape.vocab_size if shape is not None else 0

    def base_config(self, path: str) -> tuple[dict[str, Any] | None, str]:
        """The config of a model outside the run directory: its config.json, else the --arch preset."""
        config = _read_json(Path(path) / "config.json")
        if config is not None:
            return config, f"{path}/config.json"
        if self.arch is not None:
            return ARCHITECTURES[self.arch], f"--arch {self.arch}"
        return None, (
            f"{path}/config.json not found (give the model's config.json, or name its architecture: "
            f"chla plan --arch {{{','.join(ARCHITECTURES)}}})"
        )

    def training_shape(self, stage: ResolvedStage) -> tuple[ModelShape | None, str]:
        """The model the stage trains: its base, grown to its tokenizer (plus [PAD] for SFT)."""
        params = stage.params_as(TrainingParams)
        shape: ModelShape | None
        if params.init is not None:
            shape, source = ModelShape.from_config(params.init), "init: config"
        else:
            assert params.model is not None  # TrainingParams takes exactly one of model, init
            shape, source = self.model_shape(params.model)
        if shape is None:
            return None, source
        vocab, exact, how = self.tokenizer_size(params.tokenizer)
        if vocab is not None and stage.kind.name == "sft" and not self.has_pad(params.tokenizer):
            vocab += 1
            how += " + 1 [PAD] that SFT adds"
        if vocab is not None and vocab > shape.vocab_size:
            shape = shape.with_vocab(vocab)
            source += f"; vocabulary {'' if exact else 'up to '}{vocab}: {how}"
        return shape, source

    def model_shape(self, path: str) -> tuple[ModelShape | None, str]:
        upstream = self._upstream(path)
        if upstream is not None:
            stage, rest = upstream
            if stage.kind.name == "pretrain" and rest in ("model", "model/"):
                shape, source = self.training_shape(stage)
                return shape, f"{stage.name}'s model ({source})"
            if stage.kind.name == "merge" and rest in ("", "."):
                return self._merged(stage)
            return None, (
                f"{path}: the output of stage {stage.name} ({stage.kind.name}) is not a model whose "
                "size chla can derive"
            )
        config, source = self.base_config(path)
        if config is None:
            return None, source
        return ModelShape.from_config(config), source

    def _merged(self, stage: ResolvedStage) -> tuple[ModelShape | None, str]:
        params = stage.params_as(MergeParams)
        shape, source = self.model_shape(params.base)
        if shape is None:
            return None, source
        for adapter in params.adapters:
            upstream = self._upstream(adapter)
            if upstream is not None and upstream[0].kind.name in TRAINING_KINDS:
                grown, _ = self.training_shape(upstream[0])
                if grown is not None and grown.vocab_size > shape.vocab_size:
                    shape = shape.with_vocab(grown.vocab_size)
        return shape, f"{stage.name}: merge of {source}"

    def tokenizer_size(self, path: str) -> tuple[int | None, bool, str]:
        """(entries, exact, where the figure comes from) of a tokenizer directory. A merged one not
        yet built is counted as its base plus every piece (or BPE merge) of the added model (an
        upper bound: pieces both have count once); a base directory without tokenizer files (a
        model not downloaded yet, or its config.json alone) as the model's vocab_size."""
        upstream = self._upstream(path)
        if upstream is not None:
            stage, _ = upstream
            if stage.kind.name != "merge_tokenizer":
                return None, False, f"the output of stage {stage.name} ({stage.kind.name}) is not a tokenizer"
            params = stage.params_as(MergeTokenizerParams)
            base, _, base_how = self.tokenizer_size(params.base)
            added, added_how = self.added_model_size(params.add)
            if base is None or added is None:
                return None, False, base_how if base is None else added_how
            pad = " + 1 [PAD]" if params.pad_token else ""
            how = f"stage {stage.name} merges {base} ({base_how}) + at most {added} ({added_how}){pad}"
            return base + added + int(params.pad_token), False, how
        size = _tokenizer_dir_size(Path(path))
        if size is not None:
            return size, True, f"{path}'s tokenizer"
        config, source = self.base_config(path)
        if config is not None and config.get("vocab_size"):
            return int(config["vocab_size"]), True, f"vocab_size of {source}"
        return None, False, f"no tokenizer in {path}"

    def added_model_size(self, path: str) -> tuple[int | None, str]:
        """(pieces, where the figure comes from) of what a merge_tokenizer stage adds: a
        SentencePiece model, or the one a train_spm stage of the recipe will train (its
        vocab_size), or at most one token per merge of a train_bpe stage."""
        upstream = self._upstream(path)
        if upstream is not None:
            stage, _ = upstream
            if stage.kind.name == "train_spm":
                return stage.params_as(TrainSpmParams).vocab_size, f"vocab_size of stage {stage.name}"
            if stage.kind.name == "train_bpe":  # each merge adds at most one token
                return stage.params_as(TrainBpeParams).merges, f"merges of stage {stage.name}"
            return None, f"the output of stage {stage.name} ({stage.kind.name}) is not a model to add"
        return _sentencepiece_pieces(Path(path)), f"pieces of {path}"

    def has_pad(self, path: str) -> bool:
        upstream = self._upstream(path)
        if upstream is not None:
            params = upstream[0].params
            return isinstance(params, MergeTokenizerParams) and params.pad_token
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (_read_json(Path(path) / name) or {}).get("pad_token"):
                return True
        return False

    def _upstream(self, path: str | None) -> tuple[ResolvedStage, str] | None:
        """(stage, path inside its out/) when `path` is an upstream stage's output."""
        if not path:
            return None
        try:
            relative = Path(path).resolve().relative_to(self.recipe.run_dir)
        except ValueError:
            return None
        parts = relative.parts
        if len(parts) >= 2 and parts[1] == "out" and parts[0] in self.recipe.stages:
            return self.recipe.stages[parts[0]], "/".join(parts[2:])
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tokenizer_dir_size(directory: Path) -> int | None:
    """Entries of an HF tokenizer: tokenizer.json's vocabulary and added tokens, else the
    SentencePiece model's pieces plus added tokens beyond them."""
    if directory.is_file():
        return _sentencepiece_pieces(directory)
    fast = _read_json(directory / "tokenizer.json")
    ids: set[int] = set()
    if fast:
        vocab = (fast.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids.update(int(i) for i in vocab.values())
        elif isinstance(vocab, list):
            ids.update(range(len(vocab)))
        ids.update(int(token["id"]) for token in fast.get("added_tokens", []))
        return len(ids) or None
    pieces = _sentencepiece_pieces(directory / "tokenizer.model")
    if pieces is None:
        return None
    added = (_read_json(directory / "tokenizer_config.json") or {}).get("added_tokens_decoder", {})
    return max([pieces - 1, *(int(i) for i in added)]) + 1


def _sentencepiece_pieces(path: Path) -> int | None:
    """Pieces of a SentencePiece model: the repeated field 1 of its ModelProto, counted by walking
    the protobuf wire format (no sentencepiece or protobuf needed)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    count, position = 0, 0

    def varint() -> int:
        nonlocal position
        value, shift = 0, 0
        while True:
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    try:
        while position < len(data):
            key = varint()
            wire = key & 7
            if wire == 2:
                position += varint()
            elif wire == 0:
                varint()
            elif wire == 5:
                position += 4
            elif wire == 1:
                position += 8
            else:
                return None
            count += key >> 3 == 1
    except IndexError:
        return None
    return count or None


# --- output ------------------------------------------------------------------------------------


def render(plans: list[StagePlan], out: TextIO) -> None:
    def gib(value: int) -> str:
        return f"{value / GIB:.1f}"

    if not plans:
        print("no training stages (pretrain, sft) in this recipe", file=out)
        return
    header = (
        f"{'stage':<12} {'model':<22} {'params':>8} {'trains':>8} {'ZeRO':>4} {'ranks':>5} {'batch':>9} "
        f"{'weights':>7} {'grads':>6} {'optim':>6} {'act':>6} {'act+gc':>6} {'peak':>6} {'device':>7}  verdict"
    )
    print(header, file=out)
    print(" " * 67 + "(GiB per device; act: activations, +gc: with gradient checkpointing)", file=out)
    for plan in plans:
        setup = plan.setup
        batch = f"{setup.micro_batch}x{setup.seq_len}"
        if plan.memory is None or plan.shape is None:
            print(
                f"{plan.stage:<12} {'?':<22} {'':>8} {'':>8} {setup.zero_stage:>4} {setup.world_size:>5} "
                f"{batch:>9}  unknown: {plan.source}",
                file=out,
            )
            continue
        shape, memory = plan.shape, plan.memory
        model = f"{shape.num_layers}x{shape.hidden_size} V{shape.vocab_size}"
        device = gib(plan.device_bytes) if plan.device_bytes else "?"
        checkpointed = "on" if setup.gradient_checkpointing else "off"
        print(
            f"{plan.stage:<12} {model:<22} {plan.total_params / 1e9:>7.2f}B {_count(plan.trainable_params):>8} "
            f"{setup.zero_stage:>4} {setup.world_size:>5} {batch:>9} {gib(memory.weights):>7} "
            f"{gib(memory.gradients):>6} {gib(memory.optimizer):>6} {gib(memory.activations):>6} "
            f"{gib(memory.activations_checkpointed):>6} {gib(memory.peak):>6} {device:>7}  {plan.verdict} "
            f"(gc {checkpointed})",
            file=out,
        )
    print("", file=out)
    for plan in plans:
        lines = [f"sizes: {plan.source}", f"device: {plan.device}", *plan.notes]
        if (
            plan.verdict == "does not fit"
            and plan.memory is not None
            and not plan.setup.gradient_checkpointing
            and plan.memory.peak_with_checkpointing + RUNTIME_RESERVE <= (plan.device_bytes or 0)
        ):
            lines.append("fits with gradient_checkpointing: true")
        print(f"{plan.stage}: " + "; ".join(lines), file=out)


def _count(value: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def verdict_lines(plans: list[StagePlan]) -> list[str]:
    """One line per training stage, for chla-submit."""
    lines = []
    for plan in plans:
        if plan.memory is None:
            lines.append(f"{plan.stage}: memory unknown ({plan.source})")
            continue
        budget = f"{plan.device_bytes / GIB:.1f} GiB" if plan.device_bytes else "an unknown budget"
        lines.append(
            f"{plan.stage}: {plan.verdict}: peak {plan.memory.peak / GIB:.1f} GiB per device against "
            f"{budget} ({plan.device})"
        )
    return lines


def memory_verdicts(recipe: ResolvedRecipe, stages: list[str]) -> tuple[list[str], list[str]]:
    """chla-submit's check of the training stages about to run: one verdict line each, and the
    names of those that will not fit in their devices' memory."""
    plans = [plan for plan in plan_recipe(recipe) if plan.stage in stages]
    return verdict_lines(plans), [plan.stage for plan in plans if plan.verdict == "does not fit"]


def too_big_message(recipe: ResolvedRecipe, stages: list[str]) -> str:
    return f"stage(s) {', '.join(stages)} will not fit in their devices' memory; see `chla plan {recipe.source}`"
