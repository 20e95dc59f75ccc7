"""The stage-kind registry: kind name -> typed params, entry point (an import path string, so the
launcher never imports the training stack), traits, and what the kind declares to the rest of chla
(whether it trains a model, what its out/ holds), so that no other module switches on kind names.

Each module in this package describes one built-in kind: its params model (whose docstring is the
kind's description) and `KIND = StageKind(name, params, entry, ...)`; the registry collects them, so
adding a built-in kind is adding one module here and its runner, `chla_train/stages/<kind>.py`
(`run`, and `finalize` for an array kind; tests/launcher/test_kinds.py holds every kind to that).

A kind defined elsewhere (another package, a test) joins the registry either through an entry point
of the group `chla.kinds` that names its StageKind (found in every process, the jobs' too):

    [project.entry-points."chla.kinds"]
    distill = "my_package.kinds:DISTILL"

or by `register(KIND)` in the process that loads the recipe (`chla plan`, a test).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel

# The params every training kind extends (what `Trains` kinds are sized from), for kinds defined
# outside this package, and the base of every params model.
from ..import_path import import_entry as import_entry
from ._params import InputPath as InputPath
from ._params import StageParams as StageParams
from ._training import BlendPart as BlendPart
from ._training import TrainingParams as TrainingParams

# --- what a kind declares to the rest of chla (`chla plan` reads these; no module switches on names) ---


@dataclass(frozen=True)
class Trains:
    """The kind trains a model. Its params model extends TrainingParams (model or init, tokenizer,
    micro_batch_size, precision, zero_stage, LoRA settings, ...), from which `chla plan` sizes its
    memory; the names below are further fields of that params model."""

    # Tokens per training sequence (pretrain: block_size, sft: max_seq_length).
    sequence_length: str
    # What trains: a field holding "embeddings", "lora" or "full". None: LoRA, always.
    mode: str | None = None
    # Embeddings mode: bool fields "only the rows the tokenizer added" and "lm_head too".
    new_rows_only: str | None = None
    train_lm_head: str | None = None
    # The loss is taken at some positions only (SFT: the answers); planned as every position.
    partial_loss: bool = False
    # One [PAD] token is added to a tokenizer that has none (SFT).
    adds_pad_token: bool = False


@dataclass(frozen=True)
class ModelOutput:
    """out/<path> is a model directory (config.json and weights) that later stages may start from,
    and this is how its shape is known before the stage has run:

    - a kind that Trains: the model it trains (its base grown to its tokenizer);
    - `like`: the model a field of the params names (merge: `base`), its vocabulary grown to that
      of the training stages whose adapters the list field `grown_by` names;
    - `config`: a function of the params giving (config.json-like dict, where it came from), or
      (None, why it cannot be known yet) (import_gguf: the GGUF file's header).
    """

    path: str = ""  # below out/; "" is out/ itself
    like: str | None = None
    grown_by: str | None = None
    config: Callable[[Any], tuple[dict[str, Any] | None, str]] | None = None


@dataclass(frozen=True)
class TokenizerOutput:
    """out/ holds a tokenizer (an HF tokenizer directory somewhere below it), and this bounds its
    size before the stage has run: the base tokenizer a field names plus what the field `add` names
    (a VocabularyOutput of a stage, or a SentencePiece model), plus one [PAD] when the bool field
    `pad_token` says so (merge_tokenizer); or, with `of_model`, the vocab_size of the model the kind's
    ModelOutput describes (import_gguf)."""

    base: str | None = None
    add: str | None = None
    pad_token: str | None = None
    of_model: bool = False


@dataclass(frozen=True)
class VocabularyOutput:
    """out/ holds tokens to add to a tokenizer (a SentencePiece model, BPE merges), at most as many
    as the integer field `size` says (train_spm: vocab_size; train_bpe: merges, one token each)."""

    size: str


@dataclass(frozen=True)
class StageKind:
    """What the launcher knows about one kind of stage. Its one-line description (`chla kinds`) is
    the docstring of its params model."""

    name: str
    params: type[StageParams]
    # "module:function" run once per task with a chla_train.context.StageContext.
    entry: str
    # May the stage be an array (`array: N` in the recipe)? Array stages also get `finalize`, run
    # once after every task succeeded (aggregation, manifests); it writes nothing if None.
    array: bool = False
    finalize: str | None = None
    # May the stage run on nodes x tasks_per_node > 1 ranks?
    distributed: bool = False
    # Does the stage need the training extra (torch ...)? Informational for `chla kinds`.
    needs_training_stack: bool = True
    # For node-scaling sweeps with `scaling: strong`: the integer param that multiplies the global
    # batch (gradient accumulation), divided as the node count grows so the global batch stays put.
    accumulation_param: str | None = None
    # What the kind declares to the rest of chla (above): what `chla plan` sizes and follows.
    trains: Trains | None = None
    model_output: ModelOutput | None = None
    tokenizer_output: TokenizerOutput | None = None
    vocabulary_output: VocabularyOutput | None = None

    def __post_init__(self) -> None:
        """A declaration that names a field the params model lacks is the kind's author's mistake:
        said at definition, not when a recipe is planned."""
        params_fields = set(self.params.model_fields)
        named = {
            "trains": _field_names(self.trains),
            "model_output": _field_names(self.model_output, exclude=frozenset({"path"})),
            "tokenizer_output": _field_names(self.tokenizer_output),
            "vocabulary_output": _field_names(self.vocabulary_output),
            "accumulation_param": [self.accumulation_param] if self.accumulation_param else [],
        }
        for declaration, names in named.items():
            missing = [name for name in names if name not in params_fields]
            if missing:
                raise TypeError(
                    f"stage kind {self.name!r}: {declaration} names {', '.join(missing)}, not a field of "
                    f"{self.params.__name__}"
                )
        if self.trains is not None and not issubclass(self.params, TrainingParams):
            raise TypeError(
                f"stage kind {self.name!r} trains, so its params model must extend "
                "chla_launcher.contract.kinds.TrainingParams (what `chla plan` sizes)"
            )

    @property
    def description(self) -> str:
        return " ".join((self.params.__doc__ or "").split())

    @property
    def entry_module(self) -> str:
        return self.entry.split(":", 1)[0]


def _field_names(declaration: object, exclude: frozenset[str] = frozenset()) -> list[str]:
    """The params fields a declaration names (its str values)."""
    if declaration is None:
        return []
    values = [getattr(declaration, field.name) for field in fields(declaration) if field.name not in exclude]  # type: ignore[arg-type]
    return [value for value in values if isinstance(value, str)]


ENTRY_POINT_GROUP = "chla.kinds"
# Kinds given to register() in this process, by name.
_registered: dict[str, StageKind] = {}


@lru_cache(maxsize=1)
def registry() -> dict[str, StageKind]:
    """Every kind: the built-in modules of this package, then the `chla.kinds` entry points of the
    installed distributions, then those given to register() in this process."""
    kinds: dict[str, StageKind] = {}

    def add(kind: object, where: str) -> None:
        if not isinstance(kind, StageKind):
            raise RuntimeError(f"{where} is not a chla_launcher.contract.kinds.StageKind (got {type(kind).__name__})")
        if kind.name in kinds:
            raise RuntimeError(f"stage kind {kind.name!r} is defined twice ({where})")
        kinds[kind.name] = kind

    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        if isinstance(getattr(module, "KIND", None), StageKind):
            add(module.KIND, f"{module.__name__}.KIND")
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        add(entry_point.load(), f"entry point {entry_point.name} = {entry_point.value} ({ENTRY_POINT_GROUP})")
    for name, kind in _registered.items():
        add(kind, f"register({name!r})")
    return kinds


def register(kind: StageKind) -> StageKind:
    """Add a kind defined outside this package to the registry of this process (returns it, so it
    can decorate an assignment). Jobs run in other processes: a kind whose stages are submitted
    is found there through an entry point of the group `chla.kinds` instead."""
    if not isinstance(kind, StageKind):
        raise TypeError(f"register() takes a StageKind, not {type(kind).__name__}")
    if kind.name in registry() and registry()[kind.name] is not kind:
        raise ValueError(f"stage kind {kind.name!r} is defined already")
    _registered[kind.name] = kind
    registry.cache_clear()
    return kind


def get_kind(name: str) -> StageKind | None:
    return registry().get(name)


def input_path_fields(params_model: type[BaseModel]) -> dict[str, InputPath]:
    """Fields of a params model marked with InputPath, by name."""
    found: dict[str, InputPath] = {}
    for field_name, field in params_model.model_fields.items():
        markers = [meta for meta in field.metadata if isinstance(meta, InputPath)]
        markers += _markers_inside(field.annotation)
        if markers:
            found[field_name] = markers[0]
    return found


def _markers_inside(annotation: Any) -> list[InputPath]:
    """InputPath markers of `list[Annotated[str, InputPath()]]` or `Annotated[str, ...] | None`."""
    found: list[InputPath] = []
    if get_origin(annotation) is Annotated:
        found += [meta for meta in get_args(annotation)[1:] if isinstance(meta, InputPath)]
    else:
        for arg in get_args(annotation):
            found += _markers_inside(arg)
    return found


def input_path_values(value: Any) -> list[tuple[tuple[int | str, ...], str]]:
    """The paths inside one InputPath field's value, each with its key path below the field: the
    value itself (a str), the items of a list, and the `path` of list items that are parts (such
    as a corpus blend's `{path, weight}`, as a dict or a params model)."""
    if isinstance(value, str):
        return [((), value)] if value else []
    found: list[tuple[tuple[int | str, ...], str]] = []
    for index, item in enumerate(value if isinstance(value, list) else []):
        if isinstance(item, str):
            if item:
                found.append(((index,), item))
            continue
        path = item.get("path") if isinstance(item, dict) else getattr(item, "path", None)
        if isinstance(path, str) and path:
            found.append(((index, "path"), path))
    return found


def map_input_paths(value: Any, change: Callable[[str], str]) -> Any:
    """`value` (an InputPath field's raw value) with every path in it replaced by change(path)."""
    if isinstance(value, str):
        return change(value) if value else value
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for item in value:
        if isinstance(item, str):
            out.append(change(item) if item else item)
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
            out.append({**item, "path": change(item["path"])})
        else:
            out.append(item)
    return out
