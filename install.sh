#!/usr/bin/env bash
# Installs chla into ./.venv: torch first (the CPU wheel pinned in constraints.txt; on a GPU
# cluster install the cluster's torch build into the venv first and this script keeps it), then
# chla with the training stack under constraints.txt so nothing replaces torch.
#   bash install.sh           the launcher and the training stack (what the demo needs)
#   bash install.sh --test    also the test tools and MkDocs, the Debian packages the tests use (Slurm,
#                             munge, MariaDB, OpenSSH; needs root) and transformers 4 beside
#                             the venv's 5 (.venv/transformers4)
set -euo pipefail
cd "$(dirname "$0")"
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: installing $* needs root (apt-get)" >&2
        exit 1
    fi
    if [ -z "${CHLA_APT_UPDATED:-}" ]; then
        apt-get update -q >/dev/null
        export CHLA_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# Each step prints one line; what pip and the build backend say goes to .venv/install.log, whose
# end is shown when a step fails.
log=.venv/install.log
step() {
    local what=$1
    shift
    echo "install.sh: $what"
    if ! "$@" >>"$log" 2>&1; then
        echo "install.sh: failed: $what; the end of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
}

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi
if [ "$with_tests" = 1 ]; then
    bash slurm/localcluster.sh install
    command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || apt_install openssh-server openssh-client
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
: >"$log"
step "pip (latest) in .venv" .venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    step "$(grep '^torch==' constraints.txt) (CPU build)" .venv/bin/python -m pip install -q "$(grep '^torch==' constraints.txt)"
fi
extras="train,remote,gguf,lm-eval"
[ "$with_tests" = 1 ] && extras="$extras,tracking,test,docs"
step "chla (editable) with extras $extras, pinned by constraints.txt" \
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
# llama.cpp's GGUF converter (pinned llama-cpp-python sdist, sha256-checked) into the chla cache,
# so that `export` stages and the demo run without a download.
step "llama.cpp's GGUF converter into the chla cache" \
    .venv/bin/python -c 'from chla_tools.gguf_export import converter_dir; converter_dir()'
if [ "$with_tests" = 1 ]; then
    # transformers 4 for the test that loads chla's folders with both major versions: only the
    # packages that differ, torch and the rest shared with the venv (tests/transformers4-requirements.txt).
    side=.venv/transformers4
    if ! cmp -s tests/transformers4-requirements.txt "$side/requirements.txt"; then
        rm -rf "$side" "$side.tmp"
        step "transformers 4 beside the venv's 5 ($side)" \
            .venv/bin/python -m pip install -q --no-deps --target "$side.tmp" -r tests/transformers4-requirements.txt
        cp tests/transformers4-requirements.txt "$side.tmp/requirements.txt"
        mv "$side.tmp" "$side"
    fi
fi
echo "install.sh: chla installed in $(pwd)/.venv ($(.venv/bin/chla --version))"
