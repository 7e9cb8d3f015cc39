"""The model and render options of the commands that render (and ``doctor``'s file options).

Their values become a :class:`~lora_prune.settings.ModelSpec` (``spec``, None
without ``--model``) and a :class:`~lora_prune.settings.RenderRequest`
(``request``); defaults and checks are those types'.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..settings import (
    DEFAULT_GUIDANCE,
    DEFAULT_STRENGTH,
    MEMORY_PLANS,
    TINY_MODEL_ID,
    ModelSpec,
    RenderRequest,
    input_images,
    model_defaults,
)
from ._options import Callback, F, dtype_opt, file_argument, gather, images_opt, seeds_opt


def _build_render(kw: dict[str, Any]) -> None:
    model = kw.pop("model")
    where = (kw.pop("transformer_file"), kw.pop("device"), kw.pop("dtype"), kw.pop("offload"))
    compile_blocks = kw.pop("compile")
    threads = kw.pop("threads")
    files = {k: kw.pop(k) for k in ("comfy", "clip_file", "t5_file", "vae_file", "memory")}
    if model is None and files["comfy"] is not None:
        model = str(files["comfy"])  # tokenizers come from the ComfyUI install
    kw["spec"] = (
        None
        if model is None
        else ModelSpec(model, *where, compile=compile_blocks, threads=threads, **files)
    )
    kw["request"] = RenderRequest(
        prompts=tuple(kw.pop("prompts")),
        seeds=kw.pop("seeds"),
        images=input_images(kw.pop("images")),
        **{k: kw.pop(k) for k in ("size", "width", "height", "steps", "guidance", "strength")},
    )


def _model_callback(required: bool) -> Callback:
    """--model is required unless --comfy names every component."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        # Options given on the command line are processed first, so a given
        # --comfy is in ctx.params by now.
        if value is None and required and ctx.params.get("comfy") is None:
            raise click.MissingParameter(ctx=ctx, param=param)
        return value

    return callback


def _file_option(name: str, dest: str, what: str) -> Callable[[F], F]:
    return click.option(
        name, dest, type=click.Path(path_type=Path), callback=file_argument, help=what
    )


def model_file_options() -> list[Callable[[F], F]]:
    """--comfy and the single-file options, shared by the render commands and doctor."""
    return [
        click.option(
            "--comfy",
            type=click.Path(path_type=Path),
            help="A ComfyUI folder (or its models/): every component is found there by its "
            "contents (extra_model_paths.yaml honoured).",
        ),
        _file_option(
            "--transformer",
            "transformer_file",
            "Single-file FLUX.1 transformer (.safetensors, ComfyUI/BFL naming) "
            "to use with the rest of --model, or instead of the one --comfy finds.",
        ),
        _file_option(
            "--clip", "clip_file", "Single-file CLIP-L text encoder (clip_l.safetensors)."
        ),
        _file_option("--t5", "t5_file", "Single-file T5-XXL encoder (t5xxl_fp16.safetensors)."),
        _file_option("--vae", "vae_file", "Single-file FLUX.1 VAE (ae.safetensors)."),
    ]


def _defaults_text(field: str) -> str:
    """``[default: 768; 64 for tiny]``: the model defaults of ``field``, from settings."""
    real, tiny = model_defaults(""), model_defaults(TINY_MODEL_ID)
    return f"[default: {getattr(real, field)}; {getattr(tiny, field)} for tiny]"


size_opt = click.option("--size", type=int, help=f"Square size {_defaults_text('size')}.")
steps_opt = click.option("--steps", type=int, help=f"Denoising steps {_defaults_text('steps')}.")


def render_options(*, required: bool = True, when: str = "") -> Callable[[F], F]:
    """Model and render options, passed as ``spec`` (None without --model) and ``request``."""
    return gather(
        [
            click.option(
                "--model",
                "model",
                metavar="M",
                callback=_model_callback(required),
                help=f"{when}'tiny' (built-in test model), a local diffusers FLUX.1 "
                "folder, or a hub id (with --comfy: only where tokenizers may come from).",
            ),
            *model_file_options(),
            click.option("--device", help="cuda, mps or cpu [default: best available]."),
            dtype_opt,
            click.option(
                "--memory",
                type=click.Choice(MEMORY_PLANS),
                default=ModelSpec.memory,
                show_default=True,
                help="How the pipeline lives on the card (see 'lora-prune doctor').",
            ),
            click.option("--offload", is_flag=True, help="Same as --memory offload."),
            click.option(
                "--threads",
                type=int,
                help="torch's CPU threads when rendering on a CPU [default: 1 for tiny, whose "
                "small matrices gain nothing from more; torch's choice otherwise].",
            ),
            click.option(
                "--compile",
                is_flag=True,
                help="torch.compile the transformer blocks (slow first batch, faster after).",
            ),
            click.option(
                "--prompt",
                "prompts",
                multiple=True,
                required=required,
                help=f"{when}Prompt (repeatable).",
            ),
            images_opt(when),
            seeds_opt,
            size_opt,
            click.option("--width", type=int, help="Width (overrides --size)."),
            click.option("--height", type=int, help="Height (overrides --size)."),
            steps_opt,
            click.option("--guidance", type=float, default=DEFAULT_GUIDANCE, show_default=True),
            click.option(
                "--strength",
                type=float,
                default=DEFAULT_STRENGTH,
                show_default=True,
                help="LoRA strength; multiplies the weight delta once.",
            ),
        ],
        _build_render,
    )
