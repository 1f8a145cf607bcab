"""The load balancer's desired state as frozen dataclasses.

Built once by :mod:`lb.config` from TOML, then passed down read-only to the
controller, the data plane and the L7 workers. No I/O here, and no defaults
that lb.config does not also document: every default below is ELB's
(docs/elb-reference.md) unless its comment says otherwise.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Protocol(str, enum.Enum):
    """Listener and target group protocol."""

    HTTP = "HTTP"
    TCP = "TCP"
    UDP = "UDP"

    @property
    def is_l4(self) -> bool:
        """Served by the XDP fast path (TCP/UDP) rather than the L7 proxy."""
        return self is not Protocol.HTTP


class XdpMode(str, enum.Enum):
    """How the XDP program is attached: driver, skb, or driver with fallback."""

    NATIVE = "native"
    GENERIC = "generic"
    AUTO = "auto"


class ForwardingMode(str, enum.Enum):
    """How L4 packets reach a target (docs/architecture.md, forwarding modes)."""

    NAT = "nat"


class Algorithm(str, enum.Enum):
    """L7 load balancing algorithm of a target group."""

    ROUND_ROBIN = "round_robin"
    LEAST_OUTSTANDING_REQUESTS = "least_outstanding_requests"
    WEIGHTED_RANDOM = "weighted_random"


class ConditionField(str, enum.Enum):
    """The six ALB rule condition types."""

    HOST_HEADER = "host-header"
    PATH_PATTERN = "path-pattern"
    HTTP_HEADER = "http-header"
    HTTP_REQUEST_METHOD = "http-request-method"
    QUERY_STRING = "query-string"
    SOURCE_IP = "source-ip"


# --- health ------------------------------------------------------------------


class HealthCheckProtocol(str, enum.Enum):
    HTTP = "HTTP"
    HTTPS = "HTTPS"  # HTTP over TLS (the group's CA bundle verifies the target's certificate, if it has one)
    TCP = "TCP"

    @property
    def is_http(self) -> bool:
        """A request and its status code (HTTP or HTTPS), not only a connect."""
        return self is not HealthCheckProtocol.TCP


@dataclass(frozen=True)
class HealthCheck:
    """How a target group checks its targets.

    Defaults depend on the group's protocol (HTTP groups: HTTP GET / every
    30 s, timeout 5 s; TCP/UDP groups: TCP connect, timeout 10 s); lb.config
    fills them in, so every field here is concrete.
    """

    enabled: bool = True
    protocol: HealthCheckProtocol = HealthCheckProtocol.HTTP
    port: int | None = None  # None: the target's traffic port
    path: str = "/"
    method: str = "GET"
    interval: int = 30  # seconds, 5..300
    timeout: int = 5  # seconds, 2..120
    healthy_threshold: int = 5  # 2..10
    unhealthy_threshold: int = 2  # 2..10
    matcher: str = "200"  # "200", "200,202", "200-299"; codes 200..499


class TargetState(str, enum.Enum):
    INITIAL = "initial"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNUSED = "unused"
    DRAINING = "draining"
    UNAVAILABLE = "unavailable"


class TargetReason(str, enum.Enum):
    REGISTRATION_IN_PROGRESS = "Elb.RegistrationInProgress"
    INITIAL_HEALTH_CHECKING = "Elb.InitialHealthChecking"
    RESPONSE_CODE_MISMATCH = "Target.ResponseCodeMismatch"
    TIMEOUT = "Target.Timeout"
    FAILED_HEALTH_CHECKS = "Target.FailedHealthChecks"
    NOT_REGISTERED = "Target.NotRegistered"
    NOT_IN_USE = "Target.NotInUse"
    DEREGISTRATION_IN_PROGRESS = "Target.DeregistrationInProgress"
    HEALTH_CHECK_DISABLED = "Target.HealthCheckDisabled"


@dataclass(frozen=True)
class TargetHealth:
    """One target's health as describe-target-health reports it."""

    state: TargetState
    reason: TargetReason | None = None
    description: str = ""


# --- target groups -----------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A registered target: an IP address, an optional port override, a weight."""

    address: IPAddress
    port: int | None = None  # None: the group's port
    weight: int = 1  # our extension: share in the Maglev ring / weighted_random

    def traffic_port(self, group_port: int) -> int:
        return self.port if self.port is not None else group_port


@dataclass(frozen=True)
class Stickiness:
    """Target stickiness within a group (lb_cookie), off by default."""

    enabled: bool = False
    type: str = "lb_cookie"
    duration: int = 86400  # seconds, 1..604800


@dataclass(frozen=True)
class TargetTls:
    """What makes an HTTP target group an HTTPS one: TLS from lb to its targets.

    As ALB, lb does not verify a target's certificate unless told to: with a
    ``ca_bundle`` the chain must verify against it (names are not checked:
    targets are addresses). The PEM travels in the model, as certificates do.
    """

    ca_bundle: str | None = None  # a PEM file of CA certificates; None: no verification
    ca_pem: bytes = field(default=b"", repr=False)  # its contents, read by lb.config


@dataclass(frozen=True)
class TargetGroup:
    name: str
    protocol: Protocol
    port: int  # 1..65535
    targets: tuple[Target, ...] = ()
    health_check: HealthCheck = field(default_factory=HealthCheck)
    deregistration_delay: int = 300  # seconds, 0..3600
    slow_start: int = 0  # 0 (off) or 30..900 seconds
    algorithm: Algorithm = Algorithm.ROUND_ROBIN
    stickiness: Stickiness = field(default_factory=Stickiness)
    # TCP/UDP groups (NLB): end a target's flows when it becomes unhealthy
    # (target_health_state.unhealthy.connection_termination.enabled), and at
    # the end of its deregistration delay (deregistration_delay.connection_termination.enabled).
    unhealthy_connection_termination: bool = True
    deregistration_connection_termination: bool = False
    # HTTP groups (ALB's load_balancing.algorithm.anomaly_mitigation): a target
    # failing far more requests than its peers is weighted down (lb.health.anomaly).
    anomaly_mitigation: bool = False
    # HTTPS groups: protocol HTTP (the proxy is the same) plus TLS to the targets.
    tls: TargetTls | None = None

    # TCP/UDP groups: how packets reach the targets (docs/architecture.md,
    # forwarding modes). preserve_client_ip (NLB's preserve_client_ip.enabled)
    # false is full NAT: targets see lb's address and answer it.
    # direct_server_return: only the MAC is rewritten, the target answers
    # the client directly (it holds the VIP); needs the client's IP kept.
    preserve_client_ip: bool = True
    direct_server_return: bool = False

    @property
    def scheme(self) -> str:
        """The group's protocol as the config names it: HTTP, HTTPS, TCP, UDP."""
        return "HTTPS" if self.tls is not None else self.protocol.value

    @property
    def forwarding_mode(self) -> str:
        """The L4 forwarding mode: "nat", "full-nat" or "dsr"."""
        if self.direct_server_return:
            return "dsr"
        return "nat" if self.preserve_client_ip else "full-nat"

    def endpoints(self) -> tuple[tuple[IPAddress, int], ...]:
        """(address, port) of every target, ports resolved."""
        return tuple((t.address, t.traffic_port(self.port)) for t in self.targets)


# --- rules and actions -------------------------------------------------------


@dataclass(frozen=True)
class QueryPair:
    """One query-string condition value: key may be None (match any key)."""

    key: str | None
    value: str


@dataclass(frozen=True)
class Condition:
    """One rule condition. Any of its values matching satisfies it."""

    field: ConditionField
    values: tuple[str, ...] = ()  # host, path, method, header value patterns, CIDRs
    header_name: str | None = None  # http-header only
    query: tuple[QueryPair, ...] = ()  # query-string only


@dataclass(frozen=True)
class WeightedTargetGroup:
    name: str
    weight: int = 1  # 0..999


@dataclass(frozen=True)
class GroupStickiness:
    """Stickiness across the target groups of one forward action."""

    enabled: bool = False
    duration: int = 3600  # seconds, 1..604800


@dataclass(frozen=True)
class ForwardAction:
    target_groups: tuple[WeightedTargetGroup, ...]
    stickiness: GroupStickiness = field(default_factory=GroupStickiness)
    type: str = "forward"


@dataclass(frozen=True)
class RedirectAction:
    """Unset components keep the request's own values (the placeholders)."""

    status_code: int  # 301 or 302
    protocol: str = "#{protocol}"
    host: str = "#{host}"
    port: str = "#{port}"
    path: str = "/#{path}"
    query: str = "#{query}"
    type: str = "redirect"


@dataclass(frozen=True)
class FixedResponseAction:
    status_code: int  # 2xx, 4xx, 5xx
    content_type: str = "text/plain"
    body: str = ""
    type: str = "fixed-response"


Action = ForwardAction | RedirectAction | FixedResponseAction


@dataclass(frozen=True)
class Rule:
    priority: int  # 1..50000, unique per listener
    conditions: tuple[Condition, ...]
    action: Action


# --- TLS ---------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """A certificate as read and checked by lb.config (lb.tls.read_certificate):
    the PEM bytes themselves travel in the model, so the workers serve exactly
    what was validated, whatever happens to the files afterwards."""

    certificate_file: str  # PEM: the certificate, then its chain
    key_file: str  # PEM: its private key (may be the same file)
    chain: bytes = field(default=b"", repr=False)  # the certificates, PEM, leaf first
    key: bytes = field(default=b"", repr=False)  # the private key, PEM
    names: tuple[str, ...] = ()  # DNS names it is valid for (subjectAltName, else the CN), lower case
    not_before: float = 0.0  # Unix time
    not_after: float = 0.0  # Unix time
    key_type: str = ""  # "ECDSA P-256", "RSA 2048", ...


DEFAULT_SSL_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"


@dataclass(frozen=True)
class ListenerTls:
    """What makes an HTTP listener an HTTPS one: TLS terminated by lb.

    The default certificate is served to clients that send no SNI or a name
    no certificate has; the list adds certificates chosen by SNI, as ALB's
    certificate list (docs/elb-reference.md, HTTPS listeners).
    """

    default_certificate: Certificate
    certificates: tuple[Certificate, ...] = ()
    ssl_policy: str = DEFAULT_SSL_POLICY

    def all_certificates(self) -> tuple[Certificate, ...]:
        return (self.default_certificate, *self.certificates)


@dataclass(frozen=True)
class Listener:
    name: str
    protocol: Protocol
    address: IPAddress
    port: int
    default_action: Action
    rules: tuple[Rule, ...] = ()  # sorted by priority; HTTP listeners only
    # HTTPS listeners: protocol HTTP (the proxy is the same) plus TLS.
    tls: ListenerTls | None = None

    @property
    def scheme(self) -> str:
        """The listener's protocol as the config names it: HTTP, HTTPS, TCP, UDP."""
        return "HTTPS" if self.tls is not None else self.protocol.value


# --- the access log ------------------------------------------------------------


class AccessLogFormat(str, enum.Enum):
    TEXT = "text"  # ALB's: space-separated fields, the strings quoted
    JSON = "json"  # one JSON object a line, the same fields


@dataclass(frozen=True)
class AccessLog:
    """The L7 access log: one line per request (ALB's access_logs.* attributes,
    off by default as ALB's is; README "The access log")."""

    enabled: bool = False
    path: str = "/var/log/lb/access.log"  # "-": the daemon's standard error
    format: AccessLogFormat = AccessLogFormat.TEXT


# --- BGP: announcing the VIPs to routers (ECMP over several lb hosts) ----------


@dataclass(frozen=True)
class BgpNeighbor:
    """A router lb's BIRD peers with. An IPv4 session carries the IPv4 VIPs
    and, when there are IPv6 ones, those too (next hop: ``ipv6_next_hop``, or
    BIRD's pick of this host's IPv6 address toward the neighbour); an IPv6
    session carries the IPv6 VIPs only (docs/bgp.md)."""

    address: IPAddress
    asn: int  # 1..4294967295
    password: str | None = field(default=None, repr=False)  # TCP MD5 (RFC 2385)
    ipv6_next_hop: ipaddress.IPv6Address | None = None  # IPv4 sessions only


@dataclass(frozen=True)
class Bfd:
    """BFD on the BGP sessions: a dead host's routes go in interval × multiplier."""

    enabled: bool = False
    interval: int = 100  # ms, BIRD's min rx/tx interval
    multiplier: int = 3


@dataclass(frozen=True)
class Bgp:
    """[load_balancer.bgp]: lb announces its VIPs through BIRD 2 (docs/bgp.md).

    ``announce`` is concrete: lb.config fills in every listener address (both
    families, but 0.0.0.0 and ::) when the file names none."""

    router_id: ipaddress.IPv4Address
    local_as: int  # 1..4294967295
    neighbors: tuple[BgpNeighbor, ...]
    announce: tuple[IPAddress, ...] = ()
    hold_time: int = 90  # seconds, 3..65535; keepalives every third
    bfd: Bfd = field(default_factory=Bfd)
    communities: tuple[tuple[int, ...], ...] = ()  # (asn, value) standard, (a, b, c) large
    # Withdraw a VIP while no group behind it has a target in service (ours).
    withdraw_when_unhealthy: bool = True
    bird_socket: str = "/run/bird/bird.ctl"  # BIRD's control socket (birdc -s)
    bird_config: str = ""  # the fragment lb owns; "": /run/bird/lb-<name>.conf


# --- the load balancer -------------------------------------------------------


@dataclass(frozen=True)
class LoadBalancer:
    """The root of the model: one load balancer on one host."""

    name: str
    listeners: tuple[Listener, ...] = ()
    target_groups: tuple[TargetGroup, ...] = ()
    # Where XDP attaches; empty means derived from the routes to VIPs and targets.
    interfaces: tuple[str, ...] = ()
    xdp_mode: XdpMode = XdpMode.AUTO
    forwarding_mode: ForwardingMode = ForwardingMode.NAT
    netns: str | None = None  # network namespace to run in (the lab), None: the caller's
    idle_timeout: int = 60  # L7, seconds, 1..4000
    tcp_idle_timeout: int = 350  # L4 TCP flows, seconds
    udp_idle_timeout: int = 120  # L4 UDP flows, seconds
    tcp_closed_timeout: int = 10  # ours: an L4 TCP flow after a RST (conntrack's CLOSE), seconds
    tcp_time_wait_timeout: int = 120  # ours: an L4 TCP flow after FIN both ways (conntrack's TIME_WAIT), seconds
    new_flow_rate_limit: int = 20000  # ours: new L4 conntrack entries per CPU per second; 0: no limit
    tcp_syn_timeout: int = 60  # ours: an L4 TCP flow whose handshake is not complete (conntrack's SYN_RECV), seconds
    # ours: the XDP program's capacity (map sizes: a change needs a restart, `lb down` first)
    max_vips: int = 64  # L4 VIPs (address, port, protocol)
    max_targets: int = 1024  # L4 target endpoints, every group's counted once
    conntrack_size: int = 524288  # L4 flows whose handshake completed, and UDP flows
    half_open_size: int = 131072  # L4 TCP flows whose handshake is not complete
    full_nat_port_range: tuple[int, int] = (1024, 32767)  # ours: full NAT's source ports, inclusive
    # L7 request deadlines and the response-head bound (lb.l7.config.L7Config says why).
    header_timeout: int = 20  # seconds from a request head's first byte to its end
    body_timeout: int = 20  # seconds a request body may take from its first byte, plus:
    min_body_rate: int = 500  # one more second per this many body bytes
    max_response_head: int = 32 * 1024  # bytes of a target's status line and headers
    http2: bool = True  # HTTPS listeners offer HTTP/2 by ALPN (ALB's routing.http2.enabled)
    tls_session_resumption: bool = True  # ours: HTTPS listeners resume sessions; off: no tickets, no session cache
    ring_size: int = 65537  # Maglev table size M, a prime
    workers: int = 0  # L7 worker processes; 0: one per core
    access_log: AccessLog = field(default_factory=AccessLog)  # ours: L7 requests; reloadable
    admin_socket: str = "/run/lb/admin.sock"
    metrics_address: str = "127.0.0.1:9464"
    bgp: Bgp | None = None  # ours: announce the VIPs by BGP (several hosts behind ECMP)

    def target_group(self, name: str) -> TargetGroup:
        for group in self.target_groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def listeners_of(self, *protocols: Protocol) -> tuple[Listener, ...]:
        return tuple(listener for listener in self.listeners if listener.protocol in protocols)
