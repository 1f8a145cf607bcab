"""lb.runstate: the stickiness cookies' key, kept (0600) across restarts, so
that a restart does not re-balance sticky sessions; with a real daemon."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb.lab import Lab
from lb.runstate import COOKIE_KEY_BYTES, cookie_key, cookie_key_path, remove_cookie_key
from tests import labclient
from tests.daemon_fixture import RunningDaemon, lab_config
from tests.names import name

pytestmark = pytest.mark.root

NAME = name("rs")


def test_the_key_is_made_once_0600_and_replaced_when_others_could_read_it() -> None:
    key_name = name("rs-key")
    path = cookie_key_path(key_name)
    try:
        remove_cookie_key(key_name)
        key = cookie_key(key_name)
        assert len(key) == COOKIE_KEY_BYTES and cookie_key(key_name) == key
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        os.chmod(path, 0o644)  # it may have leaked: a new one
        other = cookie_key(key_name)
        assert other != key and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with open(path, "wb") as f:
            f.write(b"short")
        assert len(cookie_key(key_name)) == COOKIE_KEY_BYTES
    finally:
        remove_cookie_key(key_name)
    assert not os.path.exists(path)


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    text = lab_config(lab, NAME, echo_targets=1, http=True) + "stickiness = { enabled = true }\n"  # web, the last
    running = RunningDaemon(lab, NAME, text)
    try:
        running.start()
        for backend in lab.backends:
            running.wait_for("web", backend.address, "healthy", timeout=15)
        yield running
    finally:
        running.cleanup()


def get(lab: Lab, cookie: str | None = None) -> tuple[str, str | None]:
    """One request through the HTTP listener: (the backend, the AWSALB cookie it set)."""
    with labclient.tcp_connect(lab.client_ns, labmod.VIP, labmod.HTTP_PORT) as sock:
        extra = f"Cookie: AWSALB={cookie}\r\n" if cookie else ""
        sock.sendall(f"GET / HTTP/1.1\r\nHost: lab\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = [line.split(":", 1) for line in head[1:]]
    backend = next(v.strip() for k, v in headers if k.lower() == "x-backend")
    cookies = [v.strip() for k, v in headers if k.lower() == "set-cookie" and v.strip().startswith("AWSALB=")]
    return backend, cookies[0].split(";")[0].removeprefix("AWSALB=") if cookies else None


def test_sticky_sessions_stay_put_across_a_restart(daemon: RunningDaemon, lab: Lab) -> None:
    backend, cookie = get(lab)
    assert cookie is not None
    assert {get(lab, cookie)[0] for _ in range(6)} == {backend}
    assert daemon.stop() == 0
    daemon.start()  # before: a new random key, so the cookie was refused and round robin took over
    assert {get(lab, cookie)[0] for _ in range(6)} == {backend}
    assert stat.S_IMODE(os.stat(cookie_key_path(NAME)).st_mode) == 0o600
