"""deploy/prometheus and deploy/grafana: the alert rules pass `promtool check
rules` and their unit tests (`promtool test rules`), the dashboard is
Grafana JSON whose every query is valid PromQL, and every metric the rules
and the dashboard name is one a real `lb up` exposes (L4, L7, HTTPS,
reloads), scraped from its endpoint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lb import lab as labmod
from lb.lab import Lab
from lb.netlink import run_in_netns
from tests import labclient
from tests.daemon_fixture import RunningDaemon, lab_config
from tests.names import name
from tests.test_https_daemon import https_section
from tests.tls_certs import Certs

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "lb-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "lb-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "lb-dashboard.json"
METRICS_PORT = 9474  # distinct from other test daemons in the lab's lb namespace
METRIC_NAME = re.compile(r"\blb_[a-z0-9_]+\b")
# Grafana's variables, as a query sees them once Grafana substituted them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: deploy/install.sh installs it (Debian's prometheus package)"
    return subprocess.run([tool, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def rule_expressions() -> dict[str, str]:
    rules = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_expressions() -> list[str]:
    board = dashboard()
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    return exprs


def grafana_substituted(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


# --- the files on their own ------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_alert_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {test["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for test in case["alert_rule_test"]}
    assert {"LbTargetUnhealthy", "LbTargetGroupFailOpen", "LbCertificateExpiresSoon", "LbReloadFailed",
            "LbElb5xxRate"} <= tested


def test_dashboard_is_grafana_json_with_valid_queries(tmp_path: Path) -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$\w+", target["expr"])) - {"$__rate_interval", "$instance"}
            assert not used, f"{panel['title']}: unknown variables {used}"
    # promtool parses each query (Grafana's variables substituted) as a recording rule.
    exprs = dashboard_expressions()
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{n}", "expr":
                                                          grafana_substituted(e)} for n, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- against a real daemon --------------------------------------------------------------


def exposed_names(text: str) -> set[str]:
    """Every series name the exposition can hold, its families' types
    considered (a counter family "x" is x_total, a histogram x_bucket ...),
    so a family with no sample yet still counts."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


@pytest.fixture(scope="module")
def exposition(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of `lb up` with TCP, HTTP and HTTPS listeners, after traffic and a reload."""
    lb_name = name("mon")
    certs = Certs(tmp_path_factory.mktemp("certs"))
    cert, key = certs.files("www.example.com")
    text = lab_config(lab, lb_name, http=True) + https_section(cert, key)
    text = text.replace("workers = 1\n", f'workers = 1\nmetrics_address = "127.0.0.1:{METRICS_PORT}"\n', 1)
    running = RunningDaemon(lab, lb_name, text)
    try:
        running.start()
        for backend in lab.backends:
            running.wait_for("web", backend.address, "healthy", timeout=15)
        status, _, _ = labclient.http_get(lab.client_ns, labmod.VIP, labmod.HTTP_PORT, "/")
        assert status == 200
        running.request("reload")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as response:
                body: bytes = response.read()
            return body.decode()

        yield run_in_netns(lab.lb_ns, scrape)
    finally:
        running.cleanup()


@pytest.mark.root
def test_every_metric_the_rules_and_dashboard_name_is_exposed(exposition: str) -> None:
    exposed = exposed_names(exposition)
    named = {(where, metric) for where, expr in
             [*((f"alert {alert}", e) for alert, e in rule_expressions().items()),
              *(("dashboard", e) for e in dashboard_expressions())]
             for metric in METRIC_NAME.findall(expr)}
    assert len({metric for _, metric in named}) >= 30
    missing = sorted(f"{where}: {metric}" for where, metric in named if metric not in exposed)
    assert not missing, "not in lb's exposition:\n" + "\n".join(missing)
    # The rules file's descriptions and comments name real metrics too.
    in_text = set(METRIC_NAME.findall(RULES.read_text())) - exposed
    assert not in_text, in_text
