"""Submission: recipe -> plan -> run directory -> executor. What `chla-submit` does."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TextIO

from . import atomic, graph
from .errors import ChlaError
from .recipe import ResolvedRecipe, dump_frozen, load_recipe
from .rundir import RunDir, now


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


def load_for_submit(options: SubmitOptions) -> ResolvedRecipe:
    overrides = list(options.overrides)
    if options.executor:
        overrides.append(f"executor={options.executor}")
    if options.resume:
        run = RunDir(options.resume)
        if not run.exists():
            raise ChlaError(f"--resume {options.resume}: not a chla run directory (no recipe.yaml)")
        source = options.recipe or str(run.recipe_file)
        return load_recipe(source, overrides, run_dir=str(run.path))
    if not options.recipe:
        raise ChlaError("give a recipe file (or --resume RUN_DIR)")
    return load_recipe(options.recipe, overrides, run_dir=options.run_dir)


def submit(options: SubmitOptions, out: TextIO = sys.stdout) -> int:
    recipe = load_for_submit(options)
    run = RunDir(recipe.run_dir)
    done = {name: run.done_fingerprint(name) for name in recipe.stages}
    plan = graph.plan(recipe, done, only=options.only, from_stage=options.from_stage)
    executor = recipe.model.executor

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    say(f"chla: {recipe.name}: {len(plan.run)} stage(s) to run, {len(plan.skip)} already finished "
        f"({executor} executor, run directory {run.path})")
    for name in plan.order:
        stage = recipe.stages[name]
        mark = "run " if name in plan.run else "skip"
        after = f" after {', '.join(stage.after)}" if stage.after else ""
        say(f"  {mark} {name:<20} {stage.kind.name:<16} {plan.fingerprints[name]}{after}")

    if options.dry_run:
        if executor == "slurm":
            from .executors.slurm import SlurmChainSubmitter

            say("\n# Batch scripts exactly as they would be submitted (job ids of parents shown as <stage>):")
            SlurmChainSubmitter(recipe, run, dry_run=True, out=out).submit(plan)
        say("dry run: nothing submitted, nothing written")
        return 0
    if not plan.run:
        say("everything is up to date; nothing to do")
        return 0

    _refuse_if_local_chain_running(run)
    active = {}
    if executor == "slurm" and run.exists():
        from .executors.slurm import active_submissions

        active = active_submissions(run, plan)

    # The run directory is written only now that the recipe and plan are valid.
    run.path.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run.recipe_file, dump_frozen(recipe))
    for name in plan.run:
        if name not in active:
            run.clear_done(name)
            run.stage_dir(name).mkdir(parents=True, exist_ok=True)
            # A new submission starts the count of attempts (requeues show as restarts) afresh.
            atomic.write_json(run.state_file(name), {"status": "PENDING", "attempts": 0, "submitted_at": now()})
            if recipe.stages[name].array is not None:
                # Task states of an earlier attempt would be mistaken for this one's.
                for old in run.tasks_dir(name).glob("*.json"):
                    old.unlink()
    previous = run.read_chain().get("stages", {})
    chain = {"name": recipe.name, "executor": executor, "submitted_at": now(),
             "recipe_source": os.path.abspath(recipe.source), "run_dir": str(run.path),
             "stages": {}}
    for name in plan.skip:
        chain["stages"][name] = {**previous.get(name, {}), "fingerprint": plan.fingerprints[name], "skipped": True}

    if executor == "slurm":
        from .executors.slurm import SlurmChainSubmitter, chain_records

        submitted = SlurmChainSubmitter(recipe, run, out=out).submit(plan, active)
        chain["stages"].update(chain_records(submitted, plan))
        chain["stages"] = {name: chain["stages"][name] for name in plan.order if name in chain["stages"]}
        run.write_chain(chain)
        say(f"queued. Follow it with: chla status {run.path} --watch")
        return 0

    from .executors.local import LocalExecutor

    chain["pid"] = os.getpid()
    for name in plan.run:
        chain["stages"][name] = {"fingerprint": plan.fingerprints[name], "skipped": False, "submitted_at": now()}
    chain["stages"] = {name: chain["stages"][name] for name in plan.order}
    run.write_chain(chain)
    code = LocalExecutor(recipe, run, out=out).execute(plan)
    chain = run.read_chain()
    chain.pop("pid", None)
    chain["finished_at"] = now()
    run.write_chain(chain)
    from .status import render_status

    say("")
    render_status(run, out=out)
    summary = run.path / "summary.md"  # written by a `summarize` stage
    if summary.exists() and code == 0:
        say("")
        say(summary.read_text(encoding="utf-8").rstrip())
    return code


def _refuse_if_local_chain_running(run: RunDir) -> None:
    chain = run.read_chain()
    pid = chain.get("pid")
    if chain.get("executor") == "local" and pid and pid != os.getpid() and _alive(pid):
        raise ChlaError(f"{run.path}: a local run (pid {pid}) is still going; wait for it or "
                        f"`chla cancel {run.path}`")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
