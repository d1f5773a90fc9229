#!/usr/bin/env bash
# Set up ssdd in .venv, lint it with ruff ([tool.ruff] in pyproject.toml) and run the whole default test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/install.sh"
echo "[test] ruff check ssdd tests benchmarks"
.venv/bin/ruff check ssdd tests benchmarks
.venv/bin/python -m pytest -q "$@"
