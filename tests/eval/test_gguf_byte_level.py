"""GGUF for byte-level BPE models, both ways: `chla export gguf` of a tiny LLaMA whose byte-level
BPE vocabulary was extended with appended Chinese tokens and merges (llama.cpp's own converter
refuses it unaided: its pre-tokenizer hash is unknown), and `chla import gguf` of that file back
into an HF folder, checked against transformers' own GGUF loader and in transformers 4 and 5.

Everything is real and built here: a ByteLevel BPE trained with `tokenizers`, a random tied LLaMA
(2 layers, hidden 16), llama.cpp's converter from the pinned sdist (the cached assets), the
transformers 4 side environment of install.sh --test. A few seconds per conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import REPO, chla

TRANSFORMERS4 = REPO / ".venv" / "transformers4"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENGLISH = [
    "The quick brown fox jumps over the lazy dog in 2024, and 17 dogs watch it.",
    "Botchan was a reckless boy; he jumped from the second floor of the school.",
    "A teacher must be honest, said the principal, and the students laughed at him.",
    "It's 3.14 miles to the station; we'll walk there at 9 o'clock tomorrow.",
    "Some lines of code end in spaces:    ",
]
CHINESE = [
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "中国人民银行今天宣布，从明年一月一日起调整存款利率。",
    "人民日报社论指出，经济发展要依靠科技进步和劳动者素质的提高。",
    "玄德曰：汉室倾颓，奸臣窃命，主上蒙尘。",
]
HELD_OUT = [
    "The principal said 42 students jumped, but he doesn't believe it.",
    "人民银行宣布调整利率，经济发展依靠科技进步。",
    "  两个空格开头 and trailing 2024  ",
    "Tuesday: 白日依山尽 — the fox's 7th jump.",
    "Total:  2024 items,    17 left",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def extended_byte_level_tokenizer():
    """SmolLM2's layout in miniature: a ByteLevel BPE (every digit alone, then GPT-2's split, as
    llama.cpp's "smollm") trained on English, then a Chinese BPE trained with the same
    pre-tokenizer whose new merges (both halves already tokens) are appended after the base's,
    each new token at the next id. Returns (extended tokenizer, base vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def trained(lines: list[str], vocab_size: int) -> Tokenizer:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(lines * 20, trainer=trainer)
        return tokenizer

    base = json.loads(trained(ENGLISH, 400).to_str())
    chinese = json.loads(trained(CHINESE, 450).to_str())
    vocab, merges = base["model"]["vocab"], base["model"]["merges"]
    base_size = len(vocab)
    for left, right in chinese["model"]["merges"]:
        if left in vocab and right in vocab and left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append([left, right])
    assert len(vocab) - base_size >= 30  # the Chinese half really adds tokens
    return Tokenizer.from_str(json.dumps(base)), base_size


def tiny_tied_llama(directory: Path, vocab_size: int, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # weights of a trained model's size, not the initialiser's zeros and ones
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def extended_model(tmp_path_factory) -> dict:
    """A tiny tied LLaMA with the extended tokenizer, and its f32 GGUF from `chla export gguf`."""
    from transformers import PreTrainedTokenizerFast

    from chla_tools.hf_tokenizer import make_portable

    root = tmp_path_factory.mktemp("byte_level")
    tokenizer, base_size = extended_byte_level_tokenizer()
    model_dir = root / "extended"
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL[1],
        eos_token=SPECIAL[2],
        pad_token=SPECIAL[2],
        unk_token=SPECIAL[0],
    )
    hf.chat_template = CHAT_TEMPLATE
    tiny_tied_llama(model_dir, len(hf))
    hf.save_pretrained(model_dir)
    make_portable(model_dir)
    gguf_file = root / "extended.gguf"
    result = chla("export", "gguf", str(model_dir), "--out", str(gguf_file), "--outtype", "f32")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "model": model_dir, "gguf": gguf_file, "base_size": base_size, "vocab": len(hf)}


def gguf_field(path: Path, key: str):
    import gguf

    return gguf.GGUFReader(path).fields[key].contents()


def test_extended_byte_level_vocabulary_exports_with_the_base_pre_tokenizer(extended_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(extended_model["model"])
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    assert [token_id for _, token_id in by_id] == list(range(extended_model["vocab"]))
    # every id, the appended Chinese ones included, names the same token in the file
    assert gguf_field(extended_model["gguf"], "tokenizer.ggml.tokens") == [token for token, _ in by_id]
    assert gguf_field(extended_model["gguf"], "tokenizer.ggml.pre") == "smollm"
    merges = json.loads((extended_model["model"] / "tokenizer.json").read_text())["model"]["merges"]
    assert gguf_field(extended_model["gguf"], "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]


def test_the_converter_alone_refuses_the_extended_vocabulary(extended_model, tmp_path):
    """The control: llama.cpp's converter run as shipped does not know the extended vocabulary's
    hash, which is what chla's export works around."""
    from chla_tools.gguf_export import converter_dir

    converter = converter_dir(offline=True)
    result = subprocess.run(
        [
            sys.executable,
            str(converter / "convert_hf_to_gguf.py"),
            str(extended_model["model"]),
            "--outfile",
            str(tmp_path / "plain.gguf"),
            "--outtype",
            "f32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "BPE pre-tokenizer was not recognized" in result.stderr


def test_an_unknown_pre_tokenizer_is_one_line_naming_the_flag(extended_model, tmp_path):
    model = tmp_path / "odd"
    model.mkdir()
    for path in extended_model["model"].iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "odd.gguf"
    result = chla("export", "gguf", str(model), "--out", str(out), "--offline")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "--pre-tokenizer" in line and "tokenizer.json" in line, result.stderr
    assert not out.exists()
    # told the name, the export passes it on (the run with a name is the fixture's)
    from chla_tools.gguf_export import pre_tokenizer_name

    assert pre_tokenizer_name(model, "gpt-2") == "gpt-2"
    assert pre_tokenizer_name(extended_model["model"], None) == "smollm"


@pytest.fixture(scope="module")
def imported(extended_model) -> Path:
    """`chla import gguf` of the export, in this process (the CLI's refusals are tested below)."""
    from chla_launcher.contract.kinds.import_gguf import ImportGgufParams
    from chla_tools.gguf_import import import_gguf

    out = extended_model["root"] / "imported"
    import_gguf(ImportGgufParams(gguf=str(extended_model["gguf"])), out, log=lambda _m: None)
    return out


def state_dict_of(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def differing(ours: dict, reference: dict) -> list[str]:
    """Names whose tensors differ (or exist on one side only); exact comparison."""
    import torch

    names = set(ours) | set(reference)
    return sorted(n for n in names if n not in ours or n not in reference or not torch.equal(ours[n], reference[n]))


def test_import_holds_the_weights_transformers_gguf_loader_gives(extended_model, imported):
    import torch
    from transformers import AutoModelForCausalLM

    gguf_file = extended_model["gguf"]
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    expected = {name: tensor for name, tensor in reference.state_dict().items() if name != "lm_head.weight"}
    ours = state_dict_of(imported)
    assert differing(ours, expected) == []
    # f32 all the way: the very weights the model was exported with
    original = state_dict_of(extended_model["model"])
    assert differing(ours, original) == []
    # the control: one changed value is seen
    changed = dict(expected)
    changed["model.norm.weight"] = expected["model.norm.weight"].clone()
    changed["model.norm.weight"][3] += 1e-6
    assert differing(ours, changed) == ["model.norm.weight"]

    # tied: one tensor in the file, and transformers ties lm_head to it on loading
    assert "lm_head.weight" not in ours
    config = json.loads((imported / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(imported)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    provenance = json.loads((imported / "chla_import.json").read_text())
    assert provenance["source"]["sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert provenance["pre_tokenizer"] == "smollm"
    assert sorted(p.name for p in imported.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")) == [
        "model.safetensors"
    ]


def load_in_transformers_4(folder: Path, texts: list[str], tmp_path: Path) -> dict:
    """tests/integration/transformers4_load.py with the transformers 4 side environment first."""
    if not (TRANSFORMERS4 / "transformers").is_dir():
        pytest.fail(f"{TRANSFORMERS4} is missing: run `bash install.sh --test`")
    import torch

    (tmp_path / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TRANSFORMERS4), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "integration" / "transformers4_load.py"),
            str(tmp_path / "out.pt"),
            str(tmp_path / "texts.json"),
            str(folder),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt", weights_only=False)
    assert loaded["transformers"].startswith("4.")
    return loaded["folders"][str(folder)]


def test_imported_tokenizer_encodes_as_the_original_in_transformers_4_and_5(extended_model, imported, tmp_path):
    from transformers import AutoTokenizer

    texts = ENGLISH + CHINESE + HELD_OUT
    original = AutoTokenizer.from_pretrained(extended_model["model"])
    expected = [original(text)["input_ids"] for text in texts]
    ours = AutoTokenizer.from_pretrained(imported)
    assert [ours(text)["input_ids"] for text in texts] == expected
    assert [ours.decode(ids) for ids in expected] == texts
    assert ours.chat_template == CHAT_TEMPLATE
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (SPECIAL[1], SPECIAL[2], SPECIAL[2])
    old = load_in_transformers_4(imported, texts, tmp_path)
    assert "error" not in old, old
    assert old["ids"] == expected and old["vocab"] == extended_model["vocab"]

    # The control: transformers' own tokenizer for the file splits as GPT-2 does (it does not know
    # llama.cpp's "smollm"), so the spaces before "2024" come out as other tokens; the folder's do not.
    gguf_file = extended_model["gguf"]
    from_file = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert [from_file(text)["input_ids"] for text in texts] != expected


@pytest.mark.parametrize("damage", ["not_gguf", "truncated", "missing"])
def test_bad_input_is_one_line_and_writes_nothing(extended_model, tmp_path, damage):
    source = tmp_path / "model.gguf"
    if damage == "not_gguf":
        source.write_text("this is a text file, not a model\n")
    elif damage == "truncated":
        data = extended_model["gguf"].read_bytes()
        source.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = chla("import", "gguf", str(source), "--out", str(out))
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("chla: ") and str(source) in line, result.stderr
    expected = {"not_gguf": "not a GGUF file", "truncated": "truncated", "missing": "file not found"}[damage]
    assert expected in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if damage == "missing" else ["model.gguf"])
