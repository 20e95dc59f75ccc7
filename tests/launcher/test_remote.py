"""Remote submission over SSH against a real sshd on localhost (started here with throwaway keys):
submit, status, logs and cancel on the local Slurm cluster; unknown and changed host keys refused;
shell metacharacters in recipe values and --set values arrive intact and run nothing."""

from __future__ import annotations

import getpass
import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from chla_launcher.contract.errors import ChlaError
from chla_launcher.remote import RemoteTarget, parse_remote, shell_line

from ..helpers import one_command_recipe, shell_words
from .conftest import chla, status_json, wait_for_chain
from .test_chains import SLEEPY

PY = sys.executable
REMOTE_CHLA = Path(sys.executable).parent / "chla"  # the same venv's console script, run by sshd
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class Sshd:
    port: int
    client_key: Path
    known_hosts: Path
    dir: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "chla-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_suffix(".pub").read_text().strip()


def _wait_for_banner(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 15
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sshd did not answer on port {port}: {log.read_text()}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Sshd:
    if not Path(SSHD).is_file() or shutil.which("ssh-keygen") is None:
        pytest.skip("openssh-server is not installed (apt-get install openssh-server)")
    if not REMOTE_CHLA.is_file():
        pytest.skip(f"{REMOTE_CHLA} is missing (pip install -e .)")
    base = tmp_path_factory.mktemp("sshd")
    host_pub = _keygen(base / "host_ed25519")
    client_pub = _keygen(base / "client_ed25519")
    (base / "authorized_keys").write_text(client_pub + "\n")
    port = _free_port()
    config = base / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {base}/host_ed25519
AuthorizedKeysFile {base}/authorized_keys
PidFile {base}/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel VERBOSE
# For the --snapshot test: pip on the "login node" must not reach an index (there may be no network)
# nor build in an isolated env (which would download setuptools); see test_remote_snapshot.
SetEnv PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=0
""")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    log = base / "sshd.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [SSHD, "-D", "-e", "-p", str(port), "-f", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_banner(port, process, log)
        key_type, key = host_pub.split()[:2]
        known_hosts = base / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key}\n")
        yield Sshd(port=port, client_key=base / "client_ed25519", known_hosts=known_hosts, dir=base)
    finally:
        process.terminate()  # the sshd started above, by its pid
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def remote_args(sshd: Sshd, remote_dir: Path, known_hosts: Path | None = None) -> list[str]:
    return [
        "--remote",
        f"{getpass.getuser()}@127.0.0.1:{sshd.port}:{remote_dir}",
        "--known-hosts",
        str(known_hosts or sshd.known_hosts),
        "--identity",
        str(sshd.client_key),
        "--remote-chla",
        str(REMOTE_CHLA),
    ]


# --------------------------------------------------------------------------------------------
# Without a server


def test_parse_remote_format():
    assert parse_remote("login") == RemoteTarget(host="login")
    assert parse_remote("me@login:2222:/scratch/me/x") == RemoteTarget("login", "me", 2222, "/scratch/me/x")
    assert parse_remote("me@login:work/chla") == RemoteTarget("login", "me", None, "work/chla")
    assert parse_remote("login:~/work") == RemoteTarget("login", None, None, "work")
    assert parse_remote("login:/data:v2@x") == RemoteTarget("login", None, None, "/data:v2@x")
    assert parse_remote("me@[::1]:22") == RemoteTarget("::1", "me", 22, "chla-remote")
    for bad in ["", "@login", "login:70000", "[::1", "log in", "login:~bob/x"]:
        with pytest.raises(ChlaError, match=r"\[user@\]host\[:port\]\[:dir\]"):
            parse_remote(bad)


# And the words ssh's quoting must keep.
MORE_WORDS = ["${{HOME}}", "\\", "-x", ""]


def test_shell_line_round_trips_every_word(tmp_path):
    pwn, words = shell_words(tmp_path, MORE_WORDS)
    line = shell_line(["cd", str(tmp_path)], [PY, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *words])
    assert shlex.split(line.split(" && ", 1)[1]) == [
        PY,
        "-c",
        "import json, sys; print(json.dumps(sys.argv[1:]))",
        *words,
    ]
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == words
    assert list(pwn.iterdir()) == []


def test_help_imports_no_ssh_stack():
    probe = (
        "import sys\nfrom chla_launcher.cli import main\ntry:\n    main(['submit', '--help'])\n"
        "except SystemExit:\n    pass\nprint(sorted(m for m in ('fabric', 'paramiko', 'invoke') if m in sys.modules))"
    )
    result = subprocess.run([PY, "-c", probe], capture_output=True, text=True, check=True)
    assert "--remote" in result.stdout and result.stdout.strip().endswith("[]")


def test_remote_flags_need_remote(tmp_path):
    result = chla("status", "runs/x", "--known-hosts", "/dev/null", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "only make sense with --remote" in result.stderr


# --------------------------------------------------------------------------------------------
# Against the real sshd


def test_unknown_host_key_is_refused(sshd, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    remote_dir = tmp_path / "remote"
    (tmp_path / "r.yaml").write_text("name: never\nstages: {}\n")
    result = chla("submit", "r.yaml", *remote_args(sshd, remote_dir, known_hosts=empty), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("chla: unknown host key for 127.0.0.1:") and "refusing" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not remote_dir.exists()  # nothing ran on the far side (not even mkdir)

    # A known_hosts entry with a different key: a changed key is refused too.
    other = _keygen(tmp_path / "impostor").split()
    changed = tmp_path / "changed_known_hosts"
    changed.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    result = chla("status", "runs/never", *remote_args(sshd, remote_dir, known_hosts=changed), cwd=tmp_path)
    assert result.returncode == 2
    assert "does NOT match" in result.stderr and result.stderr.count("\n") == 1
    assert not remote_dir.exists()


def _yaml_double_quoted(value: str) -> str:
    """A YAML double-quoted scalar holding `value` with its newlines as real line breaks (a blank
    line is one newline), so the --set word itself carries raw newlines over SSH."""
    text = '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\n\n") + '"'
    assert yaml.safe_load(text) == value
    return text


@pytest.mark.slurm
def test_remote_submit_status_logs_with_nasty_values(sshd, slurm_cluster, tmp_path):
    remote_dir = tmp_path / "remote dir; $(touch x)"  # the directory name itself needs quoting
    pwn, values = shell_words(tmp_path, MORE_WORDS)
    script = (
        "import json, os, sys; print('hello from the remote stage'); "
        "json.dump({'argv': sys.argv[1:], 'env': os.environ['NASTY'], 'extra': os.environ['EXTRA'], "
        "'plain': os.environ['PLAIN']}, open(os.environ['CHLA_OUT_DIR'] + '/seen.json', 'w'))"
    )
    literal = [v.replace("${", "$${") for v in values]  # $${...} is a literal ${...} in a recipe
    recipe = one_command_recipe("remote-nasty", script, literal, {"NASTY": values[1] + values[0]})
    local_recipe = tmp_path / "it's a recipe; $(touch pwned-name).yaml"
    local_recipe.write_text(json.dumps(recipe))  # JSON is YAML
    extra = f'`touch {pwn}/set1` $(touch {pwn}/set2); it\'s "x"\n| touch {pwn}/set3 &'
    result = chla(
        "submit",
        local_recipe.name,
        "--executor",
        "slurm",
        "--set",
        f"stages.echo.params.env.EXTRA={_yaml_double_quoted(extra)}",
        "--set",
        f"stages.echo.params.env.PLAIN=$(touch {pwn}/set4)",
        *remote_args(sshd, remote_dir),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "uploaded" in result.stdout and "queued echo" in result.stdout  # the remote chla's own output
    assert (remote_dir / "recipes" / local_recipe.name).read_text() == local_recipe.read_text()

    run_dir = remote_dir / "runs" / "remote-nasty"
    rows = wait_for_chain(run_dir, timeout=120)
    assert rows["echo"]["state"] == "COMPLETED", rows
    seen = json.loads((run_dir / "echo" / "out" / "seen.json").read_text())
    assert seen == {"argv": values, "env": values[1] + values[0], "extra": extra, "plain": f"$(touch {pwn}/set4)"}
    assert list(pwn.iterdir()) == []
    assert not (remote_dir / "x").exists() and not (remote_dir / "pwned-name").exists()

    status = chla("status", "runs/remote-nasty", *remote_args(sshd, remote_dir), cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "echo" in status.stdout and "COMPLETED" in status.stdout
    as_json = chla("status", "runs/remote-nasty", "--json", *remote_args(sshd, remote_dir), cwd=tmp_path)
    assert [(row["stage"], row["state"]) for row in json.loads(as_json.stdout)] == [("echo", "COMPLETED")]
    logs = chla("logs", "runs/remote-nasty", "echo", *remote_args(sshd, remote_dir), cwd=tmp_path)
    assert logs.returncode == 0 and "hello from the remote stage" in logs.stdout
    # The remote chla's errors come back with its exit status.
    missing = chla("status", "runs/no-such-run", *remote_args(sshd, remote_dir), cwd=tmp_path)
    assert missing.returncode == 2 and "not a chla run directory" in missing.stderr


@pytest.mark.slurm
def test_remote_cancel(sshd, slurm_cluster, tmp_path):
    remote_dir = tmp_path / "remote"
    (tmp_path / "sleepy.yaml").write_text(json.dumps(SLEEPY))  # JSON is YAML
    submitted = chla("submit", "sleepy.yaml", "--executor", "slurm", *remote_args(sshd, remote_dir), cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_dir = remote_dir / "runs" / "sleepy"
    # Queued (sacct may not know the jobs yet for a moment: UNKNOWN).
    assert {row["state"] for row in status_json(run_dir).values()} <= {"PENDING", "RUNNING", "UNKNOWN"}
    cancelled = chla("cancel", "runs/sleepy", *remote_args(sshd, remote_dir), cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    chain = json.loads((run_dir / "chain.json").read_text())["stages"]
    # Every job of the chain, including those sacct does not list yet this soon after submission.
    assert cancelled.stdout.startswith("cancelled ")
    for stage in ("nap", "after_nap"):
        assert chain[stage]["job_ids"][0] in cancelled.stdout
    rows = wait_for_chain(run_dir, timeout=60)
    assert {name: row["state"] for name, row in rows.items()} == {"nap": "CANCELLED", "after_nap": "CANCELLED"}
    status = chla("status", "runs/sleepy", *remote_args(sshd, remote_dir), cwd=tmp_path)
    assert status.returncode == 1 and "CANCELLED" in status.stdout


@pytest.mark.slow
def test_remote_snapshot_installs_this_checkout(sshd, tmp_path):
    """--snapshot copies the working tree's code and pip-installs it into DIR/venv, whose chla then
    runs the submission (local executor here: the point is the code path, not Slurm)."""
    remote_dir = tmp_path / "remote"
    venv = remote_dir / "venv"
    # A login-node venv that already has chla's dependencies (and setuptools to build it) but not
    # chla: this venv sees the test venv's site-packages through a .pth line, not its editable chla.
    subprocess.run([getattr(sys, "_base_executable", PY), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    test_site = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "pydantic").is_dir())
    (site / "test_venv_deps.pth").write_text(f"{test_site}\n")
    (tmp_path / "r.yaml").write_text(f"""\
name: snap
stages:
  where:
    kind: command
    params:
      argv: [{PY}, -c, "print('ran')"]
""")
    args = [a for a in remote_args(sshd, remote_dir) if a not in ("--remote-chla", str(REMOTE_CHLA))]
    result = chla("submit", "r.yaml", "--executor", "local", "--snapshot", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "copied code snapshot chla-" in result.stdout and "1 stage(s) to run" in result.stdout
    snapshot = next((remote_dir / "snapshots").glob("chla-*/launcher/remote.py"))
    assert snapshot.read_text() == (Path(__file__).parents[2] / "launcher" / "remote.py").read_text()
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import chla_launcher; print(chla_launcher.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert installed.startswith(str(site))  # the snapshot, not the test venv's editable checkout
    assert (remote_dir / "runs" / "snap" / "where" / "DONE").is_file()
