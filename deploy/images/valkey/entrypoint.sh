#!/bin/sh
# As the official valkey image's entrypoint: a valkey-server started without a configuration file that sets
# protected-mode gets `--protected-mode no`, since in a container it serves other containers, not loopback
# (with protected mode on and no password, Valkey refuses every client that is not on 127.0.0.1).
set -eu
if [ "${1:-}" = valkey-server ]; then
    shift
    config=
    if [ -f "${1:-}" ]; then
        config=$1
        shift
    fi
    if [ -n "$config" ] && grep -q '^[[:space:]]*protected-mode' "$config"; then
        set -- "$config" "$@"
    else
        set -- ${config:+"$config"} --protected-mode no "$@"
    fi
    exec valkey-server "$@"
fi
exec "$@"
