"""The recipe's `tracking:` block: validated like the rest of the recipe, frozen into the run
directory, and never a place for credentials: a value under a key that names one (anywhere in
the recipe, or given with --set), or a URL with a password, is one line, exit 2, nothing written."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from ..helpers import refused_submission
from .conftest import chla

STAGE = """\
stages:
  hello:
    kind: command
    params:
      argv: [echo, hi]
"""

CREDENTIALS = [
    (
        "wandb-api-key",
        "name: x\ntracking:\n  wandb: {project: p, api_key: abc123}\n" + STAGE,
        [],
        ["r.yaml:3:", "tracking.wandb.api_key", "looks like a credential", "WANDB_API_KEY"],
    ),
    (
        "mlflow-token",
        "name: x\ntracking:\n  mlflow: {tracking_uri: 'http://h:5000', token: t0k}\n" + STAGE,
        [],
        ["r.yaml:3:", "tracking.mlflow.token"],
    ),
    ("password-in-vars", "name: x\nvars:\n  db_password: hunter2\n" + STAGE, [], ["r.yaml:3:", "vars.db_password"]),
    (
        "env-style-token",
        "name: x\nstages:\n  hello:\n    kind: command\n    params:\n      argv: [echo]\n"
        "      env: {HF_TOKEN: hf_abc}\n",
        [],
        ["r.yaml:7:", "stages.hello.params.env.HF_TOKEN"],
    ),
    (
        "url-with-password",
        "name: x\ntracking:\n  mlflow: {tracking_uri: 'https://me:s3cret@mlflow.example'}\n" + STAGE,
        [],
        ["r.yaml:3:", "tracking.mlflow.tracking_uri", "URL with a password"],
    ),
    (
        "set-secret",
        "name: x\n" + STAGE,
        ["--set", "tracking.wandb.api_key=abc"],
        ["r.yaml", "tracking.wandb.api_key", "looks like a credential"],
    ),
    (
        "bad-tracking-uri",
        "name: x\ntracking:\n  mlflow: {tracking_uri: 'mlflow.example'}\n" + STAGE,
        [],
        ["r.yaml:3:", "tracking.mlflow.tracking_uri", "not a tracking URI"],
    ),
    (
        "unknown-tracking-key",
        "name: x\ntracking:\n  neptune: {project: p}\n" + STAGE,
        [],
        ["r.yaml:3:", "tracking.neptune", "unknown key"],
    ),
]


@pytest.mark.parametrize("case_id, text, extra, expected", CREDENTIALS, ids=[c[0] for c in CREDENTIALS])
def test_credentials_and_bad_tracking_are_refused(tmp_path: Path, case_id, text, extra, expected):
    refused_submission(tmp_path, textwrap.dedent(text), expected, *extra)


def test_recipe_keys_that_only_contain_token_are_not_credentials(tmp_path: Path):
    """pad_token, max_new_tokens and friends are recipe keys, not secrets (the control)."""
    (tmp_path / "r.yaml").write_text(
        textwrap.dedent("""\
        name: x
        vars: {pad_token: true, max_new_tokens: 8, tokens_per_char: 1.0}
        tracking:
          mlflow: {tracking_uri: 'http://127.0.0.1:5000', experiment: e}
          wandb: {project: p, mode: offline}
        """)
        + STAGE
    )
    result = chla("submit", "r.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_tracking_block_is_frozen_into_the_run(tmp_path: Path):
    from chla_launcher.contract.recipe import dump_frozen, load_recipe

    (tmp_path / "r.yaml").write_text("name: x\n" + STAGE)
    recipe = load_recipe(
        tmp_path / "r.yaml", ["tracking.wandb.project=demo", "tracking.wandb.mode=offline"], cwd=tmp_path
    )
    frozen = yaml.safe_load(dump_frozen(recipe))
    # Only the selected backends (a frozen recipe of an older chla also says `mlflow: null`: not selected).
    assert frozen["tracking"] == {"wandb": {"project": "demo", "entity": None, "mode": "offline", "dir": None}}
