#!/usr/bin/env bash
# ecviz quick start. Sets up .venv (torch CPU wheel first, then ecviz) and runs one job:
#   ./run.sh demo   trace the shipped EC-DiT checkpoint on the bundled prompts into traces/
#   ./run.sh test   run the test suite
# Needs only Python 3.11. Set TORCH_SPEC to change the torch requirement (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")"

py=python3.11
command -v "$py" >/dev/null || py=python3
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "run.sh: needs Python 3.11 or newer (found: $("$py" --version 2>&1 || echo none))" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
stamp=.venv/.ecviz-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"

case "${1:-}" in
  demo)
    shift
    exec bash scripts/demo.sh "$@"
    ;;
  test)
    shift
    exec bash scripts/test.sh "$@"
    ;;
  *)
    echo "usage: ./run.sh demo|test" >&2
    exit 2
    ;;
esac
