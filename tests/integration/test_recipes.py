"""The shipped recipes validate, and `--dry-run` prints sbatch scripts that Slurm accepts
(`sbatch --test-only` on the real local cluster; options naming hardware this cluster lacks, such
as GPUs and the `gpu` partition, are overridden on the sbatch command line, as a site would)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ..helpers import REPO, chla

RECIPES = REPO / "recipes"


def user_paths(tmp_path: Path, demo_assets) -> dict[str, str]:
    files = {}
    for name in ("zh.txt", "sft.json", "heldout.txt", "task.json", "prompts.jsonl"):
        (tmp_path / name).write_text("x\n")
        files[name] = str(tmp_path / name)
    return {
        "full": [
            "--set",
            f"vars.base_model={demo_assets['base_tokenizer']}",
            "--set",
            f"vars.zh_corpus=[{files['zh.txt']}]",
            "--set",
            f"vars.sft_train={files['sft.json']}",
            "--set",
            f"vars.eval_text={files['heldout.txt']}",
            "--set",
            f"vars.eval_task={files['task.json']}",
        ],
        "preprocess": [
            "--set",
            f"vars.tokenizer={demo_assets['base_tokenizer']}",
            "--set",
            f"vars.corpus={files['zh.txt']}",
        ],
        "eval": [
            "--set",
            f"vars.model={demo_assets['base_tokenizer']}",
            "--set",
            f"vars.text={files['heldout.txt']}",
            "--set",
            f"vars.task={files['task.json']}",
            "--set",
            f"vars.prompts={files['prompts.jsonl']}",
        ],
        "demo": ["--executor", "slurm"],
        "demo_scratch": ["--executor", "slurm"],
        "scaling": ["--executor", "slurm"],
    }


def scripts_of(dry_run_output: str) -> list[str]:
    parts = re.split(r"^# --- .* ---$\n", dry_run_output, flags=re.MULTILINE)[1:]
    return [part.split("\ndry run:")[0] for part in parts]


@pytest.mark.slurm
@pytest.mark.parametrize("name", ["demo", "demo_scratch", "full", "scaling", "preprocess", "eval"])
def test_dry_run_prints_scripts_slurm_accepts(tmp_path, name, demo_assets, slurm_cluster):
    result = chla(
        "submit",
        str(RECIPES / f"{name}.yaml"),
        "--dry-run",
        *user_paths(tmp_path, demo_assets)[name],
        cwd=tmp_path,
        check=True,
    )
    assert not (tmp_path / "runs").exists()
    scripts = scripts_of(result.stdout)
    assert scripts, result.stdout
    for index, script in enumerate(scripts):
        assert script.startswith("#!/bin/bash")
        assert "chla/" in script and "submitit.core._submit" in script
        path = tmp_path / f"script-{index}.sh"
        # Parents' job ids are placeholders in a dry run; chla queues jobs held and releases them once
        # the whole chain is queued, which --test-only cannot show.
        assert "#SBATCH --hold\n" in script
        path.write_text(re.sub(r"#SBATCH --dependency='[^']*'\n|#SBATCH --hold\n", "", script))
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        site = (
            [
                "--partition=debug",
                "--gpus-per-node=0",
                "--mem=1G",
                "--nodes=1",
                "--ntasks-per-node=1",
                "--cpus-per-task=1",
            ]
            if name in ("full", "preprocess", "eval")
            else []
        )
        accepted = subprocess.run(["sbatch", "--test-only", *site, str(path)], capture_output=True, text=True)
        assert accepted.returncode == 0, (accepted.stderr, script)
        assert "to start at" in accepted.stderr


def test_full_recipe_has_the_original_settings(tmp_path, demo_assets):
    from chla_launcher.contract.recipe import load_recipe

    args = user_paths(tmp_path, demo_assets)["full"]
    overrides = [args[i + 1] for i in range(0, len(args), 2)]
    recipe = load_recipe(RECIPES / "full.yaml", overrides, cwd=tmp_path)
    pt2, sft = recipe.stages["pt2"].params, recipe.stages["sft"].params
    assert (pt2.mode, pt2.lora_r, pt2.lora_alpha, pt2.lora_dropout, pt2.learning_rate) == ("lora", 8, 32, 0.05, 2e-4)
    assert pt2.modules_to_save == ["embed_tokens", "lm_head"] and pt2.block_size == 512
    assert (pt2.lr_scheduler, pt2.warmup_ratio, pt2.weight_decay, pt2.zero_stage) == ("cosine", 0.05, 0.01, 2)
    assert (sft.learning_rate, sft.warmup_ratio, sft.weight_decay, sft.max_seq_length) == (1e-4, 0.03, 0.0, 512)
    assert recipe.stages["pt2"].resources.nodes == 4 and recipe.stages["tokens"].array == 16
    assert recipe.stages["vocab_sft"].params.pad_token is True
