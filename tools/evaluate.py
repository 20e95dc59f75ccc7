"""Headless batch evaluation (`chla eval`, stage kind `evaluate`, an array over shards).

Three kinds of input, any number of each:
- perplexity text (`ppl`): one paragraph a line. Each non-empty line is scored on its own as
  [BOS] + its tokens. A line longer than the block (the model's max_position_embeddings, or
  `block_size`) is cut into windows of `block` tokens that overlap by one token, so every token
  after BOS is predicted exactly once, with at most block-1 tokens of context. Sums over all
  lines: nll (natural log), tokens (predicted tokens), characters (len of the lines).
  ppl_per_token = exp(nll / tokens); ppl_per_char = exp(nll / characters). Per character is
  what makes tokenizers with different vocabularies comparable (both saw the same characters).
- labelled tasks (`tasks`): Alpaca records {instruction, input, output}; the prompt template is
  applied and the answer generated greedily. Records with a `task` key (sentiment, segmentation,
  entities, continuation) are scored by that task's metric beside its baselines and references
  (chla_tools.tasks: accuracy, word F1, entity F1, ROUGE-L), each task with its own generation
  length; records without one by exact match after whitespace normalisation (runs of
  whitespace -> one space, ends stripped), beside the majority-output baseline of the file.
  Classification tasks (sentiment) are also scored by ranking their choices by the model's
  log-likelihood, as lm-evaluation-harness scores multiple choice: the summed log-probability
  of each choice's tokens after the prompt (the choice tokenized as the prompt's continuation,
  as SFT tokenizes targets: chla_tools.sft_data.encode_pairs; no EOS), the highest wins.
  Greedy generation stays the headline (`score`).
- prompts (`prompts`): JSONL {"prompt": ...} (or Alpaca records) -> greedy generations, JSONL.
Generation length: `max_new_tokens` when given, else the task's own (chla_tools.tasks), else 64.

Sharding: item i of every input belongs to shard i % num_shards, so each item is in exactly one
shard. A shard writes its sums and generations under out/partials/ (atomically; the shard's JSON
summary last). Aggregation adds the sums of all shards and only then divides, so N shards give
the 1-shard numbers up to float summation order. Generation is batched with left padding.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from chla_launcher.contract.atomic import new_directory, write_json, write_text
from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.evaluate import EvaluateParams
from chla_tools.intervals import bootstrap_interval
from chla_tools.tasks import ExactMatch, Task, normalise, task_named, task_of

T = TypeVar("T")

Log = Callable[[str], None]
PARTIALS = "partials"
GENERATIONS = "generations"
# Generation length for prompts and for task files without a `task` key, unless given.
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class Source:
    kind: str  # "ppl" | "task" | "prompts"
    path: Path
    name: str


def evaluation_sources(params: EvaluateParams) -> list[Source]:
    """The inputs of an evaluation, each named by its kind and file stem (unique); none when it
    runs lm-evaluation-harness only."""
    sources: list[Source] = []
    taken: set[str] = set()
    for kind, paths in (("ppl", params.ppl), ("task", params.tasks), ("prompts", params.prompts)):
        for path in map(Path, paths):
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem) or "input"
            name, n = f"{kind}-{stem}", 2
            while name in taken:
                name, n = f"{kind}-{stem}-{n}", n + 1
            taken.add(name)
            sources.append(Source(kind, path, name))
    return sources


def load_items(source: Source) -> list:
    """The records of one input, validated; every error names the file (and record)."""
    from chla_tools.inference import read_json_or_jsonl

    if not source.path.is_file():
        raise ChlaError(f"{source.kind} file {source.path}: not found")
    if source.kind == "ppl":
        lines = [line for line in source.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ChlaError(f"perplexity file {source.path} has no text lines; give a file of paragraphs, one a line")
        return lines
    records = read_json_or_jsonl(source.path)
    if not isinstance(records, list) or not records:
        raise ChlaError(
            f"{source.kind} file {source.path} has no items; expected a JSON list or JSON Lines of "
            + ("{instruction, input, output} records" if source.kind == "task" else '{"prompt": ...} records')
        )
    required = ("instruction", "output") if source.kind == "task" else ()
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ChlaError(f"{source.path}: record {number} is not an object")
        missing = [key for key in required if not isinstance(record.get(key), str)]
        if source.kind == "prompts" and not isinstance(record.get("prompt", record.get("instruction")), str):
            missing = ["prompt"]
        if missing:
            raise ChlaError(f"{source.path}: record {number} has no string {missing[0]!r}")
    if source.kind == "task":
        task_of(records, source.path)
    return records


def sampled(items: list, source: Source, params: EvaluateParams) -> list:
    """A task file's records, or with `sample` a seeded random sample of them, in file order
    (every shard draws the same one)."""
    if source.kind != "task" or params.sample is None or params.sample >= len(items):
        return items
    chosen = random.Random(params.sample_seed).sample(range(len(items)), params.sample)
    return [items[index] for index in sorted(chosen)]


def shard_of(items: list[T], shard: int, num_shards: int) -> list[tuple[int, T]]:
    return [(index, items[index]) for index in range(shard, len(items), num_shards)]


# --- scoring ------------------------------------------------------------------------------------


# Positions x vocabulary entries of one chunk's fp32 logits in perplexity_sums: 64 MB on a CPU,
# 512 MB on a GPU (as the trainer's chunked loss, chla_train.token_loss).
LOGITS_PER_CHUNK = {"cpu": 2**24, "cuda": 2**27}


def perplexity_sums(
    model,
    tokenizer,
    lines: list[str],
    *,
    block: int,
    batch_size: int,
    report: Callable[[int, int], None] | None = None,
) -> dict:
    """nll / predicted tokens / characters summed over `lines` (see the module docstring).

    The vocabulary projection runs a chunk of positions at a time: a pre-hook on the output
    layer takes the batch's hidden states and hands the layer no positions, then the layer
    projects the predicting positions in chunks of LOGITS_PER_CHUNK entries. Whole fp32 logits
    of a batch of full windows were batch x block x vocabulary: 16 x 4,096 x 49,954 x 4 B = 13 GB,
    and as much again in the cross-entropy. `report(lines_done, lines)` after every batch."""
    import torch
    import torch.nn.functional as F

    from chla_tools.inference import encode, input_device

    windows: list[list[int]] = []
    line_of: list[int] = []  # the line each window belongs to (windows are in line order)
    tokens = 0
    for number, line in enumerate(lines):
        ids = encode(tokenizer, line)
        tokens += len(ids) - 1
        for start in range(0, max(len(ids) - 1, 1), block - 1):
            windows.append(ids[start : start + block])
            line_of.append(number)
    device = input_device(model)
    layer = model.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def keep_hidden_states(_module, args):
        captured.append(args[0])
        return (args[0][:, :0],) + tuple(args[1:])

    nll = 0.0
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        width = max(len(w) for w in batch)
        # right padding is harmless here: causal attention never looks at later positions
        input_ids = torch.tensor([w + [0] * (width - len(w)) for w in batch], device=device)
        mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in batch], device=device)
        labels = input_ids.masked_fill(mask == 0, -100)
        captured.clear()
        hook = layer.register_forward_pre_hook(keep_hidden_states)
        try:
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=mask)
        finally:
            hook.remove()
        hidden = captured[0]
        # Position t predicts token t + 1; padding predicts nothing.
        rows, columns = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
        targets = labels[rows, columns + 1]
        predicting = hidden[rows.to(hidden.device), columns.to(hidden.device)]
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)
        chunk = max(1, LOGITS_PER_CHUNK.get(predicting.device.type, 2**24) // vocab)
        row_sums = torch.zeros(len(batch), dtype=torch.float64, device=targets.device)
        for start in range(0, len(targets), chunk):
            with torch.no_grad():
                logits = layer(predicting[None, start : start + chunk])[0].float()
            target = targets[start : start + chunk].to(logits.device)
            losses = F.cross_entropy(logits, target, reduction="none").to(row_sums.device)
            row_sums.index_add_(0, rows[start : start + chunk], losses.double())
            del logits
        nll += sum(row_sums.tolist())
        if report is not None:
            report(line_of[first + len(batch) - 1] + 1, len(lines))
    return {"nll": nll, "tokens": tokens, "characters": sum(len(line) for line in lines), "lines": len(lines)}


def choice_logliks(model, tokenizer, prompts: list[str], choices: list[str], *, batch_size: int) -> list[list[float]]:
    """For each prompt, the summed log-probability of each choice's tokens after it (see the
    module docstring). Rows are padded on the left with explicit position ids, so a padded row
    scores as it would alone, longest first (little padding), and only the logits that predict
    choice tokens are computed."""
    import torch

    from chla_tools.sft_data import encode_pairs

    # Every (prompt, choice) pair in one tokenizer call, prompt by prompt.
    pairs = [
        (head, answer)
        for head, answer, _joined in encode_pairs(
            tokenizer, [prompt for prompt in prompts for _ in choices], list(choices) * len(prompts)
        )
    ]
    keep = max(len(answer) for _head, answer in pairs) + 1
    device = next(model.parameters()).device
    scores: list[float] = [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    for first in range(0, len(order), batch_size):
        batch = [pairs[i] for i in order[first : first + batch_size]]
        rows = [prompt + choice for prompt, choice in batch]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
            ).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # logprobs[:, j] predicts token width - keep + j + 1
        for row, (index, (_prompt, choice)) in enumerate(zip(order[first : first + batch_size], batch)):
            offset = keep - 1 - len(choice)
            scores[index] = sum(logprobs[row, offset + k, token].item() for k, token in enumerate(choice))
    return [scores[i * len(choices) : (i + 1) * len(choices)] for i in range(len(prompts))]


def template_text(template: str, tokenizer) -> str | None:
    """The evaluate kind's `template` (alpaca, chat, none) as a template text, or None for prompts
    as they are."""
    from chla_tools.sft_data import resolve_template

    return None if template == "none" else resolve_template(template, tokenizer)


def prompt_text(record, *, template: str | None) -> str:
    """The prompt of a record (a string, {prompt} or an Alpaca record) in `template` (a template
    text, as `template_text` gives; None: as it is)."""
    from chla_tools.inference import format_prompt

    if isinstance(record, str):
        return format_prompt(record, template=template) if template else record
    if "prompt" in record:
        return format_prompt(record["prompt"], template=template) if template else record["prompt"]
    if template is None:
        return record["instruction"]
    return format_prompt(record["instruction"], record.get("input") or "", template)


def longest_first(texts: list[str]) -> list[int]:
    """Indices of `texts`, longest first: batches of similar lengths waste little on padding
    (reviews run from ten characters to several hundred)."""
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]))


def generate_all(
    model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int, log: Log, label: str
) -> list[str]:
    """Greedy answers to `prompts`, in their order, generated in batches of similar length."""
    from chla_tools.inference import generate_batch

    if hasattr(model, "generate_texts"):  # chla_tools.vllm_backend: it batches by itself
        return model.generate_texts(prompts, max_new_tokens=max_new_tokens)
    order = longest_first(prompts)
    outputs: list[str] = [""] * len(prompts)
    last = time.monotonic()
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        for index, output in zip(
            batch, generate_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens=max_new_tokens)
        ):
            outputs[index] = output
        if time.monotonic() - last > 10:
            log(f"{label}: {first + len(batch)}/{len(prompts)} generated")
            last = time.monotonic()
    return outputs


# --- one shard ----------------------------------------------------------------------------------


def _shard_tag(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


# Seconds between the progress lines a shard writes to its log while it scores perplexity text.
PROGRESS_LOG_INTERVAL_S = 30.0


class ShardProgress:
    """Items of a shard done so far, over every source: a log line at most every
    PROGRESS_LOG_INTERVAL_S, and `progress(done, total=...)` (the stage's live progress, read by
    `chla status`) at every step."""

    def __init__(self, total: int, tag: str, log: Log, progress: Callable[..., None] | None) -> None:
        self.total, self.tag, self.log, self.progress = total, tag, log, progress
        self.done = 0
        self.started = self.logged = time.monotonic()

    def within(self, before: int, label: str) -> Callable[[int, int], None]:
        """The report of an input whose items follow the shard's first `before`: (its done, its total)."""
        return lambda done, _total: self.at(before + done, label)

    def at(self, done: int, label: str) -> None:
        self.done = done
        if self.progress is not None:
            self.progress(done, total=self.total)
        now = time.monotonic()
        if now - self.logged >= PROGRESS_LOG_INTERVAL_S:
            self.logged = now
            self.log(f"{label}: {done}/{self.total} items of {self.tag} done ({now - self.started:.0f} s)")


def evaluate_shard(
    params: EvaluateParams,
    out_dir,
    *,
    shard: int,
    num_shards: int,
    loaded=None,
    log: Log = print,
    progress: Callable[..., None] | None = None,
) -> dict:
    """Evaluate this shard's items of every source; write out_dir/partials/<shard>.json (+ JSONL).
    `progress(done, total=...)`: the shard's items done so far (chla_launcher.contract.progress)."""
    from chla_tools.inference import load_for_inference

    if not 0 <= shard < num_shards:
        raise ChlaError(f"shard {shard} is outside 0..{num_shards - 1}")
    # Fail fast, before the model. `max_items` keeps the first N lines/records of every input.
    sources = evaluation_sources(params)
    whole = {source.name: load_items(source)[: params.max_items] for source in sources}
    items = {source.name: sampled(whole[source.name], source, params) for source in sources}
    model, tokenizer = loaded or load_for_inference(params.model, params.adapters, log=log)
    template = template_text(params.template, tokenizer)
    block = params.block_size or int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048))
    if block < 2:
        raise ChlaError(f"block_size {block} is too small; it must be at least 2")
    partials = Path(out_dir) / PARTIALS
    tag = _shard_tag(shard, num_shards)
    summary: dict[str, Any] = {
        "shard": shard,
        "num_shards": num_shards,
        "model": str(params.model),
        "adapters": [str(a) for a in params.adapters],
        "block_size": block,
        "sources": {},
    }

    mine_of = {source.name: shard_of(items[source.name], shard, num_shards) for source in sources}
    done = ShardProgress(sum(map(len, mine_of.values())), tag, log, progress)
    done.at(0, "evaluation")
    for source in sources:
        mine = mine_of[source.name]
        before = done.done
        log(f"{source.name}: {len(mine)} of {len(items[source.name])} items in {tag}")
        entry = {"kind": source.kind, "path": str(source.path), "items": len(mine)}
        if len(items[source.name]) < len(whole[source.name]):
            entry["sampled_from"] = len(whole[source.name])
        if source.kind == "ppl":
            entry.update(
                perplexity_sums(
                    model,
                    tokenizer,
                    [line for _, line in mine],
                    block=block,
                    batch_size=params.batch_size,
                    report=done.within(before, source.name),
                )
            )
        elif source.kind == "task":
            rows, fields = score_task_shard(
                model,
                tokenizer,
                task_of(items[source.name], source.path),
                mine,
                template=template,
                batch_size=params.batch_size,
                max_new_tokens=params.max_new_tokens,
                log=log,
                label=source.name,
            )
            entry.update(fields)
        else:
            prompts = [prompt_text(record, template=template) for _, record in mine]
            outputs = generate_all(
                model,
                tokenizer,
                prompts,
                batch_size=params.batch_size,
                max_new_tokens=params.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                log=log,
                label=source.name,
            )
            rows = [
                {"index": index, "generation": output, "prompt": record.get("prompt", record.get("instruction"))}
                for (index, record), output in zip(mine, outputs)
            ]
        if source.kind != "ppl":
            write_text(
                partials / f"{source.name}.{tag}.jsonl",
                "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
            )
        summary["sources"][source.name] = entry
        done.at(before + len(mine), source.name)
    # written last: its presence means the shard is complete
    write_json(partials / f"{tag}.json", summary)
    return summary


def _add(total: dict[str, float], counts: Mapping[str, float]) -> None:
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value


def score_task_shard(
    model,
    tokenizer,
    task: Task,
    mine: list[tuple[int, dict]],
    *,
    template: str | None,
    batch_size: int,
    max_new_tokens: int | None,
    log: Log,
    label: str,
) -> tuple[list[dict], dict]:
    """Generate this shard's answers, rank the choices of a classification task, and score the
    model and the task's baselines and references: (rows for the predictions file, the shard's
    summed counts per system)."""
    prompts = [prompt_text(record, template=template) for _, record in mine]
    outputs = generate_all(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens or task.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        log=log,
        label=label,
    )
    answers = {"model": outputs}
    if task.choices:
        scores = choice_logliks(model, tokenizer, prompts, list(task.choices), batch_size=batch_size)
        answers["model_loglik"] = [task.choices[row.index(max(row))] for row in scores]
    counts: dict[str, dict[str, float]] = {}
    rows = []
    for position, (index, record) in enumerate(mine):
        item = {system: task.score(record, texts[position]) for system, texts in answers.items()}
        item.update({system: task.score(record, answer) for system, answer in task.comparison_answers(record).items()})
        for system, item_counts in item.items():
            _add(counts.setdefault(system, {}), item_counts)
        row = {
            "index": index,
            "generation": outputs[position],
            "answer": record["output"],
            task.metric: task.metrics(item["model"])[task.metric],
            # the item's counts, for the intervals (chla_tools.intervals)
            "counts": {system: dict(item[system]) for system in answers},
        }
        if task.choices:
            row["ranked"] = answers["model_loglik"][position]
        rows.append(row)
    fields: dict = {"task": task.name, "counts": counts}
    if isinstance(task, ExactMatch):
        fields["labels"] = dict(Counter(normalise(record["output"]) for _, record in mine))
    return rows, fields


def task_results(task: Task, counts: dict[str, dict[str, float]], labels: Counter) -> dict:
    """The figures of every system for one task file, from its counts summed over all shards."""
    systems = {"model": {"role": "model", "label": "greedy generation", **task.metrics(counts["model"])}}
    if "model_loglik" in counts:
        systems["model_loglik"] = {
            "role": "model",
            "label": "log-likelihood ranking of the choices",
            **task.metrics(counts["model_loglik"]),
        }
    for system, (role, label) in task.comparisons.items():
        systems[system] = {"role": role, "label": label, **task.metrics(counts[system])}
    result = {
        "task": task.name,
        "metric": task.metric,
        "metric_label": task.metric_label,
        "score": systems["model"][task.metric],
        "systems": systems,
    }
    if isinstance(task, ExactMatch):
        items = counts["model"]["items"]
        majority_label, majority_count = max(labels.items(), key=lambda kv: (kv[1], kv[0]))
        systems["majority"] = {
            "role": "baseline",
            "label": f"majority output ({majority_label})",
            "accuracy": majority_count / items,
        }
        result.update(
            {
                "correct": counts["model"]["correct"],
                "accuracy": systems["model"]["accuracy"],
                "majority_label": majority_label,
                "majority_baseline": majority_count / items,
            }
        )
    return result


# --- aggregation --------------------------------------------------------------------------------


def _task_score(task: Task, counts: Mapping[str, float]) -> float:
    return task.metrics(counts)[task.metric]


def aggregate(out_dir, num_shards: int, log: Log = print) -> dict:
    """Sum every shard's partial results, then divide; write results.json, results.md and
    generations/<source>.jsonl (all shards, in input order)."""
    out_dir = Path(out_dir)
    partials = out_dir / PARTIALS
    shards = []
    for shard in range(num_shards):
        path = partials / f"{_shard_tag(shard, num_shards)}.json"
        if not path.is_file():
            raise ChlaError(f"evaluation shard {shard} of {num_shards} has no results ({path}); rerun that task")
        shards.append(json.loads(path.read_text(encoding="utf-8")))
    first = shards[0]
    results = {
        "model": first["model"],
        "adapters": first["adapters"],
        "num_shards": num_shards,
        "block_size": first["block_size"],
        "perplexity": {},
        "tasks": {},
        "prompts": {},
    }
    for name, entry in first["sources"].items():
        parts = [s["sources"][name] for s in shards]
        if entry["kind"] == "ppl":
            nll = math.fsum(p["nll"] for p in parts)
            tokens, chars = sum(p["tokens"] for p in parts), sum(p["characters"] for p in parts)
            results["perplexity"][name] = {
                "path": entry["path"],
                "lines": sum(p["lines"] for p in parts),
                "tokens": tokens,
                "characters": chars,
                "nll_sum": nll,
                "tokens_per_char": tokens / chars,
                "ppl_per_token": math.exp(nll / tokens),
                "ppl_per_char": math.exp(nll / chars),
                "bits_per_char": nll / chars / math.log(2),
            }
            continue
        rows = []
        for shard in range(num_shards):
            path = partials / f"{name}.{_shard_tag(shard, num_shards)}.jsonl"
            rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        rows.sort(key=lambda row: row["index"])
        write_text(
            out_dir / GENERATIONS / f"{name}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        )
        items = sum(p["items"] for p in parts)
        if entry["kind"] == "task":
            counts: dict[str, dict[str, float]] = {}
            labels: Counter = Counter()
            for p in parts:
                for system, system_counts in p["counts"].items():
                    _add(counts.setdefault(system, {}), system_counts)
                labels.update(p.get("labels", {}))
            task = task_named(entry["task"])
            results["tasks"][name] = {
                "path": entry["path"],
                "items": items,
                **({"sampled_from": entry["sampled_from"]} if "sampled_from" in entry else {}),
                **task_results(task, counts, labels),
                "counts": counts,
                "predictions": f"{GENERATIONS}/{name}.jsonl",
            }
            score = partial(_task_score, task)
            for system, figures in results["tasks"][name]["systems"].items():
                if system in rows[0].get("counts", {}):
                    figures["interval_95"] = bootstrap_interval([row["counts"][system] for row in rows], score)
        else:
            results["prompts"][name] = {
                "path": entry["path"],
                "items": items,
                "generations": f"{GENERATIONS}/{name}.jsonl",
            }
    if (out_dir / "lm_eval.json").is_file():  # written by task 0 (chla_tools.lm_eval_backend)
        lm_eval = json.loads((out_dir / "lm_eval.json").read_text(encoding="utf-8"))
        results["lm_eval"] = {
            key: lm_eval[key] for key in ("version", "num_fewshot", "limit", "pair_tokenization", "tasks")
        }
    write_json(out_dir / "results.json", results)
    write_text(out_dir / "results.md", results_markdown(results))
    log(f"evaluation results: {out_dir / 'results.json'}")
    return results


def results_markdown(results: dict) -> str:
    lines = [f"# Evaluation of {results['model']}", ""]
    if results["adapters"]:
        lines += ["Adapters: " + ", ".join(f"`{a}`" for a in results["adapters"]), ""]
    if results["perplexity"]:
        lines += [
            f"## Perplexity (windows of {results['block_size']} tokens)",
            "",
            "| text | lines | tokens | characters | tokens/char | ppl per token | ppl per char | bits/char |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in results["perplexity"].items():
            lines.append(
                f"| {name} | {r['lines']} | {r['tokens']} | {r['characters']} | {r['tokens_per_char']:.3f} "
                f"| {r['ppl_per_token']:.3f} | {r['ppl_per_char']:.3f} | {r['bits_per_char']:.3f} |"
            )
        lines.append("")
    if results["tasks"]:
        lines += [
            "## Tasks (answers generated greedily; baselines and references scored the same way)",
            "",
            "| input | items | metric | system | role | score [95% interval] |",
            "|---|---:|---|---|---|---:|",
        ]
        for name, r in results["tasks"].items():
            for system in r["systems"].values():
                interval = system.get("interval_95")
                lines.append(
                    f"| {name} | {r['items']} | {r['metric_label']} | {system['label']} | "
                    f"{system['role']} | {system[r['metric']]:.4f}"
                    + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
                    + " |"
                )
        lines.append("")
    if results.get("lm_eval"):
        lines += [
            f"## lm-evaluation-harness {results['lm_eval']['version']}",
            "",
            "| task | samples | metric | value |",
            "|---|---:|---|---:|",
        ]
        for name, r in results["lm_eval"]["tasks"].items():
            lines += [
                f"| {name} | {r.get('samples')} | {metric} | {value:.4f} |"
                for metric, value in r.items()
                if metric != "samples" and isinstance(value, float)
            ]
        lines.append("")
    if results["prompts"]:
        lines += ["## Generations", ""]
        lines += [f"- {name}: {r['items']} prompts -> `{r['generations']}`" for name, r in results["prompts"].items()]
        lines.append("")
    return "\n".join(lines)


# --- the CLI's evaluation (the stage's runner: chla_train.stages.evaluate) ------------------------


def evaluate(params: EvaluateParams, out_dir, *, shards: int = 1, log: Log = print) -> dict:
    """`chla eval`: every shard in this process (the model loaded once), then aggregation; the
    output directory appears complete or not at all."""
    from chla_tools.inference import load_for_inference

    for source in evaluation_sources(params):
        load_items(source)
    if shards < 1:
        raise ChlaError(f"--shards {shards}: must be at least 1")
    loaded = load_for_inference(params.model, params.adapters, log=log)
    with new_directory(out_dir) as tmp:
        for shard in range(shards):
            evaluate_shard(params, tmp, shard=shard, num_shards=shards, loaded=loaded, log=log)
        results = aggregate(tmp, shards, log=lambda _m: None)
    log(f"evaluation results: {Path(out_dir) / 'results.json'}")
    return results
