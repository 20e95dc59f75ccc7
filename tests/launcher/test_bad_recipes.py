"""Every kind of bad recipe: one line naming file, key (and line where YAML gives it), exit status 2,
no traceback, nothing submitted or written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ..helpers import refused_submission
from .conftest import chla

GOOD_STAGE = """\
  hello:
    kind: command
    params:
      argv: [echo, hi]
"""

# (id, recipe text, substrings the one-line error must contain)
CASES = [
    ("yaml-syntax", "name: x\nstages: [a: b\n", ["r.yaml:", "YAML syntax error"]),
    ("empty-file", "", ["r.yaml", "empty"]),
    ("only-comments", "# nothing here\n", ["r.yaml", "empty"]),
    ("not-a-mapping", "- a\n- b\n", ["r.yaml:1", "mapping"]),
    ("unknown-top-key", "name: x\nnmae: y\nstages:\n" + GOOD_STAGE, ["r.yaml:2:", "nmae", "unknown key"]),
    (
        "unknown-stage-key",
        "name: x\nstages:\n  hello:\n    kind: command\n    kinds: 3\n    params: {argv: [a]}\n",
        ["r.yaml:5:", "stages.hello.kinds", "unknown key"],
    ),
    ("missing-stages", "name: x\n", ["r.yaml", "stages", "required"]),
    (
        "wrong-type-nodes",
        "name: x\nresources:\n  nodes: two\nstages:\n" + GOOD_STAGE,
        ["r.yaml:3:", "resources.nodes", "integer"],
    ),
    (
        "unknown-kind",
        "name: x\nstages:\n  hello:\n    kind: teleport\n",
        ["r.yaml:4:", "stages.hello.kind", "unknown stage kind 'teleport'"],
    ),
    (
        "missing-stage-reference",
        "name: x\nstages:\n  a:\n    kind: command\n    params:\n      argv: [cat, '${stages.nope.out}/f']\n",
        ["r.yaml:5:", "stages.a.params", "missing stage 'nope'"],
    ),
    (
        "after-missing-stage",
        "name: x\nstages:\n  a:\n    kind: command\n    after: [ghost]\n    params: {argv: [a]}\n",
        ["r.yaml:5:", "stages.a.after", "ghost"],
    ),
    (
        "cycle",
        "name: x\nstages:\n  a:\n    kind: command\n    after: [b]\n    params: {argv: [a]}\n"
        "  b:\n    kind: command\n    after: [a]\n    params: {argv: [b]}\n",
        ["r.yaml:3:", "dependency cycle: a -> b -> a"],
    ),
    (
        "missing-input-file",
        "name: x\nstages:\n  a:\n    kind: command\n    params:\n      argv: [cat]\n"
        "      inputs: [/nonexistent/corpus.txt]\n",
        ["r.yaml:7:", "stages.a.params.inputs[0]", "input not found: /nonexistent/corpus.txt"],
    ),
    (
        "negative-nodes",
        "name: x\nstages:\n  a:\n    kind: command\n    resources: {nodes: -1}\n    params: {argv: [a]}\n",
        ["r.yaml:5:", "stages.a.resources.nodes", "greater than or equal to 1"],
    ),
    (
        "malformed-mem",
        "name: x\nresources: {mem: lots}\nstages:\n" + GOOD_STAGE,
        ["r.yaml:2:", "resources.mem", "memory must look like"],
    ),
    (
        "malformed-time",
        "name: x\nresources: {time: 1h}\nstages:\n" + GOOD_STAGE,
        ["r.yaml:2:", "resources.time", "time must be"],
    ),
    (
        "zero-array",
        "name: x\nstages:\n  a:\n    kind: command\n    array: 0\n    params: {argv: [a]}\n",
        ["r.yaml:5:", "stages.a.array"],
    ),
    (
        "duplicate-stage",
        "name: x\nstages:\n" + GOOD_STAGE + GOOD_STAGE,
        ["r.yaml:7:", "stages.hello", "duplicate key 'hello'"],
    ),
    (
        "bad-stage-name",
        "name: x\nstages:\n  'a b':\n    kind: command\n    params: {argv: [a]}\n",
        ["r.yaml", "stages", "'a b'"],
    ),
    # A stage's directory would be the run directory's own file.
    (
        "stage-named-recipe.yaml",
        "name: x\nstages:\n  recipe.yaml:\n    kind: command\n    params: {argv: [a]}\n",
        ["r.yaml:2:", "stages", "'recipe.yaml' is taken", "reserved"],
    ),
    (
        "stage-named-chain.json",
        "name: x\nstages:\n" + GOOD_STAGE + "  chain.json:\n    kind: command\n    params: {argv: [a]}\n",
        ["r.yaml:2:", "stages", "'chain.json' is taken"],
    ),
    ("bad-run-name", "name: 'x; rm -rf /'\nstages:\n" + GOOD_STAGE, ["r.yaml:1:", "name"]),
    (
        "empty-argv",
        "name: x\nstages:\n  a:\n    kind: command\n    params: {argv: []}\n",
        ["r.yaml:5:", "stages.a.params.argv"],
    ),
    (
        "unknown-param",
        "name: x\nstages:\n  a:\n    kind: command\n    params: {argv: [a], shell: true}\n",
        ["r.yaml:5:", "stages.a.params.shell", "unknown key"],
    ),
    (
        "unknown-reference",
        "name: x\nstages:\n  a:\n    kind: command\n    params: {argv: ['${foo}']}\n",
        ["r.yaml:5:", "stages.a.params", "unknown reference"],
    ),
    (
        "newline-in-sbatch",
        'name: x\nslurm:\n  sbatch: {comment: "a\\nb"}\nstages:\n' + GOOD_STAGE,
        ["r.yaml:3:", "slurm.sbatch", "single line"],
    ),
    (
        "distributed-not-allowed-array",
        "name: x\nstages:\n  a:\n    kind: command\n    array: 2\n    resources: {nodes: 2}\n    params: {argv: [a]}\n",
        ["r.yaml:5:", "stages.a.array"],
    ),
    (
        "set-missing-path",
        "name: x\nstages:\n" + GOOD_STAGE,
        ["r.yaml", "--set stages.nope.kind", "stages.nope does not exist"],
    ),
    ("set-bad-value", "name: x\nstages:\n" + GOOD_STAGE, ["r.yaml", "resources.nodes", "integer"]),
    ("set-no-equals", "name: x\nstages:\n" + GOOD_STAGE, ["r.yaml", "--set", "KEY.PATH=VALUE"]),
    (
        "set-unknown-key",
        "name: x\nstages:\n" + GOOD_STAGE,
        ["r.yaml", "stages.hello.params.argvv", "unknown key"],
    ),
]
# --set values go through the same checks as the file.
EXTRA_ARGS = {
    "set-missing-path": ["--set", "stages.nope.kind=command"],
    "set-bad-value": ["--set", "resources.nodes=many"],
    "set-no-equals": ["--set", "resources.nodes"],
    "set-unknown-key": ["--set", "stages.hello.params.argvv=[a]"],
}


@pytest.mark.parametrize("case_id, text, expected", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_bad_recipe_is_one_line_exit_2_nothing_written(tmp_path: Path, case_id, text, expected, executor):
    extra = EXTRA_ARGS.get(case_id, [])
    result = refused_submission(tmp_path, textwrap.dedent(text), expected, "--executor", executor, *extra)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


def test_missing_recipe_file(tmp_path: Path):
    result = chla("submit", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "chla: nope.yaml: recipe file not found"


def test_non_utf8_recipe(tmp_path: Path):
    (tmp_path / "r.yaml").write_bytes(b"name: x\nstages: \xff\xfe\n")
    result = chla("submit", "r.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "not UTF-8" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# Loads a recipe with --set overrides and prints the queuefile executor's settings, or the error.
LOAD_WITH_OVERRIDES = """
import sys
from chla_launcher.contract.errors import RecipeError
from chla_launcher.contract.recipe.load import load_recipe
try:
    recipe = load_recipe(sys.argv[1], overrides=sys.argv[2:], check_inputs=False).model
except RecipeError as error:
    print(error)
else:
    print(recipe.executor_settings().queue, recipe.slurm.sbatch)
"""


def test_set_creates_the_settings_block_of_a_plugin_executor(tmp_path: Path):
    """`--set BLOCK.KEY=VALUE` creates an executor's settings block the recipe leaves out, for a
    plugin executor as for Slurm (tests/plugins/dist registers `queuefile` through its entry
    point, on the PYTHONPATH of a fresh process); the block's model still refuses a key it does not
    have. Control: a block that no executor or recipe key names is refused."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nexecutor: queuefile\nstages:\n" + GOOD_STAGE)
    plugins = str(Path(__file__).parents[1] / "plugins" / "dist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [plugins, os.environ.get("PYTHONPATH")]))}

    def load(*overrides: str) -> str:
        argv = [sys.executable, "-c", LOAD_WITH_OVERRIDES, str(recipe), *overrides]
        return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.strip()

    assert load("queuefile.queue=elsewhere", "slurm.sbatch.qos=low") == "elsewhere {'qos': 'low'}"
    assert "queuefile.qeueu: unknown key" in load("queuefile.qeueu=elsewhere")
    assert load("nothere.queue=elsewhere").endswith("--set nothere.queue: nothere does not exist in the recipe")
