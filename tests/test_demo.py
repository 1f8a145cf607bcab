"""`sudo make demo`'s config: the embedded lab config plus an HTTPS listener
whose certificate the demo makes, and an HTTP listener redirecting to it
(issue 15: the redirect shown in the demo). The demo itself runs on the
fixed "lab" namespaces, so the suite checks what it would run, not the run."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lb import config
from lb import lab as labmod
from lb import model as m
from lb.demo import HTTPS_PORT, REDIRECT_PORT, write_config


def test_the_demo_config_is_the_embedded_one_plus_https_and_a_redirect_to_it(tmp_path: Path) -> None:
    path = tmp_path / "run" / "demo.toml"
    write_config(str(path))
    lb = config.load(path)  # raises ConfigError naming every problem
    embedded = config.load_default()
    assert lb.listeners[:len(embedded.listeners)] == embedded.listeners
    assert lb.target_groups == embedded.target_groups

    https = next(li for li in lb.listeners if li.tls is not None)
    assert (str(https.address), https.port) == (labmod.VIP, HTTPS_PORT)
    assert https.tls is not None and {"www.example.com", "*.example.com"} <= set(https.tls.default_certificate.names)
    assert https.tls.default_certificate.certificate_file == str(tmp_path / "run" / "demo.pem")
    assert stat.S_IMODE(os.stat(tmp_path / "run" / "demo.key").st_mode) == 0o600

    redirect = next(li for li in lb.listeners if li.port == REDIRECT_PORT)
    assert redirect.protocol is m.Protocol.HTTP and not redirect.rules
    action = redirect.default_action
    assert isinstance(action, m.RedirectAction)
    assert (action.status_code, action.protocol, action.port) == (301, "HTTPS", str(HTTPS_PORT))
