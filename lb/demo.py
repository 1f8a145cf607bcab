"""`sudo make demo`: the lab, `lb up`, real traffic, and where it went.

1. builds the namespace lab (client, lb, backend1..3);
2. starts `lb up` with the embedded lab config plus an HTTPS listener
   (a certificate made now, in the lab's run directory) and an HTTP
   listener that redirects to it;
3. sends HTTP through the L7 listener and shows which rule and backend
   served each kind of request; then curl: http:// redirected to https://,
   HTTPS over HTTP/1.1 and HTTP/2;
4. sends TCP and UDP through the XDP VIPs and counts replies per backend,
   next to what the BPF maps counted;
5. stops backend2, shows it detected, taken out of the ring and brought back;
6. deregisters backend1 and shows a long-lived connection draining;
7. prints `lb targets`, `lb vips` and `lb stats`, then takes everything down
   (`--keep` leaves the lab and lb running for you to poke at);
8. shows the other forwarding modes, DSR and full NAT, through a second
   `lb up` on the DSR lab (lb.demomodes), and takes that down too.

`--hosts 2` runs the scale-out demo instead (lb.demohosts): a router, two
lb hosts announcing the VIP by BGP, one withdrawn while its connections go on.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from importlib import resources
from typing import Any

from lb import lab as labmod
from lb.dataplane.pins import open_pinned
from lb.demodaemon import DemoDaemon
from lb.demohosts import run_hosts
from lb.demomodes import run_modes
from lb.lab import Lab
from lb.labserver import self_signed_pem
from lb.netlink import run_in_netns

LOG = "/run/lb-lab/lb-demo.log"
DEFAULT_CONFIG = str(resources.files("lb").joinpath("data/default.toml"))
HTTPS_PORT = 443
REDIRECT_PORT = 8080  # port 80 is the rules' listener (step 3)

# Appended to the embedded config: HTTPS on the VIP with the certificate made
# at demo time (paths relative to the config's directory), and ALB's most
# common rule: every plain HTTP request redirected to it.
HTTPS_LISTENERS = f"""

# --- added by the demo (lb.demo) ---------------------------------------------
[[listeners]]
name = "https"
protocol = "HTTPS"
address = "{labmod.VIP}"
port = {HTTPS_PORT}
default_certificate = {{ certificate = "demo.pem", key = "demo.key" }}   # self-signed, made by the demo
default_action = {{ type = "forward", target_group = "web" }}

  [[listeners.rules]]
  priority = 10
  conditions = [{{ field = "path-pattern", values = ["/api/*"] }}]
  actions = [{{ type = "forward", target_group = "api" }}]

[[listeners]]
name = "to-https"
protocol = "HTTP"
address = "{labmod.VIP}"
port = {REDIRECT_PORT}
default_action = {{ type = "redirect", status_code = 301, protocol = "HTTPS", port = "{HTTPS_PORT}" }}
"""


def say(title: str) -> None:
    print(f"\n== {title}", flush=True)


def in_client(lab: Lab, fn: Callable[..., Any], *args: Any) -> Any:
    return run_in_netns(lab.client_ns, fn, *args)


# --- traffic from the client namespace ------------------------------------------


def http(method: str, path: str, host: str = "www.example.com") -> tuple[int, dict[str, str]]:
    with socket.create_connection((labmod.VIP, labmod.HTTP_PORT), timeout=5) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:])}
    return int(head[0].split()[1]), headers


def tcp_banner() -> str:
    with socket.create_connection((labmod.VIP, labmod.ECHO_PORT), timeout=5) as sock:
        return sock.recv(64).decode().strip()


def udp_echo(i: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(f"ping {i}".encode(), (labmod.VIP, labmod.ECHO_PORT))
        return sock.recvfrom(256)[0].decode().split(" ", 1)[0]


def spread(lab: Lab, fn: Callable[..., str], n: int) -> str:
    seen = Counter(in_client(lab, fn, *(() if fn is tcp_banner else (i,))) for i in range(n))
    return ", ".join(f"{name} {seen[name]}" for name in sorted(seen))


def curl(lab: Lab, *args: str) -> None:
    """curl from the client namespace, shown as typed there: the status line
    and the headers that say where the request went."""
    print(f"  $ curl {' '.join(args)}", flush=True)
    out = subprocess.run(["ip", "netns", "exec", lab.client_ns, "curl", "-sS", "--max-time", "5", "-D", "-",
                          "-o", "/dev/null", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"    curl failed ({out.returncode}): {out.stderr.strip()}")
        return
    for line in out.stdout.splitlines():
        if line.startswith("HTTP/") or line.lower().startswith(("location:", "x-backend:")):
            print(f"    {line.strip()}")


# --- the config: the embedded one, plus HTTPS --------------------------------------


def write_config(path: str) -> None:
    """The embedded lab config plus HTTPS_LISTENERS at `path`, and a new
    self-signed certificate for them beside it (the lab's run directory:
    `lb lab down` removes it)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    cert, key = self_signed_pem("www.example.com", ("www.example.com", "*.example.com"))
    with open(os.path.join(directory, "demo.pem"), "wb") as f:
        f.write(cert)
    fd = os.open(os.path.join(directory, "demo.key"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    with open(DEFAULT_CONFIG) as embedded, open(path, "w") as f:
        f.write(embedded.read() + HTTPS_LISTENERS)


# --- the daemon ----------------------------------------------------------------------


def lb_command(config_path: str, *args: str) -> None:
    """Run an `lb` command and show its output as a user would see it."""
    print(f"$ lb {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "lb", *args, "-c", config_path], check=False)


# --- the demo --------------------------------------------------------------------------


def run(keep: bool) -> int:
    lab = Lab()
    say("lab: client 10.0.0.2 -> lb (VIP 10.0.0.100) -> backend1..3 10.0.1.11-13")
    print("built" if lab.up() else "already up", "-", ", ".join(lab.namespaces))

    config_path = os.path.join(lab.lab_run_dir, "demo.toml")
    daemon: DemoDaemon | None = None
    try:
        write_config(config_path)
        os.makedirs(os.path.dirname(LOG), exist_ok=True)
        # The config named explicitly: without -c, lb up would prefer
        # /etc/lb/lb.toml on a host that has one.
        daemon = DemoDaemon(config_path, LOG)
        say(f"lb up -c {config_path}: the embedded lab config (`lb validate` prints it), plus HTTPS")
        daemon.start()
        daemon.wait_ready()
        for group, targets in (("web", lab.backends[:2]), ("api", lab.backends[2:]), ("echo-tcp", lab.backends),
                               ("echo-udp", lab.backends)):
            for backend in targets:
                daemon.wait_for(group, backend.address, "healthy")
        print(f"up: all targets healthy; log in {LOG}")

        say("HTTP through 10.0.0.100:80: the L7 proxy matches ALB rules")
        print(f"  {'request':<40} {'status':<7} {'served by / answer'}")
        for method, path, host, rule in (
            ("GET", "/", "www.example.com", "default rule -> web"),
            ("GET", "/index.html", "www.example.com", "default rule -> web"),
            ("GET", "/api/users", "www.example.com", "rule 10 path /api/* -> api"),
            ("POST", "/api/orders", "www.example.com", "rule 10 path /api/* -> api"),
            ("GET", "/page?q=1", "old.example.com", "rule 20 host old.example.com -> redirect"),
            ("GET", "/health-of-lb", "www.example.com", "rule 30 -> fixed response"),
        ):
            status, headers = in_client(lab, http, method, path, host)
            where = headers.get("x-backend") or headers.get("location") or "lb itself"
            print(f"  {method + ' ' + host + path:<40} {status:<7} {where:<30} ({rule})")

        say(f"HTTPS on {labmod.VIP}:{HTTPS_PORT} (a self-signed certificate made just now), "
            f"and HTTP on :{REDIRECT_PORT} redirected to it")
        curl(lab, f"http://{labmod.VIP}:{REDIRECT_PORT}/shop?q=1")
        curl(lab, "-k", "--http1.1", f"https://{labmod.VIP}/shop?q=1")  # curl offers h2 first otherwise
        curl(lab, "-k", "--http2", f"https://{labmod.VIP}/api/users")

        say("TCP through 10.0.0.100:9000: XDP, Maglev ring, conntrack, NAT")
        print("  60 connections:", spread(lab, tcp_banner, 60))
        say("UDP through 10.0.0.100:9000: XDP")
        print("  30 datagrams:  ", spread(lab, udp_echo, 30))

        victim = lab.backends[1]
        say(f"{victim.name} stops (its server is killed)")
        lab.stop_server(victim)
        took = daemon.wait_for("echo-tcp", victim.address, "unhealthy")
        row = daemon.state("echo-tcp", victim.address)
        print(f"  detected after {took:.1f} s: {row['state']} ({row['reason']}: {row['description']})")
        time.sleep(0.3)
        print("  60 connections:", spread(lab, tcp_banner, 60))
        lab.start_server(victim)
        took = daemon.wait_for("echo-tcp", victim.address, "healthy")
        print(f"  {victim.name} restarted: healthy again after {took:.1f} s")
        time.sleep(0.3)
        print("  60 connections:", spread(lab, tcp_banner, 60))

        say("draining: a long-lived connection through a deregistered target")
        long_lived = in_client(lab, lambda: socket.create_connection((labmod.VIP, labmod.ECHO_PORT), timeout=5))
        owner = long_lived.recv(64).decode().strip()
        owner_addr = next(b.address for b in lab.backends if b.name == owner)
        daemon.request("deregister", group="echo-tcp", target=owner_addr)
        row = daemon.state("echo-tcp", owner_addr)
        print(f"  deregistered {owner} ({owner_addr}): {row['state']} ({row['reason']})")
        print("  60 new connections:", spread(lab, tcp_banner, 60))
        long_lived.sendall(b"still there?\n")
        print(f"  the long-lived connection to {owner} still echoes: {long_lived.recv(64)!r}")
        long_lived.close()
        daemon.request("register", group="echo-tcp", target=owner_addr)
        daemon.wait_for("echo-tcp", owner_addr, "healthy")
        print(f"  {owner} registered again and healthy")

        say("what the kernel counted (pinned BPF maps)")
        config = daemon.config
        with open_pinned(config) as maps:
            for entry in maps.vips():
                t = maps.vip_traffic(entry.vip_id)
                print(f"  VIP {entry.vip}: {t.new_flows} flows, {t.packets} packets in, {t.reply_packets} replies")
            for target in maps.targets():
                t = maps.target_traffic(target.target_id)
                print(f"  target {target.endpoint}: {t.new_flows} flows, {t.packets} packets in, "
                      f"{t.reply_packets} replies")
        for args in (("targets",), ("vips",), ("stats",)):
            lb_command(config_path, *args)
    finally:
        if not keep:
            if daemon is not None:
                daemon.stop(down=False)  # the demo shows `lb down` itself
            say("cleanup")
            lb_command(config_path if os.path.exists(config_path) else DEFAULT_CONFIG, "down")
            print("lab:", ", ".join(lab.down()) or "nothing", "removed")
    run_modes()
    if keep:
        pid = daemon.proc.pid if daemon is not None and daemon.proc else "?"
        print(f"\nleft running (--keep): lb up is pid {pid}; stop it with `sudo kill <pid>`, then "
              f"`sudo .venv/bin/lb down -c {config_path}` and `sudo .venv/bin/lb lab down`")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="lb.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the lab and lb running")
    parser.add_argument("--hosts", type=int, default=1, choices=range(1, 9), metavar="N",
                        help="lb hosts; 2 or more: the scale-out demo (a router, BGP, ECMP; lb.demohosts)")
    parser.add_argument("--prefix", default="lab",
                        help="with --hosts: the lab's name prefix (namespaces, lb names, BIRD files; default lab)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo builds namespaces and loads BPF: run it as root (sudo make demo)", file=sys.stderr)
        return 1
    return run_hosts(args.hosts, args.keep, args.prefix) if args.hosts > 1 else run(args.keep)


if __name__ == "__main__":
    sys.exit(main())
