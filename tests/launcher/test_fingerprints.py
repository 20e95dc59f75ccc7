"""Fingerprints cover what can change a stage's output: editing one function of the trainer
changes the training stages and nothing that cannot import it; touching a file inside an input
directory re-runs its dependents; a new file matching an input glob re-runs the stage; nothing
else re-runs."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import chla

PACKAGES = ("chla_launcher", "chla_train", "chla_tools")

FINGERPRINTS = textwrap.dedent("""
    import importlib.util, json, sys
    from chla_launcher import graph
    from chla_launcher.contract.kinds import registry
    from chla_launcher.contract.recipe import load_recipe
    recipe = load_recipe(sys.argv[1])
    try:
        codes = {k.name: graph.code_version(k.entry_module, *([k.finalize.split(":")[0]] if k.finalize else []))
                 for k in registry().values()}
    except TypeError:  # a chla whose fingerprints hash only the runner module
        codes = {}
    print(json.dumps({"stages": graph.fingerprints(recipe), "code": codes,
                      "package": importlib.util.find_spec("chla_train").origin}))
""")


def copy_packages(dest: Path) -> Path:
    """The three chla packages (as this Python imports them) under their import names."""
    for name in PACKAGES:
        source = Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])
        shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def fingerprints_with(packages: Path, recipe: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(packages)}  # ahead of the editable install
    out = subprocess.run(
        [sys.executable, "-c", FINGERPRINTS, str(recipe)],
        env=env,
        cwd=recipe.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def edit_one_function(path: Path) -> None:
    """Add a statement at the top of the first function with a body in `path`."""
    source = path.read_text()
    function = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef))
    first = function.body[0]
    lines = source.splitlines(keepends=True)
    lines.insert(first.lineno - 1, " " * first.col_offset + "_edited_by_the_test = 1\n")
    path.write_text("".join(lines))


def test_editing_the_trainer_changes_only_the_stages_that_run_it(tmp_path):
    text, tok, model = tmp_path / "a.txt", tmp_path / "tok", tmp_path / "model"
    text.write_text("一\n")
    tok.mkdir()
    model.mkdir()
    (tmp_path / "sft.json").write_text("[]")
    init = "{hidden_size: 16, num_hidden_layers: 1}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: fp
        stages:
          spm: {{kind: train_spm, params: {{inputs: [{text}]}}}}
          merged_tok: {{kind: merge_tokenizer, params: {{base: {tok}, add: "${{stages.spm.out}}/spm.model"}}}}
          corpus: {{kind: pretokenize, params: {{tokenizer: "${{stages.merged_tok.out}}/tokenizer", inputs: [{text}]}}}}
          pt: {{kind: pretrain, params: {{tokenizer: "${{stages.merged_tok.out}}/tokenizer", corpus: "${{stages.corpus.out}}", init: {init}}}}}
          sft: {{kind: sft, params: {{tokenizer: {tok}, train_file: {tmp_path / "sft.json"}, init: {init}}}}}
          merged: {{kind: merge, params: {{base: {model}, adapters: ["${{stages.pt.out}}/adapter"]}}}}
          ev: {{kind: evaluate, params: {{model: {model}, ppl: [{text}]}}}}
          cmd: {{kind: command, params: {{argv: [echo]}}}}
    """)
    )
    original = copy_packages(tmp_path / "original")
    edited = copy_packages(tmp_path / "edited")
    edit_one_function(edited / "chla_train" / "trainer.py")

    before, after = fingerprints_with(original, recipe), fingerprints_with(edited, recipe)
    assert before["package"] == str(original / "chla_train" / "__init__.py")  # the copies were read
    assert after["package"] == str(edited / "chla_train" / "__init__.py")
    changed = {name for name in before["stages"] if before["stages"][name] != after["stages"][name]}
    # The training stages, and `merged` only because it consumes pt's output (its own code is the same).
    assert changed == {"pt", "sft", "merged"}
    assert {kind for kind in before["code"] if before["code"][kind] != after["code"][kind]} == {"pretrain", "sft"}
    # The same copies give the same fingerprints (the comparison can tell).
    assert fingerprints_with(original, recipe) == before


def test_a_runner_fingerprints_the_tool_modules_it_reaches_through_a_package(tmp_path):
    """The pretokenize and merge runners (chla_train.stages) import their tool packages, whose
    modules are reached only through the package's __init__: editing one of those deep modules
    changes its kind's code, and not the code of kinds that do not import it."""
    text = tmp_path / "a.txt"
    text.write_text("一\n")
    (tmp_path / "tok").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: fp
        stages:
          corpus: {{kind: pretokenize, params: {{tokenizer: {tmp_path / "tok"}, inputs: [{text}]}}}}
          cmd: {{kind: command, params: {{argv: [echo]}}}}
    """)
    )
    original = fingerprints_with(copy_packages(tmp_path / "original"), recipe)
    changed_kinds = {}
    for name, module in (("pretokenize", "chla_tools/pretokenize/documents.py"), ("merge", "chla_tools/merge/lora.py")):
        edited = copy_packages(tmp_path / name)
        edit_one_function(edited / module)
        after = fingerprints_with(edited, recipe)
        changed_kinds[name] = {kind for kind in original["code"] if original["code"][kind] != after["code"][kind]}
        stages = {stage for stage in original["stages"] if original["stages"][stage] != after["stages"][stage]}
        assert stages == ({"corpus"} if name == "pretokenize" else set()), name
    assert changed_kinds["pretokenize"] == {"pretokenize"}
    # evaluate and export read checkpoints and adapters with chla_tools.merge too
    assert "merge" in changed_kinds["merge"] and not changed_kinds["merge"] & {
        "pretokenize",
        "pretrain",
        "sft",
        "command",
    }


def plan_of(tmp_path: Path) -> dict[str, str]:
    """stage -> "run" or "skip", from a dry run."""
    out = chla("submit", "r.yaml", "--dry-run", cwd=tmp_path, check=True).stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines() if line.startswith(("  run ", "  skip"))}


@pytest.mark.slow
def test_input_directory_and_glob_contents_are_fingerprinted(tmp_path, demo_assets):
    data = tmp_path / "data"
    texts = tmp_path / "texts"
    data.mkdir()
    texts.mkdir()
    (data / "inner.txt").write_text("inside a directory input\n")
    (texts / "a.txt").write_text("第一个文件。\n")
    (tmp_path / "r.yaml").write_text(
        textwrap.dedent(f"""\
        name: inputs
        stages:
          reads_dir:
            kind: command
            params: {{argv: [ls, {data}], inputs: [{data}]}}
          after_dir:
            kind: command
            after: [reads_dir]
            params: {{argv: [echo, after]}}
          corpus:
            kind: pretokenize
            params: {{tokenizer: {demo_assets["base_tokenizer"]}, inputs: ["{texts}/*.txt"], workers: 1}}
          independent:
            kind: command
            params: {{argv: [echo, alone]}}
    """)
    )
    chla("submit", "r.yaml", cwd=tmp_path, check=True)
    run_dir = tmp_path / "runs" / "inputs"
    assert set(plan_of(tmp_path).values()) == {"skip"}

    inner = data / "inner.txt"
    stat = inner.stat()
    os.utime(inner, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same size
    assert plan_of(tmp_path) == {"reads_dir": "run", "after_dir": "run", "corpus": "skip", "independent": "skip"}
    os.utime(inner, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # control: back as it was
    assert set(plan_of(tmp_path).values()) == {"skip"}

    (texts / "b.txt").write_text("第二个文件。\n")
    assert plan_of(tmp_path) == {"reads_dir": "skip", "after_dir": "skip", "corpus": "run", "independent": "skip"}
    chla("submit", "r.yaml", cwd=tmp_path, check=True)
    frozen = (run_dir / "recipe.yaml").read_text()
    assert f"{texts}/a.txt" in frozen and f"{texts}/b.txt" in frozen and "*.txt" not in frozen
    manifest = json.loads((run_dir / "corpus" / "out" / "manifest.json").read_text())
    assert manifest["totals"]["files"] == 2
