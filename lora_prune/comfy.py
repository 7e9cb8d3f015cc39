"""Find a FLUX.1 pipeline's single files in a ComfyUI install, by what they contain.

ComfyUI users have the transformer in ``models/diffusion_models`` (or
``models/unet``), CLIP-L and T5-XXL in ``models/text_encoders`` (or
``models/clip``) and the VAE in ``models/vae``; ``extra_model_paths.yaml`` adds
more folders. File names say little (``clip_l.safetensors`` may be CLIP-G, a
"flux" file may be a LoRA), so every ``.safetensors`` there is identified by its
header's keys and shapes (read with :func:`~lora_prune.safetensors_io.read_header`,
no tensor data): the transformer first, then the text encoders and VAE whose
widths fit it. The tokenizers come from ComfyUI's source tree or a diffusers
folder. Torch-free, so ``doctor`` runs without the render extra.

It is one module of ~650 lines because identification, the folder search and
the ``doctor`` report share one notion of a component (kind, widths, dtype,
why it was chosen); no function in it is long.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import LoraPruneError, UnreadableFileError, UsageError
from .families.base import count_blocks, strip_wrapper
from .families.flux1.checkpoints import WIDTHS, TransformerLayout, read_transformer
from .memoryplan import PlanChoice, choose_plan, estimate_seconds_per_image
from .safetensors_io import SafetensorsHeader, read_header
from .settings import DEFAULT_SIZE, DEFAULT_STEPS

__all__ = [
    "COMPONENTS",
    "ComfyModels",
    "Component",
    "Diagnosis",
    "Tokenizers",
    "diagnose",
    "find_models",
    "identify",
    "parse_extra_model_paths",
]

#: The pipeline parts that come from single files, and their CLI options.
COMPONENTS = ("transformer", "clip", "t5", "vae")
OPTIONS = {"transformer": "--transformer", "clip": "--clip", "t5": "--t5", "vae": "--vae"}
_FOLDERS: dict[str, tuple[str, ...]] = {
    "transformer": ("diffusion_models", "unet", "checkpoints"),
    "clip": ("text_encoders", "clip"),
    "t5": ("text_encoders", "clip"),
    "vae": ("vae",),
}
_WANTED = {
    "transformer": "a FLUX.1 transformer (flux1-dev.safetensors) in models/diffusion_models",
    "clip": "CLIP-L (clip_l.safetensors) in models/text_encoders",
    "t5": "T5-XXL (t5xxl_fp16.safetensors) in models/text_encoders",
    "vae": "the FLUX.1 VAE (ae.safetensors) in models/vae",
}
_SUFFIXES = (".safetensors", ".sft", ".gguf")
#: GGUF files (city96's ComfyUI-GGUF quantised transformers) open with these bytes.
_GGUF_MAGIC = b"GGUF"
# A models tree is walked to this depth and this many files per folder: a
# symlink loop or a folder of a million files must not hang discovery.
_MAX_DEPTH = 4
_MAX_FILES = 2000
_MAX_YAML_BYTES = 256 * 1024
_FP8 = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Component:
    """One identified file: what it is, why we think so, and what it weighs."""

    kind: str  # one of COMPONENTS
    path: Path
    reason: str
    dtype: str  # the storage dtype of most of its bytes (safetensors name, e.g. BF16)
    nbytes: int  # tensor bytes (what it takes in memory at that dtype)
    numel: int
    #: Widths that must agree between parts: transformer ``txt``/``pooled``/
    #: ``latent``; clip ``width``; t5 ``width``; vae ``latent``.
    widths: Mapping[str, int] = field(default_factory=dict)
    variant: str = ""  # transformer: "dev" or "schnell"
    naming: str = ""  # "bfl"/"diffusers" (transformer), "ldm"/"diffusers" (vae), "hf"
    problem: str = ""  # why it cannot be used although it is this kind


@dataclass(frozen=True)
class Tokenizers:
    """The CLIP (``vocab.json``, ``merges.txt``) and T5 (``tokenizer.json`` or ``spiece.model``) files."""

    clip_vocab: Path
    clip_merges: Path
    t5: Path


@dataclass(frozen=True)
class ComfyModels:
    """What discovery chose, the other candidates it looked at, and where it looked."""

    chosen: Mapping[str, Component]
    others: tuple[tuple[Component, str], ...]  # candidates not chosen, and why
    skipped: tuple[tuple[Path, str], ...]  # files that are none of the parts, and why
    folders: Mapping[str, tuple[Path, ...]]
    tokenizers: Tokenizers | None
    tokenizer_problem: str = ""  # why tokenizers is None: the file to provide


# ---------------------------------------------------------------------------
# extra_model_paths.yaml


def parse_extra_model_paths(path: Path) -> dict[str, list[Path]]:
    """ComfyUI's ``extra_model_paths.yaml``: folder name -> extra folders, in file order.

    Each top-level group has a ``base_path`` (``~`` and ``$VARS`` expanded,
    relative to the YAML file's folder) and ``folder_name: path`` entries, where
    a ``|`` block gives one path per line; paths are relative to ``base_path``.
    PyYAML's safe loader reads it when installed, else a bounded reader of that
    simple structure.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UnreadableFileError(f"cannot read ({exc.strerror})", path, "check the file") from exc
    if len(raw) > _MAX_YAML_BYTES:
        raise UnreadableFileError(
            f"extra_model_paths.yaml is over {_MAX_YAML_BYTES // 1024} KiB", path, "shorten it"
        )
    text = raw.decode("utf-8", errors="replace")
    try:
        import yaml
    except ImportError:
        doc: object = _parse_simple_yaml(text)
    else:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UnreadableFileError(
                f"cannot parse extra_model_paths.yaml ({type(exc).__name__})",
                path,
                "fix its YAML (see ComfyUI's extra_model_paths.yaml.example)",
            ) from exc
    out: dict[str, list[Path]] = {}
    if not isinstance(doc, dict):
        return out
    for group in doc.values():
        if not isinstance(group, dict):
            continue
        base = group.get("base_path")
        base_path = path.parent
        if isinstance(base, str):
            base_path = path.parent / os.path.expanduser(os.path.expandvars(base))
        for name, value in group.items():
            if name in ("base_path", "is_default") or not isinstance(value, str):
                continue
            for line in value.splitlines():
                if line.strip():
                    folder = os.path.expanduser(os.path.expandvars(line.strip()))
                    out.setdefault(str(name), []).append(base_path / folder)
    return out


def _parse_simple_yaml(text: str) -> dict[str, dict[str, str]]:
    """The two-level ``group:\\n  key: value`` / ``key: |`` subset ComfyUI's file uses."""
    doc: dict[str, dict[str, str]] = {}
    group: dict[str, str] | None = None
    block_key = ""
    block_indent = 0
    for raw_line in text.splitlines():
        line = raw_line.split(" #", 1)[0].rstrip() if not raw_line.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if block_key and group is not None and indent > block_indent:
            group[block_key] += line.strip() + "\n"
            continue
        block_key = ""
        key, sep, value = line.strip().partition(":")
        if not sep:
            continue
        if indent == 0:
            group = doc.setdefault(key.strip(), {})
        elif group is not None:
            value = value.strip().strip("'\"")
            if value in ("|", "|-", ">"):
                block_key, block_indent = key.strip(), indent
                group[block_key] = ""
            else:
                group[key.strip()] = value
    return doc


# ---------------------------------------------------------------------------
# Identifying one file


def _main_dtype(header: SafetensorsHeader) -> str:
    weights: dict[str, int] = {}
    for info in header.tensors.values():
        weights[info.dtype] = weights.get(info.dtype, 0) + info.nbytes
    return max(weights, key=lambda d: weights[d]) if weights else "?"


def _shape(header: SafetensorsHeader, key: str) -> tuple[int, ...]:
    info = header.tensors.get(key)
    return info.shape if info is not None else ()


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _identify_gguf(path: Path) -> Component | str:
    """A GGUF file: a quantised FLUX.1 transformer when its tensors say so.

    The tensor list is read with the optional ``gguf`` package (numpy only);
    without it the file is taken as a FLUX.1-dev transformer of FLUX.1's widths,
    marked as needing the package to load.
    """
    size = path.stat().st_size
    try:
        import gguf
    except ImportError:
        return Component(
            "transformer", path, "GGUF file (tensors not listed: the gguf package is missing)",
            "GGUF", size, size, widths=dict(WIDTHS), variant="dev", naming="gguf",
            problem="loading GGUF needs the gguf package: pip install 'lora-prune[gguf]'",
        )  # fmt: skip
    try:
        tensors = {
            t.name: [int(d) for d in reversed(t.shape)] for t in gguf.GGUFReader(path).tensors
        }
    except Exception as exc:  # gguf's parser errors at the file boundary
        return f"unreadable GGUF file ({type(exc).__name__})"
    layout = read_transformer(tensors)
    if layout is None or (isinstance(layout, TransformerLayout) and layout.naming != "bfl"):
        return "a GGUF file, but not a FLUX.1 transformer in BFL naming"
    if isinstance(layout, str):
        return layout
    return Component(
        "transformer", path, layout.describe("GGUF (quantised)", path.name), "GGUF", size, size,
        widths=layout.widths, variant=layout.variant, naming="gguf",
    )  # fmt: skip


def identify(path: Path) -> Component | str:
    """What ``path`` is (a :class:`Component`), or why it is none of the parts.

    Unreadable files (pickles, LFS pointers, truncated downloads) come back as a
    reason, not an error: one bad file in a models folder must not stop the search.
    """
    if _is_gguf(path):
        return _identify_gguf(path)
    try:
        header = read_header(path)
    except LoraPruneError as exc:
        return f"unreadable: {exc.what}"
    dtype = _main_dtype(header)
    nbytes = sum(t.nbytes for t in header.tensors.values())
    numel = sum(t.numel for t in header.tensors.values())

    def made(kind: str, reason: str, **kw: Any) -> Component:
        return Component(kind, path, reason, dtype, nbytes, numel, **kw)

    keys = set(strip_wrapper(header.tensors)[1])
    fp8_note = " (scaled fp8)" if "scaled_fp8" in keys else ""
    found = _identify_transformer(header, made, fp8_note)
    if found is None:
        found = _identify_other(header, keys, made, fp8_note)
    return found or "none of transformer, CLIP, T5 or VAE (by its keys)"


_Made = Callable[..., Component]


def _identify_transformer(
    header: SafetensorsHeader, made: _Made, fp8_note: str
) -> Component | str | None:
    """A FLUX.1 transformer in BFL or diffusers naming; None when the keys are neither."""
    layout = read_transformer(header.shapes)
    if not isinstance(layout, TransformerLayout):
        return layout
    # The scaled-fp8 note belongs to BFL-named files (ComfyUI's own fp8 checkpoints).
    note = fp8_note if layout.naming == "bfl" else ""
    return made(
        "transformer",
        layout.describe(file_name=header.path.name) + note,
        widths=layout.widths,
        variant=layout.variant,
        naming=layout.naming,
    )


def _identify_other(
    header: SafetensorsHeader, keys: set[str], made: _Made, fp8_note: str
) -> Component | str | None:
    """CLIP-L, T5-XXL or the VAE by their keys; None when the keys are none of them."""
    if "lora" in " ".join(list(keys)[:50]).lower():
        return "a LoRA, not a model"
    emb = _shape(header, "text_model.embeddings.token_embedding.weight")
    if len(emb) == 2 and "text_model.encoder.layers.0.mlp.fc1.weight" in keys:
        layers = count_blocks(keys, "text_model.encoder.layers.")
        return made(
            "clip",
            f"CLIP text encoder: {layers} layers, width {emb[1]}, vocabulary {emb[0]}",
            widths={"width": emb[1]},
            naming="hf",
        )
    shared = _shape(header, "shared.weight") or _shape(header, "encoder.embed_tokens.weight")
    if len(shared) == 2 and "encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        layers = count_blocks(keys, "encoder.block.")
        return made(
            "t5",
            f"T5 encoder: {layers} blocks, d_model {shared[1]}{fp8_note}",
            widths={"width": shared[1]},
            naming="hf",
        )
    conv_in = _shape(header, "decoder.conv_in.weight")
    if len(conv_in) == 4 and "encoder.conv_in.weight" in keys:
        naming = "diffusers" if any(k.startswith("decoder.mid_block.") for k in keys) else "ldm"
        quant = "quant_conv.weight" in keys
        return made(
            "vae",
            f"VAE ({naming} naming): {conv_in[1]} latent channels"
            + (", with quant convs (not FLUX.1's)" if quant else ""),
            widths={"latent": conv_in[1]},
            naming=naming,
            problem="has quant convs: an SD VAE, not FLUX.1's" if quant else "",
        )
    return None


# ---------------------------------------------------------------------------
# Searching an install


def _roots(comfy: Path) -> tuple[Path, Path]:
    """(ComfyUI root, its models folder) for a root or a models folder."""
    comfy = comfy.expanduser()
    if not comfy.is_dir():
        raise UsageError(
            "ComfyUI folder not found", comfy, "give the ComfyUI folder or its models/ folder"
        )
    if (comfy / "models").is_dir():
        return comfy, comfy / "models"
    if any((comfy / name).is_dir() for names in _FOLDERS.values() for name in names):
        return comfy.parent, comfy
    raise UsageError(
        "not a ComfyUI folder (no models/, diffusion_models/, unet/, clip/, text_encoders/ or vae/)",
        comfy,
        "give the ComfyUI folder or its models/ folder",
    )


def _folders(root: Path, models: Path) -> dict[str, tuple[Path, ...]]:
    extra: dict[str, list[Path]] = {}
    for candidate in (root / "extra_model_paths.yaml", models / "extra_model_paths.yaml"):
        if candidate.is_file():
            for name, paths in parse_extra_model_paths(candidate).items():
                extra.setdefault(name, []).extend(paths)
            break
    out: dict[str, tuple[Path, ...]] = {}
    for kind, names in _FOLDERS.items():
        seen: list[Path] = []
        for name in names:
            for folder in [models / name, *extra.get(name, [])]:
                if folder.is_dir() and folder not in seen:
                    seen.append(folder)
        out[kind] = tuple(seen)
    return out


def _files(folder: Path) -> Iterator[Path]:
    found = 0
    stack = [(folder, 0)]
    while stack:
        here, depth = stack.pop()
        try:
            entries = sorted(here.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir() and depth < _MAX_DEPTH and not entry.is_symlink():
                stack.append((entry, depth + 1))
            elif entry.suffix.lower() in _SUFFIXES and entry.is_file():
                found += 1
                if found > _MAX_FILES:
                    return
                yield entry


def _fits(c: Component, transformer: Component | None) -> str:
    """Why ``c`` does not fit ``transformer`` ('' when it does)."""
    if c.problem:
        return c.problem
    if transformer is None:
        return ""
    want = {"clip": "pooled", "t5": "txt", "vae": "latent"}.get(c.kind)
    have = c.widths.get("latent" if c.kind == "vae" else "width")
    if want is None or have == transformer.widths.get(want):
        return ""
    return f"width {have} does not fit the transformer's {want} input {transformer.widths[want]}"


def _rank(c: Component) -> tuple[int, int, str]:
    # dev before schnell (what the tool is made for), then 16-bit before fp8 and
    # GGUF (quality, where the card allows; --transformer picks the smaller one),
    # then by path for a stable choice.
    return (c.variant == "schnell", c.dtype in _FP8 or c.dtype == "GGUF", str(c.path))


def _tokenizers(root: Path | None, folder: Path | None) -> tuple[Tokenizers | None, str]:
    # ComfyUI keeps both tokenizers in its source tree; a diffusers folder in tokenizer(_2)/.
    places: list[tuple[Path, Path]] = []
    if root is not None:
        comfy_src = root / "comfy"
        places.append((comfy_src / "sd1_tokenizer", comfy_src / "text_encoders" / "t5_tokenizer"))
    if folder is not None:
        places.append((folder / "tokenizer", folder / "tokenizer_2"))
    for clip_dir, t5_dir in places:
        vocab, merges = clip_dir / "vocab.json", clip_dir / "merges.txt"
        t5 = next(
            (p for p in (t5_dir / "tokenizer.json", t5_dir / "spiece.model") if p.is_file()), None
        )
        if vocab.is_file() and merges.is_file() and t5 is not None:
            return Tokenizers(vocab, merges, t5), ""
    if not places:
        return None, "no ComfyUI install or diffusers folder to take the tokenizers from"
    clip_dir, t5_dir = places[0]
    for need in (clip_dir / "vocab.json", clip_dir / "merges.txt"):
        if not need.is_file():
            return None, f"missing the CLIP tokenizer file {need}"
    return None, f"missing the T5 tokenizer file {t5_dir / 'tokenizer.json'}"


def _survey(
    folders: Mapping[str, tuple[Path, ...]], skip: set[str]
) -> tuple[list[Component], list[tuple[Path, str]]]:
    """Every file in the parts' folders identified once: the parts, and the rest with why."""
    considered: list[Component] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for kind in COMPONENTS:
        if kind in skip:
            continue
        for folder in folders[kind]:
            for path in _files(folder):
                if path.resolve() in seen:
                    continue
                seen.add(path.resolve())
                found = identify(path)
                if isinstance(found, str):
                    skipped.append((path, found))
                else:
                    considered.append(found)
    return considered, skipped


def _given(kind: str, path: Path, transformer: Component | None) -> Component:
    """The file an option names for ``kind``, identified and checked like a found one."""
    found = identify(path) if path.is_file() else "file not found"
    if isinstance(found, str) or found.kind != kind:
        what = found if isinstance(found, str) else f"it is a {found.kind} file"
        raise UsageError(
            f"{OPTIONS[kind]} is not a {kind} file ({what})", path, f"give {_WANTED[kind]}"
        )
    problem = found.problem or _fits(found, transformer)
    if problem:
        raise UsageError(
            f"{OPTIONS[kind]} cannot be used ({problem})", path, f"give {_WANTED[kind]}"
        )
    return replace(found, reason=f"given by {OPTIONS[kind]}; {found.reason}")


def _none_found(
    kind: str,
    comfy: Path | None,
    searched: tuple[Path, ...],
    considered: list[Component],
    skipped: list[tuple[Path, str]],
    chosen: Mapping[str, Component],
) -> UsageError:
    """Why no ``kind`` file is there: nothing to search, or the files searched and why not them."""
    if comfy is None:
        return UsageError(
            f"no {kind} file given and no ComfyUI folder to search",
            OPTIONS[kind],
            f"pass --comfy ~/ComfyUI (its files are found by their contents) or {OPTIONS[kind]} FILE",
        )
    why_not = [
        f"{p.name}: {why}" for p, why in skipped if any(p.is_relative_to(f) for f in searched)
    ]
    # Every considered file of this kind failed _fits (none fitted): its reason says why.
    why_not += [
        f"{c.path.name}: {_fits(c, chosen.get('transformer'))}"
        for c in considered
        if c.kind == kind
    ]
    shown = "; ".join(why_not[:3]) + (f"; and {len(why_not) - 3} more" if len(why_not) > 3 else "")
    where = ", ".join(str(f) for f in searched)
    if not searched:
        what = f"no {kind} folder in this ComfyUI install"
    elif shown:
        what = f"no usable {kind} file found (searched {where}; not used: {shown})"
    else:
        what = f"no usable {kind} file found (searched {where}: no model files there)"
    return UsageError(what, comfy, f"put {_WANTED[kind]} or pass {OPTIONS[kind]} FILE")


def find_models(
    comfy: Path | None,
    overrides: Mapping[str, Path | None] | None = None,
    tokenizer_folder: Path | None = None,
) -> ComfyModels:
    """Identify the pipeline's files under ``comfy`` (a ComfyUI root or models folder).

    ``overrides`` maps a part of :data:`COMPONENTS` to a file that replaces the
    search for it (it is still identified, and refused when it is another
    part). ``tokenizer_folder`` is a diffusers folder whose ``tokenizer/`` and
    ``tokenizer_2/`` are used when the ComfyUI install has none. A part that is
    neither found nor given raises one :class:`UsageError` naming the file to
    provide and its option.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    root = models = None
    folders: dict[str, tuple[Path, ...]] = {k: () for k in COMPONENTS}
    if comfy is not None:
        root, models = _roots(comfy)
        folders = _folders(root, models)

    considered, skipped = _survey(folders, skip=set(given))
    chosen: dict[str, Component] = {}
    for kind in COMPONENTS:
        if kind in given:
            chosen[kind] = _given(kind, Path(given[kind]).expanduser(), chosen.get("transformer"))
            continue
        fitting = sorted(
            (c for c in considered if c.kind == kind and not _fits(c, chosen.get("transformer"))),
            key=_rank,
        )
        if not fitting:
            raise _none_found(kind, comfy, folders[kind], considered, skipped, chosen)
        best = fitting[0]
        why = best.reason
        if kind != "transformer" and "transformer" in chosen:
            why += "; its width fits the transformer"
        if len(fitting) > 1:
            why += f"; preferred over {len(fitting) - 1} other fitting file(s)"
        chosen[kind] = replace(best, reason=why)

    tokenizers, problem = _tokenizers(root, tokenizer_folder)
    picked = {c.path for c in chosen.values()}
    others = tuple(
        (c, _fits(c, chosen["transformer"]) or f"another {c.kind} file was preferred")
        for c in considered
        if c.path not in picked
    )
    return ComfyModels(
        chosen=chosen,
        others=others,
        skipped=tuple(skipped),
        folders=folders,
        tokenizers=tokenizers,
        tokenizer_problem=problem,
    )


# ---------------------------------------------------------------------------
# doctor

_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Diagnosis:
    """What ``doctor`` reports: the files, their sizes at the compute dtype, the plan, estimates."""

    models: ComfyModels
    compute_dtype: str
    compute_bytes: Mapping[str, int]
    gpu: tuple[int, int] | None  # (free, total) bytes
    plan: PlanChoice
    seconds_per_image: float | None  # None on a CPU: no anchor there
    steps: int
    size: int


def _loaded_bytes(kind: str, component: Component, item: int) -> int:
    """Bytes of a component once loaded: fp8 transformers keep their fp8 weights.

    Everything else is upcast to the compute dtype (``item`` bytes a value); an
    fp8 transformer keeps one byte per weight (render/storage.py), its few
    biases and norms (under 1% of the values) counted as fp8 too.
    """
    if kind == "transformer" and (component.dtype.startswith("F8") or component.dtype == "GGUF"):
        return component.numel  # GGUF: numel is the file's bytes, kept quantised
    return component.numel * item


def diagnose(
    comfy: Path | None,
    overrides: Mapping[str, Path | None],
    *,
    tokenizer_folder: Path | None = None,
    dtype: str | None = None,
    gpu: tuple[int, int] | None = None,
    steps: int = DEFAULT_STEPS,
    size: int = DEFAULT_SIZE,
) -> Diagnosis:
    """Find the files and say what ``--memory auto`` would do with them on ``gpu`` (free, total)."""
    models = find_models(comfy, overrides, tokenizer_folder)
    compute = dtype or ("bf16" if gpu is not None else "fp32")
    item = _ITEMSIZE[compute]
    sizes = {k: _loaded_bytes(k, c, item) for k, c in models.chosen.items()}
    plan = choose_plan(None if gpu is None else gpu[0], sizes)
    seconds = None
    if gpu is not None:
        seconds = estimate_seconds_per_image(
            plan.plan, models.chosen["transformer"].numel, steps, size, size
        )
    return Diagnosis(models, compute, sizes, gpu, plan, seconds, steps, size)
