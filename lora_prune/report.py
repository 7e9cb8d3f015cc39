"""The self-contained HTML page that ``lora-prune analyze`` writes as ``report.html``.

The page is built from the parsed ``ranking.json`` (see :func:`write_report`) and
links the renders, heatmaps and charts beside it by relative URL instead of
embedding them, so it stays small and opens from disk (``file://``) with no
network: CSS and a little vanilla JavaScript are inline, nothing is fetched.

Prompts, file names and the LoRA path are user input: every string goes through
:func:`html.escape`, every path through URL quoting as well, and no data is put
into the script, so a prompt cannot inject markup or code.

Stable hooks for tests and for people scripting the page: ``table#ranking-<mode>``
with ``th[data-key]`` headers and ``td[data-value]`` sort values,
``input#heatmap-toggle``, ``input#heatmap-opacity``, ``select#gallery-mode``,
``select#gallery-ref``, ``div.gallery-group[data-mode][data-ref]``,
``img.render`` / ``img.heatmap`` and ``code#slim-command``.

Why one module of over 600 lines: it is one page, one small function per
section sharing the same value formatters and escaping; the stylesheet and
script are apart in :mod:`.report_assets`. Split further, the escaping rules
above would be spread over modules that must all keep them.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .blocks import block_kind, block_order
from .charts import CATEGORY_COLORS
from .fileio import atomic_write_bytes
from .pictures import COLORMAPS
from .report_assets import CSS, JS
from .settings import DEFAULT_CMAP, DEFAULT_OPACITY
from .units import human_bytes

REPORT_NAME = "report.html"

#: What each analysis mode compares, for headings and captions: (what is on, reference).
_MODE_INFO: dict[str, tuple[str, str]] = {
    "solo": ("only this block of the LoRA on", "base"),
    "loo": ("every block of the LoRA on except this one", "full"),
}
_REFERENCE_TEXT = {"base": "base (no LoRA)", "full": "full LoRA"}

_MISSING = "\u2013"  # en dash for values that were not measured


# ---------------------------------------------------------------------------
# Small formatting helpers


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _url(path: object) -> str:
    # Quoting first turns '#', '?', ' ' and a 'scheme:' prefix into plain path text,
    # so a file name can neither cut the URL short nor make it javascript:.
    return html.escape(quote(str(path), safe="/"), quote=True)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _fmt_mse(value: object) -> str:
    v = _number(value)
    if v is None:
        return _MISSING
    if v == 0.0:
        return "0"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"


def _fmt_ssim(value: object) -> str:
    v = _number(value)
    return _MISSING if v is None else f"{v:.4f}"


def _fmt_general(value: object) -> str:
    v = _number(value)
    return _MISSING if v is None else f"{v:.4g}"


def _fmt_int(value: object) -> str:
    v = _number(value)
    return _MISSING if v is None else f"{round(v):,}"


def _fmt_bytes(value: object) -> str:
    v = _number(value)
    if v is None:
        return _MISSING
    return human_bytes(v)


def _fmt_percent(value: object) -> str:
    v = _number(value)
    return _MISSING if v is None else f"{100.0 * v:.1f}%"


def _with_std(value: object, std: object, fmt: Callable[[object], str]) -> str:
    text = fmt(value)
    if _number(std) is not None and _number(value) is not None:
        text += f" \u00b1 {fmt(std)}"
    return text


def _mse_with_std(value: object, std: object) -> str:
    v, s = _number(value), _number(std)
    if v is None or s is None or abs(v) < 10:
        return _with_std(value, std, _fmt_mse)
    # One decimal on both sides from 10 up, so "300.2 \u00b1 30.0" lines up in a column.
    return f"{v:.1f} \u00b1 {s:.1f}"


def _data_value(value: object) -> str:
    v = _number(value)
    return "" if v is None else repr(v)


def _slug(text: str) -> str:
    """A string usable inside an id attribute and a CSS selector."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", text) or "-"


def _ref_key(prompt: object, seed: object) -> str:
    return f"p{_slug(str(prompt))}-s{_slug(str(seed))}"


def _rgb(colour: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in colour)


def _kind_colour(block: str) -> str:
    kind = block_kind(block)
    return _rgb(CATEGORY_COLORS.get(kind, CATEGORY_COLORS["other"]))


def _cmap_gradient(cmap: str) -> str:
    table = COLORMAPS.get(cmap, COLORMAPS[DEFAULT_CMAP])
    stops = [f"{_rgb(table[i])} {100 * i / 255:.0f}%" for i in range(0, 256, 32)]
    stops.append(f"{_rgb(table[255])} 100%")
    return "linear-gradient(to right, " + ", ".join(stops) + ")"


def _vmax(settings: Mapping[str, Any], mode: str) -> float | None:
    """The global heatmap maximum of ``mode``: one number, or one per mode."""
    vmax = settings.get("heatmap_vmax")
    if isinstance(vmax, Mapping):
        return _number(vmax.get(mode))
    return _number(vmax)


def _is_global(settings: Mapping[str, Any]) -> bool:
    return str(settings.get("heatmap_scale") or "global") == "global"


def _cmap(settings: Mapping[str, Any]) -> str:
    return str(settings.get("cmap") or settings.get("heatmap_cmap") or DEFAULT_CMAP)


def _legend(settings: Mapping[str, Any], mode: str) -> str:
    vmax = _vmax(settings, mode)
    high = _fmt_mse(vmax) if _is_global(settings) and vmax is not None else "max of each map"
    return (
        "<span class='legend'><span>0</span>"
        f"<span class='gradient' style='background:{_cmap_gradient(_cmap(settings))}'></span>"
        f"<span>{_e(high)}</span></span>"
    )


def _lora_name(settings: Mapping[str, Any]) -> str:
    lora = str(settings.get("lora") or "LoRA")
    # Split on both separators: the path may have been written on Windows.
    return re.split(r"[\\/]", lora.rstrip("\\/"))[-1] or lora


def _prompt_text(prompts: Sequence[Any], index: object) -> str:
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(prompts):
        return str(prompts[index])
    return "?"


def _prompt_label(index: object) -> str:
    # Counted from 0, as the CLI, the PNGs and the image file names count them.
    return f"prompt {index}"


def _modes(settings: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> list[str]:
    modes: list[str] = [str(m) for m in settings.get("modes") or []]
    for row in rows:
        mode = str(row.get("mode"))
        if mode not in modes:
            modes.append(mode)
    return modes


# ---------------------------------------------------------------------------
# Sections


def _settings_section(settings: Mapping[str, Any], analysis: Mapping[str, Any]) -> str:
    prompts = list(settings.get("prompts") or [])
    prompt_items = "".join(
        f"<li><span class='muted'>{i}.</span> {_e(p)}</li>" for i, p in enumerate(prompts)
    )
    seeds = ", ".join(str(s) for s in settings.get("seeds") or [])
    modes = []
    for mode in settings.get("modes") or []:
        info = _MODE_INFO.get(str(mode))
        text = f"<b>{_e(mode)}</b>"
        if info:
            text += (
                f" <span class='muted'>({_e(info[0])}, vs {_e(_REFERENCE_TEXT[info[1]])})</span>"
            )
        modes.append(text)
    scale_text = _e(settings.get("heatmap_scale") or "global")
    if _is_global(settings):
        raw = settings.get("heatmap_vmax")
        if isinstance(raw, Mapping):
            ranges = [
                f"{_e(mode)} 0 \u2013 {_e(_fmt_mse(_vmax(settings, str(mode))))}" for mode in raw
            ]
            scale_text += (
                f" per mode: {', '.join(ranges)} "
                "(squared 8-bit levels, one scale for all maps of a mode)"
            )
        elif _number(raw) is not None:
            scale_text += (
                f", 0 \u2013 {_e(_fmt_mse(raw))} (squared 8-bit levels, one scale for all maps)"
            )
    else:
        scale_text += " (each map scaled to its own maximum: compare colours within a map only)"
    scale_text += f", colour map {_e(_cmap(settings))}"
    width, height = settings.get("width"), settings.get("height")
    size = f"{_e(width)} \u00d7 {_e(height)} px" if width and height else _MISSING
    tool = analysis.get("tool") or {}
    rows = [
        ("LoRA", f"<code>{_e(settings.get('lora', _MISSING))}</code>"),
        ("SHA-256", f"<code class='hash'>{_e(settings.get('lora_sha256') or _MISSING)}</code>"),
        ("model", _e(settings.get("model", _MISSING))),
        ("prompts", f"<ol class='prompts'>{prompt_items}</ol>" if prompts else _MISSING),
        ("seeds", _e(seeds) or _MISSING),
        ("size", size),
        ("steps", _e(settings.get("steps", _MISSING))),
        ("guidance", _e(_fmt_general(settings.get("guidance")))),
        ("strength", _e(_fmt_general(settings.get("strength")))),
        ("modes", "<br>".join(modes) or _MISSING),
        ("heatmap scale", scale_text),
        ("tool", f"{_e(tool.get('name', 'lora-prune'))} {_e(tool.get('version', ''))}"),
    ]
    body = "".join(f"<tr><th scope='row'>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        "<section id='settings-section'><h2>Settings</h2>"
        f"<table id='settings' class='kv'><tbody>{body}</tbody></table></section>"
    )


def _img(path: object, cls: str, alt: str, size: tuple[str, str], *, lazy: bool) -> str:
    w, h = size
    dims = f" width='{w}' height='{h}'" if w and h else ""
    loading = " loading='lazy'" if lazy else ""
    return f"<img class='{cls}' src='{_url(path)}' alt='{_e(alt)}'{dims}{loading}>"


def _references_section(
    references: Sequence[Mapping[str, Any]], prompts: Sequence[Any], size: tuple[str, str]
) -> str:
    if not references:
        return ""
    figures = []
    for ref in references:
        prompt, seed = ref.get("prompt"), ref.get("seed")
        caption = (
            f"<b>{_e(_prompt_label(prompt))}</b> \u00b7 seed {_e(seed)}"
            f"<br><span class='prompt'>{_e(_prompt_text(prompts, prompt))}</span>"
        )
        pair = ""
        for which in ("base", "full"):
            if ref.get(which):
                pair += (
                    f"<figure class='ref-image'>{_img(ref[which], 'reference ' + which, _REFERENCE_TEXT[which], size, lazy=False)}"
                    f"<figcaption>{_e(_REFERENCE_TEXT[which])}</figcaption></figure>"
                )
        figures.append(
            f"<figure class='ref-pair' data-ref='{_e(_ref_key(prompt, seed))}'>"
            f"<div class='pair'>{pair}</div><figcaption>{caption}</figcaption></figure>"
        )
    return (
        "<section id='references'><h2>References</h2>"
        "<p class='muted'>Every block image is compared to one of these: <b>solo</b> renders to "
        "the base model without the LoRA, <b>loo</b> renders to the full LoRA.</p>"
        f"<div class='refs'>{''.join(figures)}</div></section>"
    )


def _charts_section(analysis: Mapping[str, Any]) -> str:
    parts = []
    if analysis.get("influence"):
        parts.append(
            f"<img id='influence-chart' src='{_url(analysis['influence'])}' "
            "alt='bar chart of block influence, blocks in model order'>"
        )
    if analysis.get("contact_sheet"):
        url = _url(analysis["contact_sheet"])
        parts.append(
            f"<details><summary>Contact sheet (<a id='contact-sheet' href='{url}'>open full size</a>)"
            f"</summary><img id='contact-sheet-image' src='{url}' alt='contact sheet of all renders' "
            "loading='lazy'></details>"
        )
    if not parts:
        return ""
    return f"<section id='influence'><h2>Block influence</h2>{''.join(parts)}</section>"


def _effects_section(analysis: Mapping[str, Any], prompts: Sequence[Any]) -> str:
    """What the full LoRA does to each image, and a warning where it does (next to) nothing."""
    effects = [e for e in analysis.get("effects") or [] if isinstance(e, Mapping)]
    if not effects:
        return ""
    rows = []
    for e in effects:
        flag = "" if e.get("measurable", True) else " class='no-effect'"
        verdict = "yes" if e.get("measurable", True) else "<b>no: nothing can be verified here</b>"
        rows.append(
            f"<tr{flag}><td>{_e(_prompt_text(prompts, e.get('prompt')))}</td><td>{_e(e.get('seed'))}</td>"
            f"<td>{_fmt_mse(e.get('mse'))}</td><td>{_fmt_ssim(e.get('ssim_distance'))}</td>"
            f"<td>{verdict}</td></tr>"
        )
    warnings = "".join(
        f"<p class='warning'>warning: {_e(w)}</p>" for w in analysis.get("warnings") or []
    )
    return (
        "<section id='effects'><h2>The LoRA's effect per image</h2>"
        "<p class='muted'>MSE and 1 - SSIM of the full LoRA's render against the render without "
        f"it. An effect at or below MSE {_e(analysis.get('noise_floor_mse', 1.0))} (one 8-bit level) "
        "is render noise.</p>"
        + warnings
        + "<table id='effects-table'><thead><tr><th>prompt</th><th>seed</th><th>MSE</th>"
        "<th>1 - SSIM</th><th>measurable</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></section>"
    )


def _curve_section(analysis: Mapping[str, Any]) -> str:
    """The pruning curve: share of the effect kept by the top-k blocks, and each set's size."""
    curve = analysis.get("pruning_curve")
    if not isinstance(curve, Mapping):
        return ""
    rows = []
    for p in curve.get("points") or []:
        if not isinstance(p, Mapping):
            continue
        worst = p.get("worst") or {}
        mean = p.get("kept") or {}
        rows.append(
            f"<tr data-k='{_e(p.get('k'))}'><td>{_e(p.get('k'))}</td>"
            f"<td>{_fmt_percent(mean.get('mse'))}</td><td>{_fmt_percent(worst.get('mse'))}</td>"
            f"<td>{_fmt_percent(mean.get('ssim'))}</td><td>{_fmt_percent(worst.get('ssim'))}</td>"
            f"<td>{_fmt_bytes(p.get('bytes'))}</td><td>{'pass' if p.get('passed') else ''}</td></tr>"
        )
    image = curve.get("image")
    img = (
        (
            f"<img id='pruning-curve' src='{_url(image)}' alt='pruning curve: share of the "
            "effect kept by the top-k blocks'>"
        )
        if image
        else ""
    )
    return (
        "<section id='curve'><h2>Pruning curve</h2>"
        f"<p class='muted'>{_e(curve.get('formula', ''))}; a keep set passes when every image keeps "
        f"at least {_fmt_percent(curve.get('min_kept'))} for every distance.</p>{img}"
        "<table id='curve-table'><thead><tr><th>k</th><th>mean kept (MSE)</th>"
        "<th>worst kept (MSE)</th><th>mean kept (1-SSIM)</th><th>worst kept (1-SSIM)</th>"
        "<th>size</th><th>verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        "</section>"
    )


_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    # key, header, first sort direction (impact columns start with the biggest), tooltip.
    ("block", "block", "asc", "block id; sorts in model order"),
    ("rank", "rank", "asc", "1 = changes the image most"),
    ("mse", "MSE \u00b1 std", "desc", "mean squared error vs the reference, 8-bit levels squared"),
    ("ssim", "SSIM \u00b1 std", "asc", "structural similarity vs the reference; 1 = unchanged"),
    ("params", "params", "desc", "LoRA parameters in this block"),
    ("bytes", "size", "desc", "bytes this block takes in the file"),
    ("norm", "weight norm", "desc", "Frobenius norm of the block's weight change (#rank by norm)"),
)


def _row_sort_key(row: Mapping[str, Any]) -> tuple[float, int]:
    rank = _number(row.get("rank"))
    return (rank if rank is not None else math.inf, block_order(str(row.get("block"))))


def _ranking_table(
    mode: str, rows: Sequence[Mapping[str, Any]], keep: frozenset[str], spearman: object
) -> str:
    mses = [v for v in (_number(r.get("mse")) for r in rows) if v is not None]
    top = max(mses, default=0.0)
    head = "".join(
        f"<th scope='col' data-key='{key}' data-default='{default}' title='{_e(tip)}'"
        + (" aria-sort='ascending'" if key == "rank" else "")
        + f">{_e(label)}</th>"
        for key, label, default, tip in _COLUMNS
    )
    body = []
    for row in sorted(rows, key=_row_sort_key):
        block = str(row.get("block"))
        mse = _number(row.get("mse"))
        bar = ""
        if mse is not None and top > 0:
            bar = f"<span class='bar' style='width:{100.0 * mse / top:.1f}%'></span>"
        badge = (
            " <span class='keep-badge' title='in the suggested keep set'>keep</span>"
            if block in keep
            else ""
        )
        norm = _fmt_general(row.get("norm"))
        if _number(row.get("norm_rank")) is not None:
            norm += f" <span class='muted'>(#{_fmt_int(row.get('norm_rank'))})</span>"
        cells = [
            f"<td data-value='{block_order(block)}' class='block'>"
            f"<span class='dot' style='background:{_kind_colour(block)}'></span>{_e(block)}{badge}</td>",
            f"<td data-value='{_data_value(row.get('rank'))}'>{_e(_fmt_int(row.get('rank')))}</td>",
            f"<td data-value='{_data_value(mse)}' class='num mse'>{bar}<span>"
            f"{_e(_mse_with_std(mse, row.get('mse_std')))}</span></td>",
            f"<td data-value='{_data_value(row.get('ssim'))}' class='num'>"
            f"{_e(_with_std(row.get('ssim'), row.get('ssim_std'), _fmt_ssim))}</td>",
            f"<td data-value='{_data_value(row.get('params'))}' class='num'>{_e(_fmt_int(row.get('params')))}</td>",
            f"<td data-value='{_data_value(row.get('bytes'))}' class='num'>{_e(_fmt_bytes(row.get('bytes')))}</td>",
            f"<td data-value='{_data_value(row.get('norm'))}' class='num'>{norm}</td>",
        ]
        cls = " class='kept'" if block in keep else ""
        body.append(f"<tr data-block='{_e(block)}'{cls}>{''.join(cells)}</tr>")
    info = _MODE_INFO.get(mode)
    title = f"<h3>{_e(mode)}</h3>"
    if info:
        title = (
            f"<h3>{_e(mode)} <span class='muted'>\u2014 {_e(info[0])}, compared to the "
            f"{_e(_REFERENCE_TEXT[info[1]])} render</span></h3>"
        )
    rho = _number(spearman)
    rho_text = f"{rho:.2f}" if rho is not None else "n/a"
    note = (
        f"<p class='muted spearman' data-mode='{_e(mode)}'>Spearman correlation of this ranking "
        f"with the weight-norm ranking: <b>{_e(rho_text)}</b>. Click a column header to sort.</p>"
    )
    return (
        f"<div class='ranking' data-mode='{_e(mode)}'>{title}{note}"
        f"<table id='ranking-{_e(_slug(mode))}' class='ranking sortable' data-mode='{_e(mode)}'>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _ranking_section(
    modes: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    keep: frozenset[str],
    spearman: Mapping[str, Any],
) -> str:
    tables = [
        _ranking_table(
            mode, [r for r in rows if str(r.get("mode")) == mode], keep, spearman.get(mode)
        )
        for mode in modes
    ]
    return (
        "<section id='ranking'><h2>Ranking</h2>"
        "<p class='muted'>Rank 1 changes the image most. MSE is in squared 8-bit levels (0\u201365025), "
        "mean \u00b1 std over prompts and seeds; SSIM 1 means unchanged.</p>"
        f"{''.join(tables)}</section>"
    )


def _suggestion_section(suggestion: Mapping[str, Any] | None, n_blocks: int) -> str:
    if not suggestion:
        return (
            "<section id='suggestion'><h2>Suggested keep set</h2>"
            "<p>No suggestion was made for this analysis.</p></section>"
        )
    blocks = [str(b) for b in suggestion.get("blocks") or []]
    chips = " ".join(f"<code class='chip'>{_e(b)}</code>" for b in sorted(blocks, key=block_order))
    before, after = _number(suggestion.get("bytes_before")), _number(suggestion.get("bytes"))
    size = f"{_e(_fmt_bytes(before))} \u2192 {_e(_fmt_bytes(after))}"
    if before and after is not None:
        size += f" <span class='muted'>({100.0 * after / before:.1f}% of the original)</span>"
    command = str(suggestion.get("command") or "")
    if command:
        command_box = (
            "<div class='command'><pre><code id='slim-command'>"
            f"{_e(command)}</code></pre>"
            "<button type='button' id='copy-command'>copy</button></div>"
        )
    else:
        command_box = "<p id='no-command'>No slim command: nothing to drop.</p>"
    rows = [
        ("based on", _e(suggestion.get("mode", _MISSING))),
        (
            "coverage",
            f"{_e(_fmt_percent(suggestion.get('coverage')))} "
            f"<span class='muted'>(target {_e(_fmt_percent(suggestion.get('coverage_target')))})</span>",
        ),
        ("blocks", f"{len(blocks)} of {n_blocks}: {chips}" if blocks else "none"),
        ("spec", f"<code id='keep-spec'>{_e(suggestion.get('spec', ''))}</code>"),
        ("size", f"<span id='size-change'>{size}</span>"),
    ]
    body = "".join(f"<tr><th scope='row'>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        "<section id='suggestion'><h2>Suggested keep set</h2>"
        "<p class='muted'>The fewest blocks, in rank order, whose influence reaches the coverage "
        "target. Check the result with <code>lora-prune verify</code> before publishing.</p>"
        f"<table class='kv'><tbody>{body}</tbody></table>{command_box}</section>"
    )


def _gallery_tiles(
    mode: str,
    prompt: object,
    seed: object,
    reference: Mapping[str, Any],
    images: Sequence[Mapping[str, Any]],
    ranks: Mapping[tuple[str, str], Any],
    size: tuple[str, str],
    shown: bool,
) -> list[str]:
    """One gallery group's tiles: the reference, then each block's render and heatmap."""
    tiles = []
    info = _MODE_INFO.get(mode)
    if info and reference.get(info[1]):
        label = _REFERENCE_TEXT[info[1]]
        tiles.append(
            "<figure class='tile reference-tile'><div class='stack'>"
            f"{_img(reference[info[1]], 'render', label, size, lazy=not shown)}</div>"
            f"<figcaption><b>reference</b><br>{_e(label)}</figcaption></figure>"
        )
    items = [
        i
        for i in images
        if str(i.get("mode")) == mode and (i.get("prompt"), i.get("seed")) == (prompt, seed)
    ]
    for item in sorted(items, key=lambda i: block_order(str(i.get("block")))):
        block = str(item.get("block"))
        stack = ""
        if item.get("image"):
            stack += _img(item["image"], "render", f"{block}, {mode}", size, lazy=not shown)
        if item.get("heatmap"):
            stack += _img(
                item["heatmap"],
                "heatmap",
                f"difference heatmap of {block}",
                size,
                lazy=not shown,
            )
        rank = _number(ranks.get((mode, block)))
        rank_text = f" <span class='muted'>#{rank:.0f}</span>" if rank is not None else ""
        tiles.append(
            f"<figure class='tile' data-block='{_e(block)}'><div class='stack'>{stack}</div>"
            f"<figcaption><b>{_e(block)}</b>{rank_text}<br>MSE {_e(_fmt_mse(item.get('mse')))}"
            f" \u00b7 SSIM {_e(_fmt_ssim(item.get('ssim')))}</figcaption></figure>"
        )
    return tiles


def _gallery_controls(
    gallery_modes: Sequence[str], ref_keys: Sequence[tuple[object, object]], prompts: Sequence[Any]
) -> list[str]:
    """The gallery's heatmap toggle and opacity, and its mode and image pickers."""
    controls = [
        "<label><input type='checkbox' id='heatmap-toggle' checked> heatmap</label>",
        "<label>opacity <input type='range' id='heatmap-opacity' min='0' max='1' step='0.05' "
        f"value='{DEFAULT_OPACITY}'> <output id='heatmap-opacity-value'>{DEFAULT_OPACITY:.2f}</output></label>",
    ]
    if len(gallery_modes) > 1:
        options = "".join(f"<option value='{_e(m)}'>{_e(m)}</option>" for m in gallery_modes)
        controls.append(f"<label>mode <select id='gallery-mode'>{options}</select></label>")
    if len(ref_keys) > 1:
        options = "".join(
            f"<option value='{_e(_ref_key(p, s))}'>{_e(_prompt_label(p))} \u00b7 seed {_e(s)}: "
            f"{_e(_prompt_text(prompts, p)[:60])}</option>"
            for p, s in ref_keys
        )
        controls.append(f"<label>image <select id='gallery-ref'>{options}</select></label>")
    return controls


def _gallery_section(
    modes: Sequence[str],
    references: Sequence[Mapping[str, Any]],
    images: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    size: tuple[str, str],
) -> str:
    if not images:
        return ""
    prompts = list(settings.get("prompts") or [])
    # Reference order: as listed in references, then any prompt x seed only images name.
    ref_keys: list[tuple[object, object]] = [(r.get("prompt"), r.get("seed")) for r in references]
    for item in images:
        key = (item.get("prompt"), item.get("seed"))
        if key not in ref_keys:
            ref_keys.append(key)
    ref_by_key = {(r.get("prompt"), r.get("seed")): r for r in references}
    ranks = {(str(r.get("mode")), str(r.get("block"))): r.get("rank") for r in rows}
    gallery_modes = [m for m in modes if any(str(i.get("mode")) == m for i in images)]
    if not gallery_modes:
        return ""

    groups = []
    for mode in gallery_modes:
        for n, (prompt, seed) in enumerate(ref_keys):
            shown = mode == gallery_modes[0] and n == 0
            reference = ref_by_key.get((prompt, seed), {})
            tiles = _gallery_tiles(mode, prompt, seed, reference, images, ranks, size, shown)
            caption = (
                f"{_e(mode)} \u00b7 {_e(_prompt_label(prompt))} \u00b7 seed {_e(seed)}: "
                f"<span class='prompt'>{_e(_prompt_text(prompts, prompt))}</span>"
            )
            hidden = "" if shown else " hidden"
            groups.append(
                f"<div class='gallery-group' data-mode='{_e(mode)}' data-ref='{_e(_ref_key(prompt, seed))}'"
                f"{hidden}><p class='group-caption'>{caption} {_legend(settings, mode)}</p>"
                f"<div class='tiles'>{''.join(tiles)}</div></div>"
            )

    controls = _gallery_controls(gallery_modes, ref_keys, prompts)
    return (
        "<section id='gallery'><h2>Gallery</h2>"
        "<p class='muted'>Each block's render with its per-pixel squared difference to the "
        "reference drawn over it.</p>"
        f"<div class='controls' data-default-mode='{_e(gallery_modes[0])}' "
        f"data-default-ref='{_e(_ref_key(*ref_keys[0]))}'>{''.join(controls)}</div>"
        f"{''.join(groups)}</section>"
    )


def render_report(analysis: Mapping[str, Any]) -> str:
    """The report page for ``analysis`` (the content of ``ranking.json``) as HTML text.

    ``analysis`` follows the ``ranking.json`` schema; only ``settings`` and
    ``rows`` are needed, every other part is left out of the page when absent.
    Paths in it are relative to the folder the page is written to.
    """
    settings: Mapping[str, Any] = analysis.get("settings") or {}
    rows: list[Mapping[str, Any]] = list(analysis.get("rows") or [])
    references: list[Mapping[str, Any]] = list(analysis.get("references") or [])
    images: list[Mapping[str, Any]] = list(analysis.get("images") or [])
    suggestion: Mapping[str, Any] | None = analysis.get("suggestion")
    spearman: Mapping[str, Any] = analysis.get("spearman") or {}
    modes = _modes(settings, rows)
    keep = frozenset(str(b) for b in (suggestion or {}).get("blocks") or [])
    n_blocks = len({str(r.get("block")) for r in rows})
    width, height = _number(settings.get("width")), _number(settings.get("height"))
    size = (str(int(width)), str(int(height))) if width and height else ("", "")
    name = _lora_name(settings)
    prompts = list(settings.get("prompts") or [])
    sections = [
        _settings_section(settings, analysis),
        _references_section(references, prompts, size),
        _effects_section(analysis, prompts),
        _charts_section(analysis),
        _curve_section(analysis),
        _ranking_section(modes, rows, keep, spearman),
        _suggestion_section(suggestion, n_blocks),
        _gallery_section(modes, references, images, rows, settings, size),
    ]
    nav = "".join(
        f"<a href='#{target}'>{label}</a>"
        for target, label, present in (
            ("settings-section", "settings", True),
            ("references", "references", bool(references)),
            (
                "influence",
                "influence",
                bool(analysis.get("influence") or analysis.get("contact_sheet")),
            ),
            ("effects", "effect", bool(analysis.get("effects"))),
            ("curve", "pruning curve", bool(analysis.get("pruning_curve"))),
            ("ranking", "ranking", True),
            ("suggestion", "keep set", True),
            ("gallery", "gallery", bool(images)),
        )
        if present
    )
    tool = analysis.get("tool") or {}
    css = CSS % {"opacity": DEFAULT_OPACITY}
    # Renders of the tiny test model are blown up several times: keep their pixels sharp.
    body_tag = "<body class='small-renders'>" if width and width <= 128 else "<body>"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        # Nothing may be fetched from the network, even by accident.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src 'self' file: data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>lora-prune report: {_e(name)}</title><style>{css}</style></head>\n{body_tag}"
        f"<header><h1>lora-prune report: {_e(name)}</h1>"
        f"<p>{len(modes)} mode(s), {n_blocks} blocks, {len(prompts)} prompt(s) \u00d7 "
        f"{len(settings.get('seeds') or [])} seed(s), model {_e(settings.get('model', _MISSING))}</p>"
        f"<nav>{nav}</nav></header>\n<main>{''.join(s for s in sections if s)}"
        f"<footer>written by {_e(tool.get('name', 'lora-prune'))} {_e(tool.get('version', ''))}"
        "</footer></main>\n"
        f"<script>{JS}</script></body></html>\n"
    )


def write_report(out_dir: Path, analysis: Mapping[str, Any]) -> Path:
    """Write ``out_dir/report.html`` for ``analysis`` atomically and return its path.

    The page is written to a temp file in ``out_dir``, fsynced and renamed over
    ``report.html``, so a reader never sees half a page. Filesystem failures
    raise :class:`~lora_prune.errors.OutputError`.
    """
    dest = Path(out_dir) / REPORT_NAME
    data = render_report(analysis).encode("utf-8")
    atomic_write_bytes(dest, data, what="report")
    return dest
