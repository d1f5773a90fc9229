#!/usr/bin/env bash
# Install everything ssdd needs into .venv (idempotent). Sourced by scripts/quickstart.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[install] creating .venv"
    "$PYTHON" -m venv .venv
fi
# Torch first: the CPU build 2.13.0 where no torch is installed yet (a CUDA torch you installed is kept).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "[install] installing torch==2.13.0 (CPU build)"
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
echo "[install] installing ssdd and its test tools"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"

# Fashion-MNIST comes from Debian's package; it is optional (transfer evaluation) and needs root.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[install] installing Debian package dataset-fashion-mnist"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
            || echo "[install] could not install dataset-fashion-mnist; fashion-mnist will be unavailable"
    else
        echo "[install] skipping dataset-fashion-mnist (needs root and apt-get); fashion-mnist will be unavailable"
    fi
fi

# The data root: $SSDD_DATA_ROOT, else the project's offline datasets when they sit beside the checkout. It is
# recorded in .venv/ssdd-data-root, which ssdd reads whenever SSDD_DATA_ROOT is unset (activated or not).
if [ -z "${SSDD_DATA_ROOT:-}" ] && [ -d ../shared/data ]; then
    SSDD_DATA_ROOT=../shared/data
fi
if [ -n "${SSDD_DATA_ROOT:-}" ]; then
    SSDD_DATA_ROOT="$(.venv/bin/python -c 'import os, sys; print(os.path.abspath(os.path.expanduser(sys.argv[1])))' \
        "$SSDD_DATA_ROOT")"
    export SSDD_DATA_ROOT
    printf '%s\n' "$SSDD_DATA_ROOT" > .venv/ssdd-data-root
    echo "[install] data root $SSDD_DATA_ROOT, recorded in .venv/ssdd-data-root for .venv/bin/ssdd; for another" \
        "python add: export SSDD_DATA_ROOT=$(printf '%q' "$SSDD_DATA_ROOT")"
fi
