"""The one JSON parser for text that comes out of a user's file.

A safetensors header and the JSON strings inside its ``__metadata__``
(diffusers' ``lora_adapter_metadata``, lora-prune's own verification record)
come from strangers. :func:`loads_bounded` parses them with a size limit, an
integer-length limit and a nesting-depth limit, and turns every way the parse
can fail (bad syntax, too big, too deep, too long a number) into one
:class:`JsonLimitError` that callers map to their own message. Python's ``json``
alone raises ``RecursionError`` on deep nesting and ``ValueError`` on integers
longer than its 4,300-digit conversion limit; neither may escape to a user.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = [
    "JSON_MAX_DEPTH",
    "JSON_MAX_INT_DIGITS",
    "METADATA_JSON_MAX_BYTES",
    "JsonLimitError",
    "loads_bounded",
]

#: Deepest nesting of arrays/objects accepted. A LoRA header is 3 deep, a PEFT config 3.
JSON_MAX_DEPTH = 64
#: Longest integer literal accepted (digits and sign). 2**64 has 20 digits.
JSON_MAX_INT_DIGITS = 40
#: Largest JSON document accepted inside one metadata value (a PEFT config is a few KiB).
METADATA_JSON_MAX_BYTES = 4 * 1024 * 1024


class JsonLimitError(ValueError):
    """Text that is not JSON, or JSON beyond a limit.

    ``reason`` is a predicate phrase ("is not valid JSON (...)", "nests deeper than 64
    levels") that callers put after the name of what they parsed.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _parse_int(text: str) -> int:
    if len(text) > JSON_MAX_INT_DIGITS:
        raise JsonLimitError(
            f"has an integer of {len(text)} digits (at most {JSON_MAX_INT_DIGITS})"
        )
    return int(text)


def _parse_float(text: str) -> float:
    # float() is linear in the literal's length, but a megabyte-long one is no number either.
    if len(text) > 4 * JSON_MAX_INT_DIGITS:
        raise JsonLimitError(f"has a number of {len(text)} characters")
    return float(text)


def _depth_ok(doc: object, limit: int) -> bool:
    """Whether ``doc`` nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth + 1 > limit:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


def loads_bounded(
    text: str | bytes,
    *,
    max_bytes: int = METADATA_JSON_MAX_BYTES,
    max_depth: int = JSON_MAX_DEPTH,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """Parse JSON text from a file within the limits, or raise :class:`JsonLimitError`.

    Exceptions raised by ``object_pairs_hook`` propagate unchanged.
    """
    if len(text) > max_bytes:
        raise JsonLimitError(f"is {len(text)} bytes of JSON (at most {max_bytes})")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonLimitError(f"is not valid UTF-8 (byte {exc.start})") from exc
    try:
        doc = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            object_pairs_hook=object_pairs_hook,
        )
    except JsonLimitError:
        raise
    except json.JSONDecodeError as exc:
        raise JsonLimitError(f"is not valid JSON ({exc.msg} at byte {exc.pos})") from exc
    except RecursionError as exc:
        # The C scanner counts its own recursion: deeper than the interpreter allows.
        raise JsonLimitError(f"nests deeper than {max_depth} levels") from exc
    except ValueError as exc:
        raise JsonLimitError(f"is not valid JSON ({exc})") from exc
    if not _depth_ok(doc, max_depth):
        raise JsonLimitError(f"nests deeper than {max_depth} levels")
    return doc
