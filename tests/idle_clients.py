"""Many idle client connections at once, for the resource tests."""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import time
from collections.abc import Iterator


@contextlib.contextmanager
def nofile_at_least(wanted: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE raised for the test (to the hard limit at most)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_idle(address: tuple[str, int], count: int, within: float = 20.0) -> list[socket.socket]:
    """`count` connections to `address` that send nothing: those whose
    handshake completed within `within` s (all connects in flight at once,
    so a dropped SYN costs one retransmission, not one per connection)."""
    pending: list[socket.socket] = []
    done: list[socket.socket] = []
    poller = select.poll()
    try:
        for _ in range(count):
            sock = socket.socket()
            pending.append(sock)
            sock.setblocking(False)
            sock.connect_ex(address)
            poller.register(sock, select.POLLOUT)
        by_fd = {sock.fileno(): sock for sock in pending}
        deadline = time.monotonic() + within
        while by_fd and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                sock = by_fd.pop(fd)
                poller.unregister(fd)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done.append(sock)
    finally:
        for sock in pending:
            if sock not in done:
                sock.close()
    return done
