"""lb(1) and shell completion, generated from the click commands themselves,
so neither can drift from `lb -h`: `lb manpage` prints the roff page,
`lb completion bash|zsh|fish` the completion script (deploy/install.sh
--system installs both)."""

from __future__ import annotations

import datetime

import click
from click.shell_completion import get_completion_class

from lb import __version__

EXIT_STATUS = (
    ("0", "Done."),
    ("1", "The command failed: the daemon refused it (a reload or a registration, with its reasons), "
          "not root, nothing loaded."),
    ("2", "The config or the command line is invalid; every problem is printed as FILE: KEY.PATH: MESSAGE. "
          "Also: no config given and /etc/lb/lb.toml does not exist."),
    ("3", "The command needs the running daemon (lb reload, lb targets register|deregister) or reports on "
          "it (lb status), and no daemon answers on the admin socket."),
)


def _escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _commands(group: click.Group, ctx: click.Context, prefix: str) -> list[tuple[str, click.Command, click.Context]]:
    out = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx)
        if isinstance(command, click.Group):
            out += _commands(command, sub, f"{prefix} {name}")
        else:
            out.append((f"{prefix} {name}", command, sub))
    return out


def render(cli: click.Group) -> str:
    """The man page of `cli` (section 1) in roff."""
    ctx = click.Context(cli, info_name="lb")
    today = datetime.date.today().isoformat()
    lines = [f'.TH LB 1 "{today}" "lb {__version__}" "lb manual"', ".SH NAME",
             "lb \\- a kernel\\-assisted load balancer (XDP fast path + L7 proxy)",
             ".SH SYNOPSIS", ".B lb", "[\\-V] [\\-h] COMMAND [ARGS]...", ".SH DESCRIPTION",
             _escape(cli.help.split("\n\n")[0] if cli.help else ""),
             _escape("Every command that reads a config takes -c FILE (default: $LB_CONFIG, else "
                     "/etc/lb/lb.toml; with neither, lb refuses and says so). The read commands take --json: "
                     "one object with a \"schema\" version; a target is always {\"address\", \"port\"}."),
             ".SH COMMANDS"]
    for name, command, sub in _commands(cli, ctx, "lb"):
        usage = " ".join(command.collect_usage_pieces(sub))
        lines += [".TP", f".B {_escape(name)}", _escape(usage), ".RS", _escape(command.help or ""), ".RE"]
        for param in command.get_params(sub):
            record = param.get_help_record(sub)
            if record is None or not isinstance(param, click.Option) or param.name == "help":
                continue
            lines += [".RS", ".TP", f".B {_escape(record[0])}", _escape(record[1]), ".RE"]
    lines.append(".SH EXIT STATUS")
    for code, meaning in EXIT_STATUS:
        lines += [".TP", f".B {code}", _escape(meaning)]
    lines += [".SH ENVIRONMENT", ".TP", ".B LB_CONFIG", "The config file when \\-c is not given.",
              ".SH FILES", ".TP", ".B /etc/lb/lb.toml", "The config.",
              ".TP", ".B /run/lb/NAME.sock", "The admin socket (mode 0600).",
              ".TP", ".B /run/lb/NAME.json",
              _escape("The running daemon's state: pid, config, attachments, addresses, BGP fragment; lb down "
                      "reads it when the config no longer loads."),
              ".TP", ".B /run/lb/NAME.registrations.json",
              _escape("Targets registered or deregistered with lb targets, kept over the config until the "
                      "config changes them."),
              ".TP", ".B /sys/fs/bpf/lb/NAME/", "The pinned BPF maps and program.",
              ".SH SEE ALSO", "systemctl(8), bpftool(8)"]
    return "\n".join(lines) + "\n"


def completion(cli: click.Group, shell: str) -> str:
    """The completion script for `shell` (bash, zsh, fish): click's, for the program name lb."""
    cls = get_completion_class(shell)
    if cls is None:
        raise click.BadParameter(f"{shell!r}: bash, zsh or fish")
    return cls(cli, {}, "lb", "_LB_COMPLETE").source()
