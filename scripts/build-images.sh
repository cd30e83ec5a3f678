#!/usr/bin/env bash
# Build the mlkube images from the repo's Dockerfile:
#   <registry>mlkube/operator:<tag>   (--target operator: '.[operator]', no ray/torch)
#   <registry>mlkube/runtime:<tag>    (--target runtime: '.[serve,train]', CPU torch)
#
# Usage: scripts/build-images.sh [--tag TAG] [--registry REGISTRY/] [--push] [--only operator|runtime]
# Env: DOCKER (default: docker), TAG, REGISTRY, PLATFORM (e.g. linux/amd64).
# Needs a working Docker (or a docker-compatible CLI via DOCKER=podman); exits 1 with a
# message when there is none.
set -euo pipefail

cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
TAG=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)}
REGISTRY=${REGISTRY:-}
PLATFORM=${PLATFORM:-}
PUSH=0
ONLY=""

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) TAG=$2; shift 2 ;;
        --registry) REGISTRY=$2; shift 2 ;;
        --push) PUSH=1; shift ;;
        --only) ONLY=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "build-images: unknown argument: $1" >&2; exit 2 ;;
    esac
done

if ! command -v "$DOCKER" >/dev/null 2>&1; then
    echo "build-images: '$DOCKER' not found: building images needs Docker (or DOCKER=podman)." >&2
    echo "build-images: nothing was built. Install Docker, or build elsewhere (CI) from the Dockerfile." >&2
    exit 1
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
    echo "build-images: '$DOCKER' is installed but its daemon does not answer ('$DOCKER info' fails)." >&2
    echo "build-images: nothing was built." >&2
    exit 1
fi
if [[ -z "$TAG" ]]; then
    echo "build-images: no tag (pyproject.toml has no version?); give --tag" >&2
    exit 2
fi
if [[ -n "$REGISTRY" && "$REGISTRY" != */ ]]; then
    REGISTRY="$REGISTRY/"
fi

targets=(operator runtime)
if [[ -n "$ONLY" ]]; then
    case "$ONLY" in
        operator|runtime) targets=("$ONLY") ;;
        *) echo "build-images: --only takes operator or runtime" >&2; exit 2 ;;
    esac
fi

for target in "${targets[@]}"; do
    image="${REGISTRY}mlkube/${target}:${TAG}"
    echo "build-images: building $image (--target $target)"
    args=(build --target "$target" --tag "$image" --file Dockerfile)
    [[ -n "$PLATFORM" ]] && args+=(--platform "$PLATFORM")
    "$DOCKER" "${args[@]}" .
    if [[ "$PUSH" == 1 ]]; then
        "$DOCKER" push "$image"
    fi
done
echo "build-images: done: ${targets[*]} at tag $TAG"
