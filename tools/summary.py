"""A chain's headline figures, read from its stages' outputs, and their Markdown (the `summarize`
stage, chla_train.stages.summarize; the kind's docstring in chla_launcher.contract.kinds.summarize says what
is read from where)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.summarize import SummarizeParams


def _load(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChlaError(f"summarize: {what} not found: {path}") from None


def _vocab_figures(report_path: Path, params: SummarizeParams) -> dict[str, Any]:
    report = _load(report_path, "vocab report")
    by = {(r["tokenizer"], r["corpus"]): r for r in report["results"]}
    base = by.get((params.base_tokenizer, params.zh_corpus))
    merged = by.get((params.merged_tokenizer, params.zh_corpus))
    if not base or not merged:
        raise ChlaError(
            f"summarize: {report_path} has no {params.zh_corpus!r} rows for tokenizers "
            f"{params.base_tokenizer!r} and {params.merged_tokenizer!r}"
        )
    return {
        "tokens_per_char_base": base["tokens_per_char"],
        "tokens_per_char_merged": merged["tokens_per_char"],
        "tokens_per_char_reduction": 1 - merged["tokens_per_char"] / base["tokens_per_char"],
        "byte_fallback_rate_base": base["byte_fallback_rate"],
        "byte_fallback_rate_merged": merged["byte_fallback_rate"],
        "vocab_size": {name: t["vocab_size"] for name, t in report["tokenizers"].items()},
    }


def chain_figures(params: SummarizeParams) -> dict[str, Any]:
    """The figures of the stages `params` names: tokens per character, perplexity per character at
    each point, the task table (with the headline accuracy) and the prompts' answers."""
    summary: dict[str, Any] = {"plots": {}}
    if params.vocab_report:
        report = Path(params.vocab_report)
        summary.update(_vocab_figures(report, params))
        if (report.parent / "report.png").exists():
            summary["plots"]["vocab"] = str(report.parent / "report.png")

    zh, en, results = {}, {}, {}
    for point, directory in params.evaluations.items():
        results[point] = _load(Path(directory) / "results.json", f"evaluation {point!r}")
        ppl = results[point].get("perplexity", {})
        if params.zh_ppl in ppl:
            zh[point] = ppl[params.zh_ppl]["ppl_per_char"]
        if params.en_ppl in ppl:
            en[point] = ppl[params.en_ppl]["ppl_per_char"]
    if params.evaluations:
        summary["zh_ppl_per_char"] = zh
        summary["en_ppl_per_char"] = en
    if params.task_results:
        results["task"] = _load(Path(params.task_results) / "results.json", "task evaluation")
        evaluated = results["task"].get("tasks", {})
        if params.task:
            task = evaluated.get(params.task)
            if not task:
                raise ChlaError(f"summarize: {params.task_results}/results.json has no task {params.task!r}")
            summary["sft_accuracy"] = task["accuracy"]
            summary["majority_baseline"] = task["majority_baseline"]
            summary["task_items"] = task["items"]
            summary["predictions"] = str(Path(params.task_results) / task["predictions"])
        summary["tasks"] = {name: _task_row(task, Path(params.task_results)) for name, task in evaluated.items()}
        if results["task"].get("lm_eval"):  # lm-evaluation-harness on the same model (evaluate.lm_eval)
            summary["lm_eval"] = {
                name: {k: v for k, v in r.items() if k in ("acc", "acc_norm", "samples")}
                for name, r in results["task"]["lm_eval"]["tasks"].items()
            }
    if results:
        sources = {**params.evaluations, **({"task": params.task_results} if params.task_results else {})}
        generations = {
            point: str(Path(sources[point]) / r["prompts"][name]["generations"])
            for point, r in results.items()
            for name in r.get("prompts", {})
        }
        if generations:
            summary["generations"] = generations
            summary["prompt_generations"] = {
                point: [
                    {"prompt": row["prompt"], "generation": (text := row["generation"]), "cjk_share": cjk_share(text)}
                    for row in _read_jsonl(Path(path))
                ]
                for point, path in generations.items()
            }
    return summary


def _task_row(task: dict[str, Any], directory: Path) -> dict[str, Any]:
    """One task's line of the summary: the model's headline figure and every other system's."""
    metric = task["metric"]
    return {
        "task": task["task"],
        "items": task["items"],
        "metric": metric,
        "metric_label": task["metric_label"],
        "score": task["score"],
        **({"sampled_from": task["sampled_from"]} if "sampled_from" in task else {}),
        "systems": {
            name: {
                "role": s["role"],
                "label": s["label"],
                metric: s[metric],
                **({"interval_95": s["interval_95"]} if "interval_95" in s else {}),
            }
            for name, s in task["systems"].items()
        },
        "predictions": str(directory / task["predictions"]),
    }


def cjk_share(text: str) -> float:
    """The share of CJK ideographs among an answer's letters and ideographs (punctuation, digits
    and spaces left out): how much of it is written in Chinese."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf") / len(letters)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stage_seconds(run_dir: Path, this_stage: str) -> dict[str, float]:
    seconds = {}
    for state_file in sorted(run_dir.glob("*/state.json")):
        stage = state_file.parent.name
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if stage != this_stage and state.get("elapsed_s") is not None:
            seconds[stage] = state["elapsed_s"]
    return seconds


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|") or " "


def _scores_of(task: dict[str, Any], role: str) -> str:
    """The figures of a task's systems in one role, as one table cell."""
    metric = task["metric"]
    systems = [s for s in task["systems"].values() if s["role"] == role]
    if role == "model":
        return "; ".join(f"{s[metric]:.3f}{_interval(s)} ({s['label']})" for s in systems)
    return "; ".join(f"{s['label']} {s[metric]:.3f}" for s in systems) or "-"


def _interval(system: dict[str, Any]) -> str:
    interval = system.get("interval_95")
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def _tasks_table(tasks: dict[str, Any]) -> list[str]:
    lines = [
        "| task (held-out items scored) | metric | model [95% interval] | baselines | references |",
        "|---|---|---|---|---|",
    ]
    for name, task in tasks.items():
        items = f"{task['items']} of {task['sampled_from']}" if "sampled_from" in task else str(task["items"])
        lines.append(
            f"| {name} ({items}) | {task['metric_label']} | {_scores_of(task, 'model')} | "
            f"{_scores_of(task, 'baseline')} | {_scores_of(task, 'reference')} |"
        )
    return lines + [""]


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# {summary['run']}: summary", ""]
    if "tokens_per_char_base" in summary:
        lines += [
            "| tokenizer | tokens/char (held-out Chinese) |",
            "|---|---:|",
            f"| base | {summary['tokens_per_char_base']:.3f} |",
            f"| merged | {summary['tokens_per_char_merged']:.3f} "
            f"({-100 * summary['tokens_per_char_reduction']:+.1f}%) |",
            "",
        ]
    if summary.get("zh_ppl_per_char") or summary.get("en_ppl_per_char"):
        points = list(dict.fromkeys([*summary.get("zh_ppl_per_char", {}), *summary.get("en_ppl_per_char", {})]))
        lines += ["| perplexity per character | " + " | ".join(points) + " |", "|---|" + "---:|" * len(points)]
        for label, key in (("Chinese (held out)", "zh_ppl_per_char"), ("English (held out)", "en_ppl_per_char")):
            values = summary.get(key, {})
            lines.append(f"| {label} | " + " | ".join(_fmt(values.get(p, "")) for p in points) + " |")
        lines.append("")
    if summary.get("tasks"):
        lines += _tasks_table(summary["tasks"])
    for point, rows in summary.get("prompt_generations", {}).items():
        lines += [f"| prompt | the {point} model's answer | CJK share |", "|---|---|---:|"]
        lines += [
            f"| {_cell(row['prompt'])} | {_cell(row['generation'])} | {row.get('cjk_share', 0.0):.2f} |" for row in rows
        ]
        lines.append("")
    for name, r in summary.get("lm_eval", {}).items():
        lines += [f"lm-evaluation-harness {name}: acc {r['acc']:.3f} on {r['samples']} items", ""]
    for name, path in summary.get("plots", {}).items():
        lines.append(f"- plot {name}: {path}")
    return "\n".join(lines) + "\n"
