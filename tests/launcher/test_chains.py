"""Chains of `command` stages on the real local Slurm cluster and on the local executor: arrays,
fan-in, afterok dependencies, failure and --resume, two-node rendezvous, shell safety, preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import command_stage, one_command_recipe, python_stage, shell_words, write_recipe
from .conftest import EXECUTORS, chla, finish, status_json, submit, wait_for_chain, wait_until

PY = sys.executable

FAN_IN = {
    "name": "fanin",
    "stages": {
        "prep": python_stage(
            "import os, time; time.sleep(2); open(os.environ['CHLA_OUT_DIR'] + '/seed.txt', 'w').write('seed')"
        ),
        "shard": python_stage(
            "import os; i = os.environ['CHLA_TASK_INDEX']; n = os.environ['CHLA_NUM_TASKS']; seed = open('${stages.prep.out}/seed.txt').read(); open(os.environ['CHLA_OUT_DIR'] + f'/part-{i}.txt', 'w').write(f'{seed}:{i}/{n};')",
            array=4,
        ),
        "side": python_stage("import os; open(os.environ['CHLA_OUT_DIR'] + '/side.txt', 'w').write('side')"),
        "join": python_stage(
            "import glob, os; parts = sorted(glob.glob('${stages.shard.out}/part-*.txt')); open(os.environ['CHLA_OUT_DIR'] + '/all.txt', 'w').write(''.join(open(p).read() for p in parts) + open('${stages.side.out}/side.txt').read())",
            after=["side"],
        ),
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_fan_in_chain_with_array(tmp_path, executor, cluster_if_slurm):
    write_recipe(tmp_path, FAN_IN)
    result = submit(tmp_path, executor)
    run_dir = tmp_path / "runs" / "fanin"
    chain = json.loads((run_dir / "chain.json").read_text())
    if executor == "slurm":
        # Queued up front, children held by afterok on their parents' jobs.
        join = chain["stages"]["join"]["job_ids"][0]
        shown = subprocess.run(["scontrol", "show", "job", join], capture_output=True, text=True).stdout
        shard_final = chain["stages"]["shard"]["finalize_job_id"]
        side = chain["stages"]["side"]["job_ids"][0]
        assert "JobState=PENDING" in shown or "JobState=RUNNING" in shown or "JobState=COMPLETED" in shown
        script = (run_dir / "join" / "logs" / f"{join}_submission.sh").read_text()
        deps = script.split("--dependency=")[1].splitlines()[0].strip("'")
        assert deps.startswith("afterok:") and set(deps[len("afterok:") :].split(":")) == {shard_final, side}
        assert "#SBATCH --kill-on-invalid-dep=yes" in script
        shard_script = (
            run_dir / "shard" / "logs" / f"{chain['stages']['shard']['job_ids'][0]}_submission.sh"
        ).read_text()
        assert "#SBATCH --array=0-3%4" in shard_script
        assert f"afterok:{chain['stages']['prep']['job_ids'][0]}" in shard_script
        assert "queued join" in result.stdout
    rows = finish(tmp_path, executor, "fanin")
    assert {name: row["state"] for name, row in rows.items()} == dict.fromkeys(
        ["prep", "shard", "side", "join"], "COMPLETED"
    )
    assert rows["shard"]["tasks_done"] == 4
    assert (run_dir / "join" / "out" / "all.txt").read_text() == "seed:0/4;seed:1/4;seed:2/4;seed:3/4;side"
    for stage in ("prep", "shard", "side", "join"):
        assert (
            json.loads((run_dir / stage / "DONE").read_text())["fingerprint"] == chain["stages"][stage]["fingerprint"]
        )
    if executor == "slurm":
        ids = [i for rec in chain["stages"].values() for i in rec["job_ids"]]

        def completed_in_sacct() -> bool:  # sacct lags the queue by a few seconds
            acct = subprocess.run(
                ["sacct", "-X", "-P", "-n", "-j", ",".join(ids), "--format=JobID,State"], capture_output=True, text=True
            ).stdout
            return acct.count("COMPLETED") >= 7  # prep, 4 shard tasks, side, join

        wait_until(completed_in_sacct, 60, "sacct to list every job")
    # Resubmitting does nothing: every stage is finished with the same fingerprint.
    again = submit(tmp_path, executor)
    assert "nothing to do" in again.stdout


BROKEN = "import sys; sys.stderr.write('boom: the flux capacitor is missing\\n'); sys.exit(3)"
FIXED = "import os; open(os.environ['CHLA_OUT_DIR'] + '/fixed.txt', 'w').write('ok')"


def failing(broken_script: str) -> dict:
    """A chain whose stage `broken` runs `broken_script`: `downstream` reads its output, `independent`
    does not."""
    return {
        "name": "failing",
        "stages": {
            "first": python_stage("import os; open(os.environ['CHLA_OUT_DIR'] + '/first.txt', 'w').write('1')"),
            "broken": python_stage(broken_script, after=["first"]),
            "downstream": python_stage(
                "import os; open(os.environ['CHLA_OUT_DIR'] + '/d' + os.environ['CHLA_TASK_INDEX'], 'w').write(open('${stages.broken.out}/fixed.txt').read())",
                array=2,
            ),
            "independent": python_stage(
                "import os; open(os.environ['CHLA_OUT_DIR'] + '/ind.txt', 'w').write('i')", after=["first"]
            ),
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_failure_cancels_dependents_and_resume_reruns_only_them(tmp_path, executor, cluster_if_slurm):
    write_recipe(tmp_path, failing(BROKEN))
    submit(tmp_path, executor, check=False)
    run_dir = tmp_path / "runs" / "failing"
    rows = finish(tmp_path, executor, "failing")
    assert rows["first"]["state"] == "COMPLETED"
    assert rows["independent"]["state"] == "COMPLETED"
    assert rows["broken"]["state"] == "FAILED"
    assert rows["downstream"]["state"] == "CANCELLED"  # not left pending forever
    assert any("boom: the flux capacitor is missing" in line for line in rows["broken"]["log_tail"])
    table = chla("status", str(run_dir))
    assert table.returncode == 1
    assert "FAILED" in table.stdout and "boom: the flux capacitor is missing" in table.stdout
    chain_before = json.loads((run_dir / "chain.json").read_text())
    if executor == "slurm":
        broken_job = chain_before["stages"]["broken"]["job_ids"][0]
        assert broken_job in rows["broken"]["job_ids"]
        assert broken_job in rows["broken"]["reason"] and "FAILED" in rows["broken"]["reason"]
        assert broken_job in table.stdout
    untouched = {
        p: p.stat().st_mtime_ns
        for p in [
            run_dir / "first" / "out" / "first.txt",
            run_dir / "independent" / "out" / "ind.txt",
            run_dir / "first" / "DONE",
        ]
    }

    write_recipe(tmp_path, failing(FIXED))
    resumed = chla("submit", "r.yaml", "--resume", str(run_dir), "--executor", executor, cwd=tmp_path, check=True)
    assert "2 stage(s) to run, 2 already finished" in resumed.stdout
    rows = finish(tmp_path, executor, "failing")
    assert all(row["state"] == "COMPLETED" for row in rows.values()), rows
    assert (run_dir / "downstream" / "out" / "d1").read_text() == "ok"
    chain_after = json.loads((run_dir / "chain.json").read_text())
    for stage in ("first", "independent"):
        assert chain_after["stages"][stage]["skipped"] is True
        assert chain_after["stages"][stage].get("job_ids") == chain_before["stages"][stage].get("job_ids")
    if executor == "slurm":
        for stage in ("broken", "downstream"):
            assert chain_after["stages"][stage]["job_ids"] != chain_before["stages"][stage]["job_ids"]
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched


TWO_NODES = {
    "name": "twonodes",
    "stages": {
        "allreduce": python_stage(
            "import json, os, socket, torch, torch.distributed as dist; dist.init_process_group('gloo'); t = torch.tensor([float(os.environ['RANK']) + 1.0]); dist.all_reduce(t); json.dump(dict(rank=dist.get_rank(), world=dist.get_world_size(), env_rank=os.environ['RANK'], world_env=os.environ['WORLD_SIZE'], master=os.environ['MASTER_ADDR'], port=os.environ['MASTER_PORT'], node=os.environ.get('SLURMD_NODENAME', 'local'), total=t.item()), open(os.environ['CHLA_OUT_DIR'] + '/rank' + os.environ['RANK'] + '.json', 'w')); dist.destroy_process_group()",
            resources={"nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "mem": "2G"},
        )
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_two_node_stage_all_reduce(tmp_path, executor, cluster_if_slurm):
    write_recipe(tmp_path, TWO_NODES)
    submit(tmp_path, executor)
    rows = finish(tmp_path, executor, "twonodes")
    assert rows["allreduce"]["state"] == "COMPLETED", rows
    out = tmp_path / "runs" / "twonodes" / "allreduce" / "out"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["world_env"] == "2" for r in ranks)
    assert all(r["total"] == 3.0 for r in ranks)  # 1 + 2
    assert ranks[0]["port"] == ranks[1]["port"] and ranks[0]["master"] == ranks[1]["master"]
    if executor == "slurm":
        assert [r["node"] for r in ranks] == ["node1", "node2"]
        assert ranks[0]["master"] == "node1"
        job_id = json.loads((tmp_path / "runs" / "twonodes" / "chain.json").read_text())["stages"]["allreduce"][
            "job_ids"
        ][0]
        from chla_launcher.contract.ports import master_port

        assert int(ranks[0]["port"]) == master_port(int(job_id), 0)


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_shell_metacharacters_arrive_intact(tmp_path, executor, cluster_if_slurm):
    pwn, values = shell_words(tmp_path, ["$${{HOME}}"])  # $$: a literal $ in a recipe
    script = (
        "import json, os, sys; json.dump({'argv': sys.argv[1:], 'env': os.environ['NASTY']}, "
        "open(os.environ['CHLA_OUT_DIR'] + '/seen.json', 'w'))"
    )
    recipe = one_command_recipe("nasty", script, values, {"NASTY": values[1] + values[0]})
    recipe["slurm"] = {"sbatch": {"comment": f"$(touch {pwn}/comment); `touch {pwn}/c2`"}}
    write_recipe(tmp_path, recipe)
    submit(tmp_path, executor, "--set", f"stages.echo.params.env.EXTRA=$(touch {pwn}/set)")
    rows = finish(tmp_path, executor, "nasty")
    assert rows["echo"]["state"] == "COMPLETED", rows
    seen = json.loads((tmp_path / "runs" / "nasty" / "echo" / "out" / "seen.json").read_text())
    assert seen["argv"] == [v.replace("$${", "${") for v in values]  # $${...} is a literal ${...}
    assert seen["env"] == values[1] + values[0]
    assert list(pwn.iterdir()) == []


PREEMPTIBLE = {
    "name": "preempt",
    "resources": {"time": "00:20:00"},
    "stages": {
        "long": python_stage(
            "import os, time; w = os.environ['CHLA_WORK_DIR']; f = open(w + '/attempts', 'a'); f.write(str(os.getppid()) + '\\n'); f.close(); n = len(open(w + '/attempts').read().split()); time.sleep(120 if n == 1 else 0); open(os.environ['CHLA_OUT_DIR'] + '/result.txt', 'w').write(f'finished on attempt {n}')"
        ),
        "after_long": python_stage(
            "import os; open(os.environ['CHLA_OUT_DIR'] + '/x', 'w').write(open('${stages.long.out}/result.txt').read())"
        ),
    },
}


def preempt_on_slurm(job_id: str) -> str:
    """Preempt a running job as a cluster does: a job in the higher-priority partition `urgent` that
    needs every CPU of the job's node (slurm/localcluster.sh: PreemptMode=REQUEUE, GraceTime)."""
    node = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True, text=True, check=True
    ).stdout.strip()
    cpus = subprocess.run(
        ["sinfo", "-h", "-n", node, "-o", "%c"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    return subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "urgent",
            "-w",
            node,
            "-N1",
            "-n1",
            "-c",
            cpus,
            "--mem=100M",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def sacct_runs(job_id: str) -> list[str]:
    """Partition|State of every run of a job, oldest first (sacct -D: one row per requeue)."""
    out = subprocess.run(
        ["sacct", "-X", "-D", "-P", "-n", "-j", job_id, "--format=Partition,State"], capture_output=True, text=True
    ).stdout
    return out.split()


def _check_requeued_once(run_dir: Path, attempts: Path) -> None:
    rows = status_json(run_dir)
    assert rows["long"]["state"] == "COMPLETED" and rows["after_long"]["state"] == "COMPLETED", rows
    assert rows["long"]["restarts"] == 1
    assert (run_dir / "long" / "out" / "result.txt").read_text() == "finished on attempt 2"
    assert (run_dir / "after_long" / "out" / "x").read_text() == "finished on attempt 2"
    assert len(attempts.read_text().split()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_preempted_stage_is_requeued_and_chain_completes(tmp_path, executor, cluster_if_slurm):
    """A stage that does not checkpoint, preempted the way Slurm does it (SIGTERM to its processes,
    here by a job of a higher-priority partition), stops, is requeued and runs again from the start."""
    write_recipe(tmp_path, PREEMPTIBLE)
    run_dir = tmp_path / "runs" / "preempt"
    attempts = run_dir / "long" / "work" / "attempts"
    if executor == "local":
        process = subprocess.Popen(
            [PY, "-m", "chla_launcher", "submit", "r.yaml", "--executor", "local"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        entry_pid = int(wait_until(lambda: attempts.exists() and attempts.read_text().split(), 60, "first attempt")[0])
        os.kill(entry_pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
        assert "requeued" in output
    else:
        submit(tmp_path, executor)
        job_id = json.loads((run_dir / "chain.json").read_text())["stages"]["long"]["job_ids"][0]
        wait_until(lambda: attempts.exists() and attempts.read_text().split(), 60, "first attempt")
        urgent = preempt_on_slurm(job_id)
        wait_for_chain(run_dir, timeout=180)
        wait_until(lambda: sacct_runs(job_id)[-1:] == ["debug|COMPLETED"], 60, "sacct to record the end")
        assert sacct_runs(job_id) == ["debug|REQUEUED", "debug|COMPLETED"]  # requeued by the job itself
        assert sacct_runs(urgent) == ["urgent|COMPLETED"]
        log = "".join(p.read_text() for p in (run_dir / "long" / "logs").glob(f"{job_id}_*.out"))
        assert "stopped by SIGTERM" in log and f"preempted: job {job_id} requeued" in log, log
    _check_requeued_once(run_dir, attempts)


@pytest.mark.slurm
def test_time_limit_warning_requeues_on_slurm(tmp_path, slurm_cluster):
    """USR2, which Slurm sends before the time limit (sbatch --signal, set by submitit), still
    requeues through submitit's handler (sent here with scancel --signal, as the limit would)."""
    write_recipe(tmp_path, PREEMPTIBLE)
    run_dir = tmp_path / "runs" / "preempt"
    attempts = run_dir / "long" / "work" / "attempts"
    submit(tmp_path, "slurm")
    job_id = json.loads((run_dir / "chain.json").read_text())["stages"]["long"]["job_ids"][0]
    wait_until(lambda: attempts.exists() and attempts.read_text().split(), 60, "first attempt")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for_chain(run_dir, timeout=180)
    wait_until(lambda: sacct_runs(job_id)[-1:] == ["debug|COMPLETED"], 60, "sacct to record the end")
    assert sacct_runs(job_id) == ["debug|REQUEUED", "debug|COMPLETED"]
    _check_requeued_once(run_dir, attempts)


ARRAY_SPLIT = {
    "name": "split",
    "slurm": {"array_chunk": 2},
    "stages": {
        "many": python_stage(
            "import os; open(os.environ['CHLA_OUT_DIR'] + '/t' + os.environ['CHLA_TASK_INDEX'], 'w').write('x')",
            array=5,
        ),
        "after_many": python_stage(
            "import os; n = len(os.listdir('${stages.many.out}')); open(os.environ['CHLA_OUT_DIR'] + '/n', 'w').write(str(n))"
        ),
    },
}


@pytest.mark.slurm
def test_array_larger_than_chunk_is_split(tmp_path, slurm_cluster):
    write_recipe(tmp_path, ARRAY_SPLIT)
    submit(tmp_path, "slurm")
    run_dir = tmp_path / "runs" / "split"
    chain = json.loads((run_dir / "chain.json").read_text())
    assert len(chain["stages"]["many"]["job_ids"]) == 3  # 2 + 2 + 1 tasks
    rows = wait_for_chain(run_dir)
    assert rows["many"]["state"] == "COMPLETED" and rows["many"]["tasks_done"] == 5
    assert (run_dir / "after_many" / "out" / "n").read_text() == "5"


SLEEPY = {
    "name": "sleepy",
    "stages": {
        "nap": python_stage("import time; print('napping', flush=True); time.sleep(300)"),
        "after_nap": command_stage("echo", "${stages.nap.out}", array=3),
    },
}


@pytest.mark.slurm
def test_logs_and_cancel_whole_chain_on_slurm(tmp_path, slurm_cluster):
    write_recipe(tmp_path, SLEEPY)
    submit(tmp_path, "slurm")
    run_dir = tmp_path / "runs" / "sleepy"
    wait_until(lambda: status_json(run_dir)["nap"]["state"] == "RUNNING", 60, "nap to start")
    wait_until(lambda: "napping" in chla("logs", str(run_dir), "nap").stdout, 30, "the log line")
    result = chla("cancel", str(run_dir), check=True)
    assert "cancelled" in result.stdout
    rows = wait_for_chain(run_dir, timeout=60)
    assert rows["nap"]["state"] == "CANCELLED" and rows["after_nap"]["state"] == "CANCELLED"
    assert not (run_dir / "nap" / "DONE").exists()


@pytest.mark.slow
def test_cancel_local_run(tmp_path):
    write_recipe(tmp_path, SLEEPY)
    process = subprocess.Popen(
        [PY, "-m", "chla_launcher", "submit", "r.yaml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir = tmp_path / "runs" / "sleepy"
    wait_until(
        lambda: (
            (run_dir / "nap" / "logs" / "local_0_0.log").exists()
            and "napping" in (run_dir / "nap" / "logs" / "local_0_0.log").read_text()
        ),
        60,
        "nap to start",
    )
    assert "napping" in chla("logs", str(run_dir), "nap", check=True).stdout
    chla("cancel", str(run_dir), check=True)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1, output
    rows = status_json(run_dir)
    assert rows["nap"]["state"] == "CANCELLED" and rows["after_nap"]["state"] == "CANCELLED"
    assert not (run_dir / "nap" / "DONE").exists()
