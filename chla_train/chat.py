"""`chla chat MODEL_DIR [--adapter DIR]...`: talk to a model in the terminal, tokens streamed.

Each line read at the `>>> ` prompt is one single-turn request, wrapped in the recipe's Alpaca
prompt template (in the tokenizer's chat template with --chat-template; sent as it is with
--no-template). Ctrl-C during an answer stops that answer; Ctrl-C at the prompt or Ctrl-D (end of
input) ends the session with status 0.
"""

from __future__ import annotations

import argparse
import signal
import sys

PROMPT = ">>> "


def chat(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from chla_tools.evaluate import template_text
    from chla_tools.inference import encode_prompt, format_prompt, input_device, load_for_inference

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_for_inference(
        args.model, args.adapters, rope_scaling=args.rope_scaling, log=lambda m: print(m, file=sys.stderr, flush=True)
    )
    device = input_device(model)
    template = template_text(args.template, tokenizer)
    sampling = {"do_sample": args.temperature > 0, "repetition_penalty": args.repetition_penalty}
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    # TextStreamer prints each piece as soon as it decodes to complete characters (CJK at once,
    # other scripts at word ends), flushing stdout.
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    # Ctrl-C leaves (at the prompt) or stops an answer, even when chat was started from a process
    # that ignores SIGINT (nohup, a background job of a script): Python then installs no
    # KeyboardInterrupt handler of its own, and Ctrl-C would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("chla chat: type a request and press Enter; Ctrl-D or Ctrl-C to leave.", file=sys.stderr, flush=True)

    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return 0
        if not line.strip():
            continue
        text = format_prompt(line, template=template) if template else line
        input_ids = torch.tensor([encode_prompt(tokenizer, text)], device=device)
        try:
            with torch.no_grad():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=args.max_new_tokens,
                    streamer=streamer,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **sampling,
                )
        except KeyboardInterrupt:
            streamer.end()
            print("[stopped]", flush=True)
        print(flush=True)
