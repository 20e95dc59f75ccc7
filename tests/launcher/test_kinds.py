"""Every registered stage kind's entry (and finalize, for the kinds that have one) names a function
that exists and takes the stage context: a renamed runner fails here, not in a job."""

from __future__ import annotations

import inspect
import typing

import pytest

from chla_launcher.contract.kinds import import_entry, registry
from chla_launcher.contract.kinds.merge import MergeParams
from chla_train.context import StageContext

KINDS = sorted(registry())


def _takes_one_context(function) -> bool:
    parameters = list(inspect.signature(function).parameters.values())
    return bool(parameters) and all(p.default is not inspect.Parameter.empty for p in parameters[1:])


def test_the_registry_holds_every_kind_the_recipes_use():
    assert {
        "train_spm",
        "merge_tokenizer",
        "vocab_report",
        "pretokenize",
        "pretrain",
        "sft",
        "merge",
        "evaluate",
        "export",
        "command",
        "summarize",
        "fetch_assets",
    } <= set(KINDS)


@pytest.mark.parametrize("name", KINDS)
def test_entry_and_finalize_resolve(name):
    kind = registry()[name]
    assert kind.description and "\n" not in kind.description  # the params model's docstring, for `chla kinds`
    entry = import_entry(kind.entry)
    assert callable(entry) and _takes_one_context(entry), kind.entry
    if kind.finalize is not None:
        finalize = import_entry(kind.finalize)
        assert callable(finalize) and _takes_one_context(finalize), kind.finalize
    # finalize is what runs once after an array's tasks
    assert kind.array or kind.finalize is None, name


@pytest.mark.parametrize("name", KINDS)
def test_every_runner_lives_in_the_stage_module_named_like_its_kind(name):
    """One predictable place: chla_train/stages/<kind>.py, `run` (and `finalize`), typed with the
    kind's own params model."""
    kind = registry()[name]
    assert kind.entry == f"chla_train.stages.{name}:run"
    assert kind.finalize in (None, f"chla_train.stages.{name}:finalize")
    context = inspect.signature(import_entry(kind.entry), eval_str=True).parameters["ctx"].annotation
    assert typing.get_args(context) == (kind.params,), (name, context)


def test_a_runner_typed_with_another_kinds_params_is_caught():
    def run(ctx: StageContext[MergeParams]) -> dict:
        return {}

    context = inspect.signature(run, eval_str=True).parameters["ctx"].annotation
    assert typing.get_args(context) != (registry()["pretokenize"].params,)


def test_a_misspelt_entry_does_not_resolve():
    module = registry()["merge"].entry.split(":")[0]
    with pytest.raises(AttributeError):
        import_entry(f"{module}:no_such_runner")
    with pytest.raises(ModuleNotFoundError):
        import_entry("chla_tools.no_such_module:run")
