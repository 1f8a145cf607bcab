#!/usr/bin/env bash
# `sudo make test-kernels`: load the XDP program and run its packet fixtures
# (BPF_PROG_TEST_RUN), the struct-sync tests and a load with the production
# limits (tests/kernels/test_program_loads.py) on every kernel lb supports:
#
#   the running kernel   on this host, no VM
#   Debian 12's stock    linux-image-amd64 from bookworm, in a QEMU guest whose
#   kernel (6.1)         root tests/kernels/rootfs.sh builds and caches
#
# The guest boots that kernel directly (-kernel/-initrd from the guest's own
# /boot) with its root, the checkout (read-only) and an output directory
# shared over 9p; it runs pytest as root with bpffs mounted (guest.sh) and
# powers off. Each run must pass every test: a skip is a failure (summary.py).
# QEMU uses KVM when a test boot shows /dev/kvm can run a guest, and TCG
# otherwise. Exits non-zero if any kernel fails, and on a timeout.
#
# Environment: LB_KERNELS_TESTS (pytest arguments, default those files and
# test_program_loads.py; paths in this checkout, no spaces), LB_KERNELS_TIMEOUT (seconds per guest, 600), LB_KERNELS_ACCEL
# (kvm or tcg: skip the probe), LB_KERNELS_MEM (MiB, 2048), LB_KERNELS_SMP (2),
# LB_KERNELS_CACHE (/var/cache/lb-kernels), and LB_TEST_PREFIX for the host run.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python="$repo/.venv/bin/python"
# shellcheck disable=SC2206  # test paths, one word each
tests=(${LB_KERNELS_TESTS:-tests/test_xdp_packets.py tests/test_structs.py tests/kernels/test_program_loads.py})
guest_timeout=${LB_KERNELS_TIMEOUT:-600}
mem=${LB_KERNELS_MEM:-2048}
smp=${LB_KERNELS_SMP:-2}

log() { echo "test-kernels: $*"; }
[ "$(id -u)" = 0 ] || { echo "run.sh: must run as root (try: sudo make test-kernels)" >&2; exit 1; }

tmp=$(mktemp -d /tmp/lb-kernels.XXXXXX)
qemu_pid=
tail_pid=
rootfs_pid=
stop() {  # a process this script started, by its id
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
  fi
}
cleanup() {
  stop "$rootfs_pid"  # it cleans up its own partial build
  stop "$qemu_pid"  # timeout(1), which passes the signal on to QEMU
  stop "$tail_pid"
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run QEMU under timeout(1) in the background, so the trap can stop it;
# prints nothing, returns QEMU's status (124: timed out).
run_qemu() {
  local seconds=$1
  shift
  timeout -k 10 "$seconds" qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot "$@" &
  qemu_pid=$!
  local status=0
  wait "$qemu_pid" || status=$?
  qemu_pid=
  return "$status"
}

# Can /dev/kvm run a guest? Boot the guest's kernel with no root under KVM:
# it must reach its "cannot mount root" panic, which takes TCG about 4 s on
# this 2-core host, within 10 s. (On some hosts /dev/kvm exists but QEMU
# aborts or hangs with it.) Sets accel, and why_not_kvm when it falls back.
pick_accel() {
  accel=${LB_KERNELS_ACCEL:-}
  why_not_kvm="LB_KERNELS_ACCEL=$accel"
  [ -z "$accel" ] || return 0
  accel=tcg
  why_not_kvm="no writable /dev/kvm"
  [ -w /dev/kvm ] || return 0
  run_qemu 10 -accel kvm -cpu host -m 256 -kernel "$1" -append "console=ttyS0 panic=-1" \
    -serial "file:$tmp/kvm-probe.log" >/dev/null 2>&1 || true
  if grep -q "Kernel panic" "$tmp/kvm-probe.log" 2>/dev/null; then
    accel=kvm
  else
    why_not_kvm="/dev/kvm cannot run a guest here (a test boot aborted or hung for 10 s)"
  fi
}

begun=$(date +%s)
failed=0
verdicts=()
judge() {  # label log status: record the verdict line, count a failure
  local line
  if line=$(python3 "$here/summary.py" "$@"); then :; else failed=$((failed + 1)); fi
  verdicts+=("$line")
  log "$line"
}
fail() {  # label reason
  verdicts+=("$1: FAILED, $2")
  failed=$((failed + 1))
  log "$1: FAILED, $2"
}

# --- the running kernel, on this host ----------------------------------------
log "running kernel $(uname -r), on this host: pytest ${tests[*]}"
host_status=0
(cd "$repo" && "$python" -m pytest -p no:cacheprovider -ra "${tests[@]}") 2>&1 | tee "$tmp/host.log" \
  || host_status=${PIPESTATUS[0]}
judge "running kernel $(uname -r) (host)" "$tmp/host.log" "$host_status"

# --- Debian 12's stock kernel, in a guest ---------------------------------------
debian12() {
  local label="Debian 12 kernel" guest release started status=0
  # In the background, so that a signal reaches the trap (and rootfs.sh) at once.
  "$here/rootfs.sh" >"$tmp/rootfs.path" &
  rootfs_pid=$!
  wait "$rootfs_pid" || status=$?
  rootfs_pid=
  if [ "$status" != 0 ]; then
    fail "$label" "could not build the guest's root (tests/kernels/rootfs.sh, status $status)"
    return
  fi
  guest=$(cat "$tmp/rootfs.path")
  release=$(readlink -f "$guest/kernel")
  release=${release##*/vmlinuz-}
  label="$label $release"
  pick_accel "$guest/kernel"
  if [ "$accel" = kvm ]; then
    cpu=host
  else
    cpu=qemu64
    log "$why_not_kvm: falling back to TCG (emulation, much slower)"
  fi
  mkdir "$tmp/out"
  echo "${tests[*]}" >"$tmp/out/args"
  log "$label in QEMU ($accel, $smp CPUs, $mem MiB, timeout ${guest_timeout}s); its console:"
  started=$(date +%s)
  : >"$tmp/console.log"
  tail -n +1 -F "$tmp/console.log" 2>/dev/null &
  tail_pid=$!
  run_qemu "$guest_timeout" -accel "$accel" -cpu "$cpu" -smp "$smp" -m "$mem" \
    -kernel "$guest/kernel" -initrd "$guest/initrd" \
    -append "root=lbroot rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose ro init=/sbin/lb-kernels-init console=ttyS0 panic=-1 quiet" \
    -serial "file:$tmp/console.log" \
    -virtfs "local,path=$guest/root,mount_tag=lbroot,security_model=passthrough,readonly=on" \
    -virtfs "local,path=$repo,mount_tag=lbsrc,security_model=none,readonly=on" \
    -virtfs "local,path=$tmp/out,mount_tag=lbout,security_model=none" \
    || status=$?
  sleep 1  # tail's last lines
  stop "$tail_pid"
  tail_pid=
  label="$label (QEMU $accel, $(($(date +%s) - started))s)"
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    fail "$label" "timed out after ${guest_timeout}s"
  elif [ "$(cat "$tmp/out/kernel" 2>/dev/null)" != "$release" ]; then
    fail "$label" "the guest never reported running $release (QEMU exit status $status)"
  else
    judge "$label" "$tmp/out/pytest.log" "$(cat "$tmp/out/rc" 2>/dev/null || echo none)"
  fi
}
debian12

echo
log "summary ($(($(date +%s) - begun))s in all)"
for v in "${verdicts[@]}"; do echo "  $v"; done
[ "$failed" = 0 ]
