"""Tests of the analyze report page: its HTML as parsed by Python, and its behaviour
in a real headless Chromium (sorting, heatmap toggle, opacity, gallery selectors).

The analysis is fake but complete: small generated PNGs for 8 blocks x 2 modes x
2 prompts x 2 seeds, a prompt and a LoRA name carrying markup, and one render whose
file name needs URL quoting (space, '#', '&', '%').
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
from browser import Browser
from PIL import Image

from lora_prune.blocks import block_order
from lora_prune.errors import OutputError
from lora_prune.report import write_report

BLOCKS = ["clip", "input", "double.0", "double.7", "double.18", "single.3", "single.20", "final"]
MODES = ["solo", "loo"]
EVIL_PROMPT = "a cat <script>alert('x')</script> & \"friends\""
PROMPTS = [EVIL_PROMPT, "a dog"]
SEEDS = [0, 1]
LORA = "loras/my<img src=x onerror=alert(1)>'s.safetensors"
ODD_NAME = "images/odd #1 & 50%.png"
COMMAND = (
    "lora-prune slim 'my<img src=x onerror=alert(1)>'\\''s.safetensors' --keep double.7,single.20"
)
SIZE = 48


# ---------------------------------------------------------------------------
# Fake analysis


def _png(path: Path, rgb: tuple[int, int, int], stripe: tuple[int, int, int]) -> None:
    pixels = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[:] = rgb
    pixels[SIZE // 3 : 2 * SIZE // 3, :] = stripe
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)


def make_analysis(
    out: Path,
    blocks: list[str] = BLOCKS,
    modes: list[str] = MODES,
    prompts: list[str] = PROMPTS,
    seeds: list[int] = SEEDS,
) -> dict[str, Any]:
    """Write the PNGs of a fake sweep into ``out`` and return its ranking.json content."""
    rng = np.random.default_rng(1234)
    rows: list[dict[str, Any]] = []
    for mode in modes:
        # Distinct values, so every sort has one right answer.
        mses = rng.permutation(np.arange(1, len(blocks) + 1)) * 37.5 + rng.uniform(
            0, 1, len(blocks)
        )
        ranks = {
            b: i + 1 for i, b in enumerate(sorted(blocks, key=lambda b: -mses[blocks.index(b)]))
        }
        for i, block in enumerate(blocks):
            rows.append(
                {
                    "block": block,
                    "mode": mode,
                    "mse": float(mses[i]),
                    "mse_std": float(mses[i] / 10),
                    "ssim": float(1.0 - mses[i] / 1000.0),
                    "ssim_std": 0.01,
                    "rank": ranks[block],
                    "params": int(1000 * (i + 3) ** 2 + 7 * i),
                    "bytes": int(4000 * (i + 3) ** 2 + 28 * i),
                    "norm": float(rng.uniform(0.5, 5.0)),
                    "norm_rank": 1 + (i * 3) % len(blocks),
                }
            )
    references = []
    images = []
    counter = 0
    for p, _prompt in enumerate(prompts):
        for seed in seeds:
            base = f"images/ref-base-p{p}-s{seed}.png"
            full = f"images/ref-full-p{p}-s{seed}.png"
            _png(out / base, (200, 200, 200), (90, 90, 90))
            _png(out / full, (230, 190, 120), (120, 60, 30))
            references.append({"prompt": p, "seed": seed, "base": base, "full": full})
            for mode in modes:
                for b, block in enumerate(blocks):
                    counter += 1
                    image = f"images/{counter:04x}.png"
                    if (block, mode, p, seed) == ("double.7", modes[0], 0, seeds[0]):
                        image = ODD_NAME
                    heatmap = f"heatmaps/{counter:04x}.png"
                    shade = 30 * b % 256
                    _png(out / image, (shade, 120, 255 - shade), (255, 255, 255))
                    _png(out / heatmap, (0, 0, 160), (220, 30, 0))
                    row = next(r for r in rows if r["block"] == block and r["mode"] == mode)
                    images.append(
                        {
                            "block": block,
                            "mode": mode,
                            "prompt": p,
                            "seed": seed,
                            "image": image,
                            "heatmap": heatmap,
                            "mse": row["mse"] + p + seed,
                            "ssim": row["ssim"],
                        }
                    )
    _png(out / "contact_sheet.png", (250, 250, 250), (10, 10, 10))
    Image.new("RGB", (700, 300), (255, 255, 255)).save(out / "influence.png")
    keep = [b for b in ("double.7", "single.20") if b in blocks]
    return {
        "tool": {"name": "lora-prune", "version": "0.1.0"},
        "settings": {
            "lora": LORA,
            "lora_sha256": "ab" * 32,
            "model": "tiny",
            "prompts": prompts,
            "seeds": seeds,
            "width": SIZE,
            "height": SIZE,
            "steps": 4,
            "guidance": 3.5,
            "strength": 1.0,
            "modes": modes,
            "heatmap_scale": "global",
            # As analyze writes it: one global scale per mode.
            "heatmap_vmax": {mode: 812.5 / (1 + i) for i, mode in enumerate(modes)},
        },
        "rows": rows,
        "spearman": {"solo": 0.93, "loo": None},
        "suggestion": {
            "mode": modes[-1],
            "coverage_target": 0.9,
            "coverage": 0.93,
            "blocks": keep,
            "spec": ",".join(keep),
            "bytes": 98760,
            "bytes_before": 3000000,
            "command": COMMAND,
        },
        "references": references,
        "images": images,
        "contact_sheet": "contact_sheet.png",
        "influence": "influence.png",
    }


# ---------------------------------------------------------------------------
# A tiny DOM from html.parser


_VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "wbr",
}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Node | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        def matches(n: Node) -> bool:
            return all(
                (n.attrs.get(k.rstrip("_")) == v)
                if k != "cls"
                else v in n.attrs.get("class", "").split()
                for k, v in attrs.items()
            )

        return [n for n in self.iter() if (tag == "*" or n.tag == tag) and matches(n)]

    def find(self, tag: str, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v if v is not None else "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in _VOID:
            self.current = node

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None and node.parent is not None, f"stray </{tag}>"
        self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def parse(text: str) -> Node:
    builder = _Builder()
    builder.feed(text)
    builder.close()
    assert builder.current is builder.root, f"unclosed <{builder.current.tag}>"
    return builder.root


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("analysis")
    analysis = make_analysis(out)
    (out / "ranking.json").write_text(json.dumps(analysis), encoding="utf-8")
    path = write_report(out, json.loads((out / "ranking.json").read_text(encoding="utf-8")))
    return path, analysis


@pytest.fixture(scope="module")
def dom(report: tuple[Path, dict[str, Any]]) -> Node:
    return parse(report[0].read_text(encoding="utf-8"))


def _rows(analysis: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [r for r in analysis["rows"] if r["mode"] == mode]


# ---------------------------------------------------------------------------
# The HTML, parsed in Python


def test_write_report_is_atomic_and_returns_the_path(tmp_path: Path) -> None:
    analysis = make_analysis(tmp_path, blocks=["double.0", "final"], prompts=["x"], seeds=[0])
    (tmp_path / "report.html").write_text("old", encoding="utf-8")
    path = write_report(tmp_path, analysis)
    assert path == tmp_path / "report.html"
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_unwritable_folder_raises_output_error(tmp_path: Path) -> None:
    analysis = make_analysis(tmp_path, blocks=["double.0"], prompts=["x"], seeds=[0])
    missing = tmp_path / "nope"
    with pytest.raises(OutputError) as info:
        write_report(missing, analysis)
    assert info.value.exit_code == 6
    assert str(missing / "report.html") in str(info.value)
    assert "\n" not in str(info.value)


def test_ranking_tables_have_one_row_per_block_in_rank_order(
    dom: Node, report: tuple[Path, dict[str, Any]]
) -> None:
    analysis = report[1]
    for mode in MODES:
        table = dom.find("table", id=f"ranking-{mode}")
        rows = table.find("tbody").find_all("tr")
        assert len(rows) == len(BLOCKS)
        by_rank = sorted(_rows(analysis, mode), key=lambda r: r["rank"])
        assert [r.attrs["data-block"] for r in rows] == [r["block"] for r in by_rank]
        keys = [th.attrs["data-key"] for th in table.find_all("th")]
        assert keys == ["block", "rank", "mse", "ssim", "params", "bytes", "norm"]
        # The block column sorts by model order, not by name.
        assert [int(r.find_all("td")[0].attrs["data-value"]) for r in rows] == [
            block_order(r["block"]) for r in by_rank
        ]
        first = by_rank[0]
        cells = [td.text().strip() for td in rows[0].find_all("td")]
        assert cells[2] == f"{first['mse']:.1f} \u00b1 {first['mse_std']:.1f}"
        assert cells[3] == f"{first['ssim']:.4f} \u00b1 0.0100"
        assert cells[4] == f"{first['params']:,}"
    assert len(dom.find_all("table", cls="ranking")) == 2


def test_every_referenced_file_exists(dom: Node, report: tuple[Path, dict[str, Any]]) -> None:
    path, analysis = report
    urls = [n.attrs["src"] for n in dom.find_all("img")]
    urls += [n.attrs["href"] for n in dom.find_all("a") if not n.attrs["href"].startswith("#")]
    assert urls
    for url in urls:
        assert "://" not in url and not url.startswith("/"), url
        assert (path.parent / unquote(url)).is_file(), url
    referenced = {unquote(u) for u in urls}
    wanted = {i["image"] for i in analysis["images"]} | {i["heatmap"] for i in analysis["images"]}
    wanted |= {r[k] for r in analysis["references"] for k in ("base", "full")}
    wanted |= {"influence.png", "contact_sheet.png"}
    assert wanted <= referenced
    # The odd file name is quoted, so '#' cannot end the URL early.
    assert "images/odd%20%231%20%26%2050%25.png" in urls
    assert len(dom.find_all("img", cls="heatmap")) == len(analysis["images"])


def test_user_strings_are_escaped(dom: Node, report: tuple[Path, dict[str, Any]]) -> None:
    raw = report[0].read_text(encoding="utf-8")
    assert "<script>alert" not in raw
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in raw
    assert "<img src=x" not in raw
    # Only the page's own script, and the prompt reads back verbatim as text.
    assert len(dom.find_all("script")) == 1
    assert (
        dom.find("title").text()
        == "lora-prune report: my<img src=x onerror=alert(1)>'s.safetensors"
    )
    assert EVIL_PROMPT in dom.find("table", id="settings").text()
    assert dom.find("code", id="slim-command").text() == COMMAND


def test_settings_and_suggestion(dom: Node) -> None:
    settings = {
        th.text(): th.parent.find("td").text()
        for th in dom.find("table", id="settings").find_all("th")
        if th.parent is not None
    }
    assert settings["model"] == "tiny"
    assert settings["seeds"] == "0, 1"
    assert settings["size"] == "48 \u00d7 48 px"
    assert settings["steps"] == "4"
    assert settings["guidance"] == "3.5"
    assert settings["strength"] == "1"
    assert settings["heatmap scale"].startswith(
        "global per mode: solo 0 \u2013 812.5, loo 0 \u2013 406.2 (squared 8-bit levels"
    )
    assert settings["heatmap scale"].endswith("colour map jet")
    assert settings["modes"].startswith("solo (")
    suggestion = dom.find("section", id="suggestion").text()
    assert "93.0%" in suggestion and "target 90.0%" in suggestion
    assert dom.find("span", id="size-change").text().startswith("3.0 MB \u2192 98.8 KB")
    assert "2 of 8" in suggestion
    assert dom.find("code", id="keep-spec").text() == "double.7,single.20"
    kept = {
        tr.attrs["data-block"]
        for tr in dom.find("table", id="ranking-solo").find_all("tr", cls="kept")
    }
    assert kept == {"double.7", "single.20"}
    spearman = [p.text() for p in dom.find_all("p", cls="spearman")]
    assert "0.93" in spearman[0] and "n/a" in spearman[1]


def test_gallery_groups(dom: Node) -> None:
    groups = dom.find_all("div", cls="gallery-group")
    assert len(groups) == len(MODES) * len(PROMPTS) * len(SEEDS)
    visible = [g for g in groups if "hidden" not in g.attrs]
    assert [(g.attrs["data-mode"], g.attrs["data-ref"]) for g in visible] == [("solo", "p0-s0")]
    tiles = visible[0].find_all("figure", cls="tile")
    blocks = [t.attrs.get("data-block") for t in tiles if "data-block" in t.attrs]
    assert blocks == sorted(BLOCKS, key=block_order)
    assert len(dom.find("select", id="gallery-ref").find_all("option")) == 4
    assert [
        o.attrs["value"] for o in dom.find("select", id="gallery-mode").find_all("option")
    ] == MODES


def test_one_mode_one_image_has_no_selectors(tmp_path: Path) -> None:
    analysis = make_analysis(tmp_path, modes=["solo"], prompts=["only"], seeds=[7])
    analysis["settings"]["heatmap_scale"] = "per-image"
    analysis["settings"]["heatmap_vmax"] = 0.0
    dom = parse(write_report(tmp_path, analysis).read_text(encoding="utf-8"))
    assert "each map scaled to its own maximum" in dom.find("table", id="settings").text()
    assert dom.find("span", cls="legend").text() == "0max of each map"
    analysis["suggestion"]["command"] = None
    dom = parse(write_report(tmp_path, analysis).read_text(encoding="utf-8"))
    assert dom.find_all("code", id="slim-command") == []
    assert dom.find("p", id="no-command").text().startswith("No slim command")
    analysis["suggestion"] = None
    dom = parse(write_report(tmp_path, analysis).read_text(encoding="utf-8"))
    assert len(dom.find("table", id="ranking-solo").find("tbody").find_all("tr")) == len(BLOCKS)
    assert dom.find_all("table", id="ranking-loo") == []
    assert dom.find_all("select") == []
    assert dom.find("input", id="heatmap-toggle").attrs["type"] == "checkbox"
    assert "No suggestion" in dom.find("section", id="suggestion").text()


# ---------------------------------------------------------------------------
# The page in a real headless Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser(width=1280, height=900) as b:
        yield b


@pytest.fixture
def page(browser: Browser, report: tuple[Path, dict[str, Any]]) -> Browser:
    browser.open(report[0])
    return browser


def _order(page: Browser, mode: str) -> list[str]:
    value = page.evaluate(
        f"Array.from(document.querySelectorAll('#ranking-{mode} tbody tr')).map(r => r.dataset.block)"
    )
    assert isinstance(value, list)
    return [str(v) for v in value]


def _sort_state(page: Browser, mode: str, key: str) -> tuple[str | None, str]:
    value = page.evaluate(
        f"(() => {{ const th = document.querySelector('#ranking-{mode} th[data-key={key}]');"
        " return [th.getAttribute('aria-sort'), getComputedStyle(th, '::after').content]; })()"
    )
    return value[0], value[1]


def test_browser_loads_every_visible_image(page: Browser) -> None:
    # The contact sheet sits lazily in a closed <details>; everything else shown must load.
    shown = "document.querySelectorAll('.gallery-group:not([hidden]) img, #references img, #influence-chart')"
    page.wait_for(f"Array.from({shown}).every(i => i.complete)")
    broken = page.evaluate(
        f"Array.from({shown}).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'))"
    )
    assert broken == []
    count = page.evaluate(
        "document.querySelectorAll('.gallery-group:not([hidden]) img.heatmap').length"
    )
    assert count == len(BLOCKS)
    odd = page.evaluate("document.querySelector('img[src^=\"images/odd\"]').naturalWidth")
    assert odd == SIZE
    # No markup from a prompt or file name ran as script.
    assert page.dialogs == []
    assert page.evaluate("document.querySelectorAll('script').length") == 1


def test_browser_sorts_by_clicking_headers(
    page: Browser, report: tuple[Path, dict[str, Any]]
) -> None:
    rows = _rows(report[1], "solo")
    by_mse = [r["block"] for r in sorted(rows, key=lambda r: r["mse"])]
    assert _sort_state(page, "solo", "rank")[0] == "ascending"

    page.click("#ranking-solo th[data-key=mse]")
    assert _order(page, "solo") == by_mse[::-1]  # biggest change first
    state, indicator = _sort_state(page, "solo", "mse")
    assert state == "descending" and "\u25bc" in indicator
    assert _sort_state(page, "solo", "rank")[0] is None

    page.click("#ranking-solo th[data-key=mse]")
    assert _order(page, "solo") == by_mse
    state, indicator = _sort_state(page, "solo", "mse")
    assert state == "ascending" and "\u25b2" in indicator

    page.click("#ranking-solo th[data-key=block]")
    assert _order(page, "solo") == sorted(BLOCKS, key=block_order)
    assert _order(page, "solo")[:2] == ["clip", "input"]  # model order, not alphabetical
    page.click("#ranking-solo th[data-key=block]")
    assert _order(page, "solo") == sorted(BLOCKS, key=block_order)[::-1]

    # Numbers sort as numbers: 100,007 params must not land before 16,000.
    page.click("#ranking-solo th[data-key=params]")
    assert _order(page, "solo") == [r["block"] for r in sorted(rows, key=lambda r: -r["params"])]
    # The other mode's table is left alone.
    loo = sorted(_rows(report[1], "loo"), key=lambda r: r["rank"])
    assert _order(page, "loo") == [r["block"] for r in loo]


def test_browser_heatmap_toggle_and_opacity(page: Browser) -> None:
    first = "document.querySelector('.gallery-group:not([hidden]) img.heatmap')"
    displays = (
        "Array.from(document.querySelectorAll('.gallery-group:not([hidden]) img.heatmap'))"
        ".map(i => getComputedStyle(i).display)"
    )
    assert set(page.evaluate(displays)) == {"block"}
    assert page.evaluate(f"getComputedStyle({first}).opacity") == "0.6"

    page.click("#heatmap-toggle")
    assert page.evaluate("document.getElementById('heatmap-toggle').checked") is False
    assert set(page.evaluate(displays)) == {"none"}
    assert page.evaluate("document.querySelectorAll('img.heatmap').length") > 0
    page.click("#heatmap-toggle")
    assert set(page.evaluate(displays)) == {"block"}

    page.evaluate(
        "(() => { const s = document.getElementById('heatmap-opacity'); s.value = '0.25';"
        " s.dispatchEvent(new Event('input', {bubbles: true})); })()"
    )
    assert page.evaluate(f"getComputedStyle({first}).opacity") == "0.25"
    assert page.evaluate("document.getElementById('heatmap-opacity-value').textContent") == "0.25"
    # The render under the heatmap keeps full opacity.
    assert (
        page.evaluate(
            "getComputedStyle(document.querySelector('.gallery-group:not([hidden]) img.render')).opacity"
        )
        == "1"
    )


def test_browser_gallery_selectors(page: Browser) -> None:
    def visible() -> list[list[str]]:
        value = page.evaluate(
            "Array.from(document.querySelectorAll('.gallery-group'))"
            ".filter(g => getComputedStyle(g).display !== 'none').map(g => [g.dataset.mode, g.dataset.ref])"
        )
        assert isinstance(value, list)
        return value

    assert visible() == [["solo", "p0-s0"]]
    page.evaluate(
        "(() => { const s = document.getElementById('gallery-ref'); s.value = 'p1-s1';"
        " s.dispatchEvent(new Event('change', {bubbles: true})); })()"
    )
    assert visible() == [["solo", "p1-s1"]]
    page.evaluate(
        "(() => { const s = document.getElementById('gallery-mode'); s.value = 'loo';"
        " s.dispatchEvent(new Event('change', {bubbles: true})); })()"
    )
    assert visible() == [["loo", "p1-s1"]]
    # Lazily loaded images of the newly shown group arrive once it is on screen.
    page.evaluate("document.querySelector('.gallery-group:not([hidden])').scrollIntoView()")
    page.wait_for(
        "Array.from(document.querySelectorAll('.gallery-group:not([hidden]) img'))"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    caption = page.evaluate(
        "document.querySelector('.gallery-group:not([hidden]) .group-caption').textContent"
    )
    # Counted from 0, as p1-s1 in the file names and the CLI.
    assert "prompt 1" in caption and "a dog" in caption
    # The colour scale shown is the one of the mode on screen.
    assert caption.endswith("0406.2")


def test_browser_screenshot(page: Browser, tmp_path: Path) -> None:
    page.wait_for(
        "Array.from(document.querySelectorAll('.gallery-group:not([hidden]) img')).every(i => i.complete)"
    )
    shot = page.screenshot(tmp_path / "report.png")
    with Image.open(shot) as image:
        assert image.width == 1280
        assert image.height > 1500  # the whole page, not just the first screen
        colours = image.convert("RGB").resize((64, 64)).getcolors(64 * 64)
    assert colours is not None and len(colours) > 20
    # PNG signature and IHDR agree with what Pillow read.
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">I", head[16:20])[0] == 1280
