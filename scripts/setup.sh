#!/usr/bin/env bash
# Create .venv with Python 3.12 and install blinaprofile with its locked dependencies (uv.lock).
# Idempotent: a second run only checks the environment. Needs PyPI access; nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local cand
  for cand in "${BLINAPROFILE_PYTHON:-}" python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 \
              /root/.pyenv/versions/3.12*/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local v; v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12' | tail -n1 || true)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3.12"; return 0; fi
  fi
  return 1
}

PY=$(find_python) || { echo "setup: Python 3.12 not found (set BLINAPROFILE_PYTHON=/path/to/python3.12)" >&2; exit 1; }
export UV_PYTHON_DOWNLOADS=never
if [ ! -x .tools/bin/uv ]; then
  echo "setup: bootstrapping uv into .tools/ with $PY" >&2
  "$PY" -m venv .tools
  .tools/bin/python -m pip install --quiet "uv==0.13.9"
fi
.tools/bin/uv sync --frozen --compile-bytecode --python "$PY" --quiet
echo "setup: environment ready in .venv ($(.venv/bin/python --version))" >&2
