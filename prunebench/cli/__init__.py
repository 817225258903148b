"""The ``prunebench`` command line: ``prunebench.cli:main``, with the commands in
:mod:`~prunebench.cli.run`, :mod:`~prunebench.cli.info` and :mod:`~prunebench.cli.results`."""

from __future__ import annotations

import sys

from rich.markup import escape

# the commands register with the app as their modules are imported, in the order --help lists them
# isort: off
from prunebench.cli import run  # noqa: F401 - run, sweep
from prunebench.cli import info  # noqa: F401 - list, info, baseline
from prunebench.cli import results  # noqa: F401 - leaderboard, latency, records
# isort: on
from prunebench.cli.app import _degrade_unencodable_output, app, err, out  # noqa: F401 - out: tests set its width
from prunebench.errors import PrunebenchError


def main() -> None:
    _degrade_unencodable_output()
    try:
        app()
    except PrunebenchError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
