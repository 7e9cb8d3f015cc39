"""The four output formats of ``check``: text, JSON, JUnit XML and GitHub annotations.

Each turns a :class:`~.model.CheckResult` into one string; :func:`render`
picks one by name (:data:`FORMATS`).
"""

from __future__ import annotations

import json
import re
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from ..blocks import format_block_spec
from ..errors import UsageError
from .model import CheckResult, FileResult, Finding, Status

__all__ = [
    "FORMATS",
    "github_escape_data",
    "github_escape_property",
    "render",
    "render_github",
    "render_json",
    "render_junit",
    "render_text",
]

#: Output formats of :func:`render`.
FORMATS: tuple[str, ...] = ("text", "json", "junit", "github")


def _display(text: str) -> str:
    """One printable line: control characters and undecodable bytes as escapes."""
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            # os.fsdecode keeps undecodable bytes as lone surrogates (U+DC80..U+DCFF).
            out.append(f"\\x{code - 0xDC00:02x}" if code >= 0xDC80 else f"\\u{code:04x}")
        elif unicodedata.category(ch) == "Cc":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


_STATUS_LABEL: dict[str, str] = {
    "pass": "PASS",
    "fail": "FAIL",
    "unreadable": "UNREADABLE",
    "unsafe": "UNSAFE",
}


def _summary(result: CheckResult) -> str:
    labels: dict[Status, str] = {
        "pass": "passed",
        "fail": "failed",
        "unreadable": "unreadable",
        "unsafe": "unsafe",
    }
    parts = [f"{result.count(s)} {label}" for s, label in labels.items()]
    n = len(result.files)
    return f"{n} file{'s' if n != 1 else ''}: {', '.join(parts)}; exit {result.exit_code}"


def _details(f: FileResult) -> str:
    parts: list[str] = []
    if f.format:
        parts.append(f.format)
    if f.base_model:
        parts.append(f.base_model)
    if f.dtypes:
        parts.append(" ".join(f"{d} x{n}" for d, n in f.dtypes.items()))
    if f.bytes is not None:
        parts.append(f"{f.bytes:,} bytes")
    if f.blocks:
        parts.append(f"blocks {format_block_spec(f.blocks)}")
    if f.ranks:
        parts.append("rank " + "/".join(str(r) for r in f.ranks))
    return ", ".join(parts)


def render_text(result: CheckResult) -> str:
    """Human-readable report: one line per file, its findings indented below."""
    lines: list[str] = []
    for f in result.files:
        lines.append(f"{_STATUS_LABEL[f.status]:<10} {_display(str(f.path))}")
        details = _details(f)
        if details:
            lines.append(f"           {_display(details)}")
        for finding in f.findings:
            lines.append(f"  {finding.level:<7} {finding.code}: {_display(finding.message)}")
    if not result.files:
        lines.append("no LoRA files found")
    lines.append(_summary(result))
    return "\n".join(lines) + "\n"


def render_json(result: CheckResult) -> str:
    """One JSON object: exit code, summary counts, and every file with its findings."""
    return json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"


_XML_INVALID = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    # XML 1.0 cannot hold most control characters or lone surrogates at all,
    # even escaped; ElementTree would write them and produce an invalid file.
    return _XML_INVALID.sub(lambda m: _display(m.group(0)), text)


def render_junit(result: CheckResult) -> str:
    """JUnit XML: one testsuite, one testcase per file.

    A failed file gets a ``<failure>``, an unreadable or unsafe one an
    ``<error>``; warnings go to the testcase's ``<system-out>``.
    """
    suite = ET.Element(
        "testsuite",
        {
            "name": "lora-prune check",
            "tests": str(len(result.files)),
            "failures": str(result.count("fail")),
            "errors": str(result.count("unreadable") + result.count("unsafe")),
            "skipped": "0",
        },
    )
    for f in result.files:
        case = ET.SubElement(
            suite,
            "testcase",
            {"classname": "lora-prune.check", "name": _xml_text(str(f.path)), "time": "0"},
        )
        if f.status != "pass":
            tag = "failure" if f.status == "fail" else "error"
            errors = f.errors
            first = errors[0] if errors else Finding("error", f.status, f.status)
            element = ET.SubElement(
                case,
                tag,
                {"message": _xml_text(first.message), "type": first.code},
            )
            element.text = _xml_text(
                "\n".join(f"{e.code}: {e.message}" for e in errors) or f.status
            )
        notes = [x for x in f.findings if x.level != "error"]
        details = _details(f)
        if notes or details:
            out = ET.SubElement(case, "system-out")
            text = [details] if details else []
            text += [f"{x.level}: {x.code}: {x.message}" for x in notes]
            out.text = _xml_text("\n".join(text))
    ET.indent(suite)
    body = ET.tostring(suite, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


def github_escape_data(text: str) -> str:
    """Escape a workflow command's message as GitHub's runner expects."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_escape_property(text: str) -> str:
    """Escape a workflow command property (``file=``, ``title=``)."""
    return github_escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _github_path(path: Path) -> str:
    # Annotations attach to repository-relative paths with forward slashes.
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    return path.as_posix()


def render_github(result: CheckResult) -> str:
    """GitHub Actions annotations: ``::error``/``::warning`` per finding, then a summary line."""
    lines: list[str] = []
    for f in result.files:
        prop = github_escape_property(_display(_github_path(f.path)))
        for finding in f.findings:
            if finding.level == "info":
                continue
            title = github_escape_property(f"lora-prune {finding.code}")
            message = github_escape_data(
                f"{_STATUS_LABEL[f.status]} {_display(str(f.path))}: {_display(finding.message)}"
            )
            lines.append(f"::{finding.level} file={prop},title={title}::{message}")
    lines.append(f"lora-prune check: {_summary(result)}")
    return "\n".join(lines) + "\n"


_RENDERERS: dict[str, Callable[[CheckResult], str]] = {
    "text": render_text,
    "json": render_json,
    "junit": render_junit,
    "github": render_github,
}


def render(result: CheckResult, fmt: str) -> str:
    """The result in one of :data:`FORMATS`."""
    try:
        renderer = _RENDERERS[fmt]
    except KeyError:
        raise UsageError(
            f"unknown format {fmt!r}", "--format", f"use {', '.join(FORMATS)}"
        ) from None
    return renderer(result)
