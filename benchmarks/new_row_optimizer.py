"""Stage 1 on the demo's resized base: how Adam's learning rate and epsilon move the new rows.

With a tied matrix every new token's row is also an output row, which the softmax pushes down a
little at every position whether or not the token occurs. At Adam's usual epsilon (1e-8) those
tiny gradients get full steps, so every new token a batch does not use sinks each step; a larger
`embedding_adam_epsilon` keeps those rows still. This loop trains only the new rows of the resized
base (as stage 1 does, one tied matrix) on the demo's Chinese text in 8 x 128-token batches at a
constant rate, and prints the loss per step, then Chinese perplexity per character on validation
paragraphs (from the end of zh_train.txt, which these batches do not reach) and teacher-forced copy
accuracy (the share of a copied sentence's tokens predicted right, two-shot prompt) before and after.

    .venv/bin/python benchmarks/new_row_optimizer.py --run runs/demo --lr 5e-3 --eps 1e-3 --steps 20

RUN is a demo run whose `base` and `vocab` stages have finished.
"""

from __future__ import annotations

import math
import random
import re
import time

from common import demo_run_parser, resize_to_merged_tokenizer
from machine import print_machine


def main() -> None:
    parser = demo_run_parser(__doc__)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--eps", type=float, default=1e-8, help="Adam's epsilon for the new rows")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print_machine()

    import torch
    from transformers import AutoModelForCausalLM

    from chla_train import model as models

    torch.manual_seed(0)
    base_dir, tokenizer_dir = args.run / "base" / "out", args.run / "vocab" / "out" / "tokenizer"
    tokenizer = models.load_tokenizer(str(tokenizer_dir))
    text = (args.run / "assets" / "out" / "zh_train.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    validation = [line for line in lines[-3000:] if len(line) > 60][:200]
    sentences = [
        sentence
        for line in validation
        for sentence in re.findall(r"[^。！？]*[。！？]", line.strip())
        if 12 <= len(sentence) <= 40
    ]
    shot, copies = sentences[0], sentences[1:13]
    ids = tokenizer(text[:400_000]).input_ids  # the batches: the first 400,000 characters
    blocks = [ids[i : i + 128] for i in range(0, len(ids) - 128, 128)]
    random.Random(0).shuffle(blocks)

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    base_rows = resize_to_merged_tokenizer(
        model, tokenizer, new_row_init="subtoken_mean", tokenizer_dir=tokenizer_dir, seed=0
    )
    for parameter in model.parameters():
        parameter.requires_grad = False
    weight = model.get_input_embeddings().weight  # tied: lm_head is the same tensor
    frozen = weight.detach()[:base_rows].clone()
    new = torch.nn.Parameter(weight.detach()[base_rows:].clone())

    def logits(batch):
        matrix = torch.cat([frozen, new])
        hidden = model.model(inputs_embeds=torch.nn.functional.embedding(batch, matrix)).last_hidden_state
        return hidden @ matrix.T

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            weight[base_rows:] = new.detach()
            nll = chars = 0.0
            for paragraph in validation[20:40]:
                x = torch.tensor([tokenizer(paragraph).input_ids[:256]])
                nll += model(x, labels=x).loss.item() * (x.shape[1] - 1)
                chars += len(tokenizer.decode(x[0, 1:]))
            right = total = 0
            for sentence in copies:
                two_shot = f"句子：{shot}\n重复：{shot}\n句子：{sentence}\n重复："
                prompt = tokenizer(two_shot).input_ids
                x = torch.tensor([tokenizer(two_shot + sentence).input_ids])
                predicted = model(x).logits[0, len(prompt) - 1 : -1].argmax(-1)
                right += int((predicted == x[0, len(prompt) :]).sum())
                total += x.shape[1] - len(prompt)
        return math.exp(nll / chars), right / total

    before = measure()
    optimizer = torch.optim.AdamW([new], lr=args.lr, eps=args.eps, weight_decay=0.0)
    losses, started = [], time.perf_counter()
    for step in range(args.steps):
        batch = torch.tensor(blocks[step * 8 : (step + 1) * 8])
        out = logits(batch)
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    after = measure()
    print(f"lr {args.lr:g}, epsilon {args.eps:g}, {args.steps} steps ({seconds:.0f} s)")
    print("loss per step: " + " ".join(f"{value:.2f}" for value in losses))
    print(f"validation zh ppl/char: {before[0]:.1f} -> {after[0]:.1f}")
    print(f"teacher-forced copy accuracy: {before[1]:.3f} -> {after[1]:.3f}")
    print(f"RESULT lr={args.lr:g} eps={args.eps:g} steps={args.steps} loss_last={losses[-1]:.3f} ppl={after[0]:.1f}")


if __name__ == "__main__":
    main()
