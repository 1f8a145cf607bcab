"""What lb announces, and when: the policy over lb.bgp.fragment and lb.bgp.bird.

A VIP is announced while lb serves it: the listener's data path is ready
(the XDP program attached for TCP/UDP, the workers listening for HTTP) and
a target group behind one of the address's listeners has a target in
service — with ``withdraw_when_unhealthy`` a healthy one (or one whose
checks are off), not merely the fail-open set. A listener whose actions
forward to no group (a fixed response, a redirect) is served by lb itself.

`lb bgp withdraw` takes the host out of rotation: nothing is announced,
the flows already here go on for the drain period (the longest
``deregistration_delay`` of its groups), and the daemon keeps serving;
`lb bgp announce` puts it back. The withdrawal is kept in ``withdrawn_file``
(the daemon's: /run/lb/<name>.bgp-withdrawn), so a restarted daemon stays
out of rotation until `lb bgp announce` or `lb down`. SIGTERM withdraws
before anything stops; `lb down` removes the fragment.

Every change rewrites the fragment and asks BIRD to re-read its config; a
BIRD that does not answer is retried by the daemon (``dirty``), never waited
for on the event loop for more than lb.bgp.bird.TIMEOUT.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any, Protocol

from lb.bgp import bird, fragment, nexthop
from lb.model import Bgp, ForwardAction, IPAddress, Listener, LoadBalancer, Target, TargetHealth, TargetState

log = logging.getLogger("lb.bgp")

Address = IPAddress  # a VIP of either family


class HealthView(Protocol):
    """What the speaker reads of lb.health."""

    def in_service(self, group: str) -> tuple[Target, ...]: ...

    def registered(self, group: str) -> tuple[Target, ...]: ...

    def target_health(self, group: str, target: Target) -> TargetHealth: ...


def listener_groups(listener: Listener) -> set[str]:
    """The target groups a listener forwards to, in any rule."""
    actions = [listener.default_action, *(rule.action for rule in listener.rules)]
    return {g.name for a in actions if isinstance(a, ForwardAction) for g in a.target_groups}


def group_serves(group: str, health: HealthView, strict: bool) -> bool:
    if not strict:
        return bool(health.in_service(group))
    good = (TargetState.HEALTHY, TargetState.UNAVAILABLE)
    return any(health.target_health(group, t).state in good for t in health.registered(group))


def served(config: LoadBalancer, health: HealthView, l4_ready: bool, l7_ready: bool) -> frozenset[Address]:
    """The listener addresses (both families) lb can serve right now."""
    strict = config.bgp.withdraw_when_unhealthy if config.bgp is not None else True
    result = set()
    for listener in config.listeners:
        if not (l4_ready if listener.protocol.is_l4 else l7_ready):
            continue
        groups = listener_groups(listener)
        if not groups or any(group_serves(g, health, strict) for g in groups):
            result.add(listener.address)
    return frozenset(result)


class SpeakerError(RuntimeError):
    """BIRD cannot carry lb's announcements; the message says what to do."""


class Speaker:
    """One load balancer's announcements through one BIRD."""

    def __init__(self, config: LoadBalancer, withdrawn_file: str | None = None) -> None:
        assert config.bgp is not None
        # --- settings, replaced on reload
        self.name = config.name
        self.bgp: Bgp = config.bgp
        self.path = fragment.fragment_path(config.bgp, config.name)
        self.drain_seconds = max((g.deregistration_delay for g in config.target_groups), default=0)
        # --- what is wanted and what BIRD was last told
        self.serving: frozenset[Address] = frozenset()
        self.withdrawn_file = withdrawn_file  # where `lb bgp withdraw` outlives a restart
        self.withdrawn_at: float | None = read_withdrawn(withdrawn_file)  # wall clock; None: in rotation
        if self.withdrawn_at is not None:
            log.info("BGP: out of rotation since %s (`lb bgp withdraw`; `lb bgp announce` puts it back)",
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.withdrawn_at)))
        self.announced: tuple[Address, ...] | None = None  # None: BIRD not told yet, or told and failed
        self.dirty = False  # the last write or configure failed: retry

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """At `lb up`, before anything else is set up: BIRD must answer and
        read our fragment, and every session that carries IPv6 VIPs have an
        IPv6 next hop. Writes the fragment announcing nothing (the sessions
        come up meanwhile); on any failure removes it again and raises."""
        problems = nexthop.missing_ipv6_next_hops(self.bgp)
        if problems:
            raise SpeakerError("\n".join(problems))
        try:
            bird.command(self.bgp.bird_socket, "show status")
            self._apply(())
            ours = {row.name for row in bird.protocols(self.bgp.bird_socket, f"{fragment.symbol_prefix(self.name)}*")}
        except (bird.BirdError, OSError) as exc:
            self._remove_quietly()
            raise SpeakerError(f"load_balancer.bgp: {exc}") from None
        if fragment.peer_name(self.name, 0) not in ours:
            self._remove_quietly()
            raise SpeakerError(
                f"load_balancer.bgp: BIRD ({self.bgp.bird_socket}) does not read {self.path}: add "
                f"{fragment.include_line(self.path)} to its config (bird.conf), then birdc configure")

    def update(self, serving: Iterable[Address]) -> None:
        """The addresses lb serves now; tells BIRD when what it announces changes."""
        self.serving = frozenset(serving)
        self.sync()

    def sync(self) -> bool:
        """Bring BIRD to what is wanted; False (and ``dirty``) when BIRD failed."""
        wanted = self.wanted()
        if wanted == self.announced and not self.dirty:
            return True
        try:
            self._apply(wanted)
        except (bird.BirdError, OSError) as exc:
            if not self.dirty:
                log.error("BGP: cannot announce %s: %s (retrying)", _show(wanted), exc)
            self.dirty = True
            return False
        if self.dirty:
            log.info("BGP: BIRD answers again")
        self.dirty = False
        return True

    def wanted(self) -> tuple[Address, ...]:
        if self.withdrawn_at is not None:
            return ()
        return tuple(a for a in self.bgp.announce if a in self.serving)

    def set_config(self, config: LoadBalancer) -> None:
        """Reload: new sessions or VIPs take effect at the next sync."""
        assert config.bgp is not None
        path = fragment.fragment_path(config.bgp, config.name)
        if (path, config.bgp.bird_socket) != (self.path, self.bgp.bird_socket):
            self._remove_quietly()  # the old BIRD (or file) lets our sessions go
        self.bgp, self.path = config.bgp, path
        self.drain_seconds = max((g.deregistration_delay for g in config.target_groups), default=0)
        self.announced = None  # rewrite at the next sync (BIRD restarts a session whose settings changed)

    def withdraw_all(self) -> None:
        """SIGTERM: announce nothing, at once (the sessions stay; `lb down` ends them)."""
        self.withdrawn_at = self.withdrawn_at or time.time()
        self.sync()

    # --- `lb bgp` --------------------------------------------------------------------

    def withdraw(self) -> dict[str, Any]:
        if self.withdrawn_at is None:
            self.withdrawn_at = time.time()
            log.info("BGP: withdrawn by the operator; flows here go on for %d s", self.drain_seconds)
        write_withdrawn(self.withdrawn_file, self.withdrawn_at)
        self.sync()
        return self.status()

    def announce(self) -> dict[str, Any]:
        if self.withdrawn_at is not None:
            log.info("BGP: back in rotation")
        self.withdrawn_at = None
        write_withdrawn(self.withdrawn_file, None)
        self.sync()
        return self.status()

    def status(self) -> dict[str, Any]:
        """Sessions and announced prefixes as BIRD has them, and lb's view."""
        result: dict[str, Any] = {
            "bird_socket": self.bgp.bird_socket,
            "fragment": self.path,
            "in_rotation": self.withdrawn_at is None,
            "withdrawn_at": self.withdrawn_at,
            "drain_until": None if self.withdrawn_at is None else self.withdrawn_at + self.drain_seconds,
            "wanted": [str(a) for a in self.wanted()],
            "pending": self.dirty,
        }
        result.update(read_bird(self.bgp, self.name))
        return result

    def _apply(self, wanted: tuple[Address, ...]) -> None:
        fragment.write(self.path, fragment.render(self.bgp, self.name, wanted))
        self.announced = None
        bird.configure(self.bgp.bird_socket)
        self.announced = wanted
        log.info("BGP: announcing %s", _show(wanted))

    def remove(self) -> None:
        """`lb up` failed after start(): take the fragment out again."""
        self._remove_quietly()

    def _remove_quietly(self) -> None:
        if fragment.remove(self.path):
            try:
                bird.configure(self.bgp.bird_socket)
            except bird.BirdError:
                pass


def read_bird(bgp: Bgp, name: str) -> dict[str, Any]:
    """What BIRD says of lb's sessions and routes, or the error."""
    try:
        rows = bird.protocols(bgp.bird_socket, f"{fragment.symbol_prefix(name)}peer*")
        prefixes = [prefix for version in fragment.families(bgp)
                    for prefix in bird.routes(bgp.bird_socket, fragment.table_name(name, version))]
    except bird.BirdError as exc:
        return {"sessions": [], "announced": [], "error": str(exc)}
    by_name = {row.name: row for row in rows}
    sessions = []
    for index, neighbor in enumerate(bgp.neighbors):
        row = by_name.get(fragment.peer_name(name, index))
        sessions.append({
            "neighbor": str(neighbor.address), "as": neighbor.asn,
            "protocol": fragment.peer_name(name, index),
            "state": row.state if row else "absent", "info": row.info if row else "",
            "since": row.since if row else "",
        })
    return {"sessions": sessions, "announced": prefixes, "error": None}


def remove(bgp: Bgp, name: str) -> bool:
    """`lb down`: take lb's fragment out of BIRD (routes and sessions). True
    when there was one; a BIRD that does not answer is an error."""
    return remove_fragment(fragment.fragment_path(bgp, name), bgp.bird_socket)


def remove_fragment(path: str, bird_socket: str) -> bool:
    """remove() by the fragment's path and BIRD's socket, as the state file
    records them (`lb down` with a config that no longer loads)."""
    if not fragment.remove(path):
        return False
    try:
        bird.configure(bird_socket)
    except bird.BirdError as exc:
        raise SpeakerError(f"removed {path}, but BIRD did not re-read its config: {exc}") from None
    return True


def read_withdrawn(path: str | None) -> float | None:
    """When the operator withdrew (the file's time), or None: in rotation."""
    if path is None:
        return None
    try:
        with open(path) as f:
            return float(f.read().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable: out of rotation is the safe reading
        log.warning("%s: %s; staying out of rotation (`lb bgp announce` puts it back)", path, exc)
        return time.time()


def write_withdrawn(path: str | None, when: float | None) -> None:
    """Keep (or, with None, forget) the operator's withdrawal across restarts."""
    if path is None:
        return
    if when is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{when}\n")
    os.replace(tmp, path)


def _show(addresses: tuple[Address, ...]) -> str:
    return ", ".join(str(a) for a in addresses) or "nothing"
