"""What a running `lb up` leaves in /run/lb for the commands that cannot ask it.

    /run/lb/<name>.json   RuntimeState: pid, config, attachments, the addresses
                          lb added, its BGP fragment; written at start and on
                          every reload, read by `lb status` and `lb down` (on
                          its own when the config no longer loads), removed by
                          `lb down`
    /run/lb/<name>.lock   held (flock) by the one `lb up` of <name>
    /run/lb/<name>.cookie-key   (0600) the stickiness cookies' HMAC key, kept
                          across restarts so that sticky sessions stay where
                          they are (made on first use, removed by `lb down`)

and `listener_rows`, the listeners as `lb status` shows them, from the
daemon or, when it is down, from the config.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from lb.bgp.fragment import fragment_path
from lb.model import LoadBalancer

RUN_DIR = "/run/lb"
COOKIE_KEY_BYTES = 32

log = logging.getLogger("lb.runstate")


class AlreadyRunning(RuntimeError):
    """Another process holds the lock of this load balancer."""


def state_path(name: str) -> str:
    return os.path.join(RUN_DIR, f"{name}.json")


@dataclass
class RuntimeState:
    """What `lb status` and `lb down` need with no daemon to ask: written at
    start and on every reload to /run/lb/<name>.json."""

    name: str
    pid: int
    config_path: str | None
    loaded_at: float
    netns: str | None
    pin_dir: str
    attachments: list[dict[str, Any]] = field(default_factory=list)
    addresses: list[tuple[str, str, int]] = field(default_factory=list)  # (ifname, address, prefixlen) lb added
    admin_socket: str = ""
    # [load_balancer.bgp]: the BIRD fragment lb writes and BIRD's control
    # socket, so that `lb down` can take the announcements out even when the
    # config no longer loads; "" without BGP.
    bgp_fragment: str = ""
    bird_socket: str = ""

    def record_bgp(self, config: LoadBalancer) -> None:
        """Note where `config`'s BGP fragment goes (at start and on every reload)."""
        if config.bgp is None:
            self.bgp_fragment = self.bird_socket = ""
        else:
            self.bgp_fragment = fragment_path(config.bgp, config.name)
            self.bird_socket = config.bgp.bird_socket

    def save(self) -> None:
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        tmp = state_path(self.name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(tmp, state_path(self.name))

    @classmethod
    def load(cls, name: str) -> RuntimeState | None:
        try:
            with open(state_path(name)) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        data["addresses"] = [tuple(a) for a in data.get("addresses", [])]
        return cls(**data)

    @classmethod
    def all(cls) -> list[RuntimeState]:
        """Every state file in /run/lb that can be read (a daemon's, running or not)."""
        try:
            files = sorted(f for f in os.listdir(RUN_DIR)
                           if f.endswith(".json") and not f.endswith(".registrations.json"))
        except FileNotFoundError:
            return []
        states = []
        for file in files:
            try:
                state = cls.load(file.removesuffix(".json"))
            except (OSError, ValueError, TypeError):
                continue
            if state is not None:
                states.append(state)
        return states

    @classmethod
    def recorded_for(cls, config_path: str) -> list[RuntimeState]:
        """The state files of the `lb up`s that ran from `config_path` (the same file)."""
        return [state for state in cls.all()
                if state.config_path and os.path.realpath(state.config_path) == os.path.realpath(config_path)]

    @staticmethod
    def remove(name: str) -> None:
        if os.path.exists(state_path(name)):
            os.unlink(state_path(name))


def lock_path(name: str) -> str:
    return os.path.join(RUN_DIR, f"{name}.lock")


def lock(name: str) -> int:
    """Hold /run/lb/<name>.lock: one `lb up` per load balancer. The file is
    removed on exit, so after locking we check that the path still names the
    file we locked (else a daemon that was exiting removed it: try again).
    Raises AlreadyRunning when another process holds it."""
    os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    path = lock_path(name)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"another `lb up` is already running for {name!r}") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def unlock(name: str, fd: int) -> None:
    try:
        os.unlink(lock_path(name))  # while still holding it: nobody can lock it in between
    except FileNotFoundError:
        pass
    os.close(fd)


def bgp_withdrawn_path(name: str) -> str:
    """Where `lb bgp withdraw` is kept while lb is out of rotation (lb.bgp.speaker)."""
    return os.path.join(RUN_DIR, f"{name}.bgp-withdrawn")


def cookie_key_path(name: str) -> str:
    return os.path.join(RUN_DIR, f"{name}.cookie-key")


def cookie_key(name: str) -> bytes:
    """The stickiness cookies' key of <name>: the saved one, else a new random
    one saved (0600, never readable by anyone but root). A file of the wrong
    size is replaced; one others could read is replaced too (its key may
    have leaked: the cookies it signed are refused from now on)."""
    os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    path = cookie_key_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        pass
    else:
        with os.fdopen(fd, "rb") as f:
            mode, key = os.fstat(f.fileno()).st_mode, f.read(COOKIE_KEY_BYTES + 1)
        if len(key) == COOKIE_KEY_BYTES and not mode & 0o077:
            return key
        log.warning("%s: %s; a new key replaces it (sticky sessions start over)", path,
                    f"mode {mode & 0o777:o}, readable by others" if mode & 0o077 else "not a key")
    key = os.urandom(COOKIE_KEY_BYTES)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask, and if tmp was there
        f.write(key)
    os.replace(tmp, path)
    return key


def remove_cookie_key(name: str) -> None:
    try:
        os.unlink(cookie_key_path(name))
    except FileNotFoundError:
        pass


def listener_rows(config: LoadBalancer) -> list[dict[str, Any]]:
    """The listeners as `lb status` shows them: {"name", "protocol", "address", "port"}."""
    return [{"name": li.name, "protocol": li.protocol.value, "address": str(li.address), "port": li.port}
            for li in config.listeners]
