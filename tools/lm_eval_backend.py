"""EleutherAI's lm-evaluation-harness as a backend of the `evaluate` stage (`params.lm_eval`).

lm-eval scores the stage's model, loaded as chla loads it for evaluation (merged, or the base with
its adapters), through lm-eval's own HF backend (`HFLM` wrapping that model and its tokenizer),
on three kinds of task:

- tasks of lm-eval's registry by name (ceval-valid, cmmlu, mmlu, ...);
- task YAMLs in `include_path` directories (lm-eval's own format, e.g. a private benchmark);
- Alpaca-format labelled files (`alpaca_tasks`): each becomes a multiple-choice task named
  `chla_<file stem>` over a JSON Lines copy of the file: the prompt is the Alpaca template that
  SFT trains with, the choices are the file's distinct outputs, and lm-eval picks the choice
  whose tokens have the highest log-likelihood after the prompt (its `acc`).

How a (context, answer) pair becomes tokens (`pair_tokenization`): lm-eval's own way ("joint")
encodes context + answer as one string and takes the tokens past the context's, after moving the
context's trailing spaces into the answer; that is what published lm-eval scores use, and how
chla's SFT encodes its examples (chla_tools.sft_data.encode_pairs). "separate" encodes each part on
its own, as the original project's SFT did (and as lm-eval already does for seq2seq models), for a
model tuned that way: SentencePiece's dummy prefix makes that boundary differ (the Alpaca prompt
ends in "▁" and the answer starts with its own "▁", where the joint string has a single "▁正"),
and a model tuned on one form, scored on the other, is scored on a sequence it never saw.

Nothing is fetched at run time: HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set while lm-eval runs,
so a registry task's data must already be in the HF datasets cache of the nodes (load the task
once where there is network, with HF_HOME on storage the nodes share).

Writes <out>/lm_eval.json (per task: the metrics, sample count, lm-eval's task config and
version) and <out>/lm_eval_samples/<task>.jsonl (per item: the choices' log-likelihoods and
whether the pick was right), atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chla_launcher.contract.atomic import write_json, write_text
from chla_launcher.contract.errors import ChlaError

Log = Callable[[str], None]
SAMPLES = "lm_eval_samples"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def alpaca_task_name(path: str | os.PathLike[str]) -> str:
    return "chla_" + (re.sub(r"[^A-Za-z0-9_]+", "_", Path(path).stem) or "task")


def write_alpaca_task(path: str | os.PathLike[str], task_dir: Path, *, template: str | None = None) -> str:
    """Turn an Alpaca-format labelled file into an lm-eval multiple-choice task in `task_dir`
    (<name>.yaml + <name>.jsonl); return the task's name. `template`: a template text
    (chla_tools.evaluate.template_text), or None for the instruction as it is."""
    import yaml

    from chla_tools.inference import read_json_or_jsonl
    from chla_tools.sft_data import format_prompt

    path = Path(path)
    name = alpaca_task_name(path)
    records = read_json_or_jsonl(path) if path.is_file() else None
    if not isinstance(records, list) or not records:
        raise ChlaError(
            f"lm_eval.alpaca_tasks: {path} has no records; expected a JSON list or JSON Lines "
            "of {instruction, input, output}"
        )
    for number, record in enumerate(records, 1):
        if not (
            isinstance(record, dict)
            and isinstance(record.get("instruction"), str)
            and isinstance(record.get("output"), str)
        ):
            raise ChlaError(f"lm_eval.alpaca_tasks: {path}: record {number} needs string instruction and output")
    choices = sorted({record["output"] for record in records})
    if len(choices) < 2:
        raise ChlaError(
            f"lm_eval.alpaca_tasks: {path}: every record has the output {choices[0]!r}; a "
            "multiple-choice task needs at least two distinct outputs"
        )
    if len(choices) > 50:
        raise ChlaError(
            f"lm_eval.alpaca_tasks: {path}: {len(choices)} distinct outputs; only labelled "
            "files with a few classes make a multiple-choice task"
        )
    docs = []
    for record in records:
        instruction, extra = record["instruction"], record.get("input") or ""
        if template:
            prompt = format_prompt(instruction, extra, template)
        else:
            prompt = "\n".join(filter(None, [instruction, extra]))
        docs.append({"prompt": prompt, "choices": choices, "label": choices.index(record["output"])})
    data = task_dir / f"{name}.jsonl"
    write_text(data, "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "fewshot_split": "test",  # lm-eval leaves the item itself out of its few-shot examples
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        # The prompt ends where the answer starts ("### Response: "; its trailing space moves into
        # the answer under the joint pair tokenization, as in SFT).
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": str(path)},
    }
    write_text(task_dir / f"{name}.yaml", yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    return name


def _separate_pairs(hflm_class):
    """lm-eval's HF backend, with the context and the continuation of a log-likelihood request
    encoded each on its own (the context with BOS, as SFT's prompt; the continuation without)."""

    class SeparatePairsHFLM(hflm_class):
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            return self.tok_encode(context), self.tok_encode(continuation, add_special_tokens=False)

    return SeparatePairsHFLM


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_lm_eval(
    model,
    tokenizer,
    spec,
    out_dir: str | os.PathLike[str],
    work_dir: Path,
    *,
    batch_size: int,
    template: str = "alpaca",
    log: Log = print,
) -> dict[str, Any]:
    """Run lm-eval on an already loaded model; `spec` is the stage's LmEvalParams."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ChlaError("evaluate.params.lm_eval needs lm-evaluation-harness: pip install 'chla[lm-eval]'") from None

    out_dir = Path(out_dir)
    task_dir = Path(work_dir) / "lm_eval_tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    from chla_tools.evaluate import template_text

    text = template_text(template, tokenizer)
    generated = [write_alpaca_task(path, task_dir, template=text) for path in spec.alpaca_tasks]
    tasks = list(dict.fromkeys([*spec.tasks, *generated]))
    include = [str(task_dir), *spec.include_path]
    with _offline():
        # lm-eval's own task index takes ~10 s to build; local tasks alone do without it.
        manager = TaskManager(include_path=include, include_defaults=False)
        if any(not manager.match_tasks([task]) for task in tasks):
            manager = TaskManager(include_path=include)
        unknown = [task for task in tasks if not manager.match_tasks([task])]
        if unknown:
            raise ChlaError(
                f"lm_eval.tasks: no lm-eval task named {unknown[0]!r} (neither in lm-eval's "
                f"registry nor in {', '.join(include)}); `lm_eval ls tasks` lists them"
            )
        log(
            f"lm-eval {lm_eval.__version__}: {', '.join(tasks)} (num_fewshot {spec.num_fewshot}, "
            f"limit {spec.limit}, {spec.pair_tokenization} pair tokenization)"
        )
        backend = HFLM if spec.pair_tokenization == "joint" else _separate_pairs(HFLM)
        lm = backend(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            add_bos_token=True,
            max_length=int(getattr(model.config, "max_position_embeddings", 2048)),
        )
        try:
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=spec.num_fewshot,
                limit=spec.limit,
                task_manager=manager,
                log_samples=True,
                bootstrap_iters=1000,
                random_seed=spec.seed,
                numpy_random_seed=spec.seed,
                torch_random_seed=spec.seed,
                fewshot_random_seed=spec.seed,
            )
        except Exception as error:  # a registry task whose data is not in the cache, most often
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ChlaError(
                f"lm-eval failed on {', '.join(tasks)}: {type(error).__name__}: {first}; a "
                "registry task's dataset must be in the HF datasets cache (nothing is "
                "downloaded at run time)"
            ) from None

    summary = {
        "version": lm_eval.__version__,
        "num_fewshot": spec.num_fewshot,
        "limit": spec.limit,
        "pair_tokenization": spec.pair_tokenization,
        "tasks": {},
    }
    for task, metrics in output["results"].items():
        entry = {"samples": output.get("n-samples", {}).get(task, {}).get("effective")}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if isinstance(value, (int, float)) and filter_name == "none":
                entry[metric] = value
        summary["tasks"][task] = entry
        log(f"lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if isinstance(v, float)))
    for task, rows in (output.get("samples") or {}).items():
        lines = [
            json.dumps(
                {
                    "doc_id": row["doc_id"],
                    "target": row["target"],
                    "loglikelihoods": [r[0] for r in row["filtered_resps"]],
                    **{m: row[m] for m in ("acc", "acc_norm") if m in row},
                },
                ensure_ascii=False,
                default=str,
            )
            for row in rows
        ]
        write_text(out_dir / SAMPLES / f"{task}.jsonl", "".join(line + "\n" for line in lines))
    write_json(
        out_dir / "lm_eval.json",
        {**summary, "configs": output.get("configs", {}), "versions": output.get("versions", {})},
    )
    return summary
