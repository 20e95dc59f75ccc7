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
# With no path among the arguments pytest runs its testpaths (the whole suite, tests/); with paths,
# only those.
.venv/bin/python -m pytest -q --durations=15 "$@"
