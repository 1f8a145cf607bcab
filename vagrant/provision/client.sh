#!/usr/bin/env bash
# Provision the client VM: the tools the walk-through uses (curl, wrk, socat)
# and routes to the VIP and the backend network through lb, as the
# namespace lab's client has (there: its default route). The default route
# here stays on Vagrant's management NIC, so the client keeps apt. Runs as
# root; safe to run again.
#
# Environment (set by the Vagrantfile from topology.json):
#   LAB_VIP          the VIP (10.0.0.100)
#   LAB_GATEWAY      lb's address on the client network (10.0.0.1)
#   LAB_BACKEND_NET  the targets' network (10.0.1.0/24)
#   LAB_ADDRESS      this host's address on the client network (10.0.0.2)
set -euo pipefail

: "${LAB_VIP:?}" "${LAB_GATEWAY:?}" "${LAB_BACKEND_NET:?}" "${LAB_ADDRESS:?}"
log() { echo "client.sh: $*"; }

packages=(curl wrk socat ethtool)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The VIP lies inside the client network, but lb need not answer ARP for it:
# a host route sends VIP traffic to lb's own MAC. Checksums in full on the
# lab NIC, as in the namespace lab (docs/kernel-notes.md). A unit, so both
# survive a reboot.
ifname=$(ip -o -4 addr show | awk -v a="$LAB_ADDRESS" '{ split($4, p, "/") } p[1] == a { print $2; exit }')
[ -n "$ifname" ] || { echo "client.sh: no interface has $LAB_ADDRESS (ip -br addr)" >&2; exit 1; }
cat > /etc/systemd/system/lb-lab-net.service <<EOF
[Unit]
Description=lb lab: routes to ${LAB_VIP} and ${LAB_BACKEND_NET} via lb (${LAB_GATEWAY}), full checksums on ${ifname}
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip route replace ${LAB_VIP}/32 via ${LAB_GATEWAY} dev ${ifname}
ExecStart=/usr/sbin/ip route replace ${LAB_BACKEND_NET} via ${LAB_GATEWAY} dev ${ifname}
ExecStart=/usr/sbin/ethtool -K ${ifname} tx off

[Install]
WantedBy=multi-user.target
EOF
systemctl daemon-reload
systemctl enable -q lb-lab-net.service
systemctl restart lb-lab-net.service
log "routes to ${LAB_VIP} and ${LAB_BACKEND_NET} via ${LAB_GATEWAY} on ${ifname}"
