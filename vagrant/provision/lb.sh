#!/usr/bin/env bash
# Provision the lb VM: install lb from the synced repo (/vagrant), put the
# lab config in /etc/lb/lb.toml, turn on forwarding, run lb under systemd.
# Run by `vagrant up` / `vagrant provision` as root; safe to run again.
#
# Environment (set by the Vagrantfile from topology.json):
#   LAB_ADDRESSES   lb's addresses, one per lab network, in interface order
#   LAB_WHEELHOUSE  where the host's wheelhouse is synced (LB_VAGRANT_WHEELHOUSE
#                   on the host), or empty: lb's virtualenv then comes from PyPI
set -euo pipefail

repo=/vagrant
: "${LAB_ADDRESSES:?set by the Vagrantfile}"
log() { echo "lb.sh: $*"; }

# --- lb and its dependencies ------------------------------------------------
# The production install, as on any Debian 12 host: bcc, kernel headers,
# bpffs, lb in /opt/lb, /usr/local/bin/lb and the systemd unit. Python
# packages come from PyPI, or only from the wheelhouse when there is one
# (VMs that reach Debian's archive but not PyPI); pip reads both settings
# from the environment, for its build environments too.
if [ -n "${LAB_WHEELHOUSE:-}" ]; then
  if ! ls "$LAB_WHEELHOUSE"/*.whl >/dev/null 2>&1; then
    echo "lb.sh: LAB_WHEELHOUSE=$LAB_WHEELHOUSE holds no wheels (is it synced? vagrant rsync lb)" >&2
    exit 1
  fi
  log "Python packages from the wheelhouse in $LAB_WHEELHOUSE, not PyPI"
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$LAB_WHEELHOUSE"
fi
"$repo/deploy/install.sh" --system

# --- config -------------------------------------------------------------------
# vagrant/lb.toml names the NICs eth1 and eth2, as debian/bookworm64 calls
# them. Should a box name them otherwise, use the names that carry lb's
# addresses instead, so the config always matches this VM.
ifnames=()
for address in $LAB_ADDRESSES; do
  ifname=$(ip -o -4 addr show | awk -v a="$address" '{ split($4, p, "/") } p[1] == a { print $2; exit }')
  if [ -z "$ifname" ]; then
    echo "lb.sh: no interface has $address; is the private network up? (ip -br addr)" >&2
    exit 1
  fi
  ifnames+=("\"$ifname\"")
done
joined=$(printf '%s, ' "${ifnames[@]}")
interfaces="interfaces = [${joined%, }]"
install -d -m 0755 /etc/lb
install -m 0644 "$repo/vagrant/lb.toml" /etc/lb/lb.toml
sed -i "s/^interfaces = .*/$interfaces/" /etc/lb/lb.toml
log "/etc/lb/lb.toml: $interfaces"
lb validate /etc/lb/lb.toml

# --- forwarding ---------------------------------------------------------------
# Packets XDP passes up (and the targets' traffic to anything but the client)
# are routed by the kernel.
echo "net.ipv4.ip_forward = 1" > /etc/sysctl.d/60-lb.conf
sysctl -q -w net.ipv4.ip_forward=1

# --- the service --------------------------------------------------------------
# Where QEMU emulates the CPU (TCG: no KVM on the host), compiling the BPF
# program alone takes about a minute, so `lb up` may need longer than
# systemd's default 90 s to report ready. Only then: a drop-in for this VM.
dropin=/etc/systemd/system/lb.service.d/lab-tcg.conf
if [ "$(systemd-detect-virt || true)" = qemu ]; then
  install -d "$(dirname "$dropin")"
  printf '# vagrant/provision/lb.sh: emulated CPU (TCG), slow start\n[Service]\nTimeoutStartSec=300\n' >"$dropin"
  log "emulated CPU (TCG): TimeoutStartSec=300 ($dropin)"
else
  rm -f "$dropin"
fi
systemctl daemon-reload  # install.sh --system put the unit in place
systemctl enable lb.service
# restart, not start: a re-provision picks up new code and config.
if ! systemctl restart lb.service; then
  journalctl -u lb.service -n 30 --no-pager >&2 || true
  echo "lb.sh: lb.service did not start (above: its journal)" >&2
  exit 1
fi
log "lb.service running; try: vagrant ssh lb -c 'sudo lb status'"
