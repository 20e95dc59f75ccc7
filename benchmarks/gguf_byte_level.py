"""llama.cpp on a byte-level BPE vocabulary extended for Chinese: SmolLM2-135M's tokenizer with a
Chinese BPE appended, its model exported by `chla export gguf`, tokenized by llama.cpp and by the HF
tokenizer on held-out English and Chinese lines.

    .venv/bin/python benchmarks/gguf_byte_level.py [--merges N] [--lines N]

The extension here is the simplest of its kind, made in this script so that it needs nothing but
the assets: a BPE of N merges trained with `tokenizers` on the demo's Chinese training text with
SmolLM2's own pre-tokenizer and byte alphabet, whose merges are appended after SmolLM2's 48,900
when both halves are already tokens (each new token at the next id). The model is the imported
SmolLM2 folder with its tied embedding grown to the new vocabulary. llama.cpp's converter does not
recognise the extended vocabulary's hash; chla's export gives it the base's pre-tokenizer
("smollm"), and this script checks that llama.cpp then splits text exactly as HF does.

Needs llama-cpp-python importable: see benchmarks/gguf_import.py for a build from the pinned sdist.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from machine import print_machine


def extended_tokenizer_json(base: dict, chinese_lines: list[str], merges: int) -> tuple[dict, int]:
    """The base tokenizer.json with a Chinese BPE's new merges appended; and how many tokens it adds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    chinese = Tokenizer(models.BPE())
    chinese.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    chinese.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    chinese.train_from_iterator(chinese_lines, trainer=trainer)
    extended = json.loads(json.dumps(base))
    vocab, base_merges = extended["model"]["vocab"], extended["model"]["merges"]
    next_id = 1 + max([*vocab.values(), *(token["id"] for token in extended["added_tokens"])])
    first = next_id
    for left, right in json.loads(chinese.to_str())["model"]["merges"]:
        if left in vocab and right in vocab and left + right not in vocab:
            vocab[left + right] = next_id
            base_merges.append([left, right])
            next_id += 1
    return extended, next_id - first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merges", type=int, default=20000, help="merges of the Chinese BPE (default 20000)")
    parser.add_argument("--lines", type=int, default=1000, help="held-out lines per language (default 1000)")
    args = parser.parse_args()
    print_machine()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not importable; see benchmarks/gguf_import.py for how to build it")
        return 2
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chla_launcher.contract.kinds.export import ExportParams
    from chla_launcher.contract.kinds.import_gguf import ImportGgufParams
    from chla_tools.assets import fetch_assets, fetch_base_model
    from chla_tools.gguf_export import export_gguf
    from chla_tools.gguf_import import import_gguf

    torch.set_num_threads(2)
    assets = fetch_assets()

    def lines(key: str) -> list[str]:
        return [line for line in Path(assets[key]).read_text(encoding="utf-8").splitlines() if line]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "extended"
        import_gguf(ImportGgufParams(gguf=fetch_base_model()), folder, log=lambda _m: None)
        base = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        started = time.perf_counter()
        extended, added = extended_tokenizer_json(base, lines("zh_train"), args.merges)
        (folder / "tokenizer.json").write_text(json.dumps(extended, ensure_ascii=False), encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        print(
            f"extension: {added:,} tokens appended ({len(tokenizer):,} in all) in {time.perf_counter() - started:.1f} s"
        )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.save_pretrained(folder)

        gguf_file = Path(tmp) / "extended-f32.gguf"
        log: list[str] = []
        started = time.perf_counter()
        exported = export_gguf(ExportParams(model=str(folder), outtype="f32"), gguf_file, log=log.append)
        print(
            f"export: {time.perf_counter() - started:.1f} s, pre-tokenizer {exported['pre_tokenizer']!r} "
            f"({[line.split('INFO:hf-to-gguf:')[-1] for line in log if 'pre-tokenizer:' in line][-1]})"
        )
        cpp = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
        print(
            f"{'held-out lines':<16} {'count':>6} {'llama.cpp = HF':>15} {'tokens/char':>12} {'base tokens/char':>17}"
        )
        base_tokenizer = Tokenizer.from_str(json.dumps(base))
        failures = 0
        for name, key in (("English", "en_heldout"), ("Chinese", "zh_heldout")):
            held_out = lines(key)[: args.lines]
            same = 0
            tokens = base_tokens = chars = 0
            for line in held_out:
                ids = tokenizer(line, add_special_tokens=False)["input_ids"]
                got = cpp.tokenize(line.encode("utf-8"), add_bos=False, special=False)
                same += got == ids
                if got != ids and failures < 3:
                    failures += 1
                    print(f"  differs: {line[:40]!r}: HF {ids[:12]} llama.cpp {got[:12]}")
                tokens += len(ids)
                base_tokens += len(base_tokenizer.encode(line, add_special_tokens=False).ids)
                chars += len(line)
            print(f"{name:<16} {len(held_out):>6} {same:>15} {tokens / chars:>12.3f} {base_tokens / chars:>17.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
