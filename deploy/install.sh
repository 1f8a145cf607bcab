#!/usr/bin/env bash
# Set up everything lb needs on a Debian 12 host. Idempotent; run as root.
#
#   deploy/install.sh           runtime + test dependencies, bcc headers, .venv
#   deploy/install.sh --bench   also the comparison tools the benchmarks use
#
# A second run with everything present only checks, and finishes in seconds.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
bench=0
for arg in "$@"; do
  case "$arg" in
    --bench) bench=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$arg' (allowed: --bench)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: must run as root (try: sudo $0)" >&2
  exit 1
fi

log() { echo "install: $*"; }

# --- Debian packages -------------------------------------------------------
packages=(python3-bpfcc libbpfcc python3-venv python3-dev iproute2 ethtool nftables tcpdump vagrant vagrant-libvirt)
if [ "$bench" = 1 ]; then
  packages+=(wrk nginx-light haproxy iperf3)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Packaged daemons (nginx, haproxy) must not start on install: the
  # benchmarks start their own instances on loopback.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- kernel headers for bcc ------------------------------------------------
# bcc compiles BPF C against /lib/modules/$(uname -r)/build. Use the running
# kernel's own headers where they exist; otherwise fall back to Debian's
# generic headers, which are enough for XDP programs (LAB-NOTES.md).
kver=$(uname -r)
moddir="/lib/modules/$kver"
if [ ! -e "$moddir/build/include/linux/kconfig.h" ] && [ ! -e "$moddir/source/include/linux/kconfig.h" ]; then
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
    log "installing linux-headers-$kver"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver" >/dev/null
  fi
fi
if [ ! -e "$moddir/build/include/linux/kconfig.h" ] && [ ! -e "$moddir/source/include/linux/kconfig.h" ]; then
  if ! dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed"; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-headers-amd64 >/dev/null
  fi
  arch=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
  common="${arch%-amd64}-common"
  mkdir -p "$moddir"
  ln -sfn "$arch" "$moddir/build"
  ln -sfn "$common" "$moddir/source"
fi
case "$(readlink -f "$moddir/build")" in
  *"$kver"*) ;;
  *) echo "install: warning: no headers for kernel $kver; bcc uses generic Debian headers $(readlink -f "$moddir/build")" >&2 ;;
esac

# --- bpffs -----------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# --- Python environment ----------------------------------------------------
# Debian's python3 with system site-packages, so `import bcc` (python3-bpfcc)
# works inside the venv.
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.lb-installed"
want=$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$venv/bin/python" -c 'import lb' 2>/dev/null; then
  log "installing lb into $venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$here[test]"
  echo "$want" > "$stamp"
fi
"$venv/bin/python" -c 'import bcc, pyroute2, uvloop, httptools, click' \
  || { echo "install: the venv cannot import its dependencies" >&2; exit 1; }
log "ready ($venv)"
