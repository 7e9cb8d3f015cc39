"""The family seam: a model's facts live in its family module and nowhere else.

Outside ``lora_prune/families/`` (and ``lora_prune/render/families/``, the
torch side of the same modules) no module may name a FLUX.1 layer or width:
everything else asks the family (``lora.family``).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_prune"

#: FLUX.1's layer names (BFL and diffusers naming) and widths (hidden 3072, its MLP and
#: fused projections); 4096 and 768 are left out, as too common a number elsewhere.
FLUX1_FACTS = re.compile(
    r"double_blocks|single_blocks|img_attn|txt_attn|img_mlp|txt_mlp|img_mod|txt_mod"
    r"|single_transformer_blocks|transformer_blocks|guidance_in|time_in\b|vector_in|img_in\b"
    r"|txt_in\b|final_layer\b|x_embedder|context_embedder|time_text_embed|norm1_context"
    r"|norm_out|proj_out|linear1\b|linear2\b|\b(?:3072|9216|12288|15360|21504)\b"
)


def in_a_family(path: Path) -> bool:
    return "families" in path.relative_to(PACKAGE).parts


def test_no_module_outside_the_families_names_a_flux1_layer_or_width() -> None:
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if in_a_family(path):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FLUX1_FACTS.search(line):
                found.setdefault(str(path.relative_to(ROOT)), []).append(
                    f"{number}: {line.strip()}"
                )
    assert not found, "\n".join(f"{p}:\n  " + "\n  ".join(lines) for p, lines in found.items())


def test_the_pattern_finds_what_it_is_for() -> None:
    for text in ("double_blocks.0.img_attn.qkv", "transformer.single_transformer_blocks.3", "3072"):
        assert FLUX1_FACTS.search(text), text
    for text in ("ANCHOR_PIXELS = 768 * 768", "_SNIFF_BYTES = 4096", "block.30", "linear10"):
        assert not FLUX1_FACTS.search(text), text
