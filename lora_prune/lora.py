"""A parsed FLUX.1 LoRA file: its modules, grouped by stem and attributed to blocks.

:func:`read_lora` is the entry point every command uses: it validates the
safetensors file (:mod:`lora_prune.safetensors_io`), resolves every key with the
block map (:mod:`lora_prune.keys`), groups the tensors of one module stem,
reads the tiny alpha scalars and the PEFT adapter metadata, and refuses files
that are not FLUX.1 LoRAs with an error naming what they are.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .blocks import DOUBLE_BLOCKS, OTHER, SINGLE_BLOCKS, sort_blocks
from .errors import (
    BlockIndexError,
    CorruptFileError,
    UnknownKeysError,
    WrongBaseModelError,
)
from .keys import (
    FULL_ROLES,
    LOHA_ROLES,
    LOKR_ROLES,
    UNSUPPORTED_ROLES,
    BlockRangeError,
    ParsedKey,
    Target,
    guess_base_model,
    other_key,
    parse_key,
)
from .safetensors_io import SafetensorsHeader, SafetensorsReader, TensorInfo, read_header

#: key grammar -> the generic grammar its modules' bare ".alpha" keys read as
_REFINED_GRAMMARS = {"lycoris-kohya": "kohya", "diffusers-kohya-suffix": "diffusers"}
#: How many unknown keys an error message lists.
_SHOW_KEYS = 5


@dataclass
class LoraModule:
    """All tensors of one module stem: one adapter on one model layer."""

    stem: str
    block: str
    grammar: str
    target: Target | None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    #: alpha from the ``.alpha`` tensor or the PEFT metadata; None = no alpha (scale 1)
    alpha: float | None = None

    @property
    def adapter(self) -> str:
        """``lora``, ``loha``, ``lokr``, ``full`` (diff/norm deltas), ``unsupported`` or ``empty``."""
        roles = set(self.tensors)
        if roles & UNSUPPORTED_ROLES:
            return "unsupported"
        if roles & LOHA_ROLES:
            return "loha"
        if roles & LOKR_ROLES:
            return "lokr"
        if roles & {"down", "up"}:
            return "lora"
        if roles & FULL_ROLES:
            return "full"
        if "up_bias" in roles:
            return "lora"
        return "empty"

    @property
    def rank(self) -> int | None:
        """The rank that alpha divides: lora down rows, LoHa w1b rows, LoKr factor rank."""
        t = self.tensors
        if "down" in t and t["down"].shape:
            return t["down"].shape[0]
        if "hada_w1_b" in t:
            return t["hada_w1_b"].shape[0]
        for role in ("lokr_w2_b", "lokr_w1_b"):
            if role in t:
                return t[role].shape[0]
        return None

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 where there is no alpha (ComfyUI's and kohya's rule).

        LoKr scales by alpha/rank only when one of its factors is low rank.
        """
        rank = self.rank
        if self.alpha is None or not rank:
            return 1.0
        if self.adapter == "lokr" and not ({"lokr_w1_b", "lokr_w2_b"} & set(self.tensors)):
            return 1.0
        return self.alpha / rank

    @property
    def keys(self) -> list[str]:
        return [t.name for t in self.tensors.values()]

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass
class LoraFile:
    """A FLUX.1 LoRA file, read and attributed. Tensor data stays on disk."""

    path: Path
    header: SafetensorsHeader
    modules: dict[str, LoraModule]
    #: key -> block id, for every tensor of the file
    key_blocks: dict[str, str]
    #: grammar name -> number of keys in it
    grammars: Counter[str]
    peft_config: dict[str, object] | None = None

    @property
    def format(self) -> str:
        """The dominant key grammar (e.g. ``kohya``, ``diffusers``)."""
        return self.grammars.most_common(1)[0][0] if self.grammars else "empty"

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @property
    def blocks(self) -> list[str]:
        """Block ids present, in model order."""
        return sort_blocks(m.block for m in self.modules.values())

    def modules_of(self, block: str) -> list[LoraModule]:
        return [m for m in self.modules.values() if m.block == block]

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.header.tensors.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (the file adds only its header)."""
        return sum(t.nbytes for t in self.header.tensors.values())


def _peft_config(metadata: dict[str, str], path: Path) -> dict[str, object] | None:
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(
            "metadata 'lora_adapter_metadata' is not valid JSON", path, "re-save the LoRA"
        ) from exc
    return config if isinstance(config, dict) else None


def _pattern_matches(pattern: str, name: str) -> bool:
    """PEFT's rule for rank/alpha pattern keys: a regex matching the module name's tail."""
    try:
        return re.search(rf"(^|\.){pattern}$", name) is not None
    except re.error:
        # A key that is no regex (a hand-edited or damaged config): match it literally.
        return name == pattern or name.endswith("." + pattern)


def _peft_alpha(config: dict[str, object], module: LoraModule) -> float | None:
    """alpha for a PEFT module from diffusers' packed adapter config, or None.

    PEFT scales by lora_alpha / r where r is the configured (pattern-specific)
    rank; we express that as an alpha over the module's actual rank.
    """
    model = module.target.model if module.target else "transformer"
    prefix = {"transformer": "transformer.", "clip": "text_encoder.", "t5": "text_encoder_2."}[model]

    def get(name: str) -> object:
        return config.get(prefix + name, config.get(name))

    r, lora_alpha = get("r"), get("lora_alpha")
    name = module.target.name if module.target else module.stem
    for pattern_key, target in (("rank_pattern", "r"), ("alpha_pattern", "alpha")):
        pattern = get(pattern_key)
        if isinstance(pattern, dict):
            for pat, value in pattern.items():
                if isinstance(value, (int, float)) and _pattern_matches(pat, name):
                    if target == "r":
                        r = value
                    else:
                        lora_alpha = value
    if not isinstance(r, (int, float)) or not isinstance(lora_alpha, (int, float)) or r <= 0:
        return None
    rank = module.rank
    if not rank:
        return None
    scale = float(lora_alpha) / (math.sqrt(float(r)) if get("use_rslora") is True else float(r))
    return scale * rank


def _check_other_base_model(unknown: list[str], path: Path) -> None:
    base = guess_base_model(unknown)
    if base is not None:
        raise WrongBaseModelError(
            f"this LoRA is for {base}, not FLUX.1 ({len(unknown)} keys such as {unknown[0]!r})",
            path,
            "use a FLUX.1 LoRA",
            base,
        )


def _range_error(
    errors: list[BlockRangeError], keys: list[str], path: Path, has_single: bool
) -> None:
    max_double = max((e.index for e in errors if e.kind == "double"), default=-1)
    max_single = max((e.index for e in errors if e.kind == "single"), default=-1)
    first = errors[0]
    diffusers_named = all("transformer_blocks" in k for k in keys)
    if max_double >= 20 and not has_single and max_single < 0 and diffusers_named:
        # SD3's joint blocks use the same diffusers names as FLUX's double blocks (24 or 38 of them).
        raise WrongBaseModelError(
            f"double block index {max_double} is beyond FLUX.1's {DOUBLE_BLOCKS} and there are no "
            "single blocks; SD3 has 24-38 joint blocks with these names, so this LoRA is likely for SD3",
            path,
            "use a FLUX.1 LoRA",
            "SD3",
        )
    if max_single >= SINGLE_BLOCKS and max_single < 48 and max_double < DOUBLE_BLOCKS:
        raise WrongBaseModelError(
            f"single block index {max_single} is beyond FLUX.1's {SINGLE_BLOCKS}; "
            "FLUX.2 has 48 single blocks, so this LoRA is likely for FLUX.2",
            path,
            "use a FLUX.1 LoRA",
            "FLUX.2",
        )
    if max_double >= DOUBLE_BLOCKS and max_double < 20 and max_single < 40:
        raise WrongBaseModelError(
            f"double block index {max_double} is beyond FLUX.1's {DOUBLE_BLOCKS}; "
            "HunyuanVideo has 20 double blocks, so this LoRA is likely for HunyuanVideo",
            path,
            "use a FLUX.1 LoRA",
            "HunyuanVideo",
        )
    limit = DOUBLE_BLOCKS if first.kind == "double" else SINGLE_BLOCKS
    raise BlockIndexError(
        f"{first.kind} block index {first.index} is out of range 0..{limit - 1}",
        path,
        "this is not a FLUX.1 LoRA, or its keys are damaged",
    )


def parse_lora_header(
    header: SafetensorsHeader, *, allow_unknown: bool = False
) -> tuple[dict[str, LoraModule], dict[str, str], Counter[str]]:
    """Group the header's keys into modules without reading tensor data."""
    path = header.path
    parsed: list[ParsedKey] = []
    unknown: list[str] = []
    range_errors: list[BlockRangeError] = []
    range_keys: list[str] = []
    for key in header.tensors:
        try:
            pk = parse_key(key)
        except BlockRangeError as exc:
            range_errors.append(exc)
            range_keys.append(key)
            continue
        if pk is None:
            unknown.append(key)
        else:
            parsed.append(pk)
    if range_errors:
        has_single = any(pk.block.startswith("single.") for pk in parsed)
        _range_error(range_errors, range_keys, path, has_single)
    if unknown:
        # Text-encoder keys alone do not make a FLUX.1 LoRA: SD1.5 and SDXL share its CLIP-L.
        if not any(pk.target is not None and pk.target.model == "transformer" for pk in parsed):
            _check_other_base_model(unknown, path)
        if not allow_unknown:
            _check_other_base_model(unknown, path)
            shown = ", ".join(unknown[:_SHOW_KEYS])
            more = f" and {len(unknown) - _SHOW_KEYS} more" if len(unknown) > _SHOW_KEYS else ""
            raise UnknownKeysError(
                f"{len(unknown)} keys match no FLUX.1 LoRA format: {shown}{more}",
                path,
                "pass --allow-unknown to report them as block 'other'",
                unknown,
            )
        parsed.extend(other_key(k) for k in unknown)
    if not parsed:
        raise UnknownKeysError(
            "the file holds no tensors", path, "this is not a LoRA", []
        )

    modules: dict[str, LoraModule] = {}
    key_blocks: dict[str, str] = {}
    grammars: Counter[str] = Counter()
    for pk in parsed:
        module = modules.get(pk.stem)
        if module is None:
            module = modules[pk.stem] = LoraModule(pk.stem, pk.block, pk.grammar, pk.target)
        elif _REFINED_GRAMMARS.get(pk.grammar) == module.grammar:
            # A bare ".alpha" reads as the generic grammar; the module's other keys tell more.
            module.grammar = pk.grammar
        role = pk.role
        if role in module.tensors:
            # e.g. both ".alpha" and ".lora_A.weight.alpha": keep both, distinctly named.
            role = f"{role}#{sum(r.startswith(role) for r in module.tensors)}"
        module.tensors[role] = header.tensors[pk.key]
        key_blocks[pk.key] = pk.block
    for module in modules.values():
        if module.block != OTHER:
            grammars[module.grammar] += len(module.tensors)
    return modules, key_blocks, grammars


def read_lora(path: str | Path, *, allow_unknown: bool = False) -> LoraFile:
    """Read and attribute a FLUX.1 LoRA file.

    Reads the header and the alpha scalars only; tensor data is read on demand
    by the statistics and the writers. Raises errors of :mod:`lora_prune.errors`.
    """
    header = read_header(path)
    modules, key_blocks, grammars = parse_lora_header(header, allow_unknown=allow_unknown)
    peft = _peft_config(header.metadata, header.path)
    with SafetensorsReader(header.path, header) as reader:
        for module in modules.values():
            info = module.tensors.get("alpha")
            if info is not None:
                value = reader.read_array(info.name)
                if value.size != 1:
                    raise CorruptFileError(
                        f"alpha has {value.size} values, expected one", info.name, "re-save the LoRA"
                    )
                module.alpha = float(value.reshape(-1)[0])
            elif peft is not None:
                module.alpha = _peft_alpha(peft, module)
    return LoraFile(header.path, header, modules, key_blocks, grammars, peft)
