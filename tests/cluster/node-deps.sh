#!/usr/bin/env bash
# Installs the Debian packages the real test node runs on (containerd, runc, the CNI
# plugins, nftables, conntrack), and PostgreSQL 15 (the MLflow database of the integration
# and node tests, run by a fixture), when any is missing; a warm call returns at once.
set -euo pipefail

log() { printf '[node-deps] %s\n' "$*" >&2; }

# command|package
needs=(
  "containerd|containerd"
  "ctr|containerd"
  "runc|runc"
  "/usr/lib/cni/bridge|containernetworking-plugins"
  "/usr/lib/cni/host-local|containernetworking-plugins"
  "nft|nftables"
  "ip|iproute2"
  "conntrack|conntrack"
  "/usr/lib/postgresql/15/bin/postgres|postgresql-15"
)
missing=()
for n in "${needs[@]}"; do
  IFS='|' read -r what package <<<"$n"
  if [[ "$what" == /* ]]; then
    [[ -x "$what" ]] || missing+=("$package")
  else
    command -v "$what" >/dev/null 2>&1 || missing+=("$package")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
if [[ $(id -u) != 0 ]]; then
  log "missing Debian packages: ${packages[*]}; run as root: apt-get install ${packages[*]}"
  exit 1
fi
log "installing ${packages[*]} ..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
log "installed ${packages[*]}"
