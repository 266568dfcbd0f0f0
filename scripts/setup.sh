#!/usr/bin/env bash
# Create .venv and install tunelab with its dependencies. Idempotent: a second run takes a
# second or two. torch is installed first, by exact version, so that no dependency pulls a
# multi-GB CUDA build of it on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TUNELAB_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python

if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  "$VPY" -m pip install --quiet --upgrade pip
  "$VPY" -m pip install --quiet "torch==$TORCH_VERSION"
fi

stamp=.venv/.tunelab-install
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VPY" -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi

# The dashboard's browser test (tests/integration/test_ui_browser.py) drives Debian's chromium
# through Playwright; Playwright's own browser download (`playwright install`) is never used.
if [ ! -x /usr/bin/chromium ]; then
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root="sudo"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$as_root" ] || command -v sudo >/dev/null 2>&1; }; then
    echo "installing chromium with apt-get (for the dashboard's browser test) ..."
    # not fatal: without the browser only the dashboard's browser test fails, with a message
    if ! { $as_root apt-get update -qq &&
           $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
      echo "note: apt-get could not install chromium; tests/integration/test_ui_browser.py" \
           "will fail until it is installed" >&2
    fi
  else
    echo "note: /usr/bin/chromium is missing and cannot be installed here (no apt-get, or not" \
         "root and no sudo): install Chromium, or tests/integration/test_ui_browser.py fails" >&2
  fi
fi
echo "tunelab is installed in .venv ($("$VPY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
