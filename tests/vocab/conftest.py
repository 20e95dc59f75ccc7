"""Session fixtures for the vocabulary tests: one 20k Chinese model trained on the real demo text,
merged into the real base tokenizer (with and without [PAD]) through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from chla_launcher.cli import main as chla_main


def run_chla(capsys, *args: str) -> tuple[int, str, str]:
    """Run `chla ARGS` in this process; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = chla_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vocab")


@pytest.fixture(scope="session")
def zh_spm(demo_assets, vocab_dir) -> Path:
    """The 20k-piece Chinese BPE model trained on zh_train (a few seconds)."""
    from chla_launcher.contract.kinds.train_spm import TrainSpmParams
    from chla_tools.vocab import train_spm

    out = vocab_dir / "zh20k"
    train_spm(TrainSpmParams(inputs=[demo_assets["zh_train"]], vocab_size=20000), out, log=lambda m: None)
    return out / "spm.model"


@pytest.fixture(scope="session")
def merged(demo_assets, zh_spm, vocab_dir) -> dict:
    from chla_launcher.contract.kinds.merge_tokenizer import MergeTokenizerParams
    from chla_tools.vocab import merge_tokenizers

    out = vocab_dir / "merged"
    params = MergeTokenizerParams(base=demo_assets["base_tokenizer"], add=str(zh_spm))
    summary = merge_tokenizers(params, out, log=lambda m: None)
    return {"dir": out, **summary}


@pytest.fixture(scope="session")
def merged_pad(demo_assets, zh_spm, vocab_dir) -> dict:
    from chla_launcher.contract.kinds.merge_tokenizer import MergeTokenizerParams
    from chla_tools.vocab import merge_tokenizers

    out = vocab_dir / "merged_pad"
    params = MergeTokenizerParams(base=demo_assets["base_tokenizer"], add=str(zh_spm), pad_token=True)
    summary = merge_tokenizers(params, out, log=lambda m: None)
    return {"dir": out, **summary}


# --- byte-level BPE ------------------------------------------------------------------------------
# SmolLM2's tokenizer cannot be downloaded in CI cheaply, so the base is a small byte-level BPE
# trained here on the demo's English text and a little Chinese (so it has merges of its own inside
# CJK characters, as SmolLM2 has), shaped like the real ones: a pre-tokenizer sequence
# ending in ByteLevel (digits split, as SmolLM2 and Llama 3 do), <|endoftext|> inside the model's
# vocabulary at id 0 (as SmolLM2), and chat tokens added past it (as Llama 3's and Qwen's
# specials), a chat template, and transformers 5's own tokenizer_config.json.
BPE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_byte_level_base(text_files: list[str], out: Path, merges: int = 2000) -> Path:
    import json

    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(
        vocab_size=1 + len(alphabet) + merges,
        initial_alphabet=alphabet,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train([str(f) for f in text_files], trainer)
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    out.mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "backend": "tokenizers",
        "tokenizer_class": "TokenizersBackend",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 8192,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "chat_template.jinja").write_text(BPE_CHAT_TEMPLATE)
    return out


def head_lines(path: str, start: int, stop: int, out: Path) -> Path:
    with open(path, encoding="utf-8") as source:
        out.write_text("".join(line for number, line in enumerate(source) if start <= number < stop), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def bpe_base(demo_assets, vocab_dir) -> Path:
    """A 2000-merge byte-level BPE base trained on the demo's English text and 200 Chinese
    paragraphs (under a second)."""
    zh = head_lines(demo_assets["zh_train"], 15000, 15200, vocab_dir / "zh_for_base.txt")
    return write_byte_level_base([demo_assets["en_text"], zh], vocab_dir / "bpe_base")


@pytest.fixture(scope="session")
def zh_bpe(demo_assets, vocab_dir, bpe_base) -> Path:
    """A 4000-merge BPE trained with the base's pre-tokenizer on the first 3000 paragraphs of
    zh_train and, as real Chinese corpora hold some English, 400 lines of the English training
    text (a few seconds)."""
    from chla_launcher.contract.kinds.train_bpe import TrainBpeParams
    from chla_tools.vocab import train_bpe

    zh = head_lines(demo_assets["zh_train"], 0, 3000, vocab_dir / "zh_train_3000.txt")
    en = head_lines(demo_assets["en_text"], 0, 400, vocab_dir / "en_train_400.txt")
    corpus = vocab_dir / "zh_bpe_corpus.txt"
    corpus.write_text(zh.read_text(encoding="utf-8") + en.read_text(encoding="utf-8"), encoding="utf-8")
    out = vocab_dir / "zh_bpe"
    train_bpe(TrainBpeParams(inputs=[str(corpus)], base=str(bpe_base), merges=4000), out, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def merged_bpe(bpe_base, zh_bpe, vocab_dir) -> dict:
    from chla_launcher.contract.kinds.merge_tokenizer import MergeTokenizerParams
    from chla_tools.vocab import merge_tokenizers

    out = vocab_dir / "merged_bpe"
    summary = merge_tokenizers(MergeTokenizerParams(base=str(bpe_base), add=str(zh_bpe)), out, log=lambda m: None)
    return {"dir": out, **summary}
