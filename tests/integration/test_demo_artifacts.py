"""What the shrunk demo leaves for the tools users take next (the local run of the session's demo):

- its exported folders (merged models, adapters, tokenizers) load in transformers 4.57 as well as
  in transformers 5, with the same token ids and logits (transformers 4 from the side environment
  that install.sh --test builds in .venv/transformers4; torch is shared);
- its GGUF export of the final model, read back with llama.cpp's own gguf-py, holds the model's
  vocabulary, special tokens and every tensor of the safetensors;
- its lm-evaluation-harness results sit in the task evaluation's results.json and the summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chla_tools.tasks import TASKS

from ..helpers import REPO
from .conftest import TASK_ITEMS

pytestmark = pytest.mark.slow

TRANSFORMERS4 = REPO / ".venv" / "transformers4"
TEXTS = [
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "The primary use of LLaMA is research.",
    "这本书很好看，推荐给大家！",
    "  两个空格开头 and trailing  ",
]
FOLDERS = [
    "merge_pt/out",
    "merge_sft/out",
    "pt_lora/out/adapter",
    "sft/out/adapter",
    "pt_embeddings/out/model",
    "vocab/out/tokenizer",
    "vocab_sft/out/tokenizer",
]


def load_with(python_path: Path | None, folders: list[Path], tmp_path: Path, name: str) -> dict:
    """tests/integration/transformers4_load.py with `python_path` first on PYTHONPATH."""
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(python_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("transformers4_load.py")),
            str(out),
            str(texts),
            *map(str, folders),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import torch

    return torch.load(out, weights_only=False)


def test_exported_folders_load_in_transformers_4_and_5_with_equal_logits(demo_local_run, tmp_path):
    if not (TRANSFORMERS4 / "transformers").is_dir():
        pytest.fail(f"{TRANSFORMERS4} is missing: run `bash install.sh --test`")
    run = demo_local_run
    folders = [run / folder for folder in FOLDERS]
    # The control: a tokenizer saved by transformers 5 as it comes (TokenizersBackend), which
    # transformers 4 cannot load: the side environment must really be transformers 4.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(run / "merge_sft" / "out").save_pretrained(tmp_path / "as_saved_by_v5")

    v4 = load_with(TRANSFORMERS4, [*folders, tmp_path / "as_saved_by_v5"], tmp_path, "v4")
    v5 = load_with(None, folders, tmp_path, "v5")
    assert v4["transformers"].startswith("4.57.") and v5["transformers"].startswith("5.")
    assert "TokenizersBackend does not exist" in v4["folders"][str(tmp_path / "as_saved_by_v5")]["error"]
    for folder in map(str, folders):
        old, new = v4["folders"][folder], v5["folders"][folder]
        assert "error" not in old, (folder, old.get("error"))
        assert old["tokenizer_class"] == "PreTrainedTokenizerFast", folder
        assert (old["vocab"], old["ids"]) == (new["vocab"], new["ids"]), folder
        assert [old[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")] == [
            new[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        ], folder
        assert ("logits" in old) == ("logits" in new) == (folder.endswith(("merge_pt/out", "merge_sft/out", "model")))
        for a, b in zip(old.get("logits", []), new.get("logits", [])):
            assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4, folder
    assert v5["folders"][str(run / "merge_sft" / "out")]["vocab"] == sft_vocab_size(run)


# --- GGUF ---------------------------------------------------------------------------------


def gguf_reader(path: Path):
    """llama.cpp's own gguf-py (from the converter's tree, as the export used it)."""
    from chla_tools.gguf_export import converter_dir

    gguf_py = str(converter_dir() / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    import gguf

    return gguf.GGUFReader(str(path))


def hf_to_gguf_name(name: str) -> str:
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "lm_head.weight": "output.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if name in fixed:
        return fixed[name]
    _, _, layer, rest = name.split(".", 3)
    module, _, suffix = rest.rpartition(".")
    return f"blk.{layer}.{parts[module]}.{suffix}"


def rotary_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF LLaMA q/k rows are in rotate-half order per head (first halves, then second halves);
    llama.cpp wants the original interleaved pairs: row 2i <- i, row 2i+1 <- i + d/2."""
    rows, cols = weight.shape
    per_head = weight.reshape(heads, 2, rows // heads // 2, cols)
    return per_head.transpose(0, 2, 1, 3).reshape(rows, cols)


def sft_vocab_size(run: Path) -> int:
    """The final model's vocabulary: the merged tokenizer's pieces (the vocab stage's own
    SentencePiece model, not the exported folder's) and the [PAD] the SFT tokenizer adds."""
    import sentencepiece as spm

    merged = spm.SentencePieceProcessor(model_file=str(run / "vocab" / "out" / "tokenizer" / "tokenizer.model"))
    assert merged.get_piece_size() > 32000  # the control: the base's 32,000 pieces and more
    return merged.get_piece_size() + 1


def test_gguf_of_the_final_model_holds_its_vocabulary_and_tensors(demo_local_run):
    import sentencepiece as spm
    import torch
    from safetensors import safe_open

    run = demo_local_run
    model_dir = run / "merge_sft" / "out"
    vocab = sft_vocab_size(run)
    export = json.loads((run / "gguf" / "out" / "export.json").read_text())
    assert export["vocab_size"] == vocab and export["outtype"] == "f16"
    reader = gguf_reader(run / "gguf" / "out" / "model.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer_config.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "llama"
    assert fields["llama.vocab_size"] == vocab == config["vocab_size"] == len(fields["tokenizer.ggml.tokens"])
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert fields["tokenizer.ggml.tokens"][vocab - 1] == tokenizer["pad_token"] == "[PAD]"
    assert (
        (
            fields["tokenizer.ggml.bos_token_id"],
            fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"],
        )
        == (sp.bos_id(), sp.eos_id(), vocab - 1)
        == (1, 2, vocab - 1)
    )
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.embedding_length"] == config["hidden_size"]

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
        assert len(names) == len(tensors)
        for name in names:
            expected = handle.get_tensor(name).float().numpy()
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
                expected = rotary_interleaved(expected, heads)
            stored = tensors[hf_to_gguf_name(name)]
            values = np.asarray(stored.data).astype(np.float32).reshape(expected.shape)
            if stored.tensor_type.name == "F16":  # f16 export: the safetensors value rounded to f16
                expected = torch.from_numpy(expected).half().float().numpy()
            else:
                assert stored.tensor_type.name == "F32" and expected.ndim == 1, name
            assert np.array_equal(values, expected), name
        # the control: without llama.cpp's row order the attention weights do not match
        q = handle.get_tensor("model.layers.0.self_attn.q_proj.weight").half().float().numpy()
        assert not np.array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data).astype(np.float32), q)


# --- lm-evaluation-harness ----------------------------------------------------------------


def test_lm_eval_results_are_in_results_json_and_the_summary(demo_local_run):
    run = demo_local_run
    results = json.loads((run / "eval_task" / "out" / "results.json").read_text())
    task = results["lm_eval"]["tasks"]["chla_sentiment_test"]
    assert task["samples"] == TASK_ITEMS and results["lm_eval"]["limit"] == TASK_ITEMS
    rows = sorted(
        (
            json.loads(line)
            for line in (run / "eval_task" / "out" / "lm_eval_samples" / "chla_sentiment_test.jsonl")
            .read_text()
            .splitlines()
        ),
        key=lambda row: row["doc_id"],
    )
    assert len(rows) == TASK_ITEMS and task["acc"] == pytest.approx(sum(row["acc"] for row in rows) / TASK_ITEMS)
    # the same reviews chla's own evaluator scored, with the same labels
    chla_rows = [
        json.loads(line)
        for line in (run / "eval_task" / "out" / "generations" / "task-sentiment_test.jsonl").read_text().splitlines()
    ]
    labels = sorted(TASKS["sentiment"].choices)  # lm-eval numbers the sorted outputs
    assert [labels[row["target"]] for row in rows] == [row["answer"] for row in chla_rows]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lm_eval"]["chla_sentiment_test"] == {"acc": task["acc"], "samples": TASK_ITEMS}
