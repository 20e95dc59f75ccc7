"""A stop signal (preemption, cancellation) that reaches a task while it still loads its code (the
seconds of importing torch, when a scheduler's signal often lands) stops the task as its runner
is about to start. Before, the handler took any stop outside the runner for one after it and only
noted it: the stage then ran to its end (a cancelled 120 s command ran its 120 s)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from chla_launcher.contract.executors.local_job import LocalJobEnvironment
from chla_train.context import Preempted, StageContext
from chla_train.preemption import StopSignals


@pytest.fixture
def stop_signals(tmp_path):
    """StopSignals of a fresh one-rank task, installed; the process's own handlers restored after."""
    previous = {signum: signal.getsignal(signum) for signum in LocalJobEnvironment.stop_signals}
    made = []

    def make() -> StopSignals:
        ctx = StageContext.standalone(tmp_path / str(len(made)), "s", "command", params=None)
        stop = StopSignals(ctx, LocalJobEnvironment())
        stop.install()
        made.append(stop)
        return stop

    yield make
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_a_stop_while_the_task_loads_stops_it_when_its_runner_starts(stop_signals):
    stop = stop_signals()
    os.kill(os.getpid(), signal.SIGTERM)  # the task is still loading its code
    assert stop.ctx.stop_signal == "SIGTERM"  # noted, nothing interrupted yet
    with pytest.raises(Preempted, match="SIGTERM"):
        stop.runner_starts()


def test_without_an_early_stop_the_runner_starts_and_a_later_stop_interrupts_it(stop_signals):
    """The control: no stop before, the runner starts; a stop while it runs interrupts it there."""
    stop = stop_signals()
    stop.runner_starts()
    assert stop.ctx.stop_signal is None
    with pytest.raises(Preempted, match="SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once
