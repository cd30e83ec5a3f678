#!/usr/bin/env bash
# Builds the test cluster's binaries from Go modules (no other source of them here), into
# ${MLKUBE_K8S_CACHE:-~/.cache/mlkube}/k8s-<version>/:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy (tests/cluster/k8s),
#   etcd (tests/cluster/etcd), helm (tests/cluster/helm), coredns (tests/cluster/coredns),
#   the KubeRay operator (tests/cluster/kuberay) and the KServe controller (tests/cluster/kserve),
#   plus the CRDs and config those two controllers ship in their modules, and versitygw
#   (tests/cluster/versitygw), the S3-compatible object store of the tests.
# A binary is rebuilt only when it is missing or was built from another pinned version, so a
# warm call returns at once. Each binary is linked under a temp name and renamed into place,
# so an interrupted build never leaves a half binary behind.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[k8s-binaries] %s\n' "$*" >&2; }

# The pinned version of module $2 as written in the wrapper go.mod $1.
pinned() { sed -n "s|^[[:space:]]*\(require[[:space:]]*\)\{0,1\}$2 \(v[^[:space:]]*\).*|\2|p" "$1" | head -n1; }

k8s_version="$(pinned "$here/k8s/go.mod" k8s.io/kubernetes)"
etcd_version="$(pinned "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)"
helm_version="$(pinned "$here/helm/go.mod" helm.sh/helm/v3)"
coredns_version="$(pinned "$here/coredns/go.mod" github.com/coredns/coredns)"
kuberay_version="$(pinned "$here/kuberay/go.mod" github.com/ray-project/kuberay/ray-operator)"
kserve_version="$(pinned "$here/kserve/go.mod" github.com/kserve/kserve)"
versitygw_version="$(pinned "$here/versitygw/go.mod" github.com/versity/versitygw)"
for v in k8s etcd helm coredns kuberay kserve versitygw; do
  version_var="${v}_version"
  if [[ -z "${!version_var}" ]]; then
    log "cannot read the pinned version from $here/$v/go.mod"
    exit 1
  fi
done

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
  "kube-scheduler|k8s|k8s.io/kubernetes/cmd/kube-scheduler|$k8s_version|$k8s_ld"
  "kubelet|k8s|k8s.io/kubernetes/cmd/kubelet|$k8s_version|$k8s_ld"
  "kube-proxy|k8s|k8s.io/kubernetes/cmd/kube-proxy|$k8s_version|$k8s_ld"
  "helm|helm|helm.sh/helm/v3/cmd/helm|$helm_version|-X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  "coredns|coredns|mlkube.io/tests/cluster/coredns|$coredns_version|-X github.com/coredns/coredns/coremain.GitCommit=$coredns_version"
  "kuberay-operator|kuberay|github.com/ray-project/kuberay/ray-operator|$kuberay_version|"
  "kserve-manager|kserve|github.com/kserve/kserve/cmd/manager|$kserve_version|"
  "pause|pause|mlkube.io/tests/cluster/pause|v1|"
  "versitygw|versitygw|github.com/versity/versitygw/cmd/versitygw|$versitygw_version|-X main.Version=$versitygw_version"
)
# Manifests that come with a controller's module and must match its version: name|module dir|module|version|folders
manifests=(
  "kuberay|kuberay|github.com/ray-project/kuberay/ray-operator|$kuberay_version|config/crd/bases"
  "kserve|kserve|github.com/kserve/kserve|$kserve_version|config/crd/full config/configmap config/webhook"
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
# A manifest folder is copied from the module cache into $dest/<name>-<version>/.
manifests_missing=()
for m in "${manifests[@]}"; do
  IFS='|' read -r name dir module version folders <<<"$m"
  [[ -f "$dest/$name-$version/.complete" ]] || manifests_missing+=("$m")
done
if ((${#missing[@]} == 0 && ${#manifests_missing[@]} == 0)); then
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
for m in "${manifests_missing[@]}"; do
  IFS='|' read -r name dir module version folders <<<"$m"
  moddir="$(cd "$here/$dir" && go mod download -json "$module@$version" | sed -n 's|^[[:space:]]*"Dir": "\(.*\)",$|\1|p')"
  if [[ -z "$moddir" || ! -d "$moddir" ]]; then
    log "cannot find $module@$version in the module cache"
    exit 1
  fi
  out="$dest/$name-$version"
  rm -rf "$out.tmp.$$"
  for f in $folders; do
    mkdir -p "$out.tmp.$$/$f"
    cp -r "$moddir/$f/." "$out.tmp.$$/$f/"
  done
  chmod -R u+w "$out.tmp.$$"
  touch "$out.tmp.$$/.complete"
  rm -rf "$out"
  mv "$out.tmp.$$" "$out"
  log "copied $module@$version manifests ($folders) -> $out"
done
log "done in $((SECONDS - total_start))s: $dest"
