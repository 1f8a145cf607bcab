"""[load_balancer.bgp]: the model it builds, its defaults, every rejection at its key path.

Bad inputs are a table, as in tests/test_config.py: each case edits a
known-good config and names the one issue expected. No root needed.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

from lb import config
from lb.config import ConfigError
from lb.labhosts import LB_AS, ROUTER_AS, ScaleLab
from lb.model import Bfd, BgpNeighbor
from tests.test_config import DELETE, edit, good

B = "load_balancer.bgp"


def with_bgp(**extra: object) -> dict[str, Any]:
    data = good()
    data["load_balancer"]["bgp"] = {
        "router_id": "10.0.10.2",
        "local_as": 65001,
        "neighbors": [{"address": "10.0.10.1", "as": 65000}],
        **extra,
    }
    return data


def test_defaults() -> None:
    bgp = config.parse(with_bgp()).bgp
    assert bgp is not None
    assert bgp.router_id == ipaddress.IPv4Address("10.0.10.2")
    assert bgp.local_as == 65001
    assert bgp.neighbors == (BgpNeighbor(ipaddress.IPv4Address("10.0.10.1"), 65000, None),)
    # Every listener address, once (the good config's three listeners share one).
    assert bgp.announce == (ipaddress.IPv4Address("10.0.0.100"),)
    assert (bgp.hold_time, bgp.bfd, bgp.communities) == (90, Bfd(False, 100, 3), ())
    assert bgp.withdraw_when_unhealthy is True
    assert (bgp.bird_socket, bgp.bird_config) == ("/run/bird/bird.ctl", "")


def test_no_table_no_bgp() -> None:
    assert config.parse(good()).bgp is None


def test_explicit_values_are_kept() -> None:
    bgp = config.parse(with_bgp(
        neighbors=[{"address": "10.0.10.1", "as": 65000, "password": "s3cr#t!"},
                   {"address": "10.0.11.1", "as": 4200000000}],
        hold_time=3, bfd={"enabled": True, "interval": 50, "multiplier": 5},
        communities=["65001:100", "4200000000:1:2"], announce=["10.0.0.100"], withdraw_when_unhealthy=False,
        bird_socket="/run/x/bird.ctl", bird_config="/etc/bird/lb/t.conf",
    )).bgp
    assert bgp is not None
    assert bgp.neighbors[0].password == "s3cr#t!" and bgp.neighbors[1].asn == 4200000000
    assert "s3cr" not in repr(bgp)  # a password never reaches a log line or `lb status`
    assert (bgp.hold_time, bgp.bfd) == (3, Bfd(True, 50, 5))
    assert bgp.communities == ((65001, 100), (4200000000, 1, 2))
    assert bgp.withdraw_when_unhealthy is False
    assert (bgp.bird_socket, bgp.bird_config) == ("/run/x/bird.ctl", "/etc/bird/lb/t.conf")


def test_every_listener_address_of_both_families_is_announced_by_default() -> None:
    data = with_bgp()
    data["listeners"][0]["address"] = "fd00::100"  # an HTTP listener: IPv6 passes today's listener checks
    bgp = config.parse(data).bgp
    assert bgp is not None
    assert bgp.announce == (ipaddress.IPv4Address("10.0.0.100"), ipaddress.IPv6Address("fd00::100"))


def test_ipv6_vips_and_neighbors() -> None:
    """An IPv6 VIP named in announce; an IPv6 neighbour (its session carries
    IPv6 only); an IPv4 neighbour with an explicit IPv6 next hop."""
    data = with_bgp(
        neighbors=[{"address": "fd00:10::1", "as": 65000},
                   {"address": "10.0.11.1", "as": 65000, "ipv6_next_hop": "fd00:11::2"}],
        announce=["fd00::100", "10.0.0.100"])
    data["listeners"][0]["address"] = "fd00::100"
    bgp = config.parse(data).bgp
    assert bgp is not None
    assert bgp.announce == (ipaddress.IPv6Address("fd00::100"), ipaddress.IPv4Address("10.0.0.100"))
    assert bgp.neighbors == (
        BgpNeighbor(ipaddress.IPv6Address("fd00:10::1"), 65000),
        BgpNeighbor(ipaddress.IPv4Address("10.0.11.1"), 65000, ipv6_next_hop=ipaddress.IPv6Address("fd00:11::2")),
    )


def test_an_ipv6_only_host() -> None:
    """IPv6 VIPs only, over an IPv6 session (the router ID stays a 32-bit one)."""
    data = with_bgp(neighbors=[{"address": "fd00:10::1", "as": 65000}])
    data["listeners"] = [data["listeners"][0]]
    data["listeners"][0]["address"] = "fd00::100"
    bgp = config.parse(data).bgp
    assert bgp is not None and bgp.announce == (ipaddress.IPv6Address("fd00::100"),)


def test_listeners_on_every_address_are_not_announced() -> None:
    """An HTTP listener on 0.0.0.0 or :: (every local address) has no VIP of
    its own: a /32 or /128 of the unspecified address is no route to announce."""
    data = with_bgp()
    data["listeners"][0]["address"] = "::"
    data["listeners"][0]["port"] = 8080
    extra = copy.deepcopy(data["listeners"][0])
    extra.update(name="web4", address="0.0.0.0")
    data["listeners"].append(extra)
    bgp = config.parse(data).bgp
    assert bgp is not None and bgp.announce == (ipaddress.IPv4Address("10.0.0.100"),)
    data["load_balancer"]["bgp"]["announce"] = ["10.0.0.100", "::"]
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    assert [(i.path, i.message) for i in info.value.errors] == [
        (f"{B}.announce[1]", ":: is the unspecified address (a listener on every address): "
                             "announce the addresses clients connect to")]


def case(edits: dict[str, object], path: str, *words: str, id: str) -> Any:
    return pytest.param(edits, path, words, id=id)


N0 = f"{B}.neighbors[0]"
BAD = [
    case({f"{B}.routerid": "1.2.3.4"}, f"{B}.routerid", "unknown key", "router_id", id="unknown-key"),
    case({f"{B}.router_id": DELETE}, f"{B}.router_id", "required", id="router-id-missing"),
    case({f"{B}.router_id": "fd00::1"}, f"{B}.router_id", "not an IPv4", "32 bits", id="router-id-v6"),
    case({f"{B}.router_id": "r1"}, f"{B}.router_id", "not an IPv4 or IPv6", id="router-id-name"),
    case({f"{B}.local_as": 0}, f"{B}.local_as", "outside 1..4294967295", id="as-zero"),
    case({f"{B}.local_as": 2**32}, f"{B}.local_as", "outside", id="as-big"),
    case({f"{B}.local_as": "65001"}, f"{B}.local_as", "expected an integer", id="as-string"),
    case({f"{B}.neighbors": []}, f"{B}.neighbors", "at least 1", id="no-neighbors"),
    case({f"{B}.neighbors": DELETE}, f"{B}.neighbors", "required", id="neighbors-missing"),
    case({f"{B}.neighbors": [{"address": f"10.0.10.{i}", "as": 1} for i in range(17)]}, f"{B}.neighbors",
         "at most 16", id="too-many-neighbors"),
    case({f"{B}.neighbors[1]": {"address": "10.0.10.1", "as": 65000}}, f"{B}.neighbors[1].address",
         "duplicate neighbor address", id="duplicate-neighbor"),
    case({f"{N0}.as": DELETE}, f"{N0}.as", "required", id="neighbor-as-missing"),
    case({f"{N0}.asn": 1}, f"{N0}.asn", "unknown key", "'as'", id="neighbor-unknown-key"),
    case({f"{N0}.address": "fe80::1"}, f"{N0}.address", "link-local", "global", id="neighbor-link-local"),
    case({f"{N0}.address": "::ffff:10.0.10.1"}, f"{N0}.address", "IPv4-mapped", "10.0.10.1", id="neighbor-mapped"),
    case({f"{B}.neighbors[1]": {"address": "fd00:10:0::1", "as": 1}, f"{N0}.address": "fd00:10::1"},
         f"{B}.neighbors[1].address", "duplicate neighbor address", id="duplicate-neighbor-v6"),
    case({f"{N0}.ipv6_next_hop": "10.0.10.2"}, f"{N0}.ipv6_next_hop", "not an IPv6 address", id="next-hop-v4"),
    case({f"{N0}.ipv6_next_hop": "fe80::2"}, f"{N0}.ipv6_next_hop", "link-local", id="next-hop-link-local"),
    case({f"{N0}.ipv6_next_hop": "ff02::2"}, f"{N0}.ipv6_next_hop", "not a unicast", id="next-hop-multicast"),
    case({f"{N0}.address": "fd00:10::1", f"{N0}.ipv6_next_hop": "fd00:10::2"}, f"{N0}.ipv6_next_hop",
         "IPv6 neighbor", "own address is the next hop", id="next-hop-on-v6-session"),
    case({f"{N0}.password": 'a"b'}, f"{N0}.password", "printable ASCII", id="password-quote"),
    case({f"{N0}.password": "a b"}, f"{N0}.password", "printable ASCII", id="password-space"),
    case({f"{N0}.password": "x" * 81}, f"{N0}.password", "at most 80", id="password-long"),
    case({f"{B}.hold_time": 2}, f"{B}.hold_time", "outside 3..65535", id="hold-time"),
    case({f"{B}.bfd": {"enabled": True, "interval": 5}}, f"{B}.bfd.interval", "outside 10..10000", id="bfd-interval"),
    case({f"{B}.bfd": {"multiplier": 0}}, f"{B}.bfd.multiplier", "outside 1..255", id="bfd-multiplier"),
    case({f"{B}.bfd": {"enable": True}}, f"{B}.bfd.enable", "did you mean 'enabled'", id="bfd-unknown-key"),
    case({f"{B}.bfd": True}, f"{B}.bfd", "expected a table", id="bfd-not-table"),
    case({f"{B}.communities": ["65536:1"]}, f"{B}.communities[0]", "not a community", id="community-big"),
    case({f"{B}.communities": ["no-export"]}, f"{B}.communities[0]", "not a community", id="community-word"),
    case({f"{B}.communities": ["1:2", "1:2"]}, f"{B}.communities[1]", "listed twice", id="community-twice"),
    case({f"{B}.announce": ["10.0.0.9"]}, f"{B}.announce[0]", "no listener's address", "10.0.0.100",
         id="announce-not-listener"),
    case({f"{B}.announce": ["fd00::1"]}, f"{B}.announce[0]", "no listener's address", id="announce-v6-not-listener"),
    case({f"{B}.announce": ["10.0.0.100"], f"{N0}.address": "fd00:10::1"}, f"{B}.announce[0]",
         "IPv4", "every neighbor is IPv6", "IPv4 neighbor", id="announce-v4-without-v4-session"),
    case({f"{N0}.address": "fd00:10::1"}, f"{B}.neighbors", "10.0.0.100", "every neighbor is IPv6",
         id="default-announce-v4-without-v4-session"),
    case({f"{B}.announce": ["10.0.0.100", "10.0.0.100"]}, f"{B}.announce[1]", "listed twice", id="announce-twice"),
    case({f"{B}.announce": []}, f"{B}.announce", "at least 1", id="announce-empty"),
    case({f"{B}.announce": "10.0.0.100"}, f"{B}.announce", "expected an array", id="announce-string"),
    case({f"{B}.withdraw_when_unhealthy": "yes"}, f"{B}.withdraw_when_unhealthy", "boolean", id="unhealthy-bool"),
    case({f"{B}.bird_socket": "bird.ctl"}, f"{B}.bird_socket", "absolute", id="socket-relative"),
    case({f"{B}.bird_socket": "/" + "x" * 107}, f"{B}.bird_socket", "at most 107", id="socket-long"),
    case({f"{B}.bird_config": "/etc/bird/"}, f"{B}.bird_config", "directory", id="fragment-dir"),
    case({"load_balancer.bgp": "on"}, "load_balancer.bgp", "expected a table", id="bgp-not-table"),
]


@pytest.mark.parametrize(("edits", "path", "words"), BAD)
def test_bad_input_is_reported_at_its_key_path(edits: dict[str, object], path: str, words: tuple[str, ...]) -> None:
    data = with_bgp()
    for key_path, value in edits.items():
        edit(data, key_path, value)
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    issues = info.value.errors
    assert [issue.path for issue in issues] == [path], issues  # exactly one issue, no cascade
    for word in words:
        assert word in issues[0].message


def test_nothing_to_announce() -> None:
    data = with_bgp()
    data["listeners"] = [data["listeners"][0]]
    data["listeners"][0]["address"] = "::"
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    assert [(i.path, i.message) for i in info.value.errors] == [
        (B, "nothing to announce: every listener is on the unspecified address (::)")]


def test_the_scale_out_labs_host_configs() -> None:
    """`lb lab up --hosts 2` writes the embedded config made each host's: its
    name, namespace, interfaces, admin socket and BGP identity; the rest equal."""
    lab = ScaleLab("x", hosts=2)
    models = [config.loads(lab.host_config(config.default_config_text(), h)) for h in lab.lb_hosts]
    for model, host in zip(models, lab.lb_hosts, strict=True):
        assert (model.name, model.netns, model.admin_socket) == (f"x-lb{host.index}", host.netns,
                                                                  f"/run/lb/x-lb{host.index}.sock")
        assert model.interfaces == lab.lb_interfaces
        assert model.bgp is not None
        assert (str(model.bgp.router_id), model.bgp.local_as) == (host.address, LB_AS)
        assert [(str(n.address), n.asn) for n in model.bgp.neighbors] == [(host.router_address, ROUTER_AS)]
        assert model.bgp.bird_socket == host.bird.socket
    assert models[0].listeners == models[1].listeners and models[0].target_groups == models[1].target_groups
