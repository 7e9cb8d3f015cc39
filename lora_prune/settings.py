"""Every setting a user gives lora-prune, with its default and its validation: one home.

The CLI turns options into these frozen dataclasses once, before any file is
read or any model loaded, and passes them down typed; library callers build the
same objects and get the same checks. Every bad value is a
:class:`~lora_prune.errors.UsageError` (exit 2) naming the option. Torch-free:
the render modules import from here, never the other way round.

- :class:`RenderSettings`: what a sweep renders (prompts x seeds, size, steps,
  guidance, strength, modes); its fields and their JSON form are part of every
  analysis folder's manifest and cache keys, so they must not change.
- :class:`ImageSettings`: one image of it, as the engine renders it.
- :class:`RenderRequest`: the options as typed, before the model's defaults
  (:func:`model_defaults`) fill in size and steps.
- :func:`settings_to_json`, :func:`settings_from_json`: a sweep's settings as
  manifests and reports store them.
- :class:`ModelSpec`, :class:`PictureOptions`: which model, how pictures look.
- :func:`check_coverage`, :func:`check_batch_size`: the sweep's other numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError
from .safetensors_io import file_sha256
from .units import parse_size

#: The built-in offline test model: renders at 64 px in 4 steps with 32 tokens.
TINY_MODEL_ID = "tiny"
TINY_RESOLUTION = 64
TINY_STEPS = 4
TINY_MAX_SEQUENCE_LENGTH = 32

MODES = ("solo", "loo")
#: FLUX.1-dev's render defaults here: the size and step count of the original workflow.
DEFAULT_SIZE = 768
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.5
DEFAULT_STRENGTH = 1.0
DEFAULT_BATCH_SIZE = 8
DEFAULT_COVERAGE = 0.9

#: FLUX.1 works in 16-pixel patches (8x VAE, 2x2 packing).
SIZE_MULTIPLE = 16
#: Larger sides would need tens of GiB for one image; FLUX.1 is trained up to ~2 MP.
MAX_SIDE = 8192
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
#: A strength beyond this is no LoRA any more, only noise (and overflows fp16).
MAX_STRENGTH = 100.0
#: The seed range of torch's generators.
MAX_SEED = 2**64 - 1
MAX_BATCH_SIZE = 1024
MAX_THREADS = 1024
MAX_SEQUENCE_LENGTH = 512
#: A contact sheet below this cannot hold a header and 60 legible tiles.
MIN_SHEET_PIXELS = 1_000_000
#: Beyond this PIL refuses to open the sheet again (decompression-bomb guard).
MAX_SHEET_PIXELS = 178_000_000
MAX_TILE_SCALE = 64
HEATMAP_SCALES = ("global", "per-image")
#: The colour maps a heatmap may use (lora_prune.pictures holds their tables).
COLORMAP_NAMES = ("jet", "turbo", "inferno", "gray")
DEFAULT_CMAP = COLORMAP_NAMES[0]
#: How strongly a heatmap covers its render in the contact sheet and the report.
DEFAULT_OPACITY = 0.6
SHEET_ORDERS = ("block", "rank")
#: dtype names ModelSpec accepts (render.loading maps them to torch dtypes).
DTYPE_NAMES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "half")
#: The compute dtypes as the command line offers them (the first spelling of each above).
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")
#: How the pipeline lives on a card (lora_prune.memoryplan documents each and ``auto``'s rule).
MEMORY_PLANS = ("auto", "full", "offload", "group-offload", "sequential")


def check_number(
    value: float, option: str, lo: float, hi: float, *, fix: str, lo_open: bool = False
) -> float:
    """``value`` if it is finite and in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), else a UsageError."""
    low_ok = value > lo if lo_open else value >= lo
    if not (isinstance(value, int | float) and math.isfinite(value) and low_ok and value <= hi):
        bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise UsageError(f"{option} {value} is not a finite number in {bounds}", option, fix)
    return value


def check_max_size(text: str) -> int:
    """``--max-size``: bytes of a human size (``"20MB"``, ``"1.5GiB"``), at least 1."""
    size = parse_size(text, "--max-size")
    if size < 1:
        raise UsageError(f"--max-size {text} is not positive", "--max-size", 'use e.g. "20MB"')
    return size


def check_coverage(value: float) -> float:
    """The share of the total influence a suggested keep set must cover: in (0, 1]."""
    if not (math.isfinite(value) and 0 < value <= 1):
        raise UsageError(f"coverage {value} is not in (0, 1]", "--coverage", "use e.g. 0.9")
    return value


def check_batch_size(value: int) -> int:
    if not 1 <= value <= MAX_BATCH_SIZE:
        raise UsageError(
            f"batch size {value} is not in 1..{MAX_BATCH_SIZE}", "--batch-size", "use e.g. 8"
        )
    return value


def check_size(width: int, height: int) -> None:
    if (
        width % SIZE_MULTIPLE
        or height % SIZE_MULTIPLE
        or not 0 < width <= MAX_SIDE
        or not 0 < height <= MAX_SIDE
    ):
        raise UsageError(
            f"size {width}x{height} is not a positive multiple of {SIZE_MULTIPLE} up to {MAX_SIDE}",
            "--size/--width/--height",
            "FLUX needs multiples of 16, e.g. 768",
        )


def check_steps(steps: int) -> None:
    if steps < 1:
        raise UsageError("steps must be at least 1", "--steps", "use e.g. 20")
    if steps > MAX_STEPS:
        raise UsageError(f"steps {steps} is above {MAX_STEPS}", "--steps", "use e.g. 20")


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"seed {seed} is not in 0..2**64-1", "--seeds", "use e.g. 0,1,2")


def _check_render_numbers(
    width: int, height: int, steps: int, guidance: float, strength: float
) -> None:
    check_size(width, height)
    check_steps(steps)
    _check_guidance_strength(guidance, strength)


def _check_guidance_strength(guidance: float, strength: float) -> None:
    check_number(guidance, "--guidance", 0.0, MAX_GUIDANCE, fix="use e.g. 3.5")
    check_number(strength, "--strength", -MAX_STRENGTH, MAX_STRENGTH, fix="use e.g. 1.0")


def parse_seeds(value: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; spaces and empty items are ignored."""
    items = [v for v in value.replace(" ", "").split(",") if v]
    # A 5,000-digit "seed" must not cost int()'s quadratic parse.
    if any(len(v) > 24 for v in items):
        raise UsageError(
            f"seed list {value[:40]!r} has a seed out of range", "--seeds", "use e.g. 0,1,2"
        )
    try:
        seeds = tuple(int(v) for v in items)
    except ValueError as exc:
        raise UsageError(f"cannot read seeds {value!r}", "--seeds", "use e.g. 0,1,2") from exc
    if not seeds:
        raise UsageError("no seed given", "--seeds", "use e.g. 0,1,2")
    for seed in seeds:
        check_seed(seed)
    return seeds


@dataclass(frozen=True)
class ModelDefaults:
    """What a model renders at unless told otherwise."""

    size: int
    steps: int
    max_sequence_length: int
    #: torch's CPU threads while it renders on a CPU; None leaves torch's own choice
    cpu_threads: int | None = None


def model_defaults(model: str) -> ModelDefaults:
    """FLUX.1-dev's defaults for real models, the tiny model's for tests and demos."""
    if model == TINY_MODEL_ID:
        # The tiny model's matrices are too small to gain from threads, and a busy
        # machine makes oversubscribed threads wait: 253-364 s for the demo instead of 21 s.
        return ModelDefaults(TINY_RESOLUTION, TINY_STEPS, TINY_MAX_SEQUENCE_LENGTH, cpu_threads=1)
    return ModelDefaults(DEFAULT_SIZE, DEFAULT_STEPS, MAX_SEQUENCE_LENGTH)


@dataclass(frozen=True)
class InputImage:
    """An image to edit (``--image``): its file and the sha256 of its bytes (the cache's key)."""

    path: str
    sha256: str


def input_images(paths: Sequence[str | Path]) -> tuple[InputImage, ...]:
    """The ``--image`` files, hashed; a file that cannot be read is an error naming it."""
    return tuple(InputImage(str(p), file_sha256(p)) for p in paths)


@dataclass(frozen=True)
class ImageSettings:
    """What the engine renders for one image: prompt, seed, size, steps, guidance, strength.

    ``strength`` multiplies every delta of the LoRA once (the "block weight" of
    the original workflow), not alpha, up and down each. The tiny model wants
    ``max_sequence_length=TINY_MAX_SEQUENCE_LENGTH`` (32).
    """

    prompt: str
    seed: int = 0
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    strength: float = DEFAULT_STRENGTH
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    #: the input image an edit model (FLUX.1 Kontext) edits, and its sha256; None = text to image
    image: InputImage | None = None

    def __post_init__(self) -> None:
        check_seed(self.seed)
        _check_render_numbers(self.width, self.height, self.steps, self.guidance, self.strength)
        if not 1 <= self.max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise UsageError(
                f"max_sequence_length {self.max_sequence_length} is outside 1..512",
                "max_sequence_length",
                "use 512 for FLUX.1 (32 for the tiny model)",
            )


@dataclass(frozen=True)
class RenderSettings:
    """Everything that determines a sweep's renders (and so the cache keys)."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    strength: float = DEFAULT_STRENGTH
    modes: tuple[str, ...] = ("solo",)
    #: the images an edit model edits: none (text to image), one for every prompt, or one
    #: per prompt in order
    images: tuple[InputImage, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompts:
            raise UsageError("no prompt given", "--prompt", "give at least one --prompt")
        check_images(len(self.images), self.prompts)
        if not self.seeds:
            raise UsageError("no seed given", "--seeds", "give e.g. --seeds 0,1,2")
        for seed in self.seeds:
            check_seed(seed)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise UsageError(f"unknown mode {bad}", "--mode", "use solo, loo or both")
        _check_render_numbers(self.width, self.height, self.steps, self.guidance, self.strength)

    def input_image(self, prompt: str) -> InputImage | None:
        """The image ``prompt`` edits (None for text to image)."""
        if not self.images:
            return None
        return self.images[0] if len(self.images) == 1 else self.images[self.prompts.index(prompt)]

    def image(self, prompt: str, seed: int, max_sequence_length: int) -> ImageSettings:
        """One image of the sweep, as the engine renders it (the one conversion)."""
        return ImageSettings(
            prompt=prompt,
            seed=seed,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance=self.guidance,
            strength=self.strength,
            max_sequence_length=max_sequence_length,
            image=self.input_image(prompt),
        )


def check_images(count: int, prompts: Sequence[str]) -> None:
    """``--image``: none, one, or one per ``--prompt`` (then the prompts must differ)."""
    if count in (0, 1):
        return
    if count != len(prompts):
        raise UsageError(
            f"{count} images for {len(prompts)} prompts",
            "--image",
            "give one --image for every prompt, or one per --prompt in order",
        )
    if len(set(prompts)) != len(prompts):
        raise UsageError(
            "the same prompt twice, each with its own image",
            "--prompt",
            "give each prompt once, or one --image for all",
        )


#: The name the analysis has always used for the sweep's settings.
AnalyzeSettings = RenderSettings


def settings_to_json(settings: AnalyzeSettings) -> dict[str, Any]:
    """Settings as stored in manifests and reports (lists for tuples)."""
    doc = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}
    if not settings.images:
        del doc["images"]  # text to image: manifests stay as they were
    return doc


def settings_from_json(doc: Mapping[str, Any]) -> AnalyzeSettings:
    """Settings as stored in a manifest (lists for tuples)."""
    return AnalyzeSettings(
        prompts=tuple(doc["prompts"]),
        seeds=tuple(int(s) for s in doc["seeds"]),
        width=int(doc["width"]),
        height=int(doc["height"]),
        steps=int(doc["steps"]),
        guidance=float(doc["guidance"]),
        strength=float(doc["strength"]),
        modes=tuple(doc["modes"]),
        images=tuple(InputImage(str(i["path"]), str(i["sha256"])) for i in doc.get("images", ())),
    )


@dataclass(frozen=True)
class RenderRequest:
    """The render options as given on the command line; None = the model's default.

    Built (and so checked) before anything is loaded; :meth:`settings` adds the
    model's defaults.
    """

    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    size: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float = DEFAULT_GUIDANCE
    strength: float = DEFAULT_STRENGTH
    images: tuple[InputImage, ...] = ()

    def __post_init__(self) -> None:
        if self.prompts:
            check_images(len(self.images), self.prompts)
        for seed in self.seeds:
            check_seed(seed)
        side = self.size if self.size is not None else DEFAULT_SIZE
        check_size(
            self.width if self.width is not None else side,
            self.height if self.height is not None else side,
        )
        if self.steps is not None:
            check_steps(self.steps)
        _check_guidance_strength(self.guidance, self.strength)

    def settings(self, model: str, modes: Sequence[str] = ("solo",)) -> RenderSettings:
        """The sweep's settings for ``model``: its defaults where no option was given."""
        defaults = model_defaults(model)
        # `or`, not `is None`: 0 was refused above, and this is how the CLI always read them.
        side = self.size or defaults.size
        return RenderSettings(
            prompts=self.prompts,
            seeds=self.seeds,
            width=self.width or side,
            height=self.height or side,
            steps=self.steps or defaults.steps,
            guidance=self.guidance,
            strength=self.strength,
            modes=tuple(modes),
            images=self.images,
        )


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for.

    ``model``: ``"tiny"``, a local diffusers folder, or a hub id. With
    ``comfy`` or a ``clip_file``/``t5_file``/``vae_file`` every component comes
    from single files (found in the ComfyUI folder ``comfy`` by their contents,
    each replaceable by its ``*_file``; see :mod:`lora_prune.comfy`) and
    ``model`` only names where tokenizers may come from (a diffusers folder;
    the CLI passes the ComfyUI folder).
    ``transformer_file``: a single-file FLUX.1 transformer (BFL/ComfyUI or
    diffusers naming, ``.safetensors``) that replaces ``model``'s transformer.
    ``device``: None picks cuda > mps > cpu. ``dtype``: ``fp32``/``bf16``/``fp16``
    or None for the device's best (bf16 on cuda/mps where supported, else fp16;
    fp32 on cpu). ``memory``: one of :data:`MEMORY_PLANS` (see
    :mod:`lora_prune.memoryplan`); ``offload=True`` is the old spelling of
    ``memory="offload"``.
    ``compile``: ``torch.compile`` the transformer's repeated blocks (the engine
    masks its hooks so switching blocks does not recompile).
    ``threads``: torch's CPU threads while a session renders on a CPU; None is the
    model's default (:attr:`ModelDefaults.cpu_threads`: 1 for the tiny model, torch's
    own choice otherwise). GPU renders ignore it.
    """

    model: str
    transformer_file: Path | None = None
    device: str | None = None
    dtype: str | None = None
    offload: bool = False
    compile: bool = False
    comfy: Path | None = None
    clip_file: Path | None = None
    t5_file: Path | None = None
    vae_file: Path | None = None
    memory: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise UsageError("no model given", "--model", "use 'tiny', a folder or a hub id")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(
                f"--threads {self.threads} is not in 1..{MAX_THREADS}", "--threads", "use e.g. 4"
            )
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise UsageError(f"unknown dtype {self.dtype!r}", "dtype", "use fp32, bf16 or fp16")
        if self.memory not in MEMORY_PLANS:
            raise UsageError(
                f"unknown memory plan {self.memory!r}", "--memory", f"use {', '.join(MEMORY_PLANS)}"
            )
        if self.offload:
            if self.memory not in ("auto", "offload"):
                raise UsageError(
                    f"--offload contradicts --memory {self.memory}",
                    "--offload",
                    "give only --memory",
                )
            object.__setattr__(self, "memory", "offload")  # frozen: normalise the alias once
        if self.uses_single_files and self.model == TINY_MODEL_ID:
            raise UsageError(
                "the tiny model has no single files",
                "--model tiny",
                "drop --comfy/--clip/--t5/--vae or give another --model",
            )

    @property
    def uses_single_files(self) -> bool:
        """True when every component comes from single files (ComfyUI layout)."""
        return any(p is not None for p in (self.comfy, self.clip_file, self.t5_file, self.vae_file))

    @property
    def defaults(self) -> ModelDefaults:
        return model_defaults(self.model)


@dataclass(frozen=True)
class PictureOptions:
    """How the analysis draws its heatmaps and contact sheets (no effect on the numbers)."""

    heatmap_scale: str = HEATMAP_SCALES[0]
    cmap: str = DEFAULT_CMAP
    opacity: float = DEFAULT_OPACITY
    sheet_order: str = SHEET_ORDERS[0]
    sheet_max_pixels: int | None = 40_000_000
    tile_scale: int = 0  # 0 = automatic: small renders are upscaled so labels stay legible

    def __post_init__(self) -> None:
        for option, value, choices in (
            ("--heatmap-scale", self.heatmap_scale, HEATMAP_SCALES),
            ("--cmap", self.cmap, COLORMAP_NAMES),
            ("--sheet-order", self.sheet_order, SHEET_ORDERS),
        ):
            if value not in choices:
                raise UsageError(f"unknown {option} {value!r}", option, f"use {', '.join(choices)}")
        check_number(self.opacity, "--opacity", 0.0, 1.0, fix="use e.g. 0.6")
        if self.sheet_max_pixels is not None and not (
            MIN_SHEET_PIXELS <= self.sheet_max_pixels <= MAX_SHEET_PIXELS
        ):
            raise UsageError(
                f"--sheet-max-pixels {self.sheet_max_pixels} is not in "
                f"{MIN_SHEET_PIXELS:,}..{MAX_SHEET_PIXELS:,}",
                "--sheet-max-pixels",
                "use e.g. 40000000",
            )
        if not 0 <= self.tile_scale <= MAX_TILE_SCALE:
            raise UsageError(
                f"tile scale {self.tile_scale} is not in 0..{MAX_TILE_SCALE}",
                "tile_scale",
                "use 0 (automatic)",
            )
