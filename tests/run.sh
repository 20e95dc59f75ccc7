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
# Three pytest-xdist workers on this machine kind's two cores: much of the suite waits (Slurm
# scheduling, preemption grace times, process start-up). Every test that uses the Slurm cluster
# runs on one worker, in turn (--dist loadgroup; tests/conftest.py puts them in one group), as the
# cluster's two small nodes allow; the shrunk demo's local run has a group of its own on another
# worker. Each worker holds its own torch and session fixtures. Measured through .ci/run from a
# fresh clone with every cache cold, alone on a 2-core AVX2 EPYC: 604 tests in 20 min 59 s, twice,
# with three workers; with four workers an earlier suite took 28 min 39 s against 26 min 56 s (more
# CPU in contention than they fill in waits): the suite's time is its work.
# Arguments come after, so `-n 0` among them runs the tests in this process, one by one.
# With no path among the arguments pytest runs its testpaths (the whole suite, tests/); with paths,
# only those.
.venv/bin/python -m pytest -q --durations=15 -n 3 --dist loadgroup "$@"
