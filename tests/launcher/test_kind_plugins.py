"""A stage kind or a tracking backend defined outside chla joins its registry (register(), or an
entry point of an installed distribution) and gets what the built-in ones get, with no edit to
chla_launcher.memory_plan or to either tracking module:

- a training kind defined in this file (its params extend TrainingParams, its StageKind says it
  trains) gets a memory plan from `chla plan`'s code path: in this process through register(),
  and from the real CLI in a subprocess that finds it through a `chla.kinds` entry point of a test
  distribution; its stage gets the trackers the recipe's `tracking:` block selects, started for
  real (a backend defined in this file; in the slow layer MLflow and W&B offline too). Control: the
  same kind declaring no `trains` gets no plan; an unregistered kind or backend is refused.
- the demo's stages fed by an import_gguf stage are planned from the GGUF file's header.

Nothing here trains: the job side's runner of the test kind is never called."""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from chla_launcher.contract import kinds as kinds_registry
from chla_launcher.contract import tracking_settings as tracking_registry
from chla_launcher.contract.errors import RecipeError
from chla_launcher.contract.kinds import InputPath, StageKind, TrainingParams, Trains, register
from chla_launcher.contract.recipe import load_recipe
from chla_launcher.contract.tracking_settings import TrackingBackend, register_tracking_backend
from chla_launcher.memory_plan import plan_recipe, render
from chla_launcher.sizing import ModelShape
from chla_train.tracking import Tracker

from ..helpers import REPO, chla


class DistillParams(TrainingParams):
    """distil a teacher's outputs into the model (a kind defined outside chla, for this test)"""

    corpus: Annotated[str, InputPath()] = Field(description="text to distil on")
    window: int = Field(256, gt=1, description="tokens per training sequence")


def run(ctx) -> None:  # the job side: never called here
    raise AssertionError("the test kind's runner does not run in these tests")


DISTILL = StageKind("distill_test", DistillParams, f"{__name__}:run", trains=Trains(sequence_length="window"))

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 1000,
}


def write_recipe(tmp_path: Path, kind: str, tracking: str = "", **params: Any) -> Path:
    path = tmp_path / f"{kind}.yaml"
    stage_params = {
        "init": TINY,
        "tokenizer": str(tmp_path / "tokenizer"),  # not there: the vocabulary is init's
        "micro_batch_size": 4,
        "zero_stage": 0,
        **params,
    }
    path.write_text(
        textwrap.dedent("""\
        name: plugged
        resources: {cpus_per_task: 2, mem: 16G}
        """)
        + tracking
        + f"stages:\n  distil:\n    kind: {kind}\n    params: {json.dumps(stage_params)}\n"
    )
    return path


@pytest.fixture
def plugins():
    """register() and register_tracking_backend() for one test; the registries as they were after."""
    yield
    kinds_registry._registered.clear()
    kinds_registry.registry.cache_clear()
    tracking_registry._registered.clear()
    tracking_registry.tracking_backends.cache_clear()


def plans(path: Path, tmp_path: Path) -> dict:
    recipe = load_recipe(path, check_inputs=False, cwd=tmp_path)
    return {plan.stage: plan for plan in plan_recipe(recipe)}


def test_a_training_kind_registered_outside_chla_gets_a_memory_plan(tmp_path, plugins):
    unknown = write_recipe(tmp_path, "distill_test", corpus="c.txt", window=64)
    with pytest.raises(RecipeError, match="distill_test"):  # before it is registered: no such kind
        load_recipe(unknown, check_inputs=False, cwd=tmp_path)
    register(DISTILL)
    distil = plans(unknown, tmp_path)["distil"]
    # The plan a built-in training kind gets for the same model, batch and sequence length.
    pretrain = plans(write_recipe(tmp_path, "pretrain", corpus="c.txt", block_size=64), tmp_path)["distil"]
    assert distil.memory is not None and distil.shape == ModelShape.from_config(TINY)
    assert (distil.setup, distil.trainable, distil.trainable_params, distil.memory) == (
        pretrain.setup,
        pretrain.trainable,
        pretrain.trainable_params,
        pretrain.memory,
    )
    assert distil.setup.seq_len == 64 and distil.trainable_params > 0
    # Control: its own sequence length is what it declared (another window, other activations).
    longer = plans(write_recipe(tmp_path, "distill_test", corpus="c.txt", window=128), tmp_path)["distil"]
    assert longer.setup.seq_len == 128 and longer.memory.activations > distil.memory.activations


def test_the_same_kind_declaring_no_training_gets_no_plan(tmp_path, plugins):
    register(replace(DISTILL, trains=None))
    assert plans(write_recipe(tmp_path, "distill_test", corpus="c.txt"), tmp_path) == {}
    register(replace(DISTILL, name="distill_test_2"))  # control: declaring it, in the same process
    assert list(plans(write_recipe(tmp_path, "distill_test_2", corpus="c.txt"), tmp_path)) == ["distil"]


def test_declarations_naming_no_field_are_refused_where_the_kind_is_defined():
    with pytest.raises(TypeError, match="trains names block_size, not a field of DistillParams"):
        StageKind("bad", DistillParams, f"{__name__}:run", trains=Trains(sequence_length="block_size"))
    with pytest.raises(TypeError, match="must extend chla_launcher.contract.kinds.TrainingParams"):
        StageKind("bad", InputOnly, f"{__name__}:run", trains=Trains(sequence_length="window"))


class InputOnly(kinds_registry.StageParams):
    """a kind whose params are not a training kind's"""

    window: int = 8


def test_chla_plan_finds_a_kind_through_an_entry_point(tmp_path):
    """The real CLI in a subprocess: the kind is found through the `chla.kinds` entry point of a
    distribution on the path (what `pip install` of a plugin package gives), not by register()."""
    site = tmp_path / "site"
    dist = site / "chla_kind_plugin_test-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: chla-kind-plugin-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[chla.kinds]\ndistill_test = {__name__}:DISTILL\n")
    recipe = write_recipe(tmp_path, "distill_test", corpus="c.txt", window=64)
    path = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    planned = chla("plan", str(recipe), cwd=tmp_path, env={"PYTHONPATH": path}, check=True).stdout
    row = next(line.split() for line in planned.splitlines() if line.startswith("distil "))
    assert row[1:3] == ["2x64", "V1000"] and row[7] == "4x64" and "fits" in row, planned
    # `chla kinds` lists it with what it declares (it trains; it declares no output), as it lists
    # a built-in kind.
    listed = chla("kinds", cwd=tmp_path, env={"PYTHONPATH": path}, check=True).stdout.splitlines()
    assert next(line for line in listed if line.startswith("distill_test ")).endswith("[trains]"), listed
    assert next(line for line in listed if line.startswith("pretrain ")).endswith("[distributed, trains, model out]")
    # Control: without the distribution on the path, the kind is unknown (one line, exit 2).
    refused = chla("plan", str(recipe), cwd=tmp_path, env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert refused.returncode == 2 and "distill_test" in refused.stderr, refused.stderr


# --- tracking: the backends the recipe selects start for the new kind's stage -----------------


class JsonlSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str


class JsonlTracker(Tracker):
    """A backend's job side defined outside chla: appends what it is told to a file."""

    name = "jsonl"

    def _write(self, **record: Any) -> None:
        with open(self.settings.path, "a") as file:
            file.write(json.dumps({"stage": self.ctx.stage, **record}) + "\n")

    def start(self, params: dict[str, Any]) -> None:
        self._write(event="start", kind=params["kind"])

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self._write(event="metrics", step=step, **values)

    def finish(self, metrics: dict[str, float], plots: list[Path], status: str) -> None:
        self._write(event="finish", status=status)


def track_one_stage(tmp_path: Path, backends: str) -> tuple[Any, Any, Path]:
    """The new kind's stage, tracked as the `tracking:` block with `backends` (YAML lines) and a
    backend registered here (jsonl_test) selects: (its StageTracker after start, one metrics record
    and the end, its context, the jsonl file)."""
    from chla_train import tracking
    from chla_train.context import StageContext

    register(DISTILL)
    jsonl = tmp_path / "tracked.jsonl"
    block = f'tracking:\n{textwrap.indent(backends, "  ")}  jsonl_test: {{path: "{jsonl}"}}\n'
    path = write_recipe(tmp_path, "distill_test", tracking=block, corpus="c.txt")
    with pytest.raises(RecipeError, match="tracking.jsonl_test"):  # not registered yet: unknown key
        load_recipe(path, check_inputs=False, cwd=tmp_path)
    register_tracking_backend(TrackingBackend("jsonl_test", JsonlSettings, f"{__name__}:JsonlTracker"))
    recipe = load_recipe(path, check_inputs=False, cwd=tmp_path)
    ctx = StageContext.standalone(recipe.run_dir, "distil", "distill_test", recipe.stages["distil"].params)
    ctx.recipe = recipe
    tracker = tracking.stage_tracker(ctx)
    assert tracker is not None
    tracker.log_metrics({"step": 3, "loss": 2.5})
    tracking.stage_finished(ctx, {"loss": 2.5})
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == [
        {"stage": "distil", "event": "start", "kind": "distill_test"},
        {"stage": "distil", "event": "metrics", "step": 3, "loss": 2.5},
        {"stage": "distil", "event": "finish", "status": "FINISHED"},
    ]
    return tracker, ctx, jsonl


def test_the_tracking_block_starts_a_registered_backend_for_the_new_kind(tmp_path, plugins):
    from chla_train import tracking

    tracker, ctx, _ = track_one_stage(tmp_path, "")
    assert [backend.name for backend in tracker.backends] == ["jsonl"]
    # Control: the same recipe without a tracking block starts no tracker.
    (tmp_path / "u").mkdir()
    ctx.recipe = load_recipe(write_recipe(tmp_path / "u", "distill_test", corpus="c.txt"), check_inputs=False)
    assert tracking.stage_tracker(replace(ctx, run_dir=tmp_path / "u")) is None


@pytest.mark.slow  # 28 s on this 2-core machine: MLflow makes its sqlite schema, W&B starts its service
def test_real_mlflow_and_wandb_track_the_new_kind(tmp_path, plugins):
    """The built-in backends, real: MLflow (sqlite store; its file store is in maintenance mode and
    refuses new runs) and W&B offline start for the new kind's stage, take its metrics and finish."""
    from mlflow import MlflowClient

    from chla_train import tracking

    backends = textwrap.dedent(f"""\
        mlflow: {{tracking_uri: "sqlite:///{tmp_path}/mlflow.db", experiment: plugged}}
        wandb: {{project: plugged, mode: offline, dir: "{tmp_path}/wandb"}}
        """)
    tracker, ctx, _ = track_one_stage(tmp_path, backends)
    assert [backend.name for backend in tracker.backends] == ["MLflow", "W&B", "jsonl"]  # none failed
    runs = json.loads((ctx.work_dir / tracking.STAGE_FILE).read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(runs["MLflow"])
    assert run.data.tags["chla.kind"] == "distill_test" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(3, 2.5)]
    assert list((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{runs['W&B']}/run-{runs['W&B']}.wandb"))


# --- the demo: stages fed by an import_gguf stage --------------------------------------------

# SmolLM2-135M-Instruct's published config.json: 30 layers of 576, 9 heads (3 for keys and values),
# an MLP of 1536, 49,152 tokens, tied embeddings.
SMOLLM2_135M = {
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def test_the_demo_plan_follows_its_import_gguf_stage(tmp_path):
    """recipes/demo.yaml trains from an import_gguf stage's model. Before its GGUF file is there
    the plan says which file it waits for and how to name an architecture instead; once it is
    there (the fetch_assets stage ran) every training stage is planned from the file's header."""
    from chla_tools.assets import BASE_MODEL_OUTPUT, fetch_base_model

    recipe = load_recipe(REPO / "recipes" / "demo.yaml", check_inputs=False, cwd=tmp_path)
    waiting = {plan.stage: plan for plan in plan_recipe(recipe)}
    assert set(waiting) == {"pt_embeddings", "pt_lora", "sft"}
    assert all(plan.memory is None for plan in waiting.values())  # control: the file is not there
    assert f"{BASE_MODEL_OUTPUT}, not there yet" in waiting["pt_embeddings"].source
    assert "chla plan --arch NAME" in waiting["pt_embeddings"].source

    gguf = recipe.run_dir / "assets" / "out" / BASE_MODEL_OUTPUT
    gguf.parent.mkdir(parents=True)
    gguf.symlink_to(fetch_base_model())
    planned = {plan.stage: plan for plan in plan_recipe(recipe)}
    merged = 49152 + 20000  # the base's tokens + at most one per merge of the bpe stage
    assert planned["pt_embeddings"].shape == ModelShape.from_config({**SMOLLM2_135M, "vocab_size": merged})
    assert planned["pt_lora"].shape == planned["pt_embeddings"].shape
    assert planned["sft"].shape.vocab_size == merged + 1  # + [PAD]
    assert planned["pt_embeddings"].trainable_params == 20000 * 576  # the new rows of the tied matrix
    assert all(plan.verdict == "fits" for plan in planned.values())
    assert f"stage base's model (the header of {gguf})" in planned["pt_embeddings"].source
    rendered = __import__("io").StringIO()
    render(list(planned.values()), rendered)
    assert "30x576 V69152" in rendered.getvalue()
