#!/usr/bin/env bash
# Installs mico_ds and its dependencies into the current Python environment.
#   bash tools/install.sh          # runtime
#   bash tools/install.sh --test   # runtime + test references (open-clip, pycocoevalcap, pytest, ruff)
# torch is installed first and pinned so that no later step pulls another build; DeepSpeed is an
# sdist that imports torch while building, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${PIP[@]}" setuptools wheel
reqs=(-r requirements.txt)
if [[ "${1:-}" == "--test" ]]; then reqs+=(-r requirements-test.txt); fi
"${PIP[@]}" --no-build-isolation "${reqs[@]}" -e .
python - <<'PY'
import torch
assert torch.__version__.startswith("2.14.1"), f"unexpected torch {torch.__version__}"
PY
