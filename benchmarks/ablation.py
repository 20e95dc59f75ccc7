"""chla's defaults against the original project's settings, on the demo, at equal compute.

Runs `recipes/demo.yaml` (or `--recipe`, e.g. recipes/demo_scratch.yaml) twice with the local
executor: as shipped (chla's defaults), and with
the original Chinese-LLaMA-Alpaca settings put back by `--set` (ORIGINAL below). Same data,
same steps, same batches, same seed: only the settings differ. A run directory that already
holds a finished chain is reused as it is (chla skips finished stages), so a demo run can be the
first arm. Then prints one table (markdown, also written to <out>/ablation.md) and draws one plot
(<out>/ablation.png).

    .venv/bin/python benchmarks/ablation.py --out runs/ablation      # ~2 demo runs
    .venv/bin/python benchmarks/ablation.py --chla runs/demo         # a finished demo is the chla arm

What the original did, and what chla does instead (the --set lines):
- new vocabulary rows: random N(0, 0.02) (resize_token_embeddings in the transformers it used);
  chla: subtoken_mean;
- pretraining stage 2 on Chinese only; chla: English replayed by weight;
- embed_tokens and lm_head trained whole in SFT, at the LoRA learning rate, saved whole in the
  adapter; chla: only the new rows, at a learning rate of their own (stage 2 trains them whole in
  both arms: it is where the rows the base vocabulary had for Chinese adapt);
- SFT on the instructions alone; chla: pretraining text replayed in the batches;
- Adam's epsilon 1e-8 for every parameter; chla's demo: 1e-3 for the embedding rows, so that the
  new rows no batch uses are not pushed down by a full step each step;
- SFT's loss the mean over every answer token of the batch (transformers' default), so long answers
  outweigh short ones; chla's demo: the mean over examples of each example's token mean.
Both arms encode an example's prompt and answer as one text (the answer is the tokens after the
prompt's), chla's only encoding.
The learning rates are the demo's in both arms (the original's 2e-4 / 1e-4 were
set for 7B models and tens of thousands of steps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from machine import print_machine

REPO = Path(__file__).resolve().parent.parent
ORIGINAL = [
    "stages.pt_embeddings.params.new_row_init=random",
    "stages.pt_lora.params.corpus=${stages.zh_tokens.out}",
    "stages.pt_lora.params.vocab_rows=all",
    "stages.pt_lora.params.embedding_learning_rate=null",
    "stages.sft.params.vocab_rows=all",
    "stages.sft.params.embedding_learning_rate=null",
    "stages.sft.params.replay_corpus=null",
    "stages.sft.params.loss_mean=token",
    "stages.pt_embeddings.params.embedding_adam_epsilon=null",
    "stages.pt_lora.params.embedding_adam_epsilon=null",
    "stages.sft.params.embedding_adam_epsilon=null",
]
ARMS = {"chla": [], "original": ORIGINAL}


def run_arm(out: Path, arm: str, recipe: Path) -> Path:
    run_dir = out / arm
    argv = [str(REPO / ".venv" / "bin" / "chla-submit"), str(recipe), "--run-dir", str(run_dir)]
    for setting in ARMS[arm]:
        argv += ["--set", setting]
    print(f"$ {' '.join(argv)}", flush=True)
    subprocess.run(argv, check=True, cwd=REPO)
    return run_dir


def figures(run_dir: Path) -> dict:
    """Every figure the table shows, from a finished run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    stage1 = json.loads((run_dir / "pt_embeddings" / "out" / "train_summary.json").read_text())
    adapter = run_dir / "sft" / "out" / "adapter" / "adapter_model.safetensors"
    row = {
        "stage-1 valid loss, step 0 (nats/token)": stage1["first_eval_loss"],
        "stage-1 valid loss, end": stage1["eval_loss"],
        "zh ppl/char base": summary["zh_ppl_per_char"]["base"],
        "zh ppl/char after pretraining": summary["zh_ppl_per_char"]["after_pt"],
        "zh ppl/char after SFT": summary["zh_ppl_per_char"]["after_sft"],
        "zh after SFT / after pretraining (target <= 1.2)": (
            summary["zh_ppl_per_char"]["after_sft"] / summary["zh_ppl_per_char"]["after_pt"]
        ),
        "en ppl/char base": summary["en_ppl_per_char"]["base"],
        "en ppl/char after SFT": summary["en_ppl_per_char"]["after_sft"],
        "en at the end / base (target <= 1.5)": (
            summary["en_ppl_per_char"]["after_sft"] / summary["en_ppl_per_char"]["base"]
        ),
    }
    for name, task in (summary.get("tasks") or {}).items():
        row[f"{name}: {task['metric_label']}"] = task["score"]
    if not summary.get("tasks") and "sft_accuracy" in summary:
        row["sentiment: accuracy"] = summary["sft_accuracy"]
    row["SFT adapter (MB)"] = adapter.stat().st_size / 1e6
    row["training seconds (all stages)"] = sum(
        seconds
        for stage, seconds in summary.get("stage_seconds", {}).items()
        if stage in ("base_model", "pt_embeddings", "pt_lora", "sft")
    )
    return row


def table(rows: dict[str, dict]) -> str:
    arms = list(rows)
    lines = ["| figure | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for key in rows[arms[0]]:
        cells = []
        for arm in arms:
            value = rows[arm].get(key)
            cells.append("-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value)))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, ppl, tasks) = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {"chla": "tab:blue", "original": "tab:red"}
    for arm, run_dir in runs.items():
        offset = 0
        for stage in ("pt_embeddings", "pt_lora"):
            records = [
                json.loads(line)
                for line in (run_dir / stage / "out" / "metrics.jsonl").read_text().splitlines()
                if line.strip()
            ]
            evals = [(r["step"] + offset, r["eval_loss"]) for r in records if "eval_loss" in r]
            curves.plot(*zip(*evals), marker="o", color=colours[arm], label=arm if stage == "pt_lora" else None)
            offset = max(step for step, _ in evals)
    curves.set(title="validation loss, stage 1 then stage 2", xlabel="step", ylabel="nats/token")
    curves.legend()
    points = ["base", "after_pt", "after_sft"]
    for arm, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        for language, style in (("zh", "-"), ("en", "--")):
            ppl.plot(
                points,
                [summary[f"{language}_ppl_per_char"][p] for p in points],
                style,
                marker="o",
                color=colours[arm],
                label=f"{arm} {language}",
            )
    ppl.set(title="perplexity per character", yscale="log")
    ppl.legend(fontsize=8)
    scores = [key for key in rows["chla"] if ":" in key]
    width = 0.38
    for index, arm in enumerate(rows):
        tasks.bar(
            [i + (index - 0.5) * width for i in range(len(scores))],
            [rows[arm][k] for k in scores],
            width,
            color=colours[arm],
            label=arm,
        )
    # "task-sentiment_test: accuracy" -> "sentiment\naccuracy": the full names overlap
    names = [k.removeprefix("task-").replace("_test: ", "\n").replace(": ", "\n") for k in scores]
    tasks.set_xticks(range(len(scores)), names, fontsize=8)
    tasks.set(title="held-out task scores", ylim=(0, 1))
    tasks.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "ablation"), help="directory for both run dirs")
    parser.add_argument(
        "--recipe",
        default=str(REPO / "recipes" / "demo.yaml"),
        help="the demo-like recipe both arms run (the figures in the docs: recipes/demo_scratch.yaml)",
    )
    parser.add_argument(
        "--chla",
        help="a finished run of the recipe as shipped, taken as the chla arm "
        "(its run directory is used as it is, nothing is resubmitted)",
    )
    args = parser.parse_args()
    print_machine()
    out = Path(args.out).resolve()
    recipe = Path(args.recipe)
    runs = {
        arm: Path(args.chla).resolve() if arm == "chla" and args.chla else run_arm(out, arm, recipe) for arm in ARMS
    }
    rows = {arm: figures(run_dir) for arm, run_dir in runs.items()}
    text = table(rows)
    (out / "ablation.md").write_text(text + "\n", encoding="utf-8")
    plot(rows, runs, out / "ablation.png")
    print(text)
    print(f"plot: {out / 'ablation.png'}")
    chla, original = rows["chla"], rows["original"]
    print(
        "RESULT "
        + " ".join(
            f"{key.split(' (')[0].replace(' ', '_')}={chla[key]:.4g}/{original[key]:.4g}"
            for key in chla
            if "target" in key
        )
    )


if __name__ == "__main__":
    sys.exit(main())
