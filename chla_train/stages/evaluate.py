"""`evaluate` stage: perplexity, labelled tasks beside their baselines, prompt generations, and
optionally lm-evaluation-harness, as an array over shards (the methods: chla_tools.evaluate).

Each task loads the model (or vLLM's engine), task 0 runs lm-evaluation-harness when asked,
then every task evaluates its shard of the items into out/partials/; `finalize` adds the shards
up into out/results.json and out/results.md once every task succeeded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chla_launcher.contract.kinds.evaluate import EvaluateParams
from chla_launcher.contract.progress import progress_writer
from chla_tools.evaluate import aggregate, evaluate_shard
from chla_train.context import StageContext


def run(ctx: StageContext[EvaluateParams]) -> dict:
    """This task's shard (all items when the stage is not an array)."""
    params = ctx.params
    num_shards = max(ctx.num_tasks, 1)
    shard = max(ctx.task_index, 0)

    # 1. The model: vLLM's engine for generation, or transformers' (loaded by evaluate_shard
    #    itself unless lm-evaluation-harness needs it first).
    loaded: tuple[Any, Any] | None = None
    if params.backend == "vllm":
        from chla_tools.inference import find_tokenizer_dir, load_tokenizer
        from chla_tools.vllm_backend import VllmGenerator

        tokenizer = load_tokenizer(find_tokenizer_dir(Path(params.model), []))
        loaded = (VllmGenerator.load(params.model, params.adapters, params.vllm, tokenizer), tokenizer)

    # 2. lm-evaluation-harness, once per stage (task 0).
    if params.lm_eval is not None and shard == 0:
        from chla_tools.inference import load_for_inference
        from chla_tools.lm_eval_backend import run_lm_eval

        loaded = load_for_inference(params.model, params.adapters, log=ctx.log)
        model, tokenizer = loaded
        run_lm_eval(
            model,
            tokenizer,
            params.lm_eval,
            ctx.out_dir,
            ctx.work_dir,
            batch_size=params.batch_size,
            template=params.template,
            log=ctx.log,
        )

    # 3. This shard's items (their count so far feeds `chla status`); finalize aggregates, after
    #    one task or many.
    progress = progress_writer(ctx, total=0, unit="items")
    evaluate_shard(
        params,
        ctx.out_dir,
        shard=shard,
        num_shards=num_shards,
        loaded=loaded,
        log=ctx.log,
        progress=progress.update if progress else None,
    )
    if progress is not None:
        progress.close()
    return {"shard": shard}


def finalize(ctx: StageContext[EvaluateParams]) -> dict:
    """After every array task succeeded: aggregate the shards into results.json / results.md."""
    return headline(aggregate(ctx.out_dir, ctx.num_tasks, log=ctx.log))


def headline(results: dict) -> dict:
    """The figures the job records for the stage (status, tracking): one per evaluation and metric."""
    figures = {}
    for name, r in results["perplexity"].items():
        figures[f"{name}.ppl_per_char"] = round(r["ppl_per_char"], 4)
        figures[f"{name}.ppl_per_token"] = round(r["ppl_per_token"], 4)
    for name, r in results["tasks"].items():
        for system, scores in r["systems"].items():
            figures[f"{name}.{system}.{r['metric']}"] = round(scores[r["metric"]], 4)
    for name, r in results["prompts"].items():
        figures[f"{name}.generations"] = r["items"]
    for name, r in results.get("lm_eval", {}).get("tasks", {}).items():
        figures.update(
            {
                f"lm_eval.{name}.{metric}": round(value, 4)
                for metric, value in r.items()
                if metric in ("acc", "acc_norm")
            }
        )
    return figures
