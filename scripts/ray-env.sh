#!/usr/bin/env bash
# Creates the Ray virtualenv the `ray`-marked tests run in: `scripts/ray-env.sh [VENV_DIR]`.
#
# It is separate from the main .venv because the default install must never pull Ray (about 500 MB with its
# dependencies). It is built once and reused: a stamp file in the venv holds a hash of this script,
# pyproject.toml and the checkout's path, and a venv whose stamp matches is left as it is. The venv may live
# outside the checkout (e.g. RAY_VENV=~/.cache/chatterbot/venv-ray in CI, to keep it between runs): a checkout
# at another path re-points the editable install, which takes seconds.
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

STAMP="$VENV/.ray-env-stamp"
HASH="$( (cat "$SCRIPT" pyproject.toml; pwd) | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" && -x "$VENV/bin/python" ]]; then
    echo "ray-env: $VENV is up to date"
    exit 0
fi

echo "ray-env: building $VENV (ray[serve] $RAY_VERSION, a minute or two)"
rm -f "$STAMP"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# pip warns once per package about the machine's index folders that lack it; only that noise is dropped.
pip_quiet() {
    "$VENV/bin/python" -m pip --quiet "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
PIP=(pip_quiet)
"${PIP[@]}" install --upgrade pip

"${PIP[@]}" install "ray[serve]==$RAY_VERSION" "pyarrow>=17"
"${PIP[@]}" install -e '.[test,ray]'

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as m

import ray

print(f"ray-env: ray {ray.__version__}, fastapi {m.version('fastapi')}, pydantic {m.version('pydantic')}")
EOF
echo "$HASH" >"$STAMP"
