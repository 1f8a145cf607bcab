"""The /metrics endpoint under idle and slow clients: one thread, bounded
connections, idle ones closed after a timeout, and a scrape still answered.
Loopback only; no root, nothing pinned."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request

from lb import metrics
from lb.model import LoadBalancer
from tests.idle_clients import nofile_at_least, open_idle
from tests.names import name

IDLE_CONNECTIONS = 3000


def endpoint(idle_timeout: float = 10.0) -> metrics.MetricsServer:
    collector = metrics.Collector(lambda: LoadBalancer(name=name("nothing-pinned")))
    return metrics.serve("127.0.0.1:0", collector, idle_timeout=idle_timeout)


def scrape(server: metrics.MetricsServer, timeout: float = 5.0) -> str:
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode()


def test_thousands_of_idle_connections_keep_threads_bounded_and_a_scrape_answers() -> None:
    before = threading.active_count()
    with nofile_at_least(IDLE_CONNECTIONS + 1000):
        server = endpoint()
        idle: list[socket.socket] = []
        try:
            idle = open_idle(server.address, IDLE_CONNECTIONS)
            assert len(idle) == IDLE_CONNECTIONS
            time.sleep(0.5)  # a thread-per-connection server would be starting its threads now
            peak = threading.active_count()
            started = time.monotonic()
            assert "lb_maps_loaded 0.0" in scrape(server)
            took = time.monotonic() - started
        finally:
            for sock in idle:
                sock.close()
            server.close()
    assert peak <= before + 2, f"{peak - before} threads for {IDLE_CONNECTIONS} idle connections"
    assert took < 3.0
    assert threading.active_count() <= before


def test_an_idle_connection_is_closed_after_the_timeout() -> None:
    server = endpoint(idle_timeout=0.5)
    try:
        with socket.create_connection(server.address, timeout=5) as idle, \
                socket.create_connection(server.address, timeout=5) as partial:
            partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
            started = time.monotonic()
            assert idle.recv(1) == b""  # closed by the server
            assert partial.recv(1) == b""
            assert 0.3 < time.monotonic() - started < 3.0
        assert "lb_maps_loaded" in scrape(server)
    finally:
        server.close()


def test_a_client_that_does_not_read_its_answer_does_not_hold_up_others() -> None:
    from lb.metrics_http import ScrapeServer

    big = b"x" * (16 << 20)  # far more than the socket buffers hold
    server = ScrapeServer(("127.0.0.1", 0), lambda accept, encoding: ("text/plain", [], big), idle_timeout=1.0)
    try:
        with socket.socket() as greedy:
            greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            greedy.connect(server.address)
            greedy.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
            time.sleep(0.2)
            started = time.monotonic()
            with urllib.request.urlopen(f"http://{server.address[0]}:{server.address[1]}/metrics", timeout=5) as r:
                assert len(r.read()) == len(big)
            assert time.monotonic() - started < 3.0
            greedy.settimeout(5)
            with contextlib.suppress(ConnectionResetError):  # given up on after idle_timeout without progress
                while greedy.recv(1 << 16):
                    pass
    finally:
        server.close()


def test_unknown_paths_are_404_and_only_get_and_head_are_served() -> None:
    server = endpoint()
    host, port = server.address
    try:
        for path, method, status in (("/metrics", "HEAD", 200), ("/", "GET", 200), ("/nope", "GET", 404),
                                     ("/metrics", "POST", 405)):
            request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    got = response.status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got == status, (method, path)
    finally:
        server.close()
