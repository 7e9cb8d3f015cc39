"""Running the ``lora-prune`` command in-process, as the tests do.

One helper for every test file (``from clitools import run_cli``), so that they
all run the command the same way and read the same result: click's
:class:`~click.testing.Result`, with ``exit_code``, ``output`` (stdout and
stderr as a terminal shows them), ``stdout`` and ``stderr``.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from lora_prune.cli import cli


def run_cli(*args: str | Path) -> Result:
    """``lora-prune ARGS...`` in-process; paths may be given as they are."""
    # Exceptions propagate: a crash caught by the runner would read as exit code 1,
    # which is also the code of a failed verify or check, and would hide its traceback.
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
