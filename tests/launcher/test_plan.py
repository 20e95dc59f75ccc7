"""`chla plan`: the per-stage memory table of the full recipe from config.json sizes alone, sizes
of models that upstream stages will produce, and chla-submit's warning / --strict refusal.
(That the activation bytes are what autograd keeps: tests/train/test_memory_model.py.)"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from chla_train.model_config import LLAMA_7B

from ..helpers import REPO
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
