"""Helpers shared by the tests: running the real CLI, reading a run's status, the real local Slurm cluster,
a stand-in for the trainer's DeepSpeed engine."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from chla_train.model_config import llama_config

REPO = Path(__file__).resolve().parents[1]
# A <1M-parameter LLaMA apart from its 32,000-row vocabulary (process start dominates): a training
# stage's `init:` in the tests that train.
TINY_LLAMA = llama_config(hidden=16, intermediate=32, layers=2, heads=2, positions=512)


def one_command_recipe(name: str, script: str, args: list[str], env: dict[str, str]) -> dict:
    """A recipe (as a dict; JSON is YAML) whose one stage `echo` runs `python -c script *args`
    with `env`."""
    argv = [sys.executable, "-c", script, *args]
    return {"name": name, "stages": {"echo": {"kind": "command", "params": {"argv": argv, "env": env}}}}


def command_stage(*argv: str, **keys: Any) -> dict:
    """A recipe's `command` stage (as a dict; JSON is YAML) that runs `argv`, with the stage's other
    `keys` (after, array, resources)."""
    return {"kind": "command", **keys, "params": {"argv": list(argv)}}


def python_stage(script: str, **keys: Any) -> dict:
    """A `command` stage that runs `python -c script` with this interpreter: the script as Python
    reads it, with no YAML quoting or f-string braces to escape around it."""
    return command_stage(sys.executable, "-c", script, **keys)


def write_recipe(tmp_path: Path, recipe: dict | str) -> Path:
    """tmp_path/r.yaml: a recipe dict as JSON (JSON is YAML), or recipe text dedented."""
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe) if isinstance(recipe, dict) else textwrap.dedent(recipe))
    return path


# Words a shell would act on ({pwn}: a directory the test watches for files they would create):
# an argv or environment value must arrive as written, through every executor and ssh.
_SHELL_WORDS = [
    "; touch {pwn}/semicolon",
    "$(touch {pwn}/dollar)",
    "`touch {pwn}/backtick`",
    'it\'s "quoted"',
    "two\nlines",
    "| touch {pwn}/pipe &",
    "*",
]


def shell_words(tmp_path: Path, more: list[str]) -> tuple[Path, list[str]]:
    """The words a shell would act on, and `more`, aimed at a new empty directory under tmp_path
    (returned: it must still be empty at the end)."""
    pwn = tmp_path / "pwned"
    pwn.mkdir()
    return pwn, [word.format(pwn=pwn) for word in [*_SHELL_WORDS, *more]]


def chla(
    *args: str, cwd: Path | None = None, check: bool = False, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the real `chla` CLI in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "chla_launcher", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"chla {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def chla_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the real `chla` CLI in this process, from `cwd`: what `chla()` returns, without the 0.3 s
    a new interpreter takes to import the launcher. Warnings and an uncaught exception's traceback
    land in stderr, as they would in a process of its own; for refusals (bad recipes), not for runs."""
    from chla_launcher.cli import main

    out, err = io.StringIO(), io.StringIO()
    home = os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()  # the interpreter's own filters, not pytest's
            warnings.simplefilter("default")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            try:
                code = main(list(args))
            except SystemExit as exit:  # argparse; what the interpreter makes of the other codes
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
                if exit.code is not None and not isinstance(exit.code, int):
                    print(exit.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(home)
    for warning in caught:
        err.write(warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno))
    return subprocess.CompletedProcess(["chla", *args], code, out.getvalue(), err.getvalue())


def refusal_line(result: subprocess.CompletedProcess, fragments: list[str]) -> str:
    """The refusal of a bad recipe: exit status 2 and one line on stderr, `chla: ...`, that holds
    every one of `fragments` (the file, the key or line, what is wrong); that line is returned."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chla: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def refused_submission(
    tmp_path: Path, recipe: str | bytes, fragments: list[str], *args: str
) -> subprocess.CompletedProcess:
    """`chla submit r.yaml *args` (in this process) of a bad `recipe`, written to tmp_path as it is:
    refused as refusal_line says, its line holding every one of `fragments`, and nothing written
    beside the recipe (no runs/ directory, nothing submitted). Returns the CLI's result."""
    (tmp_path / "r.yaml").write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode("utf-8"))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = chla_in_process("submit", "r.yaml", *args, cwd=tmp_path)
    refusal_line(result, fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return result


def status_json(run_dir: Path) -> dict[str, dict]:
    result = chla("status", str(run_dir), "--json")
    return {row["stage"]: row for row in json.loads(result.stdout)}


def wait_for_chain(
    run_dir: Path, timeout: float = 180, terminal=("COMPLETED", "FAILED", "CANCELLED")
) -> dict[str, dict]:
    """Poll `chla status --json` until every stage has ended (sacct lags squeue by a moment)."""
    deadline = time.time() + timeout
    rows: dict[str, dict] = {}
    while time.time() < deadline:
        rows = status_json(run_dir)
        if rows and all(row["state"] in terminal for row in rows.values()):
            return rows
        time.sleep(1.0)
    raise AssertionError(f"chain in {run_dir} did not end within {timeout}s: {rows}")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll `predicate` until it returns something true (returned), or fail naming `what`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and bool(out.stdout.strip()) and acct.returncode == 0


def require_slurm_cluster() -> None:
    """The real local Slurm cluster (bash slurm/localcluster.sh start). CI sets CHLA_REQUIRE_SLURM=1,
    so a cluster that is not up fails the tests there instead of skipping them."""
    if not _cluster_up():
        if os.environ.get("CHLA_REQUIRE_SLURM") == "1":
            pytest.fail("the local Slurm cluster is not running (bash slurm/localcluster.sh start)")
        pytest.skip("no Slurm cluster (start one with: bash slurm/localcluster.sh start)")


class EngineStub:
    """What chla_train.trainer.Trainer._forward uses of a DeepSpeed engine: calling it, its module,
    and whether ZeRO-3 partitions the weights (no)."""

    def __init__(self, module) -> None:
        self.module = module

    def __call__(self, **inputs):
        return self.module(**inputs)

    def zero_optimization_partition_weights(self) -> bool:
        return False


def trainer_stub(model):
    """A stand-in `self` for Trainer._forward on `model`, on the CPU."""
    import types

    import torch

    return types.SimpleNamespace(engine=EngineStub(model), device=torch.device("cpu"))


def resize_like_a_stage(model, tokenizer_dir: str, method: str, seed: int) -> int:
    """Resize `model` to the tokenizer in `tokenizer_dir` as a training stage does (new rows by
    `method`, seeded; up to 4x growth); returns the base's row count."""
    from chla_train import model as models

    return models.resize_to_tokenizer(
        model,
        len(models.load_tokenizer(tokenizer_dir)),
        new_row_init=method,
        max_vocab_growth=4,
        where="test",
        tokenizer_dir=tokenizer_dir,
        seed=seed,
        log=lambda _: None,
    )


def peft_with_shifted_rows(base, config, shift: float):
    """PEFT's own model of a copy of `base` under `config` (LoRA A drawn from seed 1, the same for
    every call), its trainable token rows moved by `shift` from the base's, as training would."""
    import copy

    import torch
    from peft import get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(shift)
    return model


# The tests' small LoRA stage: what `small_lora` applies unless told otherwise.
SMALL_LORA = dict(
    r=4,
    alpha=8,
    dropout=0.0,
    target_modules=["q_proj", "v_proj"],
    modules_to_save=["embed_tokens", "lm_head"],
    init_adapter=None,
    key_prefix="test",
    seed=1,
)


def small_lora(model, **settings):
    """chla_train.model.apply_lora with SMALL_LORA (rank 4 on q_proj and v_proj, embed_tokens and
    lm_head trained whole, no adapter to start from); `settings` replace or add to it."""
    from chla_train.model import apply_lora

    return apply_lora(model, **{**SMALL_LORA, **settings})
