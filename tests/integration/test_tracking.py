"""Experiment tracking of a real chain: a real `mlflow server` on localhost and W&B in offline mode.

A tiny recipe (pre-tokenize, then a small pretraining stage) runs on the local executor with a
`tracking:` block. Read back through MLflow's REST API: one parent run for the chain, a nested run
per stage, the training stage's parameters, its loss curve step by step (equal to its
metrics.jsonl) and its loss plot as an artifact. The W&B offline run directory of the training
stage holds the same loss values at the same steps. The credentials in the environment appear in
no file of the run directory. A tracking server that does not answer costs one warning line and
the stage completes."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ..helpers import TINY_LLAMA, chla

pytestmark = pytest.mark.slow

SECRETS = {
    "WANDB_API_KEY": "wandb-sentinel-0123456789abcdef0123456789abcdef01234567",
    "MLFLOW_TRACKING_TOKEN": "mlflow-sentinel-token-8c1d",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-sentinel-pw-42",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


def rest(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    full = f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def recipe(tmp_path: Path, demo_assets, tracking: str) -> Path:
    english = Path(demo_assets["en_text"]).read_text(encoding="utf-8").splitlines()[:300]
    (tmp_path / "en.txt").write_text("\n".join(english) + "\n", encoding="utf-8")
    path = tmp_path / "tracked.yaml"
    path.write_text(
        f"""\
name: tracked
resources: {{cpus_per_task: 2}}
tracking:
{tracking}
stages:
  tokens:
    kind: pretokenize
    params: {{tokenizer: {demo_assets["base_tokenizer"]}, inputs: [en.txt], block_size: 64}}
  train:
    kind: pretrain
    params:
      mode: full
      init: {json.dumps(TINY_LLAMA)}
      tokenizer: {demo_assets["base_tokenizer"]}
      corpus: ${{stages.tokens.out}}
      block_size: 64
      micro_batch_size: 4
      max_steps: 6
      logging_steps: 1
      eval_steps: 3
      valid_count: 4
      save_steps: 0
      zero_stage: 0
""",
        encoding="utf-8",
    )
    return path


def wandb_history(run_file: Path) -> dict[int, dict]:
    """The history rows of a W&B transaction log (.wandb): a LevelDB-style log of protobuf
    Records, 32 KiB blocks, 7-byte record headers (crc, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    rows: dict[int, dict] = {}
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # block trailer: padding
            position += 32768 - position % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += payload
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


def test_a_tracked_chain_in_mlflow_and_wandb(mlflow_server, demo_assets, tmp_path):
    tracking = (
        f"  mlflow: {{tracking_uri: '{mlflow_server}', experiment: chla-test}}\n"
        "  wandb: {project: chla-test, mode: offline}"
    )
    path = recipe(tmp_path, demo_assets, tracking)
    run_dir = tmp_path / "run"
    result = chla(
        "submit",
        str(path),
        "--run-dir",
        str(run_dir),
        cwd=tmp_path,
        timeout=600,
        env={**SECRETS, "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (run_dir / "train" / "logs" / "local_0_0.log").read_text()
    assert "tracking off" not in log, log

    metrics = [json.loads(line) for line in (run_dir / "train" / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]

    experiment = rest(mlflow_server, "experiments/get-by-name", experiment_name="chla-test")["experiment"]
    runs = rest(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 50})[
        "runs"
    ]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    parents = [run for run, tag in zip(runs, tags) if "chla.chain" in tag]
    assert len(parents) == 1
    parent_id = parents[0]["info"]["run_id"]
    children = {
        tag["mlflow.runName"]: run for run, tag in zip(runs, tags) if tag.get("mlflow.parentRunId") == parent_id
    }
    assert set(children) == {"tokens", "train"}
    assert parents[0]["info"]["status"] == "FINISHED"
    train = children["train"]
    assert train["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in train["data"]["params"]}
    assert params["kind"] == "pretrain" and params["params.max_steps"] == "6"
    assert params["params.learning_rate"] == "0.0002" and params["params.init.hidden_size"] == "16"

    history = rest(mlflow_server, "metrics/get-history", run_id=train["info"]["run_id"], metric_key="loss")["metrics"]
    assert {h["step"]: h["value"] for h in history} == pytest.approx(losses)
    evals = rest(mlflow_server, "metrics/get-history", run_id=train["info"]["run_id"], metric_key="eval_loss")[
        "metrics"
    ]
    assert sorted(h["step"] for h in evals) == [0, 3, 6]
    files = rest(mlflow_server, "artifacts/list", run_id=train["info"]["run_id"], path="plots")["files"]
    assert [f["path"] for f in files] == ["plots/loss.png"]
    artifact = f"{mlflow_server}/get-artifact?" + urllib.parse.urlencode(
        {"path": "plots/loss.png", "run_uuid": train["info"]["run_id"]}
    )
    with urllib.request.urlopen(artifact, timeout=30) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"

    # W&B offline: the training stage's run holds the same loss at the same steps
    run_files = list((run_dir / "train" / "work" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = wandb_history(run_files[0])
    assert {step: row["loss"] for step, row in rows.items() if "loss" in row} == pytest.approx(losses)

    # no credential from the environment in any file of the run directory
    for file in (p for p in run_dir.rglob("*") if p.is_file()):
        content = file.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in content, (name, file)


def test_a_tracking_server_that_does_not_answer_costs_one_warning(demo_assets, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    path = recipe(tmp_path, demo_assets, f"  mlflow: {{tracking_uri: '{dead}'}}")
    result = chla(
        "submit",
        str(path),
        "--run-dir",
        str(tmp_path / "run"),
        "--only",
        "tokens",
        cwd=tmp_path,
        timeout=300,
        env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "tokens" / "logs" / "local_0_0.log").read_text()
    warnings = [line for line in log.splitlines() if "tracking off" in line]
    assert len(warnings) == 1 and "MLflow" in warnings[0], log
    assert (tmp_path / "run" / "tokens" / "DONE").is_file()
