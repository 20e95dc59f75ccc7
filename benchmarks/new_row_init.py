"""Where the new vocabulary rows start, measured before any training step.

For a finished demo-like run (its base model, merged tokenizer and pre-tokenized Chinese corpus):
the base model resized to the merged tokenizer with each `new_row_init` (subtoken_mean, mean,
random), and for each
- the stage-1 validation loss at step 0 (nats per token over the validation blocks the run's
  `pt_embeddings` stage holds out; computed in fp32, so it matches that stage's first eval for
  the init it used to the stage's precision);
- perplexity per character on the held-out Chinese and English text (the evaluate stages' first
  `max_items` paragraphs, the same windows), beside the base model's with the base tokenizer on
  the same text. Per character, tokenizers with different vocabularies compare.

    .venv/bin/python benchmarks/new_row_init.py --run runs/demo

Prints one table (markdown) and `RESULT` lines.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from common import demo_run_parser, resize_to_merged_tokenizer
from machine import print_machine

INITS = ("subtoken_mean", "mean", "random")


def main() -> None:
    parser = demo_run_parser(__doc__)
    parser.add_argument("--stage", default="pt_embeddings", help="the stage-1 stage whose validation split to use")
    parser.add_argument("--max-items", type=int, default=200, help="held-out paragraphs per language")
    args = parser.parse_args()
    print_machine()

    import torch

    from chla_launcher.contract.recipe import load_frozen
    from chla_tools.blocks import BlockDataset, split_indices
    from chla_tools.evaluate import perplexity_sums
    from chla_train import model as models
    from chla_train.stages.pretrain import collate_blocks

    torch.manual_seed(0)
    recipe = load_frozen(args.run)
    stage = recipe.stages[args.stage].params
    base_dir = Path(stage.model)
    assets = args.run / "assets" / "out"
    texts = {
        lang: [
            line for line in (assets / f"{lang}_heldout.txt").read_text(encoding="utf-8").splitlines() if line.strip()
        ][: args.max_items]
        for lang in ("zh", "en")
    }
    blocks = BlockDataset(stage.corpus[0].path, stage.block_size)
    _, valid = split_indices(
        len(blocks), valid_count=stage.valid_count, valid_fraction=stage.valid_fraction, seed=stage.seed
    )

    def ppl_per_char(model, tokenizer) -> dict[str, float]:
        sums = {
            lang: perplexity_sums(model, tokenizer, lines, block=256, batch_size=16) for lang, lines in texts.items()
        }
        return {lang: math.exp(s["nll"] / s["characters"]) for lang, s in sums.items()}

    @torch.no_grad()
    def valid_loss(model) -> float:
        total, count = 0.0, 0
        for first in range(0, len(valid), 8):
            batch = collate_blocks([blocks[int(i)] for i in valid[first : first + 8]])
            ids = torch.from_numpy(batch["input_ids"])
            loss = model(input_ids=ids, labels=ids, num_items_in_batch=torch.ones(())).loss
            total += float(loss)
            count += ids.shape[0] * (ids.shape[1] - 1)
        return total / count

    rows = []
    started = time.perf_counter()
    base_tokenizer = models.load_tokenizer(base_dir)
    base = models.build_base_model(str(base_dir), None, dtype=torch.float32, attn_implementation="sdpa", seed=0).eval()
    rows.append(("base model, base tokenizer", None, ppl_per_char(base, base_tokenizer)))
    merged_tokenizer = models.load_tokenizer(stage.tokenizer)
    for init in INITS:
        model = models.build_base_model(
            str(base_dir), None, dtype=torch.float32, attn_implementation="sdpa", seed=0
        ).eval()
        resize_to_merged_tokenizer(
            model, merged_tokenizer, new_row_init=init, tokenizer_dir=stage.tokenizer, seed=stage.seed
        )
        rows.append((f"resized, {init}", valid_loss(model), ppl_per_char(model, merged_tokenizer)))
    uniform = math.log(len(merged_tokenizer))

    print(
        f"\nStep 0 of stage 1: {len(valid)} validation blocks of {stage.block_size} tokens from {args.stage}'s "
        f"split; held-out text: first {args.max_items} paragraphs per language "
        f"({time.perf_counter() - started:.0f} s)\n"
    )
    print("| model at step 0 | stage-1 valid loss (nats/token) | zh ppl/char | en ppl/char |")
    print("|---|---:|---:|---:|")
    for name, loss, ppl in rows:
        shown = "-" if loss is None else f"{loss:.3f}"
        print(f"| {name} | {shown} | {ppl['zh']:.4g} | {ppl['en']:.4g} |")
    print(f"| (uniform over {len(merged_tokenizer):,} tokens) | {uniform:.3f} | | |")
    for name, loss, ppl in rows[1:]:
        init = name.split(", ")[1]
        print(
            f"RESULT init={init} valid_loss={loss:.4f} zh_ppl_per_char={ppl['zh']:.4g} "
            f"en_ppl_per_char={ppl['en']:.4g} zh_vs_base={ppl['zh'] / rows[0][2]['zh']:.3g}"
        )


if __name__ == "__main__":
    main()
