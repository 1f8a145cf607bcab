"""systemd integration: `sd_notify` for a Type=notify service (deploy/lb.service)."""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, e.g. "READY=1"; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(path)
        sock.sendall(message.encode())
