# Sourced, not run: a Debian root file system in a directory, built as root
# by debootstrap and apt in a chroot, for the guests this project boots in
# QEMU. Both builders use it:
#
#   vagrant/box/build.sh      the Vagrant box (Debian 12, GRUB, a vagrant user)
#   tests/kernels/rootfs.sh   the `make test-kernels` guest (bcc, its kernel's headers)
#
# Each caches its result under a hash of what went into it: include this
# file in that hash ($debian_root_lib).
#
# The caller sets `work` (its partial build directory, removed on exit
# unless something is still mounted there), then:
#
#   begin_work                                  traps; removes what an interrupted build left
#   debian_root ROOT SUITE MIRROR SECURITY_MIRROR [debootstrap options...]
#                                               debootstrap, apt sources, no daemons, mounts
#   apt_in_root [--upgrade] ROOT PACKAGES...    apt-get install (after upgrade) in the chroot
#   end_debian_root ROOT                        unmount; drop apt's lists and the daemon block
#   step LOG COMMAND...                         a long step, interruptible (below)

debian_root_lib=${BASH_SOURCE[0]}

unmount_all() {  # whatever is still mounted under $1, deepest first
  local m
  for m in $(findmnt -rn -o TARGET | grep -F "$1/" | sort -r); do umount -l "$m" || true; done
}

# The long steps run as their own process group, in the background, so that
# a signal is handled at once (bash defers traps while a foreground child
# runs) and stops the whole step, chroot'ed dpkg or QEMU included, before
# cleanup.
step_pid=
step() {  # log command...
  local log=$1 status=0
  shift
  setsid "$@" >"$log" 2>&1 &
  step_pid=$!
  wait "$step_pid" || status=$?
  step_pid=
  [ "$status" = 0 ] || tail -n 30 "$log" >&2
  return "$status"
}

stop_step() {
  [ -n "$step_pid" ] || return 0
  kill -TERM -- "-$step_pid" 2>/dev/null || true
  local _
  for _ in $(seq 100); do  # up to 10 s for the group to go, then KILL
    kill -0 -- "-$step_pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$step_pid" 2>/dev/null || true
  sleep 0.5
}

cleanup() {
  stop_step
  unmount_all "$work"
  if findmnt -rn -o TARGET | grep -qF "$work/"; then
    echo "${0##*/}: $work still has mounts: left in place" >&2
  else
    rm -rf --one-file-system "$work"
  fi
}

begin_work() {
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  cleanup  # an interrupted earlier build
}

debian_root() {  # root suite mirror security_mirror [debootstrap options...]
  local root=$1 suite=$2 mirror=$3 security_mirror=$4
  shift 4
  mkdir -p "$root"
  step "$work/debootstrap.log" debootstrap "$@" --components=main "$suite" "$root" "$mirror"
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
EOF
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"  # no daemons start in the chroot
  chmod +x "$root/usr/sbin/policy-rc.d"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  mount -t proc proc "$root/proc"
  mount -t sysfs sysfs "$root/sys"
  mount --bind /dev "$root/dev"
  mount --bind /dev/pts "$root/dev/pts"
}

apt_in_root() {  # [--upgrade] root packages...
  local upgrade=false
  if [ "$1" = --upgrade ]; then
    upgrade=true
    shift
  fi
  local root=$1
  shift
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2016  # expanded by the inner shell
  step "$work/apt.log" sh -c 'root=$1 upgrade=$2; shift 2
    chroot "$root" apt-get update -q &&
    { [ "$upgrade" = false ] || chroot "$root" apt-get upgrade -y -q; } &&
    chroot "$root" apt-get install -y -q --no-install-recommends "$@" && chroot "$root" apt-get clean' \
    sh "$root" "$upgrade" "$@"
}

end_debian_root() {  # root: nothing mounted any more, no apt lists, daemons may start
  unmount_all "$work"
  rm -rf "$1/var/lib/apt/lists/"* "$1/usr/sbin/policy-rc.d"
}
