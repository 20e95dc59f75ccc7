"""`template: chat`: SFT examples, evaluation prompts and `chla chat` in the tokenizer's own chat
template (for an instruction-tuned base such as SmolLM2-Instruct), encoded exactly as the
template renders a one-turn conversation, with one BOS."""

from __future__ import annotations

import pytest

from chla_launcher.contract.errors import ChlaError
from chla_tools.evaluate import prompt_text, template_text
from chla_tools.sft_data import PROMPT_TEMPLATE, load_sft_dataset, resolve_template

RECORD = {"instruction": "判断这条评论的情感。", "input": "这本书很好看，推荐给大家！", "output": "积极"}


@pytest.fixture
def tokenizer(bpe_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_base)


def rendered(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def test_chat_prompts_are_the_tokenizers_rendering(tokenizer):
    content = f"{RECORD['instruction']}\n{RECORD['input']}"
    prompt = prompt_text(RECORD, template=template_text("chat", tokenizer))
    # the rendering starts with the BOS token, which encoding adds itself
    assert tokenizer.bos_token + prompt == rendered(tokenizer, content)
    # control: the Alpaca template (the default) is another text
    assert prompt_text(RECORD, template=template_text("alpaca", tokenizer)) != prompt
    assert template_text("none", tokenizer) is None


def test_sft_examples_in_the_chat_template(tokenizer, bpe_base, tmp_path):
    import json

    data = tmp_path / "train.json"
    data.write_text(json.dumps([RECORD], ensure_ascii=False), encoding="utf-8")
    ids, labels = {}, {}
    for template in ("chat", None):
        dataset = load_sft_dataset(data, bpe_base, max_seq_length=256, template=template, cache_dir=tmp_path / "cache")
        ids[template] = [int(i) for i in dataset.input_ids[: dataset.offsets[1]]]
        labels[template] = [int(i) for i in dataset.labels[: dataset.offsets[1]]]
    whole = rendered(tokenizer, f"{RECORD['instruction']}\n{RECORD['input']}") + RECORD["output"] + "<|im_end|>"
    # exactly the conversation's tokens: one BOS, the rendered turn, the answer, EOS
    assert ids["chat"] == tokenizer(whole, add_special_tokens=False).input_ids
    answer = [token for token in labels["chat"] if token != -100]
    assert tokenizer.decode(answer) == "\n" + RECORD["output"] + "<|im_end|>"
    assert ids[None] != ids["chat"]  # control: the Alpaca template


def test_a_template_needs_what_it_names(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ChlaError, match="chat template"):
        resolve_template("chat", tokenizer)
    with pytest.raises(ChlaError, match="instruction"):
        resolve_template("no placeholder here")
    assert resolve_template("alpaca") == resolve_template(None) == PROMPT_TEMPLATE
