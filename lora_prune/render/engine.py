"""The render engine: a parsed LoRA attached to a diffusers FLUX.1 pipeline by forward hooks.

diffusers cannot scale a Flux LoRA per block, drops some kohya modules (input and
final layers), hard-codes FLUX.1's widths in its kohya converter, ignores
``diff_b``/``dora_scale``/norm diffs and T5 parts, and reloading a filtered LoRA
per block costs more than the render itself. So the engine applies the LoRA
itself: every module of the parsed file (:mod:`lora_prune.lora`) is resolved to
the diffusers modules its :class:`~lora_prune.keys.Target` names, its tensors are
loaded once, and a forward hook on each module adds the delta of the blocks that
are switched on, sample by sample. One pipeline call thus renders a batch where
every image has its own set of active blocks, from the same starting noise, and
the model's weights are never written (fuse/unfuse drifts in bf16).

It is one module of ~770 lines because it is one object's life cycle: resolve
every LoRA module against the pipeline (with one error naming every mismatch),
load and place its tensors, switch blocks per image, render, and detach. The
hook arithmetic lives in :mod:`.hooks`, compilation and step-cache detection in
:mod:`.compiled`, the adapter rules in :mod:`lora_prune.adapters`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch

from ..blocks import format_block_spec, sort_blocks
from ..errors import UsageError
from ..keys import Target
from ..lora import LoraFile, LoraModule
from ..matching import AttachPlan, ModelIndex, ModelModule, plan_attach
from ..resize import is_rank, rotated_factors, why_kept
from ..safetensors_io import SafetensorsReader
from ..settings import DEFAULT_BATCH_SIZE, DEFAULT_STRENGTH, ImageSettings, check_batch_size
from .compiled import compile_blocks, step_cache, uncompile
from .families import pipeline_call
from .families.base import Conditioning
from .hooks import Hook, Kron, Piece, Selection, Switches, norm_features, normaliser, swap_halves
from .loading import LoadedModel
from .storage import dense_weight, weight_shape

__all__ = [
    "BlockEngine",
]

OutputKind = Literal["uint8", "float"]
#: Per variant, module stem -> the rank it is rendered at (None or absent: as attached).
RankCaps = Mapping[str, int] | None
# Which text-encoder blocks a variant switches on, and its rank caps on their modules.
_TextState = tuple[tuple[str, ...], tuple[tuple[str, int], ...]]

# Transformers with an open engine: a second engine would stack its hooks on the first.
_OPEN: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


#: An optional part of a module's delta.
_T = torch.Tensor | None


@dataclass
class _Parts:
    """One LoRA module's delta as read, float32, before its rows are cut per target.

    ``hada`` is LoHa's (w1a, w1b, w2a, w2b); ``lokr`` LoKr's (w1 or w1_a, w1_b,
    w2 or w2_a, w2_b), a ``_b`` None where the factor is stored whole.
    """

    down: _T = None
    up: _T = None
    up_bias: _T = None
    dense: _T = None
    bias: _T = None
    hada: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    lokr: tuple[torch.Tensor, _T, torch.Tensor, _T] | None = None


def _sum(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _swap(t: _T) -> _T:
    return None if t is None else swap_halves(t)


def _lora_rows(lo: int, hi: int, total: int, swapped: bool) -> tuple[tuple[int, int], ...]:
    """The LoRA's row ranges that give the model's rows ``lo:hi``, in order.

    With ``swapped`` (the final adaLN) the model's rows are the LoRA's with their
    two halves exchanged (:func:`~.hooks.swap_halves`).
    """
    if not swapped:
        return ((lo, hi),)
    half = total // 2
    ranges: list[tuple[int, int]] = []
    if lo < half:
        ranges.append((lo + half, min(hi, half) + half))
    if hi > half:
        ranges.append((max(lo, half) - half, hi - half))
    return tuple(ranges)


def _shape(module: LoraModule, role: str) -> tuple[int, ...]:
    return tuple(module.tensors[role].shape)


class BlockEngine:
    """A LoRA attached to a pipeline by forward hooks, switchable per block and per image.

    Construction checks every module of ``lora`` against the model (a module
    without a target or of the wrong shape raises :class:`ModelMismatchError`
    naming it and the likely base model; DoRA, OFT, GLoRA and Tucker factors raise
    :class:`UnsupportedAdapterError`), reads the tensors once onto the device in
    each target's dtype (LoHa and LoKr kept factored, so the engine holds about
    the file's size: :attr:`attached_bytes`; full diffs are dense in the file
    and stay so) and registers one hook per touched diffusers module. Outside :meth:`render` and
    :meth:`activated` every block is off: the pipeline renders as without LoRA.
    Use as a context manager, or call :meth:`close`, to remove every hook.

    ``compile=True`` compiles the transformer's repeated blocks with
    masked hooks (every block's delta is computed and scaled per image by a 0/1
    mask tensor), so switching blocks never recompiles; :meth:`close` restores
    the eager blocks. A step cache on the transformer (first-block cache,
    MagCache, FasterCache, ...) is refused with :class:`UsageError`: it would
    replace the very block contributions a sweep measures.

    ``truncatable=True`` attaches every plain LoRA module (those ``resize``
    rewrites, :func:`lora_prune.resize.why_kept`) in its SVD basis, the same
    product to float rounding, so that :meth:`render`'s ``ranks`` can render
    each image at its own ranks: the rank-k truncation is the file
    ``resize --rank k`` writes (:attr:`ranks` gives each module's full rank).
    """

    blocks: list[str]
    attached: int
    #: truncatable module stem -> the rank it is attached at (empty unless ``truncatable``)
    ranks: dict[str, int]

    def __init__(
        self,
        loaded: LoadedModel,
        lora: LoraFile,
        *,
        compile: bool = False,
        truncatable: bool = False,
    ) -> None:
        self.loaded = loaded
        self.lora = lora
        self.truncatable = truncatable
        self.ranks = {}
        self.pipe: Any = loaded.pipe
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hooks: dict[str, Hook] = {}
        self._switches = Switches()
        self._closed = False
        self._registered = False
        self._compiled: list[torch.nn.Module] = []
        transformer = self.pipe.transformer
        if transformer in _OPEN:
            raise UsageError(
                "another render engine is still attached to this pipeline",
                lora.path,
                "close the first engine (with-block or close()) before attaching a second",
            )
        self._check_unfused(transformer)
        self._check_no_step_cache()
        self._call = pipeline_call(lora.family)
        plans = plan_attach(lora, self._model_index())
        try:
            with SafetensorsReader(lora.path, lora.header) as reader:
                for plan in plans:
                    self._attach(plan, reader)
            for key, hook in self._hooks.items():
                module = self._module(key)
                assert module is not None
                self._handles.append(module.register_forward_hook(hook))
            if compile:
                self._compile(transformer)
        except BaseException:
            self.close()
            raise
        _OPEN.add(transformer)
        self._registered = True
        self.attached = len(plans)
        self.blocks = sort_blocks(p.module.block for p in plans)

    # --- attaching -----------------------------------------------------------
    def _component(self, model: str) -> torch.nn.Module | None:
        attribute = self.lora.family.components.get(model)
        component = getattr(self.pipe, attribute, None) if attribute else None
        return component if isinstance(component, torch.nn.Module) else None

    def _module(self, key: str) -> torch.nn.Module | None:
        model, _, path = key.partition(":")
        component = self._component(model)
        if component is None:
            return None
        # transformers v5 flattened CLIPTextModel: its layers lost the "text_model." level.
        candidates = [path, path.removeprefix("text_model.")] if model == "clip" else [path]
        for candidate in candidates:
            try:
                return component.get_submodule(candidate)
            except AttributeError:
                continue
        return None

    def _check_no_step_cache(self) -> None:
        name = step_cache(self.pipe.transformer)
        if name is not None:
            raise UsageError(
                f"the transformer has a step cache enabled ({name}), which skips or reuses "
                "blocks between steps and would replace the block contributions being measured",
                self.lora.path,
                "call pipe.transformer.disable_cache() (or remove the cache hooks) before rendering",
            )

    def _compile(self, transformer: torch.nn.Module) -> None:
        # Masked hooks read one blocks x batch tensor: new selections are new values, not new code.
        hooks = [h for k, h in self._hooks.items() if k.startswith("transformer:")]
        self._switches.rows = {b: i for i, b in enumerate(sort_blocks({h.block for h in hooks}))}
        off = torch.zeros(len(self._switches.rows), 1, device=self.pipe._execution_device)
        self._switches.off = self._switches.mask = off
        # Compiled hooks always find a rank mask (all ones when not capped): a capped
        # render changes mask values, not which dict entries the traced code reads.
        device = self.pipe._execution_device
        self._switches.rank_off = self._switches.rank_masks = {
            stem: torch.ones(1, r, device=device)
            for stem, r in self.ranks.items()
            if self._model_of(stem) == "transformer"
        }
        for hook in hooks:
            hook.masked = True
        self._compiled = compile_blocks(transformer)

    def _set_mask(self, variants: Sequence[frozenset[str]], strength: float) -> None:
        rows = self._switches.rows
        if not rows:
            return
        mask = torch.zeros(len(rows), len(variants))
        for block, row in rows.items():
            for i, variant in enumerate(variants):
                if block in variant:
                    mask[row, i] = strength
        self._switches.mask = mask.to(self.pipe._execution_device)

    @staticmethod
    def _check_unfused(transformer: torch.nn.Module) -> None:
        for name, module in transformer.named_modules():
            if getattr(module, "fused_projections", False):
                raise UsageError(
                    "the transformer's attention projections are fused (to_qkv), LoRA hooks on to_q/to_k/to_v "
                    "would never run",
                    name,
                    "call pipe.unfuse_qkv_projections() before attaching the engine",
                )

    def _model_index(self) -> ModelIndex:
        """The pipeline as matching sees it: its components, module kinds and shapes, widths."""

        def lookup(key: str) -> ModelModule | None:
            module = self._module(key)
            if module is None:
                return None
            name = type(module).__name__
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                rows, cols = weight_shape(weight)
                return ModelModule("linear", name, rows, cols)
            features = norm_features(module)
            if features is not None and normaliser(module) is not None:
                return ModelModule("norm", name, int(features))
            return ModelModule("other", name)

        components = self.lora.family.components
        present = frozenset(m for m in components if self._component(m) is not None)
        return ModelIndex(present, lookup, {m: self._model_width(m) for m in components})

    def _model_width(self, model: str) -> int | None:
        component = self._component(model)
        config = getattr(component, "config", None)
        if config is None:
            return None
        if model == "transformer":
            heads = getattr(config, "num_attention_heads", None)
            head_dim = getattr(config, "attention_head_dim", None)
            return int(heads * head_dim) if heads and head_dim else None
        width = getattr(config, "hidden_size" if model == "clip" else "d_model", None)
        return int(width) if width else None

    def _attach(self, plan: AttachPlan, reader: SafetensorsReader) -> None:
        module = plan.module
        target = module.target
        assert target is not None
        first = self._module(plan.hook_keys[0])
        assert first is not None
        weight = getattr(first, "weight", None)
        ref = weight if isinstance(weight, torch.Tensor) else next(first.parameters(), None)
        device = ref.device if ref is not None else self.loaded.device
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else self.loaded.dtype

        def read(role: str) -> torch.Tensor:
            # float32 until the end, whatever the file stores (fp8/bf16 arithmetic loses bits).
            return torch.from_numpy(
                np.ascontiguousarray(reader.read_array(module.tensors[role].name))
            )

        self._add_pieces(plan, device, dtype, self._deltas(plan, read))

    def _deltas(self, plan: AttachPlan, read: Callable[[str], torch.Tensor]) -> _Parts:
        """The module's parts in float32, in the model's row order (final adaLN halves swapped)."""
        module = plan.module
        target = module.target
        assert target is not None
        t = module.tensors
        parts = _Parts()
        if "down" in t:
            parts.down = read("down").reshape(_shape(module, "down")[0], -1)
            parts.up = read("up").reshape(_shape(module, "up")[0], -1)
            if self.truncatable and why_kept(module) is None:
                parts.up, parts.down = self._rotated(module, parts.up, parts.down)
        if "up_bias" in t:
            parts.up_bias = read("up_bias")
        if "hada_w1_a" in t:
            # Kept factored: the hooks build the delta only inside a forward.
            parts.hada = (
                read("hada_w1_a"),
                read("hada_w1_b").reshape(_shape(module, "hada_w1_b")[0], -1),
                read("hada_w2_a"),
                read("hada_w2_b").reshape(_shape(module, "hada_w2_b")[0], -1),
            )
        if any(r.startswith("lokr_") for r in t):
            parts.lokr = (*self._lokr(read, t, "lokr_w1"), *self._lokr(read, t, "lokr_w2"))
        dense_parts = [read(role) for role in ("diff", "w_norm") if role in t]
        if "set_weight" in t:
            dense_parts.append(read("set_weight") - self._current(plan, target))
        bias_parts = [read(r) for r in ("diff_b", "b_norm") if r in t]
        if parts.up_bias is not None and parts.down is None:
            # A bias-only PEFT module: its bias is scaled like a weight delta would be.
            bias_parts.append(parts.up_bias * module.scale)
            parts.up_bias = None
        if dense_parts:
            parts.dense = _sum(dense_parts)
        if bias_parts:
            parts.bias = _sum(bias_parts)
        if target.swap_halves:
            # LoKr's rows are swapped through its row ranges (_add_pieces).
            parts.up = _swap(parts.up)
            parts.up_bias = _swap(parts.up_bias)
            parts.dense = _swap(parts.dense)
            parts.bias = _swap(parts.bias)
            if parts.hada is not None:
                w1a, w1b, w2a, w2b = parts.hada
                parts.hada = (swap_halves(w1a), w1b, swap_halves(w2a), w2b)
        return parts

    def _rotated(
        self, module: LoraModule, up: torch.Tensor, down: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``up, down`` in their SVD basis (float64 SVD, float32 out), registered as truncatable."""
        new_up, new_down, _ = rotated_factors(up.double().numpy(), down.double().numpy())
        self.ranks[module.stem] = int(new_down.shape[0])
        return torch.from_numpy(new_up).float(), torch.from_numpy(new_down).float()

    def _model_of(self, stem: str) -> str:
        """The component a truncatable module patches (transformer, clip or t5)."""
        target = self.lora.modules[stem].target
        assert target is not None  # attached modules all have one
        return target.model

    def _add_pieces(
        self, plan: AttachPlan, device: torch.device, dtype: torch.dtype, parts: _Parts
    ) -> None:
        """Place the parts on the model's device and hang one piece on each target's hook."""
        module = plan.module
        target = module.target
        assert target is not None
        scale = module.scale

        def place(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device=device, dtype=dtype).contiguous()

        def placed(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, dtype=dtype).contiguous()

        # Shared by the row slices of a fused module: the input-side factors, all of LoKr's.
        down_placed = place(parts.down)
        hada_in = None if parts.hada is None else (placed(parts.hada[1]), placed(parts.hada[3]))
        lokr = None if parts.lokr is None else [place(f) for f in parts.lokr]
        offsets = np.cumsum([0, *plan.rows]).tolist()
        total = int(offsets[-1])
        for i, key in enumerate(plan.hook_keys):
            lo, hi = int(offsets[i]), int(offsets[i + 1])

            def rows(x: torch.Tensor | None, lo: int = lo, hi: int = hi) -> torch.Tensor | None:
                return None if x is None else place(x[lo:hi])

            piece = Piece(
                stem=module.stem,
                scale=scale,
                down=down_placed,
                up=rows(parts.up),
                up_bias=rows(parts.up_bias),
            )
            if target.kind == "norm":
                piece.norm = rows(parts.dense)
            else:
                piece.dense = rows(parts.dense)
            piece.bias = rows(parts.bias)
            if parts.hada is not None and hada_in is not None:
                piece.hada = (
                    placed(parts.hada[0][lo:hi]),
                    hada_in[0],
                    placed(parts.hada[2][lo:hi]),
                    hada_in[1],
                )
            if lokr is not None:
                w1, w1_b, w2, w2_b = lokr
                assert w1 is not None and w2 is not None
                ranges = _lora_rows(lo, hi, total, target.swap_halves)
                piece.lokr = Kron(w1=w1, w2=w2, ranges=ranges, w1_b=w1_b, w2_b=w2_b)
            hook = self._hooks.get(key)
            if hook is None:
                target_module = self._module(key)
                assert target_module is not None
                normalise = normaliser(target_module) if target.kind == "norm" else None
                hook = self._hooks[key] = Hook(self._switches, module.block, target.kind, normalise)
                hook.device = device
            hook.pieces.append(piece)

    @staticmethod
    def _lokr(
        read: Callable[[str], torch.Tensor], t: dict[str, Any], name: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A LoKr factor as (whole, None) or as its low-rank pair (a, b), never multiplied out."""
        if name in t:
            return read(name), None
        return read(f"{name}_a"), read(f"{name}_b")

    @property
    def attached_bytes(self) -> int:
        """Bytes of the LoRA tensors the hooks hold, each shared tensor counted once."""
        seen: dict[tuple[int, int], int] = {}
        for hook in self._hooks.values():
            for piece in hook.pieces:
                for t in piece.held():
                    seen[(t.untyped_storage().data_ptr(), int(t.storage_offset()))] = (
                        t.numel() * t.element_size()
                    )
        return sum(seen.values())

    def _current(self, plan: AttachPlan, target: Target) -> torch.Tensor:
        """The weight a ``set_weight`` replaces, in the LoRA's row order, as float32."""
        parts: list[torch.Tensor] = []
        for key, n in zip(plan.hook_keys, plan.rows, strict=True):
            module = self._module(key)
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                parts.append(dense_weight(weight))
            else:
                parts.append(torch.ones(n))  # an affine-free norm multiplies by 1
        current = torch.cat(parts, dim=0)
        return swap_halves(current) if target.swap_halves else current

    # --- switching -----------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(
                "the render engine is closed", self.lora.path, "create a new BlockEngine"
            )

    def _check_variant(self, variant: frozenset[str]) -> None:
        layout = self.lora.family.blocks
        unknown = sorted(b for b in variant if b not in layout.ids)
        if unknown:
            raise UsageError(
                f"unknown block id {unknown[0]!r}",
                "variant",
                f"{layout.family}'s blocks are {format_block_spec(layout.ids)}",
            )

    @contextlib.contextmanager
    def activated(
        self, blocks: frozenset[str], strength: float = DEFAULT_STRENGTH
    ) -> Iterator[None]:
        """Switch ``blocks`` on for every sample of whatever runs inside the block.

        For calling the pipeline (or one of its modules) yourself; :meth:`render`
        does its own switching.
        """
        self._check_open()
        self._check_variant(frozenset(blocks))
        self._switches.selection = {b: None for b in blocks if b in self.blocks}
        self._switches.strength = float(strength)
        self._set_mask([frozenset(blocks)], float(strength))
        try:
            yield
        finally:
            self._switches.reset()

    # --- rendering -----------------------------------------------------------
    def _check_settings(self, settings: ImageSettings, batch_size: int) -> None:
        # ImageSettings checked the values; this is the loaded model's own patch size.
        multiple = int(getattr(self.pipe, "vae_scale_factor", 8)) * 2
        for name, value in (("width", settings.width), ("height", settings.height)):
            if value % multiple:
                raise UsageError(
                    f"{name} {value} is not a positive multiple of {multiple}",
                    f"--{name}",
                    f"use e.g. {max(multiple, round(value / multiple) * multiple)}",
                )
        check_batch_size(batch_size)

    def _text_state(self, variant: frozenset[str], caps: RankCaps) -> _TextState:
        on = tuple(b for b in self._call.text_blocks if b in variant and b in self.blocks)
        text_caps = tuple(
            sorted((stem, r) for stem, r in (caps or {}).items() if self._model_of(stem) in on)
        )
        return on, text_caps

    def _encode(self, settings: ImageSettings, state: _TextState) -> Conditioning:
        on, text_caps = state
        self._switches.selection = dict.fromkeys(on)
        self._switches.batch = 1
        self._switches.rank_masks = self._rank_masks([dict(text_caps)], set(dict(text_caps)))
        try:
            return self._call.encode(self.pipe, settings)
        finally:
            self._switches.selection = {}
            self._switches.rank_masks = self._switches.rank_off

    def _check_ranks(self, ranks: Sequence[RankCaps] | None, count: int) -> list[dict[str, int]]:
        """Per variant its rank caps (empty: as attached), checked against the attached modules."""
        if ranks is None:
            return [{} for _ in range(count)]
        if len(ranks) != count:
            raise UsageError(
                f"{len(ranks)} rank caps for {count} variants", "ranks", "give one per variant"
            )
        if any(ranks) and not self.truncatable:
            raise UsageError(
                "rank caps need an engine attached in the SVD basis",
                self.lora.path,
                "create the BlockEngine with truncatable=True",
            )
        checked: list[dict[str, int]] = []
        for caps in ranks:
            out: dict[str, int] = {}
            for stem, r in (caps or {}).items():
                if stem not in self.ranks:
                    raise UsageError(
                        f"module {stem!r} is no plain low-rank module of the LoRA",
                        self.lora.path,
                        "cap only modules that resize can lower (BlockEngine.ranks)",
                    )
                if not is_rank(r):
                    raise UsageError(f"rank {r!r} is not an integer >= 1", stem, "give ranks >= 1")
                if r < self.ranks[stem]:
                    out[stem] = r
            checked.append(out)
        return checked

    def _rank_masks(
        self, caps: Sequence[Mapping[str, int]], stems: set[str]
    ) -> dict[str, torch.Tensor]:
        """Stem -> ``len(caps) x rank`` 0/1 masks keeping each sample's first ``caps[i][stem]``."""
        device = self.pipe._execution_device
        masks: dict[str, torch.Tensor] = {}
        for stem in sorted(stems):
            full = self.ranks[stem]
            mask = torch.ones(len(caps), full)
            for i, cap in enumerate(caps):
                mask[i, cap.get(stem, full) :] = 0.0
            masks[stem] = mask.to(device)
        return masks

    def render(
        self,
        variants: Sequence[frozenset[str]],
        settings: ImageSettings,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
        output: OutputKind = "uint8",
        ranks: Sequence[RankCaps] | None = None,
    ) -> list[np.ndarray]:
        """One image per variant (a set of active block ids; the empty set = no LoRA).

        Every image starts from the same noise (``settings.seed``, drawn by a CPU
        generator as diffusers' ``torch.Generator("cpu")`` would) and the same
        prompt; each has its own blocks. Variants go through the pipeline
        ``batch_size`` at a time; ``progress`` gets the number of images done so
        far after each batch. ``output="uint8"`` gives ``H x W x 3`` uint8
        (rounded as diffusers' PIL output), ``"float"`` float32 in 0..1.
        Block ids the LoRA lacks are accepted and change nothing.

        ``ranks`` (an engine built ``truncatable``): per variant, module stem ->
        the rank it renders at, the rest at the rank attached; an image then
        renders as the file ``resize`` writes with those ranks.
        """
        self._check_open()
        self._check_no_step_cache()
        self._check_settings(settings, batch_size)
        if output not in ("uint8", "float"):
            raise UsageError(f"unknown output kind {output!r}", "output", "use 'uint8' or 'float'")
        wanted = [frozenset(v) for v in variants]
        for variant in wanted:
            self._check_variant(variant)
        caps = self._check_ranks(ranks, len(wanted))
        if not wanted:
            return []
        embeddings: dict[_TextState, Conditioning] = {}
        self._switches.strength = float(settings.strength)
        try:
            states = [self._text_state(v, c) for v, c in zip(wanted, caps, strict=True)]
            for state in states:
                if state not in embeddings:
                    embeddings[state] = self._encode(settings, state)
            dtype = next(iter(embeddings.values()))[0].dtype
            latent = self._call.latent(self.pipe, settings, dtype)
            images: list[np.ndarray] = []
            for start in range(0, len(wanted), batch_size):
                stop = start + batch_size
                batch = [
                    (v, c, embeddings[s])
                    for v, c, s in zip(
                        wanted[start:stop], caps[start:stop], states[start:stop], strict=True
                    )
                ]
                images.extend(self._render_batch(batch, settings, latent, output))
                if progress is not None:
                    progress(len(images))
            return images
        finally:
            self._switches.reset()

    def _render_batch(
        self,
        batch: list[tuple[frozenset[str], dict[str, int], Conditioning]],
        settings: ImageSettings,
        latent: torch.Tensor,
        output: OutputKind,
    ) -> list[np.ndarray]:
        size = len(batch)
        device = latent.device
        variants = [v for v, _, _ in batch]
        selection: dict[str, Selection] = {}
        for block in self.blocks:
            if block in self._call.text_blocks:
                continue  # text-encoder blocks live in the embeddings
            on = [i for i, variant in enumerate(variants) if block in variant]
            if not on:
                continue  # no hook of this block does any work in this batch
            selection[block] = (
                None if len(on) == size else torch.tensor(on, dtype=torch.long, device=device)
            )
        parts = zip(*(e for _, _, e in batch), strict=True)
        conditioning = tuple(torch.cat(list(part), dim=0) for part in parts)
        caps = [c for _, c, _ in batch]
        # Eager hooks mask only the modules capped in this batch, compiled ones every module.
        if self._compiled:
            stems = set(self._switches.rank_off)
        else:
            stems = {s for c in caps for s in c if self._model_of(s) == "transformer"}
        self._switches.rank_masks = self._rank_masks(caps, stems)
        self._switches.selection = selection
        self._switches.batch = size
        self._set_mask(variants, self._switches.strength)
        try:
            arrays = self._call.denoise(
                self.pipe,
                conditioning,
                latent.repeat(size, *([1] * (latent.dim() - 1))),
                settings,
            )
        finally:
            self._switches.selection = {}
            self._switches.mask = self._switches.off
            self._switches.rank_masks = self._switches.rank_off
        if output == "uint8":
            # diffusers' own PIL conversion, so "uint8" equals output_type="pil" pixel for pixel.
            return [np.asarray((a * 255).round().astype(np.uint8)) for a in arrays]
        return [np.asarray(a) for a in arrays]

    # --- lifetime --------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook and drop the loaded tensors; the pipeline is as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooks.clear()
        self._switches.reset()
        uncompile(self._compiled)
        self._compiled.clear()
        self._closed = True
        if self._registered:
            self._registered = False
            _OPEN.discard(self.pipe.transformer)

    def __enter__(self) -> BlockEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
