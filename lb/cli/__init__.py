"""The `lb` command line: a thin click shell over the Python API.

One group per noun; each command lives in its own module and is attached
here with add_command. Errors a user can cause are printed with
click.echo(..., err=True) and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import click

from lb import __version__
from lb.cli.bgp import bgp
from lb.cli.conntrack import conntrack
from lb.cli.daemon import down, reload, up
from lb.cli.explain import explain
from lb.cli.lab import lab
from lb.cli.manpage import completion as completion_script
from lb.cli.manpage import render
from lb.cli.maps import maps
from lb.cli.stats import stats
from lb.cli.status import status
from lb.cli.targets import targets
from lb.cli.validate import validate
from lb.cli.vips import vips


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="lb", message="%(prog)s %(version)s")
def cli() -> None:
    """lb: a kernel-assisted load balancer (XDP fast path + L7 proxy).

    Exit status: 0 done; 1 the command failed (the daemon refused it, not
    root, nothing loaded); 2 an invalid config or command line, every
    problem printed; 3 the command needs the running daemon and none answers.
    """


for command in (validate, up, down, reload, status, vips, targets, maps, conntrack, stats, explain, lab, bgp):
    cli.add_command(command)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script (install.sh --system installs bash's).

    For one shell session: eval "$(lb completion bash)".
    """
    click.echo(completion_script(cli, shell), nl=False)


@cli.command(hidden=True)
def manpage() -> None:
    """Print lb(1) in roff (install.sh --system installs it)."""
    click.echo(render(cli), nl=False)


def main() -> None:
    cli()
