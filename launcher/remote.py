"""Remote submission over SSH: run chla on a cluster's login node from a laptop.

    chla-submit --remote [user@]host[:port][:dir] RECIPE
    chla status|logs|cancel --remote [user@]host[:port][:dir] RUN_DIR ...

`dir` is the working directory on the login node (default `chla-remote`, relative paths are under
the remote home; `~/x` means the same as `x`). The recipe is uploaded to `<dir>/recipes/<file name>`
and chla runs there with `<dir>` as its working directory, so relative paths in the recipe and the
default run directory `runs/<name>` are under `<dir>`. RUN_DIR for status/logs/cancel is taken
relative to `<dir>` too. A `host:port` whose part after the colon is all digits is a port; anything
else after the first colon is the directory (`host:22:/scratch/me/chla`, `host:/scratch/me/chla`).
IPv6 addresses go in brackets: `[::1]:2222:dir`.

Host keys are checked against ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts (or only the files
given with --known-hosts) and an unknown or changed key is refused. Fabric's own default accepts
any key silently (paramiko's AutoAddPolicy); we replace it with RejectPolicy after building the
Connection.

Every remote command is built by `shell_line` from argv lists with shlex: no string from a recipe,
a --set value or a path reaches the remote shell unquoted. The remote login shell must be a POSIX
shell (sh, bash, zsh), which is what shlex quotes for.

Only the standard library is imported at module level; Fabric and paramiko are imported when a
connection is opened, so `chla --help` stays light.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shlex
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .contract.errors import ChlaError

DEFAULT_DIR = "chla-remote"
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")
CONNECT_TIMEOUT_S = 20
# What a code snapshot holds: enough for `pip install <snapshot>` to build the `chla` distribution.
SNAPSHOT_ITEMS = ("pyproject.toml", "README.md", "constraints.txt", "launcher", "tools", "chla_train")
REMOTE_FORMAT = "[user@]host[:port][:dir]"


@dataclass(frozen=True)
class RemoteTarget:
    """Where to run: an SSH destination and the working directory on it."""

    host: str
    user: str | None = None
    port: int | None = None
    dir: str = DEFAULT_DIR

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        return f"{user}{host}{port}:{self.dir}"


@dataclass
class RemoteOptions:
    target: RemoteTarget
    known_hosts: list[str] = field(default_factory=list)  # empty: the default files
    identity: str | None = None
    chla_argv: list[str] = field(default_factory=lambda: ["chla"])
    chla_given: bool = False
    snapshot: bool = False


def parse_remote(spec: str) -> RemoteTarget:
    """`[user@]host[:port][:dir]` -> RemoteTarget. See the module docstring for the rules."""

    def bad(why: str) -> ChlaError:
        return ChlaError(
            f"--remote {spec!r}: {why}; the format is {REMOTE_FORMAT}, e.g. me@login.cluster:2222:/scratch/me/chla"
        )

    rest = spec.strip()
    if not rest:
        raise bad("empty")
    user = None
    at = rest.find("@")
    # `user@` only counts before the host: an '@' after the first ':' belongs to the directory.
    if 0 <= at < min(i for i in (rest.find(":"), rest.find("["), len(rest)) if i >= 0):
        user, rest = rest[:at], rest[at + 1 :]
        if not user:
            raise bad("empty user name before '@'")
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise bad("unclosed '[' in the host")
        host, remainder = rest[1:close], rest[close + 1 :]
        if remainder and not remainder.startswith(":"):
            raise bad("expected ':' after ']'")
    else:
        host, _, tail = rest.partition(":")
        remainder = f":{tail}" if _ else ""
    if not host or any(c.isspace() or c in "/@" for c in host):
        raise bad(f"bad host name {host!r}")
    port = None
    directory = DEFAULT_DIR
    if remainder:
        first, sep, after = remainder[1:].partition(":")
        if first.isdigit():
            port = int(first)
            if not 0 < port < 65536:
                raise bad(f"port {port} out of range")
            directory = after if sep and after else DEFAULT_DIR
        elif remainder[1:]:
            directory = remainder[1:]
    directory = _home_relative(directory, bad)
    return RemoteTarget(host=host, user=user, port=port, dir=directory)


def _home_relative(directory: str, bad: Callable[[str], ChlaError]) -> str:
    # Quoted paths never see tilde expansion, and the SSH session starts in the home directory,
    # so `~/x` is simply `x`.
    if directory in ("~", "~/"):
        return "."
    if directory.startswith("~/"):
        return directory[2:]
    if directory.startswith("~"):
        raise bad("'~user' directories are not supported; give an absolute path")
    if "\x00" in directory or "\n" in directory:
        raise bad("the directory may not contain NUL or newline characters")
    return directory


def shell_line(*argvs: Sequence[str]) -> str:
    """The one place that builds a remote shell command: each argv list is shlex-quoted word by word
    and the lists are chained with `&&`. Nothing else is ever put into a remote command."""
    return " && ".join(shlex.join([str(word) for word in argv]) for argv in argvs)


def add_remote_arguments(parser: argparse.ArgumentParser, *, snapshot: bool = False) -> None:
    group = parser.add_argument_group("remote (run chla on a login node over SSH)")
    group.add_argument(
        "--remote",
        metavar="[USER@]HOST[:PORT][:DIR]",
        help="run this command on HOST over SSH, in DIR (default ~/chla-remote); host keys must be in known_hosts",
    )
    group.add_argument(
        "--known-hosts",
        action="append",
        default=[],
        metavar="FILE",
        help="check the host key against FILE only (repeatable; default "
        "~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts)",
    )
    group.add_argument(
        "--identity",
        "-i",
        metavar="KEY_FILE",
        help="SSH private key to log in with (default: ssh-agent, ~/.ssh/config, ~/.ssh/id_*)",
    )
    group.add_argument(
        "--remote-chla",
        metavar="CMD",
        help="the chla command on the remote side (default `chla`, or DIR/venv/bin/chla "
        "with --snapshot), e.g. /shared/venvs/chla/bin/chla; relative paths are "
        "relative to DIR",
    )
    if snapshot:
        group.add_argument(
            "--snapshot",
            action="store_true",
            help="copy this checkout's code (pyproject, launcher/, tools/, chla_train/) to "
            "DIR/snapshots/ and pip-install it into DIR/venv before submitting",
        )


def options_from_args(args: argparse.Namespace) -> RemoteOptions | None:
    """The remote options of a parsed command line, or None when --remote was not given."""
    snapshot = bool(getattr(args, "snapshot", False))
    if not args.remote:
        given = [
            flag
            for flag, value in (
                ("--known-hosts", args.known_hosts),
                ("--identity", args.identity),
                ("--remote-chla", args.remote_chla),
                ("--snapshot", snapshot),
            )
            if value
        ]
        if given:
            raise ChlaError(f"{', '.join(given)} only make sense with --remote [user@]host[:port][:dir]")
        return None
    target = parse_remote(args.remote)
    if args.remote_chla is not None:
        chla_argv = shlex.split(args.remote_chla)
        if not chla_argv:
            raise ChlaError(
                "--remote-chla is empty; give the chla command on the remote side, e.g. /shared/venvs/chla/bin/chla"
            )
    else:
        # chla runs with DIR as its working directory, so the snapshot's venv is ./venv there.
        chla_argv = ["./venv/bin/chla"] if snapshot else ["chla"]
    return RemoteOptions(
        target=target,
        known_hosts=list(args.known_hosts),
        identity=args.identity,
        chla_argv=chla_argv,
        chla_given=args.remote_chla is not None,
        snapshot=snapshot,
    )


# --------------------------------------------------------------------------------------------
# Connecting


def known_hosts_files(explicit: Sequence[str]) -> list[Path]:
    if explicit:
        files = [Path(p).expanduser() for p in explicit]
        for path in files:
            if not path.exists() or path.is_dir():
                raise ChlaError(f"--known-hosts {path}: no such file")
        return files
    return [p for p in (Path(d).expanduser() for d in DEFAULT_KNOWN_HOSTS) if p.is_file()]


def connect(options: RemoteOptions) -> Any:
    """An open fabric.Connection whose host key was found in known_hosts (else ChlaError)."""

    import paramiko
    from fabric import Connection

    target = options.target
    connect_kwargs: dict[str, Any] = {}
    if options.identity:
        if not Path(options.identity).expanduser().is_file():
            raise ChlaError(f"--identity {options.identity}: no such key file")
        connect_kwargs["key_filename"] = [str(Path(options.identity).expanduser())]
    connection = Connection(
        target.host,
        user=target.user,
        port=target.port,
        connect_timeout=CONNECT_TIMEOUT_S,
        connect_kwargs=connect_kwargs,
    )
    files = known_hosts_files(options.known_hosts)
    hop = connection
    while isinstance(hop, Connection):  # the target, then any ProxyJump hosts from ~/.ssh/config
        for path in files:
            try:
                # "System" host keys are only read, never written back: nothing here edits known_hosts.
                hop.client.load_system_host_keys(str(path))
            except (OSError, paramiko.SSHException) as error:
                raise ChlaError(f"known_hosts file {path}: cannot read it ({_one_line(error)})") from None
        # Fabric sets AutoAddPolicy in Connection.__init__, which trusts any host on first sight.
        hop.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        hop = hop.gateway

    where = f"{connection.host}:{connection.port}"
    searched = ", ".join(str(p) for p in files) or "no known_hosts file exists"
    try:
        connection.open()
    except paramiko.BadHostKeyException:
        raise ChlaError(
            f"host key for {where} does NOT match the one in known_hosts ({searched}): refusing to connect "
            f"(possible man-in-the-middle); if the key changed legitimately, remove the old entry with "
            f"ssh-keygen -R '[{connection.host}]:{connection.port}' and check the new fingerprint"
        ) from None
    except paramiko.AuthenticationException as error:
        raise ChlaError(
            f"SSH login to {connection.user}@{where} failed ({error}); give a key with "
            f"--identity KEY_FILE or load it into ssh-agent"
        ) from None
    except paramiko.SSHException as error:
        if "not found in known_hosts" in str(error):
            raise ChlaError(
                f"unknown host key for {where}: not in {searched}; refusing to connect. Log in once with "
                f"OpenSSH (ssh -p {connection.port} {connection.host}) and check the fingerprint it shows, "
                f"or pass --known-hosts FILE"
            ) from None
        raise ChlaError(f"SSH connection to {where} failed: {_one_line(error)}") from None
    except (TimeoutError, OSError, EOFError) as error:
        raise ChlaError(f"cannot reach {where}: {_one_line(error)}") from None
    return connection


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _run(connection: Any, line: str, *, hide: bool = False) -> int:
    """Run a shell line built by shell_line, streaming its output here; its exit status."""
    result = connection.run(line, warn=True, hide=hide, pty=False, in_stream=False, encoding="utf-8")
    return int(result.exited)


def _run_checked(connection: Any, line: str, what: str) -> None:
    result = connection.run(line, warn=True, hide=True, pty=False, in_stream=False, encoding="utf-8")
    if result.exited != 0:
        detail = " ".join((result.stderr or result.stdout).split()) or f"exit status {result.exited}"
        raise ChlaError(f"remote {what} failed on {connection.host}: {detail[-300:]}")


def _upload(connection: Any, local: Path, remote: str) -> None:
    """Upload to a temporary name and rename, so a half-copied file never has the final name."""
    partial = f"{remote}.partial-{os.getpid()}"
    connection.put(str(local), remote=partial)
    connection.sftp().posix_rename(partial, remote)


# --------------------------------------------------------------------------------------------
# Commands


def remote_submit(options: RemoteOptions, recipe: str | None, forwarded: list[str]) -> int:
    """Upload RECIPE to <dir>/recipes/, then run `chla submit <uploaded recipe> FORWARDED...` in <dir>.
    FORWARDED are the submit flags (--set, --executor, --dry-run, ...), passed on word for word."""
    local_recipe = None
    if recipe is not None:
        local_recipe = Path(recipe)
        if not local_recipe.is_file():
            raise ChlaError(f"{recipe}: recipe file not found (it is uploaded from this machine)")
    snapshot = build_snapshot() if options.snapshot else None
    target = options.target
    connection = connect(options)
    try:
        _run_checked(
            connection, shell_line(["mkdir", "-p", "--", f"{target.dir}/recipes"]), f"mkdir {target.dir}/recipes"
        )
        argv = [*options.chla_argv, "submit"]
        if local_recipe is not None:
            uploaded = f"recipes/{local_recipe.name}"
            _upload(connection, local_recipe, f"{target.dir}/{uploaded}")
            print(f"chla: uploaded {local_recipe} to {target.host}:{target.dir}/{uploaded}", flush=True)
            argv.append(uploaded)
        if snapshot is not None:
            install_snapshot(connection, options, *snapshot)
        return _run(connection, shell_line(["cd", target.dir], [*argv, *forwarded]))
    finally:
        connection.close()


def remote_chla(options: RemoteOptions, argv: list[str]) -> int:
    """Run `chla ARGV...` in <dir> on the remote side (status, logs, cancel), streaming its output."""
    connection = connect(options)
    try:
        return _run(connection, shell_line(["cd", options.target.dir], [*options.chla_argv, *argv]))
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------
# Code snapshot


def source_root() -> Path:
    """The checkout chla runs from (editable install), which is what a snapshot copies."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "launcher").is_dir():
        raise ChlaError(
            "--snapshot needs chla installed from a source checkout (pip install -e .); "
            f"{root} has no pyproject.toml; install chla on the login node instead and "
            "pass --remote-chla"
        )
    return root


def build_snapshot() -> tuple[str, bytes]:
    """A gzipped tarball of this checkout's working tree (including uncommitted changes: what you
    run here is what runs there), named by the hash of its contents."""
    root = source_root()
    buffer = io.BytesIO()

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = PurePosixPath(info.name)
        if "__pycache__" in name.parts or name.suffix in (".pyc", ".pyo"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0  # same code, same tarball, same snapshot name
        return info

    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for item in SNAPSHOT_ITEMS:
            path = root / item
            if path.exists():
                tar.add(str(path), arcname=item, filter=keep, recursive=True)
    data = buffer.getvalue()
    return f"chla-{hashlib.sha256(data).hexdigest()[:12]}", data


def install_snapshot(connection: Any, options: RemoteOptions, name: str, data: bytes) -> None:
    """Copy the snapshot to <dir>/snapshots/NAME/ and `pip install` it into <dir>/venv (created with
    the remote python3 if missing, with system site packages so a cluster-provided torch is seen).
    pip installs the launcher's light dependencies if the venv lacks them; the training stack
    (chla[train]) must already be in that venv or in the system site packages for training stages."""
    target = options.target
    snapshots = f"{target.dir}/snapshots"
    archive, unpacked, venv = f"{snapshots}/{name}.tar.gz", f"{snapshots}/{name}", f"{target.dir}/venv"
    _run_checked(connection, shell_line(["mkdir", "-p", "--", unpacked]), f"mkdir {unpacked}")
    partial = f"{archive}.partial-{os.getpid()}"
    connection.put(io.BytesIO(data), remote=partial)
    sftp = connection.sftp()
    sftp.posix_rename(partial, archive)
    print(f"chla: copied code snapshot {name} ({len(data) // 1024} KiB) to {target.host}:{archive}", flush=True)
    _run_checked(connection, shell_line(["tar", "-xzf", archive, "-C", unpacked]), f"unpacking {archive}")
    venv_exists = _run(connection, shell_line(["test", "-x", f"{venv}/bin/python"]), hide=True) == 0
    if not venv_exists:
        print(f"chla: creating {target.host}:{venv}", flush=True)
        _run_checked(
            connection, shell_line(["python3", "-m", "venv", "--system-site-packages", venv]), f"python3 -m venv {venv}"
        )
    print(f"chla: pip install {name} into {target.host}:{venv}", flush=True)
    code = _run(
        connection,
        shell_line(
            [
                f"{venv}/bin/python",
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-c",
                f"{unpacked}/constraints.txt",
                f"./{unpacked}" if not unpacked.startswith("/") else unpacked,
            ]
        ),
    )
    if code != 0:
        raise ChlaError(
            f"pip install of the code snapshot into {target.host}:{venv} failed (exit {code}); see pip's output above"
        )
    if options.chla_given:
        print(
            f"chla: note: --remote-chla {shlex.join(options.chla_argv)} is used, not {venv}/bin/chla",
            file=sys.stderr,
            flush=True,
        )
