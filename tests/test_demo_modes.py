"""The demo's forwarding-modes section (lb.demomodes): DSR and full NAT
through a real `lb up` on the DSR lab, as `sudo make demo` shows them."""

from __future__ import annotations

import os

import pytest

from lb import lab_dsr
from lb.demomodes import run_modes
from lb.lab_dsr import DsrLab
from tests.names import name

pytestmark = pytest.mark.root


def test_dsr_and_full_nat_through_lb_up(capsys: pytest.CaptureFixture[str]) -> None:
    prefix, lb_name = name("modes-lab"), name("modes")
    try:
        results = run_modes(prefix, lb_name)
    finally:
        DsrLab(prefix).down()
    targets = {f"target{i}" for i in range(1, 4)}
    dsr, full_nat = results["dsr"], results["full-nat"]
    for result in (dsr, full_nat):
        assert set(result.served) == targets and sum(result.served.values()) == 30
    assert dsr.seen == [lab_dsr.CLIENT_ADDR] and dsr.replies_through_lb == 0
    assert full_nat.seen == [lab_dsr.LB_ADDR] and full_nat.replies_through_lb >= 30 * 3  # SYN-ACK, answer, FIN
    out = capsys.readouterr().out
    assert "dsr" in out and "full-nat" in out
    assert not os.path.exists(f"/sys/fs/bpf/lb/{lb_name}") and not os.path.exists(DsrLab(prefix).run_dir)
