"""Data-parallel sweeps: one process per GPU (or CPU process) under accelerate or torchrun.

A sweep is embarrassingly parallel: every image is independent, so each
process holds its own replica of the pipeline and renders its share of the
plan's batches (:class:`~lora_prune.analysis.Shard`) into the shared run
folder; the main process analyses once all are done. The launcher is
Hugging Face accelerate (``accelerate launch``, also multi-node) or
``torchrun``: both set the process group's environment, which
:func:`launched_processes` reads without importing torch, so a run that was
not launched that way never touches ``torch.distributed``.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

from ..analysis import Shard
from ..settings import ModelSpec

#: Environment variables through which launchers give the number of processes
#: (torchrun/accelerate; MPI launchers).
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_MAX_DIGITS = 9
#: A share can take hours on a slow card while a faster process waits at the
#: barrier; the backends' default timeouts (10-30 min) would kill the sweep.
BARRIER_TIMEOUT = timedelta(hours=48)


def launched_processes() -> int:
    """How many processes the launcher started this sweep with (1 when not launched)."""
    for name in _WORLD_SIZE_VARS:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and len(value) <= _MAX_DIGITS:
            return max(1, int(value))
    return 1


def join_processes(spec: ModelSpec) -> tuple[Shard, ModelSpec]:
    """Join the launched process group: this process's shard and the spec it renders with.

    On GPUs each process renders on its own device (``cuda:<local rank>``)
    unless ``spec.device`` names one; on the CPU (``--device cpu``, or no
    CUDA) the processes talk over gloo.
    """
    import torch
    from accelerate import PartialState

    cpu = spec.device == "cpu" or (spec.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    if not cpu and spec.device in (None, "cuda"):
        spec = dataclasses.replace(spec, device=str(state.device))
    shard = Shard(state.process_index, state.num_processes, state.wait_for_everyone)
    return shard, spec
