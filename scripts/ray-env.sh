#!/usr/bin/env bash
# Creates the Ray virtualenv the `ray`-marked tests run in: `scripts/ray-env.sh [VENV_DIR]`.
#
# It is separate from the main .venv because the default install must never pull Ray (about 1.4 GB with its
# dependencies and the test extras). It is built once and reused (scripts/venv-cache.sh), e.g. at
# RAY_VENV=~/.cache/chatterbot/venv-ray in CI.
#
# Steps:
#   1. ray[serve] at the version the project's `ray` extra pins, and pyarrow: ray.serve.llm's LLMConfig needs it
#      to import without vLLM, so the tests can validate deploy/ray/serve-llm.yaml against it,
#   2. the project itself, editable, with its test extras and the `ray` extra.
set -euo pipefail

SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")/.."
VENV="${1:-.venv-ray}"  # relative to the repository root
PYTHON="${PYTHON:-python3}"
RAY_VERSION="2.60.0"

NAME="ray-env"
# shellcheck source=scripts/venv-cache.sh
source "$(dirname "$SCRIPT")/venv-cache.sh"

echo "ray-env: building $VENV (ray[serve] $RAY_VERSION, a minute or two)"
PIP=(pip_quiet)
"${PIP[@]}" install --upgrade pip

"${PIP[@]}" install "ray[serve]==$RAY_VERSION" "pyarrow>=17"
"${PIP[@]}" install -e '.[test,ray]'

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as m

import ray

print(f"ray-env: ray {ray.__version__}, fastapi {m.version('fastapi')}, pydantic {m.version('pydantic')}")
EOF
stamp_venv
