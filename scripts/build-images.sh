#!/usr/bin/env bash
# Build the mlkube images from the repo's Dockerfile:
#   mlkube/operator:<tag>      (--target operator: '.[operator]', no ray/torch/prefect)
#   mlkube/runtime:<tag>       (--target runtime: '.[serve,train,mlflow-server]', no torch)
#   mlkube/runtime-full:<tag>  (--target runtime-full: runtime + CPU torch; only with --only)
#
# Usage: scripts/build-images.sh [--tag TAG] [--registry REGISTRY/] [--push]
#                                [--only operator|runtime|runtime-full] [--print-archives]
#
# Default (no DOCKER): buildah, no daemon needed; installs buildah, skopeo and debootstrap
# with apt when missing (needs root). The base is Debian bookworm's python3, debootstrapped
# once into ~/.cache/mlkube/images/base-bookworm-<N>/; buildah's storage (layer cache) is
# ~/.cache/mlkube/containers. Each image is left as a docker-archive tarball for
# `ctr -n k8s.io images import`:
#   ~/.cache/mlkube/images/<name>-<tag>-<inputs hash>.tar   (image docker.io/mlkube/<name>:<tag>)
# listed in ~/.cache/mlkube/images/current.json. An unchanged tree returns at once.
# --print-archives: builds what is missing, then prints "<name> <archive path>" lines on stdout
# (everything else goes to stderr).
#
# DOCKER=docker (or podman): `docker build` from python:3.11-slim-bookworm instead, no archives.
# Env: DOCKER, TAG, REGISTRY, PLATFORM (docker only), DEBIAN_MIRROR, TORCH_INDEX_URL
# (runtime-full), MLKUBE_K8S_CACHE (the cache root, default ~/.cache/mlkube).
set -euo pipefail

cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-}
TAG=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)}
REGISTRY=${REGISTRY:-}
PLATFORM=${PLATFORM:-}
# The project's cache root, shared with tests/cluster (which reads images/current.json).
CACHE=${MLKUBE_K8S_CACHE:-$HOME/.cache/mlkube}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Bump when the base recipe below changes: a new version is a new base, cache and archives.
BASE_VERSION=1
BASE_DIR="$CACHE/images/base-bookworm-$BASE_VERSION"
BASE_IMAGE="localhost/mlkube/python:3.11-bookworm-$BASE_VERSION"
IMAGES="$CACHE/images"
PUSH=0
ONLY=""
PRINT=0
START=$SECONDS

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) TAG=$2; shift 2 ;;
        --registry) REGISTRY=$2; shift 2 ;;
        --push) PUSH=1; shift ;;
        --only) ONLY=$2; shift 2 ;;
        --print-archives) PRINT=1; shift ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
        *) echo "build-images: unknown argument: $1" >&2; exit 2 ;;
    esac
done

log() { printf 'build-images: [%3ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() { echo "build-images: $*" >&2; exit 1; }

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
        operator|runtime|runtime-full) targets=("$ONLY") ;;
        *) echo "build-images: --only takes operator, runtime or runtime-full" >&2; exit 2 ;;
    esac
fi
build_args=()
[[ -n "${TORCH_INDEX_URL:-}" ]] && build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")

# ----------------------------------------------------------------------------- Docker
if [[ -n "$DOCKER" ]]; then
    [[ "$PRINT" == 1 ]] && die "--print-archives needs the buildah build (unset DOCKER)"
    command -v "$DOCKER" >/dev/null 2>&1 || die "'$DOCKER' not found; unset DOCKER to build with buildah"
    "$DOCKER" info >/dev/null 2>&1 || die "'$DOCKER' is installed but its daemon does not answer ('$DOCKER info' fails)"
    for target in "${targets[@]}"; do
        image="${REGISTRY}mlkube/${target}:${TAG}"
        log "building $image (--target $target)"
        args=(build --target "$target" --tag "$image" --file Dockerfile "${build_args[@]}")
        [[ -n "$PLATFORM" ]] && args+=(--platform "$PLATFORM")
        "$DOCKER" "${args[@]}" .
        if [[ "$PUSH" == 1 ]]; then
            "$DOCKER" push "$image"
        fi
    done
    log "done: ${targets[*]} at tag $TAG"
    exit 0
fi

# ----------------------------------------------------------------------------- buildah
[[ "$(id -u)" == 0 ]] || die "the buildah build runs as root (overlay storage, debootstrap, apt); or use DOCKER=docker"

# The inputs of the images, as the Dockerfile sees them (.dockerignore lets in only these);
# an archive's name carries their hash, so an unchanged tree finds its archives made.
TREE_HASH=$(
    {
        echo "base $BASE_IMAGE tag $TAG registry $REGISTRY"
        find Dockerfile .dockerignore pyproject.toml README.md mlkube -type f \
            ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-12
)
archive_of() {
    local hash=$TREE_HASH
    if [[ "$1" == runtime-full ]]; then
        hash=$(echo "$TREE_HASH torch ${TORCH_INDEX_URL:-}" | sha256sum | cut -c1-12)
    fi
    echo "$IMAGES/$1-$TAG-$hash.tar"
}

# Lists every image whose archive matches the tree as it is now.
write_manifest() {
    local target sep=""
    {
        printf '{\n  "tag": "%s",\n  "inputs": "%s",\n  "images": {' "$TAG" "$TREE_HASH"
        for target in operator runtime runtime-full; do
            [[ -s "$(archive_of "$target")" ]] || continue
            printf '%s\n    "%s": {"image": "%s", "archive": "%s", "bytes": %s}' "$sep" "$target" \
                "$(ref_of "$target")" "$(archive_of "$target")" "$(stat -c %s "$(archive_of "$target")")"
            sep=","
        done
        printf '\n  }\n}\n'
    } >"$IMAGES/current.json.tmp"
    mv "$IMAGES/current.json.tmp" "$IMAGES/current.json"
}

# containerd normalises mlkube/x:tag to docker.io/mlkube/x:tag; the archive carries that name.
ref_of() { if [[ -n "$REGISTRY" ]]; then echo "${REGISTRY}mlkube/$1:$TAG"; else echo "docker.io/mlkube/$1:$TAG"; fi; }

print_archives() {
    local target
    for target in "${targets[@]}"; do
        echo "$target $(archive_of "$target")"
    done
}

mkdir -p "$IMAGES"
# One build at a time: a second caller waits, then finds the archives made.
exec 9>"$IMAGES/.lock"
flock 9

missing=()
for target in "${targets[@]}"; do
    [[ -s "$(archive_of "$target")" ]] || missing+=("$target")
done
if [[ ${#missing[@]} == 0 && "$PUSH" == 0 ]]; then
    for target in "${targets[@]}"; do
        log "up to date: $(archive_of "$target") ($(du -h "$(archive_of "$target")" | cut -f1))"
    done
    write_manifest
    [[ "$PRINT" == 1 ]] && print_archives
    exit 0
fi

# The tools, installed by the script itself on a fresh machine.
tools=()
for tool in buildah skopeo debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || tools+=("$tool")
done
if [[ ${#tools[@]} -gt 0 ]]; then
    log "installing ${tools[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    # A stale or empty package list makes the first install fail: update, then retry.
    apt-get install -y -q "${tools[@]}" >&2 || { apt-get update -q >&2 && apt-get install -y -q "${tools[@]}" >&2; }
fi

# Buildah's storage stays in the cache so warm rebuilds reuse layers. Its run state
# (mount counts, locks) is dropped after a reboot, when it no longer holds.
STORAGE="$CACHE/containers"
mkdir -p "$STORAGE/run" "$STORAGE/tmp"
boot_id=$(cat /proc/sys/kernel/random/boot_id)
if [[ "$(cat "$STORAGE/boot_id" 2>/dev/null)" != "$boot_id" ]]; then
    rm -rf "$STORAGE/run" && mkdir -p "$STORAGE/run"
    echo "$boot_id" >"$STORAGE/boot_id"
fi
# overlay when the kernel allows it, else vfs (slow, full copies); chosen once per store.
if [[ ! -s "$STORAGE/driver" ]]; then
    if buildah --root "$STORAGE/storage" --runroot "$STORAGE/run" --storage-driver overlay info >/dev/null 2>&1; then
        echo overlay >"$STORAGE/driver"
    else
        log "overlay storage does not work here; using vfs"
        echo vfs >"$STORAGE/driver"
    fi
fi
B=(buildah --root "$STORAGE/storage" --runroot "$STORAGE/run" --storage-driver "$(cat "$STORAGE/driver")")
# Buildah's temporary files and RUN --mount=type=cache directories live under TMPDIR.
export TMPDIR="$STORAGE/tmp"
# The build's own network use is PyPI and the Debian mirror; tools run here stay quiet.
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1

# ----------------------------------------------------------------------------- base image
# Debian bookworm's python3 (3.11) in place of Docker Hub's python:3.11-slim-bookworm,
# which cannot be pulled here.
build_base() {
    if "${B[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        return
    fi
    if [[ ! -e "$BASE_DIR/rootfs/.complete" ]]; then
        log "debootstrap bookworm into $BASE_DIR/rootfs (a few minutes; log: $BASE_DIR/debootstrap.log)"
        rm -rf "$BASE_DIR/rootfs.tmp" && mkdir -p "$BASE_DIR"
        if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
                bookworm "$BASE_DIR/rootfs.tmp" "$DEBIAN_MIRROR" >"$BASE_DIR/debootstrap.log" 2>&1; then
            tail -n 20 "$BASE_DIR/debootstrap.log" >&2
            die "debootstrap failed (log: $BASE_DIR/debootstrap.log)"
        fi
        touch "$BASE_DIR/rootfs.tmp/.complete"
        rm -rf "$BASE_DIR/rootfs" && mv "$BASE_DIR/rootfs.tmp" "$BASE_DIR/rootfs"
    fi
    log "making $BASE_IMAGE from $BASE_DIR/rootfs"
    local ctr=mlkube-base mnt
    "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true  # left by an interrupted run
    "${B[@]}" from --name "$ctr" scratch >/dev/null
    mnt=$("${B[@]}" mount "$ctr")
    tar -C "$BASE_DIR/rootfs" --exclude=./.complete --exclude='./dev/*' \
        --exclude='./proc/*' --exclude='./sys/*' -cf - . | tar -C "$mnt" -xpf -
    "${B[@]}" umount "$ctr" >/dev/null
    # Security updates, the slim image's dpkg excludes, `python`, no apt lists or archives,
    # and none of this machine's resolv.conf or hostname.
    "${B[@]}" run --isolation chroot "$ctr" -- sh -euc '
        printf "%s\n" \
            "deb '"$DEBIAN_MIRROR"' bookworm main" \
            "deb '"$DEBIAN_MIRROR"' bookworm-updates main" \
            "deb '"${DEBIAN_MIRROR%/debian}"'/debian-security bookworm-security main" \
            >/etc/apt/sources.list
        printf "%s\n" "path-exclude /usr/share/doc/*" "path-include /usr/share/doc/*/copyright" \
            "path-exclude /usr/share/man/*" "path-exclude /usr/share/info/*" \
            "path-exclude /usr/share/locale/*" "path-include /usr/share/locale/locale.alias" \
            >/etc/dpkg/dpkg.cfg.d/slim
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get upgrade -y -q
        apt-get clean
        rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /var/log/dpkg.log
        find /usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
        find /usr/share/doc -mindepth 1 -type d -empty -delete
        rm -rf /usr/share/man/* /usr/share/info/*
        find /usr/share/locale -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
        ln -sf python3 /usr/bin/python
        : >/etc/resolv.conf
        : >/etc/hostname
    ' >"$BASE_DIR/upgrade.log" 2>&1 || { tail -n 20 "$BASE_DIR/upgrade.log" >&2; die "base upgrade failed"; }
    "${B[@]}" config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd python3 --created-by "scripts/build-images.sh (debootstrap bookworm)" "$ctr"
    "${B[@]}" commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
    log "base ready: $BASE_IMAGE"
}

build_base

# This host's CA bundle stands in for the image's while RUN steps run (never in an image):
# downloads then work behind a TLS-intercepting proxy whose CA only this host trusts.
ca_volume=()
if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
    ca_volume=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi

# ----------------------------------------------------------------------------- images
build_image() {
    # Tagged with the archive's name only: the archive then carries that one name.
    local target=$1 image logfile="$IMAGES/build-$1.log" t0=$SECONDS
    image=$(ref_of "$target")
    log "building $image (--target $target; log: $logfile)"
    # Progress: each RUN and COPY step as it starts (a cached one is done at once).
    if ! "${B[@]}" bud --layers --force-rm --isolation chroot --pull=never --target "$target" \
            --build-arg "PYTHON_IMAGE=$BASE_IMAGE" "${build_args[@]}" "${ca_volume[@]}" \
            --tag "$image" --file Dockerfile . 2>&1 | tee "$logfile" |
            grep --line-buffered -E '^(\[[0-9]+/[0-9]+\] )?STEP [0-9]+/[0-9]+: (RUN|COPY)' |
            while IFS= read -r line; do log "  $target: ${line:0:110}"; done; then
        tail -n 30 "$logfile" >&2
        die "building $image failed (log: $logfile)"
    fi
    log "built $image in $((SECONDS - t0))s ($(grep -c '^--> Using cache' "$logfile") steps from cache)"
    local archive tmp
    archive=$(archive_of "$target")
    tmp="$archive.tmp"
    rm -f "$tmp"
    "${B[@]}" push --quiet "$image" "docker-archive:$tmp:$image" >&2
    mv "$tmp" "$archive"
    # Archives of older trees are of no further use.
    find "$IMAGES" -maxdepth 1 -name "$target-$TAG-*.tar" ! -path "$archive" -delete
    log "archive: $archive ($(du -h "$archive" | cut -f1)), image $(ref_of "$target")"
    if [[ "$PUSH" == 1 ]]; then
        [[ -n "$REGISTRY" ]] || die "--push needs --registry"
        "${B[@]}" push "$image" "docker://$image" >&2
    fi
}

# Each change of pyproject.toml leaves a few GB of layers no build uses any more. Kept: every
# layer the last build of each image made or reused (its log names them) and their parents.
prune_storage() {
    local keep removed=0 pass id gone
    keep=$(grep -hoE '^--> (Using cache )?[0-9a-f]{11,64}' "$IMAGES"/build-*.log |
        grep -oE '[0-9a-f]{11,64}$' | cut -c1-11 | sort -u) || true
    # Removing an unused image can leave its parent unused: a few passes.
    for pass in 1 2 3 4 5 6 7 8; do
        gone=0
        for id in $("${B[@]}" images --filter dangling=true -q); do
            grep -qx "${id:0:11}" <<<"$keep" && continue
            "${B[@]}" rmi "$id" >/dev/null 2>&1 && gone=$((gone + 1))
        done
        removed=$((removed + gone))
        [[ $gone == 0 ]] && break
    done
    if [[ $removed -gt 0 ]]; then
        log "removed $removed layer images no build uses ($(du -sh "$STORAGE/storage" | cut -f1) left in $STORAGE)"
    fi
}

for target in "${targets[@]}"; do
    if [[ -s "$(archive_of "$target")" && "$PUSH" == 0 ]]; then
        log "up to date: $(archive_of "$target")"
        continue
    fi
    build_image "$target"
done
prune_storage
write_manifest
log "done: ${targets[*]} at tag $TAG; manifest $IMAGES/current.json"
[[ "$PRINT" == 1 ]] && print_archives
exit 0
