# Sourced by scripts/vllm-env.sh and scripts/ray-env.sh: the cached virtualenv one group of tests runs in.
#
# The caller sets SCRIPT (its own path), VENV, NAME and PYTHON and has changed to the repository root. A stamp
# file in the venv holds a hash of the caller, this file, pyproject.toml and the checkout's path: when it
# matches, the venv is left as it is and the caller exits here. Otherwise the venv is created if missing and
# `pip_quiet` is defined; the caller installs into it and then runs `stamp_venv`. The venv may live outside
# the checkout (in CI under ~/.cache/chatterbot, to keep it between runs): a checkout at another path only
# re-points the editable install, which takes seconds.

STAMP="$VENV/.$NAME-stamp"
HASH="$( (cat "$SCRIPT" "${BASH_SOURCE[0]}" pyproject.toml; pwd) | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" && -x "$VENV/bin/python" ]]; then
    echo "$NAME: $VENV is up to date"
    exit 0
fi
rm -f "$STAMP"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"

# pip warns once per package about the machine's index folders that lack it; only that noise is dropped.
pip_quiet() {
    "$VENV/bin/python" -m pip --quiet "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}

stamp_venv() {
    echo "$HASH" >"$STAMP"
}
