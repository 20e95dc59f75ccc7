"""`chla plan`: the per-stage memory table of the full recipe from config.json sizes alone, sizes
of models that upstream stages will produce, and chla-submit's warning / --strict refusal.
(That the activation bytes are what autograd keeps: tests/train/test_memory_model.py.)"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from chla_launcher.architectures import ARCHITECTURES
from chla_launcher.contract.recipe import load_recipe
from chla_launcher.plan import StagePlan, plan_recipe
from chla_launcher.sizing import ModelShape
from chla_train.model_config import LLAMA_7B

from ..helpers import REPO, chla_in_process
from .conftest import chla
from .test_light_imports import heavy_modules

# LLaMA-7B's published shape (config.json of the original checkpoints).
LLAMA_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    **LLAMA_7B,
    "tie_word_embeddings": False,
}


def llama_7b_without_weights(tmp_path: Path, demo_assets) -> Path:
    """What `chla plan` needs of a base model: its config.json and tokenizer (LLaMA's 32,000 pieces)."""
    model = tmp_path / "llama-7b"
    shutil.copytree(demo_assets["base_tokenizer"], model)
    (model / "config.json").write_text(json.dumps(LLAMA_7B_CONFIG))
    return model


def rows(output: str) -> dict[str, list[str]]:
    return {
        line.split()[0]: line.split()
        for line in output.splitlines()
        if line.split() and line.split()[0] in ("pt1", "pt2", "sft")
    }


@pytest.mark.slow
def test_full_recipe_plan(tmp_path, demo_assets):
    model = llama_7b_without_weights(tmp_path, demo_assets)
    result = chla(
        "plan", str(REPO / "recipes" / "full.yaml"), "--set", f"vars.base_model={model}", cwd=tmp_path, check=True
    )
    table = rows(result.stdout)
    assert set(table) == {"pt1", "pt2", "sft"}, result.stdout
    # The vocabulary the merged tokenizer can reach: 32,000 + the 20,000 pieces of the spm stage
    # (+ [PAD] for SFT); pt2 trains from pt1's output, sft from the merge of pt1 and pt2.
    assert table["pt1"][1:3] == ["32x4096", "V52000"] and table["sft"][1:3] == ["32x4096", "V52001"]
    assert table["pt1"][3] == "6.90B"  # 6.74B + 20,000 new rows in embed_tokens and lm_head
    assert table["pt1"][4] == "81.9M"  # embeddings mode, new rows only: 20,000 x 4096
    assert table["pt2"][4] == "446.0M"  # LoRA r 8 on 7 projections (20.0M) + embed_tokens and lm_head (426.0M)
    assert all(row[-3:] == ["fits", "(gc", "off)"] for row in table.values()), result.stdout
    assert "GPU (80G, gpu_mem)" in result.stdout
    # With 24 GB GPUs, stage 2 does not fit without gradient checkpointing, and the plan says so.
    small = chla(
        "plan",
        str(REPO / "recipes" / "full.yaml"),
        "--set",
        f"vars.base_model={model}",
        "--set",
        "stages.pt2.resources.gpu_mem=24G",
        cwd=tmp_path,
        check=True,
    ).stdout
    assert (
        " ".join(rows(small)["pt2"][-5:]) == "does not fit (gc off)"
        and "pt2: " in small
        and "fits with gradient_checkpointing: true" in small
    )
    assert heavy_modules(
        ["plan", str(REPO / "recipes" / "full.yaml"), "--set", f"vars.base_model={model}"], cwd=tmp_path
    ) == [[]]


def test_submit_warns_and_strict_refuses(tmp_path, demo_assets):
    model = llama_7b_without_weights(tmp_path, demo_assets)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (tmp_path / "r.yaml").write_text(
        textwrap.dedent(f"""\
        name: big
        executor: slurm
        slurm: {{constraint: "a10"}}
        stages:
          pt:
            kind: pretrain
            resources: {{gpus_per_node: 1}}
            params: {{model: {model}, tokenizer: {model}, corpus: {corpus}, micro_batch_size: 8}}
    """)
    )
    warned = chla("submit", "r.yaml", "--dry-run", cwd=tmp_path, check=True).stdout
    assert "pt: does not fit: peak" in warned and "24.0 GiB (GPU (24 GiB, a10 in slurm.constraint))" in warned
    assert "warning: stage(s) pt will not fit" in warned
    refused = chla("submit", "r.yaml", "--strict", cwd=tmp_path)
    assert refused.returncode != 0 and not (tmp_path / "runs" / "big").exists()
    assert "stage(s) pt will not fit" in refused.stderr and "nothing submitted (--strict)" in refused.stderr


# --- the vocabulary growth, planned before the chain has built its tokenizers -------------------

LLAMA_2_7B_CONFIG = {"model_type": "llama", **LLAMA_7B, "vocab_size": 32000, "tie_word_embeddings": False}
HIDDEN = 4096
NEW_ROWS = 20000  # recipes/full.yaml's spm stage: vocab_size 20000


def plan_full(tmp_path: Path, *overrides: str, arch: str | None = None) -> dict[str, StagePlan]:
    recipe = load_recipe(REPO / "recipes" / "full.yaml", list(overrides), check_inputs=False, cwd=tmp_path)
    plans = plan_recipe(recipe, arch=arch) if arch else plan_recipe(recipe)
    return {plan.stage: plan for plan in plans}


def config_only(tmp_path: Path) -> Path:
    """A base model directory holding its config.json and nothing else (no tokenizer, no weights)."""
    model = tmp_path / "llama-2-7b"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(LLAMA_2_7B_CONFIG))
    return model


def test_full_recipe_plans_the_merged_vocabulary_from_a_config_alone(tmp_path):
    """The issue's case: `chla plan recipes/full.yaml --set vars.base_model=DIR` with DIR holding a
    LLaMA-2-7B config.json and no tokenizer. Before, every stage planned at 32,000 rows and stage 1
    trained 0 parameters; the merged tokenizer's size is knowable: 32,000 + the spm stage's 20,000."""
    model = config_only(tmp_path)
    plans = plan_full(tmp_path, f"vars.base_model={model}")
    assert {name: plan.shape.vocab_size for name, plan in plans.items() if plan.shape} == {
        "pt1": 32000 + NEW_ROWS,
        "pt2": 32000 + NEW_ROWS,
        "sft": 32000 + NEW_ROWS + 1,  # [PAD]
    }
    # Stage 1 trains the new rows of embed_tokens (full.yaml: train_lm_head false).
    assert plans["pt1"].trainable_params == NEW_ROWS * HIDDEN
    # Stage 2 and SFT: LoRA r 8 on the 7 projections plus full embed_tokens and lm_head at 52,000.
    lora = 32 * 8 * sum(a + b for a, b in plans["pt2"].shape.projections().values())
    assert plans["pt2"].trainable_params == lora + 2 * (32000 + NEW_ROWS) * HIDDEN
    assert plans["sft"].trainable_params == lora + 2 * (32000 + NEW_ROWS + 1) * HIDDEN
    # Control: the numbers the plan gave before (0 trained, 32,000 rows) are not these.
    assert plans["pt1"].trainable_params != 0 and plans["sft"].shape.vocab_size != 32000
    # Where each figure came from.
    source = plans["pt1"].source
    assert f"{model}/config.json" in source and f"32000 (vocab_size of {model}/config.json)" in source
    assert "vocabulary up to 52000" in source and "at most 20000 (vocab_size of stage spm)" in source
    assert "trains the 20000 new rows of embed_tokens (52000 - 32000 base rows) x 4096" in plans["pt1"].notes
    assert "+ 1 [PAD]" in plans["sft"].source


def test_stage_1_trains_what_the_spm_stage_adds(tmp_path):
    """The new rows follow the recipe's references: a smaller Chinese model, fewer rows; lm_head's
    new rows too with train_lm_head (LLaMA-2 does not tie them: twice the rows)."""
    model = config_only(tmp_path)
    smaller = plan_full(tmp_path, f"vars.base_model={model}", "stages.spm.params.vocab_size=8000")
    assert smaller["pt1"].shape.vocab_size == 40000 and smaller["pt1"].trainable_params == 8000 * HIDDEN
    with_head = plan_full(tmp_path, f"vars.base_model={model}", "stages.pt1.params.train_lm_head=true")
    assert with_head["pt1"].trainable_params == 2 * NEW_ROWS * HIDDEN
    assert "new rows of embed_tokens and lm_head" in " ".join(with_head["pt1"].notes)


def test_arch_plans_a_model_not_downloaded_yet(tmp_path):
    """Without any local file every stage is unknown and says how to name the architecture; with
    --arch llama-2-7b the plan is the one a LLaMA-2-7B config.json gives."""
    unknown = plan_full(tmp_path)  # full.yaml's placeholder /path/to/llama-7b-hf
    assert all(plan.memory is None for plan in unknown.values())
    assert "--arch {llama-2-7b," in unknown["pt1"].source
    named = plan_full(tmp_path, arch="llama-2-7b")
    from_file = plan_full(tmp_path, f"vars.base_model={config_only(tmp_path)}")
    assert {n: (p.shape, p.trainable_params, p.memory) for n, p in named.items()} == {
        n: (p.shape, p.trainable_params, p.memory) for n, p in from_file.items()
    }
    assert "--arch llama-2-7b" in named["pt1"].source and "vocab_size of --arch llama-2-7b" in named["pt1"].source
    # Control: another architecture plans other numbers; a config.json that is there wins over --arch.
    assert plan_full(tmp_path, arch="llama-2-13b")["pt1"].shape.hidden_size == 5120
    with_file = plan_full(tmp_path, f"vars.base_model={config_only(tmp_path / 'x')}", arch="llama-2-13b")
    assert with_file["pt1"].shape == from_file["pt1"].shape


# The presets against the parameter counts their model cards publish (billions, as rounded there).
PUBLISHED_BILLIONS = {
    "llama-2-7b": 6.74,
    "llama-2-13b": 13.02,
    "llama-2-70b": 68.98,
    "llama-3-8b": 8.03,
    "llama-3-70b": 70.55,
    "mistral-7b": 7.24,
    "qwen2.5-7b": 7.61,  # with q/k/v biases (0.4M here left out)
    "qwen2.5-14b": 14.77,
}


def test_architecture_presets_have_their_published_sizes():
    assert set(PUBLISHED_BILLIONS) == set(ARCHITECTURES)
    for name, billions in PUBLISHED_BILLIONS.items():
        assert ModelShape.from_config(ARCHITECTURES[name]).total_params / 1e9 == pytest.approx(billions, abs=0.01), name


def test_chla_plan_arch_flag(tmp_path):
    result = chla_in_process("plan", str(REPO / "recipes" / "full.yaml"), "--arch", "llama-2-7b", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pt1 = rows(result.stdout)["pt1"]
    assert pt1[1:5] == ["32x4096", "V52000", "6.90B", "81.9M"], result.stdout
    refused = chla_in_process("plan", str(REPO / "recipes" / "full.yaml"), "--arch", "llama-9", cwd=tmp_path)
    assert refused.returncode == 2 and "invalid choice: 'llama-9'" in refused.stderr
