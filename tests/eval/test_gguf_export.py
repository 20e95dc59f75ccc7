"""`chla export gguf` refusals: the vocabulary check before llama.cpp's converter runs, and a
converter failure that leaves nothing behind. (A real conversion of the demo's final model, read
back with gguf-py and compared with its safetensors, is in the demo chain test.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ..helpers import chla


def model_with_tokenizer(tiny_chain, demo_assets, tmp_path: Path, name: str) -> Path:
    """The tiny base model (32,000 rows) with the demo's base tokenizer files beside it."""
    directory = tmp_path / name
    shutil.copytree(tiny_chain["base"], directory)
    for file_name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(demo_assets["base_tokenizer"]) / file_name, directory / file_name)
    return directory


@pytest.mark.slow
def test_vocabulary_rows_differing_from_the_tokenizer_is_one_line(tiny_chain, demo_assets, tmp_path):
    model = model_with_tokenizer(tiny_chain, demo_assets, tmp_path, "short_tokenizer")
    # the merged pretraining model has 32,009 rows; give it the 32,000-token base tokenizer
    shutil.copy(tiny_chain["root"] / "merged_pretrain" / "model.safetensors", model / "model.safetensors")
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = tiny_chain["sizes"][1]
    (model / "config.json").write_text(json.dumps(config))

    result = chla("export", "gguf", str(model), "--out", str(tmp_path / "out.gguf"), "--offline")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("chla: "), result.stderr
    assert "the tokenizer has 32000 tokens but config.json vocab_size is 32009" in line
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".out.gguf*"))


@pytest.mark.slow
def test_a_converter_failure_leaves_no_file(tiny_chain, demo_assets, tmp_path):
    model = model_with_tokenizer(tiny_chain, demo_assets, tmp_path, "unknown_architecture")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))

    result = chla("export", "gguf", str(model), "--out", str(tmp_path / "out.gguf"))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("chla: ") and "convert_hf_to_gguf.py failed" in line, result.stderr
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".out.gguf*"))


@pytest.mark.parametrize("outtype", ["q4_0", "bf16"])
def test_outtypes_outside_the_three_are_refused_by_the_cli(tmp_path, outtype):
    result = chla("export", "gguf", str(tmp_path), "--out", str(tmp_path / "x.gguf"), "--outtype", outtype)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def _gguf_tensors(path: Path) -> dict:
    """Tensor name -> data, read with llama.cpp's own gguf-py (the converter's tree)."""
    import sys

    from chla_tools.gguf_export import converter_dir

    gguf_py = str(converter_dir(offline=True) / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    import gguf

    return {tensor.name: tensor.data for tensor in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.slow
def test_a_tied_model_exports_one_embedding_tensor(tiny_chain, demo_assets, tokenizer_dir, tmp_path):
    """Tied embeddings (one tensor in the model files, tie_word_embeddings): llama.cpp's converter
    writes token_embd and no output.weight, which llama.cpp then takes from token_embd. Control:
    the untied base gets its output.weight."""
    import numpy as np
    from safetensors.torch import load_file

    from chla_launcher.contract.kinds.export import ExportParams
    from chla_tools.gguf_export import export_gguf

    from .conftest import make_base

    tied = make_base(tmp_path / "tied", tokenizer_dir, seed=5, tie_word_embeddings=True)
    for file_name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(demo_assets["base_tokenizer"]) / file_name, tied / file_name)
    untied = model_with_tokenizer(tiny_chain, demo_assets, tmp_path, "untied")
    quiet = lambda _m: None  # noqa: E731
    found = {}
    for name, model in (("tied", tied), ("untied", untied)):
        export_gguf(ExportParams(model=str(model), outtype="f32"), tmp_path / f"{name}.gguf", offline=True, log=quiet)
        found[name] = _gguf_tensors(tmp_path / f"{name}.gguf")
    assert "token_embd.weight" in found["tied"] and "output.weight" not in found["tied"]
    embed = load_file(str(tied / "model.safetensors"))["model.embed_tokens.weight"].numpy()
    assert np.array_equal(np.asarray(found["tied"]["token_embd.weight"]).reshape(embed.shape), embed)
    assert "output.weight" in found["untied"]
