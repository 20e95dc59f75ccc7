"""Experiment tracking in the jobs: MLflow and Weights & Biases, as the recipe's `tracking:` block
asks (settings: chla_launcher.contract.tracking_settings).

    MLflow   one run per chain (the parent), one nested run per stage: the stage's parameters,
             per-step training metrics (loss, lr, grad_norm, tokens/s, eval_loss, ...), its
             headline metrics at the end, and its plots as artifacts (a training stage's loss
             curve; every PNG the stage wrote, e.g. vocab_report's report.png).
    W&B      one run per stage, grouped by chain (`group`), with the same content; `mode:
             offline` writes everything under `dir` without network (`wandb sync` later).

The chain's identity (its name for W&B's group, MLflow's experiment and parent run id) is made
once, by the first stage that tracks, under a lock, in <run dir>/.chla/tracking.json. Each stage's own
run ids are kept in its work dir, so a requeued or resumed attempt continues the same run.

Tracking never fails a stage: the first error of a backend is one warning line in the stage's
log and that backend is off for the rest of the stage. Only rank 0 tracks. Credentials come from
the clients' own environment variables, never from the recipe or a file of the run directory.
This module imports neither client until a recipe asks for it, nor torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chla_launcher.contract.atomic import read_json, write_json
from chla_launcher.contract.rundir import RunDir

STAGE_FILE = "tracking_runs.json"
# A tracking server that does not answer must cost a stage seconds, not MLflow's default minutes
# of retries (7 retries, backoff factor 2, 120 s timeout). Settings in the environment win.
# Its "View run at" lines would interleave with the stage's log.
_MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

_trackers: dict[tuple[str, str], StageTracker | None] = {}


def stage_tracker(ctx) -> StageTracker | None:
    """This process's tracker for the stage (created on first use), or None when the recipe does
    not track or this is not rank 0."""
    settings = getattr(ctx.recipe.model, "tracking", None) if ctx.recipe is not None else None
    if settings is None or (settings.mlflow is None and settings.wandb is None) or ctx.dist.rank != 0:
        return None
    key = (str(ctx.run_dir), ctx.stage)
    if key not in _trackers:
        try:
            _trackers[key] = StageTracker(ctx, settings)
        except OSError as error:  # the chain's tracking file: tracking never fails a stage
            ctx.log(f"warning: tracking off for this stage ({type(error).__name__}: {error})")
            _trackers[key] = None
    return _trackers[key]


def stage_finished(ctx, metrics: dict[str, Any]) -> None:
    """End of a stage (the job entry, rank 0): headline metrics and plots, then the run ends."""
    tracker = stage_tracker(ctx)
    if tracker is not None:
        tracker.finish(metrics, status="FINISHED")


def stage_failed(ctx) -> None:
    tracker = stage_tracker(ctx)
    if tracker is not None:
        tracker.finish({}, status="FAILED")


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"}: parameters as trackers take them."""
    if isinstance(values, dict):
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(values, (list, tuple)):
        values = json.dumps(values, ensure_ascii=False)
    return {prefix[:-1]: values}


class StageTracker:
    """Sends one stage to every configured backend; a backend that fails once is dropped."""

    def __init__(self, ctx, settings) -> None:
        self.ctx = ctx
        self.started = False
        self.ended = False
        chain = _chain_identity(ctx.run_dir, ctx.recipe.name)
        stage_runs_file = Path(ctx.work_dir) / STAGE_FILE
        self.backends: list[_Backend] = []
        if settings.mlflow is not None:
            self.backends.append(_MlflowBackend(settings.mlflow, ctx, chain, stage_runs_file))
        if settings.wandb is not None:
            self.backends.append(_WandbBackend(settings.wandb, ctx, chain, stage_runs_file))

    def _each(self, what: str, call: Callable[[_Backend], None]) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as error:  # noqa: BLE001 - any client error; tracking never fails a stage
                first = (str(error).strip().splitlines() or [""])[0][:300]
                self.ctx.log(
                    f"warning: {backend.name} tracking off for this stage ({what} failed: "
                    f"{type(error).__name__}: {first})"
                )
                self.backends.remove(backend)

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        stage = self.ctx.recipe.stages[self.ctx.stage]
        params = {
            "kind": stage.kind.name,
            **flatten(stage.params_raw, "params."),
            **flatten(stage.resources.model_dump(mode="json"), "resources."),
            "fingerprint": self.ctx.fingerprint,
            "world_size": self.ctx.dist.world_size,
        }
        self._each("start", lambda backend: backend.start(params))

    def log_metrics(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl (its `step` is the x axis)."""
        if not self.started:
            self.start()
        values = {
            key: float(value)
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if values:
            self._each("log_metrics", lambda backend: backend.log_metrics(values, int(record["step"])))

    def finish(self, metrics: dict[str, Any], *, status: str) -> None:
        if self.ended:
            return
        self.ended = True
        if not self.started:
            self.start()
        headline = {
            key: float(value)
            for key, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        plots = self._plots() if status == "FINISHED" else []
        self._each("finish", lambda backend: backend.finish(headline, plots, status))
        self._mark_chain(status)

    def _plots(self) -> list[Path]:
        """The PNGs in the stage's out dir, plus the loss curve of a training stage (drawn here
        from its metrics.jsonl into the work dir)."""
        out = Path(self.ctx.run_dir) / self.ctx.stage / "out"
        plots = sorted(out.glob("*.png"))
        if (out / "metrics.jsonl").is_file():
            try:
                from chla_tools.train_report import plot_stage_loss

                plots.append(
                    plot_stage_loss(
                        out / "metrics.jsonl", Path(self.ctx.work_dir) / "tracking" / "loss.png", title=self.ctx.stage
                    )
                )
            except Exception as error:  # noqa: BLE001 - a plot is not worth a failed stage
                self.ctx.log(f"warning: loss plot for tracking not drawn ({type(error).__name__}: {error})")
        return plots

    def _mark_chain(self, status: str) -> None:
        """The chain's parent run ends when its last stage does (or fails with any)."""
        others = [name for name in self.ctx.recipe.stages if name != self.ctx.stage]
        done = all((self.ctx.run_dir / name / "DONE").is_file() for name in others)
        chain_status = "FAILED" if status == "FAILED" else ("FINISHED" if done else "RUNNING")
        self._each("chain status", lambda backend: backend.chain_status(chain_status))


def _chain_identity(run_dir: Path, recipe_name: str) -> dict[str, Any]:
    """<run dir>/tracking.json, made by the first stage that tracks (the lock: several stages of
    one chain may start at once)."""
    path, lock_path = _chain_files(run_dir)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        chain = read_json(path, None)
        if chain is None:
            chain = {"chain": f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}", "run_dir": str(run_dir)}
            write_json(path, chain)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return chain


def _chain_files(run_dir: Path) -> tuple[Path, Path]:
    """(tracking.json, its lock) in the run directory's own bookkeeping directory."""
    control = RunDir(run_dir).control_dir
    control.mkdir(parents=True, exist_ok=True)
    return control / "tracking.json", control / "tracking.lock"


class _Backend:
    name = "?"

    def __init__(self, ctx, chain: dict[str, Any], stage_runs_file: Path) -> None:
        self.ctx, self.chain, self.stage_runs_file = ctx, chain, stage_runs_file

    def _stage_run_id(self) -> str | None:
        return (read_json(self.stage_runs_file, {}) or {}).get(self.name)

    def _remember_stage_run(self, run_id: str) -> None:
        runs = read_json(self.stage_runs_file, {}) or {}
        runs[self.name] = run_id
        write_json(self.stage_runs_file, runs)

    def start(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, values: dict[str, float], step: int) -> None: ...
    def finish(self, metrics: dict[str, float], plots: list[Path], status: str) -> None: ...
    def chain_status(self, status: str) -> None: ...


class _MlflowBackend(_Backend):
    name = "MLflow"

    def __init__(self, settings, ctx, chain, stage_runs_file) -> None:
        super().__init__(ctx, chain, stage_runs_file)
        self.settings = settings
        self.client: Any = None  # an mlflow.MlflowClient once started (mlflow is imported then)
        self.run_id: str | None = None
        self.parent_id: str | None = None

    def start(self, params: dict[str, Any]) -> None:
        for key, value in _MLFLOW_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=self.settings.tracking_uri)
        experiment = self.client.get_experiment_by_name(self.settings.experiment)
        experiment_id = experiment.experiment_id if experiment else self._create_experiment()
        self.parent_id = self._parent_run(experiment_id)
        self.run_id = self._stage_run_id()
        if self.run_id is None:
            run = self.client.create_run(
                experiment_id,
                run_name=self.ctx.stage,
                tags={"mlflow.parentRunId": self.parent_id, "chla.stage": self.ctx.stage, "chla.kind": params["kind"]},
            )
            self.run_id = run.info.run_id
            self._remember_stage_run(self.run_id)
            # MLflow keeps parameters immutable: log them once, when the run is made.
            items = [Param(key, str(value)[:6000]) for key, value in params.items()]
            for first in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[first : first + 100])
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _create_experiment(self) -> str:
        try:
            return self.client.create_experiment(self.settings.experiment)
        except Exception:  # another stage made it first
            return self.client.get_experiment_by_name(self.settings.experiment).experiment_id

    def _parent_run(self, experiment_id: str) -> str:
        key = f"mlflow_parent_run:{self.settings.tracking_uri}:{experiment_id}"
        path, lock_path = _chain_files(self.ctx.run_dir)
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            chain = read_json(path, {}) or {}
            if key not in chain:
                from mlflow.entities import Param

                run = self.client.create_run(
                    experiment_id,
                    run_name=self.chain["chain"],
                    tags={"chla.chain": self.chain["chain"], "chla.run_dir": str(self.ctx.run_dir)},
                )
                self.client.log_batch(
                    run.info.run_id,
                    params=[
                        Param("recipe", self.ctx.recipe.name),
                        Param("stages", str(len(self.ctx.recipe.stages))),
                        Param("executor", self.ctx.recipe.model.executor),
                    ],
                )
                chain[key] = run.info.run_id
                write_json(path, chain)
            fcntl.flock(lock, fcntl.LOCK_UN)
        return chain[key]

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, stamp, step) for key, value in values.items()])

    def finish(self, metrics: dict[str, float], plots: list[Path], status: str) -> None:
        if metrics:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            self.client.log_batch(
                self.run_id, metrics=[Metric(f"final.{key}", value, stamp, 0) for key, value in metrics.items()]
            )
        for plot in plots:
            self.client.log_artifact(self.run_id, str(plot), artifact_path="plots")
        self.client.set_terminated(self.run_id, status=status)

    def chain_status(self, status: str) -> None:
        if status == "RUNNING":
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            self.client.set_terminated(self.parent_id, status=status)


class _WandbBackend(_Backend):
    name = "W&B"

    def __init__(self, settings, ctx, chain, stage_runs_file) -> None:
        super().__init__(ctx, chain, stage_runs_file)
        self.settings = settings
        self.run: Any = None  # a wandb Run once started (wandb is imported then)

    def start(self, params: dict[str, Any]) -> None:
        import wandb
        from wandb.sdk.lib.runid import generate_id

        run_id = self._stage_run_id() or generate_id()
        self._remember_stage_run(run_id)
        directory = Path(self.settings.dir or self.ctx.work_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.settings.project,
            entity=self.settings.entity,
            group=self.chain["chain"],
            name=self.ctx.stage,
            job_type=params["kind"],
            config=params,
            mode=self.settings.mode,
            dir=str(directory),
            id=run_id,
            resume="allow",
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, metrics: dict[str, float], plots: list[Path], status: str) -> None:
        import wandb

        if plots:
            self.run.log({f"plots/{plot.stem}": wandb.Image(str(plot)) for plot in plots})
        self.run.summary.update({f"final.{key}": value for key, value in metrics.items()})
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def chain_status(self, status: str) -> None:
        pass  # a W&B group has no state of its own
