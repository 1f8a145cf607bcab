"""The access log (lb.l7.access_log): its lines against the requests sent, in
both formats, lb's own errors with their reasons; the request id; the 5xx
split in the metrics; and, through a real `lb up`, SIGUSR1 after a rename
(logrotate's way) and SIGTERM, neither losing a line."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb import metrics
from lb import model as m
from lb.l7 import access_log
from lb.model import LoadBalancer
from tests.daemon_fixture import RunningDaemon
from tests.l7_backends import (
    HOST,
    Client,
    ThreadedBackends,
    backend,
    forward_to,
    free_port,
    http_listener,
    parse_access_line,
    proxy,
    raw_exchange,
    read_access_log,
    routing_table,
    run,
    target_group,
)
from tests.names import name
from tests.tls_certs import Certs, tls_request


def path_rule(priority: int, pattern: str, action: m.Action) -> m.Rule:
    return m.Rule(priority, (m.Condition(m.ConditionField.PATH_PATTERN, (pattern,)),), action)


def rules_listener() -> m.Listener:
    return http_listener(forward_to("g"), (
        path_rule(10, "/fixed", m.FixedResponseAction(503, "text/plain", "down for maintenance")),
        path_rule(20, "/old", m.RedirectAction(301, path="/new")),
        path_rule(30, "/dead/*", forward_to("dead")),
    ))


# --- the lines, against what was sent ------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_each_line_says_what_happened_to_its_request(tmp_path: Path, log_format: str) -> None:
    log_file = tmp_path / "access.log"
    dead = free_port()  # nothing listens: connect refused
    seen: dict[str, Any] = {}

    async def body() -> None:
        async with backend("http", "b1") as b:
            table = routing_table(rules_listener(), (target_group("g", b), target_group("dead", (HOST, dead, 1))),
                                  access_log=str(log_file), log_format=log_format)
            async with proxy(table) as (worker, port):
                seen["port"], seen["target"] = port, f"{HOST}:{b.port}"
                async with await Client.open(port) as client:
                    # 1. forwarded; the client's request id and user agent (with a quote and a non-ASCII byte)
                    r = await client.request("GET", "/hello?x=1", {"User-Agent": 'curl/8 "q" \xe9',
                                                                   "X-Request-Id": "client-id-1"})
                    seen["echo1"] = r.json()
                    # 2. forwarded, no id: lb makes one and passes it on
                    seen["echo2"] = (await client.request("GET", "/second")).json()
                    # 3. the target's own 500
                    assert (await client.request("GET", "/status/500")).status == 500
                    # 4. a fixed response, 5. a redirect
                    assert (await client.request("GET", "/fixed")).status == 503
                    assert (await client.request("GET", "/old?q=1")).status == 301
                    # 6. lb's own 502: the target refuses the connection
                    assert (await client.request("POST", "/dead/x", body=b"abc")).status == 502
                # 7. a malformed request: 400 and close
                answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: 1\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 400 ")
                seen["snapshot"] = worker.stats.snapshot()

    run(body())
    lines = log_file.read_text().splitlines()
    assert len(lines) == 7
    assert lines[0].startswith("{" if log_format == "json" else "http ")
    records = [parse_access_line(line) for line in lines]
    port, target = seen["port"], seen["target"]
    for r in records:
        assert r["type"] == "http" and r["listener"] == "web"
        assert r["client"].startswith("127.0.0.1:")
        assert r["time"] >= r["request_creation_time"]
        assert r["time"].endswith("Z") and len(r["time"]) == len("2024-01-01T00:00:00.000000Z")
        assert len(r["request_id"]) == 32 or r["request_id"] == "client-id-1"
    forwarded, generated, failed, fixed, redirect, refused, malformed = records

    assert forwarded["request"] == f"GET http://example.com:{port}/hello?x=1 HTTP/1.1"
    assert forwarded["user_agent"] == ('curl/8 \\x22q\\x22 \\xe9' if log_format == "text"
                                       else 'curl/8 "q" \xe9')  # JSON: \u0022, \u00e9 (json.loads undid them)
    assert forwarded["request_id"] == "client-id-1"
    assert [v for n, v in seen["echo1"]["headers"] if n.lower() == "x-request-id"] == ["client-id-1"]
    assert (forwarded["target"], forwarded["target_group"]) == (target, "g")
    assert (forwarded["elb_status_code"], forwarded["target_status_code"]) == (200, 200)
    assert forwarded["matched_rule_priority"] == 0  # the default rule (ALB's 0)
    assert forwarded["actions_executed"] == "forward" and forwarded["error_reason"] is None
    assert forwarded["received_bytes"] > 50 and forwarded["sent_bytes"] > 100
    assert forwarded["request_processing_time"] >= 0 and forwarded["target_processing_time"] >= 0
    assert forwarded["response_processing_time"] >= 0
    assert forwarded["redirect_url"] is None
    assert all(r["ssl_cipher"] is None and r["ssl_protocol"] is None for r in records)  # plain HTTP

    assert [v for n, v in seen["echo2"]["headers"] if n.lower() == "x-request-id"] == [generated["request_id"]]
    assert generated["user_agent"] is None

    assert (failed["elb_status_code"], failed["target_status_code"], failed["error_reason"]) == (500, 500, None)
    assert failed["target"] == target

    assert (fixed["elb_status_code"], fixed["target_status_code"], fixed["target"]) == (503, None, None)
    assert (fixed["matched_rule_priority"], fixed["actions_executed"]) == (10, "fixed-response")
    assert fixed["target_processing_time"] == -1 and fixed["request_processing_time"] >= 0

    assert (redirect["elb_status_code"], redirect["actions_executed"], redirect["matched_rule_priority"]) == (
        301, "redirect", 20)
    assert redirect["request"] == f"GET http://example.com:{port}/old?q=1 HTTP/1.1"
    assert redirect["redirect_url"] == f"http://example.com:{port}/new?q=1"  # the Location sent
    assert all(r["redirect_url"] is None for r in records if r is not redirect)

    assert (refused["elb_status_code"], refused["target_status_code"]) == (502, None)
    assert (refused["target"], refused["target_group"]) == (f"{HOST}:{dead}", "dead")
    assert refused["error_reason"] == "TargetConnectionError" and refused["actions_executed"] == "forward"
    assert refused["target_processing_time"] == -1 and refused["response_processing_time"] == -1
    assert refused["received_bytes"] > 3  # the head and its 3 body bytes

    assert (malformed["elb_status_code"], malformed["target_status_code"]) == (400, None)
    assert (malformed["error_reason"], malformed["actions_executed"]) == ("RequestMalformed", None)
    assert (malformed["target"], malformed["target_group"], malformed["matched_rule_priority"]) == (None, None, None)

    # The metrics count lb's 5xx apart from the targets' (ALB's HTTPCode_ELB_5XX_Count / HTTPCode_Target_5XX_Count).
    collector = metrics.Collector(lambda: LoadBalancer(name=name("nothing-pinned")),
                                  l7_stats=lambda: [seen["snapshot"]])
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in collector._l7(LoadBalancer(name="x")) for s in family.samples}

    def total(metric: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items() if n == metric and set(labels.items()) <= ls)

    assert total("lb_http_elb_5xx_total", listener="web", group="dead", target=f"{HOST}:{dead}") == 1
    assert total("lb_http_elb_5xx_total") == 2  # the 502 and the fixed 503
    assert total("lb_http_target_5xx_total", listener="web", group="g", target=target) == 1
    assert total("lb_http_target_5xx_total") == 1
    assert total("lb_http_elb_4xx_total") == 1  # the 400
    assert total("lb_http_upstream_latency_seconds_count", group="g", target=target) == 3


def test_lb_made_errors_have_their_reasons(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"

    async def body() -> None:
        async with backend("garbage") as garbage, backend("http") as b:
            table = routing_table(http_listener(forward_to("g"), (
                path_rule(1, "/garbage", forward_to("bad")),
                path_rule(2, "/nobody", forward_to("empty")),
            )), (target_group("g", b), target_group("bad", garbage), target_group("empty")),
                access_log=str(log_file), log_format="json")
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    assert (await client.request("GET", "/garbage")).status == 502
                async with await Client.open(port) as client:
                    assert (await client.request("GET", "/nobody")).status == 503
                too_long = b"GET /" + b"a" * (17 * 1024) + b" HTTP/1.1\r\nHost: a\r\n\r\n"
                assert (await raw_exchange(port, too_long)).startswith(b"HTTP/1.1 400 ")
                assert (await raw_exchange(port, b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n")).startswith(
                    b"HTTP/1.1 405 ")
                assert (await raw_exchange(port, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n")
                        ).startswith(b"HTTP/1.1 501 ")
                with socket.create_connection((HOST, port)) as sock:  # resets before its answer
                    sock.sendall(b"GET /slow?ms=300 HTTP/1.1\r\nHost: a\r\n\r\n")
                    await asyncio.sleep(0.1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await asyncio.sleep(0.1)

    run(body())
    records = read_access_log(log_file)
    reasons = [(r["elb_status_code"], r["target_status_code"], r["error_reason"]) for r in records]
    assert reasons == [
        (502, None, "TargetResponseMalformed"),
        (503, None, "NoTargetInService"),
        (400, None, "RequestHeadTooLarge"),
        (405, None, "MethodNotAllowed"),
        (501, None, "TransferEncodingNotImplemented"),
        (460, None, "ClientClosed"),
    ]
    assert records[1]["target_group"] == "empty" and records[1]["target"] is None
    assert records[3]["request"].startswith("TRACE http://a:")


def test_a_request_id_lb_cannot_log_safely_is_replaced() -> None:
    async def body() -> None:
        async with backend("http") as b:
            async with proxy(routing_table(http_listener(forward_to("g")), (target_group("g", b),))) as (_, port):
                async with await Client.open(port) as client:
                    ids = []
                    for sent in ('has "quotes"', "x" * 129, "ok-1"):
                        echo = (await client.request("GET", "/", {"X-Request-Id": sent})).json()
                        ids.append([v for n, v in echo["headers"] if n.lower() == "x-request-id"])
                    client.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: first\r\nX-Request-Id: second\r\n\r\n")
                    echo = (await client.response()).json()
                    ids.append([v for n, v in echo["headers"] if n.lower() == "x-request-id"])
        assert len(ids[0]) == 1 and len(ids[0][0]) == 32 and ids[0][0] != ids[1][0]
        assert len(ids[1]) == 1 and len(ids[1][0]) == 32
        assert ids[2] == ["ok-1"] and ids[3] == ["first"]  # exactly one goes on

    run(body())


def test_a_table_update_moves_or_closes_the_log(tmp_path: Path) -> None:
    """What `lb reload` does with a changed access_log: each worker flushes and reopens."""
    first, second = tmp_path / "first.log", tmp_path / "second.log"

    async def body() -> None:
        async with backend("http") as b:
            groups = (target_group("g", b),)
            listener = http_listener(forward_to("g"))
            async with proxy(routing_table(listener, groups, access_log=str(first))) as (worker, port):
                async with await Client.open(port) as client:
                    await client.request("GET", "/one")
                    await worker.update(routing_table(listener, groups, version=2, access_log=str(second),
                                                      log_format="json"))
                    await client.request("GET", "/two")
                    await worker.update(routing_table(listener, groups, version=3))  # off
                    await client.request("GET", "/three")

    run(body())
    assert [r["request"].split()[1].rsplit("/", 1)[1] for r in read_access_log(first)] == ["one"]
    assert [r["request"].split()[1].rsplit("/", 1)[1] for r in read_access_log(second)] == ["two"]
    assert second.read_text().startswith("{")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_https_listener_logs_https_and_the_handshake(tmp_path: Path, log_format: str) -> None:
    certs = Certs(tmp_path)
    log_file = tmp_path / "access.log"

    async def body() -> None:
        async with backend("http") as b:
            listener = http_listener(forward_to("g"), tls=certs.listener_tls("www.example.com"),
                                     rules=(path_rule(5, "/old", m.RedirectAction(302, path="/new")),))
            table = routing_table(listener, (target_group("g", b),), access_log=str(log_file), log_format=log_format)
            async with proxy(table) as (_, port):
                shake = await asyncio.to_thread(tls_request, port, certs.client())
                assert shake.response.startswith(b"HTTP/1.1 200 ")
                seen["port"], seen["shake"] = port, shake
                # TLS 1.2 with a named cipher: what the handshake chose is what the line says.
                ctx = certs.client()
                ctx.maximum_version = ssl.TLSVersion.TLSv1_2
                ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256")
                request = b"GET /old HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n"
                seen["old"] = await asyncio.to_thread(tls_request, port, ctx, request=request)
                assert seen["old"].response.startswith(b"HTTP/1.1 302 ")

    seen: dict[str, Any] = {}
    run(body())
    record, redirect = read_access_log(log_file)
    assert record["type"] == "https" and record["elb_status_code"] == 200
    assert record["request"] == f"GET https://www.example.com:{seen['port']}/ HTTP/1.1"
    assert (record["ssl_protocol"], record["ssl_cipher"]) == (seen["shake"].version, seen["shake"].cipher)
    assert record["ssl_protocol"] == "TLSv1.3" and record["redirect_url"] is None
    assert (redirect["ssl_protocol"], redirect["ssl_cipher"]) == ("TLSv1.2", seen["old"].cipher)
    assert redirect["ssl_cipher"].startswith("ECDHE-")
    assert redirect["redirect_url"] == f"https://www.example.com:{seen['port']}/new"


# --- the writer ------------------------------------------------------------------------------


def test_pieces_cut_at_line_ends() -> None:
    data = b"".join(b"line %d\n" % i for i in range(1000))
    pieces = access_log._pieces(data, 100)
    assert b"".join(pieces) == data
    assert all(len(p) <= 100 and p.endswith(b"\n") for p in pieces)
    assert access_log._pieces(b"a" * 300 + b"\nb\n", 100) == [b"a" * 300 + b"\n", b"b\n"]


def test_a_failing_write_drops_its_lines_and_keeps_serving(tmp_path: Path) -> None:
    writer = access_log._Writer(str(tmp_path / "a.log"))
    os.close(writer.fd)
    writer.fd = os.open("/dev/full", os.O_WRONLY)  # ENOSPC on every write
    writer.write(["one\n", "two\n"])
    assert writer.lost == 2
    writer.close()


def test_lb_up_and_reload_refuse_a_log_the_workers_could_not_open(tmp_path: Path) -> None:
    from lb import config as configmod
    from lb.daemon import access_log_problem

    text = f"""
[load_balancer]
name = "x"
access_log = {{ enabled = true, path = "{tmp_path}/missing/access.log" }}
[[listeners]]
name = "web"
protocol = "HTTP"
address = "127.0.0.1"
port = 8080
default_action = {{ type = "fixed-response", status_code = 200 }}
"""
    problem = access_log_problem(configmod.loads(text))
    assert problem is not None and problem.startswith("load_balancer.access_log.path: cannot open")
    assert access_log_problem(configmod.loads(text.replace("/missing", ""))) is None
    assert access_log_problem(configmod.loads(text.replace("enabled = true", "enabled = false"))) is None


def test_check_path_names_the_problem(tmp_path: Path) -> None:
    assert access_log.check_path("-") is None
    assert access_log.check_path(str(tmp_path / "ok.log")) is None
    problem = access_log.check_path(str(tmp_path / "missing" / "a.log"))
    assert problem is not None and "No such file or directory" in problem


# --- through `lb up`: SIGUSR1 after a rename, SIGTERM -----------------------------------------

LB_CONFIG = """
[load_balancer]
name = "{name}"
workers = 2
admin_socket = "/run/lb/{name}.sock"
metrics_address = "{host}:{metrics}"
access_log = {{ enabled = true, path = "{log}", format = "{format}" }}

[[listeners]]
name = "web"
protocol = "HTTP"
address = "{host}"
port = {port}
default_action = {{ type = "forward", target_group = "web" }}

[[listeners.rules]]
priority = 5
conditions = [{{ field = "path-pattern", values = ["/dead"] }}]
actions = [{{ type = "forward", target_group = "dead" }}]

[[target_groups]]
name = "web"
protocol = "HTTP"
port = {backend}
targets = [{{ id = "{host}" }}]

[[target_groups]]
name = "dead"
protocol = "HTTP"
port = {dead}
targets = [{{ id = "{host}" }}]
"""


class Load(threading.Thread):
    """Keep-alive GETs back to back; keeps the request id of every response that arrived whole."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.ids: list[str] = []
        self.errors = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            while not self.stopping.is_set():
                try:
                    conn.request("GET", "/")
                    response = conn.getresponse()
                    echo = json.loads(response.read())
                except (OSError, http.client.HTTPException, ValueError):
                    self.errors += 1
                    conn.close()
                    if self.stopping.wait(0.01):
                        return
                    continue
                self.ids += [v for n, v in echo["headers"] if n.lower() == "x-request-id"]
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(15)


@pytest.fixture()
def daemon(tmp_path: Path) -> Iterator[tuple[RunningDaemon, int, int, Path]]:
    with ThreadedBackends(("http", "b1")) as (b1,):
        port, metrics_port = free_port(), free_port()
        log_file = tmp_path / "access.log"
        lb_name = name("alog")
        text = LB_CONFIG.format(name=lb_name, host=HOST, port=port, backend=b1.port, dead=free_port(),
                                metrics=metrics_port, log=log_file, format="text")
        running = RunningDaemon(None, lb_name, text)
        try:
            running.start()
            yield running, port, metrics_port, log_file
        finally:
            running.cleanup()


@pytest.mark.root
def test_sigusr1_after_a_rename_and_sigterm_lose_no_line(daemon: tuple[RunningDaemon, int, int, Path]) -> None:
    running, port, _, log_file = daemon
    assert running.proc is not None
    loads = [Load(port) for _ in range(4)]
    for load in loads:
        load.start()
    time.sleep(1.0)
    rotated = log_file.with_name("access.log.1")
    os.rename(log_file, rotated)  # logrotate: rename, then signal
    running.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while not (log_file.exists() and log_file.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log_file.exists(), running.logs()
    time.sleep(1.0)
    for load in loads[:2]:  # two stop; two are still sending when SIGTERM comes
        load.stop()
    assert running.stop() == 0
    for load in loads[2:]:
        load.stop()
    received = [request_id for load in loads for request_id in load.ids]
    old, new = read_access_log(rotated), read_access_log(log_file)
    logged = [r["request_id"] for r in old + new if r["elb_status_code"] == 200]
    assert len(received) > 100 and old and new
    assert len(logged) == len(set(logged))  # no line twice
    assert set(received) <= set(logged), f"{len(set(received) - set(logged))} answered requests not logged"
    # Lines for requests nobody got an answer to: at most those cut by the stop.
    assert len(set(logged) - set(received)) <= len(loads)
    assert all(r["request_creation_time"] <= r["time"] for r in old + new)


@pytest.mark.root
def test_lb_up_counts_its_own_5xx_apart(daemon: tuple[RunningDaemon, int, int, Path]) -> None:
    running, port, metrics_port, log_file = daemon
    for path, status in (("/dead", 502), ("/status/500", 500), ("/", 200)):
        for _ in range(3):
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as response:
                    assert response.status == status
            except urllib.error.HTTPError as exc:
                assert exc.code == status
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def total(metric: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items() if n == metric and set(labels.items()) <= ls)

    assert total("lb_http_elb_5xx_total", listener="web", group="dead") == 3
    assert total("lb_http_target_5xx_total", listener="web", group="web") == 3
    assert total("lb_http_elb_5xx_total", group="web") == 0 and total("lb_http_target_5xx_total", group="dead") == 0
    assert total("lb_http_upstream_latency_seconds_count", group="web") == 6
    running.stop()
    reasons = {(r["request"].split()[1].rsplit("/", 1)[-1], r["elb_status_code"], r["target_status_code"],
                r["error_reason"]) for r in read_access_log(log_file)}
    assert ("dead", 502, None, "TargetConnectionError") in reasons
    assert ("500", 500, 500, None) in reasons


def lost_lines(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "lb_http_access_log_lines_lost_total")


@pytest.mark.root
def test_lines_a_full_disk_drops_are_counted_and_stay_counted_after_a_reload(tmp_path: Path) -> None:
    """A write that fails (ENOSPC: /dev/full) drops its lines, as the README
    says; lb_http_access_log_lines_lost_total counts them, and a reload that
    moves the log to a good file keeps the count (a counter never goes back)."""
    with ThreadedBackends(("http", "b1")) as (b1,):
        port, metrics_port = free_port(), free_port()
        lb_name = name("alost")
        text = LB_CONFIG.format(name=lb_name, host=HOST, port=port, backend=b1.port, dead=free_port(),
                                metrics=metrics_port, log="/dev/full", format="text")
        running = RunningDaemon(None, lb_name, text)
        try:
            running.start()
            for _ in range(5):
                with urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=10) as response:
                    assert response.status == 200
            deadline = time.monotonic() + 5
            while lost_lines(metrics_port) < 5 and time.monotonic() < deadline:
                time.sleep(0.1)  # the workers write every half second at most
            assert lost_lines(metrics_port) == 5, running.logs()
            assert "lines lost" in running.logs()
            good = tmp_path / "access.log"
            running.write_config(text.replace('path = "/dev/full"', f'path = "{good}"'))
            running.request("reload")
            for _ in range(3):
                with urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=10) as response:
                    assert response.status == 200
            deadline = time.monotonic() + 5
            while len(read_access_log(good) if good.exists() else []) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(read_access_log(good)) == 3
            assert lost_lines(metrics_port) == 5
        finally:
            running.cleanup()
