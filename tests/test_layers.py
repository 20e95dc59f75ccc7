"""The direction of every import between chla's modules: four layers, each importing only those
below it, and no import circle anywhere.

    launcher   chla_launcher (recipe loading's callers, graph, plans, executors, commands)
    train      chla_train (the job side)
    tools      chla_tools (the libraries behind the stages)
    contract   chla_launcher.contract (errors, atomic files, run directory, kinds, recipe model)

Every import counts: at the top of a module, inside a function, or under TYPE_CHECKING (a deferred
import that only hides a circle is still one). Each check has a control that must fail it.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from .helpers import REPO

# Import name -> folder, as pyproject.toml's package-dir installs them.
PACKAGES = {"chla_launcher": "launcher", "chla_tools": "tools", "chla_train": "chla_train"}
LAYERS = ("contract", "tools", "train", "launcher")  # bottom first


def layer_of(module: str) -> str:
    # The chla_launcher package itself is its version string: importing the contract runs it.
    if module == "chla_launcher" or module.startswith("chla_launcher.contract"):
        return "contract"
    if module.startswith("chla_tools"):
        return "tools"
    if module.startswith("chla_train"):
        return "train"
    return "launcher"


def find_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in (root / folder).rglob("*.py"):
            parts = [package, *path.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_edges(root: Path) -> dict[str, set[str]]:
    """Module -> the chla modules it imports (a name inside a module counts as the module)."""
    modules = find_modules(root)

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                target = known(name)
                if target is not None and target != module:
                    edges[module].add(target)
    return edges


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in edges.items()
        for target in targets
        if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module))
    )


def import_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    nodes = sorted(set(edges) | {target for targets in edges.values() for target in targets})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_every_import_points_down_and_none_closes_a_circle():
    edges = import_edges(REPO)
    assert len(edges) > 100  # the walk found the packages (a wrong root finds nothing and passes)
    assert upward_imports(edges) == []
    assert import_circles(edges) == []


@pytest.fixture
def copy_of_the_packages(tmp_path) -> Path:
    for folder in PACKAGES.values():
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_control_an_upward_import_inside_a_function_is_found(copy_of_the_packages):
    root = copy_of_the_packages
    before = set(upward_imports(import_edges(root)))
    errors = root / "launcher" / "contract" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from chla_train.entry import StageJob\n")
    assert set(upward_imports(import_edges(root))) - before == {
        "chla_launcher.contract.errors (contract) imports chla_train.entry (train)"
    }


def test_control_a_circle_closed_under_type_checking_is_found(copy_of_the_packages):
    root = copy_of_the_packages
    atomic = root / "launcher" / "contract" / "atomic.py"
    before = import_circles(import_edges(root))
    atomic.write_text(atomic.read_text() + "\nif TYPE_CHECKING:\n    from .rundir import RunDir\n")
    new = [circle for circle in import_circles(import_edges(root)) if circle not in before]
    assert len(new) == 1 and {"chla_launcher.contract.atomic", "chla_launcher.contract.rundir"} <= set(new[0])


def test_the_contract_loads_nothing_above_it():
    """Importing every contract module in a fresh interpreter loads no module of another layer,
    and neither torch nor the training stack."""
    contract = sorted(module for module in find_modules(REPO) if layer_of(module) == "contract")
    code = (
        "import importlib, sys\n"
        f"for name in {contract!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    above = [name for name in loaded if name.split(".")[0] in PACKAGES and layer_of(name) != "contract"]
    assert above == []
    assert not {"torch", "transformers", "peft", "deepspeed"} & {name.split(".")[0] for name in loaded}
    assert "chla_launcher.contract.recipe.schema" in loaded  # the control: the imports did run
