#!/usr/bin/env bash
# Build, or find in the cache, a Vagrant box for the libvirt provider that
# stands in for the public debian/bookworm64 where Vagrant Cloud cannot be
# reached: Debian 12 from Debian's archive (debootstrap), its stock kernel,
# GRUB on a partitioned disk, systemd, ifupdown with DHCP on eth0
# (net.ifnames=0), OpenSSH, sudo, rsync, and a `vagrant` user with Vagrant's
# insecure key (from this host's vagrant package) and password-less sudo.
#
#   vagrant/box/build.sh           prints the path of the .box file
#
#   vagrant box add --name lb/bookworm64 "$(sudo vagrant/box/build.sh)"
#   LB_VAGRANT_BOX=lb/bookworm64 vagrant up
#
# `make vagrant-test` (vagrant/test/run.sh) does this itself. Each VM made
# from the box gets its own SSH host keys and machine id at first boot.
#
# How, on a host whose kernel may lack MSDOS partition support (this
# project's lab machines do): the root file system is made from a directory
# (mkfs.ext4 -d, no loop mount), put into a partitioned raw disk with
# sfdisk and dd, and GRUB is installed from inside: the disk boots once in
# QEMU with its own kernel given directly (-kernel), runs grub-install and
# update-grub as its init, and powers off. From then on it boots like any
# disk, and kernel updates in the guest update GRUB as usual.
#
# The debootstrap and apt steps are deploy/debian-root.sh's, shared with
# tests/kernels/rootfs.sh. Cached in $LB_VAGRANT_CACHE/box
# (/var/cache/lb-vagrant/box) under a hash of both scripts and the
# mirrors; other builds are pruned once a new one is complete. Delete the
# cache for newer Debian packages. Run as root.
#
# Environment: LB_VAGRANT_CACHE, LB_VAGRANT_MIRROR
# (http://deb.debian.org/debian), LB_VAGRANT_SECURITY_MIRROR
# (http://deb.debian.org/debian-security), LB_VAGRANT_INSECURE_KEY (the
# vagrant package's keys/vagrant.pub), LB_VAGRANT_ACCEL (kvm or tcg, for
# the GRUB boot; tcg unless told).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../../deploy/debian-root.sh
. "$here/../../deploy/debian-root.sh"  # debootstrap, apt in the chroot, the build's steps and cleanup
cache=${LB_VAGRANT_CACHE:-/var/cache/lb-vagrant}/box
mirror=${LB_VAGRANT_MIRROR:-http://deb.debian.org/debian}
security_mirror=${LB_VAGRANT_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
accel=${LB_VAGRANT_ACCEL:-tcg}
suite=bookworm
disk_gib=20  # debian/bookworm64's virtual size; the image is sparse

# debootstrap's default variant (priority required and important: apt,
# ifupdown, isc-dhcp-client, iproute2, less, ...), then what a Vagrant box
# needs on top.
packages=(linux-image-amd64 grub-pc systemd-sysv dbus openssh-server sudo rsync ca-certificates)

log() { echo "box: $*" >&2; }
die() { echo "build.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0)"
for tool in debootstrap mkfs.ext4 sfdisk qemu-img qemu-system-x86_64; do
  command -v "$tool" >/dev/null || die "no $tool (deploy/install.sh --vagrant installs it)"
done
key=${LB_VAGRANT_INSECURE_KEY:-$(find /usr/share/rubygems-integration/all/gems -path '*/vagrant-*/keys/vagrant.pub' \
  2>/dev/null | sort -V | tail -n 1)}
[ -f "$key" ] || die "no Vagrant insecure public key (install vagrant, or set LB_VAGRANT_INSECURE_KEY)"

hash=$( { cat "$0" "$debian_root_lib" "$key"; echo "$mirror $security_mirror"; } | sha256sum | cut -c1-12)
out="$cache/$hash"
box="$out/bookworm64.box"
if [ -f "$out/complete" ]; then
  log "cached: $box"
  echo "$box"
  exit 0
fi

mkdir -p "$cache"
work="$cache/$hash.partial"
begin_work
begun=$(date +%s)
root="$work/root"

# --- the root file system ------------------------------------------------------
log "debootstrap $suite into $root"
debian_root "$root" "$suite" "$mirror" "$security_mirror"
# GRUB goes on the disk later, from inside the VM: none here.
printf '%s\n' "grub-pc grub-pc/install_devices multiselect" "grub-pc grub-pc/install_devices_empty boolean true" \
  >"$root/tmp/debconf"
chroot "$root" debconf-set-selections /tmp/debconf

log "installing ${packages[*]}"
apt_in_root --upgrade "$root" "${packages[@]}"

# The vagrant user: insecure key, password "vagrant", sudo without one.
chroot "$root" useradd --create-home --shell /bin/bash --user-group vagrant
echo vagrant:vagrant | chroot "$root" chpasswd
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$key" "$root/home/vagrant/.ssh/authorized_keys"
echo "vagrant ALL=(ALL) NOPASSWD: ALL" >"$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
end_debian_root "$root"

# Per VM at first boot: SSH host keys (these were made by openssh-server's
# install) and the machine id.
rm -f "$root"/etc/ssh/ssh_host_* "$root/var/lib/dbus/machine-id"
: >"$root/etc/machine-id"
cat >"$root/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Generate this machine's SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
RequiredBy=ssh.service
EOF
systemctl --root="$root" enable -q ssh-host-keys.service

# Network: eth0 (the management NIC) by DHCP; Vagrant adds the others.
echo debian >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
cat >"$root/etc/network/interfaces" <<'EOF'
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
EOF
echo "LABEL=root / ext4 errors=remount-ro 0 1" >"$root/etc/fstab"
cat >"$root/etc/default/grub" <<'EOF'
# vagrant/box/build.sh: eth0 as Vagrant expects, console on the serial port too.
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX="net.ifnames=0 biosdevname=0 console=tty0 console=ttyS0,115200n8"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
EOF

# Run once as init in the GRUB boot below, then gone.
cat >"$root/sbin/lb-box-grub" <<'EOF'
#!/bin/sh
# vagrant/box/build.sh's one boot: GRUB onto this disk, then power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mount -o remount,rw /
if grub-install --target=i386-pc /dev/vda && update-grub; then
  echo "lb-box-grub: done"
else
  echo "lb-box-grub: failed"
fi
rm -f /sbin/lb-box-grub
sync
echo o >/proc/sysrq-trigger
while :; do sleep 1; done
EOF
chmod 0755 "$root/sbin/lb-box-grub"
rm -rf "$root/tmp/debconf" "$root/var/log/"*.log
: >"$root/etc/resolv.conf"  # DHCP fills it

kernel=$(find "$root/boot" -name 'vmlinuz-*' -printf '%f\n' | sort -V | tail -n 1)
initrd="initrd.img-${kernel#vmlinuz-}"
cp "$root/boot/$kernel" "$work/kernel"
cp "$root/boot/$initrd" "$work/initrd"

# --- the disk ---------------------------------------------------------------------
# One primary partition from 1 MiB to the end, bootable; the file system is
# made from the directory, then written at the partition's offset.
log "disk: ${disk_gib} GiB, ext4 from the root directory"
truncate -s "${disk_gib}G" "$work/disk.raw"
echo "start=2048, type=83, bootable" | sfdisk -q "$work/disk.raw"
mkfs.ext4 -q -L root -d "$root" "$work/root.ext4" "$((disk_gib * 1024 - 1))M" >/dev/null
rm -rf --one-file-system "$root"
dd if="$work/root.ext4" of="$work/disk.raw" bs=1M seek=1 conv=sparse,notrunc status=none
rm -f "$work/root.ext4"

log "GRUB: one boot in QEMU ($accel)"
cpu=qemu64
[ "$accel" = kvm ] && cpu=host
step "$work/qemu.log" timeout -k 10 900 qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot \
  -accel "$accel" -cpu "$cpu" -m 1024 -smp 2 \
  -drive "file=$work/disk.raw,format=raw,if=virtio" \
  -kernel "$work/kernel" -initrd "$work/initrd" \
  -append "root=/dev/vda1 rw init=/sbin/lb-box-grub console=ttyS0 panic=-1" \
  -serial "file:$work/console.log" || { tail -n 30 "$work/console.log" >&2; die "the GRUB boot failed"; }
if ! grep -q "lb-box-grub: done" "$work/console.log"; then
  tail -n 40 "$work/console.log" >&2
  die "grub-install or update-grub failed in the VM (above: its console)"
fi

# --- the box --------------------------------------------------------------------------
log "qcow2 and box"
qemu-img convert -O qcow2 "$work/disk.raw" "$work/box.img"
rm -f "$work/disk.raw"
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$disk_gib" >"$work/metadata.json"
cat >"$work/Vagrantfile" <<'EOF'
# vagrant/box/build.sh: Debian 12, built offline in place of debian/bookworm64.
Vagrant.configure("2") do |config|
  config.vm.synced_folder ".", "/vagrant", type: "rsync"
end
EOF
tar -cf "$work/bookworm64.box" -C "$work" metadata.json Vagrantfile box.img
rm -f "$work/box.img" "$work/initrd"
touch "$work/complete"

trap - EXIT
mv "$work" "$out"
for old in "$cache"/*; do  # earlier builds, keyed by other hashes
  [ "$old" = "$out" ] || [ ! -f "$old/complete" ] || rm -rf --one-file-system "$old"
done
log "built $box ($(du -sh "$box" | cut -f1), kernel ${kernel#vmlinuz-}, $(($(date +%s) - begun))s)"
echo "$box"
