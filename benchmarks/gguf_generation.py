"""The demo's final model in llama.cpp: greedy generations of llama-cpp-python on the GGUF that
`chla export gguf` wrote, against transformers on the safetensors, token for token.

    .venv/bin/python benchmarks/gguf_generation.py [RUN_DIR] [--reviews N] [--max-new-tokens N]

RUN_DIR is a finished demo run (default runs/demo); its merge_sft/out is exported here again as
f32 (with an f32 KV cache, llama.cpp's arithmetic is the closest to transformers' fp32; the f16
file of the demo's `gguf` stage is checked tensor by tensor in the test suite). Prompts: the demo's
general prompts and the first N held-out reviews of the sentiment test set, in the template the
run's `eval_sft` stage used (the chat template of the SmolLM2 demo, Alpaca for the others), each
encoded once (BOS + the tokenizer's ids, special tokens such as <|im_start|> parsed) and given to
both. Prints, per prompt set, how many prompts llama.cpp tokenises exactly as transformers does and
how many greedy generations are equal; then, on held-out Chinese paragraphs, at how many positions
the two agree on the most likely next token, and the largest difference of any logit.

llama-cpp-python is not a chla dependency: build it from the same pinned sdist the export uses
(6-24 min on 2 cores), e.g.
    CMAKE_ARGS=-DLLAVA_BUILD=OFF pip install --target /tmp/llama_cpp diskcache \
        ~/.cache/chla/assets/downloads/llama_cpp_python-0.3.36.tar.gz
    PYTHONPATH=/tmp/llama_cpp .venv/bin/python benchmarks/gguf_generation.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from machine import print_machine


def hf_greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    generated = output[0, len(ids) :].tolist()
    return generated[: generated.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in generated else generated


def llama_cpp_greedy(llm, ids: list[int], max_new_tokens: int) -> list[int]:
    generated: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(generated) == max_new_tokens:
            break
        generated.append(token)
    return generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/demo")
    parser.add_argument("--reviews", type=int, default=100, help="held-out reviews as prompts (default 100)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--paragraphs",
        type=int,
        default=20,
        help="held-out Chinese paragraphs: their openings continued, their logits compared",
    )
    args = parser.parse_args()
    print_machine()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not importable; see this script's docstring for how to build it")
        return 2
    import torch
    from transformers import AutoModelForCausalLM

    from chla_launcher.contract.kinds.export import ExportParams
    from chla_launcher.contract.recipe import load_frozen
    from chla_tools.evaluate import prompt_text, template_text
    from chla_tools.gguf_export import export_gguf
    from chla_tools.inference import encode, load_tokenizer
    from chla_tools.sft_data import split_prompt

    torch.set_num_threads(2)
    run = Path(args.run_dir)
    model_dir = run / "merge_sft" / "out"
    tokenizer = load_tokenizer(model_dir)
    template = template_text(load_frozen(run).stages["eval_sft"].params.template, tokenizer)
    demo = run / "assets" / "out"  # the demo's fetch_assets stage: prompts and held-out reviews
    general = [
        prompt_text(json.loads(line), template=template)
        for line in (demo / "prompts.jsonl").read_text().splitlines()
        if line.strip()
    ]
    reviews_file = demo / "tasks" / "sentiment_test.json"
    if not reviews_file.is_file():  # the demo's assets before the four tasks
        reviews_file = demo / "sft_test.json"
    reviews = [prompt_text(r, template=template) for r in json.loads(reviews_file.read_text())[: args.reviews]]
    paragraphs = [line for line in (demo / "zh_heldout.txt").read_text(encoding="utf-8").splitlines() if line.strip()][
        : args.paragraphs
    ]
    openings = [paragraph[:24] for paragraph in paragraphs]  # raw text to continue, no template
    print(f"llama-cpp-python {llama_cpp.__version__}; model {model_dir}")

    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model-f32.gguf"
        export_gguf(ExportParams(model=str(model_dir), outtype="f32"), gguf, log=lambda _m: None)
        llm = llama_cpp.Llama(
            str(gguf),
            n_ctx=512,
            n_threads=2,
            n_batch=512,
            seed=0,
            verbose=False,
            logits_all=True,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        print(f"{'prompts':<28} {'count':>5} {'same tokens':>12} {'same greedy':>12} {'hf s':>7} {'llama.cpp s':>12}")
        for name, prompts in (
            ("demo general prompts", general),
            ("held-out reviews", reviews),
            ("Chinese openings, raw", openings),
        ):
            same_tokens = same_generation = 0
            hf_seconds = cpp_seconds = 0.0
            for prompt in prompts:
                prompt = split_prompt(prompt)[0]  # as SFT and evaluate encode it: the answer starts with the whitespace
                ids = encode(tokenizer, prompt)
                # BOS as `encode` adds it, then the text with its special tokens parsed, as transformers does
                bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
                same_tokens += bos + llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == ids
                started = time.perf_counter()
                expected = hf_greedy(model, tokenizer, ids, args.max_new_tokens)
                hf_seconds += time.perf_counter() - started
                started = time.perf_counter()
                got = llama_cpp_greedy(llm, ids, args.max_new_tokens)
                cpp_seconds += time.perf_counter() - started
                same_generation += got == expected
                if got != expected:
                    print(
                        f"  differs: {prompt[-40:]!r}: hf {tokenizer.decode(expected)!r} "
                        f"llama.cpp {tokenizer.decode(got)!r}"
                    )
            print(
                f"{name:<28} {len(prompts):>5} {same_tokens:>12} {same_generation:>12} "
                f"{hf_seconds:>7.1f} {cpp_seconds:>12.1f}"
            )
        positions = same_top1 = 0
        largest = 0.0
        for paragraph in paragraphs:
            ids = encode(tokenizer, paragraph)[:256]
            with torch.no_grad():
                expected = model(torch.tensor([ids])).logits[0].float().numpy()
            llm.reset()
            llm.eval(ids)
            got = llm.scores[: len(ids)]
            positions += len(ids)
            same_top1 += int((got.argmax(-1) == expected.argmax(-1)).sum())
            largest = max(largest, float(abs(got - expected).max()))
        print(
            f"teacher-forced logits on {len(paragraphs)} held-out paragraphs: top-1 equal at {same_top1:,} of "
            f"{positions:,} positions, max |logit difference| {largest:.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
