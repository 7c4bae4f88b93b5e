#!/usr/bin/env bash
# The test suite, as CI runs it (called by ./run.sh test inside the project's .venv).
set -euo pipefail
ruff check .
exec pytest -q "$@"
