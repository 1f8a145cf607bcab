#!/usr/bin/env bash
# `sudo make vagrant-test`: the Vagrant lab (vagrant/README.md) booted for
# real with vagrant-libvirt, its walk-through run as assertions
# (vagrant/test/test_walkthrough.py), then destroyed, on success, failure or
# Ctrl-C alike. Not part of `make test`: about 25 minutes under TCG on a
# 2-core host (measured times: vagrant/README.md).
#
#   1. libvirt: the daemons are started by hand where PID 1 is not systemd
#      (and stopped again at the end); KVM if a test boot shows /dev/kvm can
#      run a guest, TCG otherwise.
#   2. the box: $LB_VAGRANT_BOX if set (debian/bookworm64, for a host that
#      reaches Vagrant Cloud), else vagrant/box/build.sh's offline build,
#      added to Vagrant as lb/bookworm64-<hash> (cached: built once).
#   3. a wheelhouse for lb's virtualenv (vagrant/wheelhouse.sh): the VMs reach
#      Debian's archive through the host, but not necessarily PyPI.
#   4. `vagrant up`, at most $LB_VAGRANT_PARALLEL VMs at a time (the lb VM
#      first: it creates the networks). On 2 cores, five TCG guests booting
#      at once take longer than two at a time do. The disks' cache mode is
#      "unsafe": flushes are ignored, which makes dpkg much faster, and the
#      VMs are thrown away anyway.
#   5. pytest vagrant/test/test_walkthrough.py over ssh (`vagrant ssh-config`).
#   6. `vagrant destroy -f`; then whatever still carries the prefix (domains,
#      their volumes, networks) is removed too.
#
# Environment: LB_VAGRANT_PREFIX (names of VMs and networks, default
# "lb-vt", so a lab of one's own, "lb-lab", is left alone), LB_VAGRANT_BOX,
# LB_VAGRANT_ACCEL (kvm or tcg: skip the probe), LB_VAGRANT_MGMT_NET (the
# management network, a.b.c.0/24; default the first free 192.168.x.0/24 from
# 120 up), LB_VAGRANT_PARALLEL (2), LB_VAGRANT_CACHE (/var/cache/lb-vagrant),
# LB_VAGRANT_WHEELHOUSE (a directory of wheels, or "pypi" to let the lb VM
# use PyPI), LB_VAGRANT_KEEP=1 (leave the lab up for a look; destroy it with
# the command printed), LB_VAGRANT_PYTEST (extra pytest arguments, e.g. "-k http").
# shellcheck disable=SC2317  # functions called from traps and subshells
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
vagrant_dir=$(cd "$here/.." && pwd)
repo=$(cd "$vagrant_dir/.." && pwd)
python="$repo/.venv/bin/python"
prefix=${LB_VAGRANT_PREFIX:-lb-vt}
parallel=${LB_VAGRANT_PARALLEL:-2}
cache=${LB_VAGRANT_CACHE:-/var/cache/lb-vagrant}
export LB_VAGRANT_CACHE=$cache
uri=qemu:///system
pool=default

log() { echo "vagrant-test: $*"; }
die() { echo "vagrant-test: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (try: sudo make vagrant-test)"
[ -x "$python" ] || die "no $python (run deploy/install.sh --vagrant)"
case "$prefix" in
  *[!a-z0-9-]* | -* | "") die "LB_VAGRANT_PREFIX=$prefix: lower-case letters, digits and '-' only" ;;
esac
for tool in vagrant virsh libvirtd qemu-system-x86_64 flock; do
  command -v "$tool" >/dev/null || die "no $tool (deploy/install.sh --vagrant installs it)"
done

# One run per prefix at a time: a second would destroy the first's VMs.
mkdir -p /run/lock
exec 9>"/run/lock/lb-vagrant-test-$prefix.lock"
flock -n 9 || die "another vagrant-test with prefix $prefix is running (LB_VAGRANT_PREFIX picks another)"

begun=$(date +%s)
tmp=$(mktemp -d "/tmp/lb-vagrant-test.$prefix.XXXXXX")
started_daemons=()  # pid files of the daemons this run started
kvm_was=''          # /dev/kvm's group and mode before this run changed them
bg_pids=()          # vagrant up workers, while they run
phases=()           # "name: seconds" for the summary
phase_start=$begun
phase() {  # name: the phase that just ended
  local now
  now=$(date +%s)
  phases+=("$1: $((now - phase_start))s")
  phase_start=$now
}
vagrant_env() {  # the environment every vagrant command of this run gets
  env VAGRANT_DOTFILE_PATH="$tmp/dot" VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_NO_COLOR=1 \
    VAGRANT_DEFAULT_PROVIDER=libvirt LB_VAGRANT_BOX="$box" LB_VAGRANT_PREFIX="$prefix" \
    LB_VAGRANT_MGMT_NET="$mgmt_net" LB_VAGRANT_ACCEL="$accel" LB_VAGRANT_WHEELHOUSE="$wheelhouse" \
    LB_VAGRANT_DISK_CACHE=unsafe "$@"
}
box='' mgmt_net='' accel='' wheelhouse=''

# --- teardown -----------------------------------------------------------------------
ours() {  # kind: names of libvirt objects (domains, networks, volumes) with our prefix
  case "$1" in
    domains) virsh -q -c "$uri" list --all --name 2>/dev/null ;;
    networks) virsh -q -c "$uri" net-list --all --name 2>/dev/null ;;
    volumes) virsh -q -c "$uri" vol-list "$pool" 2>/dev/null | awk '{ print $1 }' ;;
  esac | grep -E "^$prefix-" || true
}
remove_leftovers() {  # whatever carries the prefix: a crashed earlier run, or a destroy that failed
  local d n v
  for d in $(ours domains); do
    log "removing domain $d"
    virsh -q -c "$uri" destroy "$d" >/dev/null 2>&1 || true
    virsh -q -c "$uri" undefine "$d" --remove-all-storage >/dev/null 2>&1 || true
  done
  for v in $(ours volumes); do
    log "removing volume $v"
    virsh -q -c "$uri" vol-delete "$v" --pool "$pool" >/dev/null 2>&1 || true
  done
  for n in $(ours networks); do
    log "removing network $n"
    virsh -q -c "$uri" net-destroy "$n" >/dev/null 2>&1 || true
    virsh -q -c "$uri" net-undefine "$n" >/dev/null 2>&1 || true
  done
}
stop_daemons() {  # those this run started, once no VM of anyone's is left
  local pidfile pid
  [ "${#started_daemons[@]}" -gt 0 ] || return 0
  if [ -n "$(virsh -q -c "$uri" list --all --name 2>/dev/null)" ]; then
    log "libvirtd stays up: other VMs are defined"
    return 0
  fi
  for pidfile in "${started_daemons[@]}"; do
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || true
  done
  if [ -n "$kvm_was" ]; then  # as it was, now that no libvirtd of ours looks at it
    chgrp "${kvm_was% *}" /dev/kvm
    chmod "${kvm_was#* }" /dev/kvm
  fi
}
teardown() {  # returns non-zero if something of the lab is left
  local pid left
  for pid in "${bg_pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${bg_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  bg_pids=()
  if [ -n "${LB_VAGRANT_KEEP:-}" ] && [ -d "$tmp/dot" ]; then
    log "LB_VAGRANT_KEEP: the lab stays up (ssh -F $tmp/ssh_config lb); to destroy it:"
    log "  cd $vagrant_dir && VAGRANT_DOTFILE_PATH=$tmp/dot LB_VAGRANT_PREFIX=$prefix \\"
    log "    LB_VAGRANT_BOX=$box LB_VAGRANT_MGMT_NET=$mgmt_net vagrant destroy -f"
    keep_tmp=1
    return 0
  fi
  if [ -d "$tmp/dot" ]; then
    log "vagrant destroy -f"
    (cd "$vagrant_dir" && vagrant_env timeout 900 vagrant destroy -f) >"$tmp/destroy.log" 2>&1 \
      || { tail -n 20 "$tmp/destroy.log" >&2; log "vagrant destroy failed: removing by name"; }
  fi
  remove_leftovers
  left=$( { ours domains; ours networks; ours volumes; } | tr '\n' ' ')
  stop_daemons
  [ -z "$left" ] || { log "still there after the teardown: $left"; return 1; }
}
summary() {
  echo
  log "summary ($(($(date +%s) - begun))s in all)"
  local p
  for p in "${phases[@]}"; do echo "  $p"; done
  [ -z "$disk" ] || echo "  disk with the lab up: $disk"
  echo "  $1"
}
on_exit() {  # every way out: destroy the lab, then say how it went
  local status=$?
  trap - EXIT INT TERM
  teardown || status=1
  phase "teardown"
  if [ "$status" = 0 ]; then summary PASSED; else summary FAILED; fi
  [ -n "$keep_tmp" ] || rm -rf "$tmp"
  exit "$status"
}
keep_tmp='' disk=''
trap on_exit EXIT
trap 'exit 130' INT TERM

# --- 1. libvirt -------------------------------------------------------------------------
libvirt_up() { virsh -q -c "$uri" version >/dev/null 2>&1; }
start_libvirt() {
  libvirt_up && return 0
  if [ -d /run/systemd/system ]; then
    systemctl start libvirtd.service virtlogd.service
  else
    # What udev does on a host booted by systemd: /dev/kvm belongs to group
    # kvm. Without it libvirtd finds /dev/kvm unusable by its QEMU user,
    # takes that for a change and probes QEMU afresh on every call (30 s
    # each on a loaded host).
    if [ -c /dev/kvm ] && [ "$(stat -c %G /dev/kvm)" = root ] && getent group kvm >/dev/null; then
      log "/dev/kvm: group kvm, mode 0660 (no udev here to do it)"
      kvm_was=$(stat -c '%G %a' /dev/kvm)
      chgrp kvm /dev/kvm
      chmod 0660 /dev/kvm
    fi
    mkdir -p /run/libvirt
    if ! [ -S /run/libvirt/virtlogd-sock ]; then
      log "starting virtlogd (PID 1 is not systemd)"
      virtlogd -d -p "$tmp/virtlogd.pid"
      started_daemons+=("$tmp/virtlogd.pid")
    fi
    log "starting libvirtd (PID 1 is not systemd)"
    libvirtd -d -p "$tmp/libvirtd.pid"
    started_daemons+=("$tmp/libvirtd.pid")
  fi
  local _
  for _ in $(seq 120); do
    libvirt_up && return 0
    sleep 1
  done
  die "libvirtd does not answer on $uri"
}
start_libvirt
remove_leftovers  # an earlier run killed before its teardown

# KVM where a test boot shows /dev/kvm can run a guest: the box's kernel,
# with no root, must reach its panic within 10 s (TCG takes ~4 s on 2 cores).
pick_accel() {  # kernel, or "" if there is none to try
  accel=${LB_VAGRANT_ACCEL:-}
  [ -z "$accel" ] || { log "accelerator: $accel (LB_VAGRANT_ACCEL)"; return 0; }
  accel=tcg
  local why="no writable /dev/kvm"
  if [ -z "$1" ]; then
    why="no kernel to test /dev/kvm with (LB_VAGRANT_ACCEL=kvm forces it)"
  elif [ -w /dev/kvm ]; then
    timeout -k 5 10 qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot -accel kvm -cpu host \
      -m 256 -kernel "$1" -append "console=ttyS0 panic=-1" -serial "file:$tmp/kvm-probe.log" >/dev/null 2>&1 || true
    if grep -q "Kernel panic" "$tmp/kvm-probe.log" 2>/dev/null; then
      accel=kvm
      why=
    else
      why="/dev/kvm cannot run a guest here (a test boot aborted or hung for 10 s)"
    fi
  fi
  log "accelerator: $accel${why:+ ($why: QEMU emulates the CPU, much slower)}"
}

# --- 2. the box ---------------------------------------------------------------------------
box_volumes() {  # box name: its images in the libvirt pool (vagrant-libvirt names them so)
  virsh -q -c "$uri" vol-list "$pool" 2>/dev/null | awk '{ print $1 }' \
    | grep -F "${1//\//-VAGRANTSLASH-}_vagrant_box_image_" || true
}
backing_files() {  # of every volume in the pool: what VM disks are based on
  local v
  for v in $(virsh -q -c "$uri" vol-list "$pool" 2>/dev/null | awk '{ print $1 }'); do
    virsh -q -c "$uri" vol-dumpxml "$v" --pool "$pool" 2>/dev/null \
      | sed -n '/<backingStore>/,/<\/backingStore>/s:.*<path>\(.*\)</path>.*:\1:p'
  done
}
prune_boxes() {  # earlier builds of ours, unless a VM's disk is still based on one
  local old vol based
  based=$(backing_files)
  for old in $(vagrant box list 2>/dev/null | awk '$1 ~ /^lb\/bookworm64-/ { print $1 }' | sort -u); do
    [ "$old" != "$1" ] || continue
    for vol in $(box_volumes "$old"); do
      if grep -q "/$vol\$" <<<"$based"; then
        log "box $old: kept, a VM's disk is based on its image $vol"
        continue 2
      fi
    done
    log "removing the older box $old"
    vagrant box remove -f --all "$old" >/dev/null 2>&1 || true
    for vol in $(box_volumes "$old"); do
      virsh -q -c "$uri" vol-delete "$vol" --pool "$pool" >/dev/null 2>&1 || true
    done
  done
}
kernel=
if [ -n "${LB_VAGRANT_BOX:-}" ]; then
  box=$LB_VAGRANT_BOX
  log "box: $box (LB_VAGRANT_BOX)"
else
  box_file=$("$vagrant_dir/box/build.sh")
  box_dir=$(dirname "$box_file")
  box="lb/bookworm64-$(basename "$box_dir")"
  kernel="$box_dir/kernel"
  if vagrant box list 2>/dev/null | grep -q "^$box "; then
    log "box: $box (added earlier)"
  else
    log "box: adding $box_file as $box"
    vagrant box add -f --name "$box" "$box_file" >"$tmp/box-add.log" 2>&1 || { cat "$tmp/box-add.log" >&2; exit 1; }
  fi
  prune_boxes "$box"
fi
pick_accel "$kernel"

# --- 3. the wheelhouse ----------------------------------------------------------------------------
case "${LB_VAGRANT_WHEELHOUSE:-}" in
  pypi) wheelhouse= ; log "wheelhouse: none, the lb VM uses PyPI" ;;
  "") wheelhouse=$("$vagrant_dir/wheelhouse.sh" 2> >(grep -v "^WARNING: Location" >&2)) ;;
  *) wheelhouse=$LB_VAGRANT_WHEELHOUSE ;;
esac

# --- 4. vagrant up ------------------------------------------------------------------------------------
# The management network: a /24 nobody on this host uses yet.
pick_mgmt_net() {
  mgmt_net=${LB_VAGRANT_MGMT_NET:-}
  [ -z "$mgmt_net" ] || return 0
  local used n x
  used=$( { ip -4 -o addr show; ip -4 route show table all; for n in $(virsh -q -c "$uri" net-list --all --name); do
    virsh -q -c "$uri" net-dumpxml "$n"; done; } 2>/dev/null)
  for x in $(seq 120 250); do
    grep -q "192\.168\.$x\." <<<"$used" && continue
    mgmt_net="192.168.$x.0/24"
    return 0
  done
  die "no free 192.168.x.0/24 for the management network (set LB_VAGRANT_MGMT_NET)"
}
pick_mgmt_net
phase "host setup (libvirt, box, wheelhouse)"

mapfile -t machines < <("$python" -c 'import json, sys
hosts = json.load(open(sys.argv[1]))["hosts"]
for h in sorted(hosts, key=lambda h: h["role"] != "lb"): print(h["name"])' "$vagrant_dir/topology.json")
log "vagrant up: ${machines[*]} (prefix $prefix, box $box, $accel, management network $mgmt_net, $parallel at a time)"
log "  logs: $tmp/up-<name>.log"

# A pool of $parallel workers, each taking the next VM from the list while
# one is left (the lb VM, the longest to provision, first). After a failure
# they start no more.
printf '%s\n' "${machines[@]}" >"$tmp/todo"
up_worker() {
  set -o pipefail
  local name started line
  while :; do
    [ ! -e "$tmp/up.failed" ] || return 1
    # shellcheck disable=SC2016  # expanded by sh
    name=$(flock "$tmp/todo.lock" sh -c 'head -n 1 "$1" && sed -i 1d "$1"' sh "$tmp/todo")
    [ -n "$name" ] || return 0
    started=$(date +%s)
    if ! (cd "$vagrant_dir" && vagrant_env timeout 2400 vagrant --no-tty up --provider=libvirt "$name") 2>&1 \
         | while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done >"$tmp/up-$name.log"; then
      echo "FAILED $name $(($(date +%s) - started))s" >>"$tmp/up.status"
      touch "$tmp/up.failed"
      return 1
    fi
    echo "up $name $(($(date +%s) - started))s" >>"$tmp/up.status"
  done
}
start_worker() {
  setsid bash -c "$(declare -f up_worker vagrant_env); $(declare -p tmp vagrant_dir box prefix mgmt_net accel \
    wheelhouse); up_worker" &
  bg_pids+=($!)
}
networks_ready() {  # the first VM has created every network (and uploaded the box image)
  [ "$(ours networks | wc -l)" -ge 3 ]
}
# The first worker alone until its VM's networks exist: two `vagrant up`
# creating the same network or uploading the same box image would collide.
start_worker
until networks_ready; do
  kill -0 "${bg_pids[0]}" 2>/dev/null || break
  sleep 5
done
for _ in $(seq 2 "$parallel"); do start_worker; done
queue_status=0
for pid in "${bg_pids[@]}"; do wait "$pid" || queue_status=1; done
bg_pids=()
sed 's/^/  /' "$tmp/up.status" 2>/dev/null || true
if [ "$queue_status" != 0 ]; then
  for name in "${machines[@]}"; do
    grep -q "^FAILED $name " "$tmp/up.status" 2>/dev/null || continue
    log "vagrant up $name failed; the end of its log:"
    tail -n 40 "$tmp/up-$name.log" >&2
  done
  phase "vagrant up (FAILED)"
  exit 1
fi
phase "vagrant up (${#machines[@]} VMs, $accel, $parallel at a time: $(sed 's/^up //' "$tmp/up.status" | paste -sd, -))"

# Disk in use with the lab up: the cache, the box as Vagrant keeps it, and
# libvirt's copy of the box image plus the VMs' copy-on-write disks.
disk_report() {
  local box_dir vols
  box_dir="${VAGRANT_HOME:-$HOME/.vagrant.d}/boxes/${box//\//-VAGRANTSLASH-}"
  vols=$(virsh -q -c "$uri" pool-dumpxml "$pool" | sed -n 's:.*<path>\(.*\)</path>.*:\1:p' | head -n 1)
  echo "cache $(du -sh "$cache" 2>/dev/null | cut -f1) ($cache)," \
    "vagrant box $(du -sh "$box_dir" 2>/dev/null | cut -f1)," \
    "libvirt box image $(box_volumes "$box" | sed "s:^:$vols/:" | xargs -r du -ch 2>/dev/null | tail -n 1 | cut -f1)," \
    "VM disks $(ours volumes | sed "s:^:$vols/:" | xargs -r du -ch 2>/dev/null | tail -n 1 | cut -f1)"
}
disk=$(disk_report)
log "disk: $disk"

# --- 5. the walk-through ------------------------------------------------------------------------------
(cd "$vagrant_dir" && vagrant_env vagrant ssh-config) >"$tmp/ssh_config" 2>"$tmp/ssh-config.log" \
  || { cat "$tmp/ssh-config.log" >&2; die "vagrant ssh-config failed"; }
test_status=0
# shellcheck disable=SC2086  # pytest arguments, as given
(cd "$repo" && LB_VAGRANT_SSH_CONFIG="$tmp/ssh_config" LB_VAGRANT_SSH_CONTROL="$tmp" \
  "$python" -m pytest -p no:cacheprovider -v -ra ${LB_VAGRANT_PYTEST:-} "$here/test_walkthrough.py") \
  2>&1 | tee "$tmp/pytest.log" || test_status=${PIPESTATUS[0]}
result=$(grep -E "^=+ .*(passed|failed|error).* in " "$tmp/pytest.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
phase "walk-through (${result:-no result})"

# --- 6. destroy and summary: on_exit ----------------------------------------------------------------
exit "$test_status"
