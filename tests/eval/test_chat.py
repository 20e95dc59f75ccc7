"""`chla chat` through a real pseudo-terminal: prompt, streamed answer, clean exits."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")
torch = pytest.importorskip("torch")

from chla_tools.inference import format_prompt, generate_batch, load_for_inference  # noqa: E402
from chla_tools.merge import merge_adapters  # noqa: E402


def _chat_command() -> list[str]:
    chla = Path(sys.executable).with_name("chla")
    if chla.exists():
        return [str(chla), "chat"]
    return [sys.executable, "-m", "chla_launcher", "chat"]


# The numbers of the system calls a process waiting for terminal input sits in, per architecture
# (Linux's syscall tables: aarch64 uses the generic table, which has no poll or select).
READING_SYSCALLS = {
    "x86_64": {"0", "7", "23", "270", "271"},  # read, poll, select, pselect6, ppoll
    "aarch64": {"63", "72", "73"},  # read, pselect6, ppoll
}


def _wait_until_waiting_for_input(pid: int) -> None:
    """Return once the process's main thread sits in a system call that waits for input. input()
    prints the prompt, then waits in read() (select() with readline); a Ctrl-C arriving in between
    is noted but does not interrupt the wait that starts after it, so input() goes on waiting (a
    person cannot press a key that fast; a test under load can)."""
    reading = READING_SYSCALLS.get(platform.machine())
    if reading is None:  # an architecture whose numbers are not listed: wait as a person would
        time.sleep(2)
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if Path(f"/proc/{pid}/syscall").read_text().split()[0] in reading:
            return
        time.sleep(0.05)
    raise AssertionError(f"chla chat (pid {pid}) never waited for input")


@pytest.fixture(scope="module")
def merged_model(tiny_chain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chat") / "merged"
    merge_adapters(tiny_chain["base"], [tiny_chain["pretrain"], tiny_chain["sft"]], out, log=lambda _m: None)
    return out


def _spawn(args: list[str]):
    command = _chat_command() + args
    env = dict(os.environ, PYTHONUNBUFFERED="1", TERM="dumb")
    return pexpect.spawn(command[0], command[1:], env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))


@pytest.mark.slow
def test_chat_streams_an_answer_and_exits_on_eof(merged_model):
    question = "介绍一下长江"
    max_new = 24
    model, tokenizer = load_for_inference(merged_model, log=lambda _m: None)
    expected = generate_batch(
        model, tokenizer, [format_prompt(question)], max_new_tokens=max_new, repetition_penalty=1.1
    )[0]

    chat = _spawn([str(merged_model), "--temperature", "0", "--max-new-tokens", str(max_new)])
    chat.expect_exact(">>> ")
    chat.sendline(question)
    chat.expect_exact(question)  # the terminal's echo
    # read the answer as it arrives: a streamed answer comes in several pieces
    pieces, received = [], ""
    while ">>> " not in received:
        piece = chat.read_nonblocking(size=4096, timeout=120)
        pieces.append(piece)
        received += piece
    answer = received.split(">>> ")[0]
    assert "".join(answer.split()) == "".join(expected.split()) != ""
    assert len([p for p in pieces if p.strip() and ">>> " not in p]) >= 2, pieces

    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0 and "Traceback" not in (chat.before or "")


@pytest.mark.slow
def test_chat_exits_cleanly_on_ctrl_c_with_adapters_unmerged(tiny_chain):
    chat = _spawn(
        [
            str(tiny_chain["base"]),
            "--adapter",
            str(tiny_chain["pretrain"]),
            "--adapter",
            str(tiny_chain["sft"]),
            "--max-new-tokens",
            "4",
            "--seed",
            "0",
        ]
    )
    chat.expect_exact(">>> ")
    chat.sendline("你好")
    chat.expect_exact(">>> ")  # a sampled answer, then the prompt again
    _wait_until_waiting_for_input(chat.pid)
    chat.sendintr()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0 and "Traceback" not in (chat.before or "")


@pytest.mark.slow
def test_chat_missing_tokenizer_is_one_line(merged_model, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(merged_model, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    chat = _spawn([str(bare)])
    chat.expect(pexpect.EOF)
    chat.close()
    output = chat.before.strip()
    assert chat.exitstatus == 2 and output.startswith("chla: no tokenizer") and "\n" not in output
