#!/usr/bin/env bash
# Provision an lb VM of the scale-out lab: lb as on the one-host lab
# (vagrant/provision/lb.sh installs it and writes /etc/lb/lb.toml), then BIRD,
# reading lb's fragment, and this VM's [load_balancer.bgp] (lb-bgp.toml.in).
# Run by `vagrant up` / `vagrant provision` as root; safe to run again.
#
# Environment (set by vagrant/scale-out/Vagrantfile from topology.json):
#   LAB_ADDRESSES, LAB_WHEELHOUSE   as for vagrant/provision/lb.sh
#   LAB_ROUTER_ID   this VM's address toward the router (its BGP router id)
#   LAB_NEIGHBOR    the router's address on that network (the default route too)
#   LAB_ROUTER_AS, LAB_LB_AS        the AS numbers
set -euo pipefail

repo=/vagrant
: "${LAB_ROUTER_ID:?}" "${LAB_NEIGHBOR:?}" "${LAB_ROUTER_AS:?}" "${LAB_LB_AS:?}"
log() { echo "scale-out lb.sh: $*"; }

# BIRD first: lb up refuses to start without it (docs/bgp.md). Its config is
# Debian's, plus the include of lb's fragment (in BIRD's own /run/bird).
if ! dpkg-query -W -f='${Status}' bird2 2>/dev/null | grep -q "install ok installed"; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends bird2 >/dev/null
fi
include='include "/run/bird/lb-*.conf";'
grep -qxF "$include" /etc/bird/bird.conf || echo "$include" >> /etc/bird/bird.conf
sed -i "s/^#\?router id .*/router id ${LAB_ROUTER_ID};/" /etc/bird/bird.conf
bird -p -c /etc/bird/bird.conf
systemctl enable -q bird.service
systemctl restart bird.service

# lb as on the one-host lab, with this VM's BGP table appended.
"$repo/vagrant/provision/lb.sh"
sed -e "s/@ROUTER_ID@/${LAB_ROUTER_ID}/" -e "s/@NEIGHBOR@/${LAB_NEIGHBOR}/" \
    -e "s/@ROUTER_AS@/${LAB_ROUTER_AS}/" -e "s/@LB_AS@/${LAB_LB_AS}/" \
    "$repo/vagrant/scale-out/lb-bgp.toml.in" >> /etc/lb/lb.toml
lb validate /etc/lb/lb.toml >/dev/null

# The client is behind the router: replies go back that way.
cat > /etc/systemd/system/lb-lab-uplink.service <<UNIT
[Unit]
Description=lb scale-out lab: default route via the router (${LAB_NEIGHBOR})
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip route replace default via ${LAB_NEIGHBOR}

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable -q lb-lab-uplink.service
systemctl restart lb-lab-uplink.service lb.service
log "lb announcing by BGP; try: vagrant ssh $(hostname) -c 'sudo lb status'"
