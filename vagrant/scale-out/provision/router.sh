#!/usr/bin/env bash
# Provision the router VM of the scale-out lab: BIRD with ECMP over the lb
# VMs (vagrant/scale-out/router-bird.conf), forwarding with an L4 multipath
# hash, so one client's flows spread over both lb hosts.
# Run by `vagrant up` / `vagrant provision` as root; safe to run again.
set -euo pipefail

repo=/vagrant
log() { echo "router.sh: $*"; }

if ! dpkg-query -W -f='${Status}' bird2 2>/dev/null | grep -q "install ok installed"; then
  log "installing bird2"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends bird2 >/dev/null
fi
install -m 0640 -o root -g bird "$repo/vagrant/scale-out/router-bird.conf" /etc/bird/bird.conf
bird -p -c /etc/bird/bird.conf

cat > /etc/sysctl.d/60-lb-router.conf <<'CONF'
net.ipv4.ip_forward = 1
# Hash a flow's 5-tuple, not only its addresses: one client's connections
# spread over the lb hosts.
net.ipv4.fib_multipath_hash_policy = 1
CONF
sysctl -q -p /etc/sysctl.d/60-lb-router.conf

systemctl enable -q bird.service
systemctl restart bird.service
log "BIRD running; try: vagrant ssh router -c 'sudo birdc show protocols; ip route show 10.0.0.100'"
