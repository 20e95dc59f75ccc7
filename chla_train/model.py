"""Building the model a training stage starts from: tokenizer, base model (an HF directory or a
random `init:` LlamaConfig), embeddings resized to the tokenizer, and the trainable part
(new embedding rows, LoRA adapters, or everything).

Every check a user's input can fail runs here, before DeepSpeed starts and before any step, and
fails with one ChlaError line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chla_launcher.contract.errors import ChlaError
from chla_tools.safetensors_dtypes import ITEMSIZE, torch_dtype
from chla_train.deepspeed_import import import_deepspeed

WEIGHT_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ChlaError(
            f"tokenizer {path}: not a directory; point `tokenizer` at an HF tokenizer "
            "directory (tokenizer.model + tokenizer_config.json)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for a broken dir
        raise ChlaError(
            f"tokenizer {path}: cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it must hold tokenizer.model "
            "and tokenizer_config.json"
        ) from None
    if len(tokenizer) < 16:
        raise ChlaError(
            f"tokenizer {path}: only {len(tokenizer)} tokens; the directory is missing "
            "tokenizer.model (transformers silently builds a stub tokenizer without it)"
        )
    return tokenizer


def build_base_model(
    model_dir: str | None, init: dict[str, Any] | None, *, dtype: torch.dtype, attn_implementation: str, seed: int
):
    """An HF causal LM from `model_dir`, or a randomly initialised LLaMA from the `init` config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    attn_implementation = usable_attention(attn_implementation)
    if init is not None:
        try:
            config = LlamaConfig(**init)
        except (TypeError, ValueError) as exc:
            raise ChlaError(
                f"init: not a valid LlamaConfig ({exc}); use LlamaConfig field names "
                "such as hidden_size, num_hidden_layers, vocab_size"
            ) from None
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)  # the random init is part of the recipe: same seed, same model
        model = LlamaForCausalLM(config)
        return model.to(dtype)  # type: ignore[arg-type]  # transformers' decorator on to() hides nn.Module.to's signature
    assert model_dir is not None  # TrainingParams takes exactly one of model, init
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ChlaError(
            f"model {path}: no config.json; point `model` at an HF model directory "
            "(config.json + *.safetensors) or use `init:` for a random model"
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILE_PATTERNS):
        raise ChlaError(
            f"model {path}: has config.json but no weights (*.safetensors or "
            "pytorch_model*.bin); copy the checkpoint's weight files there"
        )
    try:
        if partitioned_loading_active():
            return load_partitioned(path, dtype=dtype, attn_implementation=attn_implementation)
        return load_whole(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ChlaError(f"model {path}: cannot be loaded ({str(exc).splitlines()[0]})") from None


def usable_attention(requested: str) -> str:
    """flash_attention_2 needs a GPU and the flash-attn package; fall back to sdpa without them."""
    if requested == "flash_attention_2":
        import importlib.util

        if not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
            return "sdpa"
    return requested


# --- loading a checkpoint onto the ranks: never a whole copy per rank ------------------------------
# ZeRO-2 and plain data parallelism need the whole model on every rank, ZeRO-3 only a partition.
# transformers 5 loads safetensors by memory map and keeps the tensors on the mapped file when
# their dtype is the training dtype: ranks on one node then share one copy, the page cache. On
# GPUs each tensor goes from the map straight to the rank's GPU (device_map). Under ZeRO-3 the
# model is built partitioned (DeepSpeed's zero.Init, through transformers' HfDeepSpeedConfig) and
# each rank reads only its own slice of each tensor from the file: transformers' own ZeRO-3 path
# loads the whole checkpoint into rank 0's memory first, the 140 GB of a 70B model.


def load_whole(path: Path, *, dtype: torch.dtype, attn_implementation: str):
    """The whole model on this rank: memory-mapped on CPU, streamed to the rank's GPU on a GPU."""
    from transformers import AutoModelForCausalLM

    from chla_train.distributed import local_cuda_device

    placement = {}
    if torch.cuda.is_available():
        placement["device_map"] = {"": torch.device("cuda", local_cuda_device(torch.cuda.device_count()))}
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation, **placement
    )


@contextmanager
def partitioned_loading(deepspeed_config: dict[str, Any]):
    """While active, models are built partitioned over the ranks of the (initialised) process
    group by transformers and PEFT: model directories by `load_partitioned`, embeddings resized
    and new rows initialised on partitions, modules_to_save copies gathered one at a time."""
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(deepspeed_config)  # transformers holds only a weak reference
    try:
        yield keep_alive
    finally:
        unset_hf_deepspeed_config()


def gather_in_place_over_gloo() -> None:
    """Make DeepSpeed's ZeRO-3 parameter gathering on CPUs (gloo) write straight into the gathered
    tensor: each rank's partition broadcast from its owner into its place. gloo's all-gather
    (all_gather_into_tensor, which DeepSpeed uses) stages the whole output in a buffer of its own
    first, so every gathered parameter was held twice at once: measured on two ranks gathering a
    32,000 x 1,024 bf16 matrix (62 MiB), the peak rose by 127 MiB, and by 63 MiB with broadcasts.
    For the vocabulary matrices that was the largest moment of a ZeRO-3 step. NCCL gathers in
    place: nothing changes on GPUs."""
    import_deepspeed()
    import deepspeed.comm
    import torch.distributed as dist

    allgather = deepspeed.comm.allgather_fn
    if getattr(allgather, "in_place_over_gloo", False):
        return

    def allgather_fn(output_tensor, input_tensor, group=None, async_op=False, **kwargs):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        equal_places = output_tensor.numel() == world * input_tensor.numel()  # DeepSpeed pads partitions
        if dist.get_backend(group) != "gloo" or not output_tensor.is_contiguous() or not equal_places:
            return allgather(output_tensor, input_tensor, group=group, async_op=async_op, **kwargs)
        places = output_tensor.view(-1).chunk(world)
        places[rank].copy_(input_tensor.view(-1))
        works = [
            dist.broadcast(
                place, src=owner if group is None else dist.get_global_rank(group, owner), group=group, async_op=True
            )
            for owner, place in enumerate(places)
        ]
        return _AllWorks(works) if async_op else _AllWorks(works).wait()

    allgather_fn.in_place_over_gloo = True  # type: ignore[attr-defined]
    deepspeed.comm.allgather_fn = allgather_fn


class _AllWorks:
    """One handle over several collectives' handles (DeepSpeed waits on what allgather_fn returns)."""

    def __init__(self, works: list) -> None:
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


def partitioned_loading_active() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def load_partitioned(path: Path, *, dtype: torch.dtype, attn_implementation: str):
    """The model built under zero.Init (each rank allocates only its partition of every
    parameter), then each rank's partitions read from the safetensors files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with no_random_init_under_zero3():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    copy_own_partitions(model, safetensors_files(path), where=f"model {path}")
    model.config.name_or_path = str(path)  # as from_pretrained records it (PEFT's adapter_config reads it)
    return model


@contextmanager
def no_random_init_under_zero3():
    """transformers' from_config under ZeRO-3 initialises every weight at random, one module at a
    time gathered whole on every rank, drawn on rank 0 and broadcast (its
    integrations.deepspeed.initialize_weights_zero3): for a checkpoint that overwrites every
    weight right after (copy_own_partitions refuses one that does not), that is the whole model
    sent over the network for nothing, and the largest module (the embedding) held whole twice at
    once. Skipped here. The buffers that init would also recompute (the rotary frequencies) are
    already right: the model's constructor computes them, under transformers' guard against
    zero.Init changing arange's dtype."""
    import transformers.integrations.deepspeed as hf_deepspeed

    original = hf_deepspeed.initialize_weights_zero3
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = original


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ChlaError(
            f"model {path}: ZeRO-3 loading reads safetensors files, and there are none "
            "(only *.bin); convert the checkpoint with save_pretrained(safe_serialization=True)"
        )
    return files


def copy_own_partitions(model, files: list[Path], *, where: str) -> None:
    """Fill this rank's partition of every parameter from the checkpoint. A partition is a
    contiguous range of the flattened tensor (DeepSpeed pads the last one), so it is one byte range
    of the file, read straight into the partition."""
    import torch.distributed as dist

    rank = dist.get_rank()
    parameters = dict(model.named_parameters(remove_duplicate=False))  # tied weights under both names
    missing = set(dict(model.named_parameters()))
    for file in files:
        with SafetensorsRanges(file) as checkpoint:
            for name in checkpoint.names:
                param = parameters.get(name)
                if param is None:
                    raise ChlaError(
                        f"{where}: checkpoint tensor {name} has no parameter of that name in "
                        f"{type(model).__name__}; load this checkpoint with zero_stage 2"
                    )
                missing.discard(name)
                own = param.ds_tensor
                start = rank * own.ds_numel
                stop = min(start + own.ds_numel, param.ds_numel)
                if start < stop:
                    checkpoint.read_into(name, start, own[: stop - start])
    if missing:
        raise ChlaError(
            f"{where}: the checkpoint has no tensor for {sorted(missing)[:3]}; it does not belong "
            f"to a {type(model).__name__} of this config"
        )


class SafetensorsRanges:
    """Element ranges of the tensors in a safetensors file, read with plain reads: only the bytes
    asked for enter this process. (A memory map, safetensors' own way, keeps every page it touched
    in the process's resident memory until it is closed: half the file on each of two ranks.)"""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "rb")
        size = int.from_bytes(self.handle.read(8), "little")
        header = json.loads(self.handle.read(size))
        header.pop("__metadata__", None)
        self.tensors, self.data_start = header, 8 + size

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + out.numel()) of the flattened tensor `name`, into `out`."""
        info = self.tensors[name]
        if info["dtype"] not in ITEMSIZE:
            raise ChlaError(f"{self.path}: tensor {name} has dtype {info['dtype']}, which chla cannot load")
        dtype, itemsize = torch_dtype(info["dtype"]), ITEMSIZE[info["dtype"]]
        target = (
            out
            if out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
            else torch.empty(out.numel(), dtype=dtype)
        )
        self.handle.seek(self.data_start + info["data_offsets"][0] + start * itemsize)
        if self.handle.readinto(target.view(torch.uint8).numpy().data) != target.numel() * itemsize:
            raise ChlaError(f"{self.path}: tensor {name} is cut short; the file is incomplete")
        if target is not out:
            with torch.no_grad():
                out.copy_(target)

    def __enter__(self) -> SafetensorsRanges:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 holds only a partition of it (then .shape is (0,))."""
    return getattr(param, "ds_shape", param.shape)


@contextmanager
def writable_whole(params: list[torch.Tensor]):
    """Inside, `params` are whole tensors on every rank, and what rank 0 writes into them is kept
    (DeepSpeed's GatheredParameters); without partitioned loading, nothing to do."""
    if not partitioned_loading_active():
        yield
        return
    import_deepspeed()
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def base_model_for(params, vocab_size: int, *, dtype: torch.dtype, stage: str, log: Callable[[str], None] = print):
    """The model a training stage starts from (`model` dir or `init` config) with one embedding row
    per tokenizer entry. Returns (model, rows the base had before resizing)."""
    model = build_base_model(
        params.model, params.init, dtype=dtype, attn_implementation=params.attn_implementation, seed=params.seed
    )
    base_rows = resize_to_tokenizer(
        model,
        vocab_size,
        new_row_init=params.new_row_init,
        max_vocab_growth=params.max_vocab_growth,
        where=f"{stage}.tokenizer {params.tokenizer}",
        tokenizer_dir=params.tokenizer,
        seed=params.seed,
        log=log,
    )
    return model, base_rows


def resize_to_tokenizer(
    model,
    vocab_size: int,
    *,
    new_row_init: str,
    max_vocab_growth: float,
    where: str,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> int:
    """Give the model one embedding row (and lm_head row) per tokenizer entry, the new rows
    initialised by `new_row_init` (chla_train.new_rows). Returns the number of rows the model had
    before (the base vocabulary)."""
    from chla_train.new_rows import init_new_rows

    embed = model.get_input_embeddings()
    base_rows = full_shape(embed.weight)[0]
    if vocab_size == base_rows:
        return base_rows
    if vocab_size < base_rows:
        raise ChlaError(
            f"{where}: the tokenizer has {vocab_size} tokens but the model has {base_rows} "
            "embedding rows; a merged tokenizer must extend the base one, not shrink it "
            "(check that `tokenizer` belongs to this model)"
        )
    if vocab_size > base_rows * max_vocab_growth:
        raise ChlaError(
            f"{where}: the tokenizer has {vocab_size} tokens, {vocab_size / base_rows:.1f}x "
            f"the model's {base_rows} rows (limit max_vocab_growth={max_vocab_growth}); "
            "this is not the merged tokenizer for this model, or raise max_vocab_growth"
        )
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    matrices = _output_and_input_matrices(model)
    with writable_whole(matrices):  # whole on every rank, also under ZeRO-3
        stats = init_new_rows(
            matrices,
            base_rows,
            new_row_init,
            tokenizer_dir=tokenizer_dir,
            seed=seed,
            std=getattr(model.config, "initializer_range", 0.02),
            where=where,
        )
    log(f"vocabulary {base_rows} -> {vocab_size} rows; {stats.describe()}")
    return base_rows


def _output_and_input_matrices(model) -> list[torch.Tensor]:
    """The vocabulary matrices to initialise: the input embedding, and lm_head unless it is the
    same tensor (tied embeddings: one matrix, initialised once, from the input rows)."""
    matrices = [model.get_input_embeddings().weight]
    if not embeddings_tied(model):
        matrices.append(model.get_output_embeddings().weight)
    return matrices


def embeddings_tied(model) -> bool:
    """Whether the output head multiplies by the input embedding's own tensor (tie_word_embeddings,
    as SmolLM2 and most small modern bases have it): one matrix for both, trained, saved and
    merged as one. Asked of the tensors, not the config: the tie is what the modules hold."""
    head = model.get_output_embeddings()
    if head is None:
        return False
    embedding = model.get_input_embeddings()
    split = isinstance(head, NewRowsLinear), isinstance(embedding, NewRowsEmbedding)
    if any(split):  # stage 1's split rows: tied only when both sides share their new rows
        return all(split) and head.new_weight is embedding.new_weight
    return getattr(head, "weight", None) is embedding.weight


# --- embeddings mode: train only the rows the merge added -------------------------------------
# The base rows live in a frozen parameter and the new rows in a separate trainable one, so the
# optimizer never sees the base rows: no weight decay, no Adam update with a zero gradient can
# move them (a gradient mask would not stop decoupled weight decay). The optimizer state is also
# only new_rows x hidden instead of the whole matrix.


class NewRowsEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding, base_rows: int) -> None:
        super().__init__()
        weight = embedding.weight.detach()
        self.padding_idx = embedding.padding_idx
        self.base_weight = nn.Parameter(weight[:base_rows].clone(), requires_grad=False)
        self.new_weight = nn.Parameter(weight[base_rows:].clone(), requires_grad=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([self.base_weight, self.new_weight], dim=0)
        return nn.functional.embedding(input_ids, weight, self.padding_idx)


class NewRowsLinear(nn.Module):
    def __init__(self, linear: nn.Linear, base_rows: int) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.base_weight = nn.Parameter(weight[:base_rows].clone(), requires_grad=False)
        self.new_weight = nn.Parameter(weight[base_rows:].clone(), requires_grad=True)

    @classmethod
    def tied_to(cls, embedding: NewRowsEmbedding) -> NewRowsLinear:
        """The output head of tied embeddings: the embedding's own two parameters, so the new rows
        get the gradient of both uses (and are one parameter to the optimizer, which sees each
        parameter once), and the base rows stay out of the optimizer on the output side too."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.base_weight = embedding.base_weight
        head.new_weight = embedding.new_weight
        return head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Two products, not one with the matrices joined: backward then forms the weight gradient
        # of the new rows only, not of the whole frozen vocabulary.
        return torch.cat(
            [nn.functional.linear(hidden, self.base_weight), nn.functional.linear(hidden, self.new_weight)], dim=-1
        )


def setup_embeddings_training(model, *, base_rows: int, new_rows_only: bool, train_lm_head: bool, where: str) -> None:
    """Freeze everything but the input embedding (and lm_head if asked). With tied embeddings the
    one matrix trains, on the input and the output side alike."""
    tied = embeddings_tied(model)
    if tied and train_lm_head:
        raise ChlaError(
            f"{where}: train_lm_head with tied embeddings: lm_head is the input embedding and trains "
            "with it already; unset train_lm_head"
        )
    for param in model.parameters():
        param.requires_grad = False
    vocab = model.get_input_embeddings().weight.shape[0]
    if new_rows_only:
        if vocab == base_rows:
            raise ChlaError(
                f"{where}: new_rows_only but the tokenizer adds no rows to the model's "
                f"{base_rows}; use the merged tokenizer or unset new_rows_only"
            )
        embedding = NewRowsEmbedding(model.get_input_embeddings(), base_rows)
        model.set_input_embeddings(embedding)
        if tied:
            model.set_output_embeddings(NewRowsLinear.tied_to(embedding))
        elif train_lm_head:
            model.set_output_embeddings(NewRowsLinear(model.get_output_embeddings(), base_rows))
        return
    model.get_input_embeddings().weight.requires_grad = True
    if train_lm_head:
        model.get_output_embeddings().weight.requires_grad = True


def without_tied_output(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict to save for `model`: with tied embeddings, without the output head's copy of
    the one matrix, so the files hold one tensor (as transformers writes a tied model). The
    state dict of a ZeRO-3 gather or of the new-rows split holds the head's entries as tensors
    of their own, which save_pretrained would write twice."""
    if not (embeddings_tied(model) and getattr(model.config, "tie_word_embeddings", False)):
        return state_dict
    head = model.get_output_embeddings()
    name = next(name for name, module in model.named_modules() if module is head)
    return {key: value for key, value in state_dict.items() if not key.startswith(f"{name}.")}


def merge_new_rows_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn NewRows* keys (x.base_weight, x.new_weight) back into the stock x.weight."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".new_weight"):
            continue
        if key.endswith(".base_weight"):
            stem = key[: -len(".base_weight")]
            merged[f"{stem}.weight"] = torch.cat([value, state_dict[f"{stem}.new_weight"]], dim=0)
        else:
            merged[key] = value
    return merged


# --- LoRA ---------------------------------------------------------------------------------------


def check_module_names(model, names: Iterable[str], *, key: str) -> None:
    """Every target / modules_to_save name must match a module (PEFT only complains when none do)."""
    module_names = [name for name, _ in model.named_modules()]
    for wanted in names:
        if not any(name == wanted or name.endswith(f".{wanted}") for name in module_names):
            leaves = sorted(
                {name.rsplit(".", 1)[-1] for name in module_names if name and not name.rsplit(".", 1)[-1].isdigit()}
            )
            raise ChlaError(f"{key}: no module named {wanted!r} in the model; available names: {', '.join(leaves)}")


def apply_lora(
    model,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    modules_to_save: list[str],
    init_adapter: str | None,
    key_prefix: str,
    seed: int,
    new_token_rows: range | None = None,
    log: Callable[[str], None] = print,
):
    """Wrap `model` with a new LoRA adapter (its random A matrices drawn from `seed`), or with the
    trainable adapter in `init_adapter`. With `new_token_rows`, the vocabulary matrices named in
    modules_to_save (embed_tokens, lm_head) train only those rows (chla_train.token_rows)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from chla_train.token_rows import output_rows_without_full_gradient, token_rows_config

    if init_adapter is None:
        check_module_names(model, target_modules, key=f"{key_prefix}.lora_target_modules")
        check_module_names(model, modules_to_save, key=f"{key_prefix}.modules_to_save")
        tied = embeddings_tied(model)
        if tied:
            modules_to_save = one_tied_matrix(model, modules_to_save)
        modules_to_save, token_rows = token_rows_config(model, modules_to_save, new_token_rows)
        vocabulary = set(vocabulary_module_names(model))
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            task_type="CAUSAL_LM",
            target_modules=list(target_modules),
            modules_to_save=list(modules_to_save) or None,
            trainable_token_indices=token_rows,
            # Tied embeddings: PEFT's copy of embed_tokens (modules_to_save) would train beside a
            # frozen lm_head, two matrices from then on; with ensure_weight_tying it gives lm_head
            # the copy's own tensor, and PeftModel.from_pretrained and merge_and_unload keep the
            # tie (the flag is saved in adapter_config.json). Trainable token rows of the
            # embedding PEFT ties to the head by itself (the flag would only warn there).
            ensure_weight_tying=tied and bool(vocabulary & {*modules_to_save, *target_modules}),
        )
        # PEFT draws the A matrices from the global RNG, which nothing has seeded at this point:
        # torch seeds it differently in every process, and what ran before (submitit, say) moves
        # it on. Unseeded, no LoRA stage was reproducible and the local and Slurm runs of one
        # recipe differed. Same seed, same adapter; the caller's RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(model, config)
        output_rows_without_full_gradient(model)
        return model

    # Continue an earlier adapter: its own LoRA settings win (they are baked into its shapes).
    adapter_dir = Path(init_adapter)
    where = f"{key_prefix}.init_adapter {adapter_dir}"
    config_file = adapter_dir / "adapter_config.json"
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ChlaError(
            f"{where}: not a PEFT adapter directory (needs adapter_config.json and adapter_model.safetensors)"
        )
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False
    check_module_names(model, _as_list(config.target_modules), key=f"{where} target_modules")
    model = get_peft_model(model, config)
    from safetensors.torch import load_file

    grown: list[str] = []
    saved = load_file(str(weights_file))
    expected = _peft_saved_shapes(model)
    for name, tensor in list(saved.items()):
        want = expected.get(name)
        if (
            want is not None
            and _is_vocab_matrix(name)
            and tensor.ndim == 2
            and tensor.shape[1] == want[1]
            and tensor.shape[0] < want[0]
        ):
            # The tokenizer grew since the adapter was trained (SFT adds [PAD]: the original's
            # 49953 -> 49954 mismatch). Keep the trained rows, start the new ones at their mean.
            extra = tensor.float().mean(dim=0, keepdim=True).expand(want[0] - tensor.shape[0], -1)
            saved[name] = torch.cat([tensor, extra.to(tensor.dtype)], dim=0)
            grown.append(f"{name.rsplit('.', 2)[-2]} {tensor.shape[0]}->{want[0]}")
    for name, tensor in saved.items():
        if name not in expected:
            raise ChlaError(
                f"{where}: adapter tensor {name} has no counterpart in this model; the "
                "adapter was trained on a different base model"
            )
        if tuple(tensor.shape) != expected[name]:
            raise ChlaError(
                f"{where}: adapter tensor {name} has shape {tuple(tensor.shape)} but this "
                f"model needs {expected[name]}; the adapter was trained on a different "
                "base model or tokenizer (vocabulary size)"
            )
    if not saved:
        raise ChlaError(f"{where}: the adapter holds no tensors (an empty adapter); retrain it")
    set_peft_model_state_dict(model, saved)
    if grown:
        log(f"init_adapter: vocabulary rows grown to the tokenizer ({', '.join(grown)}), new rows = mean")
    return model


def vocabulary_module_names(model) -> list[str]:
    """The leaf names of the input embedding and the output head (embed_tokens, lm_head)."""
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return [names[id(module)] for module in modules if module is not None and id(module) in names]


def one_tied_matrix(model, modules_to_save: list[str]) -> list[str]:
    """modules_to_save with tied embeddings: naming either vocabulary matrix (embed_tokens,
    lm_head: the recipe default names both) means the one matrix, which PEFT trains through the
    input embedding and ties the head to (naming lm_head alone would give the head a copy of its
    own and untie the two)."""
    embedding, *head = vocabulary_module_names(model)
    if not any(name in modules_to_save for name in (embedding, *head)):
        return list(modules_to_save)
    kept = [name for name in modules_to_save if name not in (embedding, *head)]
    return [embedding, *kept]


def apply_stage_lora(
    model, params, *, stage: str, new_token_rows: range | None = None, log: Callable[[str], None] = print
):
    """apply_lora with a training stage's LoRA settings (its params' lora_*, modules_to_save,
    init_adapter and seed), its errors naming the stage's keys."""
    return apply_lora(
        model,
        r=params.lora_r,
        alpha=params.lora_alpha,
        dropout=params.lora_dropout,
        target_modules=params.lora_target_modules,
        modules_to_save=params.modules_to_save,
        init_adapter=params.init_adapter,
        key_prefix=stage,
        seed=params.seed,
        new_token_rows=new_token_rows,
        log=log,
    )


def _is_vocab_matrix(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "lm_head.weight"))


def _peft_saved_shapes(model) -> dict[str, tuple[int, ...]]:
    from peft import get_peft_model_state_dict

    return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(full_shape(p).numel() for p in model.parameters() if p.requires_grad)
    total = sum(full_shape(p).numel() for p in model.parameters())
    return trainable, total


def write_model_card(out_dir: Path, facts: dict[str, Any]) -> None:
    from chla_launcher.contract.atomic import write_text

    write_text(out_dir / "chla_training.json", json.dumps(facts, indent=2, ensure_ascii=False) + "\n")
