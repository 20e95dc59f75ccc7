"""Load HF folders with whatever transformers is first on the path and save what they give.

    python transformers4_load.py OUT.pt TEXTS.json DIR [DIR ...]

The tests run it with the main venv's python and the transformers 4 side environment first on
PYTHONPATH (install.sh --test builds it in .venv/transformers4), so torch is shared and only
transformers, tokenizers and huggingface_hub differ. For every folder: the tokenizer's class, size
and ids of each text (BOS added as the tokenizer does); for folders with weights, the model's
float32 logits on those ids. A folder that does not load is recorded with its one-line error.
"""

import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(folder: str, texts: list[str]) -> dict:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # the test asserts on the message
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    ids = [tokenizer(text)["input_ids"] for text in texts]
    result = {
        "tokenizer_class": type(tokenizer).__name__,
        "vocab": len(tokenizer),
        "ids": ids,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return result  # a tokenizer or adapter folder
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        result["logits"] = [model(torch.tensor([row])).logits[0].float() for row in ids]
    return result


def main() -> None:
    out, texts_file, *folders = sys.argv[1:]
    texts = json.loads(open(texts_file, encoding="utf-8").read())
    torch.save(
        {"transformers": transformers.__version__, "folders": {folder: load(folder, texts) for folder in folders}}, out
    )


if __name__ == "__main__":
    main()
