"""How a FLUX.1 pipeline lives on a card (``--memory``), and rough peak/time estimates.

Torch-free pure functions, so ``doctor`` and tests can ask what ``auto`` would
do for any card: callers pass the free device memory in (``doctor`` asks
:func:`lora_prune.render.deps.free_gpu_bytes`, the loader its own device). The
plans, from fastest to smallest:

- ``full``: every component on the device.
- ``offload``: diffusers' model CPU offload; one component at a time on the
  device, so the peak is the largest component (the transformer).
- ``group-offload``: diffusers' group offloading of the transformer one block
  at a time (with the text encoders and VAE moved in and out as in
  ``offload``): the peak is a few blocks plus the VAE.
- ``sequential``: diffusers' sequential CPU offload, one layer at a time: the
  smallest peak and by far the slowest.

The ``auto`` rule: the first of full, offload, group-offload, sequential whose
estimated peak (below) fits in the free device memory; ``full`` on a machine
without a GPU (everything is on the CPU anyway). Estimated peak = the resident
weights of the plan (component bytes at the compute dtype) + a working margin
of :data:`WORKING_BYTES` for activations, the latents and the CUDA context.
These are estimates: no measurement on a GPU exists yet (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .settings import DEFAULT_SIZE, DEFAULT_STEPS, MEMORY_PLANS

__all__ = [
    "MEMORY_PLANS",
    "PlanChoice",
    "choose_plan",
    "estimate_seconds_per_image",
    "plan_peak_bytes",
]

#: Activations of one 768x768 image at FLUX.1's width, latents, CUDA context and
#: allocator slack: a rough 3 GiB.
WORKING_BYTES = 3 * 2**30
#: Share of the transformer that group offloading keeps on the device at once
#: (the block being computed and the one prefetched, of 57, plus the embedders;
#: rounded up generously).
GROUP_RESIDENT_SHARE = 0.1
#: The original workflow's measurement: FLUX.1-dev, 20 steps, 768x768, a
#: 3090 Ti-class card: 30-40 min for ~60 images, so ~35 s per image.
ANCHOR_SECONDS = 35.0
ANCHOR_STEPS = 20
ANCHOR_PIXELS = 768 * 768
ANCHOR_TRANSFORMER_PARAMS = 11_900_000_000
#: Slowdown of each plan against ``full`` (guesses from diffusers' docs: model
#: offload moves each component once per image, group offload streams the
#: transformer every step, sequential moves every layer every step).
PLAN_SLOWDOWN = {"full": 1.0, "offload": 1.1, "group-offload": 1.6, "sequential": 8.0}


@dataclass(frozen=True)
class PlanChoice:
    """The plan ``auto`` picks, why, and its estimated peak device memory."""

    plan: str
    reason: str
    peak_bytes: int


def plan_peak_bytes(plan: str, sizes: Mapping[str, int]) -> int:
    """Estimated peak device bytes of ``plan`` for components of ``sizes`` (compute-dtype bytes).

    ``sizes`` has ``transformer``, ``clip``, ``t5``, ``vae``; missing ones count 0.
    """
    t = sizes.get("transformer", 0)
    others = [sizes.get(k, 0) for k in ("clip", "t5", "vae")]
    if plan == "full":
        resident = t + sum(others)
    elif plan == "offload":
        resident = max([t, *others])
    elif plan == "group-offload":
        resident = max([int(t * GROUP_RESIDENT_SHARE), *others])
    elif plan == "sequential":
        resident = 0
    else:
        raise ValueError(f"unknown plan {plan!r}")
    return resident + WORKING_BYTES


def choose_plan(free_bytes: int | None, sizes: Mapping[str, int]) -> PlanChoice:
    """What ``--memory auto`` does with ``free_bytes`` free on the device (None: no GPU)."""
    if free_bytes is None:
        return PlanChoice("full", "no GPU: cpu", plan_peak_bytes("full", sizes))
    for plan in ("full", "offload", "group-offload"):
        peak = plan_peak_bytes(plan, sizes)
        if peak <= free_bytes:
            return PlanChoice(
                plan, f"peak ~{peak / 2**30:.1f} GiB fits {free_bytes / 2**30:.1f} GiB free", peak
            )
    peak = plan_peak_bytes("sequential", sizes)
    return PlanChoice("sequential", f"nothing larger fits {free_bytes / 2**30:.1f} GiB free", peak)


def estimate_seconds_per_image(
    plan: str,
    transformer_params: int,
    steps: int = DEFAULT_STEPS,
    width: int = DEFAULT_SIZE,
    height: int = DEFAULT_SIZE,
) -> float:
    """A rough seconds-per-image on a 3090 Ti-class card: the anchor scaled linearly.

    Scaled by steps, pixels (attention makes large images worse than linear:
    an underestimate there), transformer size and the plan's slowdown.
    """
    return (
        ANCHOR_SECONDS
        * (steps / ANCHOR_STEPS)
        * (width * height / ANCHOR_PIXELS)
        * (transformer_params / ANCHOR_TRANSFORMER_PARAMS)
        * PLAN_SLOWDOWN[plan]
    )
