"""Hostile recipes: everything a YAML file can do to the parser or to sbatch is one line on stderr
naming the file and the key or line, exit status 2, nothing submitted or written, in bounded time
and memory. Tested by class (each class a few representatives), through the real CLI: in this
process for the classes, in fresh processes for the bounds (their CPU time and peak memory read
with os.wait4) and for a few end-to-end `chla-submit --dry-run` runs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chla_launcher.contract.recipe import load_recipe

from ..helpers import refused_submission

STAGE = "  a:\n    kind: command\n    params: {argv: [echo, hi]}\n"
HEAD = "name: x\nstages:\n" + STAGE


def stage_with(field: str) -> str:
    """A recipe whose one stage has `field` (a line of its own, under the stage)."""
    return f"name: x\nstages:\n  a:\n    kind: command\n    {field}\n    params: {{argv: [echo, hi]}}\n"


def params_with(params: str, kind: str = "command") -> str:
    return f"name: x\nstages:\n  a:\n    kind: {kind}\n    params: {params}\n"


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """Billion laughs: each level a list of `width` aliases of the one before (width^levels values)."""
    lines = ["name: x", "vars:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, levels):
        lines.append(f"  l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\nstages:\n" + STAGE


def merge_bomb(levels: int = 12) -> str:
    """The same through merge keys: each mapping merges the one before twice under new keys."""
    lines = ["name: x", "vars:", "  m0: &m0 {a: 1, b: 2}"]
    for level in range(1, levels):
        lines.append(f"  m{level}: &m{level} {{x: *m{level - 1}, y: *m{level - 1}, <<: *m{level - 1}}}")
    return "\n".join(lines) + "\nstages:\n" + STAGE


# class -> [(case id, recipe text or bytes, fragments the one error line must contain)]. Each
# line names the file ("r.yaml") and the line or key where the trouble is.
CLASSES: dict[str, list[tuple[str, str | bytes, list[str]]]] = {
    "name-smuggles-a-line": [
        (
            "stage-trailing-newline",
            'name: x\nstages:\n  "a\\n":\n    kind: command\n    params: {argv: [a]}\n',
            ["r.yaml:2:", "stages", "stage name 'a\\n'"],
        ),
        (
            "stage-sbatch-line",
            'name: x\nstages:\n  "a\\n#SBATCH --wrap=id":\n    kind: command\n    params: {argv: [a]}\n',
            ["r.yaml:2:", "stages", "#SBATCH"],
        ),
        ("run-trailing-newline", 'name: "x\\n"\nstages:\n' + STAGE, ["r.yaml:1:", "name", "run name 'x\\n'"]),
        ("run-name-with-space", "name: 'x y'\nstages:\n" + STAGE, ["r.yaml:1:", "name", "1-64 letters"]),
    ],
    "path-traversal": [
        (
            "stage-dotdot",
            "name: x\nstages:\n  '..':\n    kind: command\n    params: {argv: [a]}\n",
            ["r.yaml:2:", "stages", "'..'"],
        ),
        (
            "stage-slash",
            "name: x\nstages:\n  'a/../../etc':\n    kind: command\n    params: {argv: [a]}\n",
            ["r.yaml:2:", "stages", "'a/../../etc'"],
        ),
        ("run-slash", "name: ../x\nstages:\n" + STAGE, ["r.yaml:1:", "name"]),
    ],
    "resources-beyond-slurm": [
        (
            "nodes-20-digits",
            "name: x\nresources: {nodes: 99999999999999999999}\nstages:\n" + STAGE,
            ["r.yaml:2:", "resources.nodes", "2147483647"],
        ),
        (
            "stage-nodes-2^31",
            stage_with("resources: {nodes: 2147483648}"),
            ["r.yaml:5:", "stages.a.resources.nodes", "2147483647"],
        ),
        (
            "tasks-per-node-16-bit",
            stage_with("resources: {tasks_per_node: 65534}"),
            ["r.yaml:5:", "stages.a.resources.tasks_per_node", "65533"],
        ),
        (
            "cpus-per-task-16-bit",
            "name: x\nresources: {cpus_per_task: 100000}\nstages:\n" + STAGE,
            ["r.yaml:2:", "resources.cpus_per_task", "65533"],
        ),
        (
            "gpus-per-node",
            "name: x\nresources: {gpus_per_node: 1000000}\nstages:\n" + STAGE,
            ["r.yaml:2:", "resources.gpus_per_node", "65533"],
        ),
        (
            "task-count-32-bit",
            "name: x\nresources: {nodes: 1000000, tasks_per_node: 65533}\nstages:\n" + STAGE,
            ["r.yaml:2:", "resources", "Slurm counts tasks in 32 bits", "2,147,483,647"],
        ),
        (
            "task-count-of-stage-and-defaults",
            "name: x\nresources: {tasks_per_node: 65533}\nstages:\n  a:\n    kind: command\n"
            "    resources: {nodes: 1000000}\n    params: {argv: [a]}\n",
            ["r.yaml:6:", "stages.a.resources", "Slurm counts tasks in 32 bits"],
        ),
        (
            "mem-64-bit",
            "name: x\nresources: {mem: 99999999999999T}\nstages:\n" + STAGE,
            ["r.yaml:2:", "resources.mem", "9,223,372,036,854,775,807 MB"],
        ),
        (
            "time-32-bit",
            "name: x\nresources: {time: '9999999-00:00:00'}\nstages:\n" + STAGE,
            ["r.yaml:2:", "resources.time", "2,147,483,647 minutes"],
        ),
        (
            "time-trailing-newline",
            'name: x\nresources: {time: "01:00:00\\n"}\nstages:\n' + STAGE,
            ["r.yaml:2:", "resources.time", "time must be"],
        ),
        (
            "mem-trailing-newline",
            'name: x\nresources: {mem: "4G\\n"}\nstages:\n' + STAGE,
            ["r.yaml:2:", "resources.mem", "memory must look like"],
        ),
        (
            "array-size",
            "name: x\nstages:\n  a:\n    kind: command\n    array: 1000001\n    params: {argv: [a]}\n",
            ["r.yaml:5:", "stages.a.array", "1000000"],
        ),
        (
            "array-chunk",
            "name: x\nslurm: {array_chunk: 4000002}\nstages:\n" + STAGE,
            ["r.yaml:2:", "slurm.array_chunk", "4000001"],
        ),
        (
            "signal-delay",
            "name: x\nslurm: {signal_delay_s: 65536}\nstages:\n" + STAGE,
            ["r.yaml:2:", "slurm.signal_delay_s", "65535"],
        ),
        (
            "sweep-nodes",
            "name: x\nstages:\n  a:\n    kind: command\n    sweep: {nodes: [1, 4294967296]}\n    params: {argv: [a]}\n",
            ["r.yaml:5:", "stages.a.sweep.nodes", "2,147,483,647"],
        ),
        (
            "sweep-task-count",
            "name: x\nstages:\n  a:\n    kind: command\n    sweep: {nodes: [1, 2147483647]}\n"
            "    resources: {tasks_per_node: 2}\n    params: {argv: [a]}\n",
            ["r.yaml:5:", "stages.a.sweep.nodes", "past Slurm's 2,147,483,647 tasks"],
        ),
    ],
    "numbers-beyond-range": [
        (
            "70-digit-int",
            "name: x\nresources: {nodes: " + "9" * 70 + "}\nstages:\n" + STAGE,
            ["r.yaml:2:", "resources.nodes", "more than 64 digits"],
        ),
        (
            "5000-digit-int-in-vars",
            "name: x\nvars: {n: " + "9" * 5000 + "}\nstages:\n" + STAGE,
            ["r.yaml:2:", "vars.n", "more than 64 digits"],
        ),
        (
            "float-overflow",
            "name: x\nresources: {nodes: 1.0e+999}\nstages:\n" + STAGE,
            ["r.yaml:2:", "resources.nodes", "not a finite number"],
        ),
        (
            "inf-in-a-list",
            params_with("{argv: [a], ok_exit_codes: [.inf]}"),
            ["r.yaml:5:", "stages.a.params.ok_exit_codes[0]", "'.inf' is not a finite number"],
        ),
        (
            "nan",
            params_with("{inputs: [/etc/hostname], character_coverage: .nan}", kind="train_spm"),
            ["r.yaml:5:", "stages.a.params.character_coverage", "not a finite number"],
        ),
        ("set-inf", HEAD, ["r.yaml", "--set stages.a.params.ok_exit_codes", "not a finite number"]),
    ],
    "alias-expansion": [
        ("billion-laughs", alias_bomb(), ["r.yaml:", "vars.l", "expands to more than 20,000 values"]),
        ("merge-key-bomb", merge_bomb(), ["r.yaml:", "vars.m", "expands to more than 20,000 values"]),
        (
            "alias-inside-itself",
            "name: x\nvars:\n  a: &a [1, *a]\nstages:\n" + STAGE,
            ["r.yaml:3:", "vars.a[1][1]", "nested deeper than 32 levels"],
        ),
    ],
    "deep-nesting": [
        (
            "flow-100000",
            "name: x\nvars:\n  a: " + "[" * 100_000 + "]" * 100_000 + "\nstages:\n" + STAGE,
            ["r.yaml:3:", "nested deeper than 32 levels"],
        ),
        (
            "block-40",
            "name: x\nvars:\n"
            + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(40))
            + "  " * 41
            + "v\nstages:\n"
            + STAGE,
            ["r.yaml:", "nested deeper than 32 levels"],
        ),
    ],
    "huge": [
        (
            "file-over-1-MiB",
            "name: x\nstages:\n" + STAGE + "# " + "x" * (1 << 20) + "\n",
            ["r.yaml: larger than 1 MiB: not a recipe"],
        ),
        (
            "200000-nodes",
            "name: x\nvars:\n  a: [" + "1," * 200_000 + "1]\nstages:\n" + STAGE,
            ["r.yaml:3:", "more than 20,000 YAML nodes"],
        ),
        (
            "huge-partition",
            "name: x\nslurm: {partition: " + "p" * 100_000 + "}\nstages:\n" + STAGE,
            ["r.yaml:2:", "slurm.partition", "is not a Slurm name"],
        ),
        (
            "huge-sbatch-value",
            "name: x\nslurm: {sbatch: {comment: " + "c" * 10_000 + "}}\nstages:\n" + STAGE,
            ["r.yaml:2:", "slurm.sbatch", "longer than 4096"],
        ),
        (
            "huge-stage-name",
            "name: x\nstages:\n  " + "s" * 1000 + ":\n    kind: command\n    params: {argv: [a]}\n",
            ["r.yaml:2:", "stages", "1-64 letters"],
        ),
        # Long strings pass every regex a recipe meets (credentials, references) in linear time.
        (
            "900k-letter-scalar",
            "name: x\nvars: {a: " + "a" * 900_000 + "}\nstages:\n  a:\n    kind: teleport\n",
            ["r.yaml:5:", "unknown stage kind 'teleport'"],
        ),
        (
            "300k-reference-starts",
            params_with('{argv: ["' + "${" * 300_000 + '"], inputs: [/nonexistent]}'),
            ["r.yaml:5:", "stages.a.params.inputs[0]", "input not found"],
        ),
    ],
    "bytes-and-control-characters": [
        (
            "not-utf8",
            b"name: x\nstages:\n  a:\n    kind: command\n    params: {argv: [\xff\xfe]}\n",
            ["r.yaml:5:", "not UTF-8 text (byte"],
        ),
        ("raw-nul", "name: x\nvars: {a: b\x00c}\nstages:\n" + STAGE, ["r.yaml:2:", "U+0000 is not allowed"]),
        ("raw-escape-char", "name: x\nvars: {a: b\x1bc}\nstages:\n" + STAGE, ["r.yaml:2:", "U+001B is not allowed"]),
        (
            "escaped-nul-in-argv",
            params_with('{argv: [echo, "a\\0b"]}'),
            ["r.yaml:5:", "stages.a.params.argv[1]", "control character U+0000"],
        ),
        (
            "escaped-esc-in-env",
            params_with('{argv: [echo], env: {A: "\\e[2J"}}'),
            ["r.yaml:5:", "stages.a.params.env.A", "control character U+001B"],
        ),
        (
            "carriage-return-in-partition",
            'name: x\nslurm: {partition: "gpu\\r"}\nstages:\n' + STAGE,
            ["r.yaml:2:", "slurm.partition", "control character U+000D"],
        ),
        (
            "line-separator-in-key",
            'name: x\nvars: {"a\\Lb": 1}\nstages:\n' + STAGE,
            ["r.yaml:2:", "vars", "control character U+2028"],
        ),
    ],
    "yaml-tags": [
        (
            "python-object",
            "name: x\nvars: {a: !!python/object/apply:os.system [id]}\nstages:\n" + STAGE,
            ["r.yaml:2:", "vars.a", "python/object/apply:os.system", "not allowed"],
        ),
        ("python-name", "name: !!python/name:os.system x\nstages:\n" + STAGE, ["r.yaml:1:", "name", "not allowed"]),
        ("binary", "name: x\nvars: {a: !!binary aGVsbG8=}\nstages:\n" + STAGE, ["r.yaml:2:", "vars.a", "binary"]),
        ("set", "name: x\nvars: {a: !!set {p, q}}\nstages:\n" + STAGE, ["r.yaml:2:", "vars.a", "set"]),
        ("omap", "name: x\nvars: {a: !!omap [p: 1]}\nstages:\n" + STAGE, ["r.yaml:2:", "vars.a", "omap"]),
        (
            "custom-tag",
            "name: x\nstages:\n  a:\n    kind: !shell command\n    params: {argv: [a]}\n",
            ["r.yaml:4:", "stages.a.kind", "'!shell' is not allowed"],
        ),
    ],
    "keys": [
        ("complex-key", "name: x\nvars: {? [a, b]: 1}\nstages:\n" + STAGE, ["r.yaml:2:", "vars", "plain scalars"]),
        ("mapping-key", "name: x\nvars:\n  ? {a: 1}\n  : 2\nstages:\n" + STAGE, ["r.yaml:3:", "vars", "plain scalars"]),
        ("tagged-key", "name: x\nvars: {!!binary aGk=: 1}\nstages:\n" + STAGE, ["r.yaml:2:", "vars", "on a key"]),
        (
            "duplicate-key-both-lines",
            "name: x\nstages:\n" + STAGE + "  b:\n    kind: command\n    params: {argv: [b]}\n" + STAGE,
            ["r.yaml:9:", "stages.a", "duplicate key 'a' (first at line 3"],
        ),
        (
            "duplicate-top-level",
            "name: x\nname: y\nstages:\n" + STAGE,
            ["r.yaml:2:", "name", "duplicate key 'name' (first at line 1"],
        ),
    ],
    "shell-and-sbatch-metacharacters": [
        (
            "partition-with-option",
            "name: x\nslurm: {partition: 'gpu --qos=high'}\nstages:\n" + STAGE,
            ["r.yaml:2:", "slurm.partition", "not a Slurm name"],
        ),
        (
            "partition-newline-sbatch",
            'name: x\nslurm: {partition: "gpu\\n#SBATCH --qos=high"}\nstages:\n' + STAGE,
            ["r.yaml:2:", "slurm.partition", "not a Slurm name"],
        ),
        (
            "account-command-substitution",
            "name: x\nslurm: {account: '$(id)'}\nstages:\n" + STAGE,
            ["r.yaml:2:", "slurm.account", "not a Slurm name"],
        ),
        (
            "qos-semicolon",
            "name: x\nslurm: {qos: 'normal;id'}\nstages:\n" + STAGE,
            ["r.yaml:2:", "slurm.qos", "not a Slurm name"],
        ),
        (
            "constraint-space",
            "name: x\nslurm: {constraint: 'a100 --wrap=id'}\nstages:\n" + STAGE,
            ["r.yaml:2:", "slurm.constraint", "not a Slurm constraint"],
        ),
        (
            "sbatch-key-newline",
            'name: x\nslurm: {sbatch: {"comment\\n": x}}\nstages:\n' + STAGE,
            ["r.yaml:2:", "slurm.sbatch", "not an sbatch long option name"],
        ),
        (
            "sbatch-value-newline",
            'name: x\nslurm: {sbatch: {comment: "a\\n#SBATCH --wrap=id"}}\nstages:\n' + STAGE,
            ["r.yaml:2:", "slurm.sbatch", "single line"],
        ),
        (
            "python-newline",
            'name: x\nslurm: {python: "/usr/bin/python\\nid"}\nstages:\n' + STAGE,
            ["r.yaml:2:", "slurm.python", "one line"],
        ),
        (
            "env-name-newline",
            params_with('{argv: [a], env: {"A\\nB": x}}'),
            ["r.yaml:5:", "stages.a.params.env", "invalid environment variable name"],
        ),
        (
            "env-name-equals",
            params_with("{argv: [a], env: {'LD_PRELOAD=x': y}}"),
            ["r.yaml:5:", "stages.a.params.env", "invalid environment variable name"],
        ),
    ],
}
CASES = [(cls, *case) for cls, cases in CLASSES.items() for case in cases]
# --set values go through the same parser and bounds as the file.
EXTRA_ARGS = {"set-inf": ["--set", "stages.a.params.ok_exit_codes=[.inf]"]}


def write(path: Path, text: str | bytes) -> None:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


@pytest.mark.parametrize("cls, case_id, text, fragments", CASES, ids=[f"{case[0]}:{case[1]}" for case in CASES])
def test_hostile_recipe_is_one_line_exit_2_nothing_written(tmp_path: Path, cls, case_id, text, fragments):
    # --dry-run: were a refusal to regress, the recipe is printed, not run (a local run of 2^31
    # ranks would start processes until the machine gives out).
    result = refused_submission(tmp_path, text, fragments, "--dry-run", *EXTRA_ARGS.get(case_id, []))
    line = result.stderr.strip()
    assert len(line) < 400, line  # one readable line, even for a megabyte of input


def chla_submit_dry_run(tmp_path: Path) -> subprocess.CompletedProcess:
    """`chla-submit r.yaml --dry-run` in tmp_path, in a process of its own (as a user runs it)."""
    return subprocess.run(
        [Path(sys.executable).parent / "chla-submit", "r.yaml", "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


# The controls: what is near each refusal, and legitimate, still loads (and means what it says).
def test_plain_yaml_near_the_limits_still_loads(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    nested = "".join("  " * (i + 1) + f"k{i}:\n" for i in range(28)) + "  " * 29 + "leaf\n"
    recipe.write_text(
        textwrap.dedent("""\
        name: x.y-z_1
        resources: &defaults {nodes: 1, mem: 8G, time: 4:00:00}
        slurm: {partition: "gpu,gpu-long", account: proj_1, qos: normal, constraint: "[a100|h100]&ib",
                sbatch: {comment: "a b'c $(id)"}, signal_delay_s: 65535}
        vars:
          when: 2024-01-01
          on: yes
          1: one
          list: &l [a, b]
          again: [*l, *l]
          big: 2147483647
        """)
        + "  nested:\n"
        + "".join("  " + line + "\n" for line in nested.splitlines())
        + textwrap.dedent("""\
        stages:
          a:
            kind: command
            resources: {<<: *defaults, mem: 16G, nodes: 2147483647}
            params: {argv: [echo, "$(touch pwned); #SBATCH"], env: {LC_ALL: C}}
        """)
    )
    loaded = load_recipe(recipe, check_inputs=False)
    stage = loaded.stages["a"]
    # The merge fills in what the stage lacks; the stage's own keys win.
    assert (stage.resources.mem, stage.resources.nodes) == ("16G", 2147483647)
    # YAML 1.1 reads 4:00:00 as the base-60 number 14400 (minutes, to Slurm: ten days); a time it stays.
    assert stage.resources.time == "4:00:00" and loaded.model.resources.time == "4:00:00"
    assert loaded.model.vars["when"] == "2024-01-01" and loaded.model.vars["on"] is True
    assert loaded.model.vars["1"] == "one" and loaded.model.vars["again"] == [["a", "b"], ["a", "b"]]
    assert stage.params_raw["argv"] == ["echo", "$(touch pwned); #SBATCH"]


def test_dry_run_batch_script_lines_stay_lines(tmp_path: Path):
    """End to end through a fresh `chla-submit --dry-run`: shell metacharacters in an sbatch value
    are quoted onto its one `#SBATCH` line, and a hostile argv never reaches the script."""
    (tmp_path / "r.yaml").write_text(
        textwrap.dedent("""\
        name: x
        executor: slurm
        slurm: {sbatch: {comment: "a b'c $(id) #SBATCH --wrap=id"}}
        stages:
          a:
            kind: command
            params: {argv: [echo, "$(touch pwned)"]}
        """)
    )
    result = chla_submit_dry_run(tmp_path)
    assert result.returncode == 0, result.stderr
    sbatch_lines = [line for line in result.stdout.splitlines() if "#SBATCH" in line]
    assert [line for line in sbatch_lines if "--comment" in line] == [
        "#SBATCH --comment='a b'\"'\"'c $(id) #SBATCH --wrap=id'"
    ]
    assert all(line.startswith("#SBATCH --") for line in sbatch_lines), sbatch_lines
    assert "#SBATCH --job-name=chla/x/a" in sbatch_lines and "touch pwned" not in result.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "case_id, text, fragment",
    [
        (
            "stage-trailing-newline",
            'name: x\nexecutor: slurm\nstages:\n  "a\\n":\n    kind: command\n    params: {argv: [a]}\n',
            "r.yaml:3: stages: stage name 'a\\n'",
        ),
        (
            "nodes-20-digits",
            "name: x\nexecutor: slurm\nresources: {nodes: 99999999999999999999}\nstages:\n" + STAGE,
            "r.yaml:3: resources.nodes: Input should be less than or equal to 2147483647",
        ),
    ],
    ids=["stage-trailing-newline", "nodes-20-digits"],
)
def test_issue_cases_through_chla_submit_dry_run(tmp_path: Path, case_id, text, fragment):
    """The two cases the issue found, as a new user meets them: `chla-submit --dry-run` in a
    process of its own (before the fix the first printed `#SBATCH --job-name=chla/x/a` and a
    line `` of its own; the second `#SBATCH --nodes=99999999999999999999`)."""
    write(tmp_path / "r.yaml", text)
    result = chla_submit_dry_run(tmp_path)
    assert result.returncode == 2 and "#SBATCH" not in result.stdout, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"chla: {fragment}"), result.stderr
    assert not (tmp_path / "runs").exists()


# The bounds, each class's worst case in a fresh interpreter: CPU seconds and peak memory above an
# interpreter that has imported the launcher (measured on the 2-core EPYC these tests run on: at
# most ~0.6 s and ~30 MB; the bounds leave room for a slower machine).
BOUNDED = [
    "billion-laughs",
    "merge-key-bomb",
    "alias-inside-itself",
    "flow-100000",
    "file-over-1-MiB",
    "200000-nodes",
    "5000-digit-int-in-vars",
    "huge-partition",
    "900k-letter-scalar",
    "300k-reference-starts",
]
CPU_BOUND_S = 5.0
MEMORY_BOUND_MB = 150
# Memory is the process's peak resident set as /proc reports it (VmHWM): getrusage's ru_maxrss of a
# child started from pytest carries over the parent's peak from before the exec (820 MB once the
# suite has loaded torch), which would hide the growth and fail the whole-process bound.
_MEASURE = """
import json, resource, sys, time
from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.recipe import load_recipe
def peak_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
base, base_peak = resource.getrusage(resource.RUSAGE_SELF), peak_mb()
try:
    load_recipe(sys.argv[1])
    outcome = "loaded"
except ChlaError as error:
    outcome = str(error)
end = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"outcome": outcome, "cpu_s": end.ru_utime + end.ru_stime - base.ru_utime - base.ru_stime,
                  "grew_mb": peak_mb() - base_peak, "peak_mb": peak_mb()}))
"""


@pytest.mark.parametrize("case_id", BOUNDED)
def test_hostile_recipe_time_and_memory_are_bounded(tmp_path: Path, case_id):
    text, fragments = next((text, fragments) for _, cid, text, fragments in CASES if cid == case_id)
    write(tmp_path / "r.yaml", text)
    process = subprocess.Popen(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "r.yaml")],
        stdout=subprocess.PIPE,
        text=True,
        # A hard stop too: a parser that runs away is killed instead of hanging the suite.
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CPU, (30, 30)),
    )
    assert process.stdout is not None
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, (process.returncode, out)
    measured = json.loads(out)
    assert measured["outcome"] != "loaded" and all(f in measured["outcome"] for f in fragments if f != "r.yaml"), out
    assert measured["cpu_s"] < CPU_BOUND_S, measured
    assert measured["grew_mb"] < MEMORY_BOUND_MB, measured
    # The whole process, interpreter and imports included (os.wait4's usage of this child alone).
    assert usage.ru_utime + usage.ru_stime < CPU_BOUND_S + 5 and measured["peak_mb"] < 400, (usage, measured)
