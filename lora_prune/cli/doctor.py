"""``lora-prune doctor``: the model files found, the memory plan and a time estimate."""

from __future__ import annotations

from pathlib import Path

import click

from ..comfy import diagnose
from ..memoryplan import WORKING_BYTES
from ..render.deps import free_gpu_bytes
from ..settings import DEFAULT_SIZE, DEFAULT_STEPS
from ..units import human_bytes
from ._app import EXIT_CODES_HELP
from ._model_options import model_file_options
from ._options import dtype_opt, gather


@click.command(epilog=EXIT_CODES_HELP)
@gather(model_file_options(), lambda kw: None)
@click.option(
    "--model",
    metavar="M",
    help="A diffusers FLUX.1 folder to take the tokenizers from when --comfy has none.",
)
@dtype_opt
@click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True)
@click.option("--size", type=int, default=DEFAULT_SIZE, show_default=True)
def doctor(
    comfy: Path | None,
    transformer_file: Path | None,
    clip_file: Path | None,
    t5_file: Path | None,
    vae_file: Path | None,
    model: str | None,
    dtype: str | None,
    steps: int,
    size: int,
) -> None:
    """Show the model files found, their sizes, the memory plan and a time estimate.

    Renders nothing and loads no weights (only safetensors headers are read).

    \b
    Example: lora-prune doctor --comfy ~/ComfyUI
    """
    found = diagnose(
        comfy,
        {"transformer": transformer_file, "clip": clip_file, "t5": t5_file, "vae": vae_file},
        tokenizer_folder=Path(model).expanduser() if model else None,
        dtype=dtype,
        gpu=free_gpu_bytes(),
        steps=steps,
        size=size,
    )
    for kind, part in found.models.chosen.items():
        click.echo(
            f"{kind:<12}{part.path} ({part.dtype}, {human_bytes(part.nbytes)}; "
            f"{human_bytes(found.compute_bytes[kind])} in {found.compute_dtype}): {part.reason}"
        )
    tok = found.models.tokenizers
    if tok is None:
        click.echo(f"tokenizers  missing: {found.models.tokenizer_problem}")
    else:
        click.echo(f"tokenizers  {tok.clip_vocab.parent} (CLIP), {tok.t5} (T5)")
    for part, why in found.models.others:
        click.echo(f"not used    {part.path}: {why}")
    for path, why in found.models.skipped:
        click.echo(f"skipped     {path}: {why}")
    gpu = found.gpu
    click.echo(
        "gpu         no GPU: cpu"
        if gpu is None
        else f"gpu         {gpu[0] / 2**30:.1f} GiB free of {gpu[1] / 2**30:.1f} GiB"
    )
    click.echo(f"plan        --memory auto -> {found.plan.plan} ({found.plan.reason})")
    working = WORKING_BYTES / 2**30
    click.echo(
        f"peak        ~{found.plan.peak_bytes / 2**30:.1f} GiB (estimate: the weights the plan "
        f"keeps on the card plus a fixed {working:.1f} GiB for activations, latents and the "
        "CUDA context)"
    )
    if found.seconds_per_image is None:
        click.echo("time        not estimated on a CPU (hours per image at FLUX.1's size)")
    else:
        click.echo(
            f"time        ~{found.seconds_per_image:.0f} s per image at {size}x{size}, {steps} "
            "steps (estimate: scaled from ~35 s on a 3090 Ti-class card)"
        )
