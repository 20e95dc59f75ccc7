"""The training workflow sits below the job entry: the entry reaches it through a kind's runner,
and nothing the training stages import, at the top of a module or deferred inside a function,
imports chla_train.entry back (it once took return_freed_memory from there)."""

from __future__ import annotations

import ast
from pathlib import Path

import chla_train

PACKAGE = Path(chla_train.__file__).parent
TRAINING_RUNNERS = ("chla_train.stages.pretrain", "chla_train.stages.sft")


def imported_modules(source: str) -> set[str]:
    """Every module a source imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module_file(name: str, package: Path) -> Path | None:
    parts = name.split(".")[1:]
    for candidate in (package.joinpath(*parts).with_suffix(".py"), package.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file():
            return candidate
    return None


def chla_train_reach(roots: tuple[str, ...], package: Path = PACKAGE) -> dict[str, str]:
    """The chla_train modules `roots` import, transitively: {module: the module that imports it}."""
    reached: dict[str, str] = {root: root for root in roots}
    todo = list(roots)
    while todo:
        name = todo.pop()
        path = module_file(name, package)
        if path is None:
            continue
        for imported in imported_modules(path.read_text()):
            if imported.startswith("chla_train.") and imported not in reached and module_file(imported, package):
                reached[imported] = name
                todo.append(imported)
    return reached


def test_nothing_the_training_stages_import_imports_the_job_entry():
    reached = chla_train_reach(TRAINING_RUNNERS)
    assert "chla_train.training_workflow" in reached and "chla_train.trainer" in reached
    assert "chla_train.entry" not in reached, f"imported by {reached.get('chla_train.entry')}"


def test_a_deferred_import_of_the_entry_is_found(tmp_path):
    """The control: a loop module that imports the entry inside a function, as trainer.py's
    model_loading did, is caught."""
    package = tmp_path / "chla_train"
    (package / "stages").mkdir(parents=True)
    (package / "stages" / "pretrain.py").write_text("from chla_train.trainer import Trainer\n")
    (package / "trainer.py").write_text(
        "def model_loading():\n    from chla_train.entry import return_freed_memory\n    return_freed_memory()\n"
    )
    (package / "entry.py").write_text("def return_freed_memory():\n    pass\n")
    reached = chla_train_reach(("chla_train.stages.pretrain",), package)
    assert reached.get("chla_train.entry") == "chla_train.trainer"
