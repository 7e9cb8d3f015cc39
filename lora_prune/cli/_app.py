"""The ``lora-prune`` command group, its one-line errors and exit codes, and the entry point.

Errors from :mod:`lora_prune.errors`, and click's own usage errors, become one
``error: ...`` line on stderr and the exit code documented there; SIGTERM ends
a command as Ctrl-C does.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import click

from .._version import __version__
from ..errors import EXIT_INTERRUPTED, LoraPruneError, UsageError

EXIT_CODES_HELP = """\b
Exit codes: 0 ok, 1 verification/policy failed, 2 usage, 3 unreadable or
unsafe file, 4 unsupported LoRA, 5 missing optional dependency, 6 output
could not be written, 7 no measurable effect of the LoRA on an image, 130
interrupted."""


CHECK_EXIT_HELP = """\b
Exit codes: 0 all files pass, 1 a policy or content check failed (also a LoRA
for another base model), 2 usage, 3 a file is unreadable or unsafe (wins over 1)."""


class LoraPruneGroup(click.Group):
    """A group whose commands report every error, click's own included, as one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LoraPruneError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted, run the command again to continue", err=True)
            sys.exit(EXIT_INTERRUPTED)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's main, but its usage errors (unknown option, missing or bad value) are one line.

        click would print the usage and an ``Error:`` line; here they end as
        ``error: <what>, see 'lora-prune <command> --help'`` with exit 2, as
        every other usage error does.
        """
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # a bare `lora-prune`: the help, as click shows it
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {_click_error_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted, run the command again to continue", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)


def _click_error_line(exc: click.ClickException) -> str:
    names: list[str] = []
    ctx: click.Context | None = getattr(exc, "ctx", None)
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    what = " ".join(exc.format_message().split()).rstrip(".")
    return str(UsageError(what, None, f"see '{' '.join(['lora-prune', *names])} --help'"))


@click.group(cls=LoraPruneGroup, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="lora-prune")
def cli() -> None:
    """Find which blocks of a FLUX.1 LoRA matter and ship smaller LoRAs."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    # Further TERMs must not cut the cleanup short; SIGKILL still ends the process.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    """The console entry point: SIGTERM ends a command like Ctrl-C does.

    Both raise KeyboardInterrupt, so that ``atomic_output`` removes its temp file
    on the way out and the command exits with EXIT_INTERRUPTED (130).
    """
    args = list(argv) if argv is not None else None
    if threading.current_thread() is not threading.main_thread():
        # Only the main thread may install signal handlers.
        cli.main(args=args, prog_name="lora-prune")
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(args=args, prog_name="lora-prune")
    finally:
        signal.signal(signal.SIGTERM, previous)
