"""Can the model copy Chinese it has just read? Measured at every point of a finished demo-like run.

Copying a sentence from the prompt is what word segmentation and entity extraction ask of the
model (the answer is the input, re-spaced or picked from), and what a pretrained base does by
induction. The probe: a two-shot prompt (`句子：A\\n重复：A\\n句子：B\\n重复：`) over held-out
Chinese sentences, greedy, scored by exact copies of B and by character ROUGE-L against B. It is
run on the base (its own tokenizer), on the base resized to the merged tokenizer with the run's
`new_row_init` before any step, and on the models after stage 1, after stage 2 (merged) and after
SFT (merged), so a collapse shows where it happens.

    .venv/bin/python benchmarks/copy_probe.py --run runs/demo [--sentences 40]

Prints one table (markdown) and `RESULT` lines.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from common import demo_run_parser, resize_to_merged_tokenizer
from machine import print_machine


def held_out_sentences(path: Path, count: int) -> list[str]:
    """Whole sentences of 12-40 characters from the held-out paragraphs, in file order."""
    sentences = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for sentence in re.findall(r"[^。！？]*[。！？]", line.strip()):
            if 12 <= len(sentence) <= 40:
                sentences.append(sentence)
                if len(sentences) == count + 1:
                    return sentences
    return sentences


def main() -> None:
    parser = demo_run_parser(__doc__)
    parser.add_argument("--sentences", type=int, default=40, help="held-out sentences to copy")
    args = parser.parse_args()
    print_machine()

    import torch

    from chla_launcher.contract.recipe import load_frozen
    from chla_tools.text_metrics import rouge_l
    from chla_train import model as models

    torch.manual_seed(0)
    run = args.run
    recipe = load_frozen(run)
    stage1 = recipe.stages["pt_embeddings"].params
    sentences = held_out_sentences(run / "assets" / "out" / "zh_heldout.txt", args.sentences)
    shot, probes = sentences[0], sentences[1:]

    def copy_scores(model, tokenizer) -> tuple[float, float]:
        exact, rouge = 0, 0.0
        for sentence in probes:
            prompt = f"句子：{shot}\n重复：{shot}\n句子：{sentence}\n重复："
            ids = torch.tensor([tokenizer(prompt).input_ids])
            with torch.no_grad():
                out = model.generate(
                    ids,
                    max_new_tokens=2 * len(sentence),
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.eos_token_id,
                )
            answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
            exact += answer == sentence
            rouge += rouge_l(answer, sentence)["f1"]
        return exact / len(probes), rouge / len(probes)

    def load(path: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    started = time.perf_counter()
    merged = models.load_tokenizer(stage1.tokenizer)

    def resized():
        model = load(str(stage1.model))
        resize_to_merged_tokenizer(
            model, merged, new_row_init=stage1.new_row_init, tokenizer_dir=stage1.tokenizer, seed=stage1.seed
        )
        return model

    points = [
        ("base", "base, base tokenizer", lambda: load(str(stage1.model)), models.load_tokenizer(stage1.model)),
        ("step0", f"resized ({stage1.new_row_init}), step 0", resized, merged),
        ("stage1", "after stage 1", lambda: load(str(run / "pt_embeddings" / "out" / "model")), merged),
        ("stage2", "after stage 2 (merged)", lambda: load(str(run / "merge_pt" / "out")), merged),
        ("sft", "after SFT (merged)", lambda: load(str(run / "merge_sft" / "out")), merged),
    ]
    rows = [(key, name, *copy_scores(build(), tokenizer)) for key, name, build, tokenizer in points]
    print(
        f"\nCopy probe: {len(probes)} held-out sentences of 12-40 characters, one example shot, greedy "
        f"({time.perf_counter() - started:.0f} s)\n"
    )
    print("| model | exact copies | character ROUGE-L F1 |")
    print("|---|---:|---:|")
    for _, name, exact, rouge in rows:
        print(f"| {name} | {exact:.3f} | {rouge:.3f} |")
    for key, _, exact, rouge in rows:
        print(f"RESULT point={key} exact={exact:.3f} rouge_l={rouge:.3f}")


if __name__ == "__main__":
    main()
