#!/bin/sh
# Runs as PID 1 in the kernel-test guest (exec'd by /sbin/lb-kernels-init):
# what `sudo make test` sets up on a host (bpffs, a writable /tmp), then the
# fixtures tests/kernels/run.sh asked for, as root, from the read-only
# checkout. pytest's output goes to the console and to the shared output
# directory (9p tag lbout), with its exit status; then the guest powers off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
export PYTHONPATH=/opt/lb-site PYTHONDONTWRITEBYTECODE=1
say() { echo "lb-kernels: $*" >/dev/console; }
# Power off; wait for it with builtins (sleep, on the 9p root, may already be gone).
off() { sync; echo o >/proc/sysrq-trigger; while :; do read -r _ </dev/console; done; }

# The initramfs hands over /dev, /proc, /sys and /run; the root itself is read-only.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mountpoint -q /run || mount -t tmpfs tmpfs /run
for d in /tmp /var/tmp /root; do mount -t tmpfs tmpfs "$d"; done
mount -t bpf bpf /sys/fs/bpf
if ! mount -t 9p -o trans=virtio,version=9p2000.L lbout /mnt/out; then
	say "cannot mount the output directory (9p tag lbout)"
	off
fi
ip link set lo up

uname -r >/mnt/out/kernel
say "kernel $(uname -r), running: pytest $(cat /mnt/out/args)"
cd /mnt/lb || off
# shellcheck disable=SC2046  # the arguments are test paths, one word each
{ python3 -m pytest -p no:cacheprovider -ra $(cat /mnt/out/args); echo $? >/mnt/out/rc; } 2>&1 \
	| tee /mnt/out/pytest.log >/dev/console
say "pytest exit status $(cat /mnt/out/rc)"
off
