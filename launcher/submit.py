"""Submission: load the recipe -> plan -> lock the run directory -> the executor submits, as one
transaction (chla_launcher.transaction). What `chla-submit` does."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from typing import TextIO

from . import graph
from .contract import processes
from .contract.chain import Chain, StageRecord
from .contract.errors import ChlaError
from .contract.recipe import ResolvedRecipe, dump_frozen, load_recipe
from .contract.rundir import RunDir, now
from .executors import Executor, executor_named
from .lock import RunLock
from .plan import memory_verdicts, too_big_message
from .transaction import SubmissionTransaction, recover

# How long --replace waits for the chain it cancelled to be gone before it queues the new one.
REPLACE_WAIT_S = 120.0


@dataclass
class SubmitOptions:
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    executor: str | None = None
    run_dir: str | None = None
    resume: str | None = None
    only: list[str] | None = None
    from_stage: str | None = None
    dry_run: bool = False
    replace: bool = False
    strict: bool = False  # refuse to queue a training stage that will not fit in its devices' memory


def load_for_submit(options: SubmitOptions) -> ResolvedRecipe:
    overrides = list(options.overrides)
    if options.executor:
        overrides.append(f"executor={options.executor}")
    if options.resume:
        run = RunDir(options.resume)
        if not run.exists():
            raise ChlaError(f"--resume {options.resume}: not a chla run directory (no recipe.yaml)")
        if options.recipe:
            return load_recipe(options.recipe, overrides, run_dir=str(run.path))
        # The frozen recipe's references were resolved when it was frozen: a literal "${...}" in it
        # (written $${...} in the source) must stay as it is.
        return load_recipe(run.recipe_file, overrides, run_dir=str(run.path), interpolate=False)
    if not options.recipe:
        raise ChlaError("give a recipe file (or --resume RUN_DIR)")
    return load_recipe(options.recipe, overrides, run_dir=options.run_dir)


def submit(options: SubmitOptions, out: TextIO = sys.stdout) -> int:
    recipe = load_for_submit(options)
    run = RunDir(recipe.run_dir)
    executor = executor_named(recipe.model.executor)(run, out)
    plan = _plan(recipe, run, options)  # a bad --only/--from fails here, before anything is written
    too_big = memory_verdicts(recipe, plan.run)[1] if options.strict else []
    if too_big:
        raise ChlaError(f"{too_big_message(recipe, too_big)}; nothing submitted (--strict)")
    if options.dry_run:
        _print_plan(recipe, run, plan, executor, out)
        executor.dry_run(recipe, plan)
        print("dry run: nothing submitted, nothing written", file=out, flush=True)
        return 0

    new_run = not run.path.exists()
    try:
        with RunLock(run.path, "submit") as lock:
            done = recover(run)
            if done:
                print(f"chla: {run.path}: {done} (its submitter had died)", file=sys.stderr, flush=True)
            _refuse_or_replace_live(run, options.replace, out)
            plan = _plan(recipe, run, options)  # the DONE markers as they are now, under the lock
            _print_plan(recipe, run, plan, executor, out)
            if not plan.run:
                print("everything is up to date; nothing to do", file=out, flush=True)
                return 0
            with SubmissionTransaction(run, executor, lock, new_run=new_run) as transaction:
                _stage_switch(transaction, recipe, run, plan)
                records = executor.submit(recipe, plan, transaction)
                chain = _new_chain(recipe, run, plan, executor, records)
                transaction.commit(chain)
    finally:
        if new_run and run.path.is_dir() and [p.name for p in run.path.iterdir()] == [".chla"]:
            shutil.rmtree(run.path, ignore_errors=True)  # refused before anything was submitted
    return executor.follow(recipe, plan, chain)


def _plan(recipe: ResolvedRecipe, run: RunDir, options: SubmitOptions) -> graph.Plan:
    done = {name: run.done_fingerprint(name) for name in recipe.stages}
    return graph.plan(recipe, done, only=options.only, from_stage=options.from_stage)


def _print_plan(recipe: ResolvedRecipe, run: RunDir, plan: graph.Plan, executor: Executor, out: TextIO) -> None:
    """The stages to run and skip, then `chla plan`'s memory verdict on the training stages."""
    lines = [
        f"chla: {recipe.name}: {len(plan.run)} stage(s) to run, {len(plan.skip)} already finished "
        f"({executor.name} executor, run directory {run.path})"
    ]
    for name in plan.order:
        stage = recipe.stages[name]
        mark = "run " if name in plan.run else "skip"
        after = f" after {', '.join(stage.after)}" if stage.after else ""
        lines.append(f"  {mark} {name:<20} {stage.kind.name:<16} {plan.fingerprints[name]}{after}")
    verdicts, too_big = memory_verdicts(recipe, plan.run)
    if verdicts:
        lines += ["memory per device (chla plan):", *(f"  {line}" for line in verdicts)]
    if too_big:
        lines.append(f"warning: {too_big_message(recipe, too_big)}")
    print("\n".join(lines), file=out, flush=True)


def _refuse_or_replace_live(run: RunDir, replace: bool, out: TextIO) -> None:
    """A run directory runs one chain at a time: a live one is refused, or cancelled (--replace)."""
    chain = run.read_chain()
    if chain is None:
        return
    previous = executor_named(chain.executor)(run, out)
    live = previous.live(chain)
    if not live:
        return
    described = "; ".join(f"{stage} ({', '.join(ids)})" for stage, ids in live.items())
    if not replace:
        raise ChlaError(
            f"{run.path}: the chain submitted at {chain.submitted_at} is still queued or running: "
            f"{described}; wait for it, `chla cancel {run.path}`, or submit with --replace"
        )
    stopped = previous.cancel(chain, wait_s=REPLACE_WAIT_S)
    print(f"--replace: cancelled the live chain ({', '.join(stopped) or described})", file=out, flush=True)


def _stage_switch(transaction: SubmissionTransaction, recipe: ResolvedRecipe, run: RunDir, plan: graph.Plan) -> None:
    """What the switch will change: the frozen recipe; for every stage that runs, a fresh
    state.json and no DONE marker, task markers or array parts of an earlier attempt."""
    transaction.stage_file(run.recipe_file, dump_frozen(recipe))
    for name in plan.run:
        transaction.note_created(run.stage_dir(name))
        transaction.stage_file(run.state_file(name), json.dumps(RunDir.initial_state(), indent=2) + "\n")
        for path in [run.done_file(name), run.tasks_dir(name), *run.stage_dir(name).glob("out.tmp-array-*")]:
            if path.exists():
                transaction.stage_removal(path)
        if run.done_fingerprint(name) == plan.fingerprints[name] and run.work_dir(name).exists():
            # Forced by --from/--only although it finished with this very fingerprint: it starts
            # afresh, not from the checkpoints its finished run left in work/.
            transaction.stage_removal(run.work_dir(name))


def _new_chain(
    recipe: ResolvedRecipe, run: RunDir, plan: graph.Plan, executor: Executor, records: dict[str, StageRecord]
) -> Chain:
    previous = run.read_chain()
    chain = Chain(
        name=recipe.name,
        executor=executor.name,
        run_dir=str(run.path),
        submitted_at=now(),
        recipe_source=os.path.abspath(recipe.source),
        pid=os.getpid(),
        host=socket.gethostname(),
        pid_started=processes.start_time(os.getpid()),
    )
    for name in plan.order:
        if name in records:
            chain.stages[name] = records[name]
            continue
        earlier = previous.stages.get(name) if previous else None
        chain.stages[name] = StageRecord(
            fingerprint=plan.fingerprints[name],
            skipped=True,
            job_ids=earlier.job_ids if earlier else [],
            finalize_job_id=earlier.finalize_job_id if earlier else None,
            submitted_at=earlier.submitted_at if earlier else None,
        )
    return chain
