"""Run a training stage without the launcher: build a StageContext by hand, as the job entry does.

In-process: `make_context(...)` and call the runner (used for input checks that fail before
DeepSpeed starts). As a script: `python harness.py SPEC.json` runs one rank of a stage; the
distributed environment comes from RANK/WORLD_SIZE/MASTER_* exactly as the local executor sets
it. (Preemption is tested through the real job entry and local executor: test_training.py.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from chla_launcher.contract.kinds import get_kind
from chla_train.context import StageContext
from chla_train.distributed import DistributedEnv


def make_context(
    kind: str,
    params: dict[str, Any],
    run_dir: Path,
    *,
    stage: str = "train",
    out_dir: Path | None = None,
    dist_env: DistributedEnv | None = None,
) -> StageContext:
    model = get_kind(kind).params.model_validate(params)
    return StageContext.standalone(run_dir, stage, kind, model, out_dir=out_dir, dist=dist_env, fingerprint="test")


def run_stage(ctx: StageContext) -> Any:
    from chla_launcher.contract.kinds import import_entry

    return import_entry(get_kind(ctx.kind).entry)(ctx)


def _probe_logits_after_training(probe_ids: list[list[int]], dest: Path) -> None:
    """Record the in-training model's logits on a probe batch right when the adapter is saved,
    so the test can compare them with the logits of the adapter reloaded by stock PEFT."""
    import torch

    import chla_train.export as export

    original = export.save_adapter

    def save_and_probe(trainer, tokenizer, out_dir, facts):
        path = original(trainer, tokenizer, out_dir, facts)
        trainer.engine.eval()
        with torch.no_grad():
            logits = trainer.engine(input_ids=torch.tensor(probe_ids)).logits.float()
        if trainer.rank == 0:
            torch.save(logits, dest)
        return path

    import chla_train.training_workflow as workflow  # step 4 of both training stages saves with it

    workflow.save_adapter = save_and_probe


def _record_blend_reads(reads: list[tuple[str, int]]) -> None:
    """Append (source name, item index in its data set) to `reads` for every item the trainer
    reads from a blend (chla_tools.blocks.WeightedBlend: only the training loop indexes it)."""
    from chla_tools.blocks import WeightedBlend

    original = WeightedBlend.__getitem__

    def reading(blend, k):
        source_index = int(blend.source_of[k])
        item_pass, offset = divmod(int(blend.ordinal[k]), len(blend.sources[source_index].indices))
        reads.append((blend.sources[source_index].name, int(blend._order(source_index, item_pass)[offset])))
        return original(blend, k)

    WeightedBlend.__getitem__ = reading


def main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    dist_env = DistributedEnv.from_environment()
    if spec.get("probe_ids"):
        _probe_logits_after_training(spec["probe_ids"], Path(spec["probe_out"]))
    reads: list[tuple[str, int]] = []
    if spec.get("reads_out"):
        _record_blend_reads(reads)
    attempt_out = Path(spec["run_dir"]) / spec.get("stage", "train") / f"attempt-{os.getpid()}"
    ctx = make_context(
        spec["kind"],
        spec["params"],
        Path(spec["run_dir"]),
        stage=spec.get("stage", "train"),
        out_dir=attempt_out,
        dist_env=dist_env,
    )
    result = run_stage(ctx)
    if dist_env.rank == 0:
        final = ctx.stage_dir / "out"
        if final.exists():
            import shutil

            shutil.rmtree(final)
        os.replace(attempt_out, final)  # what the job entry does after run() returns
        (final / "result.json").write_text(json.dumps(result))
    if spec.get("reads_out"):
        Path(spec["reads_out"]).write_text(json.dumps(reads))
    sys.stdout.flush()
    os._exit(0)  # as the job entry ends: no interpreter teardown with live gloo threads


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
