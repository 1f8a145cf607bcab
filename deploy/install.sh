#!/usr/bin/env bash
# Set up everything lb needs on a Debian 12 host. Idempotent; run as root.
#
#   deploy/install.sh            development and tests: runtime + test packages,
#                                bcc headers, bpffs, and an editable .venv here
#   deploy/install.sh --system   production: runtime packages only, lb installed
#                                (a copy, not this checkout) into /opt/lb, the
#                                `lb` command in /usr/local/bin, the systemd unit,
#                                example configs in /etc/lb and the access log's
#                                logrotate snippet in /etc/logrotate.d
#   deploy/install.sh --bench    also the comparison tools the benchmarks use
#                                (wrk, nginx, HAProxy, iperf3, h2load; py-spy in the .venv)
#   deploy/install.sh --kernels  also QEMU and debootstrap, for `make test-kernels`
#                                (the program on other kernels, in VMs)
#   deploy/install.sh --vagrant  also libvirt, QEMU, qemu-img and debootstrap, for
#                                `make vagrant-test` (the Vagrant lab, booted)
#
# A second run with everything present only checks, and finishes in seconds.
# --system honours LB_PREFIX (/opt/lb), LB_BINDIR (/usr/local/bin),
# LB_ETCDIR (/etc/lb), LB_UNITDIR (/etc/systemd/system) and LB_LOGROTATEDIR
# (/etc/logrotate.d), for packaging
# and for the test that installs into a temporary tree.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
bench=0
kernels=0
system=0
vagrant=0
for arg in "$@"; do
  case "$arg" in
    --bench) bench=1 ;;
    --kernels) kernels=1 ;;
    --system) system=1 ;;
    --vagrant) vagrant=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$arg' (allowed: --system, --bench, --kernels, --vagrant)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: must run as root (try: sudo $0)" >&2
  exit 1
fi

log() { echo "install: $*"; }

# --- Debian packages -------------------------------------------------------
# Runtime: bcc (Debian's; the PyPI package called bcc is unrelated), libbpf,
# netlink and ethtool tools for operators, BIRD 2 for [load_balancer.bgp] (lb
# writes its own fragment and drives BIRD's control socket; the lab runs one BIRD
# per host and for its router). Tests add nftables, tcpdump and
# vagrant (+ a provider, so `vagrant validate` can check the lab's Vagrantfile),
# prometheus for its promtool (19 MB download), which checks and unit-tests
# deploy/prometheus/lb-alerts.yml (its service is never started: policy-rc.d),
# and systemd (systemd-analyze) and strace, which check deploy/lb.service's
# sandbox against what lb does (tests/test_unit_sandbox.py), and logrotate,
# which checks deploy/lb.logrotate.
packages=(python3-bpfcc libbpfcc libbpf1 python3-venv python3-dev iproute2 ethtool bird2)
if [ "$system" = 0 ]; then
  packages+=(nftables tcpdump vagrant vagrant-libvirt libcap2-bin util-linux logrotate prometheus systemd strace)
fi
if [ "$bench" = 1 ]; then
  packages+=(wrk nginx-light haproxy iperf3 nghttp2-client)  # nghttp2-client: h2load (tests/bench/https.py)
fi
if [ "$kernels" = 1 ]; then
  # tests/kernels/run.sh: debootstrap builds the guest's root, QEMU boots it.
  packages+=(qemu-system-x86 debootstrap)
fi
if [ "$vagrant" = 1 ]; then
  # vagrant/test/run.sh: libvirt runs the lab's VMs, vagrant/box/build.sh
  # builds the box (debootstrap, qemu-img, sfdisk). Where PID 1 is not
  # systemd, the SysV flavour of libvirt's daemon package keeps systemd's
  # packages as they are (run.sh starts the daemons itself).
  packages+=(vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils dnsmasq-base
             debootstrap fdisk e2fsprogs)
  [ -d /run/systemd/system ] || packages+=(libvirt-daemon-system-sysv)
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
# generic headers, which are enough for XDP programs (docs/kernel-notes.md).
kver=$(uname -r)
moddir="/lib/modules/$kver"
have_headers() { [ -e "$moddir/build/include/linux/kconfig.h" ] || [ -e "$moddir/source/include/linux/kconfig.h" ]; }
if ! have_headers && apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
  log "installing linux-headers-$kver"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver" >/dev/null
fi
if ! have_headers; then
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

# --- the compiled hot path (mypyc) -----------------------------------------
# lb.l7.native: the L7 per-request modules compiled by mypyc (deploy/build_native.py)
# into <venv>/lib/lb-native, used only while they match the sources next to
# them. Rebuilt when they do not; a build that fails leaves lb in plain
# Python (the same code, about a third more CPU per request), with a warning.
#   $1: the venv's python, $2: the directory holding its lb package,
#   $3: a PYTHONPATH that brings mypy, or "" when the venv has it.
build_native() {
  if env -u LB_PURE_PYTHON "$1" -I -c 'import sys, lb.l7; sys.exit(lb.l7.NOT_COMPILED is not None)' 2>/dev/null; then
    return 0
  fi
  log "compiling the L7 hot path with mypyc into $("$1" -I -c 'import lb.l7.native as n; print(n.DIRECTORY)')"
  if ! env -u LB_PURE_PYTHON ${3:+PYTHONPATH="$3"} "$1" "$here/deploy/build_native.py" "$2" >/dev/null; then
    echo "install: warning: the mypyc build failed; lb runs as plain Python (more CPU per L7 request)" >&2
  fi
}

# --- Python environment ----------------------------------------------------
# Debian's python3 with system site-packages, so `import bcc` (python3-bpfcc)
# works inside the venv.
make_venv() {
  if [ ! -x "$1/bin/python" ]; then
    log "creating $1"
    /usr/bin/python3 -m venv --system-site-packages "$1"
  fi
}
source_hash() {
  # Everything that ends up installed: a change to any of it reinstalls.
  (cd "$here" && find pyproject.toml lb bpf -type f \( -name '*.py' -o -name '*.toml' -o -name '*.c' -o -name '*.h' \) \
     -not -path '*/__pycache__/*' | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
}

if [ "$system" = 0 ]; then
  make_venv "$venv"
  stamp="$venv/.lb-installed"
  want=$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$venv/bin/python" -c 'import lb' 2>/dev/null; then
    log "installing lb (editable) into $venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e "$here[test]"
    echo "$want" > "$stamp"
  fi
  "$venv/bin/python" -c 'import bcc, pyroute2, uvloop, httptools, click' \
    || { echo "install: the venv cannot import its dependencies" >&2; exit 1; }
  build_native "$venv/bin/python" "$here" ""  # mypy (its mypyc) comes with the test extra
  # tests/bench/l7_proxy.py --profile samples `lb up` and its workers with py-spy.
  if [ "$bench" = 1 ] && [ ! -x "$venv/bin/py-spy" ]; then
    log "installing py-spy into $venv"
    "$venv/bin/pip" install -q py-spy
  fi
  log "ready ($venv)"
  exit 0
fi

# --- system-wide install (--system) ------------------------------------------
prefix=${LB_PREFIX:-/opt/lb}
bindir=${LB_BINDIR:-/usr/local/bin}
etcdir=${LB_ETCDIR:-/etc/lb}
unitdir=${LB_UNITDIR:-/etc/systemd/system}
logrotatedir=${LB_LOGROTATEDIR:-/etc/logrotate.d}
make_venv "$prefix/venv"
stamp="$prefix/.lb-installed"
want=$(source_hash)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing lb into $prefix/venv"
  build=$(mktemp -d)
  # Build from a clean copy, so nothing of this checkout (.venv, build/) leaks in.
  (cd "$here" && tar cf - --exclude=__pycache__ pyproject.toml README.md lb bpf) | tar xf - -C "$build"
  "$prefix/venv/bin/pip" install -q --upgrade pip
  "$prefix/venv/bin/pip" install -q "$build"  # a local path is always rebuilt and reinstalled
  rm -rf "$build"
  echo "$want" > "$stamp"
fi
# mypyc from a throwaway directory (the checkout's .venv has it; else from PyPI):
# production's venv does not carry mypy.
site=$("$prefix/venv/bin/python" -I -c 'import lb, os; print(os.path.dirname(os.path.dirname(lb.__file__)))')
if ! env -u LB_PURE_PYTHON "$prefix/venv/bin/python" -I -c 'import sys, lb.l7; sys.exit(lb.l7.NOT_COMPILED is not None)' 2>/dev/null; then
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import mypyc' 2>/dev/null; then
    build_native "$prefix/venv/bin/python" "$site" "$("$venv/bin/python" -c 'import mypy, os; print(os.path.dirname(os.path.dirname(mypy.__file__)))')"
  else
    mypy_dir=$(mktemp -d)
    if "$prefix/venv/bin/pip" install -q --target "$mypy_dir" "mypy>=1.8"; then
      build_native "$prefix/venv/bin/python" "$site" "$mypy_dir"
    else
      echo "install: warning: could not fetch mypy to compile the L7 hot path; lb runs as plain Python" >&2
    fi
    rm -rf "$mypy_dir"
  fi
fi
install -d "$bindir"
ln -sfn "$prefix/venv/bin/lb" "$bindir/lb"
# lb(1) and bash completion, generated from the commands themselves (lb/cli/manpage.py).
mandir=${LB_MANDIR:-/usr/local/share/man/man1}
completiondir=${LB_COMPLETIONDIR:-/usr/local/share/bash-completion/completions}
install -d "$mandir" "$completiondir"
"$prefix/venv/bin/lb" manpage > "$mandir/lb.1"
"$prefix/venv/bin/lb" completion bash > "$completiondir/lb"
install -d -m 0755 "$etcdir" "$etcdir/examples"
install -m 0644 "$here"/deploy/examples/*.toml "$etcdir/examples/"
install -d -m 0755 "$etcdir/examples/tls"   # https-redirect.toml's example certificate
install -m 0644 "$here"/deploy/examples/tls/*.pem "$etcdir/examples/tls/"
install -m 0600 "$here"/deploy/examples/tls/*.key "$etcdir/examples/tls/"
install -d "$unitdir"
# The unit names the paths this install used (LB_BINDIR, LB_ETCDIR).
sed -e "/^Exec/ s|/usr/local/bin/lb |$bindir/lb |" -e "/^Exec/ s|/etc/lb/lb.toml\$|$etcdir/lb.toml|" \
  "$here/deploy/lb.service" \
  > "$unitdir/lb.service.tmp"
chmod 0644 "$unitdir/lb.service.tmp"
mv "$unitdir/lb.service.tmp" "$unitdir/lb.service"
install -d "$logrotatedir"
install -m 0644 "$here/deploy/lb.logrotate" "$logrotatedir/lb"
if [ -d /run/systemd/system ] && [ "$unitdir" = /etc/systemd/system ]; then
  systemctl daemon-reload
fi
"$prefix/venv/bin/python" -c 'import bcc, lb.dataplane.loader as l; l.bpf_source_dir()' \
  || { echo "install: $prefix/venv cannot import lb and bcc, or find its BPF sources" >&2; exit 1; }
log "ready: $bindir/lb -> $prefix/venv/bin/lb"
if [ ! -f "$etcdir/lb.toml" ]; then
  log "next: write $etcdir/lb.toml (examples in $etcdir/examples), check it with 'lb validate',"
  log "      then: systemctl enable --now lb"
fi
