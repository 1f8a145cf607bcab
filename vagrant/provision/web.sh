#!/usr/bin/env bash
# Provision a target VM (web1..3): nginx serving a page that names the host
# on the HTTP port, the namespace lab's own server (lb.labserver) for TCP and
# UDP echo, and the default route through lb, which NAT forwarding needs
# (replies must pass back through lb to be rewritten). Runs as root; safe to
# run again.
#
# Environment (set by the Vagrantfile from topology.json):
#   LAB_NAME       this host's name, in every answer (web1)
#   LAB_ADDRESS    its address on the backend network (10.0.1.11)
#   LAB_GATEWAY    lb's address there, the default route (10.0.1.1)
#   LAB_HTTP_PORT  nginx (80)
#   LAB_ECHO_PORT  TCP and UDP echo (9000)
set -euo pipefail

: "${LAB_NAME:?}" "${LAB_ADDRESS:?}" "${LAB_GATEWAY:?}" "${LAB_HTTP_PORT:?}" "${LAB_ECHO_PORT:?}"
repo=/vagrant
log() { echo "web.sh: $*"; }

# --- packages -------------------------------------------------------------------
# First: once the default route points at lb, this VM has no way out.
# lb.labserver needs only httptools and pyroute2, both packaged by Debian.
packages=(nginx-light python3-httptools python3-pyroute2 ethtool)
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

# --- nginx: a page naming the host ---------------------------------------------
# Same answer as lb.labserver's HTTP side in the namespace lab: the body is
# "<name>\n" and the header X-Backend names the host, on every path (so
# /api/* and / both answer), which health checks (GET /, matcher 200) pass.
# HTTP reaches nginx from lb's L7 proxy, so the peer is lb (10.0.1.1); the
# client's address is in X-Forwarded-For, which the access log shows too.
cat > /etc/nginx/sites-available/lb-lab <<EOF
log_format lb_lab '\$remote_addr - \$remote_user [\$time_local] "\$request" \$status \$body_bytes_sent '
                  '"\$http_user_agent" xff=\$http_x_forwarded_for';
server {
    listen ${LAB_HTTP_PORT} default_server;
    access_log /var/log/nginx/access.log lb_lab;
    location / {
        default_type text/plain;
        add_header X-Backend ${LAB_NAME} always;
        return 200 "${LAB_NAME}\n";
    }
}
EOF
rm -f /etc/nginx/sites-enabled/default
ln -sfn ../sites-available/lb-lab /etc/nginx/sites-enabled/lb-lab
nginx -t -q
systemctl enable -q nginx
systemctl restart nginx

# --- TCP and UDP echo: the namespace lab's server --------------------------------
# lb.labserver from the synced repo, the very server the tests talk to: TCP
# sends "<name>\n" then echoes, UDP answers "<name> <payload>". Its HTTP side
# moves to 8080, since nginx has the HTTP port.
cat > /etc/systemd/system/lb-labserver.service <<EOF
[Unit]
Description=lb lab server: TCP and UDP echo on ${LAB_ECHO_PORT} (lb.labserver)
After=network.target

[Service]
Environment=PYTHONPATH=${repo}
Environment=PYTHONDONTWRITEBYTECODE=1
ExecStart=/usr/bin/python3 -m lb.labserver --name ${LAB_NAME} --http-port 8080 --echo-port ${LAB_ECHO_PORT}
DynamicUser=yes
Restart=always

[Install]
WantedBy=multi-user.target
EOF

# --- routing and checksums --------------------------------------------------------
# A unit, so both survive a reboot. Full checksums on the lab NIC as in the
# namespace lab (docs/kernel-notes.md: XDP's incremental checksum update needs
# them); eth0, Vagrant's management NIC, keeps its on-link route, so
# `vagrant ssh` still works.
ifname=$(ip -o -4 addr show | awk -v a="$LAB_ADDRESS" '{ split($4, p, "/") } p[1] == a { print $2; exit }')
[ -n "$ifname" ] || { echo "web.sh: no interface has $LAB_ADDRESS (ip -br addr)" >&2; exit 1; }
# LAB_GATEWAY may name several lb hosts (vagrant/scale-out): one next hop
# each, a flow's replies hashed on its 5-tuple onto one of them.
route="via ${LAB_GATEWAY}"
if [ "${LAB_GATEWAY}" != "${LAB_GATEWAY%% *}" ]; then
  route=$(for g in $LAB_GATEWAY; do printf 'nexthop via %s dev %s ' "$g" "$ifname"; done)
  echo "net.ipv4.fib_multipath_hash_policy = 1" > /etc/sysctl.d/60-lb-lab.conf
  sysctl -q -w net.ipv4.fib_multipath_hash_policy=1
fi
cat > /etc/systemd/system/lb-lab-net.service <<EOF
[Unit]
Description=lb lab: default route via lb (${LAB_GATEWAY}), full checksums on ${ifname}
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip route replace default ${route}
ExecStart=/usr/sbin/ethtool -K ${ifname} tx off

[Install]
WantedBy=multi-user.target
EOF

systemctl daemon-reload
systemctl enable -q lb-labserver.service lb-lab-net.service
systemctl restart lb-labserver.service lb-lab-net.service
log "${LAB_NAME}: nginx on :${LAB_HTTP_PORT}, echo on :${LAB_ECHO_PORT}, default via ${LAB_GATEWAY}"
