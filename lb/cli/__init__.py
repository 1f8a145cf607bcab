"""The `lb` command line: a thin click shell over the Python API.

One group per noun; each command lives in its own module and is attached
here with add_command. Errors a user can cause are printed with
click.echo(..., err=True) and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import click

from lb.cli.lab import lab
from lb.cli.validate import validate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """lb: a kernel-assisted load balancer (XDP fast path + L7 proxy)."""


cli.add_command(validate)
cli.add_command(lab)


def main() -> None:
    cli()
