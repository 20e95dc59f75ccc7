"""`command`: run an argv list in the stage directory, never through a shell.

The program sees CHLA_OUT_DIR (where its results go), CHLA_WORK_DIR, CHLA_STAGE_DIR, CHLA_RUN_DIR,
CHLA_TASK_INDEX / CHLA_NUM_TASKS (array shards) and the torch.distributed variables (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, already exported by the entry).
Its output streams into the task's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.command import CommandParams
from chla_launcher.contract.processes import die_with_parent
from chla_train.context import Preempted, StageContext


def run(ctx: StageContext[CommandParams]) -> dict:
    params = ctx.params
    env = dict(os.environ)
    env.update(params.env)
    env.update(
        CHLA_RUN_DIR=str(ctx.run_dir),
        CHLA_STAGE_DIR=str(ctx.stage_dir),
        CHLA_OUT_DIR=str(ctx.out_dir),
        CHLA_WORK_DIR=str(ctx.work_dir),
        CHLA_TASK_INDEX=str(ctx.task_index),
        CHLA_NUM_TASKS=str(ctx.num_tasks),
    )
    ctx.log(f"running {params.argv!r}")
    sys.stdout.flush()
    try:
        # The program must not outlive its task, even one killed outright (SIGKILL, OOM).
        process = subprocess.Popen(params.argv, cwd=ctx.stage_dir, env=env, preexec_fn=die_with_parent(signal.SIGTERM))
    except FileNotFoundError:
        raise ChlaError(f"stage {ctx.stage}: program not found: {params.argv[0]}") from None
    except PermissionError:
        raise ChlaError(f"stage {ctx.stage}: program not executable: {params.argv[0]}") from None

    # Pass termination on to the child so a cancelled job leaves no orphan behind, and let the
    # program end as it likes; then the task is requeued (preemption) like any stopped stage.
    def forward(signum: int, frame: object) -> None:
        ctx.stop_signal = ctx.stop_signal or signal.Signals(signum).name
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = process.wait()
    except BaseException:
        process.kill()  # requeue or cancellation: the program must not outlive its task
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if ctx.stop_signal is not None:
        raise Preempted(ctx.stop_signal)
    if code not in params.ok_exit_codes:
        raise ChlaError(f"stage {ctx.stage}: command exited with status {code}: {params.argv[0]}")
    return {"exit_code": code}
