"""The `lb` command line: a thin click shell over the Python API.

One group per noun; each command lives in its own module and is attached
here with add_command. Errors a user can cause are printed with
click.echo(..., err=True) and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import click

from lb.cli.bgp import bgp
from lb.cli.conntrack import conntrack
from lb.cli.daemon import down, reload, up
from lb.cli.explain import explain
from lb.cli.lab import lab
from lb.cli.maps import maps
from lb.cli.stats import stats
from lb.cli.status import status
from lb.cli.targets import targets
from lb.cli.validate import validate
from lb.cli.vips import vips


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """lb: a kernel-assisted load balancer (XDP fast path + L7 proxy)."""


for command in (validate, up, down, reload, status, vips, targets, maps, conntrack, stats, explain, lab, bgp):
    cli.add_command(command)


def main() -> None:
    cli()
