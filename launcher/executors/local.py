"""Local executor: the same graph on this machine, run by chla-submit itself. Stages run in
dependency order; array tasks run as parallel processes bounded by the cores; a distributed stage
runs as nodes x tasks_per_node local processes with the torch.distributed environment set; a task
that asks to be requeued (exit 75 after a preemption signal) is started again, as Slurm would.
Every task writes the same run directory a Slurm job writes.

The run dies as one: SIGTERM, SIGINT and SIGHUP (a closed terminal or SSH connection) stop every
task before chla-submit exits, and each task gets SIGTERM from the kernel if chla-submit dies
without a chance to (SIGKILL, the OOM killer)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from chla_train.distributed import free_master_port  # no torch

from ..contract import processes
from ..contract.chain import Chain, StageRecord
from ..contract.errors import ChlaError
from ..contract.progress import ProgressDisplay
from ..contract.recipe import ResolvedRecipe, ResolvedStage
from ..contract.rundir import CANCELLED, FAILED, INTERRUPTED, PENDING, RUNNING, now
from ..graph import Plan
from . import Executor, JobRecorder, JobStatus

if TYPE_CHECKING:
    from ..contract.rundir import RunDir

REQUEUE_EXIT_CODE = 75  # chla_train.context.REQUEUE_EXIT_CODE (not imported: no chla_train here)
MAX_LOCAL_REQUEUES = 20
# How long the other ranks of a task have to follow the first that asks to be requeued (they
# checkpointed together; each leaves once rank 0 has decided).
REQUEUE_GRACE_S = 60


@dataclass
class _Task:
    """One process of one attempt of one task."""

    index: int
    rank: int
    process: subprocess.Popen[bytes]
    log: Path


class LocalExecutor(Executor):
    name = "local"
    detached = False

    def __init__(self, run: RunDir, out: TextIO | None = None) -> None:
        super().__init__(run, out)
        self.cores = os.cpu_count() or 1
        self._live: list[subprocess.Popen[bytes]] = []
        self._cancelled = False
        self._display: ProgressDisplay | None = None
        self._die_with_us = processes.die_with_parent(signal.SIGTERM)

    # --- submission ---------------------------------------------------------------------------
    def dry_run(self, recipe: ResolvedRecipe, plan: Plan) -> None:
        pass  # the plan printed by submit is all a local run does

    def submit(self, recipe: ResolvedRecipe, plan: Plan, transaction: JobRecorder) -> dict[str, StageRecord]:
        # Nothing to queue: this process runs the chain once it is committed. A distributed stage
        # that cannot give each rank a GPU of its own is refused now, not once it is reached.
        gpus = visible_gpus()
        for name in plan.run:
            gpus_for_ranks(recipe.stages[name], gpus)
        return {name: StageRecord(fingerprint=plan.fingerprints[name], submitted_at=now()) for name in plan.run}

    def follow(self, recipe: ResolvedRecipe, plan: Plan, chain: Chain) -> int:
        from ..status import render_status

        code = self.execute(recipe, plan)
        chain.finished_at = now()
        self.run.write_chain(chain)
        self._say("")
        render_status(self.run, out=self.out)
        summary = self.run.path / "summary.md"  # written by a `summarize` stage
        if summary.exists() and code == 0:
            self._say("")
            self._say(summary.read_text(encoding="utf-8").rstrip())
        return code

    # --- a committed chain --------------------------------------------------------------------
    def live(self, chain: Chain) -> dict[str, list[str]]:
        live: dict[str, list[str]] = {}
        runner_alive = (
            chain.pid is not None
            and chain.finished_at is None
            and (not chain.on_this_host or (processes.alive(chain.pid, chain.pid_started) and _is_chla(chain.pid)))
        )
        if runner_alive:
            where = f"pid {chain.pid}" + ("" if chain.on_this_host else f" on {chain.host}")
            unfinished = [
                name for name in chain.submitted() if self.run.read_state(name).get("status") in (PENDING, RUNNING)
            ]
            for name in unfinished or list(chain.submitted())[-1:]:
                live[name] = [where]
        for pid, stage in processes.stage_tasks(self.run.path):
            live.setdefault(stage, []).append(f"task pid {pid}")
        return live

    def cancel(self, chain: Chain, *, wait_s: float = 0) -> list[str]:
        """SIGTERM to the chla-submit running the chain (it stops its tasks and records them as
        cancelled); with wait_s, wait for it and every task of the run to end (SIGKILL after)."""
        stopped = []
        if chain.pid is not None and chain.finished_at is None:
            if not chain.on_this_host:
                raise ChlaError(
                    f"{self.run.path}: the local run is on host {chain.host} (pid {chain.pid}); cancel it there"
                )
            if _is_chla(chain.pid):
                os.kill(chain.pid, signal.SIGTERM)
                stopped.append(f"pid {chain.pid}")
        deadline = time.monotonic() + wait_s
        while wait_s:
            runner = chain.pid is not None and _is_chla(chain.pid)
            tasks = processes.stage_tasks(self.run.path)
            if not runner and not tasks:
                break
            if time.monotonic() > deadline:
                for pid, _ in tasks:
                    _kill(pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        return stopped

    def statuses(self, chain: Chain) -> dict[str, JobStatus]:
        gone, note = self._runner(chain)
        result = {}
        for name in chain.submitted():
            state = self.run.read_state(name)
            # Locally a requeue is a new attempt of the same task.
            status = JobStatus(
                state=state.get("status", PENDING), restarts=max(0, int(state.get("attempts", 1) or 1) - 1)
            )
            if status.state in (PENDING, RUNNING) and gone:
                status.state, status.reason = INTERRUPTED, gone  # nothing will run it any more
            elif status.state in (PENDING, RUNNING) and note:
                status.reason = note
            result[name] = status
        return result

    def _runner(self, chain: Chain) -> tuple[str, str]:
        """(gone, note) about the chla-submit that runs the chain: `gone` says it ended without
        finishing the chain (killed: SIGKILL, the OOM killer, a reboot), and how to go on; `note`
        that it runs on another host, where this one cannot see whether it is alive."""
        if chain.pid is None or chain.finished_at is not None:
            return "", ""
        if not chain.on_this_host:
            return "", (
                f"run by chla-submit pid {chain.pid} on host {chain.host}: whether it still runs cannot be told "
                f"from {socket.gethostname()} (run chla status there)"
            )
        if processes.alive(chain.pid, chain.pid_started) and _is_chla(chain.pid):
            return "", ""
        return (
            f"the local run is gone: chla-submit (pid {chain.pid}) ended before this stage finished "
            f"(killed?); resume with: chla-submit --resume {self.run.path} --executor local"
        ), ""

    def log_files(self, chain: Chain, stage: str, task: int, rank: int) -> list[Path]:
        logs = self.run.logs_dir(stage)
        found = list(logs.glob("local_finalize.log" if task == -1 else f"local_{task}_{rank}.log"))
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    # ------------------------------------------------------------------------------------------
    def execute(self, recipe: ResolvedRecipe, plan: Plan) -> int:
        """Run the plan; returns 0 if every stage finished, 1 otherwise."""
        self.recipe = recipe
        previous = {
            sig: signal.signal(sig, self._on_terminate) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        failed: set[str] = set()
        try:
            for name in plan.run:
                self.run.update_state(name, status=PENDING, error=None)
            for position, name in enumerate(plan.run, 1):
                stage = self.recipe.stages[name]
                blocked = [p for p in stage.after if p in failed]
                if blocked or self._cancelled:
                    reason = f"dependency {blocked[0]} failed" if blocked else "chain cancelled"
                    self.run.update_state(name, status=CANCELLED, error=reason)
                    failed.add(name)
                    self._say(f"[{position}/{len(plan.run)}] {name}: cancelled ({reason})")
                    continue
                self._say(f"[{position}/{len(plan.run)}] {name} ({stage.kind.name}{self._shape(stage)}) ...")
                started = time.time()
                ok = self._run_stage(stage, plan.fingerprints[name])
                elapsed = time.time() - started
                if ok:
                    self._say(f"[{position}/{len(plan.run)}] {name}: done in {elapsed:.1f}s")
                else:
                    failed.add(name)
                    state = self.run.read_state(name)
                    if self._cancelled:
                        state = self.run.update_state(name, status=CANCELLED, error="cancelled", finished_at=now())
                    elif state.get("status") not in (FAILED, CANCELLED):
                        state = self.run.update_state(name, status=FAILED, finished_at=now())
                    self._say(
                        f"[{position}/{len(plan.run)}] {name}: FAILED after {elapsed:.1f}s"
                        + (f" ({state['error']})" if state.get("error") else "")
                    )
                    self._print_log_tail(name)
        finally:
            _terminate(self._live)  # an exception of our own must not orphan a task either
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if failed else 0

    # ------------------------------------------------------------------------------------------
    def _run_stage(self, stage: ResolvedStage, fingerprint: str) -> bool:
        # Live bars of what the stage's tasks report (training steps, pieces, merged bytes).
        self._display = ProgressDisplay(
            self.run.stage_dir(stage.name), stage.name, self.out, array=stage.array is not None
        )
        try:
            if stage.array is not None:
                parallel = max(1, min(stage.array, self.cores // max(1, stage.resources.cpus_per_task)))
                if not self._run_tasks(stage, fingerprint, list(range(stage.array)), parallel):
                    return False
                return self._run_process_group(stage, fingerprint, task=-1, finalize=True)
            return self._run_process_group(stage, fingerprint, task=0)
        finally:
            self._display.close()
            self._display = None

    def _run_tasks(self, stage: ResolvedStage, fingerprint: str, indices: list[int], parallel: int) -> bool:
        """Array tasks, at most `parallel` at a time; each retried when it asks to be requeued."""
        pending = list(indices)
        running: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
        ok = True
        while (pending or running) and not self._cancelled:
            while pending and len(running) < parallel and ok:
                index = pending.pop(0)
                running[index] = (
                    self._spawn(stage, fingerprint, index, rank=0, world=1, port=0, attempt=f"{index}-0"),
                    0,
                )
            time.sleep(0.05)
            if self._display is not None:
                self._display.refresh()
            for index, (process, requeues) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[index]
                self._live.remove(process)
                _reap_group(process)
                if code == REQUEUE_EXIT_CODE and requeues < MAX_LOCAL_REQUEUES:
                    self._say(f"    {stage.name} task {index}: requeued")
                    running[index] = (
                        self._spawn(
                            stage, fingerprint, index, rank=0, world=1, port=0, attempt=f"{index}-{requeues + 1}"
                        ),
                        requeues + 1,
                    )
                elif code != 0:
                    ok = False
            if not ok:
                pending.clear()
        if self._cancelled:
            return False
        return ok

    def _run_process_group(self, stage: ResolvedStage, fingerprint: str, task: int, finalize: bool = False) -> bool:
        """One task as world_size processes (1 unless the stage is distributed), requeued as a whole."""
        world = 1 if finalize else stage.resources.world_size
        for requeues in range(MAX_LOCAL_REQUEUES + 1):
            # Outside the ephemeral range (a port from bind(0) can be taken before rank 0 binds it).
            port = free_master_port(os.getpid(), requeues) if world > 1 else 0
            attempt = f"{'finalize' if finalize else task}-{requeues}"
            gpus = gpus_for_ranks(stage, visible_gpus()) if world > 1 else [None]
            ranks = [
                self._spawn(
                    stage,
                    fingerprint,
                    task,
                    rank=rank,
                    world=world,
                    port=port,
                    attempt=attempt,
                    finalize=finalize,
                    gpu=gpus[rank],
                )
                for rank in range(world)
            ]
            codes = self._wait_all(ranks)
            if self._cancelled:
                return False
            if codes and all(code == 0 for code in codes):
                return True
            # Requeued only when every rank left for it (rank 0 decides, the others follow): a rank
            # that failed makes the attempt a failure whatever the others did when it ended.
            if codes[0] == REQUEUE_EXIT_CODE and all(code in (0, REQUEUE_EXIT_CODE) for code in codes):
                self._say(f"    {stage.name}: requeued")
                continue
            return False
        return False

    def _wait_all(self, ranks: list[subprocess.Popen[bytes]]) -> list[int]:
        """Wait for every rank. One that fails ends the others at once (SIGKILL, as srun does with
        --kill-on-bad-exit: its peers would wait for it inside a collective, and cannot checkpoint
        without it). One that asks to be requeued gives the others REQUEUE_GRACE_S to follow."""
        requeue_deadline: float | None = None
        while True:
            codes = [p.poll() for p in ranks]
            failed = [c for c in codes if c not in (None, 0, REQUEUE_EXIT_CODE)]
            if REQUEUE_EXIT_CODE in codes and requeue_deadline is None:
                requeue_deadline = time.monotonic() + REQUEUE_GRACE_S
            if any(c is None for c in codes) and failed:
                for process in ranks:
                    if process.poll() is None:
                        _reap_group(process)
                codes = [p.wait() for p in ranks]
            elif any(c is None for c in codes) and requeue_deadline is not None and time.monotonic() > requeue_deadline:
                _terminate([process for process in ranks if process.poll() is None])
                codes = [p.wait() for p in ranks]
            if all(c is not None for c in codes):
                for process in ranks:
                    if process in self._live:
                        self._live.remove(process)
                    _reap_group(process)
                return [c for c in codes if c is not None]
            time.sleep(0.05)
            if self._display is not None:
                self._display.refresh()

    def _spawn(
        self,
        stage: ResolvedStage,
        fingerprint: str,
        task: int,
        *,
        rank: int,
        world: int,
        port: int,
        attempt: str,
        finalize: bool = False,
        gpu: str | None = None,
    ) -> subprocess.Popen[bytes]:
        tasks_per_node = stage.resources.tasks_per_node if world > 1 else 1
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank % tasks_per_node),
            LOCAL_WORLD_SIZE=str(tasks_per_node),
            GROUP_RANK=str(rank // tasks_per_node),
            CHLA_NUM_NODES=str(max(1, world // tasks_per_node)),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port or 29500),
            CHLA_ATTEMPT=f"local-{os.getpid()}-{attempt}",
            PYTHONUNBUFFERED="1",
        )
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu  # this rank's own GPU (gpus_for_ranks)
        # Slurm would give each task its CPUs; without a binding, N processes x all-core thread pools
        # oversubscribe the machine.
        env.setdefault("OMP_NUM_THREADS", str(stage.resources.cpus_per_task))
        for name in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID"):
            env.pop(name, None)  # a local run inside a Slurm allocation is still a local run
        argv = [sys.executable, "-m", "chla_train.entry", str(self.run.path), stage.name, "--fingerprint", fingerprint]
        argv += ["--finalize"] if finalize else ["--task", str(task)]
        logs = self.run.logs_dir(stage.name)
        logs.mkdir(parents=True, exist_ok=True)
        label = "finalize" if finalize else f"{task}_{rank}"
        log_path = logs / f"local_{label}.log"
        with open(log_path, "ab") as log:
            log.write(f"==> {now()} attempt {attempt}\n".encode())
            log.flush()
            # A session of its own: the terminal's Ctrl-C reaches this process, which stops tasks in
            # order; the group lets _terminate reach whatever the task started.
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.run.stage_dir(stage.name),
                start_new_session=True,
                preexec_fn=self._die_with_us,
            )
        self._live.append(process)
        return process

    # ------------------------------------------------------------------------------------------
    def _on_terminate(self, signum: int, frame: object) -> None:
        if not self._cancelled:
            self._say("cancelling: stopping running tasks")
        self._cancelled = True
        _terminate(self._live)

    def _shape(self, stage: ResolvedStage) -> str:
        if stage.array is not None:
            return f", array of {stage.array}"
        if stage.resources.world_size > 1:
            return f", {stage.resources.nodes} x {stage.resources.tasks_per_node} ranks"
        return ""

    def _print_log_tail(self, name: str, lines: int = 15) -> None:
        logs = sorted(self.run.logs_dir(name).glob("local_*.log"), key=lambda p: p.stat().st_mtime)
        if not logs:
            return
        tail = logs[-1].read_text(errors="replace").splitlines()[-lines:]
        self._say(f"    last lines of {logs[-1]}:")
        for line in tail:
            self._say(f"    | {line}")


def visible_gpus(environ: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> list[str]:
    """The GPUs processes started here can use: CUDA_VISIBLE_DEVICES where it is set (as CUDA reads
    it: up to the first negative entry), else one per /dev/nvidiaN device file (no torch here)."""
    value = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        gpus = []
        for part in (part.strip() for part in value.split(",")):
            if not part or part.startswith("-"):
                break
            gpus.append(part)
        return gpus
    numbers = [path.name[len("nvidia") :] for path in dev.glob("nvidia*")]
    return sorted((number for number in numbers if number.isdigit()), key=int)


def gpus_for_ranks(stage: ResolvedStage, gpus: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each rank of a stage run here: the nodes x tasks_per_node ranks
    share this one machine, so each gets a distinct GPU of `gpus` (left alone where there is no
    GPU: the stage runs on CPU). Fewer GPUs than ranks is refused with one line: with each rank
    choosing the GPU at its local rank, a 2 x 4 stage on an 8-GPU machine put two ranks on each of
    four GPUs."""
    world = stage.resources.world_size
    if world <= 1 or not gpus:
        return [None] * world
    if len(gpus) < world:
        raise ChlaError(
            f"stage {stage.name}: {stage.resources.nodes} node(s) x {stage.resources.tasks_per_node} "
            f"task(s) = {world} ranks need a GPU each, and the local executor runs them all on this "
            f"machine, which has {len(gpus)} ({','.join(gpus)}); lower the stage's resources.nodes "
            f"or tasks_per_node to fit (or use --executor slurm)"
        )
    return list(gpus[:world])


def _is_chla(pid: int) -> bool:
    """Is `pid` still a chla process (and not a new process that reuses the number)?"""
    argv = processes.command_line(pid)
    return processes.alive(pid) and any("chla" in part for part in argv)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _reap_group(process: subprocess.Popen[bytes]) -> None:
    """A task that ended may leave children behind (a command's program after a requeue exit);
    like Slurm at the end of a job, kill whatever is left of its process group."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(tasks: list[subprocess.Popen[bytes]], grace_s: float = 10) -> None:
    """SIGTERM every task's process group (each was started in a session of its own), give them
    `grace_s` together to end (a training stage checkpoints), then SIGKILL what is left."""
    for process in list(tasks):
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for process in list(tasks):
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


EXECUTOR = LocalExecutor
