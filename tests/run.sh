#!/usr/bin/env bash
# The test command (README and CI): starts the real local Slurm cluster if it is not up, runs the
# whole suite (or the tests named in its arguments) against it, and stops the cluster again if this script started it.
set -euo pipefail
cd "$(dirname "$0")/.."
started=0
if ! bash slurm/localcluster.sh status >/dev/null 2>&1; then
    bash slurm/localcluster.sh start
    started=1
fi
cleanup() { [ "$started" = 1 ] && bash slurm/localcluster.sh stop || true; }
trap cleanup EXIT
# Slurm tests fail (instead of skipping) when the cluster is missing.
export CHLA_REQUIRE_SLURM=1
# Two pytest-xdist workers: much of the suite waits (Slurm scheduling, process start-up), so two
# workers on two cores take about half the time of one. Every test that uses the Slurm cluster
# runs on one worker, in turn (--dist loadgroup; tests/conftest.py puts them in one group), as
# the cluster's two small nodes allow. Two, not `auto`: the Slurm group is the critical path,
# which more workers do not shorten, and each worker holds its own torch and session fixtures.
# Arguments come after, so `-n 0` among them runs the tests in this process, one by one.
# With no path among the arguments pytest runs its testpaths (the whole suite, tests/); with paths,
# only those.
.venv/bin/python -m pytest -q --durations=15 -n 2 --dist loadgroup "$@"
