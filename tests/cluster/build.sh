#!/usr/bin/env bash
# Builds the test control plane's binaries from Go modules (no other source of them here):
# kube-apiserver and kube-controller-manager (tests/cluster/k8s), etcd (tests/cluster/etcd)
# and helm (tests/cluster/helm), into ${MLKUBE_K8S_CACHE:-~/.cache/mlkube}/k8s-<version>/.
# A binary is rebuilt only when it is missing or was built from another pinned version, so a
# warm call returns at once. Each binary is linked under a temp name and renamed into place,
# so an interrupted build never leaves a half binary behind.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[k8s-binaries] %s\n' "$*" >&2; }

# The pinned version of module $2 as written in the wrapper go.mod $1.
pinned() { sed -n "s|^[[:space:]]*$2 \(v[^[:space:]]*\).*|\1|p" "$1" | head -n1; }

k8s_version="$(pinned "$here/k8s/go.mod" k8s.io/kubernetes)"
etcd_version="$(pinned "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)"
helm_version="$(pinned "$here/helm/go.mod" helm.sh/helm/v3)"
if [[ -z "$k8s_version" || -z "$etcd_version" || -z "$helm_version" ]]; then
  log "cannot read pinned versions from $here/{k8s,etcd,helm}/go.mod"
  exit 1
fi

dest="${MLKUBE_K8S_CACHE:-$HOME/.cache/mlkube}/k8s-${k8s_version#v}"

# name|module dir|package|version|ldflags
k8s_minor="${k8s_version#v1.}"
k8s_minor="${k8s_minor%%.*}"
k8s_ld="-X k8s.io/component-base/version.gitVersion=$k8s_version"
k8s_ld+=" -X k8s.io/component-base/version.gitMajor=1"
k8s_ld+=" -X k8s.io/component-base/version.gitMinor=$k8s_minor"
k8s_ld+=" -X k8s.io/component-base/version.gitTreeState=clean"
k8s_ld+=" -X k8s.io/component-base/version.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
targets=(
  "etcd|etcd|go.etcd.io/etcd/server/v3|$etcd_version|-X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd_version"
  "kube-apiserver|k8s|k8s.io/kubernetes/cmd/kube-apiserver|$k8s_version|$k8s_ld"
  "kube-controller-manager|k8s|k8s.io/kubernetes/cmd/kube-controller-manager|$k8s_version|$k8s_ld"
  "helm|helm|helm.sh/helm/v3/cmd/helm|$helm_version|-X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
)

# A stamp next to each binary records what it was built from; the build date is left out
# so that only a change of pinned version triggers a rebuild.
stamp_of() { printf '%s %s\n' "$3" "$4"; }

up_to_date() {
  local name="$1" want="$2"
  [[ -x "$dest/$name" && -f "$dest/.$name.stamp" && "$(cat "$dest/.$name.stamp")" == "$want" ]]
}

missing=()
for t in "${targets[@]}"; do
  IFS='|' read -r name dir pkg version ld <<<"$t"
  up_to_date "$name" "$(stamp_of "$name" "$dir" "$pkg" "$version")" || missing+=("$t")
done
if ((${#missing[@]} == 0)); then
  log "up to date in $dest"
  exit 0
fi

# Go's default install place, for shells whose PATH lacks it.
if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
  export PATH="$PATH:/usr/local/go/bin"
fi
if ! command -v go >/dev/null 2>&1; then
  log "the Go toolchain is needed to build ${#missing[@]} binaries into $dest; install Go 1.26+"
  exit 1
fi

mkdir -p "$dest"
# Two concurrent `make test` runs must not build the same binary twice at once.
exec 9>"$dest/.lock"
flock 9

tmp=""
ticker=""
cleanup() {
  if [[ -n "$ticker" ]]; then kill "$ticker" 2>/dev/null || true; fi
  if [[ -n "$tmp" ]]; then rm -f "$tmp"; fi
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

total_start=$SECONDS
for t in "${missing[@]}"; do
  IFS='|' read -r name dir pkg version ld <<<"$t"
  want="$(stamp_of "$name" "$dir" "$pkg" "$version")"
  # Another process may have built it while we waited for the lock.
  if up_to_date "$name" "$want"; then
    continue
  fi
  log "building $name $version (from $pkg) ..."
  start=$SECONDS
  # A heartbeat, so that a 15-minute cold build does not look hung.
  (while sleep 60; do log "  $name: still building, $((SECONDS - start))s elapsed"; done) &
  ticker=$!
  tmp="$dest/.$name.tmp.$$"
  # -p 2 keeps peak memory moderate on a 2-core machine; -s -w drop debug info, which
  # roughly halves the binaries and the link step's memory.
  (cd "$here/$dir" && CGO_ENABLED=0 go build -p 2 -trimpath -ldflags "-s -w $ld" -o "$tmp" "$pkg")
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  ticker=""
  mv -f "$tmp" "$dest/$name"
  tmp=""
  printf '%s\n' "$want" >"$dest/.$name.stamp"
  log "built $name in $((SECONDS - start))s -> $dest/$name"
done
log "done in $((SECONDS - total_start))s: $dest"
