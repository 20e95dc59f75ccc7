"""Which GPU each rank uses. This machine has no GPU: the device choice is tested as the pure
function it is (of the devices the task sees, its local rank and the tasks per node; what
torch.cuda.device_count() would say is an argument), and the local executor's placement through a
real local run whose ranks report the CUDA_VISIBLE_DEVICES they were given (the machine's GPUs
named by CUDA_VISIBLE_DEVICES in the submitting environment, as CUDA itself reads them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chla_launcher.contract.errors import ChlaError
from chla_launcher.executors.local import visible_gpus
from chla_train.distributed import cuda_device_index

from ..helpers import chla, python_stage, write_recipe


@pytest.mark.parametrize(
    "device_count, local_rank, tasks_per_node, visible, expected",
    [
        (8, 3, 8, None, 3),  # the task sees the node's 8 GPUs: the one at its local rank
        (1, 3, 8, "5", 0),  # --gpu-bind=single:1: the one GPU it sees is its own
        (1, 0, 1, None, 0),  # one task, one GPU
        (4, 1, 2, "0,1,2,3", 1),
    ],
)
def test_device_is_chosen_from_what_the_task_sees(device_count, local_rank, tasks_per_node, visible, expected):
    assert cuda_device_index(device_count, local_rank, tasks_per_node, visible) == expected


@pytest.mark.parametrize(
    "device_count, local_rank, tasks_per_node, visible",
    [
        (4, 5, 8, None),  # 8 tasks on a 4-GPU node
        (1, 1, 2, None),  # 2 tasks, one GPU, nothing binds: both would use it
        (2, 2, 4, "0,1"),
    ],
)
def test_more_ranks_than_gpus_is_one_line_naming_both(device_count, local_rank, tasks_per_node, visible):
    with pytest.raises(ChlaError) as error:
        cuda_device_index(device_count, local_rank, tasks_per_node, visible)
    text = str(error.value)
    assert "\n" not in text
    assert f"{tasks_per_node} task(s) per node (resources.tasks_per_node)" in text
    assert f"sees {device_count} GPU(s)" in text


def test_visible_gpus(tmp_path):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1, 2"}) == ["0", "1", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,-1,2"}) == ["3"]  # CUDA stops at an invalid id
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    for name in ("nvidia0", "nvidia1", "nvidia10", "nvidia2", "nvidiactl", "nvidia-uvm", "nvidia-modeset"):
        (tmp_path / name).touch()
    assert visible_gpus({}, dev=tmp_path) == ["0", "1", "2", "10"]
    assert visible_gpus({}, dev=tmp_path / "none") == []


# Each rank reports its CUDA_VISIBLE_DEVICES and the physical GPU its device choice lands on.
REPORT = (
    "import json, os; from chla_train.distributed import local_cuda_device; "
    "vis = os.environ['CUDA_VISIBLE_DEVICES'].split(','); "
    "json.dump(dict(visible=vis, physical=vis[local_cuda_device(len(vis))]), "
    "open(os.environ['CHLA_OUT_DIR'] + '/rank' + os.environ['RANK'] + '.json', 'w'))"
)


def recipe(tmp_path: Path, nodes: int, tasks_per_node: int) -> None:
    resources = {"nodes": nodes, "tasks_per_node": tasks_per_node, "gpus_per_node": tasks_per_node}
    write_recipe(tmp_path, {"name": "gpus", "stages": {"ranks": python_stage(REPORT, resources=resources)}})


def test_local_executor_gives_each_rank_its_own_gpu(tmp_path):
    """A 2 x 2 stage on a machine with 4 GPUs (CUDA_VISIBLE_DEVICES=4,5,6,7): four ranks, four
    different GPUs (each rank on a node choosing by its local rank put two on each of 4 and 5)."""
    recipe(tmp_path, nodes=2, tasks_per_node=2)
    result = chla("submit", "r.yaml", "--executor", "local", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "runs" / "gpus" / "ranks" / "out"
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]
    assert sorted(rank["physical"] for rank in ranks) == ["4", "5", "6", "7"], ranks
    assert all(len(rank["visible"]) == 1 for rank in ranks), ranks


def test_local_executor_refuses_more_ranks_than_gpus(tmp_path):
    recipe(tmp_path, nodes=2, tasks_per_node=2)
    result = chla("submit", "r.yaml", "--executor", "local", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "4 ranks need a GPU each" in errors[0] and "has 2 (0,1)" in errors[0], errors
    assert not (tmp_path / "runs" / "gpus" / "ranks" / "out").exists()
