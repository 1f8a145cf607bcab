"""deploy/install.sh --system: a production install into a temporary tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.root


def test_system_install_gives_a_working_lb_command(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LB_PREFIX": str(tmp_path / "opt"),
        "LB_BINDIR": str(tmp_path / "bin"),
        "LB_ETCDIR": str(tmp_path / "etc"),
        "LB_UNITDIR": str(tmp_path / "units"),
        "LB_LOGROTATEDIR": str(tmp_path / "logrotate.d"),
        "LB_MANDIR": str(tmp_path / "man1"),
        "LB_COMPLETIONDIR": str(tmp_path / "completions"),
    }
    result = subprocess.run([str(REPO / "deploy/install.sh"), "--system"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lb = tmp_path / "bin" / "lb"
    assert os.readlink(lb) == str(tmp_path / "opt/venv/bin/lb")
    # The unit runs what this install put in place, with its config path; the rest is deploy/lb.service.
    unit = (tmp_path / "units/lb.service").read_text()
    bindir, etcdir = tmp_path / "bin", tmp_path / "etc"
    exec_lines = [line for line in unit.splitlines() if line.startswith("Exec")]
    assert exec_lines == [f"ExecStart={bindir}/lb up -c {etcdir}/lb.toml",
                          f"ExecReload={bindir}/lb reload -c {etcdir}/lb.toml"]
    assert unit.replace(f"{bindir}/lb ", "/usr/local/bin/lb ").replace(f"{etcdir}/lb.toml", "/etc/lb/lb.toml") == (
        REPO / "deploy/lb.service").read_text()
    assert oct((tmp_path / "units/lb.service").stat().st_mode & 0o777) == "0o644"
    assert (tmp_path / "logrotate.d/lb").read_text() == (REPO / "deploy/lb.logrotate").read_text()
    examples = sorted(p.name for p in (tmp_path / "etc/examples").glob("*.toml"))
    assert examples == sorted(p.name for p in (REPO / "deploy/examples").glob("*.toml"))
    # The installed copy is not this checkout: it finds its own BPF sources.
    where = subprocess.run([str(tmp_path / "opt/venv/bin/python"), "-c",
                            "import lb, lb.dataplane.loader as l; print(lb.__file__); print(l.bpf_source_dir())"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.split()
    assert where[0].startswith(str(tmp_path / "opt")) and where[1] == str(tmp_path / "opt/venv/share/lb/bpf")
    # Its L7 hot path is compiled (mypyc, lb.l7.native), from the installed sources.
    compiled = subprocess.run([str(tmp_path / "opt/venv/bin/python"), "-I", "-c",
                               "import lb.l7, lb.l7.client as c; print(lb.l7.NOT_COMPILED, c.__file__)"],
                              capture_output=True, text=True, cwd=tmp_path, check=True,
                              env={k: v for k, v in os.environ.items() if k != "LB_PURE_PYTHON"}).stdout.split()
    assert compiled[0] == "None" and compiled[1].startswith(str(tmp_path / "opt/venv/lib/lb-native/")), compiled
    # The man page renders and names every command; bash completion completes them.
    page = subprocess.run(["man", "-l", "-P", "cat", str(tmp_path / "man1/lb.1")], capture_output=True, text=True,
                          check=True, env={**os.environ, "MANWIDTH": "200"}).stdout
    for command in ("lb targets register", "lb targets deregister", "lb reload", "lb validate", "EXIT STATUS"):
        assert command in page
    completed = subprocess.run(["bash", "-c", f"source {tmp_path / 'completions/lb'}; COMP_WORDS=(lb targets de); "
                                "COMP_CWORD=2; _lb_completion lb; echo ${COMPREPLY[@]}"],
                               capture_output=True, text=True, env={**os.environ, "PATH": f"{tmp_path / 'bin'}:"
                                                                    + os.environ["PATH"]})
    assert completed.stdout.split() == ["deregister"], completed.stderr
    for example in (tmp_path / "etc/examples").glob("*.toml"):
        check = subprocess.run([str(lb), "validate", str(example)], capture_output=True, text=True, cwd=tmp_path)
        assert check.returncode == 0, check.stderr
    # A second run with nothing changed only checks.
    again = subprocess.run([str(REPO / "deploy/install.sh"), "--system"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "installing lb into" not in again.stdout
