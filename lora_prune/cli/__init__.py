"""The ``lora-prune`` command line: one module per command, each parse -> one library call -> print.

:mod:`._app` is the group (one-line errors, exit codes, the entry point),
:mod:`._options` the options several commands share (defaults and checks from
:mod:`lora_prune.settings`), :mod:`._printers` what results look like as text.
Commands that render import :mod:`lora_prune.render` only when they run, so that
``inspect``, ``slim``, ``resize`` and ``check`` work without torch.
"""

from __future__ import annotations

from . import analyze, check, demo, doctor, inspect, render, resize, slim, verify
from ._app import cli, main

for _command in (
    inspect.inspect,
    slim.slim,
    render.render,
    analyze.analyze,
    verify.verify,
    demo.demo,
    check.check,
    resize.resize,
    doctor.doctor,
):
    cli.add_command(_command)

__all__ = ["cli", "main"]
