#!/usr/bin/env bash
# Build, or find in the cache, the test guest's root file system: Debian 12
# (bookworm) with its stock kernel (linux-image-amd64), that kernel's headers
# (bcc compiles against them), bcc and libbpf from Debian, and the Python
# packages the fixtures import, installed here from PyPI at the versions of
# this checkout's .venv (a wheelhouse: the guest has no network).
#
#   tests/kernels/rootfs.sh        prints the directory holding root/ (the
#                                  guest's /) and kernel, initrd (its /boot files)
#
# The root is a plain directory that QEMU shares read-only over 9p, so no
# partition table and no image (this host's kernel has no MSDOS partitions).
# It is cached in $LB_KERNELS_CACHE (/var/cache/lb-kernels) under a hash of
# everything that goes into it: this script and deploy/debian-root.sh (the
# debootstrap and apt steps it shares with vagrant/box/build.sh), the
# guest's init stub, the package list and the pinned Python requirements.
# Other builds are pruned once a new one is complete. Delete the cache to
# pick up newer Debian packages (a kernel update in bookworm, for
# instance). Run as root.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=../../deploy/debian-root.sh
. "$repo/deploy/debian-root.sh"  # debootstrap, apt in the chroot, the build's steps and cleanup
cache=${LB_KERNELS_CACHE:-/var/cache/lb-kernels}
mirror=${LB_KERNELS_MIRROR:-http://deb.debian.org/debian}
security_mirror=${LB_KERNELS_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
python=${PYTHON:-$repo/.venv/bin/python}
suite=bookworm

# What the guest runs: the kernel and its headers, bcc, and kmod (modprobe,
# for veth and friends on demand).
packages=(linux-image-amd64 linux-headers-amd64 python3 python3-bpfcc libbpfcc libbpf1 kmod iproute2)
# Built into the initramfs, so the kernel can mount its root over 9p.
initrd_modules=(virtio_pci 9pnet_virtio 9p)

log() { echo "rootfs: $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "rootfs.sh: must run as root" >&2; exit 1; }
[ -x "$python" ] || { echo "rootfs.sh: no $python (run deploy/install.sh first)" >&2; exit 1; }

# The project's runtime and test requirements, pinned to what the .venv has,
# so the guest runs the fixtures with the same pytest, scapy and pyroute2.
requirements=$("$python" - "$repo/pyproject.toml" <<'EOF'
import re, sys, tomllib
from importlib.metadata import PackageNotFoundError, version
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
    name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(spec)
EOF
)

key=$( { cat "$0" "$debian_root_lib" "$here/guest-init"; echo "$requirements"; echo "$mirror $security_mirror"; } | sha256sum | cut -c1-16)
out="$cache/$key"
if [ -f "$out/complete" ]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
work="$cache/$key.partial"
begin_work
root="$work/root"

log "debootstrap $suite (minbase) into $root"
debian_root "$root" "$suite" "$mirror" "$security_mirror" --variant=minbase
mkdir -p "$root/usr/share/initramfs-tools/modules.d"
printf '%s\n' "${initrd_modules[@]}" >"$root/usr/share/initramfs-tools/modules.d/lb-kernels"

log "installing ${packages[*]}"
apt_in_root "$root" "${packages[@]}"
end_debian_root "$root"
rm -f "$root/etc/resolv.conf"

guest_python=$(chroot "$root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
host_python=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$guest_python" != "$host_python" ]; then
  echo "rootfs.sh: the guest has Python $guest_python, $python is $host_python: the wheelhouse would not fit" >&2
  exit 1
fi
log "Python packages (pinned to $python): ${requirements//$'\n'/ }"
echo "$requirements" >"$work/requirements.txt"
step "$work/pip.log" "$python" -m pip install -q --disable-pip-version-check --no-warn-script-location \
  --only-binary=:all: --target "$root/opt/lb-site" -r "$work/requirements.txt"

install -m 0755 "$here/guest-init" "$root/sbin/lb-kernels-init"
mkdir -p "$root/mnt/lb" "$root/mnt/out"
kernel=$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -n 1)
initrd="initrd.img-${kernel#vmlinuz-}"
[ -f "$root/boot/$initrd" ] || { echo "rootfs.sh: no $initrd in the guest's /boot" >&2; exit 1; }
ln -s "root/boot/$kernel" "$work/kernel"
ln -s "root/boot/$initrd" "$work/initrd"
touch "$work/complete"

trap - EXIT
mv "$work" "$out"
for old in "$cache"/*; do  # earlier builds, keyed by other hashes
  [ "$old" = "$out" ] || [ ! -f "$old/complete" ] || rm -rf --one-file-system "$old"
done
log "built $out ($(du -sh "$out" | cut -f1), kernel ${kernel#vmlinuz-})"
echo "$out"
